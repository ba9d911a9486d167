//! Identities: the mesh identity and tenants' own, from files or from an issuer (checked here,
//! obtained by `app` before serving).

use std::path::Path;
use std::sync::Arc;

use yamlconf::{line_of as line, Collector};

use super::super::schema::RawConfig;
use super::*;
use std::time::{Duration, SystemTime};

use super::super::schema::RawIdentity;
use crate::identity::{Identity, IdentityFile, IdentityPaths};

/// The mesh identity and the tenants' own ones (numbered from 1; see `Snapshot::identity_at`),
/// setting each tenant's identity number.
pub(super) fn identities(
    path: &Path,
    raw: &RawConfig,
    tenants: &mut super::tenants::Tenants<'_>,
    (td, td_ok): (&str, bool),
    now: SystemTime,
    errs: &mut Collector,
) -> (Option<Arc<Identity>>, Vec<Arc<Identity>>) {
    let idr = &raw.mesh.identity;
    let load = |idr: &RawIdentity, errs: &mut Collector, what: &str| -> Option<Arc<Identity>> {
        if idr.istio_ca.is_some() || idr.vault.is_some() {
            return issued_identity(path, idr, errs, what, td_ok.then_some(td), now);
        }
        for (k, v) in [
            ("spiffe_id", idr.spiffe_id.as_ref().map(line)),
            ("ttl", idr.ttl.as_ref().map(line)),
        ] {
            if let Some(l) = v {
                errs.at(
                    l,
                    format!("{what}identity.{k} is only for an issuer (istio_ca or vault)"),
                );
            }
        }
        let (Some(cert_chain), Some(key)) = (&idr.cert_chain, &idr.key) else {
            errs.at(
                line(&idr.root_cert),
                format!("{what}identity needs cert_chain and key files, or an issuer (istio_ca or vault)"),
            );
            return None;
        };
        let paths = IdentityPaths {
            cert_chain: resolve_path(path, &cert_chain.value),
            key: resolve_path(path, &key.value),
            root_cert: resolve_path(path, &idr.root_cert.value),
        };
        if !td_ok {
            return None;
        }
        match Identity::load(&paths, td, now) {
            Ok(i) => Some(Arc::new(i)),
            Err(e) => {
                let l = match e.file() {
                    IdentityFile::CertChain => line(cert_chain),
                    IdentityFile::Key => line(key),
                    IdentityFile::RootCert => line(&idr.root_cert),
                };
                errs.at(l, format!("{what}{e}"));
                None
            }
        }
    };
    let identity = load(idr, errs, "");
    // Tenants' identities: numbered from 1 in first-use order; tenants naming the same
    // certificate share a number, so they share upstream connections too.
    let mut tenant_identities: Vec<Arc<Identity>> = Vec::new();
    for (ti, name, raw_id) in std::mem::take(&mut tenants.identities) {
        let Some(i) = load(&raw_id.value, errs, &format!("tenant {name:?} identity: ")) else {
            continue;
        };
        let same_as_mesh = identity.as_ref().is_some_and(|m| m.fingerprint == i.fingerprint);
        tenants.list[ti].identity = if same_as_mesh {
            0
        } else if let Some(k) = tenant_identities.iter().position(|x| x.fingerprint == i.fingerprint) {
            k + 1
        } else {
            tenant_identities.push(i);
            tenant_identities.len()
        };
    }

    (identity, tenant_identities)
}

/// An identity from an issuer: checks the block and returns the bootstrap identity (if files are
/// given) or a pending stand-in; `app` obtains the real certificate before serving.
fn issued_identity(
    path: &Path,
    idr: &RawIdentity,
    errs: &mut Collector,
    what: &str,
    trust_domain: Option<&str>,
    now: SystemTime,
) -> Option<Arc<Identity>> {
    use crate::identity::issuer::{self, IssuerKind, IssuerSpec, VaultAuth};
    let before = errs.list.len();
    let anchor = idr
        .istio_ca
        .as_ref()
        .map(line)
        .or(idr.vault.as_ref().map(line))
        .unwrap_or(line(&idr.root_cert));
    if let (Some(_), Some(v)) = (&idr.istio_ca, &idr.vault) {
        errs.at(
            line(v),
            format!("{what}identity names two issuers (istio_ca and vault); choose one"),
        );
    }
    let spiffe_id = match &idr.spiffe_id {
        None => {
            errs.at(anchor, format!("{what}identity.spiffe_id is required with an issuer"));
            String::new()
        }
        Some(id) => {
            match crate::identity::spiffe_trust_domain(&id.value) {
                Some(t) if id.value.split('/').count() > 3 && !id.value.contains(char::is_whitespace) => {
                    if trust_domain.is_some_and(|td| td != t) {
                        errs.at(
                            line(id),
                            format!(
                                "{what}identity.spiffe_id {:?} is outside trust domain {:?}",
                                id.value,
                                trust_domain.unwrap_or("")
                            ),
                        );
                    }
                }
                _ => errs.at(
                    line(id),
                    format!(
                        "{what}invalid spiffe_id {:?}: expected spiffe://TRUST_DOMAIN/ns/NS/sa/SA",
                        id.value
                    ),
                ),
            }
            id.value.clone()
        }
    };
    let ttl = idr
        .ttl
        .as_ref()
        .map(|t| t.value.0)
        .unwrap_or(Duration::from_secs(24 * 3600));
    if let Some(t) = &idr.ttl {
        if ttl < Duration::from_secs(2) || ttl > Duration::from_secs(90 * 86400) {
            // istiod refuses more than 90 days (MAX_WORKLOAD_CERT_TTL).
            errs.at(line(t), format!("{what}identity.ttl must be between 2s and 90 days"));
        }
    }
    let bootstrap = match (&idr.cert_chain, &idr.key) {
        (Some(c), Some(k)) => Some(IdentityPaths {
            cert_chain: resolve_path(path, &c.value),
            key: resolve_path(path, &k.value),
            root_cert: resolve_path(path, &idr.root_cert.value),
        }),
        (None, None) => None,
        (Some(c), None) => {
            errs.at(line(c), format!("{what}identity.cert_chain needs identity.key too"));
            None
        }
        (None, Some(k)) => {
            errs.at(line(k), format!("{what}identity.key needs identity.cert_chain too"));
            None
        }
    };
    let file = |p: &Option<serde_saphyr::Spanned<String>>| p.as_ref().map(|p| resolve_path(path, &p.value));
    let readable = |errs: &mut Collector, p: &Option<serde_saphyr::Spanned<String>>, what_file: &str| {
        if let Some(p) = p {
            if let Err(e) = std::fs::metadata(resolve_path(path, &p.value)) {
                errs.at(line(p), format!("{what}cannot read {what_file} {}: {e}", p.value));
            }
        }
    };
    let kind = if let Some(ca) = &idr.istio_ca {
        if let Err(e) = issuer::check_address(&ca.value.address.value, true) {
            errs.at(line(&ca.value.address), format!("{what}istio_ca.address {e}"));
        }
        if ca.value.address.value.starts_with("http://") {
            errs.at(
                line(&ca.value.address),
                format!("{what}istio_ca.address: the Istio CA speaks TLS only (a token must not travel in clear text)"),
            );
        }
        if let Some(n) = &ca.value.server_name {
            if rustls::pki_types::ServerName::try_from(n.value.as_str()).is_err() {
                errs.at(
                    line(n),
                    format!("{what}istio_ca.server_name {:?} is not a DNS name", n.value),
                );
            }
        }
        if let Some(c) = &ca.value.cluster_id {
            if http::HeaderValue::from_str(&c.value).is_err() || c.value.is_empty() {
                errs.at(
                    line(c),
                    format!("{what}istio_ca.cluster_id {:?} cannot be sent as a header", c.value),
                );
            }
        }
        readable(errs, &ca.value.token_file, "token_file");
        readable(errs, &ca.value.ca_cert, "ca_cert");
        if ca.value.token_file.is_none() && bootstrap.is_none() {
            errs.at(
                line(ca),
                format!(
                    "{what}istio_ca needs token_file, or cert_chain and key to authenticate with a mesh certificate"
                ),
            );
        }
        IssuerKind::IstioCa {
            address: ca.value.address.value.clone(),
            server_name: ca
                .value
                .server_name
                .as_ref()
                .map(|s| s.value.clone())
                .unwrap_or_else(|| "istiod.istio-system.svc".into()),
            ca_cert: file(&ca.value.ca_cert),
            token_file: file(&ca.value.token_file),
            cluster_id: ca.value.cluster_id.as_ref().map(|c| c.value.clone()),
        }
    } else {
        let v = idr.vault.as_ref().expect("called with an issuer");
        let r = &v.value;
        if let Err(e) = issuer::check_address(&r.address.value, true) {
            errs.at(line(&r.address), format!("{what}vault.address {e}"));
        }
        readable(errs, &r.ca_cert, "ca_cert");
        readable(errs, &r.token_file, "token_file");
        let auth = match (&r.token_file, &r.approle) {
            (Some(t), None) => VaultAuth::TokenFile(resolve_path(path, &t.value)),
            (None, Some(a)) => {
                readable(errs, &Some(a.value.role_id_file.clone()), "role_id_file");
                readable(errs, &Some(a.value.secret_id_file.clone()), "secret_id_file");
                VaultAuth::AppRole {
                    mount: a.value.mount.clone(),
                    role_id_file: resolve_path(path, &a.value.role_id_file.value),
                    secret_id_file: resolve_path(path, &a.value.secret_id_file.value),
                }
            }
            _ => {
                errs.at(
                    line(v),
                    format!("{what}vault needs exactly one of token_file and approle"),
                );
                VaultAuth::TokenFile(PathBuf::new())
            }
        };
        let mount = r.mount.as_ref().map_or("pki", |m| m.value.as_str()).to_string();
        let mut segments = vec![
            (
                "vault.mount",
                mount.clone(),
                r.mount.as_ref().map_or(line(&r.role), line),
            ),
            ("vault.role", r.role.value.clone(), line(&r.role)),
        ];
        if let Some(a) = &r.approle {
            segments.push(("vault.approle.mount", a.value.mount.clone(), line(a)));
        }
        for (name, seg, l) in segments {
            // Mounts may be nested (`pki/mesh`); no empty parts, queries or spaces.
            if seg.is_empty() || seg.contains(['?', '#', ' ', '%']) || seg.split('/').any(str::is_empty) {
                errs.at(l, format!("{what}{name} {seg:?} is not a Vault path"));
            }
        }
        if r.address.value.starts_with("http://") {
            let host = r.address.value.trim_start_matches("http://");
            if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
                tracing::warn!(address = %r.address.value, "vault.address is plain http: the Vault token and the issued private key cross the network unencrypted");
            }
        }
        IssuerKind::Vault {
            address: r.address.value.clone(),
            ca_cert: file(&r.ca_cert),
            mount,
            role: r.role.value.clone(),
            sign: r.method == super::super::schema::VaultMethod::Sign,
            common_name: r.common_name.clone(),
            auth,
        }
    };
    let spec = Arc::new(IssuerSpec {
        spiffe_id,
        ttl,
        root_cert: resolve_path(path, &idr.root_cert.value),
        bootstrap: bootstrap.clone(),
        kind,
    });
    let td = trust_domain?;
    if errs.list.len() > before {
        return None;
    }
    // A bootstrap certificate is checked like file identities and must be the same SPIFFE ID.
    // Out of its validity it is only passed over: it was meant to be short-lived, and the
    // identity in use (kept across reloads) or a token can still get a certificate.
    if let Some(paths) = &bootstrap {
        return match Identity::load(paths, td, now) {
            Err(
                e @ (crate::identity::IdentityError::Expired { .. }
                | crate::identity::IdentityError::NotYetValid { .. }),
            ) => {
                tracing::warn!(error = %e, "bootstrap certificate not valid now; not using it");
                pending_identity(spec, idr, errs, what, anchor)
            }
            Ok(mut i) => {
                if i.spiffe_id != spec.spiffe_id {
                    errs.at(
                        line(idr.cert_chain.as_ref().expect("bootstrap has a cert_chain")),
                        format!(
                            "{what}bootstrap certificate is for {}, not identity.spiffe_id {}",
                            i.spiffe_id, spec.spiffe_id
                        ),
                    );
                    return None;
                }
                i.issuer = Some(spec);
                Some(Arc::new(i))
            }
            Err(e) => {
                let l = match e.file() {
                    IdentityFile::CertChain => line(idr.cert_chain.as_ref().expect("bootstrap")),
                    IdentityFile::Key => line(idr.key.as_ref().expect("bootstrap")),
                    IdentityFile::RootCert => line(&idr.root_cert),
                };
                errs.at(l, format!("{what}{e}"));
                None
            }
        };
    }
    pending_identity(spec, idr, errs, what, anchor)
}

fn pending_identity(
    spec: Arc<crate::identity::issuer::IssuerSpec>,
    idr: &RawIdentity,
    errs: &mut Collector,
    what: &str,
    anchor: Option<u64>,
) -> Option<Arc<Identity>> {
    let roots = match Identity::load_roots(&spec.root_cert) {
        Ok(r) => r,
        Err(e) => {
            errs.at(line(&idr.root_cert), format!("{what}{e}"));
            return None;
        }
    };
    match crate::identity::issuer::pending(spec, roots) {
        Ok(i) => Some(Arc::new(i)),
        Err(e) => {
            errs.at(anchor, format!("{what}{e}"));
            None
        }
    }
}

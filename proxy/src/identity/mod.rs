//! The proxy's mesh workload identity: certificate chain, private key and trust bundle, loaded
//! from files and checked the way the mesh will check them (chain to the mesh root, a SPIFFE URI
//! SAN in the trust domain, key matching the leaf, validity), plus the SPIFFE server verifier.
//!
//! Checking at load time turns a silent mTLS failure in production ("handshake failed" at the
//! sidecar) into a config error naming the file.

pub mod issuer;
pub mod verifier;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use sha2::Digest;

pub use verifier::{ExpectedServer, SpiffeServerVerifier};

/// Which of the three identity files an error is about, so config errors can name its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityFile {
    CertChain,
    Key,
    RootCert,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        file: IdentityFile,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse {
        file: IdentityFile,
        path: PathBuf,
        reason: String,
    },
    #[error("private key {key} does not match the leaf certificate in {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("leaf certificate in {path} does not chain to the mesh root in {root}: {reason}")]
    NotChained {
        path: PathBuf,
        root: PathBuf,
        reason: String,
    },
    #[error("leaf certificate in {path} has no SPIFFE URI SAN (found: {found})")]
    NoSpiffe { path: PathBuf, found: String },
    #[error("leaf certificate in {path} is for {id}, which is outside trust domain {trust_domain:?}")]
    WrongTrustDomain {
        path: PathBuf,
        id: String,
        trust_domain: String,
    },
    #[error("leaf certificate in {path} expired at {not_after} (now {now})")]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("leaf certificate in {path} is not valid before {not_before} (now {now})")]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
}

impl IdentityError {
    pub fn file(&self) -> IdentityFile {
        match self {
            IdentityError::Read { file, .. } | IdentityError::Parse { file, .. } => *file,
            IdentityError::KeyMismatch { .. } => IdentityFile::Key,
            _ => IdentityFile::CertChain,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPaths {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub root_cert: PathBuf,
}

/// A loaded, checked workload identity. Immutable: rotation builds a new one.
#[derive(Debug)]
pub struct Identity {
    pub spiffe_id: String,
    pub certified_key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub paths: IdentityPaths,
    /// SHA-256 over the chain and the trust bundle: equal fingerprints mean the same identity,
    /// so a reload that re-reads unchanged files keeps its pooled connections.
    pub fingerprint: [u8; 32],
    /// Where renewals come from; `None` for file-based identities (watched instead).
    pub issuer: Option<Arc<issuer::IssuerSpec>>,
}

fn read(file: IdentityFile, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        file,
        path: path.to_owned(),
        source,
    })
}

fn parse_err(file: IdentityFile, path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::Parse {
        file,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn load_certs(file: IdentityFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = read(file, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| parse_err(file, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(parse_err(file, path, "no PEM CERTIFICATE block found"));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c.as_ref())
            .map_err(|e| parse_err(file, path, format!("certificate #{} is not valid X.509: {e}", i + 1)))?;
    }
    Ok(certs)
}

/// Formats a time as RFC 3339 in UTC, for error messages and `meshgate check`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_string()),
            _ => None,
        })
        .collect()
}

/// The trust domain of a SPIFFE ID (`spiffe://TD/...`), if it is one.
pub fn spiffe_trust_domain(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    (!td.is_empty()).then_some(td)
}

/// `NS` of `spiffe://TD/ns/NS/...`: the path after the trust domain must start `ns/NS`
/// (Istio's form; other SPIFFE IDs name no namespace).
pub fn spiffe_namespace(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segments = path.split('/');
    match (segments.next(), segments.next()) {
        (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

impl Identity {
    /// Loads and checks the identity at `now`.
    pub fn load(paths: &IdentityPaths, trust_domain: &str, now: SystemTime) -> Result<Identity, IdentityError> {
        let chain = load_certs(IdentityFile::CertChain, &paths.cert_chain)?;
        let roots_der = load_certs(IdentityFile::RootCert, &paths.root_cert)?;
        let key_pem = read(IdentityFile::Key, &paths.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            parse_err(
                IdentityFile::Key,
                &paths.key,
                format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
            )
        })?;
        Identity::check(chain, key, roots_der, paths, trust_domain, now, Duration::ZERO)
    }

    /// Reads only the trust bundle (for an identity an issuer will provide).
    pub fn load_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        load_certs(IdentityFile::RootCert, path)
    }

    /// Checks an identity given in memory (an issuer's answer); `paths` name where each part
    /// came from in error messages.
    pub fn check(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots_der: Vec<CertificateDer<'static>>,
        paths: &IdentityPaths,
        trust_domain: &str,
        now: SystemTime,
        not_before_skew: Duration,
    ) -> Result<Identity, IdentityError> {
        if chain.is_empty() {
            return Err(parse_err(IdentityFile::CertChain, &paths.cert_chain, "no certificate"));
        }
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| parse_err(IdentityFile::Key, &paths.key, format!("unsupported private key: {e}")))?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        certified_key.keys_match().map_err(|_| IdentityError::KeyMismatch {
            key: paths.key.clone(),
            cert: paths.cert_chain.clone(),
        })?;

        let mut roots = RootCertStore::empty();
        for (i, r) in roots_der.iter().enumerate() {
            roots.add(r.clone()).map_err(|e| {
                parse_err(
                    IdentityFile::RootCert,
                    &paths.root_cert,
                    format!("certificate #{} cannot be a trust anchor: {e}", i + 1),
                )
            })?;
        }

        let leaf_path = &paths.cert_chain;
        let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map_err(|e| parse_err(IdentityFile::CertChain, leaf_path, e.to_string()))?;
        let not_before = UNIX_EPOCH + Duration::from_secs(leaf.validity().not_before.timestamp().max(0) as u64);
        let not_after = UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64);
        // A certificate issued a moment ago by a CA whose clock runs ahead of ours is accepted
        // as if it were its start time (within `not_before_skew`), for every check below.
        let now = match not_before.duration_since(now) {
            Ok(ahead) if ahead <= not_before_skew => not_before,
            _ => now,
        };
        if now > not_after {
            return Err(IdentityError::Expired {
                path: leaf_path.clone(),
                not_after: rfc3339(not_after),
                now: rfc3339(now),
            });
        }
        if now < not_before {
            return Err(IdentityError::NotYetValid {
                path: leaf_path.clone(),
                not_before: rfc3339(not_before),
                now: rfc3339(now),
            });
        }

        let sans = uri_sans(chain[0].as_ref());
        let spiffe: Vec<&String> = sans.iter().filter(|s| s.starts_with("spiffe://")).collect();
        let Some(first) = spiffe.first() else {
            return Err(IdentityError::NoSpiffe {
                path: leaf_path.clone(),
                found: if sans.is_empty() {
                    "no URI SANs".into()
                } else {
                    sans.join(", ")
                },
            });
        };
        let spiffe_id = spiffe
            .iter()
            .find(|s| spiffe_trust_domain(s) == Some(trust_domain))
            .ok_or_else(|| IdentityError::WrongTrustDomain {
                path: leaf_path.clone(),
                id: (*first).clone(),
                trust_domain: trust_domain.to_string(),
            })?
            .to_string();

        // The sidecar verifies our chain against the same bundle with client-auth usage.
        let ee = webpki::EndEntityCert::try_from(&chain[0])
            .map_err(|e| parse_err(IdentityFile::CertChain, leaf_path, e.to_string()))?;
        let unix_now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &roots.roots,
            &chain[1..],
            unix_now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| IdentityError::NotChained {
            path: leaf_path.clone(),
            root: paths.root_cert.clone(),
            reason: verifier::describe_webpki_error(&e),
        })?;

        let mut h = sha2::Sha256::new();
        for c in chain.iter().chain(roots_der.iter()) {
            h.update((c.len() as u64).to_be_bytes());
            h.update(c.as_ref());
        }
        Ok(Identity {
            fingerprint: h.finalize().into(),
            spiffe_id,
            certified_key: Arc::new(certified_key),
            roots: Arc::new(roots),
            not_before,
            not_after,
            paths: paths.clone(),
            issuer: None,
        })
    }

    /// Whether this is a stand-in for a certificate an issuer has not delivered yet.
    pub fn is_pending(&self) -> bool {
        self.issuer.is_some() && self.not_after == UNIX_EPOCH
    }
}

/// Serves the proxy's one client certificate to rustls. A resolver (rather than a fixed cert)
/// is what lets a later rotation swap the certificate without rebuilding every TLS config.
#[derive(Debug)]
pub struct ClientCert(pub Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_000_000)),
            "2026-11-30T00:53:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn namespace_of_spiffe_ids() {
        assert_eq!(
            spiffe_namespace("spiffe://cluster.local/ns/billing/sa/batch"),
            Some("billing")
        );
        assert_eq!(spiffe_namespace("spiffe://cluster.local/sa/batch"), None);
        assert_eq!(spiffe_namespace("spiffe://cluster.local/ns//sa/x"), None);
        // A trust domain named `ns` is not a namespace.
        assert_eq!(spiffe_namespace("spiffe://ns/ns/x/sa/y"), Some("x"));
        assert_eq!(spiffe_namespace("spiffe://ns/vm/billing"), None);
    }

    #[test]
    fn trust_domain_of_spiffe_ids() {
        assert_eq!(
            spiffe_trust_domain("spiffe://cluster.local/ns/a/sa/b"),
            Some("cluster.local")
        );
        assert_eq!(spiffe_trust_domain("spiffe:///ns/a"), None);
        assert_eq!(spiffe_trust_domain("https://cluster.local/"), None);
    }
}

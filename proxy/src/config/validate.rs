//! Turns a parsed [`RawConfig`] into a [`Snapshot`], or into every error it contains, each with
//! its line. Cross-references, uniqueness and the identity files are checked here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderName;

use super::schema::{ListenerProtocol, RawConfig, RawDrain, RawIdentity, RawUpstream, UpstreamProtocol};

/// Idle TCP connections are closed after this unless the listener says otherwise (Envoy's
/// `tcp_proxy` default is 1 h as well).
const DEFAULT_TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
use super::{sni_for, ConfigErrors, Listener, Service, Snapshot, UpstreamSettings};
use crate::identity::{ExpectedServer, Identity, IdentityFile, IdentityPaths};
use crate::policy::keys::parse_key_hash;
use crate::policy::{Allow, Tenant, Tenants};
use crate::route::RouteTable;
use yamlconf::{line_of as line, Collector};

/// Names that become metric label values and log fields: keep them boring.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Paths in the config are relative to the config file's directory.
pub(super) fn resolve_path(config: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

pub(super) fn parse(path: &Path, text: &str, now: SystemTime) -> Result<Snapshot, ConfigErrors> {
    let raw: RawConfig =
        serde_saphyr::from_str(text).map_err(|e| ConfigErrors(vec![yamlconf::yaml_error(path, &e)]))?;
    let mut errs = Collector::new(path);
    let snapshot = build(path, raw, now, &mut errs);
    if errs.list.is_empty() {
        if let Some(s) = snapshot {
            return Ok(s);
        }
    }
    Err(errs.into_errors())
}

fn build(path: &Path, raw: RawConfig, now: SystemTime, errs: &mut Collector) -> Option<Snapshot> {
    // Listeners.
    if raw.listeners.is_empty() {
        errs.at(None, "at least one listener is required");
    }
    let mut listeners = Vec::new();
    let mut listener_services = Vec::new();
    let mut listener_names: HashMap<String, Option<u64>> = HashMap::new();
    let mut binds: HashMap<std::net::SocketAddr, String> = HashMap::new();
    let mut udp_binds: HashMap<std::net::SocketAddr, String> = HashMap::new();
    for l in &raw.listeners {
        let name = &l.name.value;
        if !valid_name(name) {
            errs.at(
                line(&l.name),
                format!("invalid listener name {name:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        if let Some(prev) = listener_names.insert(name.clone(), line(&l.name)) {
            errs.at(
                line(&l.name),
                format!(
                    "duplicate listener name {name:?} (first defined on line {})",
                    prev.unwrap_or(0)
                ),
            );
        }
        // Port 0 asks the OS for a free port: never a clash. An h3 listener is UDP: it may
        // share its address with a TCP listener (HTTP/3 on 443/udp beside HTTP on 443/tcp).
        let fixed_port = l.bind.value.0.port() != 0;
        let binds = if l.protocol == ListenerProtocol::H3 {
            &mut udp_binds
        } else {
            &mut binds
        };
        if let Some(other) = binds.insert(l.bind.value.0, name.clone()).filter(|_| fixed_port) {
            errs.at(
                line(&l.bind),
                format!("address {} is already bound by listener {other:?}", l.bind.value.0),
            );
        }
        let mode = l.proxy_protocol.value;
        if mode != crate::listener::proxy_protocol::Mode::Off && l.trusted_proxies.is_empty() {
            errs.at(
                line(&l.proxy_protocol),
                "proxy_protocol needs trusted_proxies: the load balancer addresses whose headers are believed",
            );
        }
        match (l.protocol, &l.service) {
            (ListenerProtocol::Tcp, None) => errs.at(
                line(&l.name),
                format!("listener {name:?} has protocol tcp but no service: name the service its connections go to"),
            ),
            (ListenerProtocol::Http | ListenerProtocol::H3, Some(s)) => errs.at(
                line(s),
                "service: only tcp listeners have one (http and h3 listeners route by Host)",
            ),
            _ => {}
        }
        if let (ListenerProtocol::Http | ListenerProtocol::H3, Some(t)) = (l.protocol, &l.idle_timeout) {
            errs.at(
                line(t),
                "idle_timeout: only for tcp listeners (http uses limits.header_read_timeout)",
            );
        }
        let tls = match (l.protocol, &l.tls) {
            (ListenerProtocol::H3, None) => {
                errs.at(
                    line(&l.name),
                    format!("listener {name:?} has protocol h3 but no tls: QUIC needs a server certificate (tls.cert_chain, tls.key)"),
                );
                None
            }
            (ListenerProtocol::H3, Some(t)) => {
                let cert = resolve_path(path, &t.value.cert_chain.value);
                let key = resolve_path(path, &t.value.key.value);
                match super::ListenerTls::load(&cert, &key) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let l = if e.contains("private key") {
                            line(&t.value.key)
                        } else {
                            line(&t.value.cert_chain)
                        };
                        errs.at(l, format!("listener {name:?} tls: {e}"));
                        None
                    }
                }
            }
            (_, Some(t)) => {
                errs.at(
                    line(t),
                    "tls: only h3 listeners have one (http and tcp listeners speak plain text to the VMs)",
                );
                None
            }
            (_, None) => None,
        };
        if l.protocol == ListenerProtocol::H3 && l.proxy_protocol.value != crate::listener::proxy_protocol::Mode::Off {
            errs.at(
                line(&l.proxy_protocol),
                "proxy_protocol: not for h3 listeners (QUIC has no PROXY header)",
            );
        }
        let alt_svc = match &l.alt_svc {
            Some(a) if l.protocol != ListenerProtocol::Http => {
                errs.at(line(a), "alt_svc: only http listeners advertise one");
                None
            }
            Some(a) => match http::HeaderValue::from_str(&a.value) {
                Ok(v) if !a.value.trim().is_empty() => Some(v),
                _ => {
                    errs.at(line(a), format!("alt_svc {:?} is not a valid header value", a.value));
                    None
                }
            },
            None => None,
        };
        listener_services.push(l.service.clone());
        listeners.push(Listener {
            name: name.clone(),
            bind: l.bind.value.0,
            protocol: l.protocol,
            proxy_protocol: mode,
            trusted_proxies: l.trusted_proxies.iter().map(|c| c.0).collect(),
            max_connections: l.max_connections,
            service: None,
            idle_timeout: l.idle_timeout.as_ref().map_or(DEFAULT_TCP_IDLE_TIMEOUT, |t| t.value.0),
            tls,
            alt_svc,
        });
    }
    let admin = raw.admin.as_ref().map(|a| {
        if let Some(other) = binds.get(&a.bind.value.0).filter(|_| a.bind.value.0.port() != 0) {
            errs.at(
                line(&a.bind),
                format!(
                    "admin address {} is already bound by listener {other:?}",
                    a.bind.value.0
                ),
            );
        }
        let token = a.token_file.as_ref().and_then(|tf| {
            let p = resolve_path(path, &tf.value);
            match std::fs::read_to_string(&p) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                Ok(_) => {
                    errs.at(line(tf), format!("admin token file {} is empty", p.display()));
                    None
                }
                Err(e) => {
                    errs.at(line(tf), format!("cannot read admin token file {}: {e}", p.display()));
                    None
                }
            }
        });
        super::Admin {
            bind: a.bind.value.0,
            token,
        }
    });

    let (drain_raw, drain_line) = match &raw.drain {
        Some(d) => (&d.value, line(d)),
        None => (&RawDrain::default(), None),
    };
    let drain = super::DrainSettings {
        delay: drain_raw.delay.0,
        spread: drain_raw.spread.0,
        timeout: drain_raw.timeout.0,
    };
    if drain.delay + drain.spread > drain.timeout {
        errs.at(
            drain_line,
            "drain: delay + spread must not exceed timeout, or connections are cut before they are asked to close",
        );
    }
    let (lim, lim_line) = match &raw.limits {
        Some(l) => (&l.value, line(l)),
        None => (&super::schema::RawLimits::default(), None),
    };
    let limits = super::Limits {
        max_connections: lim.max_connections,
        max_header_bytes: lim.max_header_bytes,
        max_headers: lim.max_headers,
        header_read_timeout: lim.header_read_timeout.0,
        h2_max_concurrent_streams: lim.h2_max_concurrent_streams,
        max_request_body: lim.max_request_body,
    };
    // hyper needs room for at least one read buffer; tiny values only produce odd 431s.
    if limits.max_header_bytes < 8192
        || limits.max_headers == 0
        || limits.max_connections == 0
        || limits.h2_max_concurrent_streams == 0
    {
        errs.at(lim_line, "limits: max_header_bytes must be >= 8192 and the counts >= 1");
    }
    let log = super::LogSettings {
        level: raw.log.as_ref().and_then(|l| l.level.clone()),
        format: raw.log.as_ref().and_then(|l| l.format),
    };
    let reload = super::ReloadSettings {
        watch: raw.reload.as_ref().is_none_or(|r| r.watch),
        interval: raw
            .reload
            .as_ref()
            .map_or(super::schema::d_watch_interval().0, |r| r.interval.0),
    };

    // Mesh.
    let td = raw.mesh.trust_domain.value.clone();
    let td_ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if !td_ok {
        errs.at(
            line(&raw.mesh.trust_domain),
            format!("invalid trust_domain {td:?}: expected a name such as cluster.local"),
        );
    }

    // Services and routes.
    let mut services: Vec<Arc<Service>> = Vec::new();
    let mut service_ids: HashMap<String, usize> = HashMap::new();
    let mut route_names: HashMap<(String, u16), String> = HashMap::new();
    for (name, s) in &raw.services.0 {
        let id = services.len();
        let n = &name.value;
        if !valid_name(n) {
            errs.at(
                line(name),
                format!("invalid service name {n:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        service_ids.insert(n.clone(), id);
        let host = s.host.value.trim_end_matches('.').to_ascii_lowercase();
        if !valid_hostname(&host) {
            errs.at(
                line(&s.host),
                format!(
                    "invalid host {:?}: expected a DNS name such as reviews.bookinfo.svc.cluster.local",
                    s.host.value
                ),
            );
        }
        let port = s.port.value;
        if port == 0 {
            errs.at(line(&s.port), "invalid port 0: expected 1-65535");
        }
        let subset = s.subset.as_ref().map(|sub| {
            let ok = !sub.value.is_empty()
                && sub.value.len() <= 63
                && sub
                    .value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                errs.at(
                    line(sub),
                    format!("invalid subset {:?}: expected a DestinationRule subset name", sub.value),
                );
            }
            sub.value.clone()
        });
        let expected_server = match &s.identity {
            None => ExpectedServer::TrustDomain(td.clone()),
            Some(ids) => {
                if ids.value.0.is_empty() {
                    errs.at(
                        line(ids),
                        "identity: list must not be empty (omit it to accept any identity in the trust domain)",
                    );
                }
                for id in &ids.value.0 {
                    if crate::identity::spiffe_trust_domain(id).is_none() || id.contains(char::is_whitespace) {
                        errs.at(line(ids), format!("invalid identity {id:?}: expected a SPIFFE ID such as spiffe://cluster.local/ns/NS/sa/SA"));
                    }
                }
                ExpectedServer::Exact(ids.value.0.clone())
            }
        };
        let mut aliases = Vec::new();
        // A subset service usually shares its host with the plain service; when it has aliases,
        // VMs reach it by those, and its host only names the mesh service in the SNI.
        let routes_host = subset.is_none() || s.aliases.is_empty();
        let mut names: Vec<(String, Option<u64>)> = Vec::new();
        if routes_host {
            names.push((host.clone(), line(&s.host)));
        }
        for a in &s.aliases {
            let alias = a.value.trim_end_matches('.').to_ascii_lowercase();
            if !valid_hostname(&alias) {
                errs.at(line(a), format!("invalid alias {:?}: expected a DNS name", a.value));
            }
            aliases.push(alias.clone());
            names.push((alias, line(a)));
        }
        // TCP services are reached through their tcp listeners, never by HTTP Host routing.
        let names = if s.protocol == UpstreamProtocol::Tcp {
            Vec::new()
        } else {
            names
        };
        for (nm, l) in names {
            if let Some(other) = route_names.insert((nm.clone(), port), n.clone()) {
                errs.at(
                    l,
                    format!("host {nm} port {port} is already routed to service {other:?}"),
                );
            }
        }
        let sni = sni_for(&host, port, subset.as_deref());
        if rustls::pki_types::ServerName::try_from(sni.clone()).is_err() {
            errs.at(
                line(&s.host),
                format!("SNI {sni:?} built from this service is not a valid TLS server name"),
            );
        }
        let transport = super::hbone::transport(n, s.transport.as_ref(), s.hbone.as_ref(), &host, port, errs);
        let transcode = s
            .transcode
            .as_ref()
            .and_then(|t| super::transcode::transcoder(path, s.protocol, t, errs));
        services.push(Arc::new(Service {
            id,
            name: n.clone(),
            host,
            port,
            protocol: s.protocol,
            subset,
            aliases,
            expected_server,
            sni,
            transport,
            transcode,
        }));
    }
    // TCP listeners' services, now that services are known.
    for (l, svc) in listeners.iter_mut().zip(&listener_services) {
        let Some(svc) = svc else { continue };
        match service_ids.get(&svc.value) {
            Some(&id) if services[id].protocol == UpstreamProtocol::Tcp => l.service = Some(id),
            Some(_) => errs.at(
                line(svc),
                format!(
                    "service {:?} is not protocol tcp, so a tcp listener cannot carry it",
                    svc.value
                ),
            ),
            None => errs.at(line(svc), format!("unknown service {:?}", svc.value)),
        }
    }
    let routes = RouteTable::new(
        route_names
            .iter()
            .map(|((name, port), svc)| (name.as_str(), *port, service_ids[svc])),
    );

    // Tenants.
    let mut tenants = Vec::new();
    let mut tenant_names = Vec::new();
    let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
    let mut keyless_sources: HashMap<(ipnet::IpNet, Vec<String>), String> = HashMap::new();
    let mut tenant_identity_raw = Vec::new();
    for (name, t) in &raw.tenants.0 {
        let n = &name.value;
        if !valid_name(n) {
            errs.at(
                line(name),
                format!("invalid tenant name {n:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        if t.sources.is_empty() && t.api_keys.is_empty() {
            errs.at(
                line(name),
                format!("tenant {n:?} has neither sources nor api_keys, so no client can match it"),
            );
        }
        let mut key_hashes = Vec::new();
        for k in &t.api_keys {
            match parse_key_hash(&k.value) {
                Ok(h) => {
                    if let Some(other) = key_owner.insert(h, n.clone()) {
                        errs.at(
                            line(k),
                            format!("duplicate API key (already listed for tenant {other:?})"),
                        );
                    }
                    key_hashes.push(h);
                }
                Err(e) => errs.at(line(k), format!("invalid API key: {e}")),
            }
        }
        if t.api_keys.is_empty() {
            for src in &t.sources {
                if let Some(other) = keyless_sources.insert((src.0, t.vpce.clone()), n.clone()) {
                    if other != *n {
                        errs.at(
                            line(name),
                            format!(
                                "source {} is also claimed by tenant {other:?}: a client there would match both",
                                src.0
                            ),
                        );
                    }
                }
            }
        }
        let mut allow_all = false;
        let mut allowed = vec![false; services.len()];
        for a in &t.allow {
            if a.value == "*" {
                allow_all = true;
            } else if let Some(id) = service_ids.get(&a.value) {
                allowed[*id] = true;
            } else {
                errs.at(line(a), format!("tenant {n:?} allows unknown service {:?}", a.value));
            }
        }
        if let Some(idr) = &t.identity {
            tenant_identity_raw.push((tenants.len(), n.clone(), idr));
        }
        tenant_names.push(n.clone());
        tenants.push(Tenant {
            name: n.clone(),
            sources: t.sources.iter().map(|c| c.0).collect(),
            vpce: t.vpce.clone(),
            rate_limit: t.rate_limit.as_ref().and_then(|rl| {
                let r = &rl.value;
                let burst = r.burst.unwrap_or(r.requests_per_second.max(1.0));
                let valid = r.requests_per_second > 0.0
                    && r.requests_per_second.is_finite()
                    && burst >= 1.0
                    && burst.is_finite();
                if !valid {
                    errs.at(line(rl), "rate_limit: requests_per_second must be > 0 and burst >= 1");
                    return None;
                }
                Some(super::RateLimit {
                    per_second: r.requests_per_second,
                    burst,
                })
            }),
            max_concurrent_requests: t.max_concurrent_requests,
            identity: 0,
            key_hashes,
            allow: if allow_all {
                Allow::All
            } else {
                Allow::Services(allowed)
            },
        });
    }

    // API key header.
    let hdr = raw.api_key_header.value.to_ascii_lowercase();
    const RESERVED: &[&str] = &[
        "host",
        "proxy-authorization",
        "authorization",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "x-forwarded-client-cert",
    ];
    let api_key_header = match HeaderName::from_bytes(hdr.as_bytes()) {
        Ok(h) if !RESERVED.contains(&hdr.as_str()) => Some(h),
        Ok(_) => {
            errs.at(
                line(&raw.api_key_header),
                format!("api_key_header {hdr:?} is a header meshgate or HTTP already uses"),
            );
            None
        }
        Err(_) => {
            errs.at(
                line(&raw.api_key_header),
                format!("api_key_header {hdr:?} is not a valid header name"),
            );
            None
        }
    };

    if raw.mesh.gateway.value.0.is_empty() {
        errs.at(
            line(&raw.mesh.gateway),
            "mesh.gateway: at least one host:port is required",
        );
    }

    // Upstream settings.
    let (up, up_line) = match &raw.upstream {
        Some(s) => (&s.value, line(s)),
        None => (&RawUpstream::default(), None),
    };
    let upstream = UpstreamSettings {
        connect_timeout: up.connect_timeout.0,
        handshake_timeout: up.handshake_timeout.0,
        request_timeout: up.request_timeout.0,
        idle_timeout: up.idle_timeout.0,
        max_connection_age: up.max_connection_age.0,
        max_connection_age_jitter: up.max_connection_age_jitter,
        min_connections: up.min_connections,
        max_connections: up.max_connections,
        target_streams_per_connection: up.target_streams_per_connection,
        max_streams_per_connection: up.max_streams_per_connection,
        http1_max_connections: up.http1_max_connections,
        max_pending_requests: up.max_pending_requests,
    };
    if !(0.0..=0.5).contains(&upstream.max_connection_age_jitter) {
        errs.at(up_line, "upstream.max_connection_age_jitter must be between 0 and 0.5");
    }
    if upstream.min_connections == 0 || upstream.max_connections < upstream.min_connections {
        errs.at(up_line, "upstream: need 1 <= min_connections <= max_connections");
    }
    if upstream.max_streams_per_connection == 0
        || upstream.target_streams_per_connection == 0
        || upstream.target_streams_per_connection > upstream.max_streams_per_connection
    {
        errs.at(
            up_line,
            "upstream: need 1 <= target_streams_per_connection <= max_streams_per_connection",
        );
    }
    if upstream.http1_max_connections == 0 {
        errs.at(up_line, "upstream.http1_max_connections must be at least 1");
    }

    // Identity, last: it touches files, and its errors are clearer once the rest is right.
    let idr = &raw.mesh.identity;
    let load = |idr: &RawIdentity, errs: &mut Collector, what: &str| -> Option<Arc<Identity>> {
        if idr.istio_ca.is_some() || idr.vault.is_some() {
            return issued_identity(path, idr, errs, what, td_ok.then_some(td.as_str()), now);
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
        match Identity::load(&paths, &td, now) {
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
    for (ti, name, raw_id) in tenant_identity_raw {
        let Some(i) = load(&raw_id.value, errs, &format!("tenant {name:?} identity: ")) else {
            continue;
        };
        let same_as_mesh = identity.as_ref().is_some_and(|m| m.fingerprint == i.fingerprint);
        tenants[ti].identity = if same_as_mesh {
            0
        } else if let Some(k) = tenant_identities.iter().position(|x| x.fingerprint == i.fingerprint) {
            k + 1
        } else {
            tenant_identities.push(i);
            tenant_identities.len()
        };
    }

    Some(Snapshot {
        path: path.to_owned(),
        listeners,
        admin,
        limits,
        drain,
        log,
        reload,
        trust_domain: td,
        gateway: super::GatewayTarget(raw.mesh.gateway.value.0.clone()),
        gateway_refresh: raw.mesh.gateway_refresh.0,
        identity: identity?,
        tenant_identities,
        services,
        routes,
        tenants: Tenants::new(tenants),
        tenant_names,
        api_key_header: api_key_header?,
        upstream,
    })
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
            sign: r.method == super::schema::VaultMethod::Sign,
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

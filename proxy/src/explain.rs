//! `meshgate explain`: what meshgate would do with one request, and why, worked out from a config
//! snapshot with the data path's own decisions (`policy`, `route`, the service's SNI, ALPN and
//! expected server identity), so the answer cannot drift from what a real request gets.
//!
//! The decision is the first refusal in the data path's order (target, key, tenant, route, allow
//! list). Every other fact that can be worked out is shown too, even after a refusal: an
//! operator asking why a request failed usually wants to know where it would have gone.
//! Rate and concurrency limits are runtime state; they are listed as configured, never simulated.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::Snapshot;
use crate::error::ProxyError;
use crate::policy::keys::parse_key_hash;
use crate::policy::{canonical_ip, hash_key, Allow, Deny, Tenant, TenantId};
use crate::route::{split_authority, RouteError};
use crate::upstream::connect::alpn_for;

/// One question, as `POST /explain` takes it. `key` is the plaintext key a client would send;
/// `key_sha256` its config form, which lets the CLI ask without the key leaving the machine.
// No Debug: `key` is a secret and must not end up in a log line by accident.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    pub client: IpAddr,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpce: Option<String>,
}

impl Query {
    /// Explains the query against `snapshot`, or says why the query itself is unusable.
    pub fn answer(&self, snapshot: &Snapshot) -> Result<Explanation, String> {
        if self.target.trim().is_empty() {
            return Err("`target` (a URL or host[:port]) is required".into());
        }
        let key_hash = match (&self.key, &self.key_sha256) {
            (Some(_), Some(_)) => return Err("give `key` or `key_sha256`, not both".into()),
            (Some(k), None) if k.trim().is_empty() => return Err("`key` is empty".into()),
            (Some(k), None) => Some(hash_key(k.trim())),
            (None, Some(h)) => Some(parse_key_hash(h).map_err(|e| format!("`key_sha256`: {e}"))?),
            (None, None) => None,
        };
        Ok(explain(
            snapshot,
            self.client,
            key_hash.as_ref(),
            self.vpce.as_deref(),
            &self.target,
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Forward,
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The config file the answer comes from.
    pub config: String,
    pub client: String,
    pub api_key: bool,
    pub vpce: Option<String>,
    pub target: String,
    /// What routing and policy see: the URL's authority, or the target as a Host header.
    pub authority: Option<String>,
    pub decision: Decision,
    /// The HTTP status meshgate would answer with (200 when forwarded, whatever the mesh says).
    pub status: u16,
    /// `forwarded`, or the refusal's reason label (README status table, access log, metrics).
    pub reason: String,
    /// The refusal body meshgate would send, without its `meshgate: ` prefix.
    pub message: Option<String>,
    /// What in the config led to the refusal.
    pub why: Option<String>,
    pub tenant: Option<TenantInfo>,
    pub route: Option<RouteInfo>,
    /// The SPIFFE ID meshgate would present to the mesh for this tenant.
    pub client_identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub name: String,
    pub matched_by: String,
    pub allow: Vec<String>,
    pub rate_limit: Option<RateLimitInfo>,
    pub max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimitInfo {
    pub requests_per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub service: String,
    pub host: String,
    pub port: u16,
    pub protocol: String,
    pub subset: Option<String>,
    pub sni: String,
    pub alpn: Vec<String>,
    pub gateway: Vec<String>,
    pub expected_server: String,
    /// Set for `transport: hbone` / `double-hbone`; then `gateway` is the HBONE dial target,
    /// `sni` is empty (none is sent) and `alpn` is `h2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hbone: Option<HboneInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HboneInfo {
    pub transport: String,
    /// `:authority` of the CONNECT (both CONNECTs for double HBONE).
    pub authority: String,
    pub gateway_identity: Option<String>,
    pub network: Option<String>,
}

impl RouteInfo {
    /// HBONE services: what the data path sends instead of the sidecar route.
    fn with_transport(mut self, t: &crate::config::Transport) -> RouteInfo {
        if let crate::config::Transport::Hbone(h) = t {
            self.gateway = vec![h.dial.to_string()];
            self.sni = String::new();
            self.alpn = vec!["h2".into()];
            self.hbone = Some(HboneInfo {
                transport: t.name().into(),
                authority: h.authority.clone(),
                gateway_identity: h.gateway.as_ref().map(|g| g.identity.to_string()),
                network: h.gateway.as_ref().map(|g| g.network.clone()),
            });
        }
        self
    }
}

impl Explanation {
    pub fn forwarded(&self) -> bool {
        self.decision == Decision::Forward
    }
}

/// What meshgate would do with a request from `client` (presenting the key with digest
/// `key_hash`, through VPC endpoint `vpce`) for `target`: a URL (`http://host[:port]/path`,
/// taken as an absolute-form request) or `host[:port]` (taken as the Host header).
pub fn explain(
    snapshot: &Snapshot,
    client: IpAddr,
    key_hash: Option<&[u8; 32]>,
    vpce: Option<&str>,
    target: &str,
) -> Explanation {
    let client = canonical_ip(client);
    let authority = authority_of(target);
    let tenant_id = snapshot.tenants.authorize(client, key_hash, vpce);
    // A CONNECT (https:// through a proxy) must name the service's own port, as forward.rs's
    // tunnel requires; plain requests may omit or vary it when the host is unambiguous.
    let connect = target
        .trim()
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"));
    let route = authority.as_ref().ok().map(|a| {
        let id = snapshot.routes.resolve(a)?;
        let port = crate::route::split_authority(a)?.1;
        if connect && port != Some(snapshot.services[id].port) {
            return Err(crate::route::RouteError::UnknownHost);
        }
        Ok(id)
    });

    // The same order as forward.rs: target, then tenant, then route, then the allow list.
    let refusal: Option<(ProxyError, Option<String>)> = match (&authority, &tenant_id, &route) {
        (Err(e), _, _) => Some((ProxyError::Malformed(e), None)),
        (_, Err(d), _) => Some((
            ProxyError::Policy(*d),
            Some(why_unauthorized(snapshot, *d, client, key_hash, vpce)),
        )),
        (Ok(a), _, Some(Err(r))) => {
            let why = match r {
                RouteError::UnknownHost => why_unknown_host(snapshot, a),
                RouteError::Malformed => "the authority is not a valid host[:port]".into(),
            };
            Some((ProxyError::Route(r.clone()), Some(why)))
        }
        (_, Ok(t), Some(Ok(s))) if !snapshot.tenants.allows(*t, *s) => Some((
            Deny::ServiceNotAllowed.into(),
            Some(format!(
                "tenant {} may call only: {}",
                snapshot.tenants.get(*t).name,
                allow_names(snapshot, snapshot.tenants.get(*t)).join(", ")
            )),
        )),
        _ => None,
    };
    let (decision, status, reason, message, why) = match refusal {
        None => (Decision::Forward, 200, "forwarded".to_string(), None, None),
        Some((e, why)) => (
            Decision::Refuse,
            e.status().as_u16(),
            e.reason().to_string(),
            Some(e.to_string()),
            why,
        ),
    };

    let tenant = tenant_id.as_ref().ok().map(|&id| {
        let t = snapshot.tenants.get(id);
        TenantInfo {
            name: t.name.clone(),
            matched_by: matched_by(t, client, key_hash.is_some(), vpce),
            allow: allow_names(snapshot, t),
            rate_limit: t.rate_limit.as_ref().map(|r| RateLimitInfo {
                requests_per_second: r.per_second,
                burst: r.burst,
            }),
            max_concurrent_requests: t.max_concurrent_requests,
        }
    });
    let route = match route {
        Some(Ok(id)) => {
            let s = &snapshot.services[id];
            Some(
                RouteInfo {
                    service: s.name.clone(),
                    host: s.host.clone(),
                    port: s.port,
                    protocol: format!("{:?}", s.protocol).to_lowercase(),
                    subset: s.subset.clone(),
                    sni: s.sni.clone(),
                    alpn: alpn_for(s.protocol)
                        .iter()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect(),
                    gateway: snapshot.gateway.0.iter().map(|g| g.to_string()).collect(),
                    expected_server: s.expected_server.to_string(),
                    hbone: None,
                }
                .with_transport(&s.transport),
            )
        }
        _ => None,
    };
    Explanation {
        config: snapshot.path.display().to_string(),
        client: client.to_string(),
        api_key: key_hash.is_some(),
        vpce: vpce.map(str::to_string),
        target: target.to_string(),
        authority: authority.ok(),
        decision,
        status,
        reason,
        message,
        why,
        client_identity: tenant_id.ok().map(|t| client_identity(snapshot, t).to_string()),
        tenant,
        route,
    }
}

/// The identity presented upstream for a tenant's requests: the one whose pool forward.rs picks.
fn client_identity(snapshot: &Snapshot, tenant: TenantId) -> &str {
    &snapshot.identity_at(snapshot.tenants.get(tenant).identity).spiffe_id
}

/// The authority a request for `target` carries, as forward.rs derives it: a URL's authority
/// (absolute form), otherwise the target itself as the Host header.
fn authority_of(target: &str) -> Result<String, &'static str> {
    let target = target.trim();
    if !target.contains("://") {
        return Ok(target.to_string());
    }
    let uri: http::Uri = target.parse().map_err(|_| "invalid request target")?;
    let authority = uri.authority().ok_or("invalid request target")?;
    // Clients send https:// through a forward proxy as `CONNECT host:port` (443 by default),
    // which forward.rs resolves by host and port like any other request (TCP services, which
    // CONNECT can reach too, are not modelled here).
    if uri.scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("https")) {
        return Ok(format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(443)));
    }
    Ok(authority.as_str().to_string())
}

fn allow_names(snapshot: &Snapshot, t: &Tenant) -> Vec<String> {
    match &t.allow {
        Allow::All => vec!["*".into()],
        Allow::Services(v) => snapshot
            .services
            .iter()
            .filter(|s| v.get(s.id).copied().unwrap_or(false))
            .map(|s| s.name.clone())
            .collect(),
    }
}

/// The most specific of the tenant's sources that holds `client`: the one that made the match.
fn best_source(t: &Tenant, client: IpAddr) -> Option<String> {
    t.sources
        .iter()
        .filter(|n| n.contains(&client))
        .max_by_key(|n| n.prefix_len())
        .map(|n| n.to_string())
}

fn matched_by(t: &Tenant, client: IpAddr, keyed: bool, vpce: Option<&str>) -> String {
    let mut how = match (keyed, best_source(t, client)) {
        (true, Some(src)) => format!("API key, from source {src}"),
        (true, None) => "API key".to_string(),
        (false, Some(src)) => format!("source {src}"),
        (false, None) => "source".to_string(),
    };
    if let (false, Some(v)) = (t.vpce.is_empty(), vpce) {
        how.push_str(&format!(", through VPC endpoint {v}"));
    }
    how
}

fn vpce_ok(t: &Tenant, vpce: Option<&str>) -> bool {
    t.vpce.is_empty() || vpce.is_some_and(|v| t.vpce.iter().any(|x| x == v))
}

fn why_unauthorized(
    snapshot: &Snapshot,
    deny: Deny,
    client: IpAddr,
    key_hash: Option<&[u8; 32]>,
    vpce: Option<&str>,
) -> String {
    let tenants = || snapshot.tenants.iter();
    let sources = |t: &Tenant| t.sources.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
    match deny {
        Deny::BadKey => format!(
            "no tenant holds the key sha256:{}",
            key_hash.map(hex::encode).unwrap_or_default()
        ),
        Deny::KeyWrongSource => {
            let Some(t) = key_hash.and_then(|h| tenants().find(|t| t.key_hashes.contains(h))) else {
                return "the key's tenant does not accept this client".into();
            };
            let mut why = format!("the key belongs to tenant {}", t.name);
            if !t.sources.is_empty() {
                why.push_str(&format!(", which accepts it only from {}", sources(t)));
            }
            if !vpce_ok(t, vpce) {
                why.push_str(&format!(" and only through VPC endpoint {}", t.vpce.join(", ")));
            }
            why
        }
        Deny::UnknownClient => {
            let mut hints: Vec<String> = Vec::new();
            for t in tenants().filter(|t| best_source(t, client).is_some()) {
                if !t.key_hashes.is_empty() {
                    hints.push(format!("tenant {} accepts {client} only with its API key", t.name));
                } else if !vpce_ok(t, vpce) {
                    hints.push(format!(
                        "tenant {} accepts {client} only through VPC endpoint {}",
                        t.name,
                        t.vpce.join(", ")
                    ));
                }
            }
            if hints.is_empty() {
                format!("no tenant lists a source containing {client}")
            } else {
                hints.join("; ")
            }
        }
        Deny::ServiceNotAllowed => "the service is not in the tenant's allow list".into(),
    }
}

fn why_unknown_host(snapshot: &Snapshot, authority: &str) -> String {
    let host = split_authority(authority).map(|(h, _)| h).unwrap_or_default();
    let named = snapshot
        .services
        .iter()
        .any(|s| s.host.eq_ignore_ascii_case(&host) || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(&host)));
    if named {
        format!(
            "{host} is configured, but no route matches this authority (the port picks among services \
             sharing a name; a subset service with aliases answers only to its aliases)"
        )
    } else {
        format!("no service has {host} as its host or an alias")
    }
}

fn row(f: &mut fmt::Formatter<'_>, label: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(f, "{:<17}{value}", format!("{label}:"))
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        row(f, "config", &self.config)?;
        let mut client = format!(
            "{}, {}",
            self.client,
            if self.api_key { "with an API key" } else { "no API key" }
        );
        if let Some(v) = &self.vpce {
            client.push_str(&format!(", through VPC endpoint {v}"));
        }
        row(f, "client", client)?;
        match &self.authority {
            Some(a) if *a != self.target => row(f, "target", format!("{} (authority {a})", self.target))?,
            _ => row(f, "target", &self.target)?,
        }
        match self.decision {
            Decision::Forward => row(f, "decision", format!("forward ({} {})", self.status, self.reason))?,
            Decision::Refuse => row(
                f,
                "decision",
                format!(
                    "refuse ({} {}: {})",
                    self.status,
                    self.reason,
                    self.message.as_deref().unwrap_or("")
                ),
            )?,
        }
        if let Some(why) = &self.why {
            row(f, "why", why)?;
        }
        match &self.tenant {
            None => row(f, "tenant", "none")?,
            Some(t) => {
                row(f, "tenant", format!("{} (matched by {})", t.name, t.matched_by))?;
                row(f, "tenant allows", t.allow.join(", "))?;
                let mut limits = Vec::new();
                if let Some(r) = &t.rate_limit {
                    limits.push(format!("rate {} requests/s, burst {}", r.requests_per_second, r.burst));
                }
                if let Some(m) = t.max_concurrent_requests {
                    limits.push(format!("at most {m} concurrent requests"));
                }
                if limits.is_empty() {
                    limits.push("none configured".into());
                }
                row(f, "tenant limits", limits.join("; "))?;
            }
        }
        match &self.route {
            None => row(f, "service", "none")?,
            Some(r) => {
                let subset = r.subset.as_ref().map(|s| format!(", subset {s}")).unwrap_or_default();
                row(
                    f,
                    "service",
                    format!("{} ({} port {}, {}{subset})", r.service, r.host, r.port, r.protocol),
                )?;
                match &r.hbone {
                    None => {
                        row(f, "gateway", r.gateway.join(", "))?;
                        row(f, "sni", &r.sni)?;
                    }
                    Some(h) => {
                        row(f, "transport", &h.transport)?;
                        match (&h.gateway_identity, &h.network) {
                            (Some(id), Some(net)) => {
                                row(f, "hbone gateway", format!("{} ({id})", r.gateway.join(", ")))?;
                                row(f, "hbone network", net)?;
                            }
                            _ => row(f, "hbone address", r.gateway.join(", "))?,
                        }
                        row(f, "connect", format!(":authority {}, no SNI", h.authority))?;
                    }
                }
                row(f, "alpn", r.alpn.join(", "))?;
                row(f, "server identity", &r.expected_server)?;
            }
        }
        row(
            f,
            "client identity",
            self.client_identity.as_deref().unwrap_or("none (no tenant)"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::SystemTime;

    const CONFIG: &str = r#"listeners:
  - name: vm
    bind: 127.0.0.1:0
    protocol: http
mesh:
  trust_domain: cluster.local
  gateway: [eastwest.mesh.example.com:15443, 10.0.0.9:15443]
  identity:
    cert_chain: cert-chain.pem
    key: key.pem
    root_cert: root-cert.pem
services:
  reviews:
    host: reviews.bookinfo.svc.cluster.local
    port: 9080
    protocol: http2
    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews
  ratings:
    host: ratings.bookinfo.svc.cluster.local
    port: 9080
    protocol: http1
    subset: v2
tenants:
  billing-vms:
    sources: [10.20.0.0/16]
    allow: [reviews]
    rate_limit: {requests_per_second: 50, burst: 100}
    max_concurrent_requests: 10
  ci:
    sources: [192.168.1.0/24]
    api_keys: ["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]
    allow: ["*"]
  private:
    sources: [10.30.0.0/16]
    vpce: [vpce-1]
    allow: [ratings]
"#;
    // "hello" is the key whose digest the `ci` tenant holds.
    const KEY: &str = "hello";

    fn snapshot() -> (tempfile::TempDir, Snapshot) {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshsim::MeshCa::new("cluster.local").unwrap();
        let cert = ca.issue("meshgate", "meshgate").unwrap();
        cert.write_files(dir.path(), &ca.root_pem()).unwrap();
        let path = dir.path().join("meshgate.yaml");
        let s = crate::config::parse(&path, CONFIG, SystemTime::now()).unwrap();
        (dir, s)
    }

    fn ask(s: &Snapshot, client: &str, key: Option<&str>, vpce: Option<&str>, target: &str) -> Explanation {
        explain(s, client.parse().unwrap(), key.map(hash_key).as_ref(), vpce, target)
    }

    fn refused(e: &Explanation, status: u16, reason: &str) {
        assert_eq!(e.decision, Decision::Refuse, "{e}");
        assert_eq!((e.status, e.reason.as_str()), (status, reason), "{e}");
    }

    #[test]
    fn allowed_by_source_shows_tenant_route_and_identities() {
        let (_d, s) = snapshot();
        let e = ask(
            &s,
            "10.20.3.4",
            None,
            None,
            "http://reviews.bookinfo.svc.cluster.local:9080/x?y=1",
        );
        assert!(e.forwarded(), "{e}");
        assert_eq!((e.status, e.reason.as_str()), (200, "forwarded"));
        assert_eq!(e.authority.as_deref(), Some("reviews.bookinfo.svc.cluster.local:9080"));
        let t = e.tenant.as_ref().unwrap();
        assert_eq!(t.name, "billing-vms");
        assert_eq!(t.matched_by, "source 10.20.0.0/16");
        assert_eq!(
            t.rate_limit,
            Some(RateLimitInfo {
                requests_per_second: 50.0,
                burst: 100.0
            })
        );
        assert_eq!(t.max_concurrent_requests, Some(10));
        let r = e.route.as_ref().unwrap();
        assert_eq!(r.service, "reviews");
        assert_eq!(
            r.sni,
            crate::config::sni_for("reviews.bookinfo.svc.cluster.local", 9080, None)
        );
        assert_eq!(r.sni, "outbound_.9080_._.reviews.bookinfo.svc.cluster.local");
        assert_eq!(r.alpn, ["istio-h2", "istio", "h2"]);
        assert_eq!(r.gateway, ["eastwest.mesh.example.com:15443", "10.0.0.9:15443"]);
        assert_eq!(
            r.expected_server,
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
        );
        assert_eq!(
            e.client_identity.as_deref(),
            Some("spiffe://cluster.local/ns/meshgate/sa/meshgate")
        );
        assert!(e.message.is_none() && e.why.is_none());
    }

    #[test]
    fn a_tenant_with_its_own_identity_presents_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshsim::MeshCa::new("cluster.local").unwrap();
        let mesh = ca.issue("meshgate", "meshgate").unwrap();
        mesh.write_files(dir.path(), &ca.root_pem()).unwrap();
        let billing = ca.issue("billing", "billing-vms").unwrap();
        billing
            .write_files(&dir.path().join("billing"), &ca.root_pem())
            .unwrap();
        let text = CONFIG.replace(
            "    max_concurrent_requests: 10\n",
            "    max_concurrent_requests: 10\n    identity:\n      cert_chain: billing/cert-chain.pem\n      \
             key: billing/key.pem\n      root_cert: billing/root-cert.pem\n",
        );
        let s = crate::config::parse(&dir.path().join("meshgate.yaml"), &text, SystemTime::now()).unwrap();
        let e = ask(&s, "10.20.0.1", None, None, "reviews.bookinfo.svc.cluster.local");
        assert_eq!(
            e.client_identity.as_deref(),
            Some("spiffe://cluster.local/ns/billing/sa/billing-vms")
        );
        let e = ask(&s, "192.168.1.5", Some(KEY), None, "reviews.bookinfo.svc.cluster.local");
        assert_eq!(
            e.client_identity.as_deref(),
            Some("spiffe://cluster.local/ns/meshgate/sa/meshgate")
        );
    }

    #[test]
    fn bare_host_is_the_host_header_and_ipv4_mapped_clients_are_ipv4() {
        let (_d, s) = snapshot();
        let e = ask(
            &s,
            "::ffff:10.20.0.1",
            None,
            None,
            "REVIEWS.bookinfo.svc.cluster.local.",
        );
        assert!(e.forwarded(), "{e}");
        assert_eq!(e.client, "10.20.0.1");
        assert_eq!(e.authority.as_deref(), Some("REVIEWS.bookinfo.svc.cluster.local."));
    }

    #[test]
    fn subset_and_http1_route() {
        let (_d, s) = snapshot();
        let e = ask(&s, "192.168.1.5", Some(KEY), None, "ratings.bookinfo.svc.cluster.local");
        assert!(e.forwarded(), "{e}");
        assert_eq!(
            e.tenant.as_ref().unwrap().matched_by,
            "API key, from source 192.168.1.0/24"
        );
        let r = e.route.unwrap();
        assert_eq!(r.sni, "outbound_.9080_.v2_.ratings.bookinfo.svc.cluster.local");
        assert_eq!(r.alpn, ["istio-http/1.1", "istio", "http/1.1"]);
        assert_eq!(r.expected_server, "any spiffe://cluster.local/ identity");
    }

    #[test]
    fn deny_by_subnet() {
        let (_d, s) = snapshot();
        let e = ask(&s, "172.16.0.1", None, None, "reviews.bookinfo.svc.cluster.local");
        refused(&e, 403, "unknown_client");
        assert_eq!(e.message.as_deref(), Some("client address is not in any tenant"));
        assert_eq!(e.why.as_deref(), Some("no tenant lists a source containing 172.16.0.1"));
        assert!(e.tenant.is_none() && e.client_identity.is_none());
        // Where it would have gone is still shown.
        assert_eq!(e.route.unwrap().service, "reviews");

        let e = ask(&s, "192.168.1.5", None, None, "reviews.bookinfo.svc.cluster.local");
        refused(&e, 403, "unknown_client");
        assert_eq!(
            e.why.as_deref(),
            Some("tenant ci accepts 192.168.1.5 only with its API key")
        );

        let e = ask(
            &s,
            "10.30.0.1",
            None,
            Some("vpce-2"),
            "ratings.bookinfo.svc.cluster.local",
        );
        refused(&e, 403, "unknown_client");
        assert_eq!(
            e.why.as_deref(),
            Some("tenant private accepts 10.30.0.1 only through VPC endpoint vpce-1")
        );
        let e = ask(
            &s,
            "10.30.0.1",
            None,
            Some("vpce-1"),
            "ratings.bookinfo.svc.cluster.local",
        );
        assert!(e.forwarded(), "{e}");
        assert_eq!(
            e.tenant.unwrap().matched_by,
            "source 10.30.0.0/16, through VPC endpoint vpce-1"
        );
    }

    #[test]
    fn deny_by_key() {
        let (_d, s) = snapshot();
        // A wrong key is never downgraded to a source match, even from a tenant's subnet.
        let e = ask(
            &s,
            "10.20.0.1",
            Some("wrong"),
            None,
            "reviews.bookinfo.svc.cluster.local",
        );
        refused(&e, 401, "bad_key");
        assert_eq!(
            e.why,
            Some(format!(
                "no tenant holds the key sha256:{}",
                hex::encode(hash_key("wrong"))
            ))
        );
        assert!(e.tenant.is_none());

        let e = ask(&s, "10.20.0.1", Some(KEY), None, "reviews.bookinfo.svc.cluster.local");
        refused(&e, 403, "key_wrong_source");
        assert_eq!(
            e.why.as_deref(),
            Some("the key belongs to tenant ci, which accepts it only from 192.168.1.0/24")
        );
    }

    #[test]
    fn unknown_host_and_service_not_allowed() {
        let (_d, s) = snapshot();
        let e = ask(
            &s,
            "10.20.0.1",
            None,
            None,
            "http://details.bookinfo.svc.cluster.local/",
        );
        refused(&e, 404, "unknown_host");
        assert_eq!(
            e.why.as_deref(),
            Some("no service has details.bookinfo.svc.cluster.local as its host or an alias")
        );
        assert_eq!(e.tenant.as_ref().unwrap().name, "billing-vms");
        assert!(e.route.is_none());

        let e = ask(&s, "10.20.0.1", None, None, "ratings.bookinfo.svc.cluster.local");
        refused(&e, 403, "service_not_allowed");
        assert_eq!(e.why.as_deref(), Some("tenant billing-vms may call only: reviews"));
        assert_eq!(e.route.unwrap().service, "ratings");
    }

    #[test]
    fn refusal_order_follows_the_data_path() {
        let (_d, s) = snapshot();
        // Tenant before route: an unknown client asking for an unknown host is 403, as forward.rs.
        refused(
            &ask(&s, "172.16.0.1", None, None, "nope.example"),
            403,
            "unknown_client",
        );
        refused(
            &ask(&s, "10.20.0.1", None, None, "reviews:port"),
            400,
            "malformed_request",
        );
        refused(
            &ask(
                &s,
                "10.20.0.1",
                None,
                None,
                "https://reviews.bookinfo.svc.cluster.local/",
            ),
            404,
            "unknown_host",
        );
    }

    #[test]
    fn query_checks_its_key_fields() {
        let (_d, s) = snapshot();
        let q = |key: Option<&str>, key_sha256: Option<&str>| Query {
            client: "192.168.1.5".parse().unwrap(),
            target: "reviews.bookinfo.svc.cluster.local".into(),
            key: key.map(Into::into),
            key_sha256: key_sha256.map(Into::into),
            vpce: None,
        };
        let hashed = format!("sha256:{}", hex::encode(hash_key(KEY)));
        assert!(q(Some(KEY), None).answer(&s).unwrap().forwarded());
        assert!(q(None, Some(&hashed)).answer(&s).unwrap().forwarded());
        assert!(q(Some(KEY), Some(&hashed)).answer(&s).is_err());
        assert!(q(None, Some("hello")).answer(&s).is_err());
        assert!(q(Some(" "), None).answer(&s).is_err());
        let no_target = Query {
            target: " ".into(),
            ..q(None, None)
        };
        assert!(no_target.answer(&s).is_err());
    }

    #[test]
    fn json_round_trips_and_text_names_everything() {
        let (_d, s) = snapshot();
        let e = ask(&s, "10.20.0.1", None, None, "reviews.bookinfo.svc.cluster.local");
        let back: Explanation = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        let text = e.to_string();
        for needle in [
            "decision:        forward (200 forwarded)",
            "tenant:          billing-vms (matched by source 10.20.0.0/16)",
            "tenant limits:   rate 50 requests/s, burst 100; at most 10 concurrent requests",
            "sni:             outbound_.9080_._.reviews.bookinfo.svc.cluster.local",
            "alpn:            istio-h2, istio, h2",
            "client identity: spiffe://cluster.local/ns/meshgate/sa/meshgate",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        assert!(Path::new(&e.config).ends_with("meshgate.yaml"));
    }

    #[test]
    fn hbone_routes_show_transport_and_authority() {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshsim::MeshCa::new("cluster.local").unwrap();
        ca.issue("meshgate", "meshgate")
            .unwrap()
            .write_files(dir.path(), &ca.root_pem())
            .unwrap();
        let text = CONFIG.replace(
            "    subset: v2\n",
            "    subset: v2\n  details:\n    host: details.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http2\n    transport: hbone\n    hbone:\n      address: \"[fd00::7]:15008\"\n  remote:\n    host: remote.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\n    transport: double-hbone\n    hbone:\n      gateway: ew.remote.example.com:15008\n      gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
        );
        let s = crate::config::parse(&dir.path().join("m.yaml"), &text, SystemTime::now()).unwrap();
        let e = ask(&s, "192.168.1.9", Some(KEY), None, "details.bookinfo.svc.cluster.local");
        let text = e.to_string();
        assert!(text.contains("transport:       hbone\n"), "{text}");
        assert!(text.contains("hbone address:   [fd00::7]:15008\n"), "{text}");
        assert!(
            text.contains("connect:         :authority [fd00::7]:9080, no SNI\n"),
            "{text}"
        );
        assert!(text.contains("alpn:            h2\n"), "{text}");
        assert!(!text.contains("sni:"), "{text}");
        let e = ask(&s, "192.168.1.9", Some(KEY), None, "remote.bookinfo.svc.cluster.local");
        let h = e.route.as_ref().unwrap().hbone.clone().unwrap();
        assert_eq!(h.transport, "double-hbone");
        assert_eq!(h.authority, "remote.bookinfo.svc.cluster.local:9080");
        assert_eq!(h.network.as_deref(), Some("vm-net"));
        let text = e.to_string();
        assert!(
            text.contains("hbone gateway:   ew.remote.example.com:15008 (spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway)"),
            "{text}"
        );
        // The JSON form (admin API) carries it too.
        let back: Explanation = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}

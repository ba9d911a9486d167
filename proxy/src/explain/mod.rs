//! `meshgate explain`: what meshgate would do with one request, and why, worked out from a config
//! snapshot with the data path's own decisions (`policy`, `route`, the service's SNI, ALPN and
//! expected server identity), so the answer cannot drift from what a real request gets.
//!
//! The decision is the first refusal in the data path's order (target, key, tenant, route, allow
//! list). Every other fact that can be worked out is shown too, even after a refusal: an
//! operator asking why a request failed usually wants to know where it would have gone.
//! Rate and concurrency limits are runtime state; they are listed as configured, never simulated.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::parse_key_hash;
use crate::config::Snapshot;
use crate::error::ProxyError;
use crate::policy::{canonical_ip, hash_key, Allow, Deny, Tenant, TenantId, Tenants};
use crate::route::{split_authority, RouteError};
use crate::route::{Route, RouteTable};
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
    /// The host pattern (`*.SUFFIX`) that matched, when no listed host did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
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
    // The data path's own tables, built from the snapshot the way a generation builds them.
    let tenants = Tenants::new(&snapshot.tenants);
    let routes = RouteTable::for_services(&snapshot.services);
    let tenant_id = tenants.authorize(client, key_hash, vpce);
    // A CONNECT (https:// through a proxy) must name the service's own port, as the pipeline's
    // tunnel requires; plain requests may omit or vary it when the host is unambiguous.
    let connect = target
        .trim()
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"));
    let allowed = |id| tenant_id.as_ref().is_ok_and(|t| tenants.allows(*t, id));
    let route = authority.as_ref().ok().map(|a| {
        let (host, port) = crate::route::split_authority(a)?;
        if connect {
            // As the pipeline's tunnel: a listed tcp service, then a tcp host pattern.
            if let Some(id) = port.and_then(|p| crate::route::tcp_service(&snapshot.services, &host, p)) {
                return Ok(Route::Service(id));
            }
            if let Some(r) = port.and_then(|p| routes.resolve_tcp_pattern(&host, p, allowed)) {
                return Ok(r);
            }
        }
        let r = routes.resolve(a, allowed)?;
        if let (true, Route::Service(id)) = (connect, &r) {
            if port != Some(snapshot.services[*id].port) {
                return Err(crate::route::RouteError::UnknownHost);
            }
        }
        Ok(r)
    });

    // The same order as the pipeline: target, then tenant, then route, then the allow list.
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
        // As the pipeline's tunnel: CONNECT reaches tcp services only (checked after routing,
        // before the allow list).
        (_, Ok(_), Some(Ok(r))) if connect && snapshot.services[r.service()].protocol != crate::config::UpstreamProtocol::Tcp => Some((
            ProxyError::ConnectToHttpService,
            Some("https:// through meshgate is a CONNECT tunnel, which only tcp services accept; call the service with http:// instead".into()),
        )),
        (_, Ok(t), Some(Ok(r))) if !tenants.allows(*t, r.service()) => Some((
            Deny::ServiceNotAllowed.into(),
            Some(format!(
                "tenant {} may call only: {}",
                tenants.get(*t).name,
                allow_names(snapshot, tenants.get(*t)).join(", ")
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
        let t = tenants.get(id);
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
        Some(Ok(r)) => route_info(snapshot, &r),
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

/// Where a route goes. A pattern's host, or an `auto` service, is shown as the destination the
/// pipeline would make (its own SNI, authority and server identity rule).
fn route_info(snapshot: &Snapshot, r: &Route) -> Option<RouteInfo> {
    let listed = &snapshot.services[r.service()];
    let (host, port) = match r {
        Route::Pattern { host, port, .. } => (host.as_str(), *port),
        Route::Service(_) => (listed.host.as_str(), listed.port),
    };
    let auto = listed.protocol == crate::config::UpstreamProtocol::Auto;
    let shown = if auto {
        crate::config::UpstreamProtocol::Http1
    } else {
        listed.protocol
    };
    let made;
    let s = if listed.is_dynamic() {
        made = listed.destination(host, port, shown)?;
        &made
    } else {
        listed
    };
    let names = |p| {
        alpn_for(p)
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    };
    let alpn = if auto {
        vec![
            format!(
                "{} (HTTP/1.1 clients)",
                names(crate::config::UpstreamProtocol::Http1).join(", ")
            ),
            format!(
                "{} (h2c, gRPC and HTTP/3 clients)",
                names(crate::config::UpstreamProtocol::Http2).join(", ")
            ),
        ]
    } else {
        names(s.protocol)
    };
    Some(
        RouteInfo {
            service: s.name.clone(),
            host: s.host.clone(),
            port: s.port,
            protocol: format!("{:?}", listed.protocol).to_lowercase(),
            subset: s.subset.clone(),
            sni: s.sni.clone(),
            alpn,
            gateway: snapshot.gateway.0.iter().map(|g| g.to_string()).collect(),
            expected_server: s.expected_server.to_string(),
            pattern: listed.pattern.as_ref().map(|_| listed.host.clone()),
            hbone: None,
        }
        .with_transport(&s.transport),
    )
}

/// The identity presented upstream for a tenant's requests: the one whose pool the pipeline picks.
fn client_identity(snapshot: &Snapshot, tenant: TenantId) -> &str {
    &snapshot.identity_at(snapshot.tenants[tenant].identity).spiffe_id
}

/// The authority a request for `target` carries, as the pipeline derives it: a URL's authority
/// (absolute form), otherwise the target itself as the Host header.
fn authority_of(target: &str) -> Result<String, &'static str> {
    let target = target.trim();
    if !target.contains("://") {
        return Ok(target.to_string());
    }
    let uri: http::Uri = target.parse().map_err(|_| "invalid request target")?;
    let authority = uri.authority().ok_or("invalid request target")?;
    // Clients send https:// through a forward proxy as `CONNECT host:port` (443 by default),
    // which the pipeline resolves by host and port like any other request (TCP services, which
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

pub mod inbound;
#[cfg(test)]
mod tests;
mod text;
mod why;

use why::{matched_by, why_unauthorized, why_unknown_host};

//! `vm_services:`: services on the VM side that mesh workloads call through a `mesh-inbound`
//! listener (the mesh → VM direction). Each names the hosts mesh clients use, the port of the
//! ServiceEntry that points at meshgate, the VM backends, and which caller principals may call
//! it (default deny). Documented in docs/config.md "vm_services".

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;
use yamlconf::{line_of as line, Collector};

use super::schema::{parse_host_port, Dur, HostPort, OrderedMap, UpstreamProtocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVmService {
    /// The names mesh clients call it by: the HOST of the SNI `outbound_.PORT_._.HOST` their
    /// sidecars send, or the Host header.
    pub hosts: Spanned<Vec<String>>,
    /// The port mesh clients call (the ServiceEntry's port, the SNI's PORT).
    pub port: Spanned<u16>,
    pub protocol: Spanned<UpstreamProtocol>,
    /// `host:port` of each VM instance (an IP or a DNS name).
    pub backends: Spanned<Vec<String>>,
    #[serde(default)]
    pub load_balancing: Option<Spanned<LoadBalancing>>,
    /// Caller principals allowed (exact SPIFFE IDs, `spiffe://TD/ns/NS/sa/*`, `ns/NS/*`,
    /// `spiffe://TD/*`, `*`); nobody else.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub health_check: Option<Spanned<RawHealthCheck>>,
    #[serde(default)]
    pub outlier_detection: Option<Spanned<RawOutlier>>,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Dur,
    /// From the request sent to a backend until its response headers arrive.
    #[serde(default = "d_request_timeout")]
    pub request_timeout: Dur,
}

fn d_connect_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
fn d_request_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    LeastRequests,
}

/// Active health checks: HTTP `GET path` (any 2xx is healthy) for HTTP services, a TCP connect
/// for TCP services.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default = "d_hc_interval")]
    pub interval: Dur,
    #[serde(default = "d_hc_timeout")]
    pub timeout: Dur,
    #[serde(default = "d_unhealthy")]
    pub unhealthy_threshold: u32,
    #[serde(default = "d_healthy")]
    pub healthy_threshold: u32,
}

fn d_hc_interval() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_hc_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
fn d_unhealthy() -> u32 {
    3
}
fn d_healthy() -> u32 {
    2
}

/// Passive ejection (Envoy's outlier detection): a backend that fails this many requests in a
/// row (connect failures, resets, 5xx) is left out for `ejection_time`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    #[serde(default = "d_consecutive")]
    pub consecutive_failures: u32,
    #[serde(default = "d_ejection")]
    pub ejection_time: Dur,
}

fn d_consecutive() -> u32 {
    5
}
fn d_ejection() -> Dur {
    Dur(Duration::from_secs(30))
}

/// A VM-side service, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct VmService {
    /// Index into [`super::Snapshot::vm_services`].
    pub id: usize,
    pub name: String,
    /// Lower case, without a trailing dot.
    pub hosts: Vec<String>,
    pub port: u16,
    pub protocol: UpstreamProtocol,
    pub backends: Vec<HostPort>,
    pub load_balancing: LoadBalancing,
    pub allow: Vec<PrincipalRule>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Outlier,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
}

/// One entry of a VM service's `allow:`, matched against the caller's SPIFFE ID (its client
/// certificate's URI SAN), which the handshake has already tied to the mesh root and one of
/// the accepted trust domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalRule {
    /// `spiffe://TD/ns/NS/sa/SA` (or Istio's principal form `TD/ns/NS/sa/SA`).
    Exact(String),
    /// `spiffe://TD/ns/NS/sa/*`; `ns/NS/*` (trust domain `None`: any accepted one).
    Namespace {
        trust_domain: Option<String>,
        namespace: String,
    },
    /// `spiffe://TD/*`.
    TrustDomain(String),
    /// `*`: any caller the handshake accepted.
    Any,
}

impl PrincipalRule {
    pub fn matches(&self, caller: &str) -> bool {
        let Some((td, ns, sa)) = split_spiffe(caller) else {
            return false;
        };
        match self {
            PrincipalRule::Exact(id) => id == caller,
            PrincipalRule::Namespace {
                trust_domain,
                namespace,
            } => trust_domain.as_deref().is_none_or(|t| t == td) && ns == namespace && !sa.is_empty(),
            PrincipalRule::TrustDomain(t) => t == td,
            PrincipalRule::Any => true,
        }
    }

    /// Parses one `allow:` entry; `trust_domains` are the ones the listener accepts (a rule
    /// naming another could never match).
    pub fn parse(s: &str, trust_domains: &[String]) -> Result<PrincipalRule, String> {
        const FORMS: &str = "expected spiffe://TD/ns/NS/sa/SA, spiffe://TD/ns/NS/sa/*, ns/NS/*, spiffe://TD/* or *";
        let s = s.trim();
        if s == "*" {
            return Ok(PrincipalRule::Any);
        }
        if let Some(ns) = s.strip_prefix("ns/").and_then(|r| r.strip_suffix("/*")) {
            return if is_label(ns) {
                Ok(PrincipalRule::Namespace {
                    trust_domain: None,
                    namespace: ns.to_string(),
                })
            } else {
                Err(format!(
                    "{s:?} cannot match any caller: {ns:?} is not a namespace name; {FORMS}"
                ))
            };
        }
        // Istio's AuthorizationPolicy writes principals without the scheme.
        let full = if s.starts_with("spiffe://") {
            s.to_string()
        } else {
            format!("spiffe://{s}")
        };
        let rest = full.strip_prefix("spiffe://").unwrap_or_default();
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !trust_domains.iter().any(|t| t == td) {
            return Err(format!(
                "{s:?} cannot match any caller: trust domain {td:?} is not one this meshgate accepts ({}); add it to mesh.trust_domain_aliases, or {FORMS}",
                trust_domains.join(", ")
            ));
        }
        if path == "*" {
            return Ok(PrincipalRule::TrustDomain(td.to_string()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", "*"] if is_label(ns) => Ok(PrincipalRule::Namespace {
                trust_domain: Some(td.to_string()),
                namespace: ns.to_string(),
            }),
            ["ns", ns, "sa", sa] if is_label(ns) && is_service_account(sa) => Ok(PrincipalRule::Exact(full.clone())),
            _ => Err(format!(
                "{s:?} cannot match any caller: `*` only ends a rule, and names are Kubernetes names; {FORMS}"
            )),
        }
    }
}

impl std::fmt::Display for PrincipalRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrincipalRule::Exact(id) => f.write_str(id),
            PrincipalRule::Namespace {
                trust_domain: Some(td),
                namespace,
            } => write!(f, "spiffe://{td}/ns/{namespace}/sa/*"),
            PrincipalRule::Namespace {
                trust_domain: None,
                namespace,
            } => write!(f, "ns/{namespace}/*"),
            PrincipalRule::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
            PrincipalRule::Any => f.write_str("*"),
        }
    }
}

/// `spiffe://TD/ns/NS/sa/SA` → (TD, NS, SA).
fn split_spiffe(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let path = path.strip_prefix("ns/")?;
    let (ns, sa) = path.split_once("/sa/")?;
    (!sa.contains('/')).then_some((td, ns, sa))
}

/// A DNS-1123 label (Kubernetes namespace).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (Kubernetes service account).
fn is_service_account(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label)
}

/// Validates `vm_services:`. Host and port pairs must be unique (they select the service).
pub(super) fn vm_services(
    raw: &OrderedMap<RawVmService>,
    trust_domains: &[String],
    errs: &mut Collector,
) -> Vec<std::sync::Arc<VmService>> {
    let mut out = Vec::new();
    let mut claimed: std::collections::HashMap<(String, u16), String> = std::collections::HashMap::new();
    for (name, s) in &raw.0 {
        let n = &name.value;
        if !super::validate::valid_name(n) {
            errs.at(
                line(name),
                format!("invalid vm_service name {n:?}: use lower-case letters, digits, '-' and '_'"),
            );
        }
        let port = s.port.value;
        if port == 0 {
            errs.at(line(&s.port), "invalid port 0: expected 1-65535");
        }
        if s.hosts.value.is_empty() {
            errs.at(
                line(&s.hosts),
                "hosts: list at least one name mesh clients call this service by",
            );
        }
        let mut hosts = Vec::new();
        for h in &s.hosts.value {
            let host = h.trim_end_matches('.').to_ascii_lowercase();
            if !crate::route::is_dns_name(&host) {
                errs.at(line(&s.hosts), format!("invalid host {h:?}: expected a DNS name"));
            }
            if let Some(other) = claimed.insert((host.clone(), port), n.clone()) {
                errs.at(
                    line(&s.hosts),
                    format!("host {host} port {port} already belongs to vm_service {other:?}"),
                );
            }
            hosts.push(host);
        }
        let protocol = s.protocol.value;
        if protocol == UpstreamProtocol::Auto {
            errs.at(
                line(&s.protocol),
                "protocol: http1, http2 or tcp (what the VM backends speak)",
            );
        }
        if s.backends.value.is_empty() {
            errs.at(line(&s.backends), "backends: list at least one host:port");
        }
        let backends: Vec<HostPort> = s
            .backends
            .value
            .iter()
            .filter_map(|b| match parse_host_port(b) {
                Ok(hp) => Some(hp),
                Err(e) => {
                    errs.at(line(&s.backends), format!("backend {b:?}: {e}"));
                    None
                }
            })
            .collect();
        if s.allow.is_empty() {
            errs.at(
                line(name),
                format!("vm_service {n:?} allows no caller: list the principals that may call it in allow: (nobody may by default)"),
            );
        }
        let allow = s
            .allow
            .iter()
            .filter_map(|a| match PrincipalRule::parse(&a.value, trust_domains) {
                Ok(r) => Some(r),
                Err(e) => {
                    errs.at(line(a), e);
                    None
                }
            })
            .collect();
        let health_check = s.health_check.as_ref().map(|h| {
            let v = &h.value;
            if let Some(p) = &v.path {
                if protocol == UpstreamProtocol::Tcp {
                    errs.at(
                        line(p),
                        "health_check.path: a tcp service is checked by connecting, not by HTTP",
                    );
                } else if !p.value.starts_with('/') || http::uri::PathAndQuery::try_from(p.value.as_str()).is_err() {
                    errs.at(
                        line(p),
                        format!("health_check.path {:?}: expected a path such as /healthz", p.value),
                    );
                }
            }
            if v.unhealthy_threshold == 0 || v.healthy_threshold == 0 || v.interval.0.is_zero() || v.timeout.0.is_zero()
            {
                errs.at(
                    line(h),
                    "health_check: interval, timeout and both thresholds must be above 0",
                );
            }
            HealthCheck {
                path: v.path.as_ref().map(|p| p.value.clone()),
                interval: v.interval.0,
                timeout: v.timeout.0,
                unhealthy_threshold: v.unhealthy_threshold,
                healthy_threshold: v.healthy_threshold,
            }
        });
        let outlier = match &s.outlier_detection {
            Some(o) => {
                if o.value.consecutive_failures == 0 {
                    errs.at(line(o), "outlier_detection.consecutive_failures must be at least 1");
                }
                Outlier {
                    consecutive_failures: o.value.consecutive_failures,
                    ejection_time: o.value.ejection_time.0,
                }
            }
            None => Outlier {
                consecutive_failures: d_consecutive(),
                ejection_time: d_ejection().0,
            },
        };
        out.push(std::sync::Arc::new(VmService {
            id: out.len(),
            name: n.clone(),
            hosts,
            port,
            protocol,
            backends,
            load_balancing: s.load_balancing.as_ref().map(|l| l.value).unwrap_or_default(),
            allow,
            health_check,
            outlier,
            connect_timeout: s.connect_timeout.0,
            request_timeout: s.request_timeout.0,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tds() -> Vec<String> {
        vec!["cluster.local".into(), "old.example".into()]
    }

    #[test]
    fn rules_parse_and_match() {
        let cases = [
            (
                "spiffe://cluster.local/ns/shop/sa/cart",
                "spiffe://cluster.local/ns/shop/sa/cart",
                true,
            ),
            (
                "cluster.local/ns/shop/sa/cart",
                "spiffe://cluster.local/ns/shop/sa/cart",
                true,
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/cart",
                "spiffe://cluster.local/ns/shop/sa/carts",
                false,
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/*",
                "spiffe://cluster.local/ns/shop/sa/x",
                true,
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/*",
                "spiffe://old.example/ns/shop/sa/x",
                false,
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/*",
                "spiffe://cluster.local/ns/shopping/sa/x",
                false,
            ),
            ("ns/shop/*", "spiffe://old.example/ns/shop/sa/x", true),
            ("ns/shop/*", "spiffe://cluster.local/ns/other/sa/shop", false),
            ("spiffe://old.example/*", "spiffe://old.example/ns/a/sa/b", true),
            ("spiffe://old.example/*", "spiffe://cluster.local/ns/a/sa/b", false),
            ("*", "spiffe://cluster.local/ns/a/sa/b", true),
            // Not a workload ID at all: nothing matches it.
            ("*", "spiffe://cluster.local/other", false),
            ("ns/shop/*", "spiffe://cluster.local/ns/shop/sa/a/b", false),
        ];
        for (rule, caller, want) in cases {
            let r = PrincipalRule::parse(rule, &tds()).unwrap_or_else(|e| panic!("{rule}: {e}"));
            assert_eq!(r.matches(caller), want, "{rule} vs {caller}");
        }
    }

    #[test]
    fn rules_that_cannot_match_are_refused() {
        for (rule, why) in [
            ("spiffe://other.domain/ns/shop/sa/cart", "trust domain \"other.domain\""),
            ("spiffe://cluster.local/ns/*/sa/cart", "`*` only ends a rule"),
            ("spiffe://cluster.local/ns/shop/*", "`*` only ends a rule"),
            ("ns/Shop/*", "not a namespace name"),
            ("ns/shop", "trust domain \"ns\""),
            ("spiffe://cluster.local/ns/shop/sa/", "`*` only ends a rule"),
        ] {
            let e = PrincipalRule::parse(rule, &tds()).unwrap_err();
            assert!(e.contains(why), "{rule}: {e}");
        }
    }
}

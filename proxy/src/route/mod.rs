//! Maps a request's authority (Host, `:authority`, absolute-form URI) to a configured service.
//!
//! Names match case-insensitively, with or without a trailing dot, with or without a port. When a
//! port is given and several services share the host (one Kubernetes Service, several ports), the
//! port picks; otherwise the port is ignored, since VMs reach meshgate on the listener's port,
//! which need not be the service port.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("malformed authority")]
    Malformed,
    #[error("unknown host")]
    UnknownHost,
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Lower-case host without trailing dot → (service port, service id).
    by_host: HashMap<String, Vec<(u16, usize)>>,
    /// Host patterns `*.SUFFIX` by their lower-case SUFFIX. A host is looked up once per label
    /// boundary, so the cost grows with the host's length, not with the number of patterns.
    patterns: HashMap<String, Vec<PatternRoute>>,
}

#[derive(Debug, Clone)]
struct PatternRoute {
    ports: Vec<u16>,
    id: usize,
    /// TCP patterns are reached by CONNECT only, HTTP ones by Host only.
    tcp: bool,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A service by its own host or an alias.
    Service(usize),
    /// A host that service `service`'s pattern matches: the canonical host (lower case, no
    /// trailing dot) and the port the request is for.
    Pattern { service: usize, host: String, port: u16 },
}

impl Route {
    pub fn service(&self) -> usize {
        match self {
            Route::Service(id) | Route::Pattern { service: id, .. } => *id,
        }
    }
}

/// Splits `host[:port]` / `[v6]:port` into a normalised host and optional port.
pub fn split_authority(authority: &str) -> Result<(String, Option<u16>), RouteError> {
    split(authority).map(|(h, p)| (h.to_ascii_lowercase(), p))
}

/// The host (without a trailing dot, in the client's case) and port of an authority.
fn split(authority: &str) -> Result<(&str, Option<u16>), RouteError> {
    let a = authority.trim();
    if a.is_empty() || a.contains('@') || a.contains('/') {
        return Err(RouteError::Malformed);
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(RouteError::Malformed)?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or(RouteError::Malformed)?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().map_err(|_| RouteError::Malformed)?),
        None => None,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(RouteError::Malformed);
    }
    Ok((host, port))
}

/// Letters, digits and `-` in dot-separated labels of 1-63 bytes, 253 bytes at most: the one
/// rule for a host that becomes an SNI, in the config and from a request alike.
pub fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The listed `tcp` service a CONNECT to `host:port` names: by host or alias and its own port
/// (a tunnel never tolerates another port). `host` is lower case, without a trailing dot.
pub fn tcp_service(services: &[std::sync::Arc<crate::config::Service>], host: &str, port: u16) -> Option<usize> {
    services
        .iter()
        .find(|s| {
            s.protocol == crate::config::UpstreamProtocol::Tcp
                && s.pattern.is_none()
                && s.port == port
                && (s.host == host || s.aliases.iter().any(|a| a == host))
        })
        .map(|s| s.id)
}

impl RouteTable {
    /// `entries`: (name, service port, service id). Callers reject duplicate (name, port) pairs.
    pub fn new<'a>(entries: impl IntoIterator<Item = (&'a str, u16, usize)>) -> RouteTable {
        let mut by_host: HashMap<String, Vec<(u16, usize)>> = HashMap::new();
        for (name, port, id) in entries {
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            by_host.entry(name).or_default().push((port, id));
        }
        RouteTable {
            by_host,
            patterns: HashMap::new(),
        }
    }

    /// Adds a host pattern `*.suffix` of service `id` for these ports.
    pub fn add_pattern(&mut self, suffix: &str, ports: &[u16], id: usize, tcp: bool) {
        self.patterns
            .entry(suffix.trim_end_matches('.').to_ascii_lowercase())
            .or_default()
            .push(PatternRoute {
                ports: ports.to_vec(),
                id,
                tcp,
            });
    }

    /// The table for a snapshot's services, each by the names it is routed by
    /// (`Service::routed`). Validation has already refused two services claiming one (name, port).
    pub fn for_services(services: &[std::sync::Arc<crate::config::Service>]) -> RouteTable {
        let mut t = RouteTable::new(
            services
                .iter()
                .flat_map(|s| s.routed.iter().map(move |n| (n.as_str(), s.port, s.id))),
        );
        for s in services {
            if let Some(p) = &s.pattern {
                t.add_pattern(
                    &p.suffix,
                    &p.ports,
                    s.id,
                    s.protocol == crate::config::UpstreamProtocol::Tcp,
                );
            }
        }
        t
    }

    /// The route of an HTTP request for `authority`. A listed host wins over any pattern; of
    /// the patterns matching host and port, the most specific one `allowed` (the tenant's allow
    /// list) says yes to, else the most specific one (which the caller then refuses).
    pub fn resolve(&self, authority: &str, allowed: impl Fn(usize) -> bool) -> Result<Route, RouteError> {
        let (host, port) = split(authority)?;
        // Most clients send lower case: look that up as it is, without a copy.
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(candidates) = self.by_host.get(host) {
            if let [(_, id)] = candidates.as_slice() {
                return Ok(Route::Service(*id));
            }
            if let Some((_, id)) = port.and_then(|p| candidates.iter().find(|(sp, _)| *sp == p)) {
                return Ok(Route::Service(*id));
            }
        }
        self.pattern(host, port, false, allowed)
    }

    /// The route of a CONNECT tunnel to `host:port` through a TCP host pattern.
    pub fn resolve_tcp_pattern(&self, host: &str, port: u16, allowed: impl Fn(usize) -> bool) -> Option<Route> {
        self.pattern(&host.to_ascii_lowercase(), Some(port), true, allowed).ok()
    }

    fn pattern(
        &self,
        host: &str,
        port: Option<u16>,
        tcp: bool,
        allowed: impl Fn(usize) -> bool,
    ) -> Result<Route, RouteError> {
        // The host becomes an SNI and an authority: only DNS names reach a pattern.
        if self.patterns.is_empty() || !is_dns_name(host) {
            return Err(RouteError::UnknownHost);
        }
        let mut first = None;
        // Longest suffix first: `*.a.b` is more specific than `*.b`.
        for (i, _) in host.match_indices('.') {
            let Some(routes) = self.patterns.get(&host[i + 1..]) else {
                continue;
            };
            for r in routes.iter().filter(|r| r.tcp == tcp) {
                // Without a port, the pattern's only port (or 80, the port a Host without one means).
                let p = match port {
                    Some(p) => p,
                    None if r.ports.len() == 1 => r.ports[0],
                    None => 80,
                };
                if !r.ports.contains(&p) {
                    continue;
                }
                let route = || Route::Pattern {
                    service: r.id,
                    host: host.to_string(),
                    port: p,
                };
                if allowed(r.id) {
                    return Ok(route());
                }
                first.get_or_insert_with(route);
            }
        }
        first.ok_or(RouteError::UnknownHost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new([
            ("reviews.bookinfo.svc.cluster.local", 9080, 0),
            ("reviews.legacy.example.com", 9080, 0),
            ("multi.ns.svc.cluster.local", 8080, 1),
            ("multi.ns.svc.cluster.local", 9090, 2),
        ])
    }

    #[test]
    fn host_forms() {
        let t = table();
        for a in [
            "reviews.bookinfo.svc.cluster.local",
            "REVIEWS.Bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc.cluster.local:9080",
            "reviews.bookinfo.svc.cluster.local:8080",
            "reviews.bookinfo.svc.cluster.local.",
            "reviews.bookinfo.svc.cluster.local.:80",
            "reviews.legacy.example.com",
        ] {
            assert_eq!(t.resolve(a, |_| true), Ok(Route::Service(0)), "{a}");
        }
    }

    #[test]
    fn port_disambiguates_shared_host() {
        let t = table();
        assert_eq!(
            t.resolve("multi.ns.svc.cluster.local:8080", |_| true),
            Ok(Route::Service(1))
        );
        assert_eq!(
            t.resolve("multi.ns.svc.cluster.local:9090", |_| true),
            Ok(Route::Service(2))
        );
        assert_eq!(
            t.resolve("multi.ns.svc.cluster.local", |_| true),
            Err(RouteError::UnknownHost)
        );
        assert_eq!(
            t.resolve("multi.ns.svc.cluster.local:1", |_| true),
            Err(RouteError::UnknownHost)
        );
    }

    #[test]
    fn unknown_and_malformed() {
        let t = table();
        assert_eq!(
            t.resolve("ratings.bookinfo.svc.cluster.local", |_| true),
            Err(RouteError::UnknownHost)
        );
        assert_eq!(t.resolve("reviews:port", |_| true), Err(RouteError::Malformed));
        assert_eq!(t.resolve("", |_| true), Err(RouteError::Malformed));
        assert_eq!(
            t.resolve("user@reviews.bookinfo.svc.cluster.local", |_| true),
            Err(RouteError::Malformed)
        );
        assert_eq!(t.resolve("[::1", |_| true), Err(RouteError::Malformed));
    }

    fn patterns() -> RouteTable {
        let mut t = table();
        t.add_pattern("bookinfo.svc.cluster.local", &[9080, 8080], 3, false);
        t.add_pattern("svc.cluster.local", &[9080], 4, false);
        t.add_pattern("db.svc.cluster.local", &[5432], 5, true);
        t.add_pattern("single.example", &[7000], 6, false);
        t
    }

    fn pat(service: usize, host: &str, port: u16) -> Result<Route, RouteError> {
        Ok(Route::Pattern {
            service,
            host: host.into(),
            port,
        })
    }

    #[test]
    fn listed_hosts_win_over_patterns() {
        let t = patterns();
        assert_eq!(
            t.resolve("reviews.bookinfo.svc.cluster.local:9080", |_| true),
            Ok(Route::Service(0))
        );
        assert_eq!(
            t.resolve("ratings.bookinfo.svc.cluster.local:9080", |_| true),
            pat(3, "ratings.bookinfo.svc.cluster.local", 9080)
        );
        // The canonical host is lower case, without the trailing dot.
        assert_eq!(
            t.resolve("Ratings.BOOKINFO.svc.cluster.local.:8080", |_| true),
            pat(3, "ratings.bookinfo.svc.cluster.local", 8080)
        );
    }

    #[test]
    fn pattern_ports_and_shape() {
        let t = patterns();
        // A port the pattern does not list, and no port with two listed (80 is not one).
        assert_eq!(
            t.resolve("ratings.bookinfo.svc.cluster.local:7070", |_| true),
            Err(RouteError::UnknownHost)
        );
        // ... so the broader pattern, whose only port it is, takes it.
        assert_eq!(
            t.resolve("ratings.bookinfo.svc.cluster.local", |_| true),
            pat(4, "ratings.bookinfo.svc.cluster.local", 9080)
        );
        // One listed port: a Host without a port means it.
        assert_eq!(
            t.resolve("a.single.example", |_| true),
            pat(6, "a.single.example", 7000)
        );
        // `*.x` never matches `x` itself, and the wildcard spans one or more labels.
        assert_eq!(t.resolve("single.example:7000", |_| true), Err(RouteError::UnknownHost));
        assert_eq!(
            t.resolve("a.b.single.example:7000", |_| true),
            pat(6, "a.b.single.example", 7000)
        );
        // Not a DNS name: never turned into an SNI.
        for bad in [
            ".single.example:7000",
            "a..single.example:7000",
            "a_b.single.example:7000",
            "-a.single.example:7000",
        ] {
            assert_eq!(t.resolve(bad, |_| true), Err(RouteError::UnknownHost), "{bad}");
        }
    }

    #[test]
    fn most_specific_allowed_pattern_wins() {
        let t = patterns();
        let host = "ratings.bookinfo.svc.cluster.local:9080";
        assert_eq!(
            t.resolve(host, |_| true),
            pat(3, "ratings.bookinfo.svc.cluster.local", 9080)
        );
        assert_eq!(
            t.resolve(host, |id| id == 4),
            pat(4, "ratings.bookinfo.svc.cluster.local", 9080)
        );
        // Allowed nowhere: the most specific match, for the caller to refuse.
        assert_eq!(
            t.resolve(host, |_| false),
            pat(3, "ratings.bookinfo.svc.cluster.local", 9080)
        );
    }

    #[test]
    fn tcp_patterns_only_for_tunnels() {
        let t = patterns();
        assert_eq!(
            t.resolve("pg.db.svc.cluster.local:5432", |_| true),
            Err(RouteError::UnknownHost)
        );
        assert_eq!(
            t.resolve_tcp_pattern("PG.db.svc.cluster.local", 5432, |_| true),
            pat(5, "pg.db.svc.cluster.local", 5432).ok()
        );
        assert_eq!(t.resolve_tcp_pattern("pg.db.svc.cluster.local", 5433, |_| true), None);
        assert_eq!(
            t.resolve_tcp_pattern("ratings.bookinfo.svc.cluster.local", 9080, |_| true),
            None
        );
    }

    #[test]
    fn ipv6_authority() {
        assert_eq!(split_authority("[::1]:80"), Ok(("::1".into(), Some(80))));
        assert_eq!(split_authority("[::1]"), Ok(("::1".into(), None)));
    }
}

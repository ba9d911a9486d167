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

impl RouteTable {
    /// `entries`: (name, service port, service id). Callers reject duplicate (name, port) pairs.
    pub fn new<'a>(entries: impl IntoIterator<Item = (&'a str, u16, usize)>) -> RouteTable {
        let mut by_host: HashMap<String, Vec<(u16, usize)>> = HashMap::new();
        for (name, port, id) in entries {
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            by_host.entry(name).or_default().push((port, id));
        }
        RouteTable { by_host }
    }

    /// The table for a snapshot's services, each by the names it is routed by
    /// (`Service::routed`). Validation has already refused two services claiming one (name, port).
    pub fn for_services(services: &[std::sync::Arc<crate::config::Service>]) -> RouteTable {
        RouteTable::new(
            services
                .iter()
                .flat_map(|s| s.routed.iter().map(move |n| (n.as_str(), s.port, s.id))),
        )
    }

    pub fn resolve(&self, authority: &str) -> Result<usize, RouteError> {
        let (host, port) = split(authority)?;
        // Most clients send lower case: look that up as it is, without a copy.
        let candidates = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&host.to_ascii_lowercase())
        } else {
            self.by_host.get(host)
        }
        .ok_or(RouteError::UnknownHost)?;
        if let [(_, id)] = candidates.as_slice() {
            return Ok(*id);
        }
        port.and_then(|p| candidates.iter().find(|(sp, _)| *sp == p))
            .map(|(_, id)| *id)
            .ok_or(RouteError::UnknownHost)
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
            assert_eq!(t.resolve(a), Ok(0), "{a}");
        }
    }

    #[test]
    fn port_disambiguates_shared_host() {
        let t = table();
        assert_eq!(t.resolve("multi.ns.svc.cluster.local:8080"), Ok(1));
        assert_eq!(t.resolve("multi.ns.svc.cluster.local:9090"), Ok(2));
        assert_eq!(t.resolve("multi.ns.svc.cluster.local"), Err(RouteError::UnknownHost));
        assert_eq!(t.resolve("multi.ns.svc.cluster.local:1"), Err(RouteError::UnknownHost));
    }

    #[test]
    fn unknown_and_malformed() {
        let t = table();
        assert_eq!(
            t.resolve("ratings.bookinfo.svc.cluster.local"),
            Err(RouteError::UnknownHost)
        );
        assert_eq!(t.resolve("reviews:port"), Err(RouteError::Malformed));
        assert_eq!(t.resolve(""), Err(RouteError::Malformed));
        assert_eq!(
            t.resolve("user@reviews.bookinfo.svc.cluster.local"),
            Err(RouteError::Malformed)
        );
        assert_eq!(t.resolve("[::1"), Err(RouteError::Malformed));
    }

    #[test]
    fn ipv6_authority() {
        assert_eq!(split_authority("[::1]:80"), Ok(("::1".into(), Some(80))));
        assert_eq!(split_authority("[::1]"), Ok(("::1".into(), None)));
    }
}

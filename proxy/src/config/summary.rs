//! The summary `meshgate check` prints for a valid config.

use std::time::SystemTime;

use super::Snapshot;
use crate::identity::rfc3339;

fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// What `meshgate check` prints for a valid config: listeners, admin, mesh, identities,
/// services, VM services and tenants, one line each.
pub fn summary(s: &Snapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "config {}: OK", s.path.display());
    let _ = writeln!(out, "listeners:");
    for l in &s.listeners {
        let _ = writeln!(out, "  {:<16} {:<22} {:?}", l.name, l.bind.to_string(), l.protocol);
    }
    let _ = match &s.admin {
        Some(a) => writeln!(
            out,
            "admin: {}{}",
            a.bind,
            if a.token.is_some() {
                " (token required for /reload, /drain and /explain)"
            } else {
                ""
            }
        ),
        None => writeln!(out, "admin: (none)"),
    };
    let _ = writeln!(out, "mesh: trust domain {}, gateway {}", s.trust_domain, s.gateway);
    let id = &s.identity;
    let left = id
        .not_after
        .duration_since(SystemTime::now())
        .map(human_duration)
        .unwrap_or_else(|_| "expired".into());
    let _ = match &id.issuer {
        Some(issuer) if id.is_pending() => writeln!(
            out,
            "identity: {} (requested from {} at start, ttl {})",
            id.spiffe_id,
            issuer.describe(),
            human_duration(issuer.ttl)
        ),
        Some(issuer) => writeln!(
            out,
            "identity: {} (bootstrap certificate valid until {}, {} left; renewed from {})",
            id.spiffe_id,
            rfc3339(id.not_after),
            left,
            issuer.describe()
        ),
        None => writeln!(
            out,
            "identity: {} (valid until {}, {} left)",
            id.spiffe_id,
            rfc3339(id.not_after),
            left
        ),
    };
    let _ = writeln!(out, "services:");
    for svc in &s.services {
        let _ = match &svc.pattern {
            Some(p) => {
                let ports: Vec<String> = p.ports.iter().map(u16::to_string).collect();
                writeln!(
                    out,
                    "  {:<16} {} ports {} {:?} sni=outbound_.PORT_._.HOST expects {}",
                    svc.name,
                    svc.host,
                    ports.join(","),
                    svc.protocol,
                    svc.server_rule()
                )
            }
            None => writeln!(
                out,
                "  {:<16} {}:{} {:?} sni={} expects {}",
                svc.name, svc.host, svc.port, svc.protocol, svc.sni, svc.expected_server
            ),
        };
        if !svc.aliases.is_empty() {
            let _ = writeln!(out, "  {:<16} aliases: {}", "", svc.aliases.join(", "));
        }
    }
    if !s.vm_services.is_empty() {
        let _ = writeln!(
            out,
            "vm_services (callers from trust domains {}):",
            s.trust_domains.join(", ")
        );
    }
    for v in &s.vm_services {
        let backends: Vec<String> = v.backends.iter().map(|b| b.to_string()).collect();
        let _ = writeln!(
            out,
            "  {:<16} {} port {} {:?} -> {} ({:?}) allow: {}",
            v.name,
            v.hosts.join(", "),
            v.port,
            v.protocol,
            backends.join(", "),
            v.load_balancing,
            crate::inbound::allow_list(v).join(", ")
        );
    }
    let _ = writeln!(out, "tenants:");
    for t in s.tenants.iter() {
        let sources: Vec<String> = t.sources.iter().map(|n| n.to_string()).collect();
        let allow = match &t.allow {
            crate::policy::Allow::All => "*".to_string(),
            crate::policy::Allow::Services(v) => s
                .services
                .iter()
                .filter(|svc| v[svc.id])
                .map(|svc| svc.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let _ = writeln!(
            out,
            "  {:<16} sources: {}  api keys: {}  allow: {}",
            t.name,
            if sources.is_empty() {
                "any".into()
            } else {
                sources.join(", ")
            },
            t.key_hashes.len(),
            allow
        );
    }
    out
}

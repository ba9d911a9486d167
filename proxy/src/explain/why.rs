//! The "why" of a refusal: which rule matched or failed, in words an operator can act on.

use std::net::IpAddr;

use super::split_authority;
use crate::config::Snapshot;
use crate::policy::{Deny, Tenant};

/// The most specific of the tenant's sources that holds `client`: the one that made the match.
fn best_source(t: &Tenant, client: IpAddr) -> Option<String> {
    t.sources
        .iter()
        .filter(|n| n.contains(&client))
        .max_by_key(|n| n.prefix_len())
        .map(|n| n.to_string())
}

pub(super) fn matched_by(t: &Tenant, client: IpAddr, keyed: bool, vpce: Option<&str>) -> String {
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

pub(super) fn why_unauthorized(
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

pub(super) fn why_unknown_host(snapshot: &Snapshot, authority: &str) -> String {
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

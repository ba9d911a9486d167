//! Tenants: names, keys (unique across tenants), key-less sources (no two tenants claim one),
//! allow lists, limits, and which tenants name identities of their own.

use std::collections::HashMap;

use yamlconf::{line_of as line, Collector};

use super::super::schema::RawConfig;
use super::super::schema::RawIdentity;
use super::super::{parse_key_hash, Allow, Tenant};
use super::*;
use serde_saphyr::Spanned;

pub(super) struct Tenants<'a> {
    pub list: Vec<Tenant>,
    pub names: Vec<String>,
    /// (tenant index, name, its `identity:` block) for tenants with identities of their own.
    pub identities: Vec<(usize, String, &'a Spanned<RawIdentity>)>,
}

pub(super) fn tenants<'a>(
    raw: &'a RawConfig,
    service_ids: &HashMap<String, usize>,
    service_count: usize,
    errs: &mut Collector,
) -> Tenants<'a> {
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
        let mut allowed = vec![false; service_count];
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
                Some(super::super::RateLimit {
                    per_second: r.requests_per_second,
                    burst,
                })
            }),
            max_concurrent_requests: t.max_concurrent_requests,
            identity: 0,
            telemetry: None,
            key_hashes,
            allow: if allow_all {
                Allow::All
            } else {
                Allow::Services(allowed)
            },
        });
    }
    Tenants {
        list: tenants,
        names: tenant_names,
        identities: tenant_identity_raw,
    }
}

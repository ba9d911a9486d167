//! `telemetry:` (top level, and per tenant) resolved into the names the mesh's telemetry will
//! show for each tenant, and `tracing:`.
//!
//! Istio takes `source_workload_namespace` from the client certificate's SPIFFE ID, not from
//! the metadata (istio_stats `populatePeerInfo`), so a `namespace` that disagrees with the
//! certificate the tenant presents would be silently ignored by the mesh: it is an error here,
//! and the default is the certificate's namespace.

use std::sync::Arc;

use serde_saphyr::Spanned;
use yamlconf::{line_of as line, Collector};

use super::super::schema::{RawConfig, RawTelemetry};
use super::super::{Telemetry, Tenant, TracingSettings};
use crate::identity::{spiffe_namespace, Identity};

/// Label keys that have fields of their own.
const RESERVED_LABELS: [&str; 6] = [
    "app",
    "version",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
];

pub(super) fn telemetry(
    raw: &RawConfig,
    tenants: &mut [Tenant],
    mesh_identity: Option<&Arc<Identity>>,
    tenant_identities: &[Arc<Identity>],
    errs: &mut Collector,
) {
    let fleet = raw.telemetry.as_ref();
    if let Some(f) = fleet {
        check_values(&f.value, errs);
    }
    for ((_, raw_tenant), tenant) in raw.tenants.0.iter().zip(tenants.iter_mut()) {
        let own = raw_tenant.telemetry.as_ref();
        if let Some(t) = own {
            check_values(&t.value, errs);
        }
        let block_line = match (own, fleet) {
            (Some(t), _) => line(t),
            (None, Some(f)) => line(f),
            (None, None) => continue,
        };
        // The tenant's own field, else the fleet's.
        let pick = |f: fn(&RawTelemetry) -> &Option<Spanned<String>>| {
            own.and_then(|t| f(&t.value).as_ref())
                .or_else(|| fleet.and_then(|t| f(&t.value).as_ref()))
        };
        let Some(workload) = pick(|t| &t.workload) else {
            errs.at(
                block_line,
                format!(
                    "telemetry for tenant {:?} needs `workload:` (here or in the top-level telemetry:)",
                    tenant.name
                ),
            );
            continue;
        };
        let identity = match tenant.identity {
            0 => mesh_identity,
            k => tenant_identities.get(k - 1),
        };
        let cert_namespace = identity.and_then(|i| spiffe_namespace(&i.spiffe_id).map(|ns| (ns, &i.spiffe_id)));
        let namespace = match (pick(|t| &t.namespace), cert_namespace) {
            // A SPIFFE ID without `/ns/`: Istio falls back to the metadata's NAMESPACE.
            (None, None) if identity.is_some() => {
                errs.at(
                    block_line,
                    format!(
                        "telemetry for tenant {:?} needs `namespace:`: its certificate's SPIFFE ID names no namespace",
                        tenant.name
                    ),
                );
                continue;
            }
            (Some(ns), Some((cert_ns, id))) if ns.value != cert_ns => {
                errs.at(
                    line(ns),
                    format!(
                        "telemetry namespace {:?} for tenant {:?}: the mesh takes the namespace from the client certificate ({id}), so it would show {cert_ns:?}; give the tenant an identity in {:?} or leave namespace out",
                        ns.value, tenant.name, ns.value
                    ),
                );
                continue;
            }
            (Some(ns), _) => ns.value.clone(),
            (None, Some((cert_ns, _))) => cert_ns.to_string(),
            // The identity failed to load: its own error says why.
            (None, None) => continue,
        };
        let value = |f: fn(&RawTelemetry) -> &Option<Spanned<String>>| pick(f).map(|s| s.value.clone());
        let app = value(|t| &t.app).unwrap_or_else(|| workload.value.clone());
        let version = value(|t| &t.version);
        // The defaults Istio's injector gives a pod's canonical labels.
        let canonical_service = value(|t| &t.canonical_service).unwrap_or_else(|| app.clone());
        let canonical_revision = value(|t| &t.canonical_revision)
            .or_else(|| version.clone())
            .unwrap_or_else(|| "latest".to_string());
        let mut labels: Vec<(String, String)> = Vec::new();
        for block in [fleet, own].into_iter().flatten() {
            for (k, v) in &block.value.labels.0 {
                labels.retain(|(old, _)| *old != k.value);
                labels.push((k.value.clone(), v.clone()));
            }
        }
        labels.sort();
        tenant.telemetry = Some(Arc::new(Telemetry {
            workload: workload.value.clone(),
            namespace,
            app,
            version,
            canonical_service,
            canonical_revision,
            cluster_id: value(|t| &t.cluster_id),
            labels,
        }));
    }
}

pub(super) fn tracing(raw: &RawConfig, errs: &mut Collector) -> TracingSettings {
    let sample_rate = match &raw.tracing {
        Some(t) if !(0.0..=1.0).contains(&t.value.sample_rate) => {
            errs.at(
                line(t),
                format!(
                    "tracing.sample_rate {} must be between 0 and 1 (a fraction, not a percentage)",
                    t.value.sample_rate
                ),
            );
            0.0
        }
        Some(t) => t.value.sample_rate,
        None => super::super::schema::d_sample_rate(),
    };
    TracingSettings { sample_rate }
}

fn check_values(t: &RawTelemetry, errs: &mut Collector) {
    let fields = [
        ("workload", &t.workload),
        ("namespace", &t.namespace),
        ("app", &t.app),
        ("version", &t.version),
        ("canonical_service", &t.canonical_service),
        ("canonical_revision", &t.canonical_revision),
        ("cluster_id", &t.cluster_id),
    ];
    for (name, v) in fields {
        if let Some(v) = v {
            if let Err(why) = check_value(&v.value) {
                errs.at(line(v), format!("telemetry {name}: {why}"));
            }
        }
    }
    for (k, v) in &t.labels.0 {
        if RESERVED_LABELS.contains(&k.value.as_str()) {
            errs.at(
                line(k),
                format!("telemetry label {:?} is set by its own field (app, version, canonical_service, canonical_revision)", k.value),
            );
        } else if !valid_label_key(&k.value) {
            errs.at(
                line(k),
                format!(
                    "telemetry label key {:?} is not a Kubernetes label key ([prefix/]name of letters, digits, '-', '_', '.')",
                    k.value
                ),
            );
        } else if let Err(why) = check_value(v) {
            errs.at(line(k), format!("telemetry label {}: {why}", k.value));
        }
    }
}

fn check_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Err("must not be empty (leave the field out instead)");
    }
    if v.len() > 253 {
        return Err("longer than 253 bytes");
    }
    if v.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    Ok(())
}

fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    name_ok && prefix.is_none_or(super::valid_hostname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys() {
        assert!(valid_label_key("team"));
        assert!(valid_label_key("example.com/team"));
        assert!(!valid_label_key("-team"));
        assert!(!valid_label_key("a b"));
        assert!(!valid_label_key("bad_prefix!/x"));
    }
}

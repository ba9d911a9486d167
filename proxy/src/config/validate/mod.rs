//! Turns a parsed [`RawConfig`] into a [`Snapshot`], or into every error it contains, each with
//! its line. Cross-references, uniqueness and the identity files are checked here, one part of
//! the file per module: `listeners.rs`, `services.rs`, `tenants.rs`, `settings.rs` (admin,
//! limits, drain, upstream, the key header), `identity.rs` (files and issuers) and
//! `telemetry.rs` (the names the mesh's telemetry sees, tracing).

mod identity;
mod listeners;
mod services;
mod settings;
mod telemetry;
mod tenants;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::schema::RawConfig;
use super::{ConfigErrors, Snapshot};
use yamlconf::{line_of as line, Collector};

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

pub(super) fn valid_hostname(s: &str) -> bool {
    crate::route::is_dns_name(s.strip_suffix('.').unwrap_or(s))
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
    let mut listeners = listeners::listeners(path, &raw, errs);
    let admin = settings::admin(path, &raw, &listeners.binds, errs);
    let drain = settings::drain(&raw, errs);
    let limits = settings::limits(&raw, errs);
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
    let (td, td_ok) = settings::trust_domain(&raw, errs);
    let mut acc = services::Services::default();
    services::services(path, &raw.services, &td, &mut acc, errs);
    let services_file = services::services_file(path, &raw, &td, &mut acc, errs);
    let (services, service_ids) = (acc.list, acc.ids);
    listeners::attach_services(&mut listeners, &services, &service_ids, errs);
    let mut tenants = tenants::tenants(&raw, &service_ids, services.len(), errs);
    services::overlapping_patterns(&raw, &services, &tenants.list, errs);
    let api_key_header = settings::api_key_header(&raw, errs);
    if raw.mesh.gateway.value.0.is_empty() {
        errs.at(
            line(&raw.mesh.gateway),
            "mesh.gateway: at least one host:port is required",
        );
    }
    let upstream = settings::upstream(&raw, errs);
    let mut trust_domains = vec![td.clone()];
    for a in &raw.mesh.trust_domain_aliases {
        if crate::identity::spiffe_trust_domain(&format!("spiffe://{}/x", a.value)) != Some(a.value.as_str()) {
            errs.at(line(a), format!("invalid trust domain alias {:?}", a.value));
        }
        trust_domains.push(a.value.clone());
    }
    let vm_services = super::inbound::vm_services(&raw.vm_services, &trust_domains, errs);
    listeners::inbound(&raw, !vm_services.is_empty(), errs);
    // Identity, last: it touches files, and its errors are clearer once the rest is right.
    let (identity, tenant_identities) = identity::identities(path, &raw, &mut tenants, (&td, td_ok), now, errs);
    telemetry::telemetry(&raw, &mut tenants.list, identity.as_ref(), &tenant_identities, errs);
    let tracing = telemetry::tracing(&raw, errs);
    Some(Snapshot {
        path: path.to_owned(),
        listeners: listeners.list,
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
        services_file,
        vm_services,
        trust_domains,
        tenants: tenants.list,
        tenant_names: tenants.names,
        api_key_header: api_key_header?,
        upstream,
        tracing,
    })
}

//! The settings blocks: admin, drain, limits, the mesh's trust domain, the API key header and
//! upstream connection settings.

use std::collections::HashMap;
use std::path::Path;

use yamlconf::{line_of as line, Collector};

use super::super::schema::RawConfig;
use super::super::schema::{RawDrain, RawUpstream};
use super::super::{Admin, DrainSettings, Limits, UpstreamSettings};
use super::*;
use http::HeaderName;

pub(super) fn admin(
    path: &Path,
    raw: &RawConfig,
    binds: &HashMap<std::net::SocketAddr, String>,
    errs: &mut Collector,
) -> Option<Admin> {
    raw.admin.as_ref().map(|a| {
        if let Some(other) = binds.get(&a.bind.value.0).filter(|_| a.bind.value.0.port() != 0) {
            errs.at(
                line(&a.bind),
                format!(
                    "admin address {} is already bound by listener {other:?}",
                    a.bind.value.0
                ),
            );
        }
        let token = a.token_file.as_ref().and_then(|tf| {
            let p = resolve_path(path, &tf.value);
            match std::fs::read_to_string(&p) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                Ok(_) => {
                    errs.at(line(tf), format!("admin token file {} is empty", p.display()));
                    None
                }
                Err(e) => {
                    errs.at(line(tf), format!("cannot read admin token file {}: {e}", p.display()));
                    None
                }
            }
        });
        // Reload, drain and the running config (every tenant's sources and identities) must
        // not be open to whoever can reach a public address.
        if a.token_file.is_none() && !a.bind.value.0.ip().is_loopback() && !a.allow_unauthenticated {
            errs.at(
                line(&a.bind),
                format!(
                    "admin.bind {} is not a loopback address and admin.token_file is not set: anyone who reaches it could reload, drain or read the config; set token_file, bind to 127.0.0.1, or set allow_unauthenticated: true",
                    a.bind.value.0
                ),
            );
        }
        Admin {
            bind: a.bind.value.0,
            token,
        }
    })
}

pub(super) fn drain(raw: &RawConfig, errs: &mut Collector) -> DrainSettings {
    let (drain_raw, drain_line) = match &raw.drain {
        Some(d) => (&d.value, line(d)),
        None => (&RawDrain::default(), None),
    };
    let drain = DrainSettings {
        delay: drain_raw.delay.0,
        spread: drain_raw.spread.0,
        timeout: drain_raw.timeout.0,
    };
    if drain.delay + drain.spread > drain.timeout {
        errs.at(
            drain_line,
            "drain: delay + spread must not exceed timeout, or connections are cut before they are asked to close",
        );
    }
    drain
}

pub(super) fn limits(raw: &RawConfig, errs: &mut Collector) -> Limits {
    let (lim, lim_line) = match &raw.limits {
        Some(l) => (&l.value, line(l)),
        None => (&super::super::schema::RawLimits::default(), None),
    };
    let limits = Limits {
        max_connections: lim.max_connections,
        max_header_bytes: lim.max_header_bytes,
        max_headers: lim.max_headers,
        header_read_timeout: lim.header_read_timeout.0,
        idle_timeout: lim.idle_timeout.0,
        max_connections_per_source: lim.max_connections_per_source,
        max_preface_connections: lim.max_preface_connections,
        h2_max_concurrent_streams: lim.h2_max_concurrent_streams,
        max_request_body: lim.max_request_body,
    };
    // hyper needs room for at least one read buffer; tiny values only produce odd 431s.
    if limits.max_header_bytes < 8192
        || limits.max_headers == 0
        || limits.max_connections == 0
        || limits.max_connections_per_source == 0
        || limits.max_preface_connections == 0
        || limits.h2_max_concurrent_streams == 0
    {
        errs.at(lim_line, "limits: max_header_bytes must be >= 8192 and the counts >= 1");
    }
    limits
}

/// The mesh's trust domain, and whether it is valid (identities are only checked against a
/// valid one).
pub(super) fn trust_domain(raw: &RawConfig, errs: &mut Collector) -> (String, bool) {
    let td = raw.mesh.trust_domain.value.clone();
    let td_ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if !td_ok {
        errs.at(
            line(&raw.mesh.trust_domain),
            format!("invalid trust_domain {td:?}: expected a name such as cluster.local"),
        );
    }
    (td, td_ok)
}

pub(super) fn api_key_header(raw: &RawConfig, errs: &mut Collector) -> Option<HeaderName> {
    let hdr = raw.api_key_header.value.to_ascii_lowercase();
    const RESERVED: &[&str] = &[
        "host",
        "proxy-authorization",
        "authorization",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "x-forwarded-client-cert",
    ];
    match HeaderName::from_bytes(hdr.as_bytes()) {
        Ok(h) if !RESERVED.contains(&hdr.as_str()) => Some(h),
        Ok(_) => {
            errs.at(
                line(&raw.api_key_header),
                format!("api_key_header {hdr:?} is a header meshgate or HTTP already uses"),
            );
            None
        }
        Err(_) => {
            errs.at(
                line(&raw.api_key_header),
                format!("api_key_header {hdr:?} is not a valid header name"),
            );
            None
        }
    }
}

pub(super) fn upstream(raw: &RawConfig, errs: &mut Collector) -> UpstreamSettings {
    let (up, up_line) = match &raw.upstream {
        Some(s) => (&s.value, line(s)),
        None => (&RawUpstream::default(), None),
    };
    let upstream = UpstreamSettings {
        connect_timeout: up.connect_timeout.0,
        handshake_timeout: up.handshake_timeout.0,
        request_timeout: up.request_timeout.0,
        idle_timeout: up.idle_timeout.0,
        max_connection_age: up.max_connection_age.0,
        max_connection_age_jitter: up.max_connection_age_jitter,
        min_connections: up.min_connections,
        max_connections: up.max_connections,
        target_streams_per_connection: up.target_streams_per_connection,
        max_streams_per_connection: up.max_streams_per_connection,
        http1_max_connections: up.http1_max_connections,
        max_pending_requests: up.max_pending_requests,
        body_idle_timeout: up.body_idle_timeout.0,
        max_dynamic_destinations: up.max_dynamic_destinations,
        unknown_service_cache: up.unknown_service_cache.0,
        max_metric_hosts: up.max_metric_hosts,
    };
    if !(0.0..=0.5).contains(&upstream.max_connection_age_jitter) {
        errs.at(up_line, "upstream.max_connection_age_jitter must be between 0 and 0.5");
    }
    if upstream.min_connections == 0 || upstream.max_connections < upstream.min_connections {
        errs.at(up_line, "upstream: need 1 <= min_connections <= max_connections");
    }
    if upstream.max_streams_per_connection == 0
        || upstream.target_streams_per_connection == 0
        || upstream.target_streams_per_connection > upstream.max_streams_per_connection
    {
        errs.at(
            up_line,
            "upstream: need 1 <= target_streams_per_connection <= max_streams_per_connection",
        );
    }
    if upstream.max_dynamic_destinations == 0 {
        errs.at(up_line, "upstream.max_dynamic_destinations must be at least 1");
    }
    if upstream.http1_max_connections == 0 {
        errs.at(up_line, "upstream.http1_max_connections must be at least 1");
    }
    upstream
}

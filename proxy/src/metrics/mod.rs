//! Every metric meshgate exports, in one place. The names are a contract with `dashboards/` and
//! the autoscaler (a test checks that every name they use is exported). Label values come only
//! from config names (listener, tenant, service) and fixed sets (reason, code, result, direction,
//! connection), never from request data, so cardinality is bounded by the config; the one
//! exception, the `host` of `meshgate_dynamic_requests_total`, has a configured bound.
//!
//! Longer than most files on purpose: one file is the single place to look for a name (DESIGN.md
//! §5), and splitting the registry from the label types would only scatter that contract.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: String,
    pub tenant: String,
    pub service: String,
    pub code: String,
}

/// A tenant's names in the mesh's telemetry (`telemetry:`), to join meshgate's `tenant` label
/// with the destination's `source_workload`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantTelemetryLabels {
    pub tenant: String,
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerReasonLabels {
    pub listener: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// A pattern's (or an `auto` service's) destination host, up to `upstream.max_metric_hosts`
/// distinct hosts, then `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceHostLabels {
    pub service: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub listener: String,
    pub service: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    pub service: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceResultLabels {
    pub service: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceConnectionLabels {
    pub service: String,
    pub connection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    pub identity: String,
    pub issuer: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
    /// The git revision built (`unknown` outside a checkout without `MESHGATE_GIT_REV`).
    pub revision: String,
    pub target: String,
}

pub struct Metrics {
    registry: Registry,
    /// Serializes scrapes: pool gauges are rebuilt from the pools for each one.
    scrape: std::sync::Mutex<()>,
    pub requests: Family<RequestLabels, Counter>,
    pub denied: Family<ListenerReasonLabels, Counter>,
    pub upstream_errors: Family<ServiceReasonLabels, Counter>,
    pub request_duration: Family<ServiceLabels, Histogram>,
    pub requests_in_flight: Gauge,
    pub bytes: Family<BytesLabels, Counter>,
    pub downstream_connections: Family<ListenerLabels, Gauge>,
    pub upstream_connections: Family<ServiceLabels, Gauge>,
    pub upstream_streams_in_use: Family<ServiceLabels, Gauge>,
    pub upstream_connects: Family<ServiceResultLabels, Counter>,
    pub upstream_handshake_duration: Family<ServiceLabels, Histogram>,
    pub upstream_requests: Family<ServiceConnectionLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub identity_reloads: Family<ResultLabels, Counter>,
    pub identity_expiry: Family<IdentityLabels, Gauge<f64, AtomicU64>>,
    pub identity_renewals: Family<RenewalLabels, Counter>,
    pub identity_renewal_failures: Family<IdentityLabels, Gauge>,
    pub tenant_info: Family<TenantTelemetryLabels, Gauge>,
    pub unknown_mesh_services: Family<ServiceLabels, Counter>,
    pub inbound_requests: Family<InboundLabels, Counter>,
    pub inbound_denied: Family<ListenerReasonLabels, Counter>,
    pub inbound_duration: Family<ServiceLabels, Histogram>,
    pub vm_backend_healthy: Family<BackendLabels, Gauge>,
    pub vm_backend_ejections: Family<BackendLabels, Counter>,
    pub vm_backend_errors: Family<ServiceReasonLabels, Counter>,
    pub dynamic_destinations: Family<ServiceLabels, Gauge>,
    pub dynamic_requests: Family<ServiceHostLabels, Counter>,
    /// The hosts that have a `host` label of their own in `dynamic_requests`.
    dynamic_hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    pub draining: Gauge,
    pub drained: Gauge,
    pub ready: Gauge,
    process: ProcessMetrics,
}

struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

/// Reasons that are the client's or policy's doing, as opposed to upstream failures.
pub fn is_denial(reason: &str) -> bool {
    matches!(
        reason,
        "unknown_client"
            | "bad_key"
            | "key_wrong_source"
            | "service_not_allowed"
            | "unknown_host"
            | "malformed_request"
            | "rate_limited"
            | "concurrency_limited"
            | "body_too_large"
            | "body_timeout"
            | "header_too_large"
            | "header_timeout"
            | "not_implemented"
            | "connect_not_tcp"
            | "source_connection_limit"
            | "preface_limit"
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        // prometheus-client appends `_total` to counter names itself.
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        let requests = reg!(
            "meshgate_requests",
            "Requests handled, by listener, tenant, service and status code",
            Family::<RequestLabels, Counter>::default()
        );
        let denied = reg!(
            "meshgate_denied",
            "Requests refused by meshgate before reaching the mesh, by reason",
            Family::<ListenerReasonLabels, Counter>::default()
        );
        let upstream_errors = reg!(
            "meshgate_upstream_errors",
            "Requests that failed on the way into the mesh, by service and reason",
            Family::<ServiceReasonLabels, Counter>::default()
        );
        let request_duration = reg!(
            "meshgate_request_duration_seconds",
            "Time from request received to response body finished",
            Family::<ServiceLabels, Histogram>::new_with_constructor(latency_histogram)
        );
        let requests_in_flight = reg!(
            "meshgate_requests_in_flight",
            "Requests currently being handled",
            Gauge::default()
        );
        let bytes = reg!(
            "meshgate_bytes",
            "Body bytes carried, by service and direction (upstream = VM to mesh)",
            Family::<BytesLabels, Counter>::default()
        );
        let downstream_connections = reg!(
            "meshgate_downstream_connections",
            "Open client connections, by listener",
            Family::<ListenerLabels, Gauge>::default()
        );
        let upstream_connections = reg!(
            "meshgate_upstream_connections",
            "Open pooled connections to the east-west gateway, by service",
            Family::<ServiceLabels, Gauge>::default()
        );
        let upstream_streams_in_use = reg!(
            "meshgate_upstream_streams_in_use",
            "Requests in flight on pooled upstream connections, by service",
            Family::<ServiceLabels, Gauge>::default()
        );
        let upstream_connects = reg!(
            "meshgate_upstream_connects",
            "Upstream connection attempts (TCP + TLS through the gateway), by result",
            Family::<ServiceResultLabels, Counter>::default()
        );
        let upstream_handshake_duration = reg!(
            "meshgate_upstream_handshake_duration_seconds",
            "TCP connect plus TLS handshake time of new upstream connections",
            Family::<ServiceLabels, Histogram>::new_with_constructor(latency_histogram)
        );
        let upstream_requests = reg!(
            "meshgate_upstream_requests",
            "Requests sent into the mesh, by whether their connection was new or reused",
            Family::<ServiceConnectionLabels, Counter>::default()
        );
        let config_reloads = reg!(
            "meshgate_config_reloads",
            "Config reload attempts, by result",
            Family::<ResultLabels, Counter>::default()
        );
        let identity_reloads = reg!(
            "meshgate_identity_reloads",
            "Workload identity reloads from disk (rotation), by result",
            Family::<ResultLabels, Counter>::default()
        );
        // Present at 0 from the start: `increase(...{result="error"}[15m])` only sees the first
        // failure if the series existed before it.
        for family in [&config_reloads, &identity_reloads] {
            for result in ["ok", "error"] {
                let _ = family.get_or_create(&ResultLabels {
                    result: result.to_string(),
                });
            }
        }
        let identity_expiry = reg!(
            "meshgate_identity_expiry_timestamp_seconds",
            "Unix time at which the workload certificate expires",
            Family::<IdentityLabels, Gauge<f64, AtomicU64>>::default()
        );
        let identity_renewals = reg!(
            "meshgate_identity_renewals",
            "Certificate requests to an issuer (Istio CA, Vault), by identity, issuer kind and result",
            Family::<RenewalLabels, Counter>::default()
        );
        let identity_renewal_failures = reg!(
            "meshgate_identity_renewal_failures",
            "Consecutive failed certificate requests for an issued identity (0 once one succeeds)",
            Family::<IdentityLabels, Gauge>::default()
        );
        let tenant_info = reg!(
            "meshgate_tenant_info",
            "1 per tenant with telemetry: the workload names the mesh's telemetry shows for it",
            Family::<TenantTelemetryLabels, Gauge>::default()
        );
        let draining = reg!(
            "meshgate_draining",
            "1 while the instance drains (readiness off, connections being closed)",
            Gauge::default()
        );
        let drained = reg!(
            "meshgate_drained",
            "1 once a drain has finished: listeners closed, no client connections left",
            Gauge::default()
        );
        let ready = reg!("meshgate_ready", "1 when /readyz answers 200", Gauge::default());
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                revision: env!("MESHGATE_GIT_REV").to_string(),
                target: env!("MESHGATE_TARGET").to_string(),
            })
            .set(1);
        r.register(
            "meshgate_build_info",
            "meshgate version, git revision and build target",
            build_info,
        );
        let unknown_mesh_services = reg!(
            "meshgate_unknown_mesh_service",
            "Handshakes the gateway closed for a host pattern's destination (no such mesh service, or no endpoint), by service",
            Family::<ServiceLabels, Counter>::default()
        );
        let dynamic_destinations = reg!(
            "meshgate_dynamic_destinations",
            "Pools made on demand for host patterns and protocol auto, by service",
            Family::<ServiceLabels, Gauge>::default()
        );
        let dynamic_requests = reg!(
            "meshgate_dynamic_requests",
            "Requests routed by a host pattern or protocol auto, by service and host (hosts beyond upstream.max_metric_hosts are counted as other)",
            Family::<ServiceHostLabels, Counter>::default()
        );
        let inbound_requests = reg!(
            "meshgate_inbound_requests",
            "Requests and TCP connections from mesh workloads to VM services, by listener, service and status code (tcp: 200 or 502)",
            Family::<InboundLabels, Counter>::default()
        );
        let inbound_denied = reg!(
            "meshgate_inbound_denied",
            "Mesh callers refused on a mesh-inbound listener, by reason (principal_not_allowed, unknown_vm_service, untrusted_caller, handshake)",
            Family::<ListenerReasonLabels, Counter>::default()
        );
        let inbound_duration = reg!(
            "meshgate_inbound_request_duration_seconds",
            "Mesh → VM requests: received until the response headers, by VM service",
            Family::<ServiceLabels, Histogram>::new_with_constructor(latency_histogram)
        );
        let vm_backend_healthy = reg!(
            "meshgate_vm_backend_healthy",
            "1 if a VM backend takes requests (active health check passing, not ejected), else 0",
            Family::<BackendLabels, Gauge>::default()
        );
        let vm_backend_ejections = reg!(
            "meshgate_vm_backend_ejections",
            "Times a VM backend was ejected after consecutive failures (outlier detection)",
            Family::<BackendLabels, Counter>::default()
        );
        let vm_backend_errors = reg!(
            "meshgate_vm_backend_errors",
            "Failed attempts to reach VM backends, by service and reason (connect, timeout, reset, no_backend)",
            Family::<ServiceReasonLabels, Counter>::default()
        );
        let process = ProcessMetrics {
            cpu_seconds: reg!(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                Counter::<f64, AtomicU64>::default()
            ),
            resident_memory: reg!(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                Gauge::default()
            ),
            virtual_memory: reg!(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                Gauge::default()
            ),
            open_fds: reg!("process_open_fds", "Open file descriptors", Gauge::default()),
            max_fds: reg!("process_max_fds", "Maximum open file descriptors", Gauge::default()),
            start_time: reg!(
                "process_start_time_seconds",
                "Start time of the process since the unix epoch, in seconds",
                Gauge::<f64, AtomicU64>::default()
            ),
        };
        Metrics {
            registry: r,
            scrape: std::sync::Mutex::new(()),
            requests,
            denied,
            upstream_errors,
            request_duration,
            requests_in_flight,
            bytes,
            downstream_connections,
            upstream_connections,
            upstream_streams_in_use,
            upstream_connects,
            upstream_handshake_duration,
            upstream_requests,
            config_reloads,
            identity_reloads,
            identity_expiry,
            identity_renewals,
            identity_renewal_failures,
            tenant_info,
            unknown_mesh_services,
            inbound_requests,
            inbound_denied,
            inbound_duration,
            vm_backend_healthy,
            vm_backend_ejections,
            vm_backend_errors,
            dynamic_destinations,
            dynamic_requests,
            dynamic_hosts: Default::default(),
            draining,
            drained,
            ready,
            process,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_request(
        &self,
        listener: &str,
        tenant: Option<&str>,
        service: Option<&str>,
        status: u16,
        reason: &str,
        duration: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let service = service.unwrap_or("none");
        self.requests
            .get_or_create(&RequestLabels {
                listener: listener.to_string(),
                tenant: tenant.unwrap_or("none").to_string(),
                service: service.to_string(),
                code: status.to_string(),
            })
            .inc();
        if !reason.is_empty() {
            if is_denial(reason) {
                self.denied
                    .get_or_create(&ListenerReasonLabels {
                        listener: listener.to_string(),
                        reason: reason.to_string(),
                    })
                    .inc();
            } else {
                self.upstream_errors
                    .get_or_create(&ServiceReasonLabels {
                        service: service.to_string(),
                        reason: reason.to_string(),
                    })
                    .inc();
            }
        }
        self.request_duration
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .observe(duration.as_secs_f64());
        for (direction, n) in [("upstream", bytes_in), ("downstream", bytes_out)] {
            if n > 0 {
                self.bytes
                    .get_or_create(&BytesLabels {
                        service: service.to_string(),
                        direction: direction.to_string(),
                    })
                    .inc_by(n);
            }
        }
    }

    /// A connection or request refused before it reached a service (`meshgate_denied_total`).
    pub fn record_denied(&self, listener: &str, reason: &str) {
        self.denied
            .get_or_create(&ListenerReasonLabels {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn record_upstream_error(&self, service: &str, reason: &str) {
        self.upstream_errors
            .get_or_create(&ServiceReasonLabels {
                service: service.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A tunnel's bytes in `meshgate_bytes_total` (upstream = towards the mesh).
    pub fn record_bytes(&self, service: &str, sent: u64, received: u64) {
        for (direction, n) in [("upstream", sent), ("downstream", received)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    service: service.to_string(),
                    direction: direction.into(),
                })
                .inc_by(n);
        }
    }

    pub fn record_upstream_request(&self, service: &str, reused: bool) {
        self.upstream_requests
            .get_or_create(&ServiceConnectionLabels {
                service: service.to_string(),
                connection: if reused { "reused" } else { "new" }.to_string(),
            })
            .inc();
    }

    pub fn record_connect(&self, service: &str, ok: bool, took: Duration) {
        let labels = ServiceLabels {
            service: service.to_string(),
        };
        self.upstream_connects
            .get_or_create(&ServiceResultLabels {
                service: service.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
        if ok {
            self.upstream_handshake_duration
                .get_or_create(&labels)
                .observe(took.as_secs_f64());
        }
    }

    pub fn record_reload(family: &Family<ResultLabels, Counter>, ok: bool) {
        family
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    /// Replaces `meshgate_tenant_info` with the tenants of a new config generation.
    pub fn set_tenant_telemetry(&self, tenants: &[crate::config::Tenant]) {
        self.tenant_info.clear();
        for t in tenants {
            if let Some(names) = &t.telemetry {
                self.tenant_info
                    .get_or_create(&TenantTelemetryLabels {
                        tenant: t.name.clone(),
                        workload: names.workload.clone(),
                        namespace: names.namespace.clone(),
                        app: names.app.clone(),
                        version: names.version.clone().unwrap_or_else(|| "unknown".into()),
                        canonical_service: names.canonical_service.clone(),
                        canonical_revision: names.canonical_revision.clone(),
                    })
                    .set(1);
            }
        }
    }

    /// Sets the identity expiry gauge to the current identity only.
    pub fn set_identity(&self, spiffe_id: &str, not_after: std::time::SystemTime) {
        self.identity_expiry.clear();
        self.add_identity(spiffe_id, not_after);
    }

    /// Adds one more identity (a tenant's) to the expiry gauge.
    pub fn add_identity(&self, spiffe_id: &str, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.identity_expiry
            .get_or_create(&IdentityLabels {
                identity: spiffe_id.to_string(),
            })
            .set(secs);
    }

    /// Replaces the per-service pool gauges with `(service, connections, streams)` rows.
    fn set_pools(&self, rows: &[(String, i64, i64)]) {
        self.upstream_connections.clear();
        self.upstream_streams_in_use.clear();
        for (service, conns, streams) in rows {
            let l = ServiceLabels {
                service: service.clone(),
            };
            self.upstream_connections.get_or_create(&l).inc_by(*conns);
            self.upstream_streams_in_use.get_or_create(&l).inc_by(*streams);
        }
    }

    fn refresh_process(&self) {
        let p = &self.process;
        // Linux /proc; elsewhere these stay 0.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name; the name may contain spaces.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = 100.0; // USER_HZ is 100 on every Linux we ship to
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                // utime, stime are fields 14, 15 (1-based) → 11, 12 after the ')' split.
                let cpu = (num(11) + num(12)) / ticks;
                let prev = p.cpu_seconds.get();
                if cpu > prev {
                    p.cpu_seconds.inc_by(cpu - prev);
                }
                if p.start_time.get() == 0.0 {
                    let boot = std::fs::read_to_string("/proc/stat")
                        .ok()
                        .and_then(|s| {
                            s.lines()
                                .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()))
                        })
                        .unwrap_or(0.0);
                    p.start_time.set(boot + num(19) / ticks);
                }
            }
        }
        // Sizes from /proc/self/status are in kB whatever the page size.
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kb = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<i64>().ok())
            };
            if let Some(v) = kb("VmRSS:") {
                p.resident_memory.set(v * 1024);
            }
            if let Some(v) = kb("VmSize:") {
                p.virtual_memory.set(v * 1024);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            p.open_fds.set(dir.count() as i64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            if let Some(v) = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<i64>().ok())
            {
                p.max_fds.set(v);
            }
        }
    }

    /// Counts a request to a destination made on demand; `host` gets a label of its own while
    /// fewer than `max_hosts` hosts have one.
    pub fn record_dynamic_request(&self, service: &str, host: &str, max_hosts: usize) {
        let labelled = {
            let mut hosts = self.dynamic_hosts.lock().unwrap_or_else(|e| e.into_inner());
            hosts.contains(host) || (hosts.len() < max_hosts && hosts.insert(host.to_string()))
        };
        self.dynamic_requests
            .get_or_create(&ServiceHostLabels {
                service: service.to_string(),
                host: if labelled {
                    host.to_string()
                } else {
                    "other".to_string()
                },
            })
            .inc();
    }

    /// Sets `meshgate_dynamic_destinations` to `(service, pools)` rows.
    pub fn set_dynamic_destinations(&self, rows: &[(String, i64)]) {
        self.dynamic_destinations.clear();
        for (service, n) in rows {
            self.dynamic_destinations
                .get_or_create(&ServiceLabels {
                    service: service.clone(),
                })
                .set(*n);
        }
    }

    /// The Prometheus (OpenMetrics) text exposition of every metric.
    pub fn encode(&self) -> String {
        self.encode_with_pools(None)
    }

    /// Like [`Metrics::encode`], first setting the pool gauges to `(service, connections,
    /// streams)` rows, under one lock so concurrent scrapes never see them half rebuilt.
    pub fn encode_with_pools(&self, pools: Option<&[(String, i64, i64)]>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rows) = pools {
            self.set_pools(rows);
        }
        self.refresh_process();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

mod handles;
pub use handles::{FxHasher, RequestMetrics};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_and_failures_are_counted_by_reason() {
        let m = Metrics::new();
        m.record_request("vm", None, None, 403, "unknown_client", Duration::from_millis(1), 0, 0);
        m.record_request(
            "vm",
            Some("t"),
            Some("reviews"),
            503,
            "gateway_unreachable",
            Duration::from_millis(1),
            0,
            0,
        );
        m.record_request(
            "vm",
            Some("t"),
            Some("reviews"),
            200,
            "",
            Duration::from_millis(1),
            10,
            20,
        );
        let text = m.encode();
        assert!(
            text.contains(r#"meshgate_denied_total{listener="vm",reason="unknown_client"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"meshgate_upstream_errors_total{service="reviews",reason="gateway_unreachable"} 1"#));
        assert!(text.contains(r#"meshgate_requests_total{listener="vm",tenant="t",service="reviews",code="200"} 1"#));
        assert!(text.contains(r#"meshgate_bytes_total{service="reviews",direction="downstream"} 20"#));
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let m = Metrics::new();
        let text = m.encode();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
                .unwrap_or_else(|| panic!("{name} missing"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= 64.0);
        let start = value("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(start > now - 3600.0 && start <= now + 1.0, "start {start} now {now}");
    }

    #[test]
    fn identity_gauge_tracks_only_the_current_identity() {
        let m = Metrics::new();
        m.set_identity(
            "spiffe://a/ns/x/sa/old",
            std::time::UNIX_EPOCH + Duration::from_secs(100),
        );
        m.set_identity(
            "spiffe://a/ns/x/sa/new",
            std::time::UNIX_EPOCH + Duration::from_secs(200),
        );
        let text = m.encode();
        assert!(!text.contains("sa/old"));
        assert!(
            text.contains(r#"meshgate_identity_expiry_timestamp_seconds{identity="spiffe://a/ns/x/sa/new"} 200"#),
            "{text}"
        );
    }
}

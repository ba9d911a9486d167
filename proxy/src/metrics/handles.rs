//! Metric handles resolved once per config generation (the names stay in `mod.rs`).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::{
    is_denial, BytesLabels, ListenerReasonLabels, Metrics, RequestLabels, ServiceConnectionLabels, ServiceLabels,
};

/// The per-request metric handles of one config generation, resolved once so that recording a
/// request builds no label strings and hashes none: per service (by id) its duration
/// histogram, byte counters and upstream-connection counters; the request counters by
/// (listener, tenant, service, status) and the denial counters by (listener, reason), each
/// looked up from the registry the first time it is used and kept.
pub struct RequestMetrics {
    metrics: std::sync::Arc<Metrics>,
    tenants: Vec<String>,
    services: Vec<ServiceMetrics>,
    /// For requests that reached no service (label `none`).
    none: ServiceMetrics,
    counters: std::sync::Mutex<HandleMap<RequestKey>>,
    denied: std::sync::Mutex<HandleMap<(usize, usize)>>,
}

/// (listener name's address, tenant + 1, service + 1, status); the entry keeps the name alive,
/// so its address names it for as long as the entry exists.
type RequestKey = (usize, u32, u32, u16);
type KeyHasher = std::hash::BuildHasherDefault<FxHasher>;
/// Counters by key; each entry keeps the listener name its key holds the address of.
type HandleMap<K> = std::collections::HashMap<K, (std::sync::Arc<str>, Counter), KeyHasher>;

/// A multiply-rotate hasher for small integer keys (the keys are not chosen by clients).
#[derive(Default)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
}

struct ServiceMetrics {
    name: String,
    duration: Histogram,
    up: Counter,
    down: Counter,
    upstream_new: Counter,
    upstream_reused: Counter,
}

impl ServiceMetrics {
    fn new(metrics: &Metrics, name: &str) -> ServiceMetrics {
        let bytes = |direction: &str| {
            metrics
                .bytes
                .get_or_create(&BytesLabels {
                    service: name.to_string(),
                    direction: direction.to_string(),
                })
                .clone()
        };
        let upstream = |connection: &str| {
            metrics
                .upstream_requests
                .get_or_create(&ServiceConnectionLabels {
                    service: name.to_string(),
                    connection: connection.to_string(),
                })
                .clone()
        };
        ServiceMetrics {
            name: name.to_string(),
            duration: metrics
                .request_duration
                .get_or_create(&ServiceLabels {
                    service: name.to_string(),
                })
                .clone(),
            up: bytes("upstream"),
            down: bytes("downstream"),
            upstream_new: upstream("new"),
            upstream_reused: upstream("reused"),
        }
    }
}

impl RequestMetrics {
    pub fn new(metrics: std::sync::Arc<Metrics>, tenants: &[&str], services: &[&str]) -> RequestMetrics {
        RequestMetrics {
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            services: services.iter().map(|s| ServiceMetrics::new(&metrics, s)).collect(),
            none: ServiceMetrics::new(&metrics, "none"),
            metrics,
            counters: Default::default(),
            denied: Default::default(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn service(&self, service: Option<usize>) -> &ServiceMetrics {
        service.and_then(|s| self.services.get(s)).unwrap_or(&self.none)
    }

    /// The service's name as labels and logs show it (`none` for no service).
    pub fn service_name(&self, service: Option<usize>) -> &str {
        &self.service(service).name
    }

    /// One finished request: what `Metrics::record_request` records, from cached handles.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        listener: &std::sync::Arc<str>,
        tenant: Option<usize>,
        service: Option<usize>,
        status: u16,
        reason: &'static str,
        duration: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let key = (
            std::sync::Arc::as_ptr(listener) as *const u8 as usize,
            tenant.map_or(0, |t| t as u32 + 1),
            service.map_or(0, |s| s as u32 + 1),
            status,
        );
        let counter = {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            counters
                .entry(key)
                .or_insert_with(|| {
                    let tenant = tenant.and_then(|t| self.tenants.get(t)).map_or("none", |t| t.as_str());
                    let c = self
                        .metrics
                        .requests
                        .get_or_create(&RequestLabels {
                            listener: listener.to_string(),
                            tenant: tenant.to_string(),
                            service: self.service(service).name.clone(),
                            code: status.to_string(),
                        })
                        .clone();
                    (listener.clone(), c)
                })
                .1
                .clone()
        };
        counter.inc();
        if !reason.is_empty() {
            if is_denial(reason) {
                self.record_denied(listener, reason);
            } else {
                self.metrics.record_upstream_error(&self.service(service).name, reason);
            }
        }
        let s = self.service(service);
        s.duration.observe(duration.as_secs_f64());
        if bytes_in > 0 {
            s.up.inc_by(bytes_in);
        }
        if bytes_out > 0 {
            s.down.inc_by(bytes_out);
        }
    }

    /// A refusal in `meshgate_denied_total`, by listener and reason.
    pub fn record_denied(&self, listener: &std::sync::Arc<str>, reason: &'static str) {
        let key = (
            std::sync::Arc::as_ptr(listener) as *const u8 as usize,
            reason.as_ptr() as usize,
        );
        let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        let (_, c) = denied.entry(key).or_insert_with(|| {
            let c = self
                .metrics
                .denied
                .get_or_create(&ListenerReasonLabels {
                    listener: listener.to_string(),
                    reason: reason.to_string(),
                })
                .clone();
            (listener.clone(), c)
        });
        c.inc();
    }

    /// A request sent into the mesh on a new or a reused connection.
    pub fn record_upstream_request(&self, service: usize, reused: bool) {
        let s = self.service(Some(service));
        if reused {
            s.upstream_reused.inc();
        } else {
            s.upstream_new.inc();
        }
    }
}

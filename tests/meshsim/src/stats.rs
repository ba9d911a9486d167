//! Counters kept by the gateway and the sidecars, their plain-data snapshots, and a change
//! notification so tests can wait for a counter instead of sleeping.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Everything observable about the mesh, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// TCP connections the gateway accepted.
    pub gateway_accepted: u64,
    /// Connections spliced to a pod's sidecar.
    pub gateway_routed: u64,
    /// Closed after the ClientHello: unknown SNI, no Istio ALPN, malformed or slow hello.
    pub gateway_refused: u64,
    /// Matched a route but no pod could take it (none alive, or the dial failed).
    pub gateway_upstream_failures: u64,
    /// Per pod, by pod name.
    pub pods: BTreeMap<String, PodStats>,
}

impl StatsSnapshot {
    /// Sum of one field over all pods.
    pub fn pods_total(&self, f: impl Fn(&PodStats) -> u64) -> u64 {
        self.pods.values().map(f).sum()
    }
}

/// One sidecar and its app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Completed mTLS handshakes.
    pub tls_handshakes: u64,
    /// Handshakes that failed (no client cert, untrusted cert, protocol error, timeout).
    pub tls_failures: u64,
    /// TCP connections the sidecar holds right now.
    pub connections_open: u64,
    /// Requests that reached the echo app.
    pub app_requests: u64,
    /// Requests answered 403 (or TCP connections closed) by the AuthorizationPolicy-like allow list.
    pub rbac_denied: u64,
    /// Connections served by the TCP filter chain (opaque bytes echoed back).
    pub tcp_connections: u64,
    /// Bytes the TCP echo app received (and sent back).
    pub tcp_bytes: u64,
    /// Requests (and TCP connections) by the `source_*` labels Istio's stats would give them.
    pub sources: BTreeMap<crate::peer::Source, u64>,
}

/// Wakes whoever waits for a stats change. Shared by every counter of one mesh.
#[derive(Debug, Default)]
pub(crate) struct Changes(Notify);

impl Changes {
    pub(crate) fn bump(&self) {
        self.0.notify_waiters();
    }
    pub(crate) fn notify(&self) -> &Notify {
        &self.0
    }
}

/// A counter that announces its changes.
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    changes: Arc<Changes>,
}

impl Counter {
    pub(crate) fn new(changes: &Arc<Changes>) -> Self {
        Counter {
            value: AtomicU64::new(0),
            changes: changes.clone(),
        }
    }
    pub(crate) fn inc(&self) {
        self.value.fetch_add(1, Ordering::SeqCst);
        self.changes.bump();
    }
    pub(crate) fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::SeqCst);
        self.changes.bump();
    }
    pub(crate) fn dec(&self) {
        self.value.fetch_sub(1, Ordering::SeqCst);
        self.changes.bump();
    }
    pub(crate) fn get(&self) -> u64 {
        self.value.load(Ordering::SeqCst)
    }
}

/// Counts per attributed source, announcing changes like [`Counter`].
#[derive(Debug)]
pub(crate) struct SourceCounter {
    map: std::sync::Mutex<BTreeMap<crate::peer::Source, u64>>,
    changes: Arc<Changes>,
}

impl SourceCounter {
    pub(crate) fn new(changes: &Arc<Changes>) -> Self {
        SourceCounter {
            map: std::sync::Mutex::new(BTreeMap::new()),
            changes: changes.clone(),
        }
    }
    pub(crate) fn record(&self, source: crate::peer::Source) {
        *self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(source)
            .or_default() += 1;
        self.changes.bump();
    }
    fn snapshot(&self) -> BTreeMap<crate::peer::Source, u64> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Decrements a gauge when dropped, so every exit path of a connection task releases it.
pub(crate) struct GaugeGuard<'a>(&'a Counter);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(c: &'a Counter) -> Self {
        c.inc();
        GaugeGuard(c)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug)]
pub(crate) struct GatewayCounters {
    pub accepted: Counter,
    pub routed: Counter,
    pub refused: Counter,
    pub upstream_failures: Counter,
}

impl GatewayCounters {
    pub(crate) fn new(ch: &Arc<Changes>) -> Self {
        GatewayCounters {
            accepted: Counter::new(ch),
            routed: Counter::new(ch),
            refused: Counter::new(ch),
            upstream_failures: Counter::new(ch),
        }
    }
}

#[derive(Debug)]
pub(crate) struct PodCounters {
    pub tls_handshakes: Counter,
    pub tls_failures: Counter,
    pub connections_open: Counter,
    pub app_requests: Counter,
    pub rbac_denied: Counter,
    pub tcp_connections: Counter,
    pub tcp_bytes: Counter,
    pub sources: SourceCounter,
}

impl PodCounters {
    pub(crate) fn new(ch: &Arc<Changes>) -> Self {
        PodCounters {
            tls_handshakes: Counter::new(ch),
            tls_failures: Counter::new(ch),
            connections_open: Counter::new(ch),
            app_requests: Counter::new(ch),
            rbac_denied: Counter::new(ch),
            tcp_connections: Counter::new(ch),
            tcp_bytes: Counter::new(ch),
            sources: SourceCounter::new(ch),
        }
    }

    pub(crate) fn snapshot(&self) -> PodStats {
        PodStats {
            tls_handshakes: self.tls_handshakes.get(),
            tls_failures: self.tls_failures.get(),
            connections_open: self.connections_open.get(),
            app_requests: self.app_requests.get(),
            rbac_denied: self.rbac_denied.get(),
            tcp_connections: self.tcp_connections.get(),
            tcp_bytes: self.tcp_bytes.get(),
            sources: self.sources.snapshot(),
        }
    }
}

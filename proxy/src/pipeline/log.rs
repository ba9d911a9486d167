//! The access-log line and request metrics, written once per request when its response ends
//! (or the client goes away).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Uri};

use crate::policy::limits::Slot;
use crate::runtime::Generation;

/// Ids and shared values rather than strings: a request builds no label or log strings unless
/// the access log is enabled.
pub(super) struct AccessLog {
    pub gen: Arc<Generation>,
    pub conn: Arc<super::ConnInfo>,
    pub tenant: Option<usize>,
    pub service: Option<usize>,
    pub method: Method,
    pub authority: String,
    pub uri: Uri,
    /// A path to log instead of the URI's (for a head that could not be read).
    pub path_override: Option<&'static str>,
    pub request_id: HeaderValue,
    pub status: u16,
    pub reason: &'static str,
    pub started: Instant,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: u64,
    pub reused: Option<bool>,
    /// The tenant's concurrency slot, released with the log line when the response ends.
    pub slot: Option<Slot>,
}

impl AccessLog {
    pub fn finish(&self, completed: bool) {
        let duration = self.started.elapsed();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let gen = &self.gen;
        gen.metrics.requests_in_flight.dec();
        self.conn.last_done.store(crate::lifecycle::millis(), Ordering::Relaxed);
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        gen.request_metrics.record(
            &self.conn.listener,
            self.tenant,
            self.service,
            self.status,
            self.reason,
            duration,
            bytes_in,
            self.bytes_out,
        );
        tracing::info!(
            target: "access",
            listener = %self.conn.listener,
            client = %self.conn.client,
            tenant = self.tenant.map_or("-", |t| gen.tenants.get(t).name.as_str()),
            service = self.service.map_or("-", |s| gen.snapshot.services[s].name.as_str()),
            method = %self.method,
            authority = %self.authority,
            path = self.path_override.unwrap_or(self.uri.path()),
            status = self.status,
            reason = self.reason,
            duration_ms = duration.as_secs_f64() * 1000.0,
            bytes_in,
            bytes_out = self.bytes_out,
            upstream_conn = match self.reused { Some(true) => "reused", Some(false) => "new", None => "-" },
            completed,
            request_id = self.request_id.to_str().unwrap_or("-"),
        );
    }
}

/// One access-log line per tunnel (a TCP listener's connection), whatever way it ended.
pub(super) struct TunnelLog<'a> {
    pub listener: &'a str,
    pub client: SocketAddr,
    pub tenant: &'a str,
    pub service: &'a str,
    pub started: Instant,
    pub result: &'static str,
    /// Bytes towards the mesh, and towards the client.
    pub sent: u64,
    pub received: u64,
}

impl Drop for TunnelLog<'_> {
    fn drop(&mut self) {
        tracing::info!(
            target: "access",
            listener = self.listener,
            client = %self.client,
            tenant = self.tenant,
            service = self.service,
            protocol = "tcp",
            result = self.result,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in = self.sent,
            bytes_out = self.received,
        );
    }
}

//! Accept loops for VM-facing listeners: they accept, admit (connection limits, PROXY header)
//! and hand each request or tunnel to the pipeline. `http.rs` serves HTTP/1.1 and h2c on one
//! port; `tcp.rs` carries opaque TCP to one service; `h3.rs` serves HTTP/3 over QUIC.

pub mod h3;
pub mod http;
pub mod tcp;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::lifecycle::CloseSignal;
use crate::metrics::ListenerLabels;
use crate::runtime::{Generation, Runtime};

/// Counts a client connection (gauge, listener and global totals) until dropped: by the
/// connection's task, or by a tunnel the connection became.
pub(crate) struct ConnGauge {
    gauge: prometheus_client::metrics::gauge::Gauge,
    listener: Arc<AtomicUsize>,
    runtime: Arc<Runtime>,
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        self.gauge.dec();
        self.listener.fetch_sub(1, Ordering::SeqCst);
        self.runtime.client_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What every accept loop keeps about its listener.
pub(crate) struct Admission {
    pub runtime: Arc<Runtime>,
    pub name: Arc<str>,
    open_here: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Admission {
    pub fn new(runtime: Arc<Runtime>, name: Arc<str>) -> Admission {
        let gauge = runtime
            .metrics
            .downstream_connections
            .get_or_create(&ListenerLabels {
                listener: name.to_string(),
            })
            .clone();
        Admission {
            runtime,
            name,
            open_here: Arc::new(AtomicUsize::new(0)),
            gauge,
        }
    }

    /// Counts a just-accepted connection and checks it against `limits.max_connections` and
    /// the listener's own `max_connections`. Over either, it is counted as denied and `None` is
    /// returned: closing at once is the cheapest answer a flood can get; the LB retries
    /// elsewhere.
    pub fn admit(&self, gen: &Generation) -> Option<ConnGauge> {
        let here = self.open_here.fetch_add(1, Ordering::SeqCst);
        let total = self.runtime.client_connections.fetch_add(1, Ordering::SeqCst);
        self.gauge.inc();
        let guard = ConnGauge {
            gauge: self.gauge.clone(),
            listener: self.open_here.clone(),
            runtime: self.runtime.clone(),
        };
        let listener_max = gen
            .listener(&self.name)
            .and_then(|l| l.max_connections)
            .unwrap_or(usize::MAX);
        if total >= gen.snapshot.limits.max_connections || here >= listener_max {
            self.deny("connection_limit");
            return None;
        }
        Some(guard)
    }

    /// Counts a refused connection in `meshgate_denied_total`.
    pub fn deny(&self, reason: &str) {
        self.runtime.metrics.record_denied(&self.name, reason);
    }
}

/// Backs off briefly after a failed accept (EMFILE and friends) instead of spinning.
pub(crate) async fn accept_failed(name: &str, e: std::io::Error) {
    tracing::warn!(listener = %name, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// After the accept loop stopped: waits for the connections to finish until the drain
/// deadline, then cuts whatever is left.
pub(crate) async fn finish(name: &str, mut conns: JoinSet<()>, deadline: tokio::time::Instant) {
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, all_done).await.is_err() {
        tracing::warn!(listener = %name, remaining = conns.len(), "drain deadline passed; closing remaining connections");
    }
    conns.shutdown().await;
    tracing::info!(listener = %name, "listener closed");
}

/// Waits until the listener is told to close; the accept loops select on it.
pub(crate) async fn told_to_close(close: &mut CloseSignal) -> tokio::time::Instant {
    crate::lifecycle::closing(close).await.1
}

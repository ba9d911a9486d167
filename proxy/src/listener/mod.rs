//! Accept loops for VM-facing listeners. `http.rs` serves HTTP/1.1 and h2c on one port;
//! `tcp.rs` carries opaque TCP to one service; `h3.rs` serves HTTP/3 over QUIC.

pub mod framing;
pub mod h3;
pub mod http;
pub mod proxy_protocol;
pub mod tcp;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::lifecycle::{CloseSignal, ListenerState};
use crate::metrics::ListenerReasonLabels;

/// Counts a client connection (gauge, listener and global totals) until dropped: by the
/// connection's task, or by a tunnel the connection became.
pub(crate) struct ConnGauge {
    gauge: prometheus_client::metrics::gauge::Gauge,
    listener: Arc<AtomicUsize>,
    app: Arc<App>,
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        self.gauge.dec();
        self.listener.fetch_sub(1, Ordering::SeqCst);
        self.app.client_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a just-accepted connection and checks it against `limits.max_connections` and the
/// listener's own `max_connections`. Over either, it is counted as denied and `None` is
/// returned: closing at once is the cheapest answer a flood can get; the LB retries elsewhere.
pub(crate) fn admit_connection(
    app: &Arc<App>,
    name: &str,
    open_here: &Arc<AtomicUsize>,
    gauge: &prometheus_client::metrics::gauge::Gauge,
    snapshot: &crate::config::Snapshot,
) -> Option<ConnGauge> {
    let here = open_here.fetch_add(1, Ordering::SeqCst);
    let total = app.client_connections.fetch_add(1, Ordering::SeqCst);
    gauge.inc();
    let guard = ConnGauge {
        gauge: gauge.clone(),
        listener: open_here.clone(),
        app: app.clone(),
    };
    let listener_max = snapshot
        .listeners
        .iter()
        .find(|l| l.name == name)
        .and_then(|l| l.max_connections)
        .unwrap_or(usize::MAX);
    if total >= snapshot.limits.max_connections || here >= listener_max {
        deny(app, name, "connection_limit");
        return None;
    }
    Some(guard)
}

/// Counts a refused connection in `meshgate_denied_total`.
pub(crate) fn deny(app: &App, listener: &str, reason: &str) {
    app.metrics
        .denied
        .get_or_create(&ListenerReasonLabels {
            listener: listener.to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

/// Waits until the listener is told to close: (spread, deadline). If the app is gone, now.
pub(crate) async fn closing(rx: &mut CloseSignal) -> (Duration, tokio::time::Instant) {
    match rx.wait_for(|s| matches!(s, ListenerState::Closing { .. })).await {
        Ok(s) => match *s {
            ListenerState::Closing { spread, deadline } => (spread, deadline),
            ListenerState::Serving => unreachable!("waited for Closing"),
        },
        Err(_) => (Duration::ZERO, tokio::time::Instant::now()),
    }
}

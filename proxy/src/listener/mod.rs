//! Accept loops for VM-facing listeners: they accept, admit (connection limits, PROXY header)
//! and hand each request or tunnel to the pipeline. `http.rs` serves HTTP/1.1 and h2c on one
//! port; `tcp.rs` carries opaque TCP to one service; `h3.rs` serves HTTP/3 over QUIC.

pub mod h3;
pub mod http;
mod stall;
pub mod tcp;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::lifecycle::CloseSignal;
use crate::metrics::ListenerLabels;
use crate::runtime::{Generation, Runtime};

/// Counts a client connection (gauge, listener and global totals, and its source once known)
/// until dropped: by the connection's task, or by a tunnel the connection became.
pub(crate) struct ConnGauge {
    gauge: prometheus_client::metrics::gauge::Gauge,
    listener: Arc<AtomicUsize>,
    runtime: Arc<Runtime>,
    source: Option<SourceSlot>,
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        self.gauge.dec();
        self.listener.fetch_sub(1, Ordering::SeqCst);
        self.runtime.client_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One of a source address's `limits.max_connections_per_source` connections.
pub(crate) struct SourceSlot {
    ip: IpAddr,
    runtime: Arc<Runtime>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.runtime.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

pub use crate::runtime::PrefaceSlot;

/// What every accept loop keeps about its listener (cheap to clone into connection tasks).
#[derive(Clone)]
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
            source: None,
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

    /// Counts the connection against its source address's cap: the TCP peer, or the source a
    /// trusted load balancer's PROXY header names (then this runs after the header is read).
    /// Over the cap the connection is refused (counted as denied, `None`).
    pub fn admit_source(&self, gen: &Generation, guard: &mut ConnGauge, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let max = gen.snapshot.limits.max_connections_per_source;
        let mut m = self.runtime.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            drop(m);
            self.deny("source_connection_limit");
            return false;
        }
        *n += 1;
        drop(m);
        guard.source = Some(SourceSlot {
            ip,
            runtime: self.runtime.clone(),
        });
        true
    }

    /// A place among the connections still in their preface; when
    /// `limits.max_preface_connections` are, the oldest of them is asked to close (counted as
    /// denied, `preface_limit`).
    pub fn admit_preface(&self, gen: &Generation) -> PrefaceSlot {
        let (slot, evicted) =
            crate::runtime::Prefaces::enter(&self.runtime, gen.snapshot.limits.max_preface_connections);
        if evicted {
            self.deny("preface_limit");
        }
        slot
    }

    /// Counts a refused connection in `meshgate_denied_total`.
    pub fn deny(&self, reason: &str) {
        self.runtime.metrics.record_denied(&self.name, reason);
    }
}

/// A connection just accepted and admitted (connection limits, its source's cap unless a
/// trusted load balancer's PROXY header will name the source, a preface slot).
pub(crate) struct Accepted {
    pub stream: tokio::net::TcpStream,
    pub peer: std::net::SocketAddr,
    pub accepted_at: tokio::time::Instant,
    /// The config current at accept time.
    pub gen: Arc<Generation>,
    pub guard: ConnGauge,
    pub preface: PrefaceSlot,
    pub behind_lb: bool,
    pub runtime: Arc<Runtime>,
    pub admission: Admission,
    pub close: CloseSignal,
}

/// The accept loop every TCP listener kind shares: accept, admit, hand each connection to
/// `handle` on a task of its own; once told to close, stop accepting and let the connections
/// finish until the drain deadline.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    name: Arc<str>,
    runtime: Arc<Runtime>,
    mut close: CloseSignal,
    handle: F,
) where
    F: Fn(Accepted) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let admission = Admission::new(runtime.clone(), name.clone());
    let mut conns = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        accept_failed(&name, e).await;
                        continue;
                    }
                };
                let accepted_at = tokio::time::Instant::now();
                let gen = runtime.current();
                let Some(mut guard) = admission.admit(&gen) else {
                    continue;
                };
                // Counted by the PROXY header's source when a trusted load balancer sends one.
                let behind_lb = gen.listener(&name).is_some_and(|l| crate::proxy_protocol::trusts(l, peer));
                if !behind_lb && !admission.admit_source(&gen, &mut guard, peer.ip()) {
                    continue;
                }
                let preface = admission.admit_preface(&gen);
                let _ = stream.set_nodelay(true);
                conns.spawn(handle(Accepted {
                    stream,
                    peer,
                    accepted_at,
                    gen,
                    guard,
                    preface,
                    behind_lb,
                    runtime: runtime.clone(),
                    admission: admission.clone(),
                    close: close.clone(),
                }));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            deadline = told_to_close(&mut close) => break deadline,
        }
    };
    drop(listener);
    finish(&name, conns, deadline).await;
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

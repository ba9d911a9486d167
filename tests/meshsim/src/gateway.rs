//! The east-west gateway in `AUTO_PASSTHROUGH` mode (istio-wire §1): routes each TCP connection
//! on the ClientHello's SNI and ALPN without terminating TLS, to one pod's sidecar.
//!
//! Owns: the SNI routing table (one entry per service/port and per service/port/subset), the
//! per-connection pod choice (least open connections, round-robin among ties, like Envoy's
//! LEAST_REQUEST on a `tcp_proxy` cluster), and the byte splice with half-close and idle timeout.
//! A hello that matches no filter chain is answered by closing the TCP connection: no TLS alert,
//! since the gateway never speaks TLS itself (§1.2).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::hello::{parse_client_hello, ClientHelloInfo, HelloError, MAX_CLIENT_HELLO};
use crate::spec::ISTIO_MTLS_ALPNS;
use crate::stats::GatewayCounters;

/// How long the gateway waits for a complete ClientHello before closing. Envoy's
/// `listener_filters_timeout` default is 15 s; meshsim is a little stricter.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Dial timeout to a sidecar (Istio's default cluster `connect_timeout` is 10 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `tcp_proxy` default idle timeout: 1 hour without bytes in either direction.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const SPLICE_BUF: usize = 64 * 1024;

/// One pod as the gateway sees it: an endpoint of one or more SNI clusters.
#[derive(Debug)]
pub(crate) struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Cleared when the pod is stopped: EDS no longer lists it.
    pub alive: AtomicBool,
    /// Upstream connections the gateway holds to this pod (the LB's view, not the pod's).
    open: AtomicU64,
}

impl Backend {
    pub(crate) fn new(name: &str, addr: SocketAddr) -> Self {
        Backend {
            name: name.to_string(),
            addr,
            alive: AtomicBool::new(true),
            open: AtomicU64::new(0),
        }
    }
}

/// The endpoints behind one SNI name.
#[derive(Debug)]
pub(crate) struct Route {
    backends: Vec<Arc<Backend>>,
    // Round-robin cursor; the lock also makes "choose + count" atomic so concurrent connections
    // see each other's choices.
    cursor: Mutex<usize>,
}

impl Route {
    pub(crate) fn new(backends: Vec<Arc<Backend>>) -> Self {
        Route {
            backends,
            cursor: Mutex::new(0),
        }
    }

    /// Least open connections among live backends, round-robin among ties. The returned guard
    /// holds one "open connection" on the chosen backend.
    fn pick(&self) -> Option<OpenGuard> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let live: Vec<&Arc<Backend>> = self
            .backends
            .iter()
            .filter(|b| b.alive.load(Ordering::SeqCst))
            .collect();
        let min = live.iter().map(|b| b.open.load(Ordering::SeqCst)).min()?;
        let start = *cursor % live.len();
        *cursor = cursor.wrapping_add(1);
        let chosen = (0..live.len())
            .map(|i| live[(start + i) % live.len()])
            .find(|b| b.open.load(Ordering::SeqCst) == min)?;
        chosen.open.fetch_add(1, Ordering::SeqCst);
        Some(OpenGuard(chosen.clone()))
    }
}

struct OpenGuard(Arc<Backend>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Routing table and counters, shared by all gateway connections (and kept across restarts).
#[derive(Debug)]
pub(crate) struct GatewayShared {
    pub routes: HashMap<String, Route>,
    pub counters: GatewayCounters,
}

fn offers_istio_alpn(info: &ClientHelloInfo) -> bool {
    info.alpn
        .iter()
        .any(|p| ISTIO_MTLS_ALPNS.iter().any(|a| a.as_bytes() == p.as_slice()))
}

/// Handles one accepted TCP connection, until both directions are done.
pub(crate) async fn serve_connection(gw: Arc<GatewayShared>, mut down: TcpStream, peer: SocketAddr) {
    gw.counters.accepted.inc();
    let _ = down.set_nodelay(true);

    let (hello_bytes, info) = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut down)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return refuse(&gw, down, peer, &e.to_string()).await,
        Err(_) => return refuse(&gw, down, peer, "ClientHello timeout").await,
    };
    // A filter chain matches only on SNI *and* an Istio ALPN (§1.2); exact, case-sensitive SNI.
    let route = match info.sni.as_deref().and_then(|sni| gw.routes.get(sni)) {
        Some(r) => r,
        None => return refuse(&gw, down, peer, "no filter chain for SNI").await,
    };
    if !offers_istio_alpn(&info) {
        return refuse(&gw, down, peer, "no Istio ALPN").await;
    }

    let Some(open) = route.pick() else {
        tracing::debug!(%peer, sni = ?info.sni, "no live endpoint");
        gw.counters.upstream_failures.inc();
        return;
    };
    let backend = open.0.clone();
    let mut up = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, pod = %backend.name, error = %e, "dial failed");
            gw.counters.upstream_failures.inc();
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, pod = %backend.name, "dial timed out");
            gw.counters.upstream_failures.inc();
            return;
        }
    };
    let _ = up.set_nodelay(true);
    gw.counters.routed.inc();
    tracing::debug!(%peer, pod = %backend.name, sni = ?info.sni, "routed");
    match tokio::time::timeout(IDLE_TIMEOUT, up.write_all(&hello_bytes)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    splice(down, up, IDLE_TIMEOUT).await;
    drop(open);
}

async fn refuse(gw: &GatewayShared, mut down: TcpStream, peer: SocketAddr, why: &str) {
    tracing::debug!(%peer, reason = why, "refused");
    gw.counters.refused.inc();
    // FIN, not RST and no alert: what Envoy does when no filter chain matches.
    let _ = tokio::time::timeout(Duration::from_secs(1), down.shutdown()).await;
}

#[derive(Debug, thiserror::Error)]
enum ReadHelloError {
    #[error("connection closed before a full ClientHello")]
    Eof,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Hello(#[from] HelloError),
}

/// Buffers bytes until they hold one complete ClientHello (bounded by [`MAX_CLIENT_HELLO`] plus
/// record headers). Returns the buffered bytes, to be replayed to the sidecar verbatim.
async fn read_hello(s: &mut TcpStream) -> Result<(Vec<u8>, ClientHelloInfo), ReadHelloError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(ReadHelloError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(info) = parse_client_hello(&buf)? {
            return Ok((buf, info));
        }
        if buf.len() > MAX_CLIENT_HELLO + 64 * 5 {
            return Err(HelloError::TooLarge.into());
        }
    }
}

/// Last time any byte moved, shared by both directions so a long one-way transfer keeps the
/// other direction alive (Envoy's idle timeout counts activity in either direction).
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// Copies both ways. EOF on one side is passed on as a half-close (FIN) to the other, and the
/// other direction keeps flowing; an error in either direction ends both.
async fn splice(down: TcpStream, up: TcpStream, idle: Duration) {
    let activity = Activity {
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    let d2u = pump(dr, uw, &activity, idle);
    let u2d = pump(ur, dw, &activity, idle);
    tokio::pin!(d2u, u2d);
    let (mut d2u_done, mut u2d_done) = (false, false);
    while !(d2u_done && u2d_done) {
        tokio::select! {
            r = &mut d2u, if !d2u_done => {
                if r.is_err() { return; }
                d2u_done = true;
            }
            r = &mut u2d, if !u2d_done => {
                if r.is_err() { return; }
                u2d_done = true;
            }
        }
    }
}

async fn pump(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, activity: &Activity, idle: Duration) -> io::Result<()> {
    let mut buf = vec![0u8; SPLICE_BUF];
    loop {
        let n = match tokio::time::timeout(idle, r.read(&mut buf)).await {
            Ok(res) => res?,
            Err(_) if activity.idle_for() < idle => continue,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        activity.touch();
        match tokio::time::timeout(idle, w.write_all(&buf[..n])).await {
            Ok(res) => res?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
        activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str) -> Arc<Backend> {
        Arc::new(Backend::new(name, "127.0.0.1:1".parse().unwrap()))
    }

    #[test]
    fn least_open_then_round_robin() {
        let (a, b, c) = (backend("a"), backend("b"), backend("c"));
        let route = Route::new(vec![a.clone(), b.clone(), c.clone()]);
        // Held connections: each new one goes to an empty backend.
        let g1 = route.pick().unwrap();
        let g2 = route.pick().unwrap();
        let g3 = route.pick().unwrap();
        let mut names = vec![g1.0.name.clone(), g2.0.name.clone(), g3.0.name.clone()];
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        // Release b: the next one must go to b.
        let held_b = [g1, g2, g3].into_iter().filter(|g| g.0.name != "b").collect::<Vec<_>>();
        assert_eq!(route.pick().unwrap().0.name, "b");
        drop(held_b);
        // Short-lived connections rotate.
        let seq: Vec<String> = (0..3).map(|_| route.pick().unwrap().0.name.clone()).collect();
        let mut sorted = seq.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c"]);
        // Dead backends are skipped; no live backend gives None.
        a.alive.store(false, Ordering::SeqCst);
        b.alive.store(false, Ordering::SeqCst);
        assert_eq!(route.pick().unwrap().0.name, "c");
        c.alive.store(false, Ordering::SeqCst);
        assert!(route.pick().is_none());
    }
}

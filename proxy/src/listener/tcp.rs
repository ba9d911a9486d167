//! TCP listeners (`protocol: tcp`): every accepted connection is authorized by its source (the
//! PROXY header's, behind a trusted load balancer), then carried as opaque bytes to the
//! listener's service over an mTLS connection of its own through the gateway, with ALPN `istio`
//! only (istio-wire.md §0, §2.5). One upstream connection per client connection, as Envoy's
//! `tcp_proxy` does: there is nothing to multiplex in a byte stream.
//!
//! Half-close is passed on both ways (a client's shutdown of its sending side reaches the
//! service as EOF while replies keep flowing), backpressure is the socket buffers', and a
//! connection with no byte moving either way for the listener's `idle_timeout` is closed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::app::App;
use crate::error::ProxyError;
use crate::lifecycle::CloseSignal;
use crate::listener::proxy_protocol::{self, Prefixed};
use crate::listener::{admit_connection, closing, deny};
use crate::metrics::{BytesLabels, ListenerLabels, ServiceReasonLabels};
use crate::upstream::hbone::dedicated;

/// Serves `listener` until told to close; connections still open at the drain deadline are cut
/// (a byte stream has no way to ask the client to finish).
pub async fn serve(listener: TcpListener, name: Arc<str>, app: Arc<App>, mut close: CloseSignal) {
    let open_here = Arc::new(AtomicUsize::new(0));
    let gauge = app
        .metrics
        .downstream_connections
        .get_or_create(&ListenerLabels {
            listener: name.to_string(),
        })
        .clone();
    let mut conns = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let proxy = app.proxy();
                let cfg = proxy.snapshot.listeners.iter().find(|l| *l.name == *name).cloned();
                let Some(guard) = admit_connection(&app, &name, &open_here, &gauge, &proxy.snapshot) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (app2, name2) = (app.clone(), name.clone());
                conns.spawn(async move {
                    let _guard = guard;
                    handle(&app2, &proxy, &name2, cfg, stream, peer).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (_, deadline) = closing(&mut close) => break deadline,
        }
    };
    drop(listener);
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, all_done).await.is_err() {
        tracing::warn!(listener = %name, remaining = conns.len(), "drain deadline passed; cutting TCP connections");
    }
    conns.shutdown().await;
    tracing::info!(listener = %name, "listener closed");
}

/// `proxy` is the config current at accept time: the listener's service index belongs to it,
/// so a reload while the PROXY header is read cannot point the connection elsewhere.
async fn handle(
    app: &App,
    proxy: &crate::forward::Proxy,
    name: &str,
    cfg: Option<crate::config::Listener>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let (client, vpce, prefix) = match proxy_protocol::admit(&mut stream, cfg.as_ref(), peer).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(listener = %name, %peer, error = %e, "PROXY header rejected; closing");
            deny(app, name, "bad_proxy_header");
            return;
        }
    };
    let snap = &proxy.snapshot;
    let Some(service_id) = cfg.as_ref().and_then(|l| l.service) else {
        return;
    };
    let service = &snap.services[service_id];
    let idle = cfg.as_ref().map_or(Duration::from_secs(3600), |l| l.idle_timeout);
    let mut log = TcpLog {
        listener: name,
        client,
        tenant: "-",
        service: &service.name,
        started,
        result: "",
        sent: 0,
        received: 0,
    };
    let tenant_id = match snap.tenants.authorize(client.ip(), None, vpce.as_deref()) {
        Ok(t) if snap.tenants.allows(t, service_id) => t,
        Ok(t) => {
            log.tenant = &snap.tenants.get(t).name;
            log.result = ProxyError::Policy(crate::policy::Deny::ServiceNotAllowed).reason();
            deny(app, name, log.result);
            return;
        }
        Err(d) => {
            log.result = ProxyError::Policy(d).reason();
            deny(app, name, log.result);
            return;
        }
    };
    let tenant = snap.tenants.get(tenant_id);
    log.tenant = &tenant.name;
    let pool = proxy.upstream.pool(tenant.identity, service);
    let upstream = match dedicated(pool, &proxy.upstream.gateway, pool.tls(), &snap.upstream, client).await {
        Ok(io) => io,
        Err(e) => {
            let reason = ProxyError::Upstream(e.clone()).reason();
            tracing::warn!(service = %service.name, error = %e, "upstream connect failed");
            app.metrics
                .upstream_errors
                .get_or_create(&ServiceReasonLabels {
                    service: service.name.clone(),
                    reason: reason.to_string(),
                })
                .inc();
            log.result = reason;
            return;
        }
    };
    let (result, sent, received) = splice(Prefixed::new(prefix, stream), upstream, idle).await;
    log.result = result;
    log.sent = sent;
    log.received = received;
    count_bytes(app, &service.name, sent, received);
}

/// Adds a connection's bytes to `meshgate_bytes_total` (upstream = towards the mesh).
pub(crate) fn count_bytes(app: &App, service: &str, sent: u64, received: u64) {
    count_bytes_to(&app.metrics, service, sent, received);
}

pub(crate) fn count_bytes_to(metrics: &crate::metrics::Metrics, service: &str, sent: u64, received: u64) {
    for (direction, n) in [("upstream", sent), ("downstream", received)] {
        metrics
            .bytes
            .get_or_create(&BytesLabels {
                service: service.to_string(),
                direction: direction.into(),
            })
            .inc_by(n);
    }
}

/// Copies bytes both ways, passing each side's EOF on as a half-close, until both directions
/// are done or nothing has moved for `idle`. Returns how it ended and the bytes sent to the
/// upstream and to the client.
pub(crate) async fn splice<C, U>(client: C, upstream: U, idle: Duration) -> (&'static str, u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut down = Counted::new(client, activity.clone());
    let mut up = Counted::new(upstream, activity.clone());
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut down, &mut up) => match r {
            Ok(_) => "closed",
            Err(e) => {
                tracing::debug!(error = %e, "TCP stream ended with error");
                "error"
            }
        },
        _ = activity.idle_for(idle) => "idle_timeout",
    };
    (result, up.written, down.written)
}

/// One access-log line per TCP connection, whatever way it ended.
struct TcpLog<'a> {
    listener: &'a str,
    client: SocketAddr,
    tenant: &'a str,
    service: &'a str,
    started: Instant,
    result: &'static str,
    /// Bytes towards the mesh, and towards the client.
    sent: u64,
    received: u64,
}

impl Drop for TcpLog<'_> {
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

/// When a byte last moved on either side of a connection.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = last.elapsed();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// A stream that counts the bytes written into it and marks activity on every read or write.
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
    written: u64,
}

impl<S> Counted<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Self {
        Counted {
            inner,
            activity,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

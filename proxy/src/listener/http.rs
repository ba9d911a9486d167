//! The HTTP listener: HTTP/1.1 (keep-alive, chunked, `Expect: 100-continue`) and h2c with prior
//! knowledge on the same port, via hyper-util's protocol sniffing. Each request goes to
//! `pipeline::handle` with the config snapshot current when it arrived.
//!
//! Closing (drain, or the listener removed by a reload): stop accepting; ask each connection to
//! finish (GOAWAY / `Connection: close`) at a random moment within the spread; cut whatever is
//! left at the deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::{accept_failed, finish, framing, told_to_close, Admission};
use crate::config::Limits;
use crate::error::ProxyError;
use crate::io::Prefixed;
use crate::lifecycle::CloseSignal;
use crate::pipeline::{self, ClientUpgrade, ConnInfo};
use crate::proxy_protocol;
use crate::runtime::Runtime;

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        // Slow clients (slowloris) must not hold a connection slot by trickling headers.
        .header_read_timeout(limits.header_read_timeout);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        // Rapid reset (CVE-2023-44487): h2 counts streams the client resets before we answer
        // and closes the connection with ENHANCE_YOUR_CALM past this many pending at once.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        // RFC 8441: lets HTTP/2 clients open WebSockets (extended CONNECT).
        .enable_connect_protocol();
    b
}

/// Serves `listener` until told to close.
pub async fn serve(listener: TcpListener, name: Arc<str>, runtime: Arc<Runtime>, mut close: CloseSignal) {
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
                let gen = runtime.current();
                let Some(guard) = admission.admit(&gen) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let listener_cfg = gen.listener(&name).cloned();
                let limits = &gen.snapshot.limits;
                let builder = builder(limits);
                let (max_head, max_headers) = (limits.max_header_bytes, limits.max_headers);
                let runtime = runtime.clone();
                let name = name.clone();
                let close = close.clone();
                conns.spawn(async move {
                    // Shared with any tunnel this connection becomes (CONNECT, WebSocket).
                    let guard = Arc::new(guard);
                    let mut stream = stream;
                    let (client, vpce, prefix) = match proxy_protocol::admit(&mut stream, listener_cfg.as_ref(), peer).await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(listener = %name, %peer, error = %e, "PROXY header rejected; closing");
                            runtime.metrics.record_denied(&name, "bad_proxy_header");
                            return;
                        }
                    };
                    let mut info = ConnInfo::new(name.clone(), client, vpce);
                    info.lifetime = Some(guard.clone());
                    info.close = Some(close.clone());
                    let info = Arc::new(info);
                    let verdicts = Arc::new(framing::Verdicts::default());
                    serve_connection(runtime, info, listener_cfg, builder, stream, prefix, (max_head, max_headers), verdicts, close).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            deadline = told_to_close(&mut close) => break deadline,
        }
    };
    drop(listener);
    finish(&name, conns, deadline).await;
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    runtime: Arc<Runtime>,
    info: Arc<ConnInfo>,
    listener_cfg: Option<crate::config::Listener>,
    builder: auto::Builder<TokioExecutor>,
    stream: tokio::net::TcpStream,
    prefix: bytes::Bytes,
    (max_head, max_headers): (usize, usize),
    verdicts: Arc<framing::Verdicts>,
    mut close: CloseSignal,
) {
    let peer = info.client;
    let conn_info = info.clone();
    let alt_svc = listener_cfg.as_ref().and_then(|l| l.alt_svc.clone());
    let watcher = verdicts.clone();
    let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let gen = runtime.current();
        let h1 = req.version() < http::Version::HTTP_2;
        let refusal = if h1 { watcher.next_refusal() } else { None };
        let upgrade = (req.method() == http::Method::CONNECT || req.headers().contains_key(http::header::UPGRADE))
            .then(|| ClientUpgrade::hyper(&mut req));
        let conn_info = conn_info.clone();
        let alt_svc = alt_svc.clone();
        async move {
            let mut r = match refusal {
                Some(why) => pipeline::refuse(&gen, &conn_info, &req, ProxyError::Malformed(why)),
                None => pipeline::handle(gen, conn_info, req, upgrade).await,
            };
            if let Some(v) = alt_svc {
                r.headers_mut().insert(http::header::ALT_SVC, v);
            }
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let scanner = framing::Scanner::new(max_head, max_headers);
    // The watcher must see the bytes read along with the PROXY header too.
    let stream = Prefixed::new(prefix, stream);
    let io = TokioIo::new(framing::Watched::new(stream, scanner, verdicts));
    // With upgrades: CONNECT tunnels take the connection over after their 200.
    let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
    tokio::pin!(conn);
    let deadline = tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(client = %peer, error = %e, "client connection ended with error");
            }
            return;
        }
        deadline = crate::lifecycle::closing_spread(&mut close) => deadline,
    };
    info.closing.store(true, Ordering::SeqCst);
    let h1_in_use = !info.is_h2.load(Ordering::Relaxed) && info.requests.load(Ordering::Relaxed) > 0;
    if h1_in_use {
        // Closing an idle keep-alive connection races the client's next request; instead its
        // next response says `Connection: close`. Only a connection still idle at the deadline
        // is closed under it.
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(client = %peer, error = %e, "client connection ended with error while closing");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    // HTTP/2: GOAWAY, streams in flight finish. HTTP/1.1: closes once idle.
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(client = %peer, error = %e, "client connection ended with error while closing");
    }
}

//! The HTTP listener: HTTP/1.1 (keep-alive, chunked, `Expect: 100-continue`) and h2c with prior
//! knowledge on the same port, via hyper-util's protocol sniffing. Each request goes to
//! `forward::handle` with the config snapshot current when it arrived.
//!
//! Closing (drain, or the listener removed by a reload): stop accepting; ask each connection to
//! finish (GOAWAY / `Connection: close`) at a random moment within the spread; cut whatever is
//! left at the deadline.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::app::App;
use crate::forward::{self, ConnInfo};
use crate::lifecycle::CloseSignal;
use crate::listener::framing;
use crate::listener::proxy_protocol;
use crate::listener::{admit_connection, closing, deny};

use crate::config::Limits;
use crate::metrics::ListenerLabels;
use std::sync::atomic::AtomicUsize;

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
pub async fn serve(listener: TcpListener, name: Arc<str>, app: Arc<App>, mut close: CloseSignal) {
    let open_here = Arc::new(AtomicUsize::new(0));
    let mut conns = JoinSet::new();
    let gauge = app
        .metrics
        .downstream_connections
        .get_or_create(&ListenerLabels {
            listener: name.to_string(),
        })
        .clone();
    let deadline = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let proxy = app.proxy();
                let limits = &proxy.snapshot.limits;
                let listener_cfg = proxy.snapshot.listeners.iter().find(|l| *l.name == *name).cloned();
                let Some(guard) = admit_connection(&app, &name, &open_here, &gauge, &proxy.snapshot) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let builder = builder(limits);
                let (max_head, max_headers) = (limits.max_header_bytes, limits.max_headers);
                let app2 = app.clone();
                let name2 = name.clone();
                let mut close = close.clone();
                conns.spawn(async move {
                    // Shared with any tunnel this connection becomes (CONNECT, WebSocket).
                    let guard = Arc::new(guard);
                    let mut stream = stream;
                    let (client, vpce, prefix) = match proxy_protocol::admit(&mut stream, listener_cfg.as_ref(), peer).await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(listener = %name2, %peer, error = %e, "PROXY header rejected; closing");
                            deny(&app2, &name2, "bad_proxy_header");
                            return;
                        }
                    };
                    let mut info = ConnInfo::new(name2, client, vpce);
                    info.lifetime = Some(guard.clone());
                    info.close = Some(close.clone());
                    let info = Arc::new(info);
                    let conn_info = info.clone();
                    let alt_svc = listener_cfg.as_ref().and_then(|l| l.alt_svc.clone());
                    let svc = service_fn(move |req| {
                        let response = forward::handle(app2.proxy(), conn_info.clone(), req);
                        let alt_svc = alt_svc.clone();
                        async move {
                            let mut r = response.await?;
                            if let Some(v) = alt_svc {
                                r.headers_mut().insert(http::header::ALT_SVC, v);
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let scanner = framing::Scanner::new(max_head, max_headers);
                    // The watcher must see the bytes read along with the PROXY header too.
                    let stream = proxy_protocol::Prefixed::new(prefix, stream);
                    let io = TokioIo::new(framing::Watched::new(stream, scanner, info.framing.clone()));
                    // With upgrades: CONNECT tunnels take the connection over after their 200.
                    let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
                    tokio::pin!(conn);
                    let asked = async {
                        let (spread, deadline) = closing(&mut close).await;
                        let wait = if spread.is_zero() {
                            Duration::ZERO
                        } else {
                            spread.mul_f64(rand::rng().random_range(0.0..1.0))
                        };
                        tokio::time::sleep(wait).await;
                        deadline
                    };
                    let deadline = tokio::select! {
                        res = conn.as_mut() => {
                            if let Err(e) = res {
                                tracing::debug!(client = %peer, error = %e, "client connection ended with error");
                            }
                            return;
                        }
                        deadline = asked => deadline,
                    };
                    info.closing.store(true, std::sync::atomic::Ordering::SeqCst);
                    let h1_in_use = !info.is_h2.load(std::sync::atomic::Ordering::Relaxed)
                        && info.requests.load(std::sync::atomic::Ordering::Relaxed) > 0;
                    if h1_in_use {
                        // Closing an idle keep-alive connection races the client's next request;
                        // instead its next response says `Connection: close`. Only a connection
                        // still idle at the deadline is closed under it.
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
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (_, deadline) = closing(&mut close) => break deadline,
        }
    };
    drop(listener);
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline, all_done).await.is_err() {
        tracing::warn!(listener = %name, remaining = conns.len(), "drain deadline passed; closing remaining connections");
    }
    conns.shutdown().await;
    tracing::info!(listener = %name, "listener closed");
}

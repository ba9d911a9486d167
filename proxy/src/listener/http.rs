//! The HTTP listener: HTTP/1.1 (keep-alive, chunked, `Expect: 100-continue`) and h2c with prior
//! knowledge on the same port, via hyper-util's protocol sniffing. Each request goes to
//! `forward::handle`. On shutdown the listener stops accepting, asks every connection to finish
//! (GOAWAY / `Connection: close`) and waits up to a deadline before cutting what remains.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::forward::{self, ConnInfo, Proxy};

fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        // Slow or idle clients must not hold a connection slot forever before sending headers.
        .header_read_timeout(Duration::from_secs(30));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Serves `listener` until `shutdown` turns true, then drains for at most `drain_deadline`.
pub async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
    drain_deadline: Duration,
) {
    let builder = builder();
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
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
                let _ = stream.set_nodelay(true);
                let info = Arc::new(ConnInfo { listener: name.clone(), client: peer });
                let proxy = proxy.clone();
                let svc = service_fn(move |req| forward::handle(proxy.clone(), info.clone(), req));
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(client = %peer, error = %e, "client connection ended with error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain_deadline) => {
            tracing::warn!(listener = %name, remaining = conns.len(), "drain deadline passed; closing remaining connections");
        }
    }
    conns.shutdown().await;
}

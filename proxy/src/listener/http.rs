//! The HTTP listener: HTTP/1.1 (meshgate's own server, `h1`) and h2c with prior knowledge
//! (hyper's HTTP/2 server) on the same port, told apart by the first bytes: the HTTP/2
//! connection preface, or anything else. Each request goes to `pipeline::handle` with the
//! config generation current when it arrived.
//!
//! Closing (drain, or the listener removed by a reload): stop accepting; ask each connection to
//! finish (GOAWAY / `Connection: close`) at a random moment within the spread; cut whatever is
//! left at the deadline.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use tokio::time::Instant;

use super::Accepted;
use crate::config::Limits;
use crate::h1::{self, buf::ReadBuf};
use crate::io::Prefixed;
use crate::lifecycle::CloseSignal;
use crate::pipeline::{self, ClientUpgrade, ConnInfo};
use crate::proxy_protocol;
use crate::runtime::Runtime;

/// The HTTP/2 connection preface (RFC 9113 §3.4): what an h2c client with prior knowledge sends
/// first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_builder(limits: &Limits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        // Rapid reset (CVE-2023-44487): h2 counts streams the client resets before we answer
        // and closes the connection with ENHANCE_YOUR_CALM past this many pending at once.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024))
        // No keep-alive PINGs: requests and bodies moving are what keep a connection
        // (`idle_timeout`, `body_idle_timeout`), and hyper's pinger cost every connection a
        // timer, a shared recorder locked on each frame, and about 300 bytes.
        // RFC 8441: lets HTTP/2 clients open WebSockets (extended CONNECT).
        .enable_connect_protocol();
    b
}

/// Serves `listener` until told to close.
pub async fn serve(listener: TcpListener, name: Arc<str>, runtime: Arc<Runtime>, close: CloseSignal) {
    super::accept_loop(listener, name, runtime, close, |conn| {
        ConnTask::Setup(Box::pin(setup(conn)))
    })
    .await;
}

/// A connection's task: its setup, boxed and freed once it is done, then the protocol's
/// server. Not an `async` block, which would keep the `Accepted` it was given (240 bytes) for
/// the connection's whole life.
enum ConnTask {
    Setup(std::pin::Pin<Box<dyn Future<Output = Option<Server>> + Send>>),
    Serving(Server),
}

impl Future for ConnTask {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        loop {
            match &mut *self {
                ConnTask::Setup(setup) => match std::task::ready!(setup.as_mut().poll(cx)) {
                    Some(server) => *self = ConnTask::Serving(server),
                    None => return std::task::Poll::Ready(()),
                },
                ConnTask::Serving(server) => return server.as_mut().poll(cx),
            }
        }
    }
}

/// A connection's protocol server, boxed: the connection's task is then as small as the
/// sniff needs, neither sized by hyper's HTTP/2 state nor, for h2c, by the HTTP/1.1 server's.
type Server = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The PROXY header (behind a trusted load balancer) and the protocol sniff, both due within
/// the header read timeout of the accept; then the server for the protocol the client speaks,
/// or `None` if the connection ends here.
async fn setup(conn: Accepted) -> Option<Server> {
    let Accepted {
        mut stream,
        peer,
        accepted_at,
        gen,
        mut guard,
        preface,
        behind_lb,
        runtime,
        admission,
        close,
    } = conn;
    let name = admission.name.clone();
    let listener_cfg = gen.listener(&name);
    let limits = gen.snapshot.limits.clone();
    let deadline = accepted_at + limits.header_read_timeout;
    let evicted = preface.evicted();
    tokio::pin!(evicted);
    let admitted = tokio::select! {
        a = tokio::time::timeout_at(deadline, proxy_protocol::admit(&mut stream, listener_cfg, peer)) => a,
        _ = &mut evicted => return None,
    };
    let (client, vpce, prefix) = match admitted {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(listener = %name, %peer, error = %e, "PROXY header rejected; closing");
            runtime.metrics.record_denied(&name, "bad_proxy_header");
            return None;
        }
        Err(_) => {
            runtime.metrics.record_denied(&name, "bad_proxy_header");
            return None;
        }
    };
    if behind_lb && !admission.admit_source(&gen, &mut guard, client.ip()) {
        return None;
    }
    // Shared with any tunnel this connection becomes (CONNECT, WebSocket).
    let guard = Arc::new(guard);
    let mut info = ConnInfo::new(name.clone(), client, vpce);
    info.lifetime = Some(guard);
    info.close = Some(close.clone());
    let info = Arc::new(info);
    let alt_svc = listener_cfg.and_then(|l| l.alt_svc.clone());
    let body_idle_timeout = gen.snapshot.upstream.body_idle_timeout;
    let mut rbuf = ReadBuf::with(&prefix);
    let sniffed = tokio::select! {
        s = sniff(&stream, &mut rbuf, deadline) => s,
        _ = &mut evicted => None,
    };
    match sniffed? {
        true => {
            let prefix = bytes::Bytes::copy_from_slice(rbuf.pending());
            drop(rbuf);
            let io = Prefixed::new(prefix, stream);
            Some(Box::pin(serve_h2(
                runtime,
                info,
                &limits,
                io,
                alt_svc,
                close,
                preface,
                accepted_at,
            )))
        }
        false => {
            let settings = h1::Settings {
                limits: h1::HeadLimits {
                    max_head: limits.max_header_bytes,
                    max_headers: limits.max_headers,
                },
                max_request_body: limits.max_request_body,
                header_read_timeout: limits.header_read_timeout,
                idle_timeout: limits.idle_timeout,
                body_idle_timeout,
                alt_svc,
            };
            Some(Box::pin(h1::serve(
                stream,
                rbuf,
                runtime,
                info,
                close,
                settings,
                accepted_at,
                preface,
            )))
        }
    }
}

/// Reads until the first bytes say which protocol the client speaks: `Some(true)` for the
/// HTTP/2 preface, `Some(false)` for anything else (HTTP/1.1, whose server judges it), `None`
/// if the client closed or sent nothing decisive before `deadline`.
async fn sniff(stream: &TcpStream, rbuf: &mut ReadBuf, deadline: Instant) -> Option<bool> {
    loop {
        let have = rbuf.pending();
        if !have.is_empty() {
            let n = have.len().min(H2_PREFACE.len());
            if have[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
        }
        tokio::select! {
            r = stream.readable() => {
                r.ok()?;
                match stream.try_read_buf(rbuf.spare(64)) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if rbuf.is_empty() {
                            rbuf.release();
                        }
                    }
                    Err(_) => return None,
                }
            }
            // Nothing decisive in time: the HTTP/1.1 server owns the verdict (408 for part of
            // a head) only if something arrived.
            _ = tokio::time::sleep_until(deadline) => return (!rbuf.is_empty()).then_some(false),
        }
    }
}

/// An h2c connection (prior knowledge), served by hyper's HTTP/2 server. Its first request
/// must arrive within the header read timeout of the accept, and it is closed (GOAWAY) once
/// it has had no request in flight for `limits.idle_timeout`: pings alone do not keep it.
///
/// Not an `async fn`, which would keep a copy of every argument beside the locals made from
/// them for the connection's whole life; and one timer serves the deadlines, the drain spread
/// and the stalled-body sweep, which runs only while a body streams.
#[allow(clippy::too_many_arguments)]
fn serve_h2(
    runtime: Arc<Runtime>,
    info: Arc<ConnInfo>,
    limits: &Limits,
    io: Prefixed<TcpStream>,
    alt_svc: Option<http::HeaderValue>,
    mut close: CloseSignal,
    preface: super::PrefaceSlot,
    accepted: Instant,
) -> impl Future<Output = ()> + Send + 'static {
    // Boxed and dropped at the first request, with the share of the slot it holds.
    let evicted = Box::pin(preface.evicted());
    *info.preface.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(preface));
    let conn_info = info.clone();
    let body_idle = runtime.current().snapshot.upstream.body_idle_timeout;
    let watch = super::stall::Watch::default();
    let watched = watch.clone();
    let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let gen = runtime.current();
        // Extended CONNECT (RFC 8441) takes the stream over after its 2xx.
        let upgrade = (req.method() == http::Method::CONNECT).then(|| ClientUpgrade::hyper(&mut req));
        let conn_info = conn_info.clone();
        let alt_svc = alt_svc.clone();
        let watched = watched.clone();
        // Boxed where it is made: hyper moves the service's future into its stream state and
        // then into a task of its own, and each move of the request's whole state was a
        // `memmove` of kilobytes per request.
        Box::pin(async move {
            let mut r = pipeline::handle(gen, conn_info, req, upgrade).await;
            if let Some(v) = alt_svc {
                r.headers_mut().insert(http::header::ALT_SVC, v);
            }
            Ok::<_, std::convert::Infallible>(r.map(|b| watched.guard(b)))
        })
    });
    // Boxed here: pinned inside the block it would be moved into a second slot of its state.
    let mut conn = Box::pin(h2_builder(limits).serve_connection(TokioIo::new(io), svc));
    let first_due = accepted + limits.header_read_timeout;
    let idle = limits.idle_timeout;
    let mut evicted = Some(evicted);
    async move {
        let peer = &info.client;
        // Once closing: when this connection is asked to go, and the deadline after that.
        let mut drain = crate::lifecycle::closing_now(&close)
            .map(|(spread, deadline)| (Instant::now() + crate::lifecycle::spread_wait(spread), deadline));
        let mut next_sweep = None;
        let timer = tokio::time::sleep_until(first_due);
        tokio::pin!(timer);
        let deadline = loop {
            // In a block, so that none of its values is kept across the wait.
            let watching = {
                let now = Instant::now();
                let requests = info.requests.load(Ordering::Relaxed);
                let idle_at = if requests == 0 {
                    first_due
                } else if info.in_flight.load(Ordering::Relaxed) == 0 {
                    crate::lifecycle::instant_of(info.last_done.load(Ordering::Relaxed)) + idle
                } else {
                    now + idle
                };
                if now >= idle_at {
                    tracing::debug!(client = %peer, silent = requests == 0, "closing an idle h2c connection");
                    break now + Duration::from_secs(1);
                }
                if let Some((ask_at, deadline)) = drain {
                    if now >= ask_at {
                        break deadline;
                    }
                }
                let watching = watch.watching();
                if !watching {
                    next_sweep = None;
                } else if next_sweep.is_none_or(|due| now >= due) {
                    if next_sweep.is_some() {
                        watch.sweep(body_idle);
                    }
                    next_sweep = Some(now + body_idle / 4);
                }
                let wake = [next_sweep, drain.map(|d| d.0)]
                    .into_iter()
                    .flatten()
                    .fold(idle_at, Instant::min);
                if timer.is_elapsed() || timer.deadline() != wake {
                    timer.as_mut().reset(wake);
                }
                watching
            };
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(client = %peer, error = %e, "h2c connection ended with error");
                    }
                    return;
                }
                _ = timer.as_mut() => {}
                changed = close.changed(), if drain.is_none() => {
                    drain = match changed {
                        Ok(()) => crate::lifecycle::closing_now(&close),
                        // Nobody can tell it any more: the instance is going away.
                        Err(_) => Some((Duration::ZERO, Instant::now())),
                    }
                    .map(|(spread, deadline)| (Instant::now() + crate::lifecycle::spread_wait(spread), deadline));
                }
                // The first body to stream starts the sweep.
                _ = std::future::poll_fn(|cx| watch.poll_watching(cx)), if !watching => {}
                // Still without a request and the oldest of too many in their preface.
                _ = std::future::poll_fn(|cx| {
                    if info.requests.load(Ordering::Relaxed) > 0 {
                        evicted = None;
                    }
                    match evicted.as_mut() {
                        Some(e) => e.as_mut().poll(cx),
                        None => std::task::Poll::Pending,
                    }
                }) => return,
            }
        };
        info.closing.store(true, Ordering::SeqCst);
        // GOAWAY: streams in flight finish, until the deadline.
        conn.as_mut().graceful_shutdown();
        timer.as_mut().reset(deadline);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(client = %peer, error = %e, "h2c connection ended with error while closing");
                }
            }
            _ = timer => {}
        }
    }
}

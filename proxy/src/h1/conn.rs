//! One HTTP/1.1 client connection: heads read and framed here (the only parser of the byte
//! stream), requests handed to the pipeline one at a time in order, responses written back,
//! tunnels handed over after their `101` or `200`.
//!
//! Memory: while the connection waits for its next request it holds no buffer (readiness is
//! awaited first, a pooled buffer taken only to read); a request's pipeline future is boxed,
//! so the task stays small while idle.
//!
//! Time: the first head must be complete within `header_read_timeout` of the accept (which
//! covers the PROXY header and protocol sniffing); a later one within `header_read_timeout` of
//! its first byte; between requests the connection may stay idle for `idle_timeout`. A head
//! still partial at its deadline gets 408; an idle connection is closed without a word.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::{H1Body, Pump, Source};
use super::buf::{self, ReadBuf};
use super::chunked::ChunkedDecoder;
use super::parse::{leading_blank_lines, parse_head, Framing, Head, HeadError, HeadLimits};
use super::write::{encode_head, encode_last_chunk, response_framing, write_all, BodyFraming, Framed};
use crate::error::ProxyError;
use crate::io::{Io, Prefixed};
use crate::lifecycle::CloseSignal;
use crate::pipeline::{self, ClientUpgrade, ConnInfo, ResponseBody};
use crate::runtime::Runtime;

/// What one connection is served with (read when it was accepted).
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: HeadLimits,
    pub max_request_body: Option<u64>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// A response whose body makes no progress (no frame from the mesh, or no write to the
    /// client) for this long is cut, and its upstream stream reset.
    pub body_idle_timeout: Duration,
    /// Added to every response (`alt_svc` of the listener).
    pub alt_svc: Option<HeaderValue>,
}

/// Frames gathered into one write when they are ready at once.
const GATHER_FRAMES: usize = 16;
const GATHER_BYTES: usize = 256 * 1024;

/// What became of one request on the connection.
enum Next {
    /// Serve the next request.
    KeepAlive,
    Close,
    /// The connection becomes a tunnel: hand it over.
    Upgrade(tokio::sync::oneshot::Sender<Box<dyn Io>>),
}

/// Serves the connection until it closes, idles out, is drained, or becomes a tunnel.
/// `rbuf` holds bytes already read (sniffing, PROXY header); `accepted` is when it was;
/// `preface` is held until the first head is complete (the connection's place among those
/// still in their preface).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    stream: TcpStream,
    mut rbuf: ReadBuf,
    runtime: Arc<Runtime>,
    info: Arc<ConnInfo>,
    mut close: CloseSignal,
    settings: Settings,
    accepted: Instant,
    preface: crate::runtime::PrefaceSlot,
) {
    // On the heap, and only until the first head: an idle connection's task stays small.
    let mut evicted = Some(Box::pin(preface.evicted()));
    let mut preface = Some(preface);
    let drain = crate::lifecycle::closing_spread(&mut close);
    tokio::pin!(drain);
    let mut drain_deadline: Option<Instant> = None;
    let mut served: u64 = 0;
    let mut idle_since = accepted;
    loop {
        // ---- the next head ----
        let mut head_started: Option<Instant> = (served == 0).then_some(accepted);
        let head = loop {
            let blank = leading_blank_lines(rbuf.pending());
            if blank > 0 {
                rbuf.consume(blank);
            }
            if !rbuf.is_empty() {
                head_started.get_or_insert_with(Instant::now);
                match parse_head(rbuf.pending(), settings.limits) {
                    Ok(Some((head, n))) => {
                        rbuf.consume(n);
                        drop(preface.take());
                        evicted = None;
                        break head;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        Box::pin(refuse_head(&stream, &runtime, &info, head_error(e))).await;
                        return;
                    }
                }
            }
            let deadline = match head_started {
                Some(t) => t + settings.header_read_timeout,
                None => idle_since + settings.idle_timeout,
            };
            let drained_idle = drain_deadline.filter(|_| rbuf.is_empty());
            tokio::select! {
                r = stream.readable() => {
                    if r.is_err() {
                        return;
                    }
                    match try_fill(&stream, &mut rbuf) {
                        Ok(Some(0)) => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Part of a head: 408. Nothing at all (an idle or silent connection): close.
                    if !rbuf.is_empty() {
                        Box::pin(refuse_head(&stream, &runtime, &info, ProxyError::HeadTimeout)).await;
                    }
                    return;
                }
                d = &mut drain, if drain_deadline.is_none() => {
                    info.closing.store(true, Ordering::SeqCst);
                    drain_deadline = Some(d);
                    // Never used: nothing to race, close now. Used: its next response says
                    // `Connection: close`; still idle at the deadline, it is closed then.
                    if served == 0 && rbuf.is_empty() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(drained_idle.unwrap_or(deadline)), if drained_idle.is_some() => return,
                // Still in its preface and the oldest of too many: make room for a newer one.
                _ = async { evicted.as_mut().expect("checked").await }, if evicted.is_some() => return,
            }
        };
        served += 1;

        // ---- the request ----
        // Boxed: the request's state (pump, response writer) exists only while it is served,
        // not in every idle connection's task.
        let next = Box::pin(request(&stream, &mut rbuf, &runtime, &info, &settings, head)).await;
        idle_since = Instant::now();
        match next {
            Next::KeepAlive => {}
            Next::Close => return,
            Next::Upgrade(tx) => {
                let leftover = Bytes::copy_from_slice(rbuf.pending());
                rbuf.release();
                let _ = tx.send(Box::new(Prefixed::new(leftover, stream)));
                return;
            }
        }
    }
}

/// Reads what the socket has into `rbuf` without waiting: `Ok(None)` if nothing was there
/// after all (the buffer is given back if it holds nothing), `Ok(Some(0))` at EOF.
fn try_fill(stream: &TcpStream, rbuf: &mut ReadBuf) -> std::io::Result<Option<usize>> {
    match stream.try_read_buf(rbuf.spare(4096)) {
        Ok(n) => {
            if rbuf.is_empty() {
                rbuf.release();
            }
            Ok(Some(n))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            if rbuf.is_empty() {
                rbuf.release();
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn head_error(e: HeadError) -> ProxyError {
    match e {
        HeadError::TooLarge | HeadError::TooManyHeaders => ProxyError::HeadTooLarge(e.reason()),
        HeadError::Malformed(why) => ProxyError::Malformed(why),
        HeadError::NotImplemented(why) => ProxyError::NotImplemented(why),
        HeadError::Version => ProxyError::Malformed(e.reason()),
    }
}

/// Answers a head that could not be read (or not in time) and lets the connection close.
async fn refuse_head(stream: &TcpStream, runtime: &Runtime, info: &Arc<ConnInfo>, e: ProxyError) {
    let gen = runtime.current();
    let resp = pipeline::refuse_head(&gen, info, e);
    let idle = gen.snapshot.upstream.body_idle_timeout;
    let _ = write_response(stream, resp, &Method::GET, Version::HTTP_11, true, idle).await;
}

/// Serves one request whose head was just read.
async fn request(
    stream: &TcpStream,
    rbuf: &mut ReadBuf,
    runtime: &Runtime,
    info: &Arc<ConnInfo>,
    settings: &Settings,
    head: Head,
) -> Next {
    let gen = runtime.current();
    let Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    } = head;
    // The body: whole if it is already here, else read as the pipeline takes it.
    let (body, mut pump) = match framing {
        Framing::None => (H1Body::empty(), None),
        Framing::Length(n) if (rbuf.pending().len() as u64) >= n => {
            let n = n as usize;
            let data = Bytes::copy_from_slice(&rbuf.pending()[..n]);
            rbuf.consume(n);
            (H1Body::full(data, None), None)
        }
        Framing::Length(n) => {
            let (b, p) = Pump::new(Source::Length(n), expect_continue);
            (b, Some(p))
        }
        Framing::Chunked => match whole_chunked(rbuf, settings) {
            Ok(Some(body)) => (body, None),
            Ok(None) => {
                let decoder = ChunkedDecoder::new(settings.max_request_body, settings.limits.max_head);
                let (b, p) = Pump::new(Source::Chunked(decoder), expect_continue);
                (b, Some(p))
            }
            Err(e) => {
                let mut req = Request::new(());
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.version_mut() = version;
                let resp = pipeline::refuse(&gen, info, &req, e);
                let _ = write_response(stream, resp, req.method(), version, true, settings.body_idle_timeout).await;
                return Next::Close;
            }
        },
    };
    let wants_upgrade =
        method == Method::CONNECT || (version == Version::HTTP_11 && headers.contains_key(header::UPGRADE));
    let (upgrade, upgrade_tx) = if wants_upgrade {
        let (tx, rx) = tokio::sync::oneshot::channel::<Box<dyn Io>>();
        let up =
            ClientUpgrade::new(async move { rx.await.map_err(|_| std::io::Error::other("upgrade not completed")) });
        (Some(up), Some(tx))
    } else {
        (None, None)
    };
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    let mut handled = Box::pin(pipeline::handle(gen, info.clone(), req, upgrade));
    let close = !keep_alive;
    let (written, body_complete, status) = match pump.as_mut() {
        None => {
            let resp = with_alt_svc(handled.await, settings);
            let status = resp.status();
            (
                write_response(stream, resp, &method, version, close, settings.body_idle_timeout).await,
                true,
                status,
            )
        }
        Some(p) => {
            // The pipeline and the body's pump run together: the pipeline sends the body on as
            // the pump reads it, and the response may start before the body has ended.
            let (written, pump_done, status) = {
                let mut pump_done = false;
                // Boxed: only streamed bodies pay for these states.
                let mut run = Box::pin(p.run(stream, rbuf));
                let resp = loop {
                    tokio::select! {
                        r = &mut handled => break r,
                        _ = &mut run, if !pump_done => pump_done = true,
                    }
                };
                let resp = with_alt_svc(resp, settings);
                let status = resp.status();
                let mut write = Box::pin(write_response(
                    stream,
                    resp,
                    &method,
                    version,
                    close,
                    settings.body_idle_timeout,
                ));
                let written = loop {
                    tokio::select! {
                        w = &mut write => break w,
                        _ = &mut run, if !pump_done => pump_done = true,
                    }
                };
                (written, pump_done, status)
            };
            // A body not read to its end leaves the connection's framing unknown: close.
            (written, pump_done && p.complete, status)
        }
    };
    match (written, upgrade_tx) {
        (Ok(_), Some(tx))
            if status == StatusCode::SWITCHING_PROTOCOLS || (method == Method::CONNECT && status.is_success()) =>
        {
            Next::Upgrade(tx)
        }
        (Ok(w), _) if w.keep_alive && body_complete => Next::KeepAlive,
        _ => Next::Close,
    }
}

fn with_alt_svc(mut resp: Response<ResponseBody>, settings: &Settings) -> Response<ResponseBody> {
    if let Some(v) = &settings.alt_svc {
        resp.headers_mut().insert(header::ALT_SVC, v.clone());
    }
    resp
}

/// A chunked body that is already whole in the buffer: decoded at once (the common small
/// request). `Ok(None)`: not all here yet (nothing consumed); errors end the request with 400.
fn whole_chunked(rbuf: &mut ReadBuf, settings: &Settings) -> Result<Option<H1Body>, ProxyError> {
    let mut d = ChunkedDecoder::new(settings.max_request_body, settings.limits.max_head);
    let input = rbuf.pending();
    let mut used = 0;
    let mut data = Vec::new();
    while used < input.len() && !d.is_done() {
        let step = d.decode(&input[used..]).map_err(|e| match e {
            super::chunked::ChunkError::Malformed(why) => ProxyError::Malformed(why),
            super::chunked::ChunkError::TooLarge => ProxyError::BodyTooLarge,
        })?;
        if let Some(r) = step.data {
            data.extend_from_slice(&input[used + r.start..used + r.end]);
        }
        if step.consumed == 0 {
            break;
        }
        used += step.consumed;
    }
    if !d.is_done() {
        return Ok(None);
    }
    rbuf.consume(used);
    Ok(Some(H1Body::full(Bytes::from(data), d.take_trailers())))
}

/// How a response went out.
struct Written {
    /// The connection may carry another request (the response said nothing else).
    keep_alive: bool,
}

/// Polls `body` once without waiting (the data of a small response usually arrived with its
/// head).
fn poll_now(body: &mut ResponseBody) -> Option<Option<Result<Frame<Bytes>, crate::upstream::BoxError>>> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(f) => Some(f),
        Poll::Pending => None,
    }
}

/// Writes a response: the head (and the first data if it is there) in one write, then the
/// body's frames, gathering those ready at once into one write.
async fn write_response(
    stream: &TcpStream,
    resp: Response<ResponseBody>,
    method: &Method,
    version: Version,
    mut close: bool,
    idle: Duration,
) -> Result<Written, ()> {
    let (parts, mut body) = resp.into_parts();
    let framing = response_framing(method, parts.status, version, body.size_hint().exact());
    let says_close = parts.headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    close |= says_close || framing == BodyFraming::Close;
    let mut head = buf::take();
    encode_head(
        &mut head,
        parts.status,
        &parts.headers,
        framing,
        close,
        version == Version::HTTP_10 && !close,
    );
    let result = write_body(stream, &head, &mut body, framing, idle).await;
    buf::give(head);
    result.map(|()| Written { keep_alive: !close })
}

/// Progress is bounded both ways: a frame from the mesh, and a write the client takes, each
/// within `idle`; past it the response is cut (the caller closes the connection).
async fn write_body(
    stream: &TcpStream,
    head: &[u8],
    body: &mut ResponseBody,
    framing: BodyFraming,
    idle: Duration,
) -> Result<(), ()> {
    if framing == BodyFraming::None {
        write_all(stream, &mut [std::io::IoSlice::new(head)])
            .await
            .map_err(|_| ())?;
        // Nothing may follow the head; the body (empty for these answers) is read to its end so
        // the upstream stream finishes cleanly, without waiting for it.
        while let Some(Some(Ok(_))) = poll_now(body) {}
        return Ok(());
    }
    let mut head = Some(head);
    let mut trailers = None;
    let mut ended = false;
    let mut frames: Vec<Framed> = Vec::new();
    loop {
        // One frame (waiting if needed, unless the head is still unsent: then do not wait),
        // then whatever else is ready.
        let first = match poll_now(body) {
            Some(f) => f,
            None if head.is_some() => {
                bounded(
                    idle,
                    write_all(stream, &mut [std::io::IoSlice::new(head.take().expect("checked"))]),
                )
                .await
                .map_err(|_| ())?;
                next_frame(body, idle).await?
            }
            None => next_frame(body, idle).await?,
        };
        let mut next = first;
        let mut bytes = 0;
        loop {
            match next {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => {
                        if !d.is_empty() {
                            bytes += d.len();
                            frames.push(Framed::new(d, framing));
                        }
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            trailers = Some(t);
                        }
                    }
                },
                Some(Err(_)) => return Err(()),
                None => {
                    ended = true;
                    break;
                }
            }
            if frames.len() >= GATHER_FRAMES || bytes >= GATHER_BYTES {
                break;
            }
            match poll_now(body) {
                Some(f) => next = f,
                None => break,
            }
        }
        ended |= body.is_end_stream();
        let mut tail = Vec::new();
        if ended && framing == BodyFraming::Chunked {
            encode_last_chunk(&mut tail, trailers.as_ref());
        }
        let mut slices = Vec::with_capacity(frames.len() * 3 + 2);
        if let Some(h) = head.take() {
            slices.push(std::io::IoSlice::new(h));
        }
        for f in &frames {
            f.slices(&mut slices);
        }
        if !tail.is_empty() {
            slices.push(std::io::IoSlice::new(&tail));
        }
        if !slices.is_empty() {
            bounded(idle, write_all(stream, &mut slices)).await?;
        }
        frames.clear();
        if ended {
            return Ok(());
        }
    }
}

/// A write that must finish within `idle`.
async fn bounded(idle: Duration, write: impl std::future::Future<Output = std::io::Result<()>>) -> Result<(), ()> {
    match tokio::time::timeout(idle, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// The body's next frame, due within `idle`.
async fn next_frame(
    body: &mut ResponseBody,
    idle: Duration,
) -> Result<Option<Result<Frame<Bytes>, crate::upstream::BoxError>>, ()> {
    tokio::time::timeout(idle, body.frame()).await.map_err(|_| {
        tracing::debug!(?idle, "response body made no progress; cutting it");
    })
}

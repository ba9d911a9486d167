//! The HTTP/2 client of pooled upstream connections, on the `h2` crate directly: one task per
//! connection (its frames, pings), none per request. A request's task sends its head, pumps its
//! body and waits for the response itself; only a body still being sent after the response
//! head arrived (a full-duplex stream) gets a task of its own.
//!
//! Flow control is the fairness bound between tenants sharing a connection: each stream may
//! hold `STREAM_WINDOW` bytes the client has not read yet, and the connection window covers
//! that for every stream the connection may carry, so readers that stall hold only their own
//! streams' windows, never the whole connection (what hyper's defaults, 2 MiB per stream and
//! 5 MiB per connection, let a handful of slow readers do). Data is released to the window as
//! it is handed to the client side, not before.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{BoxError, RequestBody, UpstreamError};

/// Unread bytes one upstream stream may hold (Envoy's edge guidance is 64 KiB).
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// Pings keep a connection that the load balancer or gateway silently dropped from being used.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending side of one HTTP/2 connection, and whether its driver has ended.
#[derive(Clone)]
pub struct H2Sender {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl H2Sender {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The HTTP/2 handshake over `io`, and the connection's driver task.
pub async fn handshake<IO>(io: IO, max_streams: usize, what: String) -> Result<H2Sender, UpstreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let streams = u32::try_from(max_streams).unwrap_or(u32::MAX).max(1);
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW.saturating_mul(streams).max(1 << 20))
        .initial_max_send_streams(max_streams)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| UpstreamError::Http(format!("HTTP/2 handshake: {e}")))?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping = conn.ping_pong();
    let done = closed.clone();
    tokio::spawn(async move {
        let result = drive(&mut conn, ping).await;
        done.store(true, Ordering::Release);
        if let Err(e) = result {
            tracing::debug!(conn = %what, error = %e, "upstream h2 connection ended");
        }
    });
    Ok(H2Sender { send, closed })
}

/// Runs the connection, pinging it after every quiet interval; a ping not answered in time
/// ends it (its streams fail, and the pool drops it).
async fn drive(
    conn: &mut h2::client::Connection<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin, Bytes>,
    ping: Option<h2::PingPong>,
) -> Result<(), BoxError> {
    let Some(mut ping) = ping else {
        return conn.await.map_err(Into::into);
    };
    loop {
        tokio::select! {
            r = &mut *conn => return r.map_err(Into::into),
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
        if ping.send_ping(h2::Ping::opaque()).is_err() {
            return conn.await.map_err(Into::into);
        }
        let pong = async {
            poll_fn(|cx| ping.poll_pong(cx)).await.ok();
        };
        tokio::select! {
            r = &mut *conn => return r.map_err(Into::into),
            answered = tokio::time::timeout(PING_TIMEOUT, pong) => {
                if answered.is_err() {
                    return Err("ping not answered in time".into());
                }
            }
        }
    }
}

fn h2_error(e: h2::Error) -> UpstreamError {
    UpstreamError::Http(e.to_string())
}

/// Why a request failed on a connection.
pub enum SendError {
    /// It never left (the connection had closed or is going away): it may go on another one.
    NotSent(Box<Request<RequestBody>>, UpstreamError),
    Failed(UpstreamError),
}

/// Sends one request and waits for its response head.
pub async fn send(sender: &H2Sender, req: Request<RequestBody>) -> Result<Response<UpstreamH2Body>, SendError> {
    let mut send = sender.send.clone();
    if let Err(e) = poll_fn(|cx| send.poll_ready(cx)).await {
        return Err(SendError::NotSent(Box::new(req), h2_error(e)));
    }
    let (parts, body) = req.into_parts();
    let eos = body.is_end_stream();
    let (response, stream) = send
        .send_request(Request::from_parts(parts, ()), eos)
        .map_err(|e| SendError::Failed(h2_error(e)))?;
    let response = if eos {
        response.await.map_err(|e| SendError::Failed(h2_error(e)))?
    } else {
        // The body goes while the response is awaited: a service may answer only once it
        // has read the whole request.
        let mut pump = Box::pin(pump(body, stream));
        tokio::pin!(response);
        let mut pumped = false;
        let resp = loop {
            tokio::select! {
                r = &mut response => break r.map_err(|e| SendError::Failed(h2_error(e)))?,
                p = &mut pump, if !pumped => {
                    p.map_err(SendError::Failed)?;
                    pumped = true;
                }
            }
        };
        if !pumped {
            // The answer came first and the body is still going (a full-duplex stream).
            tokio::spawn(async move {
                if let Err(e) = pump.await {
                    tracing::debug!(error = %e, "request body to the mesh ended early");
                }
            });
        }
        resp
    };
    let (parts, recv) = response.into_parts();
    let length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    Ok(Response::from_parts(
        parts,
        UpstreamH2Body {
            recv,
            data_done: false,
            remaining: length,
        },
    ))
}

/// Sends a request body on its stream as the window allows; a body that fails (the client's
/// framing broke, it went away, it is too large) resets the stream.
async fn pump(mut body: RequestBody, mut stream: h2::SendStream<Bytes>) -> Result<(), UpstreamError> {
    loop {
        let frame = match body.frame().await {
            None => {
                stream.send_data(Bytes::new(), true).map_err(h2_error)?;
                return Ok(());
            }
            Some(Err(e)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(UpstreamError::Http(format!("request body: {e}")));
            }
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(mut data) => {
                let last = body.is_end_stream();
                if data.is_empty() && !last {
                    continue;
                }
                loop {
                    stream.reserve_capacity(data.len().max(1));
                    let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Err(h2_error(e)),
                        None => return Err(UpstreamError::Http("upstream stream closed".into())),
                    };
                    let chunk = data.split_to(granted.min(data.len()));
                    let end = last && data.is_empty();
                    stream.send_data(chunk, end).map_err(h2_error)?;
                    if data.is_empty() {
                        break;
                    }
                }
                if last {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers).map_err(h2_error)?;
                    return Ok(());
                }
            }
        }
    }
}

/// A response body from an HTTP/2 upstream stream; what it hands out is released to the
/// stream's flow-control window.
pub struct UpstreamH2Body {
    recv: h2::RecvStream,
    data_done: bool,
    /// What `content-length` says is left, if it said anything.
    remaining: Option<u64>,
}

impl Body for UpstreamH2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = self.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::*;

    /// A client-side stream that keeps a copy of every byte written.
    struct Tap {
        io: tokio::io::DuplexStream,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Tap {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Tap {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// meshgate's HPACK encoding (`h2::set_literal_header_encoding`, third_party/h2): every
    /// kind of field crosses intact to a decoder, twice on one connection; short strings are on
    /// the wire as they are in both requests (no Huffman coding, no dynamic-table reference),
    /// a client's long value only once (indexed, so the second request refers to it), and a
    /// server's long value in full each time (a server connection keeps no encoder table).
    #[tokio::test]
    async fn literal_header_encoding_round_trips_every_kind_of_field() {
        h2::set_literal_header_encoding(true);
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let written = Arc::new(Mutex::new(Vec::new()));
        let tap = Tap {
            io: client_io,
            written: written.clone(),
        };
        let long = "v".repeat(300);
        let mut secret = http::HeaderValue::from_static("Bearer s3cr3t");
        secret.set_sensitive(true);
        let served = Arc::new(Mutex::new(Vec::new()));
        let server_tap = Tap {
            io: server_io,
            written: served.clone(),
        };
        let long_response = "r".repeat(100);
        let long_r = long_response.clone();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_tap).await.unwrap();
            let mut seen = Vec::new();
            while let Some(r) = conn.accept().await {
                let (req, mut respond) = r.unwrap();
                seen.push(req.headers().clone());
                let (parts, _) = req.into_parts();
                let resp = Response::builder()
                    .status(203)
                    .header("x-echo-path", parts.uri.path())
                    .header("x-echo-authority", parts.uri.authority().unwrap().as_str())
                    .header("x-long-response", long_r.as_str())
                    .body(())
                    .unwrap();
                respond.send_response(resp, true).unwrap();
                if seen.len() == 2 {
                    break;
                }
            }
            // Serve until the client has read both responses and hung up.
            let _ = poll_fn(|cx| conn.poll_closed(cx)).await;
            seen
        });
        let (mut send, conn) = h2::client::handshake(tap).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        for path in ["/first/path", "/second/path"] {
            let mut req = Request::builder()
                .uri(format!("http://reviews.bookinfo.svc.cluster.local:9080{path}?q=1"))
                .header("x-multi", "one")
                .header("x-multi", "two")
                .header("x-long", long.as_str())
                .header("x-empty", "")
                .header("user-agent", "meshgate-test/1")
                .body(())
                .unwrap();
            req.headers_mut().insert(http::header::AUTHORIZATION, secret.clone());
            send = send.ready().await.unwrap();
            let (resp, _) = send.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 203);
            assert_eq!(resp.headers()["x-echo-path"], path);
            assert_eq!(
                resp.headers()["x-echo-authority"],
                "reviews.bookinfo.svc.cluster.local:9080"
            );
            assert_eq!(resp.headers()["x-long-response"], long_response.as_str());
        }
        drop(send);
        let seen = server.await.unwrap();
        for h in &seen {
            let multi: Vec<_> = h.get_all("x-multi").iter().collect();
            assert_eq!(multi, ["one", "two"]);
            assert_eq!(h["x-long"], long.as_str());
            assert_eq!(h["x-empty"], "");
            assert_eq!(h["authorization"], "Bearer s3cr3t");
            assert_eq!(h["user-agent"], "meshgate-test/1");
        }
        let wire = written.lock().unwrap().clone();
        let count = |needle: &[u8]| wire.windows(needle.len()).filter(|w| *w == needle).count();
        // Both requests carry each short string verbatim: nothing was Huffman-coded or indexed.
        assert_eq!(count(b"reviews.bookinfo.svc.cluster.local:9080"), 2);
        assert_eq!(count(b"meshgate-test/1"), 2);
        // The 300-byte value crossed once, uncompressed, then by its table index.
        assert_eq!(count(long.as_bytes()), 1);
        // A server indexes nothing: its long response value crossed in full both times.
        let served = served.lock().unwrap().clone();
        let in_served = served
            .windows(long_response.len())
            .filter(|w| *w == long_response.as_bytes())
            .count();
        assert_eq!(in_served, 2);
    }
}

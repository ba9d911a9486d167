//! The echo app behind each sidecar: reports what it received (as JSON), or streams a
//! deterministic body on request. It sees requests only after the sidecar's RBAC and header
//! handling, exactly like an app container behind Envoy.
//!
//! Query knobs: `bytes=N` (stream N pattern bytes), `status=N`, `delay_ms=N` (≤ 30 s), and two
//! faults: `reset=1` (no response: HTTP/2 stream reset, HTTP/1.1 connection closed) and, with
//! `bytes`, `reset_after=K` (headers and K body bytes, then the same reset: a truncated response).
//! Request bodies are hashed while streaming and never held in memory.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Either, Full};
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};

use crate::sidecar::{ConnInfo, PodInfo};

/// Chunk size of streamed pattern bodies.
pub const PATTERN_CHUNK: usize = 64 * 1024;
/// The pattern's period: byte `i` is `(i % 251) as u8`.
const PERIOD: usize = 251;
/// Longest `delay_ms` honoured.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// Largest `bytes=N` served (a bound on work per request, not on memory: bodies stream).
const MAX_PATTERN_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// A request body that stalls this long is abandoned.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The response body type of the echo app (and of the sidecar's own replies).
pub type EchoBody = Either<Full<Bytes>, Either<PatternBody, Either<GrpcEcho, crate::bookstore::ChannelBody>>>;

/// The fault the `reset` knobs inject. hyper answers a service or body error with RST_STREAM
/// (INTERNAL_ERROR) on HTTP/2 and by closing the connection on HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("meshsim echo: reset requested")]
pub struct EchoReset;

/// Byte `i` of the deterministic body served for `bytes=N`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PERIOD as u64) as u8
}

/// SHA-256 (hex) of the first `n` pattern bytes.
pub fn pattern_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut off = 0u64;
    while off < n {
        let len = (n - off).min(PATTERN_CHUNK as u64) as usize;
        h.update(pattern_slice(off, len));
        off += len as u64;
    }
    hex::encode(h.finalize())
}

// One chunk plus one period of the pattern, so any chunk at any offset is a plain slice of it.
static PATTERN: LazyLock<Vec<u8>> = LazyLock::new(|| (0..(PATTERN_CHUNK + PERIOD) as u64).map(pattern_byte).collect());

fn pattern_slice(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % PERIOD as u64) as usize;
    &PATTERN[start..start + len]
}

/// Streams `n` pattern bytes in [`PATTERN_CHUNK`] frames, with an exact size hint so HTTP/1.1
/// responses carry `content-length`. With a reset point, it fails there instead of finishing.
#[derive(Debug)]
pub struct PatternBody {
    offset: u64,
    len: u64,
    reset_at: Option<u64>,
}

impl PatternBody {
    pub fn new(len: u64) -> Self {
        PatternBody {
            offset: 0,
            len,
            reset_at: None,
        }
    }

    /// Fails with [`EchoReset`] once `at` bytes have been produced (if `at < len`).
    pub fn reset_at(mut self, at: u64) -> Self {
        self.reset_at = (at < self.len).then_some(at);
        self
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = EchoReset;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, EchoReset>>> {
        let end = self.reset_at.unwrap_or(self.len);
        if self.offset == end && self.reset_at.is_some() {
            return Poll::Ready(Some(Err(EchoReset)));
        }
        let left = end - self.offset;
        if left == 0 {
            return Poll::Ready(None);
        }
        let n = left.min(PATTERN_CHUNK as u64) as usize;
        let chunk = Bytes::from_static(pattern_slice(self.offset, n));
        self.offset += n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset == self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.offset)
    }
}

/// A small fixed body.
pub fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<EchoBody> {
    let mut resp = Response::new(Either::Left(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// What the sidecar learned about the request that the app cannot see on its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct SidecarView {
    /// `x-envoy-peer-metadata-id` the sidecar consumed (and removed) from the request.
    pub peer_metadata_id: Option<String>,
    /// `x-envoy-peer-metadata` the sidecar consumed (and removed) from the request.
    pub peer_metadata: Option<String>,
    /// The `source_*` labels Istio's stats would give this request.
    pub source: crate::peer::Source,
}

#[derive(Debug, Default)]
struct Knobs {
    bytes: Option<u64>,
    status: Option<StatusCode>,
    delay: Option<Duration>,
    reset: bool,
    reset_after: Option<u64>,
}

fn parse_knobs(query: Option<&str>) -> Result<Knobs, String> {
    let mut k = Knobs::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "bytes" => {
                let n: u64 = value.parse().map_err(|_| format!("bad bytes={value}"))?;
                if n > MAX_PATTERN_BYTES {
                    return Err(format!("bytes={n} exceeds {MAX_PATTERN_BYTES}"));
                }
                k.bytes = Some(n);
            }
            "status" => {
                let s = value
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (200..=599).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| format!("bad status={value} (200..=599)"))?;
                k.status = Some(s);
            }
            "delay_ms" => {
                let ms: u64 = value.parse().map_err(|_| format!("bad delay_ms={value}"))?;
                k.delay = Some(Duration::from_millis(ms).min(MAX_DELAY));
            }
            "reset" => k.reset = value != "0",
            "reset_after" => {
                let n: u64 = value.parse().map_err(|_| format!("bad reset_after={value}"))?;
                k.reset_after = Some(n);
            }
            _ => {}
        }
    }
    if k.reset_after.is_some() && k.bytes.is_none() {
        return Err("reset_after needs bytes=N".to_string());
    }
    Ok(k)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

fn lossy(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

/// Handles one request that passed the sidecar. `Err` is the `reset=1` fault.
pub(crate) async fn serve(
    pod: &PodInfo,
    conn: &ConnInfo,
    view: SidecarView,
    req: Request<Incoming>,
) -> Result<Response<EchoBody>, EchoReset> {
    pod.counters.app_requests.inc();
    let grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc && pod.bookstore && req.uri().path().starts_with("/bookstore.Bookstore/") {
        return Ok(crate::bookstore::serve(req).await);
    }
    if grpc {
        return Ok(grpc_echo(pod, conn, req).await);
    }
    if let Some(accept) = websocket_accept(&req) {
        return Ok(websocket_echo(pod, req, accept));
    }
    if is_extended_websocket(&req) {
        return Ok(extended_websocket_echo(pod, conn, req));
    }
    let (parts, mut body) = req.into_parts();

    // Read the whole request body, hashing as it streams.
    let mut hasher = Sha256::new();
    let mut body_bytes = 0u64;
    loop {
        match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    hasher.update(&data);
                    body_bytes += data.len() as u64;
                }
            }
            Ok(Some(Err(e))) => {
                return Ok(full(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("meshsim echo: reading request body: {e}\n"),
                ));
            }
            Err(_) => {
                return Ok(full(
                    StatusCode::REQUEST_TIMEOUT,
                    "text/plain",
                    "meshsim echo: request body stalled\n",
                ));
            }
        }
    }
    let body_sha256 = hex::encode(hasher.finalize());

    let knobs = match parse_knobs(parts.uri.query()) {
        Ok(k) => k,
        Err(e) => {
            return Ok(full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("meshsim echo: {e}\n"),
            ))
        }
    };
    if let Some(d) = knobs.delay {
        tokio::time::sleep(d).await;
    }
    if knobs.reset {
        return Err(EchoReset);
    }
    let status = knobs.status.unwrap_or(StatusCode::OK);

    let mut resp = if let Some(n) = knobs.bytes {
        let mut body = PatternBody::new(n);
        if let Some(at) = knobs.reset_after {
            body = body.reset_at(at);
        }
        let mut resp = Response::new(Either::Right(Either::Left(body)));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert("x-body-sha256", hv(&pattern_sha256(n)));
        h.insert("x-request-body-bytes", hv(&body_bytes.to_string()));
        h.insert("x-request-body-sha256", hv(&body_sha256));
        resp
    } else {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in &parts.headers {
            headers.entry(name.as_str().to_string()).or_default().push(lossy(value));
        }
        let host = parts
            .headers
            .get(HOST)
            .map(lossy)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        let xfcc = {
            let v: Vec<String> = parts
                .headers
                .get_all("x-forwarded-client-cert")
                .iter()
                .map(lossy)
                .collect();
            (!v.is_empty()).then(|| v.join(","))
        };
        let json = serde_json::json!({
            "pod": pod.name,
            "service": pod.service,
            "namespace": pod.namespace,
            "subset": pod.subset,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": version_str(parts.version),
            "alpn": conn.alpn,
            "sni": conn.sni,
            "offered_alpn": conn.offered_alpn,
            "tls_version": conn.tls_version,
            "host": host,
            "headers": headers,
            "body_bytes": body_bytes,
            "body_sha256": body_sha256,
            "peer_principal": conn.peer.uris.first(),
            "xfcc": xfcc,
            "peer_metadata_id": view.peer_metadata_id,
            "peer_metadata": view.peer_metadata,
            "source": view.source,
        });
        let mut text = json.to_string();
        text.push('\n');
        full(StatusCode::OK, "application/json", text)
    };
    *resp.status_mut() = status;
    resp.headers_mut().insert("x-echo-pod", hv(&pod.name));
    Ok(resp)
}

// Every value passed here is ASCII built by this module (hex, digits, validated names).
fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_body_matches_definition() {
        let n = (PATTERN_CHUNK * 2 + 1000) as u64;
        let mut body = PatternBody::new(n);
        let mut all = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            let data = frame.into_data().unwrap();
            assert!(data.len() <= PATTERN_CHUNK);
            all.extend_from_slice(&data);
        }
        assert_eq!(all.len() as u64, n);
        for (i, b) in all.iter().enumerate() {
            assert_eq!(*b, (i % 251) as u8);
        }
        assert_eq!(pattern_sha256(n), hex::encode(Sha256::digest(&all)));
    }

    #[test]
    fn knobs_parse_and_bound() {
        let k = parse_knobs(Some("bytes=10&status=418&delay_ms=99999999&x=1")).unwrap();
        assert_eq!(k.bytes, Some(10));
        assert_eq!(k.status, Some(StatusCode::IM_A_TEAPOT));
        assert_eq!(k.delay, Some(MAX_DELAY));
        assert!(parse_knobs(Some("status=99")).is_err());
        assert!(parse_knobs(Some("bytes=-1")).is_err());
        assert!(parse_knobs(None).unwrap().bytes.is_none());
        assert!(parse_knobs(Some("reset=1")).unwrap().reset);
        assert!(parse_knobs(Some("reset_after=5")).is_err());
    }

    #[test]
    fn pattern_body_reset_point() {
        let mut body = PatternBody::new(100_000).reset_at(70_000);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut n = 0;
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => n += f.into_data().unwrap().len(),
                Poll::Ready(Some(Err(EchoReset))) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(n, 70_000);
        // A reset point at or past the end is no reset.
        assert!(PatternBody::new(10).reset_at(10).reset_at.is_none());
    }
}

/// The gRPC echo service: every request message comes back as it arrives (length-prefixed
/// frames are echoed byte for byte, so unary, client, server and bidirectional streaming all
/// work), then trailers `grpc-status: 0` and `x-echo-pod`. Metadata `echo-delay-ms: N` delays
/// the response headers (deadline tests); `echo-status: N` ends with that grpc-status instead.
pub(crate) async fn grpc_echo(pod: &PodInfo, conn: &ConnInfo, req: Request<Incoming>) -> Response<EchoBody> {
    let (parts, body) = req.into_parts();
    let num = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(ms) = num("echo-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(30_000))).await;
    }
    let status = num("echo-status").unwrap_or(0);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if status != 0 {
        trailers.insert("grpc-message", HeaderValue::from_static("echo-status%20requested"));
    }
    trailers.insert(
        "x-echo-pod",
        HeaderValue::from_str(&pod.name).unwrap_or(HeaderValue::from_static("-")),
    );
    if let Some(p) = conn.peer.uris.first() {
        if let Ok(v) = HeaderValue::from_str(p) {
            trailers.insert("x-echo-peer", v);
        }
    }
    let mut resp = Response::new(Either::Right(Either::Right(Either::Left(GrpcEcho {
        body,
        trailers: Some(trailers),
    }))));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// Streams the request body back, then the trailers.
#[derive(Debug)]
pub struct GrpcEcho {
    body: Incoming,
    trailers: Option<http::HeaderMap>,
}

impl Body for GrpcEcho {
    type Data = Bytes;
    type Error = EchoReset;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, EchoReset>>> {
        loop {
            if self.trailers.is_none() {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    // Request trailers (rare in gRPC) are not echoed.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(_))) => return Poll::Ready(Some(Err(EchoReset))),
                Poll::Ready(None) => {
                    let t = self.trailers.take().expect("checked above");
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
        }
    }
}

/// `Sec-WebSocket-Accept` for a WebSocket opening handshake (RFC 6455 §4.2), or None if this
/// is not one.
fn websocket_accept(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers();
    let upgrade = h.get(http::header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") || req.version() != http::Version::HTTP_11 {
        return None;
    }
    let key = h.get("sec-websocket-key")?.to_str().ok()?;
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut sha = sha1::Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Some(base64::engine::general_purpose::STANDARD.encode(sha.finalize()))
}

/// An RFC 8441 WebSocket: `CONNECT` with `:protocol websocket` on an HTTP/2 stream.
fn is_extended_websocket(req: &Request<Incoming>) -> bool {
    req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Answers 200 (RFC 8441 §5: no Sec-WebSocket-Accept over HTTP/2) and echoes frames on the
/// stream like [`websocket_echo`]; the caller's principal comes back in a header.
fn extended_websocket_echo(pod: &PodInfo, conn: &ConnInfo, mut req: Request<Incoming>) -> Response<EchoBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = pod.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = ws_echo_loop(hyper_util::rt::TokioIo::new(upgraded)).await {
                    tracing::debug!(pod = %name, error = %e, "websocket over HTTP/2 ended with error");
                }
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "extended CONNECT upgrade failed"),
        }
    });
    let mut resp = full(StatusCode::OK, "text/plain", Bytes::new());
    let h = resp.headers_mut();
    h.remove(CONTENT_TYPE);
    h.insert(
        "x-echo-pod",
        HeaderValue::from_str(&pod.name).expect("pod names are header-safe"),
    );
    if let Some(p) = conn.peer.uris.first().and_then(|u| HeaderValue::from_str(u).ok()) {
        h.insert("x-peer-principal", p);
    }
    resp
}

/// Answers 101 and then echoes every data frame (text or binary) back unmasked, answers pings,
/// and ends with the client's close.
fn websocket_echo(pod: &PodInfo, mut req: Request<Incoming>, accept: String) -> Response<EchoBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = pod.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = ws_echo_loop(hyper_util::rt::TokioIo::new(upgraded)).await {
                    tracing::debug!(pod = %name, error = %e, "websocket ended with error");
                }
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let h = resp.headers_mut();
    h.remove(CONTENT_TYPE);
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).expect("base64"));
    resp
}

async fn ws_echo_loop<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut head = [0u8; 2];
        if s.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await?);
        } else if len == 127 {
            len = s.read_u64().await?;
        }
        if len > 16 << 20 {
            return Err(std::io::Error::other("frame too large for the echo"));
        }
        let mut mask = [0u8; 4];
        if masked {
            s.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        // Server frames are never masked (RFC 6455 §5.1); a ping is answered with a pong.
        let reply_opcode = if opcode == 0x9 { 0xA } else { opcode };
        let mut out = vec![0x80 | reply_opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&payload);
        s.write_all(&out).await?;
        if opcode == 0x8 {
            return s.shutdown().await;
        }
    }
}

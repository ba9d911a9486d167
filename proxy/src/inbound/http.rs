//! Serving one authenticated mesh connection: HTTP/1.1 or HTTP/2 requests forwarded to the VM
//! backends (failover to another backend when one cannot be reached and the request can be
//! sent again), or a TCP stream spliced to one backend.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::Digest;

use super::{count, deny, Inbound};
use crate::config::{UpstreamProtocol, VmService};
use crate::lifecycle::CloseSignal;
use crate::listener::ConnGauge;
use crate::runtime::Generation;
use crate::upstream::BoxError;

type Body = BoxBody<Bytes, BoxError>;

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Request bodies up to this size are kept so the request can go to another backend when the
/// first cannot be reached; larger or streamed ones are sent once (Envoy's retry buffer idea).
const REPLAY_LIMIT: u64 = 64 * 1024;

/// One mesh connection, after the handshake.
pub(super) struct MeshConn {
    pub listener: Arc<str>,
    /// The TCP peer (or the PROXY header's source behind a trusted load balancer).
    pub client: SocketAddr,
    pub sni: Option<String>,
    /// The caller's SPIFFE ID, if its certificate has one.
    pub caller: Option<String>,
    /// The caller's leaf certificate (DER), for XFCC's `Hash=`.
    pub leaf: Vec<u8>,
}

/// A pooled HTTP client for one VM service's backends (connections reused per backend); clones
/// share the pool.
#[derive(Clone)]
pub(super) struct BackendClient {
    client: Client<HttpConnector, Body>,
}

impl BackendClient {
    pub fn new(s: &VmService) -> BackendClient {
        let mut c = HttpConnector::new();
        c.set_connect_timeout(Some(s.connect_timeout));
        c.set_nodelay(true);
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90));
        if s.protocol == UpstreamProtocol::Http2 {
            b.http2_only(true);
        }
        BackendClient { client: b.build(c) }
    }
}

fn local(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Envoy's element for this hop (istio-wire.md §3.1): `By` (our identity), `Hash` (SHA-256 of
/// the caller's certificate), `Subject` (empty for Istio certificates), `URI` (the caller).
fn xfcc(by: &str, conn: &MeshConn) -> Option<HeaderValue> {
    let hash = hex::encode(sha2::Sha256::digest(&conn.leaf));
    let subject = x509_parser::parse_x509_certificate(&conn.leaf)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_default()
        .replace('"', "\\\"");
    let mut v = format!("By={by};Hash={hash};Subject=\"{subject}\"");
    if let Some(uri) = &conn.caller {
        v.push_str(";URI=");
        v.push_str(uri);
    }
    HeaderValue::from_str(&v).ok()
}

/// Serves HTTP on a mesh connection until it ends, an idle period passes with nothing in
/// flight, or the listener drains (then `Connection: close` / GOAWAY, in-flight requests finish).
pub(super) async fn serve_http<IO>(
    gen: Arc<Generation>,
    inbound: Arc<Inbound>,
    conn: MeshConn,
    io: IO,
    _alpn: Option<Vec<u8>>,
    mut close: CloseSignal,
    guard: ConnGauge,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _guard = guard;
    let limits = gen.snapshot.limits.clone();
    let conn = Arc::new(conn);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let last_active = Arc::new(AtomicU64::new(crate::lifecycle::millis()));
    let svc = {
        let (in_flight, last_active) = (in_flight.clone(), last_active.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (gen, inbound, conn) = (gen.clone(), inbound.clone(), conn.clone());
            let (in_flight, last_active) = (in_flight.clone(), last_active.clone());
            async move {
                in_flight.fetch_add(1, Relaxed);
                let resp = request(&gen, &inbound, &conn, req).await;
                in_flight.fetch_sub(1, Relaxed);
                last_active.store(crate::lifecycle::millis(), Relaxed);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let served = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    let idle = limits.idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    let closing = crate::lifecycle::closing_spread(&mut close);
    tokio::pin!(closing);
    loop {
        tokio::select! {
            _ = served.as_mut() => return,
            _ = tick.tick() => {
                let quiet = crate::lifecycle::millis().saturating_sub(last_active.load(Relaxed));
                if in_flight.load(Relaxed) == 0 && quiet >= idle.as_millis() as u64 {
                    break;
                }
            }
            at = &mut closing => {
                tokio::time::sleep_until(at).await;
                break;
            }
        }
    }
    served.as_mut().graceful_shutdown();
    let _ = served.await;
}

/// One request from the mesh: route, authorize, forward.
async fn request(gen: &Generation, inbound: &Inbound, conn: &MeshConn, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let authority = req.uri().authority().map(|a| a.as_str().to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    });
    let d = inbound.decide(conn.caller.as_deref(), conn.sni.as_deref(), authority.as_deref());
    let caller = conn.caller.as_deref().unwrap_or("a caller without a SPIFFE ID");
    let Some(sid) = d.service else {
        deny(&gen.metrics, &conn.listener, "unknown_vm_service");
        count(&gen.metrics, &conn.listener, "none", 404);
        return local(
            StatusCode::NOT_FOUND,
            format!(
                "meshgate: unknown_vm_service: no vm_service for SNI {} and Host {}\n",
                conn.sni.as_deref().unwrap_or("(none)"),
                authority.as_deref().unwrap_or("(none)")
            ),
        );
    };
    let service = &inbound.services[sid];
    if let Some(r) = d.refusal {
        deny(&gen.metrics, &conn.listener, r.reason());
        count(&gen.metrics, &conn.listener, &service.name, 403);
        return local(
            StatusCode::FORBIDDEN,
            format!("meshgate: {}: {caller} may not call {}\n", r.reason(), service.name),
        );
    }
    if service.protocol == UpstreamProtocol::Tcp {
        count(&gen.metrics, &conn.listener, &service.name, 400);
        return local(
            StatusCode::BAD_REQUEST,
            format!(
                "meshgate: malformed_request: {} is a tcp service: connect with its SNI, without HTTP\n",
                service.name
            ),
        );
    }
    let resp = forward(gen, inbound, conn, sid, req).await;
    count(&gen.metrics, &conn.listener, &service.name, resp.status().as_u16());
    gen.metrics
        .inbound_duration
        .get_or_create(&crate::metrics::ServiceLabels {
            service: service.name.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Counts a request in flight on a backend (least-requests balancing) until dropped.
struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn forward(
    gen: &Generation,
    inbound: &Inbound,
    conn: &MeshConn,
    sid: usize,
    req: Request<Incoming>,
) -> Response<Body> {
    let service = &inbound.services[sid];
    let backends = &inbound.backends[sid];
    let client = &inbound.clients[sid].client;
    let error = |reason: &str| {
        gen.metrics
            .vm_backend_errors
            .get_or_create(&crate::metrics::ServiceReasonLabels {
                service: service.name.clone(),
                reason: reason.to_string(),
            })
            .inc();
    };
    let (mut parts, body) = req.into_parts();
    crate::pipeline::strip_hop_by_hop(&mut parts.headers);
    let h = &mut parts.headers;
    // Only meshgate says who called: a caller's own XFCC would be believed by the app.
    h.remove(&XFCC);
    if let Some(v) = xfcc(&inbound.spiffe_id, conn) {
        h.insert(&XFCC, v);
    }
    let peer = conn.client.ip().to_canonical().to_string();
    let xff = match h.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {peer}"),
        _ => peer,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(&XFF, v);
    }
    h.insert(&XFP, HeaderValue::from_static("https"));
    if !h.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                h.insert(header::HOST, v);
            }
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let deadline = tokio::time::Instant::now() + service.request_timeout;
    // `limits.max_request_body` holds for mesh callers as for VMs: a declared length over it
    // is refused before anything is sent, a streamed body is cut where it passes it.
    let limit = gen.snapshot.limits.max_request_body;
    if let (Some(max), Some(len)) = (limit, body.size_hint().exact()) {
        if len > max {
            return local(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("meshgate: body_too_large: the request body is over {max} bytes\n"),
            );
        }
    }
    let body = match limit {
        Some(max) => http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .map_err(BoxError::from)
            .boxed(),
        None => body.map_err(BoxError::from).boxed(),
    };
    // Small or empty bodies are kept for a second attempt; others go once.
    let small = body.is_end_stream() || body.size_hint().upper().is_some_and(|n| n <= REPLAY_LIMIT);
    let (mut once, replay) = if small {
        match tokio::time::timeout_at(deadline, body.collect()).await {
            Ok(Ok(b)) => (None, Some(b.to_bytes())),
            _ => {
                return local(
                    StatusCode::BAD_REQUEST,
                    "meshgate: malformed_request: the request body did not arrive\n".into(),
                )
            }
        }
    } else {
        (Some(body), None)
    };
    let mut tried = Vec::new();
    loop {
        let Some(i) = backends.pick(&tried) else {
            error("no_backend");
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "meshgate: no_backend: no backend of {} could be reached\n",
                    service.name
                ),
            );
        };
        tried.push(i);
        let b = &backends.members[i];
        let body: Body = match (&replay, once.take()) {
            (Some(bytes), _) => Full::new(bytes.clone()).map_err(|e| match e {}).boxed(),
            (None, Some(body)) => body,
            (None, None) => unreachable!("a streamed body is sent once: no second attempt"),
        };
        let mut req = Request::from_parts(parts.clone(), body);
        *req.uri_mut() = match format!("http://{}{path}", b.addr).parse() {
            Ok(u) => u,
            Err(_) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    "meshgate: malformed_request: bad path\n".into(),
                )
            }
        };
        *req.version_mut() = if service.protocol == UpstreamProtocol::Http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        b.active.fetch_add(1, Relaxed);
        let active = Active(&b.active);
        let sent = tokio::time::timeout_at(deadline, client.request(req)).await;
        drop(active);
        match sent {
            Ok(Ok(mut resp)) => {
                backends.record(i, !resp.status().is_server_error());
                crate::pipeline::strip_hop_by_hop(resp.headers_mut());
                return resp.map(|b| b.map_err(BoxError::from).boxed());
            }
            Ok(Err(e)) if e.is_connect() => {
                backends.record(i, false);
                error("connect");
                tracing::debug!(service = %service.name, backend = %b.addr, error = %e, "VM backend unreachable");
                if replay.is_none() {
                    return local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "meshgate: no_backend: backend {} of {} unreachable\n",
                            b.addr, service.name
                        ),
                    );
                }
            }
            Ok(Err(e)) => {
                backends.record(i, false);
                error("reset");
                return local(
                    StatusCode::BAD_GATEWAY,
                    format!("meshgate: backend_reset: backend {} of {}: {e}\n", b.addr, service.name),
                );
            }
            Err(_) => {
                backends.record(i, false);
                error("timeout");
                return local(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "meshgate: backend_timeout: no response from {} within {:?}\n",
                        service.name, service.request_timeout
                    ),
                );
            }
        }
    }
}

/// A TCP service: authorize by SNI and caller, connect to a backend (the next one if it cannot
/// be reached), splice until either side ends or the listener's idle timeout.
pub(super) async fn tcp<IO>(
    gen: &Generation,
    inbound: &Inbound,
    conn: MeshConn,
    io: IO,
    _close: CloseSignal,
    guard: ConnGauge,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _guard = guard;
    let d = inbound.decide(conn.caller.as_deref(), conn.sni.as_deref(), None);
    let Some(sid) = d.service else { return };
    let service = &inbound.services[sid];
    if let Some(r) = d.refusal {
        deny(&gen.metrics, &conn.listener, r.reason());
        count(&gen.metrics, &conn.listener, &service.name, 403);
        tracing::info!(service = %service.name, caller = conn.caller.as_deref().unwrap_or("-"), reason = r.reason(), "mesh caller refused");
        return;
    }
    let backends = &inbound.backends[sid];
    let mut tried = Vec::new();
    let upstream = loop {
        let Some(i) = backends.pick(&tried) else {
            count(&gen.metrics, &conn.listener, &service.name, 502);
            gen.metrics
                .vm_backend_errors
                .get_or_create(&crate::metrics::ServiceReasonLabels {
                    service: service.name.clone(),
                    reason: "no_backend".into(),
                })
                .inc();
            return;
        };
        tried.push(i);
        let addr = &backends.members[i].addr;
        let dial = tokio::net::TcpStream::connect((addr.host.as_str(), addr.port));
        match tokio::time::timeout(service.connect_timeout, dial).await {
            Ok(Ok(s)) => {
                backends.record(i, true);
                break (i, s);
            }
            _ => backends.record(i, false),
        }
    };
    count(&gen.metrics, &conn.listener, &service.name, 200);
    let (i, stream) = upstream;
    let _ = stream.set_nodelay(true);
    let b = &backends.members[i];
    b.active.fetch_add(1, Relaxed);
    let _active = Active(&b.active);
    let idle = gen
        .listener(&conn.listener)
        .map_or(Duration::from_secs(3600), |l| l.idle_timeout);
    crate::io::splice(io, stream, idle).await;
}

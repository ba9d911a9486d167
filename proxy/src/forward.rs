//! The per-request pipeline: snapshot → authorize → resolve → send → record.
//!
//! Decisions come from the pure functions in `policy` and `route`; this module only extracts
//! their inputs from the request, rewrites headers for the hop into the mesh, and wraps the
//! bodies so bytes are counted and the access-log line is written when the response ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::{Snapshot, UpstreamProtocol};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::policy::keys::presented_key;
use crate::policy::limits::{Slot, TenantState};
use crate::policy::Deny;
use crate::route::RouteError;
use crate::upstream::hbone::dedicated;
use crate::upstream::{BoxError, Lease, RequestBody, Upstream, UpstreamError};

/// One config generation: what requests share. A reload swaps the whole value.
pub struct Proxy {
    pub snapshot: Arc<Snapshot>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    /// Indexed by tenant id; carried over by name across reloads.
    pub tenant_state: Vec<Arc<TenantState>>,
}

impl Proxy {
    pub fn new(
        snapshot: Arc<Snapshot>,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        previous: Option<&Proxy>,
    ) -> Proxy {
        let tenant_state = snapshot
            .tenants
            .iter()
            .map(|t| {
                previous
                    .and_then(|p| {
                        p.snapshot
                            .tenants
                            .iter()
                            .position(|o| o.name == t.name)
                            .map(|i| p.tenant_state[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        Proxy {
            snapshot,
            upstream,
            metrics,
            tenant_state,
        }
    }
}

/// Facts about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    /// The client: the TCP peer, or the source a trusted load balancer's PROXY header names.
    pub client: SocketAddr,
    /// The AWS VPC endpoint from a PROXY v2 header, if any.
    pub vpce: Option<String>,
    /// Set when the listener drains: HTTP/1.1 responses then carry `Connection: close`, so the
    /// client closes after a complete response instead of racing a close of an idle connection.
    pub closing: std::sync::atomic::AtomicBool,
    /// Requests seen, and whether they came as HTTP/2 (which drains with GOAWAY instead).
    pub requests: AtomicU64,
    pub is_h2: std::sync::atomic::AtomicBool,
    /// What the HTTP/1 framing watcher saw, request by request.
    pub framing: Arc<crate::listener::framing::Verdicts>,
    /// Keeps the connection counted (limits, gauges) while a tunnel it became outlives hyper's
    /// connection task; and the listener's close signal, so drains cut tunnels too.
    pub lifetime: Option<Arc<dyn std::any::Any + Send + Sync>>,
    pub close: Option<crate::lifecycle::CloseSignal>,
    /// `X-Forwarded-Proto` for the mesh: `http`, or `https` on the h3 (TLS) listener.
    pub scheme: &'static str,
}

impl ConnInfo {
    pub fn new(listener: Arc<str>, client: SocketAddr, vpce: Option<String>) -> ConnInfo {
        ConnInfo {
            listener,
            client,
            vpce,
            closing: Default::default(),
            requests: AtomicU64::new(0),
            is_h2: Default::default(),
            framing: Default::default(),
            lifetime: None,
            scheme: "http",
            close: None,
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Identity and telemetry headers only the mesh may set (istio-wire.md §0, §3).
static MESH_ONLY: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-client-cert"),
    HeaderName::from_static("x-envoy-peer-metadata"),
    HeaderName::from_static("x-envoy-peer-metadata-id"),
];

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): those named in `Connection`, plus the ones that
/// are hop-by-hop by definition. `TE: trailers` survives: gRPC needs it end to end over h2.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    for n in [
        &header::CONNECTION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn new_request_id() -> HeaderValue {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b[6] = (b[6] & 0x0f) | 0x40; // UUID v4
    b[8] = (b[8] & 0x3f) | 0x80;
    // Written in place: this runs for every request that arrives without an id.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(byte >> 4)];
        out[o + 1] = HEX[usize::from(byte & 0x0f)];
        o += 2;
    }
    HeaderValue::from_bytes(&out).expect("hex and dashes are a valid header value")
}

/// The authority the client asked for: absolute-form URI or `:authority` first, then `Host`.
fn authority_of(req: &Request<Incoming>) -> Result<String, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::Malformed("more than one Host header"));
    }
    let host = host
        .map(|h| {
            h.to_str()
                .map_err(|_| ProxyError::Malformed("Host header is not ASCII"))
        })
        .transpose()?;
    if let Some(a) = req.uri().authority() {
        // Two names for one request: refuse rather than let policy and routing see different
        // ones. h2 has no Host header; HTTP/1.1 absolute-form must agree with it.
        if let Some(h) = host {
            let same = crate::route::split_authority(h).ok().map(|(n, _)| n)
                == crate::route::split_authority(a.as_str()).ok().map(|(n, _)| n);
            if !same {
                return Err(ProxyError::Malformed("Host header disagrees with the request target"));
            }
        }
        return Ok(a.as_str().to_string());
    }
    host.map(str::to_string)
        .ok_or(ProxyError::Malformed("missing Host header"))
}

/// One access-log line, written when the response ends (or the client goes away).
struct AccessLog {
    metrics: Arc<Metrics>,
    listener: Arc<str>,
    client: SocketAddr,
    tenant: Option<String>,
    service: Option<String>,
    method: Method,
    authority: String,
    path: String,
    request_id: String,
    status: u16,
    reason: &'static str,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    reused: Option<bool>,
    /// The tenant's concurrency slot, released with the log line when the response ends.
    slot: Option<Slot>,
}

impl AccessLog {
    fn finish(&self, completed: bool) {
        let duration = self.started.elapsed();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.metrics.requests_in_flight.dec();
        self.metrics.record_request(
            &self.listener,
            self.tenant.as_deref(),
            self.service.as_deref(),
            self.status,
            self.reason,
            duration,
            bytes_in,
            self.bytes_out,
        );
        tracing::info!(
            target: "access",
            listener = %self.listener,
            client = %self.client,
            tenant = self.tenant.as_deref().unwrap_or("-"),
            service = self.service.as_deref().unwrap_or("-"),
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            status = self.status,
            reason = self.reason,
            duration_ms = duration.as_secs_f64() * 1000.0,
            bytes_in,
            bytes_out = self.bytes_out,
            upstream_conn = match self.reused { Some(true) => "reused", Some(false) => "new", None => "-" },
            completed,
            request_id = %self.request_id,
        );
    }
}

/// Request body towards the mesh, counting bytes as they stream.
struct CountingBody {
    inner: Incoming,
    counter: Arc<AtomicU64>,
    /// Body size limit; going past it fails the body (and so the upstream request).
    limit: Option<u64>,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
    client_error: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
struct TooLarge;

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &p {
            // The client's own framing broke (bad chunk size, early close): its fault, not the
            // mesh's, whatever error the upstream request then reports.
            self.client_error.store(true, Ordering::SeqCst);
        }
        if let Poll::Ready(Some(Ok(f))) = &p {
            if let Some(d) = f.data_ref() {
                let total = self.counter.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                if self.limit.is_some_and(|l| total > l) {
                    self.exceeded.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(Box::new(TooLarge))));
                }
            }
        }
        p.map(|o| o.map(|r| r.map_err(|e| -> BoxError { Box::new(e) })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Inner {
    Upstream(Incoming),
    Local(Option<Bytes>),
    Transcoded(crate::transcode::TranscodedBody),
}

/// Response body towards the VM. Holds the upstream lease until the body ends, so pool stream
/// accounting matches what is really in flight, and writes the access log at the end.
pub struct ResponseBody {
    inner: Inner,
    lease: Option<Lease>,
    log: Option<Box<AccessLog>>,
}

impl ResponseBody {
    fn local(b: Bytes) -> Self {
        ResponseBody {
            inner: Inner::Local(Some(b)),
            lease: None,
            log: None,
        }
    }

    fn finish(&mut self, completed: bool) {
        if let Some(lease) = self.lease.as_mut() {
            if completed {
                lease.body_finished();
            }
        }
        self.lease = None;
        if let Some(log) = self.log.take() {
            log.finish(completed);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let p = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx),
            Inner::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Inner::Transcoded(b) => Pin::new(b).poll_frame(cx).map(|o| o.map(|r| r.map_err(|e| match e {}))),
        };
        match &p {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(log)) = (f.data_ref(), this.log.as_mut()) {
                    log.bytes_out += d.len() as u64;
                }
                // hyper stops polling once `is_end_stream` says so, so the end may never be
                // seen as `Ready(None)`: settle the lease and log here.
                let ended = match &this.inner {
                    Inner::Upstream(b) => b.is_end_stream(),
                    Inner::Local(b) => b.is_none(),
                    Inner::Transcoded(b) => b.is_end_stream(),
                };
                if ended {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_none(),
            Inner::Transcoded(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Transcoded(b) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}

fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers().get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn local_response(e: &ProxyError) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(Bytes::from(e.body())));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let ProxyError::RateLimited { retry_after_secs } = e {
        h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    if e.status() == StatusCode::UNAUTHORIZED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"meshgate\""),
        );
    }
    resp
}

/// Serves one request. Never fails at the hyper level: every error becomes a response.
pub async fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    proxy.metrics.requests_in_flight.inc();
    conn.requests.fetch_add(1, Ordering::Relaxed);
    let h1 = req.version() < Version::HTTP_2;
    let grpc = is_grpc(req.headers());
    let framing_refusal = if h1 { conn.framing.next_refusal() } else { None };
    if !h1 {
        conn.is_h2.store(true, Ordering::Relaxed);
    }
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_request_id);
    let mut log = Box::new(AccessLog {
        metrics: proxy.metrics.clone(),
        listener: conn.listener.clone(),
        client: conn.client,
        tenant: None,
        service: None,
        method: req.method().clone(),
        authority: String::new(),
        path: req.uri().path().to_string(),
        request_id: request_id.to_str().unwrap_or("-").to_string(),
        status: 0,
        reason: "",
        started,
        bytes_in: Arc::new(AtomicU64::new(0)),
        bytes_out: 0,
        reused: None,
        slot: None,
    });
    let result = if let Some(why) = framing_refusal {
        Err(ProxyError::Malformed(why))
    } else {
        forward(&proxy, &conn, req, request_id, &mut log).await
    };
    let mut refused_malformed = false;
    let mut resp = match result {
        Ok(Forwarded::Upgraded(resp)) => {
            log.status = resp.status().as_u16();
            let (parts, body) = resp.into_parts();
            Response::from_parts(
                parts,
                ResponseBody {
                    inner: Inner::Upstream(body),
                    lease: None,
                    log: None,
                },
            )
        }
        Ok(Forwarded::Tunnel) => {
            // hyper sends no body with a 2xx to CONNECT and hands the connection to the tunnel.
            log.status = 200;
            Response::new(ResponseBody::local(Bytes::new()))
        }
        Ok(Forwarded::Upstream(resp, lease)) => leased(&proxy, &mut log, resp, lease, Inner::Upstream),
        Ok(Forwarded::Transcoded(resp, lease)) => leased(&proxy, &mut log, resp, lease, Inner::Transcoded),
        Err(e) => {
            // Also after a body that did not arrive in time: the rest of it may still come.
            refused_malformed = matches!(e.status(), StatusCode::BAD_REQUEST | StatusCode::REQUEST_TIMEOUT);
            log.status = e.status().as_u16();
            log.reason = e.reason();
            if e.status().is_server_error() {
                tracing::warn!(service = log.service.as_deref().unwrap_or("-"), error = %e, "upstream request failed");
            }
            if grpc {
                grpc_local_response(&e)
            } else if let ProxyError::Transcode(why) = &e {
                // A REST client of a transcoded method gets its errors in JSON, like the ones
                // the service itself returns.
                let mut r = Response::new(ResponseBody::local(crate::transcode::error_json(
                    3,
                    &format!("meshgate: {why}"),
                )));
                *r.status_mut() = e.status();
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            } else {
                local_response(&e)
            }
        }
    };
    resp.body_mut().log = Some(log);
    // After a malformed request the rest of the connection's bytes cannot be trusted to be
    // framed the way the client meant: close it.
    if h1 && (conn.closing.load(Ordering::SeqCst) || refused_malformed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// A response that came over a pooled upstream stream: counted, logged, and holding its lease
/// until the body is done.
fn leased<B>(
    proxy: &Proxy,
    log: &mut AccessLog,
    resp: Response<B>,
    lease: Lease,
    inner: impl FnOnce(B) -> Inner,
) -> Response<ResponseBody> {
    log.reused = Some(lease.reused);
    if let Some(service) = &log.service {
        proxy.metrics.record_upstream_request(service, lease.reused);
    }
    log.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        ResponseBody {
            inner: inner(body),
            lease: Some(lease),
            log: None,
        },
    )
}

async fn forward(
    proxy: &Proxy,
    conn: &ConnInfo,
    req: Request<Incoming>,
    request_id: HeaderValue,
    log: &mut AccessLog,
) -> Result<Forwarded, ProxyError> {
    let snap = &proxy.snapshot;
    // Plain CONNECT opens a byte tunnel; extended CONNECT (RFC 8441, `:protocol`) is a request
    // to a service like any other, upgraded below.
    if req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_none() {
        return tunnel(proxy, conn, req, log).await.map(|()| Forwarded::Tunnel);
    }
    let authority = authority_of(&req)?;
    log.authority = authority.chars().take(255).collect();

    let key = presented_key(req.headers(), &snap.api_key_header)?;
    let tenant_id = snap
        .tenants
        .authorize(conn.client.ip(), key.as_ref().map(|k| &k.0), conn.vpce.as_deref())?;
    log.tenant = Some(snap.tenants.get(tenant_id).name.clone());
    let service_id = snap.routes.resolve(&authority)?;
    let service = &snap.services[service_id];
    log.service = Some(service.name.clone());
    if !snap.tenants.allows(tenant_id, service_id) {
        return Err(Deny::ServiceNotAllowed.into());
    }
    let identity = snap.tenants.get(tenant_id).identity;
    log.slot = tenant_limits(proxy, tenant_id)?;
    if let (Some(limit), Some(len)) = (snap.limits.max_request_body, declared_length(&req)) {
        if len > limit {
            return Err(ProxyError::BodyTooLarge);
        }
    }

    // gRPC-JSON transcoding: a REST call matching one of the service's HTTP bindings becomes a
    // gRPC call; anything else (native gRPC included) passes through as it came.
    let request_uri = service.transcode.as_ref().map(|_| req.uri().clone());
    let call = match (&service.transcode, &request_uri) {
        (Some(t), Some(uri)) if !is_grpc(req.headers()) => t.route(req.method(), uri),
        _ => None,
    };

    // HTTP/1.1 Upgrade (WebSocket): needs an HTTP/1.1 service and a connection of its own.
    let mut req = req;
    let upgrade = requested_upgrade(&req);
    if upgrade.is_some() && service.protocol != UpstreamProtocol::Http1 {
        return Err(ProxyError::Malformed(
            "Upgrade (WebSocket over HTTP/1.1) needs an http1 service; for an http2 service use HTTP/2 extended CONNECT",
        ));
    }
    // RFC 8441: WebSocket (or another protocol) over one HTTP/2 stream, carried to an h2 service
    // as the same extended CONNECT.
    let extended = req.extensions().get::<hyper::ext::Protocol>().is_some();
    if extended && service.protocol != UpstreamProtocol::Http2 {
        return Err(ProxyError::Malformed(
            "extended CONNECT (RFC 8441) needs an http2 service; for an http1 service use an HTTP/1.1 Upgrade",
        ));
    }
    let client_upgrade = (upgrade.is_some() || extended).then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    if let Some(protocol) = &upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, protocol.clone());
    }
    h.remove(&snap.api_key_header);
    for n in &MESH_ONLY {
        h.remove(n);
    }
    let client_ip = conn.client.ip().to_canonical().to_string();
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip,
    };
    h.remove(&X_FORWARDED_FOR);
    h.insert(
        &X_FORWARDED_FOR,
        HeaderValue::from_str(&xff).map_err(|_| ProxyError::Malformed("bad X-Forwarded-For"))?,
    );
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(conn.scheme));
    h.insert(&X_REQUEST_ID, request_id);

    let path = match &call {
        Some(c) => {
            c.grpc_headers(h);
            parts.method = Method::POST;
            c.grpc_path().to_string()
        }
        None => parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
    };
    match service.protocol {
        UpstreamProtocol::Http2 => {
            h.remove(header::HOST);
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
                .map_err(|_| ProxyError::Malformed("invalid request target"))?;
            parts.version = Version::HTTP_2;
        }
        UpstreamProtocol::Tcp => {
            return Err(ProxyError::Malformed("this service is TCP: use its TCP listener"));
        }
        UpstreamProtocol::Http1 => {
            let host = HeaderValue::from_str(&authority).map_err(|_| ProxyError::Malformed("invalid Host"))?;
            h.insert(header::HOST, host);
            parts.uri = path
                .parse()
                .map_err(|_| ProxyError::Malformed("invalid request target"))?;
            parts.version = Version::HTTP_11;
        }
    }
    let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_error = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let limit = match &call {
        // Read whole before conversion: always bounded.
        Some(_) => Some(
            snap.limits
                .max_request_body
                .map_or(crate::transcode::MAX_REQUEST_BYTES, |l| {
                    l.min(crate::transcode::MAX_REQUEST_BYTES)
                }),
        ),
        None => snap.limits.max_request_body,
    };
    let body: RequestBody = CountingBody {
        inner: body,
        counter: log.bytes_in.clone(),
        limit,
        exceeded: exceeded.clone(),
        client_error: client_error.clone(),
    }
    .boxed_unsync();
    // A gRPC client's deadline bounds our wait too (it is forwarded as well, for the server).
    let timeout =
        grpc_timeout(&parts.headers).map_or(snap.upstream.request_timeout, |d| d.min(snap.upstream.request_timeout));
    let deadline = tokio::time::Instant::now() + timeout;
    let body = match &call {
        // The JSON is converted before anything goes upstream: a bad request never reaches it.
        Some(c) => {
            let read = tokio::time::timeout_at(deadline, body.collect())
                .await
                .map_err(|_| ProxyError::BodyTimeout)?;
            let json = match read {
                Ok(b) => b.to_bytes(),
                Err(_) if exceeded.load(Ordering::SeqCst) => return Err(ProxyError::BodyTooLarge),
                Err(_) => return Err(ProxyError::Malformed("invalid or truncated request body")),
            };
            let grpc = c.encode(&json).map_err(ProxyError::Transcode)?;
            // The service learns meshgate's deadline: what is left of it after the body read.
            parts.headers.insert(
                "grpc-timeout",
                grpc_timeout_header(deadline.saturating_duration_since(tokio::time::Instant::now())),
            );
            tracing::debug!(method = c.method_name(), "transcoded REST request");
            http_body_util::Full::new(grpc).map_err(|e| match e {}).boxed_unsync()
        }
        None => body,
    };
    // A request with no body and an idempotent method can be sent again if the stream is reset
    // after it left (a pod dying, a connection cut): keep what is needed to rebuild it.
    let replay = (parts.method.is_idempotent() && body.is_end_stream()).then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        )
    });
    let upstream_req = Request::from_parts(parts, body);
    if let Some(client_upgrade) = client_upgrade {
        let slot = log.slot.take();
        return upgraded(
            proxy,
            conn,
            service,
            identity,
            upstream_req,
            client_upgrade,
            timeout,
            slot,
        )
        .await;
    }

    let pool = proxy.upstream.pool(identity, service);
    // One deadline for the request and its retry.
    let attempt = async {
        match pool.send(upstream_req).await {
            Err(UpstreamError::Http(reason)) if replay.is_some() && pool.try_retry() => {
                tracing::debug!(service = %service.name, %reason, "upstream stream failed; retrying once on another connection");
                let (method, uri, version, headers) = replay.expect("checked above");
                let mut req = Request::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync());
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.version_mut() = version;
                *req.headers_mut() = headers;
                pool.send(req).await
            }
            other => other,
        }
    };
    let sent = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| UpstreamError::RequestTimeout(timeout))?;
    let (mut resp, lease) = match sent {
        Ok(x) => x,
        Err(_) if exceeded.load(Ordering::SeqCst) => return Err(ProxyError::BodyTooLarge),
        Err(_) if client_error.load(Ordering::SeqCst) => {
            return Err(ProxyError::Malformed("invalid or truncated request body"))
        }
        Err(e) => return Err(e.into()),
    };
    let h = resp.headers_mut();
    strip_hop_by_hop(h);
    h.remove(&MESH_ONLY[1]);
    h.remove(&MESH_ONLY[2]);
    if let Some(c) = call {
        return Ok(match crate::transcode::respond(c, resp, deadline).await {
            Ok(r) => Forwarded::Transcoded(r, lease),
            // Not a gRPC answer (the sidecar's own 403, a 503): passed on as it is.
            Err(resp) => Forwarded::Upstream(resp, lease),
        });
    }
    Ok(Forwarded::Upstream(resp, lease))
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade: X`).
fn requested_upgrade(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req.headers().get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    });
    asks.then(|| req.headers().get(header::UPGRADE).cloned()).flatten()
}

/// An Upgrade request (WebSocket) goes on an upstream HTTP/1.1 connection of its own: after a
/// `101` that connection carries the new protocol and can never return to the pool. Both sides
/// are then spliced as bytes, like a CONNECT tunnel.
#[allow(clippy::too_many_arguments)]
async fn upgraded(
    proxy: &Proxy,
    conn: &ConnInfo,
    service: &crate::config::Service,
    identity: usize,
    req: Request<RequestBody>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    timeout: std::time::Duration,
    slot: Option<Slot>,
) -> Result<Forwarded, ProxyError> {
    let snap = &proxy.snapshot;
    let pool = proxy.upstream.pool(identity, service);
    let stream = dedicated(pool, &proxy.upstream.gateway, pool.tls(), &snap.upstream, conn.client).await?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let http_err = |e: hyper::Error| UpstreamError::Http(e.to_string());
    // The new protocol runs on its own upstream connection either way: an HTTP/1.1 connection
    // after a 101, or an HTTP/2 connection with the one extended-CONNECT stream (the sidecar
    // must have advertised SETTINGS_ENABLE_CONNECT_PROTOCOL, or it refuses the stream).
    let sent = if service.protocol == UpstreamProtocol::Http2 {
        let (mut sender, upstream_conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = upstream_conn.await {
                tracing::debug!(error = %e, "extended CONNECT upstream connection ended with error");
            }
        });
        tokio::time::timeout(timeout, sender.send_request(req)).await
    } else {
        let (mut sender, upstream_conn) = hyper::client::conn::http1::handshake(io).await.map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = upstream_conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgraded upstream connection ended with error");
            }
        });
        tokio::time::timeout(timeout, sender.send_request(req)).await
    };
    let mut resp = sent
        .map_err(|_| UpstreamError::RequestTimeout(timeout))?
        .map_err(http_err)?;
    let h = resp.headers_mut();
    h.remove(&MESH_ONLY[1]);
    h.remove(&MESH_ONLY[2]);
    let switched = match service.protocol {
        UpstreamProtocol::Http2 => resp.status().is_success(),
        _ => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
    };
    if switched {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (metrics, name) = (proxy.metrics.clone(), service.name.clone());
        let (lifetime, close) = (conn.lifetime.clone(), conn.close.clone());
        tokio::spawn(async move {
            // Counted as the client connection, and as a request of its tenant, until it ends.
            let _held = (lifetime, slot);
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let io = (
                        hyper_util::rt::TokioIo::new(client),
                        hyper_util::rt::TokioIo::new(upstream),
                    );
                    run_tunnel(&metrics, &name, io.0, io.1, close).await;
                }
                Err(e) => tracing::debug!(service = %name, error = %e, "upgrade did not complete"),
            }
        });
    } else {
        // Declined: an ordinary response on a connection nobody else will use.
        strip_hop_by_hop(resp.headers_mut());
    }
    Ok(Forwarded::Upgraded(resp))
}

/// Splices a tunnel (CONNECT or an upgraded connection) until both sides are done, it idles
/// out, or the listener's drain deadline passes.
async fn run_tunnel<C, U>(
    metrics: &Metrics,
    service: &str,
    client: C,
    upstream: U,
    close: Option<crate::lifecycle::CloseSignal>,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let cut = async {
        match close {
            Some(mut c) => {
                let (_, deadline) = crate::listener::closing(&mut c).await;
                tokio::time::sleep_until(deadline).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        (result, sent, received) = crate::listener::tcp::splice(client, upstream, TUNNEL_IDLE_TIMEOUT) => {
            crate::listener::tcp::count_bytes_to(metrics, service, sent, received);
            tracing::debug!(%service, result, sent, received, "tunnel closed");
        }
        _ = cut => tracing::debug!(%service, "tunnel cut at the drain deadline"),
    }
}

/// `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit H, M, S, m, u or n).
fn grpc_timeout(h: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`: at most 8 digits, in milliseconds when they fit (`1500m`),
/// else the finest coarser unit; rounded up, so the service never sees less time than is left.
fn grpc_timeout_header(d: std::time::Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let mut n = d.as_nanos().div_ceil(1_000_000);
    let mut unit = "m";
    for (factor, coarser) in [(1000, "S"), (60, "M"), (60, "H")] {
        if n <= MAX {
            break;
        }
        n = n.div_ceil(factor);
        unit = coarser;
    }
    HeaderValue::from_str(&format!("{}{unit}", n.min(MAX))).expect("digits and a letter")
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A refusal as a gRPC client understands it: HTTP 200, no body, and the status in
/// `grpc-status` / `grpc-message` (a "trailers-only" response).
fn grpc_local_response(e: &ProxyError) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(e.grpc_status()));
    let msg = format!("meshgate: {e}");
    h.insert(
        "grpc-message",
        HeaderValue::from_str(&percent_encode(&msg)).unwrap_or(HeaderValue::from_static("meshgate")),
    );
    if let ProxyError::RateLimited { retry_after_secs } = e {
        h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    resp
}

/// `grpc-message` is percent-encoded: everything outside printable ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The tenant's rate limit and concurrency limit for one request or tunnel; the slot returned
/// counts it as in flight until dropped.
fn tenant_limits(proxy: &Proxy, tenant_id: usize) -> Result<Option<Slot>, ProxyError> {
    let tenant = proxy.snapshot.tenants.get(tenant_id);
    let state = &proxy.tenant_state[tenant_id];
    if let Some(rl) = &tenant.rate_limit {
        state
            .take_token(rl, std::time::Instant::now())
            .map_err(|wait| ProxyError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            })?;
    }
    match tenant.max_concurrent_requests {
        Some(max) => Ok(Some(state.enter(max).ok_or(ProxyError::ConcurrencyLimited)?)),
        None => Ok(None),
    }
}

/// What became of a request that was not refused.
// The large variant is the common one: boxing it would add an allocation to every request.
#[allow(clippy::large_enum_variant)]
enum Forwarded {
    Upstream(Response<Incoming>, Lease),
    /// A REST call transcoded to gRPC, its answer converted back to JSON.
    Transcoded(Response<crate::transcode::TranscodedBody>, Lease),
    /// A CONNECT tunnel is set up; it runs once the client's connection is upgraded.
    Tunnel,
    /// The answer to an Upgrade request, from a connection of its own (no pool lease).
    Upgraded(Response<Incoming>),
}

/// A tunnel's idle limit: Envoy's `tcp_proxy` default, as for TCP listeners.
const TUNNEL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// `CONNECT host:port` (an `HTTPS_PROXY` client, a database tool through a proxy): the same
/// tenant rules as any request, then an opaque mTLS connection to that mesh service. Only
/// configured services are reachable (never an open proxy); the upstream connection is made
/// before answering, so failures are proper 502/503s rather than a dead tunnel.
async fn tunnel(
    proxy: &Proxy,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    log: &mut AccessLog,
) -> Result<(), ProxyError> {
    let snap = &proxy.snapshot;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or(ProxyError::Malformed("CONNECT needs a host:port target"))?;
    log.authority = authority.chars().take(255).collect();
    let (host, port) = crate::route::split_authority(&authority)?;
    let port = port.ok_or(ProxyError::Malformed("CONNECT target needs a port"))?;
    let key = presented_key(req.headers(), &snap.api_key_header)?;
    let tenant_id = snap
        .tenants
        .authorize(conn.client.ip(), key.as_ref().map(|k| &k.0), conn.vpce.as_deref())?;
    let tenant = snap.tenants.get(tenant_id);
    log.tenant = Some(tenant.name.clone());
    // HTTP services by their routes; TCP services (never HTTP-routed) by host or alias and port.
    // Only the service's own port: routing otherwise tolerates any port on an unambiguous
    // host, which for a tunnel would quietly connect somewhere the client did not name. HTTP
    // services by their routes; TCP services (never HTTP-routed) by host or alias and port.
    let http = snap
        .routes
        .resolve(&authority)
        .ok()
        .filter(|id| snap.services[*id].port == port);
    let service_id = match http {
        Some(id) => id,
        None => snap
            .services
            .iter()
            .find(|s| {
                s.protocol == UpstreamProtocol::Tcp && s.port == port && (s.host == host || s.aliases.contains(&host))
            })
            .map(|s| s.id)
            .ok_or(RouteError::UnknownHost)?,
    };
    let service = &snap.services[service_id];
    log.service = Some(service.name.clone());
    if !snap.tenants.allows(tenant_id, service_id) {
        return Err(Deny::ServiceNotAllowed.into());
    }
    let slot = tenant_limits(proxy, tenant_id)?;
    let pool = proxy.upstream.pool(tenant.identity, service);
    let upstream = dedicated(
        pool,
        &proxy.upstream.gateway,
        pool.opaque_tls(),
        &snap.upstream,
        conn.client,
    )
    .await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (metrics, name, client) = (proxy.metrics.clone(), service.name.clone(), conn.client);
    let (lifetime, close) = (conn.lifetime.clone(), conn.close.clone());
    tokio::spawn(async move {
        let _held = (lifetime, slot);
        match on_upgrade.await {
            Ok(upgraded) => {
                run_tunnel(&metrics, &name, hyper_util::rt::TokioIo::new(upgraded), upstream, close).await;
            }
            Err(e) => tracing::debug!(service = %name, %client, error = %e, "CONNECT upgrade failed"),
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed_including_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Bearer k".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, "trailers, gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn grpc_timeouts_and_messages() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h)
        };
        use std::time::Duration;
        assert_eq!(t("300m"), Some(Duration::from_millis(300)));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("1M"), Some(Duration::from_secs(60)));
        assert_eq!(t("10u"), Some(Duration::from_micros(10)));
        assert_eq!(t("10n"), Some(Duration::from_nanos(10)));
        for bad in ["", "m", "5", "5s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(percent_encode("a b%c\u{e9}\n"), "a b%25c%C3%A9%0A");
    }

    #[test]
    fn grpc_timeout_values() {
        use std::time::Duration;
        let f = |d: Duration| grpc_timeout_header(d).to_str().unwrap().to_string();
        let cases = [
            (Duration::from_millis(1500), "1500m"),
            (Duration::from_secs(30), "30000m"),
            (Duration::ZERO, "0m"),
            // Rounded up: never less time than is left.
            (Duration::from_nanos(1), "1m"),
            (Duration::from_micros(1_500_300), "1501m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_millis(100_000_000), "100000S"),
            (Duration::from_millis(100_000_001), "100001S"),
            (Duration::from_secs(100_000_000), "1666667M"),
            (Duration::from_secs(6_000_000_000), "1666667H"),
            (Duration::MAX, "99999999H"),
        ];
        for (d, want) in cases {
            let v = f(d);
            assert_eq!(v, want, "{d:?}");
            // What meshgate writes, meshgate (and any gRPC server) reads back.
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(&v).unwrap());
            let back = grpc_timeout(&h).expect(&v);
            assert!(back >= d.min(Duration::from_secs(99_999_999 * 3600)), "{d:?} -> {v}");
        }
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_ne!(new_request_id(), id);
    }
}

//! The per-request pipeline: generation → authorize → resolve → send → record. Every listener
//! (HTTP/1.1, h2c, HTTP/3, TCP) hands its requests and tunnels here; nothing here knows which
//! listener a request came from beyond [`ConnInfo`].
//!
//! Decisions come from the pure functions in `policy` and `route`; this module only extracts
//! their inputs from the request, rewrites headers for the hop into the mesh (`headers.rs`),
//! and wraps the bodies so bytes are counted and the access-log line is written when the
//! response ends (`body.rs`, `log.rs`). Tunnels are in `tunnel.rs`, gRPC specifics in `grpc.rs`.

mod body;
mod conn;
mod grpc;
mod headers;
mod log;
pub mod tunnel;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;

use body::{local_response, CountingBody, Inner};
pub use body::{RequestTooLarge, ResponseBody};
pub use conn::ConnInfo;
use grpc::{grpc_local_response, grpc_timeout, grpc_timeout_header, is_grpc};
pub(crate) use headers::strip_hop_by_hop;
use headers::{
    authority_of, declared_length, new_request_id, requested_upgrade, strip_client_controls, strip_mesh_response,
    X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID,
};
use log::AccessLog;
pub use tunnel::ClientUpgrade;

use crate::config::{Service, UpstreamProtocol};
use crate::error::ProxyError;
use crate::policy::keys::presented_key;
use crate::policy::limits::Slot;
use crate::policy::Deny;
use crate::route::{Route, RouteError};
use crate::runtime::Generation;
use crate::upstream::{BoxError, Lease, Pool, RequestBody, UpstreamBody, UpstreamError};

/// The access log a request starts with, before anything about it is decided.
fn start_log<B>(
    gen: &Arc<Generation>,
    conn: &Arc<ConnInfo>,
    req: &Request<B>,
    request_id: &HeaderValue,
) -> Box<AccessLog> {
    gen.metrics.requests_in_flight.inc();
    if conn.requests.fetch_add(1, Ordering::Relaxed) == 0 {
        conn.preface.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    conn.in_flight.fetch_add(1, Ordering::Relaxed);
    if req.version() >= Version::HTTP_2 {
        conn.is_h2.store(true, Ordering::Relaxed);
    }
    Box::new(AccessLog {
        gen: gen.clone(),
        conn: conn.clone(),
        tenant: None,
        service: None,
        method: req.method().clone(),
        authority: String::new(),
        uri: req.uri().clone(),
        path_override: None,
        request_id: request_id.clone(),
        status: 0,
        reason: "",
        started: Instant::now(),
        bytes_in: Arc::new(AtomicU64::new(0)),
        bytes_out: 0,
        reused: None,
        slot: None,
    })
}

fn request_id<B>(req: &Request<B>) -> HeaderValue {
    req.headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// Serves one request; every error becomes a response. `upgrade` is how the listener hands
/// over the client connection if the request opens a tunnel (CONNECT, Upgrade, extended
/// CONNECT); without it such requests are refused.
pub async fn handle<B>(
    gen: Arc<Generation>,
    conn: Arc<ConnInfo>,
    req: Request<B>,
    upgrade: Option<ClientUpgrade>,
) -> Response<ResponseBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let id = request_id(&req);
    let mut log = start_log(&gen, &conn, &req, &id);
    let h1 = req.version() < Version::HTTP_2;
    let grpc = is_grpc(req.headers());
    let result = forward(&gen, &conn, req, id, upgrade, &mut log).await;
    respond(&gen, &conn, h1, grpc, log, result)
}

/// Refuses a request the listener has already judged (its framing cannot be trusted, say)
/// with the same response, log line and metrics as a refusal from the pipeline itself.
pub fn refuse<B>(
    gen: &Arc<Generation>,
    conn: &Arc<ConnInfo>,
    req: &Request<B>,
    e: ProxyError,
) -> Response<ResponseBody> {
    let id = request_id(req);
    let log = start_log(gen, conn, req, &id);
    let h1 = req.version() < Version::HTTP_2;
    respond(gen, conn, h1, is_grpc(req.headers()), log, Err(e))
}

/// Refuses a request whose head could not be read (malformed, too large, not in time): the
/// log line has no method or path, only the reason.
pub fn refuse_head(gen: &Arc<Generation>, conn: &Arc<ConnInfo>, e: ProxyError) -> Response<ResponseBody> {
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(b"-").expect("a valid token");
    *req.uri_mut() = Uri::from_static("/-");
    let mut resp = refuse(gen, conn, &req, e);
    if let Some(log) = resp.body_mut().log.as_mut() {
        log.path_override = Some("-");
    }
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn respond(
    gen: &Generation,
    conn: &ConnInfo,
    h1: bool,
    grpc: bool,
    mut log: Box<AccessLog>,
    result: Result<Forwarded, ProxyError>,
) -> Response<ResponseBody> {
    let mut refused_malformed = false;
    let mut resp = match result {
        Ok(Forwarded::Upgraded(resp)) => {
            log.status = resp.status().as_u16();
            let (parts, body) = resp.into_parts();
            Response::from_parts(
                parts,
                ResponseBody {
                    inner: Inner::Upstream(UpstreamBody::H1(body)),
                    lease: None,
                    log: None,
                },
            )
        }
        Ok(Forwarded::Tunnel) => {
            // No body with a 2xx to CONNECT: the connection becomes the tunnel after it.
            log.status = 200;
            Response::new(ResponseBody::local(Bytes::new()))
        }
        Ok(Forwarded::Upstream(resp, lease)) => leased(gen, &mut log, resp, lease, Inner::Upstream),
        Ok(Forwarded::Transcoded(resp, lease)) => leased(gen, &mut log, resp, lease, Inner::Transcoded),
        Err(e) => {
            // Also after a body that did not arrive in time: the rest of it may still come.
            // And after a refusal of a client that is in no tenant: its next request on the
            // connection would be refused too.
            refused_malformed = matches!(e.status(), StatusCode::BAD_REQUEST | StatusCode::REQUEST_TIMEOUT)
                || matches!(e, ProxyError::Policy(Deny::UnknownClient));
            log.status = e.status().as_u16();
            log.reason = e.reason();
            if e.status().is_server_error() {
                tracing::warn!(service = gen.request_metrics.service_name(log.service), error = %e, "upstream request failed");
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
    // The id the mesh saw (the client's own, or the one meshgate gave the request), so a VM
    // can quote it when asking about a request.
    resp.headers_mut().insert(&X_REQUEST_ID, log.request_id.clone());
    resp.body_mut().log = Some(log);
    // After a malformed request the rest of the connection's bytes cannot be trusted to be
    // framed the way the client meant: close it.
    if h1 && (conn.closing.load(Ordering::SeqCst) || refused_malformed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A response that came over a pooled upstream stream: counted, logged, and holding its lease
/// until the body is done.
fn leased<B>(
    gen: &Generation,
    log: &mut AccessLog,
    resp: Response<B>,
    lease: Lease,
    inner: impl FnOnce(B) -> Inner,
) -> Response<ResponseBody> {
    log.reused = Some(lease.reused);
    if let Some(service) = log.service {
        gen.request_metrics.record_upstream_request(service, lease.reused);
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

/// The tenant's rate limit and concurrency limit for one request or tunnel; the slot returned
/// counts it as in flight until dropped.
fn tenant_limits(gen: &Generation, tenant_id: usize) -> Result<Option<Slot>, ProxyError> {
    let tenant = gen.tenants.get(tenant_id);
    let state = &gen.tenant_state[tenant_id];
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
    Upstream(Response<UpstreamBody>, Lease),
    /// A REST call transcoded to gRPC, its answer converted back to JSON.
    Transcoded(Response<crate::transcode::TranscodedBody>, Lease),
    /// A CONNECT tunnel is set up; it runs once the client's connection is handed over.
    Tunnel,
    /// The answer to an Upgrade request, from a connection of its own (no pool lease).
    Upgraded(Response<hyper::body::Incoming>),
}

async fn forward<B>(
    gen: &Generation,
    conn: &ConnInfo,
    req: Request<B>,
    request_id: HeaderValue,
    upgrade: Option<ClientUpgrade>,
    log: &mut AccessLog,
) -> Result<Forwarded, ProxyError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let snap = &gen.snapshot;
    // Plain CONNECT opens a byte tunnel; extended CONNECT (RFC 8441, `:protocol`) is a request
    // to a service like any other, upgraded below.
    let extended = req.extensions().get::<hyper::ext::Protocol>().is_some();
    if req.method() == Method::CONNECT && !extended {
        // Boxed, as every rare path here: a future is as large as its largest state, and the
        // common request should not pay for a TLS handshake's.
        return Box::pin(tunnel::connect(gen, conn, req, upgrade, log)).await;
    }
    let mut authority = authority_of(&req)?;
    let cut = (0..=authority.len().min(255))
        .rev()
        .find(|i| authority.is_char_boundary(*i))
        .unwrap_or(0);
    authority.truncate(cut);

    let key = presented_key(req.headers(), &snap.api_key_header)?;
    let tenant_id = gen
        .tenants
        .authorize(conn.client.ip(), key.as_ref().map(|k| &k.0), conn.vpce.as_deref())?;
    log.tenant = Some(tenant_id);
    let route = gen.routes.resolve(&authority, |id| gen.tenants.allows(tenant_id, id));
    // The log keeps the client's spelling; upstream, the service's canonical one is used.
    log.authority = authority;
    let route = route?;
    let service_id = route.service();
    let listed = &snap.services[service_id];
    log.service = Some(service_id);
    if !gen.tenants.allows(tenant_id, service_id) {
        return Err(Deny::ServiceNotAllowed.into());
    }
    let identity = gen.tenants.get(tenant_id).identity;
    // A listed service with a declared protocol has its pool; a pattern's host, or a service
    // whose protocol mirrors the client's, has a pool per destination, made on demand.
    let made;
    let (service, pool): (&Service, &Arc<Pool>) = if listed.is_dynamic() {
        let (host, port) = match &route {
            Route::Pattern { host, port, .. } => (host.as_str(), *port),
            Route::Service(_) => (listed.host.as_str(), listed.port),
        };
        let protocol = match listed.protocol {
            UpstreamProtocol::Auto if req.version() < Version::HTTP_2 => UpstreamProtocol::Http1,
            UpstreamProtocol::Auto => UpstreamProtocol::Http2,
            declared => declared,
        };
        made = gen
            .upstream
            .destination(snap, identity, listed, host, port, protocol)
            .ok_or(RouteError::UnknownHost)?;
        (made.service(), &made)
    } else {
        (listed, gen.upstream.pool(identity, listed))
    };
    log.slot = tenant_limits(gen, tenant_id)?;
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
    let upgrade_to = requested_upgrade(&req);
    if upgrade_to.is_some() && service.protocol != UpstreamProtocol::Http1 {
        return Err(ProxyError::Malformed(
            "Upgrade (WebSocket over HTTP/1.1) needs an http1 service; for an http2 service use HTTP/2 extended CONNECT",
        ));
    }
    // RFC 8441: WebSocket (or another protocol) over one HTTP/2 stream, carried to an h2 service
    // as the same extended CONNECT.
    if extended && service.protocol != UpstreamProtocol::Http2 {
        return Err(ProxyError::Malformed(
            "extended CONNECT (RFC 8441) needs an http2 service; for an http1 service use an HTTP/1.1 Upgrade",
        ));
    }
    let client_upgrade = if upgrade_to.is_some() || extended {
        Some(upgrade.ok_or(ProxyError::Malformed(
            "protocol upgrades are not available on this listener",
        ))?)
    } else {
        None
    };

    let (mut parts, body) = req.into_parts();
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    if let Some(protocol) = &upgrade_to {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, protocol.clone());
    }
    strip_client_controls(h, &snap.api_key_header);
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let ip = conn.client.ip().to_canonical();
            HeaderValue::from_str(&format!("{prev}, {ip}")).map_err(|_| ProxyError::Malformed("bad X-Forwarded-For"))?
        }
        _ => conn.client_ip.clone(),
    };
    // `insert` replaces every value the client sent.
    h.insert(&X_FORWARDED_FOR, xff);
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(conn.scheme));
    h.insert(&X_REQUEST_ID, request_id);
    if let Some(m) = &gen.peer_metadata[tenant_id] {
        h.insert(&crate::telemetry::PEER_METADATA, m.header.clone());
        h.insert(&crate::telemetry::PEER_METADATA_ID, m.id.clone());
    }
    crate::telemetry::ensure_trace_context(h, snap.tracing.sample_rate);

    let path = match &call {
        Some(c) => {
            c.grpc_headers(h);
            parts.method = Method::POST;
            http::uri::PathAndQuery::try_from(c.grpc_path())
                .map_err(|_| ProxyError::Malformed("invalid request target"))?
        }
        None => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    };
    match service.protocol {
        UpstreamProtocol::Http2 => {
            h.remove(header::HOST);
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(service.authority.clone());
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::Malformed("invalid request target"))?;
            parts.version = Version::HTTP_2;
        }
        UpstreamProtocol::Tcp => {
            return Err(ProxyError::Malformed("this service is TCP: use its TCP listener"));
        }
        UpstreamProtocol::Http1 | UpstreamProtocol::Auto => {
            let host =
                HeaderValue::from_str(service.authority.as_str()).map_err(|_| ProxyError::Malformed("invalid Host"))?;
            h.insert(header::HOST, host);
            parts.uri = Uri::from(path);
            parts.version = Version::HTTP_11;
        }
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    let client_error = Arc::new(AtomicBool::new(false));
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
            let read = Box::pin(tokio::time::timeout_at(deadline, body.collect()))
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
        return Box::pin(tunnel::upgraded(
            gen,
            conn,
            pool,
            upstream_req,
            client_upgrade,
            timeout,
            slot,
        ))
        .await;
    }

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
    if listed.is_dynamic() {
        // Counted once the mesh answered: only hosts that exist take a `host` label.
        gen.metrics
            .record_dynamic_request(&service.name, &service.host, snap.upstream.max_metric_hosts);
    }
    let h = resp.headers_mut();
    strip_hop_by_hop(h);
    strip_mesh_response(h);
    if let Some(c) = call {
        return Ok(match Box::pin(crate::transcode::respond(c, resp, deadline)).await {
            Ok(r) => Forwarded::Transcoded(r, lease),
            // Not a gRPC answer (the sidecar's own 403, a 503): passed on as it is.
            Err(resp) => Forwarded::Upstream(resp, lease),
        });
    }
    Ok(Forwarded::Upstream(resp, lease))
}

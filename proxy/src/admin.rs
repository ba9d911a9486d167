//! The admin server (axum), on its own bind, never on a VM-facing listener:
//! `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /config`, `GET /pool`,
//! `POST /reload`, `POST /drain`, `POST /explain`. With `admin.token_file` set, everything but
//! `/healthz`, `/readyz` and `/metrics` requires `Authorization: Bearer <token>`. Request heads
//! must arrive within `limits.header_read_timeout`. Connections from a listener's `trusted_proxies` may start with a
//! PROXY header (load balancer health checks).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::net::TcpListener;

use crate::config::{Allow, Snapshot};
use crate::identity::rfc3339;
use crate::io::Prefixed;
use crate::proxy_protocol::{read_header, Mode, HEADER_TIMEOUT};
use crate::runtime::{Control, Runtime};

/// What the handlers share: the runtime (config, metrics, pools) and the operations on it.
#[derive(Clone)]
struct Admin {
    runtime: Arc<Runtime>,
    control: Arc<dyn Control>,
}

/// Endpoints open without the token: health checks and scrapes.
fn open_endpoint(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

pub async fn serve(listener: TcpListener, runtime: Arc<Runtime>, control: Arc<dyn Control>) {
    let app = Admin { runtime, control };
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .route("/pool", get(pool))
        .route("/reload", post(reload))
        .route("/drain", post(drain))
        .route("/explain", post(explain))
        .layer(axum::middleware::from_fn_with_state(app.clone(), require_token))
        .with_state(app.clone());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        // A load balancer that sends PROXY protocol v2 to the proxy listeners (AWS NLB with
        // proxy protocol on) sends it on its health checks too, including to another port: so
        // connections from the listeners' `trusted_proxies` may start with a PROXY header, which
        // is read and dropped (optional, never required: Prometheus and operators connect
        // without one).
        let gen = app.runtime.current();
        let trusted = gen
            .snapshot
            .listeners
            .iter()
            .any(|l| l.proxy_protocol != Mode::Off && l.trusted_proxies.iter().any(|n| n.contains(&ip)));
        // Slowloris on the admin port: request heads are held to the same limit as clients'.
        let head_timeout = gen.snapshot.limits.header_read_timeout;
        drop(gen);
        let router = router.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let prefix = if trusted {
                match read_header(&mut stream, false, HEADER_TIMEOUT).await {
                    Ok((_, rest)) => rest,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "admin: PROXY header rejected; closing");
                        return;
                    }
                }
            } else {
                bytes::Bytes::new()
            };
            let io = TokioIo::new(Prefixed::new(prefix, stream));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(io, TowerToHyperService::new(router))
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "admin connection ended with error");
            }
        });
    }
}

/// With `admin.token_file` set, every endpoint but health, readiness and metrics needs
/// `Authorization: Bearer <token>`: `/config` lists every tenant's sources and identities, and
/// the POSTs change the running instance.
async fn require_token(
    State(app): State<Admin>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !open_endpoint(req.uri().path()) && !authorized(&app, req.headers()) {
        return text(StatusCode::UNAUTHORIZED, "admin token required\n".into());
    }
    next.run(req).await
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// Compares digests so the comparison time does not depend on how much of the token matched.
fn authorized(app: &Admin, headers: &HeaderMap) -> bool {
    let gen = app.runtime.current();
    let Some(token) = gen.snapshot.admin.as_ref().and_then(|a| a.token.as_ref()) else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    sha2::Sha256::digest(presented.trim().as_bytes()) == sha2::Sha256::digest(token.as_bytes())
}

async fn readyz(State(app): State<Admin>) -> Response {
    match app.control.not_ready_reason() {
        None => {
            app.runtime.metrics.ready.set(1);
            text(StatusCode::OK, "ready\n".into())
        }
        Some(r) => {
            app.runtime.metrics.ready.set(0);
            text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n"))
        }
    }
}

async fn metrics(State(app): State<Admin>) -> Response {
    let gen = app.runtime.current();
    app.runtime
        .metrics
        .ready
        .set(i64::from(app.control.not_ready_reason().is_none()));
    let rows = gen.upstream.pool_rows();
    app.runtime
        .metrics
        .set_dynamic_destinations(&gen.upstream.destination_rows(&gen.snapshot));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.runtime.metrics.encode_with_pools(Some(&rows)),
    )
        .into_response()
}

async fn reload(State(app): State<Admin>) -> Response {
    match app.control.clone().request_reload().await {
        Ok(()) => text(StatusCode::OK, "reloaded\n".into()),
        Err(errs) => text(StatusCode::BAD_REQUEST, format!("{errs}\n")),
    }
}

async fn drain(State(app): State<Admin>) -> Response {
    let started = !app.runtime.lifecycle.is_draining();
    // The drain outlives this request; the instance stays up (admin included) once drained, so
    // a supervisor restart does not bring it back into rotation while it is being removed.
    tokio::spawn(app.control.clone().request_drain());
    text(
        StatusCode::ACCEPTED,
        if started { "draining\n" } else { "already draining\n" }.into(),
    )
}

/// A POST with a JSON body rather than a GET, so an API key never lands in a URL (and in access
/// logs on the way); behind the token because the answer reveals tenants and their sources.
async fn explain(State(app): State<Admin>, body: axum::body::Bytes) -> Response {
    let query: crate::explain::Query = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("invalid explain request: {e}\n")),
    };
    match query.answer(&app.runtime.current().snapshot) {
        Ok(e) => axum::Json(e).into_response(),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid explain request: {e}\n")),
    }
}

async fn pool(State(app): State<Admin>) -> Response {
    let gen = app.runtime.current();
    let up = &gen.upstream;
    let dynamic: Vec<_> = up.destinations();
    let row = |p: &crate::upstream::Pool| {
        let s = p.stats();
        let svc = p.service();
        json!({
            "service": s.service,
            "host": svc.host,
            "port": svc.port,
            "sni": svc.sni,
            "protocol": format!("{:?}", svc.protocol).to_lowercase(),
            "server_identity": svc.expected_server.to_string(),
            "gateway": up.gateway.target().to_string(),
            "gateway_addresses": up.gateway.addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "gateway_ejected": up.gateway.ejected().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "dialing": s.dialing,
            "connects_ok": s.connects_ok,
            "connects_failed": s.connects_failed,
            "connections": s.connections.iter().map(|c| json!({
                "id": c.id,
                "gateway_address": c.gateway.to_string(),
                "age_seconds": c.age.as_secs_f64(),
                "streams_in_use": c.streams_in_use,
            })).collect::<Vec<_>>(),
        })
    };
    let pools: Vec<Value> = up.listed_pools().map(|p| row(p)).collect();
    // Made on demand for host patterns and `protocol: auto`, most recently used first.
    let destinations: Vec<Value> = dynamic
        .iter()
        .map(|(k, p)| {
            let mut v = row(p);
            v["tenant_identity"] = json!(gen.snapshot.identity_at(k.identity).spiffe_id);
            v
        })
        .collect();
    axum::Json(json!({
        "pools": pools,
        "dynamic_destinations": destinations,
        "max_dynamic_destinations": gen.snapshot.upstream.max_dynamic_destinations,
    }))
    .into_response()
}

async fn config(State(app): State<Admin>) -> Response {
    axum::Json(effective_config(&app.runtime.current().snapshot)).into_response()
}

/// The running config as JSON, with secrets (key hashes, key and token paths) redacted.
pub fn effective_config(s: &Snapshot) -> Value {
    let services: serde_json::Map<String, Value> = s
        .services
        .iter()
        .map(|svc| {
            (
                svc.name.clone(),
                match &svc.pattern {
                    Some(p) => json!({
                        "host": svc.host,
                        "ports": p.ports,
                        "protocol": format!("{:?}", svc.protocol).to_lowercase(),
                        "identity": svc.server_rule(),
                        "sni": "outbound_.PORT_._.HOST",
                    }),
                    None => json!({
                        "host": svc.host,
                        "port": svc.port,
                        "protocol": format!("{:?}", svc.protocol).to_lowercase(),
                        "subset": svc.subset,
                        "identity": svc.expected_server.to_string(),
                        "aliases": svc.aliases,
                        "sni": svc.sni,
                    }),
                },
            )
        })
        .collect();
    let tenants: serde_json::Map<String, Value> = s
        .tenants
        .iter()
        .map(|t| {
            let allow = match &t.allow {
                Allow::All => vec!["*".to_string()],
                Allow::Services(v) => s
                    .services
                    .iter()
                    .filter(|svc| v[svc.id])
                    .map(|svc| svc.name.clone())
                    .collect(),
            };
            (
                t.name.clone(),
                json!({
                    "sources": t.sources.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                    "api_keys": t.key_hashes.iter().map(|_| "<redacted>").collect::<Vec<_>>(),
                    "allow": allow,
                    "identity": s.identity_at(t.identity).spiffe_id,
                }),
            )
        })
        .collect();
    let u = &s.upstream;
    json!({
        "path": s.path.display().to_string(),
        "listeners": s.listeners.iter().map(|l| json!({
            "name": l.name, "bind": l.bind.to_string(), "protocol": format!("{:?}", l.protocol).to_lowercase(),
            "tls_cert_chain": l.tls.as_ref().map(|t| t.cert_chain.display().to_string()),
            "alt_svc": l.alt_svc.as_ref().and_then(|v| v.to_str().ok()),
        })).collect::<Vec<_>>(),
        "admin": s.admin.as_ref().map(|a| json!({
            "bind": a.bind.to_string(),
            "token": a.token.as_ref().map(|_| "<redacted>"),
        })),
        "mesh": {
            "trust_domain": s.trust_domain,
            "gateway": s.gateway.to_string(),
            "gateway_refresh_seconds": s.gateway_refresh.as_secs_f64(),
            "identity": {
                "spiffe_id": s.identity.spiffe_id,
                "not_after": rfc3339(s.identity.not_after),
                "cert_chain": s.identity.paths.cert_chain.display().to_string(),
                "key": "<redacted>",
                "root_cert": s.identity.paths.root_cert.display().to_string(),
                "issuer": s.identity.issuer.as_ref().map(|i| i.describe()),
            },
        },
        "services": services,
        "tenants": tenants,
        "api_key_header": s.api_key_header.as_str(),
        "upstream": {
            "connect_timeout_seconds": u.connect_timeout.as_secs_f64(),
            "handshake_timeout_seconds": u.handshake_timeout.as_secs_f64(),
            "request_timeout_seconds": u.request_timeout.as_secs_f64(),
            "idle_timeout_seconds": u.idle_timeout.as_secs_f64(),
            "max_connection_age_seconds": u.max_connection_age.as_secs_f64(),
            "max_connection_age_jitter": u.max_connection_age_jitter,
            "min_connections": u.min_connections,
            "max_connections": u.max_connections,
            "target_streams_per_connection": u.target_streams_per_connection,
            "max_streams_per_connection": u.max_streams_per_connection,
            "http1_max_connections": u.http1_max_connections,
        },
        "drain": {
            "delay_seconds": s.drain.delay.as_secs_f64(),
            "spread_seconds": s.drain.spread.as_secs_f64(),
            "timeout_seconds": s.drain.timeout.as_secs_f64(),
        },
        "reload": { "watch": s.reload.watch, "interval_seconds": s.reload.interval.as_secs_f64() },
    })
}

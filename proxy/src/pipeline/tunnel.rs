//! Byte tunnels: `CONNECT host:port` on an HTTP listener, HTTP/1.1 upgrades (WebSocket) and
//! HTTP/2 extended CONNECT, and the connections of TCP listeners. Each gets an upstream
//! connection of its own (nothing to multiplex in a byte stream), under the same tenant rules
//! and limits as a request, and is spliced until both sides are done, it idles out, or the
//! listener's drain deadline passes.

use std::future::Future;
use std::net::SocketAddr;

use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::headers::strip_mesh_response;
use super::log::{AccessLog, TunnelLog};
use super::{tenant_limits, ConnInfo, Forwarded};
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::io::{splice, Io};
use crate::lifecycle::CloseSignal;
use crate::metrics::Metrics;
use crate::policy::keys::presented_key;
use crate::policy::limits::Slot;
use crate::policy::Deny;
use crate::route::{Route, RouteError};
use crate::runtime::Generation;
use crate::upstream::{Pool, RequestBody, UpstreamError};

/// The client's side of a tunnel, once the response that opens it has been sent: the listener
/// that owns the client connection hands it over this way.
pub struct ClientUpgrade(crate::runtime::BoxFuture<'static, std::io::Result<Box<dyn Io>>>);

impl ClientUpgrade {
    pub fn new(f: impl Future<Output = std::io::Result<Box<dyn Io>>> + Send + 'static) -> ClientUpgrade {
        ClientUpgrade(Box::pin(f))
    }

    /// hyper's upgrade of a request it served (HTTP/1.1 upgrades and CONNECT, HTTP/2 extended
    /// CONNECT).
    pub fn hyper<B>(req: &mut Request<B>) -> ClientUpgrade {
        let on = hyper::upgrade::on(req);
        ClientUpgrade::new(async move {
            let upgraded = on.await.map_err(std::io::Error::other)?;
            Ok(Box::new(hyper_util::rt::TokioIo::new(upgraded)) as Box<dyn Io>)
        })
    }

    async fn get(self) -> std::io::Result<Box<dyn Io>> {
        self.0.await
    }
}

/// A tunnel's idle limit: Envoy's `tcp_proxy` default, as for TCP listeners.
const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Splices a tunnel until both sides are done, it idles out, or the listener's drain deadline
/// passes.
async fn run_tunnel<C: Io, U: Io>(
    metrics: &Metrics,
    service: &str,
    client: C,
    upstream: U,
    idle: Duration,
    close: Option<CloseSignal>,
) -> (&'static str, u64, u64) {
    let cut = async {
        match close {
            Some(mut c) => {
                let (_, deadline) = crate::lifecycle::closing(&mut c).await;
                tokio::time::sleep_until(deadline).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        (result, sent, received) = splice(client, upstream, idle) => {
            metrics.record_bytes(service, sent, received);
            tracing::debug!(%service, result, sent, received, "tunnel closed");
            (result, sent, received)
        }
        _ = cut => {
            tracing::debug!(%service, "tunnel cut at the drain deadline");
            ("drained", 0, 0)
        }
    }
}

/// `CONNECT host:port` (an `HTTPS_PROXY` client, a database tool through a proxy): the same
/// tenant rules as any request, then an opaque mTLS connection to that mesh service. Only
/// configured services are reachable (never an open proxy); the upstream connection is made
/// before answering, so failures are proper 502/503s rather than a dead tunnel.
pub(super) async fn connect<B>(
    gen: &Generation,
    conn: &ConnInfo,
    req: Request<B>,
    upgrade: Option<ClientUpgrade>,
    log: &mut AccessLog,
) -> Result<Forwarded, ProxyError> {
    let snap = &gen.snapshot;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or(ProxyError::Malformed("CONNECT needs a host:port target"))?;
    log.authority = authority.chars().take(255).collect();
    let (host, port) = crate::route::split_authority(&authority)?;
    let port = port.ok_or(ProxyError::Malformed("CONNECT target needs a port"))?;
    let key = presented_key(req.headers(), &snap.api_key_header)?;
    let tenant_id = gen
        .tenants
        .authorize(conn.client.ip(), key.as_ref().map(|k| &k.0), conn.vpce.as_deref())?;
    let tenant = gen.tenants.get(tenant_id);
    log.tenant = Some(tenant_id);
    // TCP services by host or alias and their own port (routing otherwise tolerates any port
    // on an unambiguous host, which for a tunnel would quietly connect somewhere the client did
    // not name). An HTTP service is refused: inside a tunnel its requests would skip every
    // header rule (identity headers, X-Forwarded-For, the key header, x-envoy-*).
    let allowed = |id| gen.tenants.allows(tenant_id, id);
    let (service_id, destination) = match crate::route::tcp_service(&snap.services, &host, port) {
        Some(id) => (id, None),
        None => match gen.routes.resolve_tcp_pattern(&host, port, allowed) {
            Some(Route::Pattern { service, host, port }) => (service, Some((host, port))),
            _ => {
                let http = gen.routes.resolve(&authority, |_| true).ok().filter(|r| match r {
                    Route::Service(id) => snap.services[*id].port == port,
                    Route::Pattern { .. } => true,
                });
                if let Some(r) = http {
                    log.service = Some(r.service());
                    return Err(ProxyError::ConnectToHttpService);
                }
                return Err(RouteError::UnknownHost.into());
            }
        },
    };
    log.service = Some(service_id);
    if !allowed(service_id) {
        return Err(Deny::ServiceNotAllowed.into());
    }
    let upgrade = upgrade.ok_or(ProxyError::Malformed("CONNECT is not available on this listener"))?;
    let slot = tenant_limits(gen, tenant_id)?;
    let listed = &snap.services[service_id];
    let made;
    let pool = match &destination {
        Some((host, port)) => {
            made = gen
                .upstream
                .destination(snap, tenant.identity, listed, host, *port, UpstreamProtocol::Tcp)
                .ok_or(RouteError::UnknownHost)?;
            &made
        }
        None => gen.upstream.pool(tenant.identity, listed),
    };
    let service = pool.service();
    let upstream = pool
        .dedicated(true, conn.client, gen.peer_metadata[tenant_id].as_deref())
        .await?;
    let (metrics, name, client) = (gen.metrics.clone(), service.name.clone(), conn.client);
    let (lifetime, close) = (conn.lifetime.clone(), conn.close.clone());
    tokio::spawn(async move {
        let _held = (lifetime, slot);
        match upgrade.get().await {
            Ok(io) => {
                run_tunnel(&metrics, &name, io, upstream, TUNNEL_IDLE_TIMEOUT, close).await;
            }
            Err(e) => tracing::debug!(service = %name, %client, error = %e, "CONNECT upgrade failed"),
        }
    });
    Ok(Forwarded::Tunnel)
}

/// An Upgrade request (WebSocket) goes on an upstream connection of its own: after a `101`
/// that connection carries the new protocol and can never return to the pool. Both sides are
/// then spliced as bytes, like a CONNECT tunnel.
pub(super) async fn upgraded(
    gen: &Generation,
    conn: &ConnInfo,
    pool: &Pool,
    req: Request<RequestBody>,
    client_upgrade: ClientUpgrade,
    timeout: Duration,
    slot: Option<Slot>,
) -> Result<Forwarded, ProxyError> {
    let service = pool.service();
    let stream = pool.dedicated(false, conn.client, None).await?;
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
    let mut resp: Response<Incoming> = sent
        .map_err(|_| UpstreamError::RequestTimeout(timeout))?
        .map_err(http_err)?;
    strip_mesh_response(resp.headers_mut());
    let switched = match service.protocol {
        UpstreamProtocol::Http2 => resp.status().is_success(),
        _ => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
    };
    if switched {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (metrics, name) = (gen.metrics.clone(), service.name.clone());
        let (lifetime, close) = (conn.lifetime.clone(), conn.close.clone());
        tokio::spawn(async move {
            // Counted as the client connection, and as a request of its tenant, until it ends.
            let _held = (lifetime, slot);
            let upstream_upgrade = async { upstream_upgrade.await.map_err(std::io::Error::other) };
            match tokio::try_join!(client_upgrade.get(), upstream_upgrade) {
                Ok((client, upstream)) => {
                    let upstream = hyper_util::rt::TokioIo::new(upstream);
                    run_tunnel(&metrics, &name, client, upstream, TUNNEL_IDLE_TIMEOUT, close).await;
                }
                Err(e) => tracing::debug!(service = %name, error = %e, "upgrade did not complete"),
            }
        });
    } else {
        // Declined: an ordinary response on a connection nobody else will use.
        super::headers::strip_hop_by_hop(resp.headers_mut());
    }
    Ok(Forwarded::Upgraded(resp))
}

/// One connection of a TCP listener (`protocol: tcp`), after its PROXY header: authorized by
/// its source (there is no key in a byte stream), then carried as opaque bytes to the
/// listener's service over an mTLS connection of its own with ALPN `istio` (istio-wire.md §0),
/// or `istio-peer-exchange` first and the TCP metadata exchange (§2.5) when the tenant has
/// `telemetry:`, as Envoy's `tcp_proxy` does. Half-close is passed on both ways,
/// backpressure is the socket buffers', and a connection with no byte moving either way for
/// `idle` is closed.
pub async fn tcp<C: Io>(
    gen: &Generation,
    conn: &ConnInfo,
    client_io: C,
    service_id: usize,
    idle: Duration,
    started: Instant,
) {
    let snap = &gen.snapshot;
    let service = &snap.services[service_id];
    let client: SocketAddr = conn.client;
    let mut log = TunnelLog {
        listener: &conn.listener,
        client,
        tenant: "-",
        service: &service.name,
        started,
        result: "",
        sent: 0,
        received: 0,
    };
    let deny = |reason: &'static str| gen.metrics.record_denied(&conn.listener, reason);
    let tenant_id = match gen.tenants.authorize(client.ip(), None, conn.vpce.as_deref()) {
        Ok(t) if gen.tenants.allows(t, service_id) => t,
        Ok(t) => {
            log.tenant = &gen.tenants.get(t).name;
            log.result = ProxyError::Policy(Deny::ServiceNotAllowed).reason();
            deny(log.result);
            return;
        }
        Err(d) => {
            log.result = ProxyError::Policy(d).reason();
            deny(log.result);
            return;
        }
    };
    let tenant = gen.tenants.get(tenant_id);
    log.tenant = &tenant.name;
    // The tenant's rate and concurrency limits hold for connections as for requests: each
    // connection takes a token and holds a concurrency slot while it is open.
    let _slot = match tenant_limits(gen, tenant_id) {
        Ok(slot) => slot,
        Err(e) => {
            log.result = e.reason();
            deny(log.result);
            return;
        }
    };
    let pool = gen.upstream.pool(tenant.identity, service);
    let upstream = match pool
        .dedicated(false, client, gen.peer_metadata[tenant_id].as_deref())
        .await
    {
        Ok(io) => io,
        Err(e) => {
            let reason = ProxyError::Upstream(e.clone()).reason();
            tracing::warn!(service = %service.name, error = %e, "upstream connect failed");
            gen.metrics.record_upstream_error(&service.name, reason);
            log.result = reason;
            return;
        }
    };
    let (result, sent, received) = run_tunnel(
        &gen.metrics,
        &service.name,
        client_io,
        upstream,
        idle,
        conn.close.clone(),
    )
    .await;
    log.result = result;
    log.sent = sent;
    log.received = received;
}

//! Everything between meshgate and the mesh: the gateway's addresses, TLS with the workload
//! identity, and the per-service connection pools.

pub mod connect;
pub mod dynamic;
pub mod gateway;
pub mod h2client;
pub mod hbone;
pub mod mx;
pub mod pool;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

use crate::config::{Service, Snapshot, UpstreamProtocol};
use crate::metrics::Metrics;
pub use gateway::Gateway;
pub use pool::{Lease, Pool, PoolStats};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every pool sends; boxed so listeners of any kind can feed the same pools.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// A response body from the mesh: an HTTP/2 stream of a pooled connection, or an HTTP/1.1
/// response (http1 services, upgrades).
pub enum UpstreamBody {
    H2(h2client::UpstreamH2Body),
    H1(hyper::body::Incoming),
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamBody::H2(_) => "UpstreamBody::H2",
            UpstreamBody::H1(_) => "UpstreamBody::H1",
        })
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H2(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpstreamBody::H1(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H2(b) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::H2(b) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
        }
    }
}

/// Upstream failures, by what the operator has to fix. Cloneable so one failed dial can be
/// reported to every request that was waiting for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("gateway {0} has no resolved address")]
    Unresolved(String),
    #[error("gateway {addr} unreachable: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connecting to gateway {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("TLS handshake via gateway {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    /// The gateway closed the handshake without an alert: how it says no filter chain matches
    /// the SNI (or the service has no endpoint).
    #[error("TLS handshake via gateway {addr} failed: {reason}")]
    GatewayClosed { addr: String, reason: String },
    #[error("the mesh has no service behind SNI {sni}: the gateway closed the handshake (no such service exported through the gateway, or no sidecar endpoint behind it)")]
    UnknownMeshService { sni: String },
    #[error("upstream identity rejected: {reason}")]
    Identity { reason: String },
    #[error("TLS handshake via gateway {addr} timed out")]
    HandshakeTimeout { addr: String },
    #[error("upstream negotiated {got}, but the service is configured for {want}")]
    Protocol { got: String, want: &'static str },
    #[error("no response from upstream within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("upstream connection failed: {0}")]
    Http(String),
    #[error("no upstream connection available within {0:?}")]
    PoolTimeout(std::time::Duration),
    #[error("too many requests waiting for this service's upstream connections")]
    Overloaded,
    #[error("HBONE CONNECT {authority} refused with {status}: {reason}")]
    Hbone {
        authority: String,
        status: u16,
        reason: &'static str,
    },
}

/// Everything that decides what a pooled connection is: two services with equal keys could share
/// connections, and a reload keeps a pool whose key did not change.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolKey {
    pub service: String,
    pub sni: String,
    pub protocol: crate::config::UpstreamProtocol,
    pub expected_server: crate::identity::ExpectedServer,
    pub identity: [u8; 32],
    pub gateway: crate::config::GatewayTarget,
    pub settings: crate::config::UpstreamSettings,
    pub transport: crate::config::Transport,
}

impl PoolKey {
    /// The pool of `service` for the tenants presenting identity number `identity`.
    pub fn new(snapshot: &Snapshot, service: &Service, identity: usize) -> PoolKey {
        PoolKey {
            service: service.name.clone(),
            sni: service.sni.clone(),
            protocol: service.protocol,
            expected_server: service.expected_server.clone(),
            identity: snapshot.identity_at(identity).fingerprint,
            gateway: snapshot.gateway.clone(),
            settings: snapshot.upstream.clone(),
            transport: service.transport.clone(),
        }
    }
}

/// The upstream side of one config snapshot: a gateway resolver and a pool per service and
/// client identity. Connections are never shared across identities: a connection's mTLS
/// handshake fixes the principal the mesh sees for every request on it. Host patterns and
/// `protocol: auto` services get pools per destination, made on demand (`dynamic.rs`).
pub struct Upstream {
    pub gateway: Arc<Gateway>,
    /// Indexed by `identity * services + service.id`; `None` for services reached through
    /// destinations made on demand.
    pools: Vec<Option<Arc<Pool>>>,
    services: usize,
    dynamic: dynamic::Destinations<Arc<Pool>>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// Builds the pools for `snapshot`, taking over those of `previous` whose key is unchanged
    /// (their connections stay warm across a reload). Pools not taken over are dropped: their
    /// connections close once their in-flight requests finish.
    pub fn new(
        snapshot: &Snapshot,
        gateway: Arc<Gateway>,
        metrics: Arc<Metrics>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let pools = (0..snapshot.identity_count())
            .flat_map(|i| snapshot.services.iter().map(move |s| (i, s)))
            .map(|(i, s)| {
                if s.is_dynamic() {
                    return None;
                }
                let key = PoolKey::new(snapshot, s, i);
                Some(
                    previous
                        .and_then(|p| p.pools.iter().flatten().find(|pool| *pool.key() == key))
                        .cloned()
                        .unwrap_or_else(|| {
                            Pool::new(
                                key,
                                s.clone(),
                                snapshot.identity_at(i),
                                gateway.clone(),
                                metrics.clone(),
                            )
                        }),
                )
            })
            .collect();
        let dynamic = dynamic::Destinations::new(snapshot.upstream.max_dynamic_destinations);
        if let Some(prev) = previous {
            // Oldest first, so the most recently used end up the most recent here too.
            for (k, pool) in prev.dynamic.list().into_iter().rev() {
                if let Some((key, pool)) = take_over(snapshot, &k, &pool) {
                    dynamic.insert(key, pool);
                }
            }
        }
        Upstream {
            gateway,
            pools,
            services: snapshot.services.len(),
            dynamic,
            metrics,
        }
    }

    /// The pool for `service` as seen by tenants presenting identity number `identity`.
    /// Panics for services reached through [`Upstream::destination`].
    pub fn pool(&self, identity: usize, service: &Service) -> &Arc<Pool> {
        self.pools[identity * self.services + service.id]
            .as_ref()
            .expect("a listed service with a declared protocol has a pool")
    }

    /// The pool of one destination of `service` (a host its pattern matched, or its own host
    /// for `protocol: auto`), spoken in `protocol`, for identity number `identity`; made if
    /// needed. `None` when the host does not fit the service's identity rule. `snapshot` is
    /// the one this upstream was built for.
    pub fn destination(
        &self,
        snapshot: &Snapshot,
        identity: usize,
        service: &Service,
        host: &str,
        port: u16,
        protocol: UpstreamProtocol,
    ) -> Option<Arc<Pool>> {
        let key = dynamic::DestKey {
            service: service.id,
            host: host.to_string(),
            port,
            protocol,
            identity,
        };
        self.dynamic.get_or_make(&key, || {
            let dest = Arc::new(service.destination(host, port, protocol)?);
            let key = PoolKey::new(snapshot, &dest, identity);
            Some(Pool::new(
                key,
                dest,
                snapshot.identity_at(identity),
                self.gateway.clone(),
                self.metrics.clone(),
            ))
        })
    }

    /// The pools of listed services with a declared protocol.
    pub fn listed_pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter().flatten()
    }

    /// Every pool: the listed services', then the destinations made on demand.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> = self.listed_pools().cloned().collect();
        v.extend(self.dynamic.list().into_iter().map(|(_, p)| p));
        v
    }

    /// The destinations made on demand, most recently used first.
    pub fn destinations(&self) -> Vec<(dynamic::DestKey, Arc<Pool>)> {
        self.dynamic.list()
    }

    /// Pool rows for metrics and `/pool`: (service, connections, streams in use).
    pub fn pool_rows(&self) -> Vec<(String, i64, i64)> {
        let mut by_service: std::collections::HashMap<String, (i64, i64)> = std::collections::HashMap::new();
        for p in self.pools() {
            let s = p.stats();
            let e = by_service.entry(s.service.clone()).or_default();
            e.0 += s.connections.len() as i64;
            e.1 += s.connections.iter().map(|c| c.streams_in_use as i64).sum::<i64>();
        }
        let mut rows: Vec<_> = by_service.into_iter().map(|(k, (a, b))| (k, a, b)).collect();
        rows.sort();
        rows
    }

    /// `(service, destinations)` rows for `meshgate_dynamic_destinations`.
    pub fn destination_rows(&self, snapshot: &Snapshot) -> Vec<(String, i64)> {
        let mut by_service: std::collections::BTreeMap<String, i64> = snapshot
            .services
            .iter()
            .filter(|s| s.is_dynamic())
            .map(|s| (s.name.clone(), 0))
            .collect();
        for (_, p) in self.dynamic.list() {
            *by_service.entry(p.service().name.clone()).or_default() += 1;
        }
        by_service.into_iter().collect()
    }

    /// Closes idle and over-age connections; run periodically.
    pub fn sweep(&self) {
        for p in self.pools() {
            p.sweep();
        }
    }
}

/// A destination pool of the previous config, if the new one would make the same pool: same
/// service name, still dynamic, and an equal key for the same host, port and protocol with the
/// same identity.
fn take_over(snapshot: &Snapshot, k: &dynamic::DestKey, pool: &Arc<Pool>) -> Option<(dynamic::DestKey, Arc<Pool>)> {
    let service = snapshot
        .services
        .iter()
        .find(|s| s.name == pool.service().name && s.is_dynamic())?;
    let identity =
        (0..snapshot.identity_count()).find(|i| snapshot.identity_at(*i).fingerprint == pool.key().identity)?;
    let dest = service.destination(&k.host, k.port, k.protocol)?;
    (PoolKey::new(snapshot, &dest, identity) == *pool.key()).then(|| {
        (
            dynamic::DestKey {
                service: service.id,
                identity,
                ..k.clone()
            },
            pool.clone(),
        )
    })
}

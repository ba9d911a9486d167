//! Connections to one service through the gateway, reused across requests.
//!
//! HTTP/2 services: streams are multiplexed over a small set of connections. The gateway picks
//! one pod per TLS connection (AUTO_PASSTHROUGH is L4), so one connection would pin all load to
//! one pod: the pool keeps at least `min_connections`, opens another when the least loaded one
//! carries `target_streams_per_connection`, never exceeds `max_connections` or
//! `max_streams_per_connection`, and retires each connection after a jittered maximum age so
//! load re-spreads as pods come and go.
//!
//! HTTP/1.1 services: one request per connection at a time; idle connections are kept for reuse,
//! at most `http1_max_connections` open.
//!
//! Invariants (all under `state`):
//! - `dialing` counts dial tasks in flight; a dial is started only while
//!   `h2.len() + dialing` is below the wanted count, so a burst of requests causes one dial
//!   (single flight), not one per request.
//! - A connection in `h2` is usable for new streams; a connection that is closed, broken,
//!   over age or idle too long is removed. Removing it drops only the pool's handle: in-flight
//!   streams hold their own `Arc`, and hyper closes the connection gracefully once the last
//!   handle and stream are gone.
//! - `in_flight` of an h2 connection = leases alive on it. It is changed without the lock; a
//!   waiter announces itself in `waiters` before reading the state and a releaser reads
//!   `waiters` after decrementing (both SeqCst), so a release is never missed.
//! - `h1_open` = idle HTTP/1 connections + leased ones + none of the dialing ones.
//! - A request that waited and saw a dial fail (`dials_done` moved past where it started) with
//!   nothing else in progress gets that dial's error: when the gateway is down, requests fail
//!   fast with the reason instead of waiting out their deadline.
//!
//! Longer than most files on purpose: the invariants above span checkout, dialing and the
//! release of leases; kept in one file, each one can be checked against all the code that
//! touches it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connect::{connect_via, TlsParams};
use super::h2client::SendError;
use super::{Gateway, RequestBody, UpstreamBody, UpstreamError};
use crate::config::{Service, UpstreamProtocol, UpstreamSettings};
use crate::identity::Identity;
use crate::metrics::Metrics;

struct H2Conn {
    id: u64,
    addr: SocketAddr,
    created: Instant,
    expires: Instant,
    sender: super::h2client::H2Sender,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds since `created` when `in_flight` last dropped to zero.
    idle_since_ms: AtomicU64,
    broken: AtomicBool,
}

struct H1Conn {
    id: u64,
    addr: SocketAddr,
    created: Instant,
    expires: Instant,
    idle_since: Instant,
    requests: u64,
    sender: http1::SendRequest<RequestBody>,
}

enum Dialed {
    H2(Arc<H2Conn>),
    H1(H1Conn),
}

#[derive(Default)]
struct State {
    h2: Vec<Arc<H2Conn>>,
    h1_idle: Vec<H1Conn>,
    h1_open: usize,
    dialing: usize,
    dials_done: u64,
    last_error: Option<(u64, UpstreamError)>,
    next_id: u64,
    connects_ok: u64,
    connects_failed: u64,
    /// A pattern destination the gateway said it does not know: requests fail at once with
    /// that answer until this instant instead of dialing again (`upstream.unknown_service_cache`).
    unknown_until: Option<Instant>,
}

/// A snapshot of a pool for the admin API and tests.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub service: String,
    pub connections: Vec<ConnStats>,
    pub dialing: usize,
    pub connects_ok: u64,
    pub connects_failed: u64,
}

#[derive(Debug, Clone)]
pub struct ConnStats {
    pub id: u64,
    pub gateway: SocketAddr,
    pub age: Duration,
    pub streams_in_use: usize,
}

pub struct Pool {
    key: super::PoolKey,
    /// The service as configured in the snapshot that last took this pool over. Only names and
    /// protocol are read from it, and those are part of the key.
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    tls: TlsParams,
    /// The same identity and server check with ALPN `istio` alone, for CONNECT tunnels.
    opaque_tls: TlsParams,
    /// ALPN `istio-peer-exchange`, `istio`: byte streams of tenants with `telemetry:` (TCP
    /// services only; nothing else carries opaque bytes).
    mx_tls: Option<TlsParams>,
    gateway: Arc<Gateway>,
    /// Set for `transport: hbone` / `double-hbone`: connections are CONNECT streams over a
    /// shared mTLS connection instead of mTLS connections through `gateway`.
    hbone: Option<Arc<super::hbone::Connector>>,
    settings: UpstreamSettings,
    state: Mutex<State>,
    waiters: AtomicUsize,
    changed: Notify,
    /// Retry budget in tenths of a retry: each request earns 2 (so retries stay within ~20% of
    /// traffic), capped at 100 (a burst of 10); a retry spends 10. Retries cannot multiply load
    /// on a failing service.
    retry_tenths: AtomicUsize,
}

const RETRY_COST: usize = 10;
const RETRY_EARN: usize = 2;
const RETRY_CAP: usize = 100;

/// The right to send one request on one connection; held until the response body ends.
pub struct Lease {
    pool: Arc<Pool>,
    kind: LeaseKind,
    /// False when this request's connection was dialed for it.
    pub reused: bool,
    body_done: bool,
}

enum LeaseKind {
    H2(Arc<H2Conn>),
    H1(Option<H1Conn>),
}

struct WaiterGuard<'a>(&'a Pool);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

impl Pool {
    pub fn new(
        key: super::PoolKey,
        service: Arc<Service>,
        identity: &Identity,
        gateway: Arc<Gateway>,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        let tls = TlsParams::new(identity, &service);
        let opaque_tls = tls.opaque();
        let mx_tls = (service.protocol == crate::config::UpstreamProtocol::Tcp).then(|| tls.exchanging());
        let hbone = match &service.transport {
            crate::config::Transport::Hbone(route) => Some(Arc::new(super::hbone::Connector::new(
                route,
                identity,
                &service,
                &key.settings,
            ))),
            crate::config::Transport::Sidecar => None,
        };
        Arc::new(Pool {
            hbone,
            settings: key.settings.clone(),
            key,
            service,
            metrics,
            tls,
            opaque_tls,
            mx_tls,
            gateway,
            state: Mutex::new(State::default()),
            waiters: AtomicUsize::new(0),
            changed: Notify::new(),
            retry_tenths: AtomicUsize::new(RETRY_CAP),
        })
    }

    /// TLS settings for a connection of this pool's identity to its service.
    pub fn tls(&self) -> &TlsParams {
        &self.tls
    }

    /// The same with ALPN `istio` alone, for opaque byte tunnels.
    pub fn opaque_tls(&self) -> &TlsParams {
        &self.opaque_tls
    }

    /// The HBONE connector of an ambient service (`None` for sidecar services).
    pub fn hbone(&self) -> Option<&Arc<super::hbone::Connector>> {
        self.hbone.as_ref()
    }

    pub fn key(&self) -> &super::PoolKey {
        &self.key
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn jittered_age(&self) -> Duration {
        let j = self.settings.max_connection_age_jitter;
        let f = if j > 0.0 {
            rand::rng().random_range(1.0 - j..=1.0 + j)
        } else {
            1.0
        };
        self.settings.max_connection_age.mul_f64(f)
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        let now = Instant::now();
        let mut connections: Vec<ConnStats> = st
            .h2
            .iter()
            .map(|c| ConnStats {
                id: c.id,
                gateway: c.addr,
                age: now - c.created,
                streams_in_use: c.in_flight.load(SeqCst),
            })
            .collect();
        connections.extend(st.h1_idle.iter().map(|c| ConnStats {
            id: c.id,
            gateway: c.addr,
            age: now - c.created,
            streams_in_use: 0,
        }));
        PoolStats {
            service: self.service.name.clone(),
            connections,
            dialing: st.dialing,
            connects_ok: st.connects_ok,
            connects_failed: st.connects_failed,
        }
    }

    /// Drops connections that can no longer take new requests.
    fn prune(&self, st: &mut State, now: Instant) {
        let idle = self.settings.idle_timeout;
        st.h2.retain(|c| {
            let idle_since = c.created + Duration::from_millis(c.idle_since_ms.load(SeqCst));
            let idle_too_long = c.in_flight.load(SeqCst) == 0 && now.saturating_duration_since(idle_since) >= idle;
            !(c.sender.is_closed() || c.broken.load(SeqCst) || now >= c.expires || idle_too_long)
        });
        let before = st.h1_idle.len();
        st.h1_idle
            .retain(|c| !c.sender.is_closed() && now < c.expires && now.saturating_duration_since(c.idle_since) < idle);
        st.h1_open -= before - st.h1_idle.len();
    }

    pub fn sweep(&self) {
        let mut st = self.lock();
        self.prune(&mut st, Instant::now());
    }

    fn start_dials(self: &Arc<Self>, st: &mut State, n: usize) {
        for _ in 0..n {
            st.dialing += 1;
            let pool = self.clone();
            tokio::spawn(async move { pool.dial_task().await });
        }
    }

    /// Decides whether this moment calls for new connections (see the module invariants).
    fn plan_h2(self: &Arc<Self>, st: &mut State, best_load: Option<usize>) {
        let s = &self.settings;
        let live = st.h2.len() + st.dialing;
        let want = if live < s.min_connections {
            s.min_connections - live
        } else if st.dialing == 0
            && live < s.max_connections
            && best_load.is_none_or(|l| l >= s.target_streams_per_connection)
        {
            1
        } else {
            0
        };
        self.start_dials(st, want);
    }

    fn try_take(self: &Arc<Self>, st: &mut State, may_dial: bool) -> Option<Lease> {
        match self.service.protocol {
            UpstreamProtocol::Http2 => {
                let max = self.settings.max_streams_per_connection;
                let best = st
                    .h2
                    .iter()
                    .filter(|c| c.in_flight.load(SeqCst) < max)
                    .min_by_key(|c| (c.in_flight.load(SeqCst), c.id))
                    .cloned();
                if may_dial {
                    self.plan_h2(st, best.as_ref().map(|c| c.in_flight.load(SeqCst)));
                }
                best.map(|c| {
                    c.in_flight.fetch_add(1, SeqCst);
                    let reused = c.requests.fetch_add(1, SeqCst) > 0;
                    Lease {
                        pool: self.clone(),
                        kind: LeaseKind::H2(c),
                        reused,
                        body_done: false,
                    }
                })
            }
            // TCP services never take HTTP leases (they are not routed); if one did, HTTP/1.1.
            UpstreamProtocol::Http1 | UpstreamProtocol::Tcp | UpstreamProtocol::Auto => {
                if let Some(mut c) = st.h1_idle.pop() {
                    let reused = c.requests > 0;
                    c.requests += 1;
                    return Some(Lease {
                        pool: self.clone(),
                        kind: LeaseKind::H1(Some(c)),
                        reused,
                        body_done: false,
                    });
                }
                let waiting = self.waiters.load(SeqCst);
                if may_dial && st.h1_open + st.dialing < self.settings.http1_max_connections && st.dialing < waiting {
                    self.start_dials(st, 1);
                }
                None
            }
        }
    }

    /// Takes a connection for one request, dialing if the pool calls for it.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, UpstreamError> {
        let wait_limit = self.settings.request_timeout;
        let deadline = Instant::now() + wait_limit;
        let waiting = self.waiters.fetch_add(1, SeqCst);
        let _guard = WaiterGuard(self);
        // Shed at once rather than queue into the request timeout: the service is saturated.
        if waiting >= self.settings.max_pending_requests {
            return Err(UpstreamError::Overloaded);
        }
        self.check_known()?;
        let mut started_at: Option<u64> = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut st = self.lock();
                let start = *started_at.get_or_insert(st.dials_done);
                self.prune(&mut st, Instant::now());
                // Once a dial failed while this request waited, it starts no more dials of its
                // own: it takes what the dials in progress bring, or reports the failure.
                let failed_since_start = st.last_error.as_ref().is_some_and(|(seq, _)| *seq > start);
                let taken = self.try_take(&mut st, !failed_since_start);
                if taken.is_none() && failed_since_start && st.dialing == 0 {
                    let (_, e) = st.last_error.as_ref().expect("checked above");
                    return Err(e.clone());
                }
                taken
            };
            if let Some(mut lease) = taken {
                if let LeaseKind::H1(Some(c)) = &mut lease.kind {
                    // The previous response may still be settling in hyper's dispatcher.
                    let ready = tokio::time::timeout(Duration::from_secs(1), c.sender.ready()).await;
                    if !matches!(ready, Ok(Ok(()))) {
                        lease.body_done = false; // drop it, don't return it to the idle list
                        continue;
                    }
                }
                return Ok(lease);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let st = self.lock();
                return Err(match &st.last_error {
                    Some((seq, e)) if Some(*seq) > started_at => e.clone(),
                    _ => UpstreamError::PoolTimeout(wait_limit),
                });
            }
        }
    }

    /// The cached "no such service" answer of the gateway, while it lasts.
    fn check_known(&self) -> Result<(), UpstreamError> {
        // Only a pattern's destination can be unknown: a listed service's checkout takes no
        // extra lock for it.
        if !self.service.via_pattern {
            return Ok(());
        }
        match self.lock().unknown_until {
            Some(t) if Instant::now() < t => Err(UpstreamError::UnknownMeshService {
                sni: self.service.sni.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// For a pattern's destination, a handshake the gateway closed means the mesh has no such
    /// service (a listed service is known to exist, so there it stays a TLS failure); the
    /// answer is remembered for `unknown_service_cache`.
    fn classify(&self, e: UpstreamError) -> UpstreamError {
        match e {
            UpstreamError::GatewayClosed { .. } if self.service.via_pattern => {
                self.lock().unknown_until = Some(Instant::now() + self.settings.unknown_service_cache);
                self.metrics
                    .unknown_mesh_services
                    .get_or_create(&crate::metrics::ServiceLabels {
                        service: self.service.name.clone(),
                    })
                    .inc();
                UpstreamError::UnknownMeshService {
                    sni: self.service.sni.clone(),
                }
            }
            other => other,
        }
    }

    async fn dial_task(self: Arc<Self>) {
        let started = Instant::now();
        let result = self.dial().await.map_err(|e| self.classify(e));
        self.metrics
            .record_connect(&self.service.name, result.is_ok(), started.elapsed());
        {
            let mut st = self.lock();
            st.dialing -= 1;
            st.dials_done += 1;
            match result {
                Ok(Dialed::H2(c)) => {
                    st.connects_ok += 1;
                    st.h2.push(c);
                }
                Ok(Dialed::H1(c)) => {
                    st.connects_ok += 1;
                    st.h1_open += 1;
                    st.h1_idle.push(c);
                }
                Err(e) => {
                    st.connects_failed += 1;
                    tracing::warn!(service = %self.service.name, error = %e, "upstream connect failed");
                    st.last_error = Some((st.dials_done, e));
                }
            }
        }
        self.changed.notify_waiters();
    }

    async fn dial(&self) -> Result<Dialed, UpstreamError> {
        if let Some(h) = &self.hbone {
            // The app protocol is the configured one: HBONE's ALPN (h2) belongs to the tunnel.
            let (addr, stream) = h.open(None).await?;
            return self
                .handshake(
                    addr,
                    TokioIo::new(stream),
                    self.service.protocol == UpstreamProtocol::Http2,
                )
                .await;
        }
        let s = &self.settings;
        let (addr, conn) = connect_via(&self.gateway, &self.tls, s, &self.service.name).await?;
        let want = self.service.protocol;
        let speaks_h2 = match conn.alpn.as_deref() {
            Some(b"h2") => true,
            Some(b"http/1.1") => false,
            // No ALPN agreed: trust the configured protocol, as Envoy does for a declared port.
            None => want == UpstreamProtocol::Http2,
            Some(other) => {
                return Err(UpstreamError::Protocol {
                    got: String::from_utf8_lossy(other).into_owned(),
                    want: protocol_name(want),
                })
            }
        };
        if speaks_h2 != (want == UpstreamProtocol::Http2) {
            return Err(UpstreamError::Protocol {
                got: if speaks_h2 { "h2".into() } else { "http/1.1".into() },
                want: protocol_name(want),
            });
        }
        self.handshake(addr, conn.stream, speaks_h2).await
    }

    /// The app-level HTTP client connection over a connected stream.
    async fn handshake<IO>(&self, addr: SocketAddr, io: IO, speaks_h2: bool) -> Result<Dialed, UpstreamError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let s = &self.settings;
        let now = Instant::now();
        let id = {
            let mut st = self.lock();
            st.next_id += 1;
            st.next_id
        };
        let expires = now + self.jittered_age();
        let service = self.service.name.clone();
        if speaks_h2 {
            let sender =
                super::h2client::handshake(io, s.max_streams_per_connection, format!("{service}#{id}")).await?;
            Ok(Dialed::H2(Arc::new(H2Conn {
                id,
                addr,
                created: now,
                expires,
                sender,
                in_flight: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
                idle_since_ms: AtomicU64::new(0),
                broken: AtomicBool::new(false),
            })))
        } else {
            let (sender, connection) = http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Http(format!("HTTP/1.1 handshake: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%service, conn = id, error = %e, "upstream http/1.1 connection ended");
                }
            });
            Ok(Dialed::H1(H1Conn {
                id,
                addr,
                created: now,
                expires,
                idle_since: now,
                requests: 0,
                sender,
            }))
        }
    }

    /// A byte stream to this pool's service for one client connection of its own (a CONNECT
    /// tunnel, an HTTP/1.1 upgrade, a TCP listener's connection): a CONNECT stream naming the
    /// client for HBONE services, otherwise an mTLS connection through the gateway, with ALPN
    /// `istio` alone when `opaque` (bytes, not HTTP) or the service's HTTP ALPN otherwise.
    /// `metadata`: the tenant's peer metadata, offered through the TCP metadata exchange on a
    /// TCP service (HBONE carries none: ztunnel learns the peer from its certificate).
    pub async fn dedicated(
        &self,
        opaque: bool,
        client: SocketAddr,
        metadata: Option<&crate::telemetry::PeerMetadata>,
    ) -> Result<Box<dyn crate::io::Io>, UpstreamError> {
        self.check_known()?;
        self.open(opaque, client, metadata).await.map_err(|e| self.classify(e))
    }

    async fn open(
        &self,
        opaque: bool,
        client: SocketAddr,
        metadata: Option<&crate::telemetry::PeerMetadata>,
    ) -> Result<Box<dyn crate::io::Io>, UpstreamError> {
        match &self.hbone {
            Some(h) => Ok(Box::new(TokioIo::new(h.open(Some(client)).await?.1))),
            None => {
                let (tls, metadata) = match (metadata, &self.mx_tls) {
                    (Some(m), Some(mx)) => (mx, Some(m)),
                    _ if opaque => (&self.opaque_tls, None),
                    _ => (&self.tls, None),
                };
                let (addr, c) = connect_via(&self.gateway, tls, &self.settings, &self.service.name).await?;
                match metadata {
                    Some(m) if c.alpn.as_deref() == Some(crate::telemetry::MX_ALPN) => {
                        let s = super::mx::Exchanging::start(c.stream, &m.preamble).await.map_err(|e| {
                            UpstreamError::Tls {
                                addr: addr.to_string(),
                                reason: format!("metadata exchange: {e}"),
                            }
                        })?;
                        Ok(Box::new(s))
                    }
                    _ => Ok(Box::new(c.stream)),
                }
            }
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_retry(&self) -> bool {
        self.retry_tenths
            .fetch_update(SeqCst, SeqCst, |t| t.checked_sub(RETRY_COST))
            .is_ok()
    }

    /// Sends a request, retrying on another connection when the chosen one turned out to be
    /// closed before the request left (the request is handed back in that case).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Lease), UpstreamError> {
        let _ = self.retry_tenths.fetch_update(SeqCst, SeqCst, |t| {
            (t < RETRY_CAP).then_some((t + RETRY_EARN).min(RETRY_CAP))
        });
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut lease = self.checkout().await?;
            let sent = match &mut lease.kind {
                LeaseKind::H2(c) => match super::h2client::send(&c.sender, req).await {
                    Ok(resp) => Ok(resp.map(UpstreamBody::H2)),
                    Err(SendError::NotSent(r, e)) => Err((Some(*r), e)),
                    Err(SendError::Failed(e)) => Err((None, e)),
                },
                LeaseKind::H1(Some(c)) => match c.sender.try_send_request(req).await {
                    Ok(resp) => Ok(resp.map(UpstreamBody::H1)),
                    Err(mut e) => {
                        let r = e.take_message();
                        Err((r, UpstreamError::Http(e.into_error().to_string())))
                    }
                },
                LeaseKind::H1(None) => unreachable!("a fresh lease always holds its connection"),
            };
            match sent {
                Ok(resp) => return Ok((resp, lease)),
                Err((again, e)) => {
                    lease.mark_broken();
                    match again {
                        Some(r) if attempts < 3 => req = r,
                        _ => return Err(e),
                    }
                }
            }
        }
    }
}

fn protocol_name(p: UpstreamProtocol) -> &'static str {
    match p {
        UpstreamProtocol::Http2 => "http2",
        UpstreamProtocol::Http1 => "http1",
        UpstreamProtocol::Tcp => "tcp",
        UpstreamProtocol::Auto => "auto",
    }
}

impl Lease {
    /// The response body reached its end: an HTTP/1 connection may carry the next request.
    pub fn body_finished(&mut self) {
        self.body_done = true;
    }

    fn mark_broken(&mut self) {
        match &mut self.kind {
            LeaseKind::H2(c) => c.broken.store(true, SeqCst),
            LeaseKind::H1(_) => self.body_done = false,
        }
    }

    pub fn connection_id(&self) -> u64 {
        match &self.kind {
            LeaseKind::H2(c) => c.id,
            LeaseKind::H1(c) => c.as_ref().map_or(0, |c| c.id),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let pool = &self.pool;
        match &mut self.kind {
            LeaseKind::H2(c) => {
                if c.in_flight.fetch_sub(1, SeqCst) == 1 {
                    let ms = Instant::now().saturating_duration_since(c.created).as_millis() as u64;
                    c.idle_since_ms.store(ms, SeqCst);
                }
            }
            LeaseKind::H1(slot) => {
                if let Some(mut c) = slot.take() {
                    let now = Instant::now();
                    let mut st = pool.lock();
                    if self.body_done && !c.sender.is_closed() && now < c.expires {
                        c.idle_since = now;
                        st.h1_idle.push(c);
                    } else {
                        st.h1_open -= 1;
                    }
                }
            }
        }
        if pool.waiters.load(SeqCst) > 0 {
            pool.changed.notify_waiters();
        }
    }
}

//! HBONE (Istio ambient, istio-wire.md §5): an HTTP/2 `CONNECT` over mTLS to the destination's
//! ztunnel (port 15008), or through an ambient east-west gateway with a second TLS and CONNECT
//! inside the first (double HBONE). Each CONNECT stream is one byte stream to the app, on which
//! the pool runs its HTTP/1.1 or HTTP/2 client connection; tunnels splice it directly.
//!
//! The outer mTLS connection is shared by all the CONNECT streams of one pool (one service, one
//! client identity): that is what HBONE is for. It is dialed once (single flight: callers
//! arriving during a dial share its result), the whole dial (name resolution, TCP, TLS, HTTP/2)
//! bounded by `upstream.connect_timeout + handshake_timeout`; after a failed dial, callers get
//! that failure at once for [`FAIL_FAST`] instead of dialing a dead endpoint again. It is
//! replaced when closed or past its jittered maximum age, and closes by itself once its last
//! stream ends after that.
//!
//! TLS is ztunnel's (§5.1): TLS 1.3 only, ALPN exactly `h2`, no SNI, no session resumption,
//! the client certificate of the pool's identity, the server checked against the expected
//! SPIFFE identity (the destination for single HBONE; the gateway on the outer and the
//! destination on the inner TLS for double HBONE).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::time::Instant;

use super::connect::{connect_via, TlsParams};
use super::{Gateway, UpstreamError};
use crate::config::{GatewayTarget, HboneRoute, Service, UpstreamSettings};
use crate::identity::{ClientCert, ExpectedServer, Identity, SpiffeServerVerifier};

/// `x-forwarded-network` (ztunnel `X_FORWARDED_NETWORK_HEADER`, istio-wire.md §5.2).
const X_FORWARDED_NETWORK: &str = "x-forwarded-network";

/// ztunnel's TLS 1.3 cipher suites (istio-wire.md §5.1), in its order: AES-GCM only, no
/// ChaCha20 (which ring's default provider would also offer).
pub const CIPHER_SUITES: [rustls::SupportedCipherSuite; 2] = [
    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
];

/// ztunnel's client TLS: TLS 1.3 only with its cipher suites, ALPN `h2`, no SNI, no resumption.
pub fn client_config(identity: &Identity, expected: ExpectedServer) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    });
    let verifier = SpiffeServerVerifier::new(
        identity.roots.clone(),
        expected,
        provider.signature_verification_algorithms,
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(ClientCert(identity.certified_key.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    // A resumed session would skip the server certificate check of this connection.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// `forwarded: for="<ip:port>";host=<hostname>` (ztunnel `create_hbone_request`). The address is
/// quoted because it holds `:` (RFC 7239 §6); IPv6 comes bracketed.
pub fn forwarded(client: SocketAddr, host: &str) -> String {
    format!("for=\"{}\";host={host}", crate::config::hbone::ip_authority(client))
}

/// A random W3C `traceparent` (`00-<32 hex>-<16 hex>-00`), as ztunnel sends on every CONNECT.
pub fn traceparent() -> String {
    let mut b = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    // All-zero ids are invalid (W3C trace-context §3.2.2.3).
    b[0] |= 1;
    b[16] |= 1;
    format!("00-{}-{}-00", hex::encode(&b[..16]), hex::encode(&b[16..]))
}

/// The CONNECT request of one HBONE hop.
pub fn connect_request(
    authority: &str,
    client: SocketAddr,
    host: &str,
    network: Option<&str>,
) -> Result<Request<Empty<Bytes>>, UpstreamError> {
    let bad = |what: &str| UpstreamError::Http(format!("cannot build the HBONE CONNECT ({what})"));
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .version(http::Version::HTTP_2)
        .header(
            "forwarded",
            HeaderValue::from_str(&forwarded(client, host)).map_err(|_| bad("forwarded"))?,
        )
        .header(
            "traceparent",
            HeaderValue::from_str(&traceparent()).map_err(|_| bad("traceparent"))?,
        );
    if let Some(n) = network {
        b = b.header(
            X_FORWARDED_NETWORK,
            HeaderValue::from_str(n).map_err(|_| bad("network"))?,
        );
    }
    b.body(Empty::new()).map_err(|_| bad("authority"))
}

/// What a non-200 answer to CONNECT means, in ztunnel's inbound (istio-wire.md §5.1).
pub fn refusal_reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "the endpoint refused the request (authority not a workload it serves, or not a CONNECT)",
        401 => "denied by the destination's authorization policy (RBAC) for this client identity",
        503 => "the endpoint could not reach the destination app",
        _ => "unexpected answer from the HBONE endpoint",
    }
}

/// How long after a failed outer dial new CONNECTs fail at once with that dial's error instead
/// of dialing again: a dead endpoint costs one dial per second, not one per request.
const FAIL_FAST: Duration = Duration::from_secs(1);

/// The outer connection as its users see it: where it goes, meshgate's end, and the hop.
type OuterView = (SocketAddr, SocketAddr, Hop);

struct Outer {
    addr: SocketAddr,
    local: SocketAddr,
    expires: Instant,
    hop: Hop,
}

impl Outer {
    fn view(&self) -> OuterView {
        (self.addr, self.local, self.hop.clone())
    }
}

/// The result of an outer dial, published to everyone waiting for it.
type DialOutcome = tokio::sync::watch::Receiver<Option<Result<OuterView, UpstreamError>>>;

/// The shared outer connection of one pool, or the dial in progress, or the last failure.
#[derive(Default)]
struct OuterSlot {
    ready: Option<Outer>,
    /// Set while a dial runs: callers wait for its result rather than dialing themselves.
    dialing: Option<DialOutcome>,
    /// The last dial's failure and when it happened (cleared by a successful dial).
    failed: Option<(Instant, UpstreamError)>,
}

/// Dials the outer mTLS connection (the destination's ztunnel or the ambient gateway). One dial
/// at a time per pool, run as a task of its own so that it completes (within its timeout) and
/// publishes its result however many callers gave up waiting.
struct OuterDialer {
    service: String,
    /// Resolves and balances the dial target, with the same outlier ejection as `mesh.gateway`.
    target: Arc<Gateway>,
    tls: TlsParams,
    settings: UpstreamSettings,
    slot: std::sync::Mutex<OuterSlot>,
    dials: AtomicU64,
}

/// One HTTP/2 connection of an HBONE hop: where CONNECTs are sent, and why it ended if it did.
#[derive(Clone)]
struct Hop {
    sender: http2::SendRequest<Empty<Bytes>>,
    /// Set by the connection task when the connection fails. A CONNECT on a dead connection
    /// only learns "canceled"; this says what happened (e.g. the TLS alert of a server that
    /// refused our certificate).
    ended: tokio::sync::watch::Receiver<Option<UpstreamError>>,
}

/// The HBONE side of one pool.
pub struct Connector {
    service: String,
    host: String,
    route: HboneRoute,
    outer: Arc<OuterDialer>,
    /// Double HBONE: the TLS to the destination, inside the gateway's CONNECT stream.
    inner_tls: Option<Arc<ClientConfig>>,
    settings: UpstreamSettings,
}

/// The server name rustls wants; never sent (`enable_sni = false`).
fn unsent_server_name() -> ServerName<'static> {
    ServerName::try_from("hbone.invalid").expect("a valid DNS name")
}

impl OuterDialer {
    fn lock(&self) -> std::sync::MutexGuard<'_, OuterSlot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outer connection to use for the next CONNECT: the current one, the result of the
    /// dial in progress, the recent failure (for [`FAIL_FAST`]), or a new dial.
    async fn get(self: &Arc<Self>) -> Result<OuterView, UpstreamError> {
        let mut outcome = {
            let mut slot = self.lock();
            let now = Instant::now();
            if let Some(o) = &slot.ready {
                if !o.hop.sender.is_closed() && now < o.expires {
                    return Ok(o.view());
                }
                slot.ready = None;
            }
            // A dial task that vanished (it cannot, short of a panic) leaves a closed channel.
            match slot.dialing.clone().filter(|rx| rx.has_changed().is_ok()) {
                Some(rx) => rx,
                None => {
                    if let Some((at, e)) = &slot.failed {
                        if now < *at + FAIL_FAST {
                            return Err(e.clone());
                        }
                    }
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    slot.dialing = Some(rx.clone());
                    tokio::spawn(self.clone().dial_task(tx));
                    rx
                }
            }
        };
        let result = outcome.wait_for(Option::is_some).await;
        match result {
            Ok(r) => r.clone().expect("waited for Some"),
            Err(_) => Err(UpstreamError::Http(format!(
                "HBONE outer connection of {}: the dial was abandoned",
                self.service
            ))),
        }
    }

    /// Runs one dial under the connect and handshake timeouts together, records its outcome
    /// in the slot, then tells the waiters.
    async fn dial_task(self: Arc<Self>, tx: tokio::sync::watch::Sender<Option<Result<OuterView, UpstreamError>>>) {
        let limit = self.settings.connect_timeout + self.settings.handshake_timeout;
        let dialed = match tokio::time::timeout(limit, self.dial()).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::HandshakeTimeout {
                addr: self.target.target().to_string(),
            }),
        };
        let published = {
            let mut slot = self.lock();
            slot.dialing = None;
            match dialed {
                Ok(o) => {
                    let v = o.view();
                    slot.ready = Some(o);
                    slot.failed = None;
                    Ok(v)
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, target = %self.target.target(), error = %e, "HBONE outer connection failed");
                    slot.failed = Some((Instant::now(), e.clone()));
                    Err(e)
                }
            }
        };
        let _ = tx.send(Some(published));
    }

    async fn dial(&self) -> Result<Outer, UpstreamError> {
        // A name is resolved at every dial (outer dials are rare), so DNS changes are picked
        // up; on failure the last good addresses are kept.
        match tokio::time::timeout(self.settings.connect_timeout, self.target.resolve()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(service = %self.service, target = %self.target.target(), error = %e, "resolving the HBONE target failed; keeping the previous addresses");
            }
            Err(_) => {
                tracing::warn!(service = %self.service, target = %self.target.target(), "resolving the HBONE target timed out; keeping the previous addresses");
            }
        }
        let (addr, conn) = connect_via(&self.target, &self.tls, &self.settings, &self.service).await?;
        self.dials.fetch_add(1, Ordering::Relaxed);
        if conn.alpn.as_deref() != Some(b"h2") {
            return Err(UpstreamError::Protocol {
                got: conn
                    .alpn
                    .as_deref()
                    .map_or("no ALPN".into(), |a| String::from_utf8_lossy(a).into_owned()),
                want: "h2 (HBONE)",
            });
        }
        let local = conn.stream.get_ref().0.local_addr().unwrap_or(addr);
        let hop = h2_handshake(conn.stream, addr, &self.service, "outer").await?;
        let age = self
            .settings
            .max_connection_age
            .mul_f64(jitter(self.settings.max_connection_age_jitter));
        Ok(Outer {
            addr,
            local,
            expires: Instant::now() + age,
            hop,
        })
    }
}

impl Connector {
    pub fn new(route: &HboneRoute, identity: &Identity, service: &Service, settings: &UpstreamSettings) -> Connector {
        let (outer_expected, inner_tls) = match &route.gateway {
            None => (service.expected_server.clone(), None),
            Some(g) => (
                g.identity.clone(),
                Some(client_config(identity, service.expected_server.clone())),
            ),
        };
        Connector {
            service: service.name.clone(),
            host: service.host.clone(),
            route: route.clone(),
            outer: Arc::new(OuterDialer {
                service: service.name.clone(),
                target: Gateway::new(GatewayTarget(vec![route.dial.clone()])),
                tls: TlsParams {
                    config: client_config(identity, outer_expected),
                    server_name: unsent_server_name(),
                },
                settings: settings.clone(),
                slot: std::sync::Mutex::new(OuterSlot::default()),
                dials: AtomicU64::new(0),
            }),
            inner_tls,
            settings: settings.clone(),
        }
    }

    /// Outer mTLS connections dialed so far (TLS established).
    pub fn outer_dials(&self) -> u64 {
        self.outer.dials.load(Ordering::Relaxed)
    }

    /// Opens one byte stream to the service's app. `client` goes into `forwarded`: the VM for a
    /// tunnel of its own; `None` for pooled connections shared by many clients, which then name
    /// meshgate's own end of the outer connection (the VM is in each request's X-Forwarded-For).
    pub async fn open(&self, client: Option<SocketAddr>) -> Result<(SocketAddr, Upgraded), UpstreamError> {
        let timeout = self.settings.handshake_timeout + self.settings.connect_timeout;
        let (addr, local, mut outer) = self.outer.get().await?;
        let client = client.unwrap_or(local);
        let req = connect_request(&self.route.authority, client, &self.host, None)?;
        let stream = match tokio::time::timeout(timeout, self.connect(&mut outer, req, addr)).await {
            Ok(r) => r?,
            Err(_) => return Err(UpstreamError::HandshakeTimeout { addr: addr.to_string() }),
        };
        let (Some(inner), Some(gw)) = (&self.inner_tls, &self.route.gateway) else {
            return Ok((addr, stream));
        };
        // Double HBONE: TLS to the destination through the gateway's stream, then the inner
        // CONNECT with the same hostname authority (istio-wire.md §5.2).
        let inner_hop = async {
            let tls = tokio_rustls::TlsConnector::from(inner.clone())
                .connect(unsent_server_name(), TokioIo::new(stream))
                .await
                .map_err(|e| super::connect::classify_tls(addr, e))?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(UpstreamError::Protocol {
                    got: "no h2 on the inner TLS".into(),
                    want: "h2 (HBONE)",
                });
            }
            let mut inner = h2_handshake(tls, addr, &self.service, "inner").await?;
            let req = connect_request(&self.route.authority, client, &self.host, Some(&gw.network))?;
            self.connect(&mut inner, req, addr).await
        };
        match tokio::time::timeout(timeout, inner_hop).await {
            Ok(r) => r.map(|s| (addr, s)),
            Err(_) => Err(UpstreamError::HandshakeTimeout { addr: addr.to_string() }),
        }
    }

    async fn connect(
        &self,
        hop: &mut Hop,
        req: Request<Empty<Bytes>>,
        addr: SocketAddr,
    ) -> Result<Upgraded, UpstreamError> {
        let sent = match hop.sender.ready().await {
            Ok(()) => hop.sender.send_request(req).await,
            Err(e) => Err(e),
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                // The connection task records the cause as it ends, which may be a moment
                // after the request learns of it.
                let cause = tokio::time::timeout(Duration::from_secs(1), hop.ended.wait_for(Option::is_some)).await;
                return Err(match cause {
                    Ok(Ok(c)) => c.clone().expect("waited for Some"),
                    _ => UpstreamError::Http(format!("HBONE CONNECT to {addr}: {e}")),
                });
            }
        };
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Hbone {
                authority: self.route.authority.clone(),
                status: resp.status().as_u16(),
                reason: refusal_reason(resp.status()),
            });
        }
        hyper::upgrade::on(&mut resp)
            .await
            .map_err(|e| UpstreamError::Http(format!("HBONE CONNECT stream: {e}")))
    }
}

/// Why an HBONE HTTP/2 connection failed. In TLS 1.3 the server checks the client certificate
/// after the client considers the handshake done, so a refused certificate (another trust
/// domain, an unknown CA) arrives as an alert on the first read: a TLS failure, not a reset.
/// The alert can be lost: the endpoint closes with our first HTTP/2 bytes unread, its kernel
/// answers them with a reset, and ours then drops the unread alert. A connection that ends
/// before the endpoint sent a single byte after the handshake is therefore a refused handshake
/// too (`heard` false), whatever error text the reset brought.
fn connection_failure(
    addr: SocketAddr,
    which: &str,
    e: &dyn std::fmt::Display,
    tls: Option<rustls::Error>,
    heard: bool,
) -> UpstreamError {
    const HINT: &str = "did the endpoint refuse this client certificate, e.g. from another trust domain?";
    match tls {
        Some(tls) => UpstreamError::Tls {
            addr: addr.to_string(),
            reason: format!("HBONE {which} connection: {tls} ({HINT})"),
        },
        None if !heard => UpstreamError::Tls {
            addr: addr.to_string(),
            reason: format!(
                "HBONE {which} connection closed before the endpoint sent anything after the handshake: {e} ({HINT})"
            ),
        },
        None => UpstreamError::Http(format!("HBONE {which} connection to {addr}: {e}")),
    }
}

/// A TLS stream that remembers the TLS error that ended it: h2 keeps only the text of the
/// I/O errors it reports, so the alert would otherwise become a bare "connection error".
struct Watched<T> {
    inner: T,
    tls_error: Arc<std::sync::Mutex<Option<rustls::Error>>>,
    /// Set once the endpoint sent any bytes after the handshake (its HTTP/2 SETTINGS).
    heard: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Watched<T> {
    fn note<R>(&self, r: &std::task::Poll<std::io::Result<R>>) {
        if let std::task::Poll::Ready(Err(e)) = r {
            if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                *self.tls_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        self.note(&r);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&r);
        r
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&r);
        r
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn h2_handshake<T>(tls: T, addr: SocketAddr, service: &str, which: &'static str) -> Result<Hop, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tls_error = Arc::new(std::sync::Mutex::new(None));
    let heard = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = TokioIo::new(Watched {
        inner: tls,
        tls_error: tls_error.clone(),
        heard: heard.clone(),
    });
    let seen = move || {
        let tls = tls_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        (tls, heard.load(Ordering::Relaxed))
    };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Pings notice an outer connection silently dropped on the way.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(io)
        .await
        .map_err(|e| {
            let (tls, heard) = seen();
            connection_failure(addr, which, &e, tls, heard)
        })?;
    let service = service.to_string();
    let (tx, ended) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%service, which, error = %e, "HBONE connection ended");
            let (tls, heard) = seen();
            let _ = tx.send(Some(connection_failure(addr, which, &e, tls, heard)));
        }
    });
    Ok(Hop { sender, ended })
}

/// A byte stream of either transport.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A byte stream to `pool`'s service for one client connection of its own (a CONNECT tunnel,
/// an HTTP/1.1 upgrade, a TCP listener's connection): a CONNECT stream naming the client for
/// HBONE services, otherwise an mTLS connection through `gateway` with `tls`.
pub async fn dedicated(
    pool: &super::Pool,
    gateway: &Gateway,
    tls: &TlsParams,
    settings: &UpstreamSettings,
    client: SocketAddr,
) -> Result<Box<dyn Io>, UpstreamError> {
    match pool.hbone() {
        Some(h) => Ok(Box::new(TokioIo::new(h.open(Some(client)).await?.1))),
        None => {
            let (_, c) = connect_via(gateway, tls, settings, &pool.service().name).await?;
            Ok(Box::new(c.stream))
        }
    }
}

fn jitter(j: f64) -> f64 {
    use rand::Rng;
    if j > 0.0 {
        rand::rng().random_range(1.0 - j..=1.0 + j)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_quotes_and_brackets() {
        assert_eq!(
            forwarded("10.20.3.4:51000".parse().unwrap(), "reviews.bookinfo.svc.cluster.local"),
            r#"for="10.20.3.4:51000";host=reviews.bookinfo.svc.cluster.local"#
        );
        assert_eq!(
            forwarded("[2001:db8::7]:443".parse().unwrap(), "r.ns.svc.cluster.local"),
            r#"for="[2001:db8::7]:443";host=r.ns.svc.cluster.local"#
        );
    }

    #[test]
    fn traceparent_shape() {
        let t = traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4, "{t}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "00");
        assert!(parts[1]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(parts[1], "0".repeat(32));
        assert_ne!(traceparent(), t);
    }

    #[test]
    fn connect_requests_carry_authority_and_headers() {
        let client: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let r = connect_request("[fd00::5]:9080", client, "reviews.ns.svc.cluster.local", None).unwrap();
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().authority().unwrap().as_str(), "[fd00::5]:9080");
        assert!(r.uri().scheme().is_none());
        assert!(r.headers().get(X_FORWARDED_NETWORK).is_none());
        assert_eq!(
            r.headers()["forwarded"],
            r#"for="127.0.0.1:4000";host=reviews.ns.svc.cluster.local"#
        );
        let r = connect_request(
            "reviews.ns.svc.cluster.local:9080",
            client,
            "reviews.ns.svc.cluster.local",
            Some("vm-net"),
        )
        .unwrap();
        assert_eq!(
            r.uri().authority().unwrap().as_str(),
            "reviews.ns.svc.cluster.local:9080"
        );
        assert_eq!(r.headers()[X_FORWARDED_NETWORK], "vm-net");
        assert!(r.headers().contains_key("traceparent"));
    }

    /// A snapshot with one service, `svc` (its `transport` and `hbone` lines given), short
    /// upstream timeouts, and a real mesh identity.
    fn snapshot(hbone: &str) -> (tempfile::TempDir, crate::config::Snapshot) {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshsim::MeshCa::new("cluster.local").unwrap();
        let cert = ca.issue("meshgate", "meshgate").unwrap();
        cert.write_files(dir.path(), &ca.root_pem()).unwrap();
        let text = format!(
            "listeners:\n  - name: vm\n    bind: 127.0.0.1:0\n    protocol: http\nmesh:\n  trust_domain: cluster.local\n  \
             gateway: [127.0.0.1:1]\n  identity:\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n\
             services:\n  svc:\n    host: svc.ns.svc.cluster.local\n    port: 9080\n    protocol: http1\n    \
             identity: spiffe://cluster.local/ns/ns/sa/svc\n{hbone}\
             upstream:\n  connect_timeout: 500ms\n  handshake_timeout: 300ms\n\
             tenants:\n  t:\n    sources: [10.0.0.0/8]\n    allow: [\"*\"]\n"
        );
        let path = dir.path().join("meshgate.yaml");
        let s = crate::config::parse(&path, &text, std::time::SystemTime::now()).unwrap();
        (dir, s)
    }

    fn connector(s: &crate::config::Snapshot) -> Arc<Connector> {
        let svc = &s.services[0];
        let crate::config::Transport::Hbone(route) = &svc.transport else {
            panic!("not an HBONE service")
        };
        Arc::new(Connector::new(route, &s.identity, svc, &s.upstream))
    }

    /// A loopback listener that accepts TCP and never reads or answers: TLS to it stalls. The
    /// count is of accepted connections; they are held open until the task is dropped.
    async fn silent_listener() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let count = n.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        (addr, n, task)
    }

    async fn accepted_settles(n: &AtomicU64, want: u64) {
        let until = Instant::now() + Duration::from_secs(2);
        while n.load(Ordering::SeqCst) < want && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn suite_names(c: &ClientConfig) -> Vec<String> {
        c.crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_endpoint_is_dialed_once_for_all_waiters_then_fails_fast() {
        let (addr, accepted, _task) = silent_listener().await;
        let (_dir, s) = snapshot(&format!(
            "    transport: hbone\n    hbone:\n      address: \"{addr}\"\n"
        ));
        let c = connector(&s);
        let limit = s.upstream.connect_timeout + s.upstream.handshake_timeout;
        let started = Instant::now();
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let c = c.clone();
            waiters.spawn(async move { c.open(None).await.map(|_| ()) });
        }
        while let Some(r) = waiters.join_next().await {
            let e = r.unwrap().expect_err("nothing answers TLS");
            assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
        }
        // One dial shared by all: about one handshake timeout, not eight in a row.
        assert!(started.elapsed() < 3 * limit, "{:?}", started.elapsed());
        accepted_settles(&accepted, 1).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all the waiters");

        // Right after the failure: the same error at once, no new connection.
        let e = c.open(None).await.map(|_| ()).expect_err("fails fast");
        assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // After the fail-fast window the endpoint is dialed again.
        tokio::time::sleep(FAIL_FAST + Duration::from_millis(50)).await;
        let e = c.open(None).await.map(|_| ()).expect_err("still dead");
        assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
        accepted_settles(&accepted, 2).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gateway_name_is_resolved_at_every_dial() {
        let (live, accepted, _task) = silent_listener().await;
        let (_dir, s) = snapshot(&format!(
            "    transport: double-hbone\n    hbone:\n      gateway: \"localhost:{}\"\n      \
             gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
            live.port()
        ));
        let c = connector(&s);
        // What an earlier resolution found; the name now resolves elsewhere.
        let stale = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        c.outer.target.set_addrs(vec![stale]);
        let e = c.open(None).await.map(|_| ()).expect_err("nothing answers TLS");
        assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
        accepted_settles(&accepted, 1).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "dialed the freshly resolved address"
        );
        let addrs = c.outer.target.addrs();
        assert!(addrs.contains(&live) && !addrs.contains(&stale), "{addrs:?}");
    }

    #[test]
    fn hbone_tls_offers_ztunnel_cipher_suites_only() {
        let (_dir, s) = snapshot(
            "    transport: double-hbone\n    hbone:\n      gateway: \"127.0.0.1:15008\"\n      \
             gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
        );
        let c = connector(&s);
        let want = ["TLS13_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256"];
        assert_eq!(suite_names(&c.outer.tls.config), want);
        assert_eq!(suite_names(c.inner_tls.as_ref().unwrap()), want);
    }

    #[test]
    fn a_connection_ended_before_the_endpoint_spoke_is_a_tls_refusal() {
        let addr: SocketAddr = "127.0.0.2:15008".parse().unwrap();
        let reset = "connection error: Connection reset by peer (os error 104)";
        // The alert arrived: its text says why.
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateUnknown);
        match connection_failure(addr, "outer", &reset, Some(alert), false) {
            UpstreamError::Tls { reason, .. } => assert!(reason.contains("CertificateUnknown"), "{reason}"),
            other => panic!("{other}"),
        }
        // The reset overtook the alert: still a refused handshake.
        match connection_failure(addr, "outer", &reset, None, false) {
            UpstreamError::Tls { reason, .. } => {
                assert!(reason.contains("refuse this client certificate"), "{reason}")
            }
            other => panic!("{other}"),
        }
        // A connection that was working and then dropped is a reset, not a TLS problem.
        assert!(matches!(
            connection_failure(addr, "outer", &reset, None, true),
            UpstreamError::Http(_)
        ));
    }

    #[test]
    fn refusals_are_named() {
        assert!(refusal_reason(StatusCode::UNAUTHORIZED).contains("RBAC"));
        assert!(refusal_reason(StatusCode::BAD_REQUEST).contains("authority"));
        assert!(refusal_reason(StatusCode::SERVICE_UNAVAILABLE).contains("app"));
    }
}

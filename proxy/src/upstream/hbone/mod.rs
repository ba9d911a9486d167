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

mod outer;
#[cfg(test)]
mod tests;

use super::{Gateway, UpstreamError};
use crate::config::{GatewayTarget, HboneRoute, Service, UpstreamSettings};
use crate::identity::{ClientCert, ExpectedServer, Identity, SpiffeServerVerifier};
use outer::h2_handshake;

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

fn jitter(j: f64) -> f64 {
    use rand::Rng;
    if j > 0.0 {
        rand::rng().random_range(1.0 - j..=1.0 + j)
    } else {
        1.0
    }
}

//! A pod's sidecar: the Istio inbound listener (istio-wire §2) in front of the echo app.
//!
//! Owns: mTLS termination with a required, mesh-rooted client certificate (§2.1); Envoy's ALPN
//! answer (§2.4); HTTP/2 or HTTP/1.1 serving; the AuthorizationPolicy-like principal check (§3.3);
//! inbound header handling: `x-forwarded-client-cert` APPEND_FORWARD (§3.1), metadata-exchange
//! headers consumed from requests and injected into responses (§3.2), `server: istio-envoy` (§2.7);
//! and the connection-level lifecycle: idle timeout and GOAWAY/`connection: close` on demand.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::header::{HeaderName, HeaderValue, SERVER};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::crypto::{ring, CryptoProvider};
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::version::{TLS12, TLS13};
use rustls::{ProtocolVersion, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;

use crate::ca::WorkloadCert;
use crate::echo::{self, EchoBody, EchoReset, SidecarView};
use crate::stats::{GaugeGuard, PodCounters};
use crate::tasks::OwnedExecutor;

/// Envoy's HTTP filter-chain ALPN, in server priority order (`ALPNHttp`, §2.4). It deliberately
/// has no `istio`: that would hide the real protocol.
pub const SIDECAR_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// A TCP chain with metadata exchange (`ALPNDownstreamWithMxc`, §2.4): a client offering
/// `istio-peer-exchange` gets it, and the exchange runs (§2.5).
pub const SIDECAR_TCP_ALPN: [&[u8]; 3] = [b"istio-peer-exchange", b"h2", b"http/1.1"];

/// TLS handshake deadline (from TCP accept to handshake done).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which no byte moved for this long is closed. Envoy's HCM `idle_timeout`
/// defaults to 1 h (counted from the last active stream; counting bytes is close enough) and
/// Envoy sets no request-header timeout and sends no HTTP/2 pings by default, so neither does
/// this sidecar: a pooled connection lives as long as it would against a real pod. The same
/// bound ends slow-loris heads and peers that stop reading a response.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's default `max_concurrent_streams` (2^31 - 1), which Istio leaves alone on inbound
/// listeners; hyper's own default (200) would make the pods stricter than a real mesh.
const H2_MAX_CONCURRENT_STREAMS: u32 = (1 << 31) - 1;

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

/// Envoy's server-side TLS parameters as Istio configures them (§2.1): TLS 1.2 limited to the
/// ECDHE AES-GCM suites of `SupportedCiphers` (rustls has no plain-RSA key exchange, so the two
/// `AES*-GCM-SHA*` entries cannot be offered; ChaCha20 is not in Istio's TLS 1.2 list), TLS 1.3
/// with BoringSSL's defaults, and only the non-FIPS default curves X25519 and P-256.
pub fn envoy_server_provider() -> CryptoProvider {
    use ring::cipher_suite as cs;
    let base = ring::default_provider();
    CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![ring::kx_group::X25519, ring::kx_group::SECP256R1],
        ..base
    }
}

/// The two server configs a sidecar chooses between once it has seen the ClientHello.
///
/// rustls aborts the handshake (`no_application_protocol`) when the client offers ALPN and
/// nothing overlaps, whereas Envoy (`SSL_TLSEXT_ERR_NOACK`) carries on without ALPN. Looking at
/// the hello first and picking the config without ALPN in that case reproduces Envoy.
pub(crate) struct SidecarTls {
    with_alpn: Arc<ServerConfig>,
    tcp_with_alpn: Arc<ServerConfig>,
    without_alpn: Arc<ServerConfig>,
}

impl SidecarTls {
    pub(crate) fn new(identity: &WorkloadCert, mesh_root: CertificateDer<'static>) -> anyhow::Result<Self> {
        let provider = Arc::new(envoy_server_provider());
        let mut roots = RootCertStore::empty();
        roots.add(mesh_root).context("mesh root")?;
        // Required client certificate, chained to the mesh root; no SAN check at the TLS layer
        // (identity checks belong to the authorization step, §2.1).
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("client verifier")?;
        let base = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13, &TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain_der()?, identity.key_der()?)
            .context("server certificate")?;
        let mut with_alpn = base.clone();
        with_alpn.alpn_protocols = SIDECAR_ALPN.iter().map(|p| p.to_vec()).collect();
        let mut tcp_with_alpn = base.clone();
        tcp_with_alpn.alpn_protocols = SIDECAR_TCP_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(SidecarTls {
            with_alpn: Arc::new(with_alpn),
            tcp_with_alpn: Arc::new(tcp_with_alpn),
            without_alpn: Arc::new(base),
        })
    }

    fn for_client_alpn<'a>(&self, offered: Option<impl Iterator<Item = &'a [u8]>>, tcp: bool) -> Arc<ServerConfig> {
        let list: &[&[u8]] = if tcp { &SIDECAR_TCP_ALPN } else { &SIDECAR_ALPN };
        let overlap = offered.map(|mut it| it.any(|p| list.contains(&p))).unwrap_or(false);
        match (overlap, tcp) {
            (true, true) => self.tcp_with_alpn.clone(),
            (true, false) => self.with_alpn.clone(),
            (false, _) => self.without_alpn.clone(),
        }
    }
}

/// Everything a pod's sidecar and app need, shared by its connections.
pub(crate) struct PodInfo {
    pub name: String,
    pub service: String,
    pub namespace: String,
    pub subset: Option<String>,
    /// URI SAN of the sidecar's own certificate: the `By` of the XFCC element.
    pub spiffe_id: Option<String>,
    pub allowed_principals: Option<Vec<String>>,
    /// The service port is declared TCP: every connection goes to the TCP chain.
    pub tcp: bool,
    /// The app also serves `bookstore.Bookstore` (gRPC), see [`crate::bookstore`].
    pub bookstore: bool,
    pub counters: PodCounters,
    pub(crate) tls: SidecarTls,
    /// Bumped by [`crate::Mesh::goaway_pod`]: every open connection shuts down gracefully.
    pub(crate) goaway: watch::Sender<u64>,
    metadata_id: HeaderValue,
    metadata: HeaderValue,
    /// This pod's own metadata-exchange preamble, for TCP peers that ask for the exchange.
    mx_preamble: Vec<u8>,
}

impl PodInfo {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        service: &str,
        namespace: &str,
        subset: Option<&str>,
        spiffe_id: Option<String>,
        service_account: &str,
        allowed_principals: Option<Vec<String>>,
        counters: PodCounters,
        tls: SidecarTls,
    ) -> anyhow::Result<Self> {
        let labels: &[(&str, &str)] = &[("app", service), ("service.istio.io/canonical-name", service)];
        use crate::peer::Field;
        let fields = crate::peer::encode_struct(&[
            ("NAME", Field::Str(name)),
            ("NAMESPACE", Field::Str(namespace)),
            ("SERVICE_ACCOUNT", Field::Str(service_account)),
            ("CLUSTER_ID", Field::Str("Kubernetes")),
            ("WORKLOAD_NAME", Field::Str(service)),
            ("LABELS", Field::Map(labels)),
        ]);
        let metadata = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&fields)
        };
        let metadata_id = format!("sidecar~10.0.0.1~{name}.{namespace}~{namespace}.svc.cluster.local");
        Ok(PodInfo {
            name: name.to_string(),
            service: service.to_string(),
            namespace: namespace.to_string(),
            subset: subset.map(str::to_string),
            spiffe_id,
            allowed_principals,
            tcp: false,
            bookstore: false,
            counters,
            tls,
            goaway: watch::Sender::new(0),
            mx_preamble: crate::peer::preamble(&fields, &metadata_id),
            metadata_id: HeaderValue::from_str(&metadata_id)?,
            metadata: HeaderValue::from_str(&metadata)?,
        })
    }
}

/// What the TLS handshake established, for the request handlers.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub alpn: Option<String>,
    /// The SNI the client sent (what the gateway routed on).
    pub sni: Option<String>,
    /// Every ALPN protocol the client offered, in its order.
    pub offered_alpn: Vec<String>,
    pub tls_version: Option<&'static str>,
    pub peer: PeerCert,
}

/// The client's leaf certificate, as Envoy reports it in XFCC.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerCert {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    /// RFC 2253 order (last RDN first), `,`-separated; empty for Istio certificates.
    pub subject: String,
    pub sha256_hex: String,
}

impl PeerCert {
    fn from_der(der: &[u8]) -> PeerCert {
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::FromDer as _;
        let mut peer = PeerCert {
            sha256_hex: hex::encode(Sha256::digest(der)),
            ..PeerCert::default()
        };
        // webpki has already accepted this certificate, so parsing should not fail; if it does,
        // the peer simply has no principal (and RBAC denies it).
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
            return peer;
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => peer.uris.push(u.to_string()),
                    GeneralName::DNSName(d) => peer.dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        let registry = x509_parser::objects::oid_registry();
        let mut rdns: Vec<String> = cert
            .subject()
            .iter()
            .map(|rdn| {
                rdn.iter()
                    .map(|attr| {
                        let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                            .map(str::to_string)
                            .unwrap_or_else(|_| attr.attr_type().to_id_string());
                        let value = attr.as_str().unwrap_or("?");
                        format!("{key}={value}")
                    })
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect();
        rdns.reverse();
        peer.subject = rdns.join(",");
        peer
    }
}

/// Serves one TCP connection accepted by the sidecar, until it closes.
pub(crate) async fn serve_connection(pod: Arc<PodInfo>, tcp: TcpStream, peer_addr: SocketAddr) {
    let _open = GaugeGuard::new(&pod.counters.connections_open);
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        let hello = start.client_hello();
        let offered: Vec<String> = hello
            .alpn()
            .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
            .unwrap_or_default();
        let config = pod.tls.for_client_alpn(hello.alpn(), pod.tcp);
        start.into_stream(config).await.map(|s| (s, offered))
    };
    let (tls, offered_alpn) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(pod = %pod.name, %peer_addr, error = %e, "TLS handshake failed");
            pod.counters.tls_failures.inc();
            return;
        }
        Err(_) => {
            tracing::debug!(pod = %pod.name, %peer_addr, "TLS handshake timed out");
            pod.counters.tls_failures.inc();
            return;
        }
    };
    pod.counters.tls_handshakes.inc();

    let (_, session) = tls.get_ref();
    let conn = Arc::new(ConnInfo {
        alpn: session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        sni: session.server_name().map(str::to_string),
        offered_alpn,
        tls_version: session.protocol_version().map(|v| match v {
            ProtocolVersion::TLSv1_3 => "TLSv1.3",
            ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "other",
        }),
        // The verifier required a certificate, so there is one; default to "no identity" anyway.
        peer: session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| PeerCert::from_der(leaf))
            .unwrap_or_default(),
    });
    // STRICT mTLS on a port declared TCP (§2.3): any TLS goes to the TCP chain.
    if pod.tcp {
        return serve_tcp(&pod, &conn, tls, peer_addr).await;
    }
    let h2 = conn.alpn.as_deref() == Some("h2");

    let svc = {
        let pod = pod.clone();
        let conn = conn.clone();
        service_fn(move |req| {
            let pod = pod.clone();
            let conn = conn.clone();
            async move { handle_request(&pod, &conn, req).await }
        })
    };
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(ActivityIo {
        inner: tls,
        activity: activity.clone(),
    });
    let goaway = pod.goaway.subscribe();
    let result = if h2 {
        let exec = OwnedExecutor::default();
        let conn = hyper::server::conn::http2::Builder::new(exec)
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            // RFC 8441 WebSocket over HTTP/2. Envoy accepts it only where configured
            // (`allow_connect` / an upgrade config); meshsim's sidecars always do.
            .enable_connect_protocol()
            .serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), goaway, &activity).await
    } else {
        // No timer: hyper would then default to a 30 s head timeout that Envoy does not have.
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), goaway, &activity).await
    };
    if let Err(e) = result {
        tracing::debug!(pod = %pod.name, %peer_addr, error = %e, "connection ended with error");
    }
}

/// Envoy's inbound TCP chain with `tcp_proxy` to an echo app: L4 RBAC on the peer principal,
/// then every byte received is sent back; the client's half-close (EOF) is passed on as ours
/// once everything has been echoed.
async fn serve_tcp<S>(pod: &PodInfo, conn: &ConnInfo, mut tls: S, peer_addr: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(allowed) = &pod.allowed_principals {
        if !allowed.iter().any(|p| principal_matches(p, &conn.peer.uris)) {
            pod.counters.rbac_denied.inc();
            return;
        }
    }
    pod.counters.tcp_connections.inc();
    // The metadata exchange runs only when it was negotiated (§2.5); otherwise the peer is
    // attributed from its certificate alone, as Istio does.
    let mut first = Vec::new();
    let mut metadata = None;
    if conn.alpn.as_deref() == Some("istio-peer-exchange") {
        match tokio::time::timeout(IDLE_TIMEOUT, crate::peer::server_exchange(&mut tls, &pod.mx_preamble)).await {
            Ok(Ok((m, rest))) => (metadata, first) = (m, rest),
            Ok(Err(e)) => {
                tracing::debug!(pod = %pod.name, %peer_addr, error = %e, "metadata exchange failed");
                return;
            }
            Err(_) => return,
        }
    }
    pod.counters.sources.record(crate::peer::Source::attribute(
        conn.peer.uris.first().map(String::as_str),
        metadata.as_ref(),
    ));
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut buf = vec![0u8; 64 * 1024];
    let result = async {
        if !first.is_empty() {
            wr.write_all(&first).await?;
            pod.counters.tcp_bytes.add(first.len() as u64);
        }
        loop {
            let n = tokio::time::timeout(IDLE_TIMEOUT, rd.read(&mut buf)).await??;
            if n == 0 {
                break;
            }
            wr.write_all(&buf[..n]).await?;
            pod.counters.tcp_bytes.add(n as u64);
        }
        wr.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(pod = %pod.name, %peer_addr, error = %e, "TCP connection ended with error");
    }
}

/// Runs a hyper connection to completion, shutting it down gracefully on GOAWAY and closing it
/// when idle for [`IDLE_TIMEOUT`].
async fn drive<C>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    mut goaway: watch::Receiver<u64>,
    activity: &Activity,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let idle_deadline = tokio::time::Instant::from_std(activity.last() + IDLE_TIMEOUT);
        tokio::select! {
            r = conn.as_mut() => return r,
            changed = goaway.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    graceful(conn.as_mut());
                }
            }
            _ = tokio::time::sleep_until(idle_deadline) => {
                if activity.last().elapsed() >= IDLE_TIMEOUT {
                    return Ok(());
                }
            }
        }
    }
}

/// When a byte last moved on a connection.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The TLS stream, recording activity for the idle timeout.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Envoy's inbound HTTP filter chain for one request, then the app.
async fn handle_request(
    pod: &PodInfo,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Result<Response<EchoBody>, EchoReset> {
    // RBAC runs before the app sees anything (§3.3).
    if let Some(allowed) = &pod.allowed_principals {
        if !allowed.iter().any(|p| principal_matches(p, &conn.peer.uris)) {
            pod.counters.rbac_denied.inc();
            let mut resp = echo::full(StatusCode::FORBIDDEN, "text/plain", "RBAC: access denied");
            add_response_headers(pod, &mut resp, false);
            return Ok(resp);
        }
    }

    // Metadata exchange (§3.2): the inbound filter reads these and removes them.
    let headers = req.headers_mut();
    let peer_metadata = headers.remove(PEER_METADATA);
    // Istio ignores metadata it cannot decode: the peer is then attributed as unknown.
    let decoded = peer_metadata
        .as_ref()
        .and_then(|v| crate::peer::decode_header(v.as_bytes()).ok());
    let source = crate::peer::Source::attribute(conn.peer.uris.first().map(String::as_str), decoded.as_ref());
    pod.counters.sources.record(source.clone());
    let view = SidecarView {
        peer_metadata_id: headers.remove(PEER_METADATA_ID).map(|v| lossy(&v)),
        peer_metadata: peer_metadata.map(|v| lossy(&v)),
        source,
    };

    // XFCC APPEND_FORWARD (§3.1): keep what came in, append this hop's element.
    let mut xfcc: Vec<u8> = Vec::new();
    for v in headers.get_all(&XFCC) {
        if !xfcc.is_empty() {
            xfcc.push(b',');
        }
        xfcc.extend_from_slice(v.as_bytes());
    }
    if !xfcc.is_empty() {
        xfcc.push(b',');
    }
    xfcc.extend_from_slice(xfcc_element(pod.spiffe_id.as_deref(), &conn.peer).as_bytes());
    headers.remove(&XFCC);
    if let Ok(v) = HeaderValue::from_bytes(&xfcc) {
        headers.insert(XFCC, v);
    }

    let received_metadata = view.peer_metadata.is_some();
    let mut resp = echo::serve(pod, conn, view, req).await?;
    add_response_headers(pod, &mut resp, received_metadata);
    Ok(resp)
}

/// `metadata`: the request carried peer metadata; only then does Istio's filter answer with
/// the pod's own (`if (!downstream_ || ctx.request_peer_received_)`).
fn add_response_headers(pod: &PodInfo, resp: &mut Response<EchoBody>, metadata: bool) {
    let h = resp.headers_mut();
    // OVERWRITE, as Istio configures the inbound HCM (§2.7).
    h.insert(SERVER, HeaderValue::from_static("istio-envoy"));
    if metadata {
        h.insert(PEER_METADATA_ID, pod.metadata_id.clone());
        h.insert(PEER_METADATA, pod.metadata.clone());
    }
}

/// One XFCC element as Envoy builds it for `subject, uri, dns` (§3.1): `By` (our URI SAN),
/// `Hash` (SHA-256 of the client leaf DER, hex), `Subject` (always quoted), `URI` (first client
/// URI SAN; the key is kept even when empty, as Envoy does), one `DNS` per client DNS SAN.
pub(crate) fn xfcc_element(by: Option<&str>, peer: &PeerCert) -> String {
    let mut parts = Vec::new();
    if let Some(by) = by {
        parts.push(format!("By={by}"));
    }
    parts.push(format!("Hash={}", peer.sha256_hex));
    parts.push(format!("Subject=\"{}\"", peer.subject.replace('"', "\\\"")));
    parts.push(format!("URI={}", peer.uris.first().map(String::as_str).unwrap_or("")));
    for dns in &peer.dns {
        parts.push(format!("DNS={dns}"));
    }
    // Certificate strings are IA5 and may in theory hold control characters; keep the header valid.
    parts
        .join(";")
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect()
}

/// An AuthorizationPolicy `principals` entry against the peer's URI SANs, as Istio compiles it
/// (`StringMatcherWithPrefix(value, "spiffe://")`, §3.3): `*` = any authenticated peer,
/// `prefix*`, `*suffix`, otherwise exact match of `spiffe://<value>`.
pub(crate) fn principal_matches(pattern: &str, uris: &[String]) -> bool {
    uris.iter().any(|uri| {
        if pattern == "*" {
            !uri.is_empty()
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            uri.ends_with(suffix)
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            uri.starts_with(&format!("spiffe://{prefix}"))
        } else {
            uri.strip_prefix("spiffe://") == Some(pattern)
        }
    })
}

fn lossy(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_matching_follows_istio() {
        let uris = vec!["spiffe://cluster.local/ns/meshgate/sa/meshgate".to_string()];
        assert!(principal_matches("cluster.local/ns/meshgate/sa/meshgate", &uris));
        assert!(!principal_matches("cluster.local/ns/meshgate/sa/other", &uris));
        assert!(!principal_matches(
            "spiffe://cluster.local/ns/meshgate/sa/meshgate",
            &uris
        ));
        assert!(principal_matches("*", &uris));
        assert!(principal_matches("cluster.local/ns/meshgate/*", &uris));
        assert!(principal_matches("*/sa/meshgate", &uris));
        assert!(!principal_matches("*", &[]));
    }

    #[test]
    fn xfcc_element_shape() {
        let peer = PeerCert {
            uris: vec!["spiffe://td/ns/a/sa/b".into()],
            dns: vec![],
            subject: String::new(),
            sha256_hex: "ab".into(),
        };
        assert_eq!(
            xfcc_element(Some("spiffe://td/ns/x/sa/y"), &peer),
            "By=spiffe://td/ns/x/sa/y;Hash=ab;Subject=\"\";URI=spiffe://td/ns/a/sa/b"
        );
    }
}

//! Istio ambient on loopback (istio-wire §5): a ztunnel-like HBONE endpoint per pod of an
//! ambient service (what listens on the pod's port 15008), and an ambient east-west gateway for
//! double HBONE.
//!
//! The endpoint enforces ztunnel's inbound checks (`src/proxy/inbound.rs`): TLS 1.3 only, ALPN
//! `h2`, a client certificate chaining to the mesh root and in the mesh's trust domain
//! (`TrustDomainVerifier`), then per HTTP/2 request: not CONNECT → 400; authority unparsable →
//! 400; an `IP:port` authority whose IP is not the address the connection came in on, or a
//! `host:port` authority that is not this pod's service (double HBONE names the service) → 400;
//! the pod's allow list refusing the client principal → 401; a port the app does not listen on
//! → 503 (ztunnel's upstream connect fails); otherwise 200 and the stream carries plaintext to
//! the pod's echo app, which reports the HBONE peer's principal.
//!
//! The gateway terminates the outer HBONE with its own identity and forwards the CONNECT stream
//! of `host:port` opaquely to one pod's HBONE endpoint, so the inner TLS is end to end.
//!
//! Each pod's endpoint listens on an address of its own, `127.0.0.N` (N = 2, 3, … in the order
//! pods are added; loopback only), so the authority check above can fail: a CONNECT naming
//! another pod's IP is refused with 400, as ztunnel refuses it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::ring;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::ca::{MeshCa, WorkloadCert};
use crate::echo::{self, SidecarView};
use crate::sidecar::{principal_matches, ConnInfo, PeerCert, PodInfo};
use crate::spec::{MeshSpec, ServiceSpec};
use crate::tasks::{OwnedExecutor, Service};

/// ztunnel's inbound HBONE port; meshsim listens on a kernel-chosen port instead.
pub const HBONE_PORT: u16 = 15008;
/// The ambient east-west gateway's namespace and service account (`gen-eastwest-gateway.sh`).
pub const GATEWAY_NAMESPACE: &str = "istio-system";
pub const GATEWAY_SERVICE_ACCOUNT: &str = "istio-eastwestgateway";
/// `x-forwarded-network` (ztunnel `X_FORWARDED_NETWORK_HEADER`).
pub const X_FORWARDED_NETWORK: &str = "x-forwarded-network";

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one HBONE endpoint (or the ambient gateway) saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HboneStats {
    /// Completed mTLS handshakes: one per outer connection, however many CONNECTs it carries.
    pub tls_handshakes: u64,
    /// Handshakes refused (no or untrusted client certificate, wrong trust domain, no `h2`).
    pub tls_failures: u64,
    /// CONNECTs answered 200.
    pub connects_ok: u64,
    /// CONNECTs answered 400 (not CONNECT, bad or foreign authority).
    pub refused_400: u64,
    /// CONNECTs answered 401 (RBAC).
    pub refused_401: u64,
    /// CONNECTs answered 503 (nothing listening on the target port).
    pub refused_503: u64,
    /// The last CONNECT received, whatever the answer.
    pub last_connect: Option<ConnectSeen>,
    /// The TLS cipher suite of the last completed handshake, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: Option<String>,
    /// The cipher suites the client offered in the last ClientHello, in its order.
    pub offered_cipher_suites: Vec<String>,
}

/// One CONNECT as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectSeen {
    pub authority: Option<String>,
    /// The client certificate's first URI SAN.
    pub principal: Option<String>,
    pub forwarded: Option<String>,
    pub traceparent: Option<String>,
    pub forwarded_network: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
    connects_ok: AtomicU64,
    refused_400: AtomicU64,
    refused_401: AtomicU64,
    refused_503: AtomicU64,
    last_connect: Mutex<Option<ConnectSeen>>,
    cipher_suite: Mutex<Option<String>>,
    offered_cipher_suites: Mutex<Vec<String>>,
}

impl Counters {
    fn snapshot(&self) -> HboneStats {
        HboneStats {
            tls_handshakes: self.tls_handshakes.load(Ordering::SeqCst),
            tls_failures: self.tls_failures.load(Ordering::SeqCst),
            connects_ok: self.connects_ok.load(Ordering::SeqCst),
            refused_400: self.refused_400.load(Ordering::SeqCst),
            refused_401: self.refused_401.load(Ordering::SeqCst),
            refused_503: self.refused_503.load(Ordering::SeqCst),
            last_connect: self.last_connect.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            cipher_suite: self.cipher_suite.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            offered_cipher_suites: self
                .offered_cipher_suites
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn answer(&self, status: StatusCode) -> Response<Empty<Bytes>> {
        let c = match status.as_u16() {
            200 => &self.connects_ok,
            400 => &self.refused_400,
            401 => &self.refused_401,
            _ => &self.refused_503,
        };
        c.fetch_add(1, Ordering::SeqCst);
        let mut r = Response::new(Empty::new());
        *r.status_mut() = status;
        r
    }

    fn record(&self, req: &Request<Incoming>, peer: &PeerCert) {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let seen = ConnectSeen {
            authority: req.uri().authority().map(|a| a.to_string()),
            principal: peer.uris.first().cloned(),
            forwarded: h("forwarded"),
            traceparent: h("traceparent"),
            forwarded_network: h(X_FORWARDED_NETWORK),
        };
        *self.last_connect.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
    }
}

/// ztunnel's `TrustDomainVerifier`: the chain must lead to the mesh root, and the client's
/// SPIFFE ID must be in the mesh's trust domain.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

#[derive(Debug, thiserror::Error)]
#[error("client identity {0:?} is not in trust domain {1}")]
struct WrongTrustDomain(Vec<String>, String);

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let uris = uri_sans(end_entity);
        let prefix = format!("spiffe://{}/", self.trust_domain);
        if uris.iter().any(|u| u.starts_with(&prefix)) {
            return Ok(ClientCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(WrongTrustDomain(uris, self.trust_domain.clone()))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// URI SANs of a DER certificate (the SPIFFE ID a peer presents).
pub(crate) fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer as _;
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// Presents the listener's certificate and notes the cipher suites each ClientHello offers.
#[derive(Debug)]
struct RecordingResolver {
    key: Arc<rustls::sign::CertifiedKey>,
    counters: Arc<Counters>,
}

impl rustls::server::ResolvesServerCert for RecordingResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let offered = hello.cipher_suites().iter().map(|c| format!("{c:?}")).collect();
        *self
            .counters
            .offered_cipher_suites
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = offered;
        Some(self.key.clone())
    }
}

/// ztunnel's server TLS: TLS 1.3 only, ALPN `h2`, required mesh client certificate in the trust
/// domain, no session resumption.
fn server_config(
    identity: &WorkloadCert,
    root: CertificateDer<'static>,
    trust_domain: &str,
    counters: &Arc<Counters>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(ring::default_provider());
    let key = provider
        .key_provider
        .load_private_key(identity.key_der()?)
        .context("server key")?;
    let resolver = Arc::new(RecordingResolver {
        key: Arc::new(rustls::sign::CertifiedKey::new(identity.chain_der()?, key)),
        counters: counters.clone(),
    });
    let mut roots = RootCertStore::empty();
    roots.add(root).context("mesh root")?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client verifier")?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The mTLS handshake of an HBONE listener; `None` (counted) when it fails.
async fn accept(
    tls: &Arc<ServerConfig>,
    tcp: TcpStream,
    counters: &Counters,
    who: &str,
    peer_addr: SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, PeerCert)> {
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(tls.clone());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%who, %peer_addr, error = %e, "HBONE TLS handshake failed");
            counters.tls_failures.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        Err(_) => {
            counters.tls_failures.fetch_add(1, Ordering::SeqCst);
            return None;
        }
    };
    let session = tls.get_ref().1;
    let suite = session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()));
    *counters.cipher_suite.lock().unwrap_or_else(|e| e.into_inner()) = suite;
    if session.alpn_protocol() != Some(b"h2") {
        tracing::debug!(%who, %peer_addr, "HBONE client did not negotiate h2");
        counters.tls_failures.fetch_add(1, Ordering::SeqCst);
        return None;
    }
    let leaf = session.peer_certificates().and_then(|c| c.first());
    let peer = PeerCert {
        uris: leaf.map(|l| uri_sans(l)).unwrap_or_default(),
        sha256_hex: leaf.map(|l| hex::encode(Sha256::digest(l))).unwrap_or_default(),
        ..PeerCert::default()
    };
    counters.tls_handshakes.fetch_add(1, Ordering::SeqCst);
    Some((tls, peer))
}

/// One pod's HBONE endpoint.
pub(crate) struct Endpoint {
    pod: Arc<PodInfo>,
    /// The pod's service host and port: what a double-HBONE inner CONNECT names, and the port
    /// the app listens on.
    host: String,
    app_port: u16,
    tls: Arc<ServerConfig>,
    counters: Arc<Counters>,
}

impl Endpoint {
    fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        local: SocketAddr,
        conn: &Arc<ConnInfo>,
        exec: &OwnedExecutor,
    ) -> Response<Empty<Bytes>> {
        let c = &self.counters;
        if req.method() != Method::CONNECT {
            return c.answer(StatusCode::BAD_REQUEST);
        }
        c.record(&req, &conn.peer);
        let Some(authority) = req.uri().authority().cloned() else {
            return c.answer(StatusCode::BAD_REQUEST);
        };
        let port = match authority.as_str().parse::<SocketAddr>() {
            // The pod's own address: the IP this connection was dialed on.
            Ok(sa) if sa.ip() == local.ip() => sa.port(),
            Ok(_) => return c.answer(StatusCode::BAD_REQUEST),
            // Double HBONE: the inner CONNECT names the service by host name.
            Err(_) => match authority.port_u16() {
                Some(p) if authority.host().eq_ignore_ascii_case(&self.host) => p,
                _ => return c.answer(StatusCode::BAD_REQUEST),
            },
        };
        if let Some(allowed) = &self.pod.allowed_principals {
            if !allowed.iter().any(|p| principal_matches(p, &conn.peer.uris)) {
                self.pod.counters.rbac_denied.inc();
                return c.answer(StatusCode::UNAUTHORIZED);
            }
        }
        if port != self.app_port {
            return c.answer(StatusCode::SERVICE_UNAVAILABLE);
        }
        let upgrade = hyper::upgrade::on(&mut req);
        let (ep, conn) = (self.clone(), conn.clone());
        hyper::rt::Executor::execute(exec, async move {
            match upgrade.await {
                Ok(stream) => ep.serve_app(TokioIo::new(stream), conn).await,
                Err(e) => tracing::debug!(pod = %ep.pod.name, error = %e, "HBONE upgrade failed"),
            }
        });
        c.answer(StatusCode::OK)
    }

    /// The app behind ztunnel: plaintext HTTP/1.1 or h2c to the echo app, or bytes echoed for a
    /// TCP service.
    async fn serve_app(self: Arc<Self>, io: TokioIo<hyper::upgrade::Upgraded>, conn: Arc<ConnInfo>) {
        if self.pod.tcp {
            let (mut rd, mut wr) = tokio::io::split(io);
            let n = tokio::io::copy(&mut rd, &mut wr).await.unwrap_or(0);
            self.pod.counters.tcp_connections.inc();
            self.pod.counters.tcp_bytes.add(n);
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
            return;
        }
        let ep = self.clone();
        let svc = service_fn(move |req| {
            let (ep, conn) = (ep.clone(), conn.clone());
            async move { echo::serve(&ep.pod, &conn, SidecarView::default(), req).await }
        });
        let result = hyper_util::server::conn::auto::Builder::new(OwnedExecutor::default())
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .await;
        if let Err(e) = result {
            tracing::debug!(pod = %self.pod.name, error = %e, "HBONE app connection ended with error");
        }
    }
}

async fn serve_endpoint(ep: Arc<Endpoint>, tcp: TcpStream, peer_addr: SocketAddr) {
    let Ok(local) = tcp.local_addr() else { return };
    let Some((tls, peer)) = accept(&ep.tls, tcp, &ep.counters, &ep.pod.name, peer_addr).await else {
        return;
    };
    let conn = Arc::new(ConnInfo {
        // The app sees plaintext: ALPN and TLS belong to the tunnel.
        alpn: None,
        sni: None,
        offered_alpn: Vec::new(),
        tls_version: None,
        peer,
    });
    let exec = OwnedExecutor::default();
    let svc = {
        let exec = exec.clone();
        service_fn(move |req| {
            let resp = ep.handle(req, local, &conn, &exec);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    let result = hyper::server::conn::http2::Builder::new(exec)
        .serve_connection(TokioIo::new(tls), svc)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer_addr, error = %e, "HBONE connection ended with error");
    }
}

/// The ambient east-west gateway.
struct AmbientGateway {
    tls: Arc<ServerConfig>,
    /// `host:port` of each ambient service → its pods' HBONE endpoints.
    routes: HashMap<String, Vec<SocketAddr>>,
    next: AtomicUsize,
    counters: Arc<Counters>,
}

impl AmbientGateway {
    fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        peer: &PeerCert,
        exec: &OwnedExecutor,
    ) -> Response<Empty<Bytes>> {
        let c = &self.counters;
        if req.method() != Method::CONNECT {
            return c.answer(StatusCode::BAD_REQUEST);
        }
        c.record(&req, peer);
        let Some(authority) = req.uri().authority().map(|a| a.as_str().to_ascii_lowercase()) else {
            return c.answer(StatusCode::BAD_REQUEST);
        };
        // Only service names: an IP authority would let a caller reach any pod directly.
        let Some(backends) = self.routes.get(&authority).filter(|b| !b.is_empty()) else {
            return c.answer(StatusCode::BAD_REQUEST);
        };
        let backend = backends[self.next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        let upgrade = hyper::upgrade::on(&mut req);
        hyper::rt::Executor::execute(exec, async move {
            let pod = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await;
            let (Ok(Ok(mut pod)), Ok(client)) = (pod, upgrade.await) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut pod).await;
        });
        c.answer(StatusCode::OK)
    }
}

async fn serve_gateway(gw: Arc<AmbientGateway>, tcp: TcpStream, peer_addr: SocketAddr) {
    let Some((tls, peer)) = accept(&gw.tls, tcp, &gw.counters, "ambient-gateway", peer_addr).await else {
        return;
    };
    let exec = OwnedExecutor::default();
    let svc = {
        let exec = exec.clone();
        service_fn(move |req| {
            let resp = gw.handle(req, &peer, &exec);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    let _ = hyper::server::conn::http2::Builder::new(exec)
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

struct PodEndpoint {
    pod: String,
    addr: SocketAddr,
    endpoint: Arc<Endpoint>,
    _service: Service,
}

/// The ambient part of a running mesh: HBONE endpoints of the pods of ambient services, and the
/// ambient east-west gateway (started when there is at least one).
#[derive(Default)]
pub struct Ambient {
    endpoints: Vec<PodEndpoint>,
    gateway: Option<(SocketAddr, String, Arc<AmbientGateway>, Service)>,
}

impl std::fmt::Debug for Ambient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ambient")
            .field(
                "endpoints",
                &self.endpoints.iter().map(|e| (&e.pod, e.addr)).collect::<Vec<_>>(),
            )
            .field("gateway", &self.gateway.as_ref().map(|g| g.0))
            .finish()
    }
}

impl Ambient {
    /// Starts the HBONE endpoint of one pod of an ambient service; it presents `cert`, the
    /// pod's own certificate (ztunnel impersonates the pods it serves).
    pub(crate) async fn add_pod(
        &mut self,
        spec: &MeshSpec,
        svc: &ServiceSpec,
        pod: Arc<PodInfo>,
        cert: &WorkloadCert,
        root: CertificateDer<'static>,
    ) -> anyhow::Result<()> {
        // The pod's own IP: 127.0.0.2, 127.0.0.3, … (127.0.0.1 stays the mesh's shared address).
        let n = u8::try_from(self.endpoints.len() + 2)
            .ok()
            .filter(|n| *n < 255)
            .context("more ambient pods than loopback addresses 127.0.0.2-254")?;
        let pod_ip = std::net::Ipv4Addr::new(127, 0, 0, n);
        let counters = Arc::new(Counters::default());
        let endpoint = Arc::new(Endpoint {
            host: svc.host(&spec.cluster_domain),
            app_port: svc.port,
            tls: server_config(cert, root, &spec.trust_domain, &counters)
                .with_context(|| format!("pod {}: HBONE TLS config", pod.name))?,
            counters,
            pod,
        });
        let listener = TcpListener::bind((pod_ip, 0))
            .await
            .with_context(|| format!("binding the HBONE endpoint of pod {} on {pod_ip}", endpoint.pod.name))?;
        let addr = listener.local_addr()?;
        let ep = endpoint.clone();
        let service = Service::spawn(listener, move |stream, peer| serve_endpoint(ep.clone(), stream, peer));
        self.endpoints.push(PodEndpoint {
            pod: endpoint.pod.name.clone(),
            addr,
            endpoint,
            _service: service,
        });
        Ok(())
    }

    /// Starts the ambient east-west gateway in front of every HBONE endpoint, if there are any.
    pub(crate) async fn start_gateway(&mut self, spec: &MeshSpec, ca: &MeshCa) -> anyhow::Result<()> {
        if self.endpoints.is_empty() {
            return Ok(());
        }
        let cert = ca.issue(GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)?;
        let mut routes: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        for e in &self.endpoints {
            let key = format!("{}:{}", e.endpoint.host, e.endpoint.app_port);
            routes.entry(key).or_default().push(e.addr);
        }
        let counters = Arc::new(Counters::default());
        let gw = Arc::new(AmbientGateway {
            tls: server_config(&cert, ca.root_der(), &spec.trust_domain, &counters)
                .context("ambient gateway TLS config")?,
            routes,
            next: AtomicUsize::new(0),
            counters,
        });
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let g = gw.clone();
        let service = Service::spawn(listener, move |stream, peer| serve_gateway(g.clone(), stream, peer));
        let id = cert.spiffe_id.clone().unwrap_or_default();
        self.gateway = Some((addr, id, gw, service));
        Ok(())
    }

    /// A pod's HBONE endpoint (its `POD_IP:15008`): an address of the pod's own, `127.0.0.N`.
    pub fn hbone_addr(&self, pod: &str) -> Option<SocketAddr> {
        self.endpoints.iter().find(|e| e.pod == pod).map(|e| e.addr)
    }

    pub fn hbone_stats(&self, pod: &str) -> Option<HboneStats> {
        self.endpoints
            .iter()
            .find(|e| e.pod == pod)
            .map(|e| e.endpoint.counters.snapshot())
    }

    /// The ambient east-west gateway (its `:15008`), if any service is ambient.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(|g| g.0)
    }

    /// The SPIFFE ID the ambient gateway presents.
    pub fn gateway_spiffe_id(&self) -> Option<String> {
        self.gateway.as_ref().map(|g| g.1.clone())
    }

    pub fn gateway_stats(&self) -> Option<HboneStats> {
        self.gateway.as_ref().map(|g| g.2.counters.snapshot())
    }
}

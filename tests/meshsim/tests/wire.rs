//! meshsim on the wire: a small Istio-style client (tokio-rustls + hyper client connections)
//! dials the AUTO_PASSTHROUGH gateway with the Istio SNI and ALPN and a mesh certificate, and
//! checks what the gateway, sidecars and echo apps do. Real sockets and real TLS on loopback;
//! every test is bounded in time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshsim::{
    demo_spec, IssueOptions, Mesh, MeshCa, MeshSpec, PodSpec, ServiceSpec, StatsSnapshot, WorkloadCert, ALPN_ISTIO_H2,
    ALPN_ISTIO_HTTP11, CLUSTER_DOMAIN,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a test body with a hard deadline.
async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound");
}

// ---------------------------------------------------------------------------------------------
// A small Istio-style client.

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).expect("server leaf parses");
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                out.push(u.to_string());
            }
        }
    }
    out
}

/// What an Istio client does (istio-wire §2.6): chain to the mesh root, then exact URI SAN match
/// against the destination's service accounts. The SNI is not a name in the certificate, so a
/// name mismatch after a successful chain check is expected and ignored.
#[derive(Debug)]
struct SpiffeVerifier {
    chain: Arc<WebPkiServerVerifier>,
    expected: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeVerifier {
    fn new(root: CertificateDer<'static>, expected: &[String]) -> Self {
        let mut roots = RootCertStore::empty();
        roots.add(root).unwrap();
        SpiffeVerifier {
            chain: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap(),
            expected: expected.to_vec(),
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .chain
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        if uri_sans(end_entity).iter().any(|u| self.expected.contains(u)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts any server certificate (handshake signatures are still checked), so a test can look
/// at what a misbehaving pod presents.
#[derive(Debug)]
struct Permissive(Arc<CryptoProvider>);

impl ServerCertVerifier for Permissive {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Dial {
    sni: Option<String>,
    alpn: Vec<String>,
    identity: Option<WorkloadCert>,
    verifier: Arc<dyn ServerCertVerifier>,
    tls12_only: bool,
}

impl Dial {
    /// The normal case: Istio SNI for `svc` (optionally a subset), the HTTP/2 ALPN list, the given
    /// client identity, and the server checked against the service's SPIFFE ID.
    fn new(mesh: &Mesh, svc: &ServiceSpec, subset: Option<&str>, identity: &WorkloadCert) -> Self {
        Dial {
            sni: Some(svc.sni(CLUSTER_DOMAIN, subset)),
            alpn: ALPN_ISTIO_H2.iter().map(|s| s.to_string()).collect(),
            identity: Some(identity.clone()),
            verifier: Arc::new(SpiffeVerifier::new(
                mesh.ca().root_der(),
                &[svc.spiffe_id(mesh.ca().trust_domain())],
            )),
            tls12_only: false,
        }
    }
    fn sni(mut self, sni: &str) -> Self {
        self.sni = Some(sni.to_string());
        self
    }
    fn alpn(mut self, alpn: &[&str]) -> Self {
        self.alpn = alpn.iter().map(|s| s.to_string()).collect();
        self
    }
    fn identity(mut self, identity: Option<WorkloadCert>) -> Self {
        self.identity = identity;
        self
    }
    fn permissive(mut self) -> Self {
        self.verifier = Arc::new(Permissive(provider()));
        self
    }

    fn config(&self) -> ClientConfig {
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(self.verifier.clone());
        let mut cfg = match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain_der().unwrap(), id.key_der().unwrap())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = self.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        cfg.enable_sni = self.sni.is_some();
        cfg
    }

    fn server_name(&self) -> ServerName<'static> {
        ServerName::try_from(self.sni.clone().unwrap_or_else(|| "no-sni.invalid".to_string()))
            .expect("SNI is a valid DNS name for rustls")
    }

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await??;
        let connector = TlsConnector::from(Arc::new(self.config()));
        tokio::time::timeout(IO_TIMEOUT, connector.connect(self.server_name(), tcp)).await?
    }

    /// The raw ClientHello this dial would send, for tests that talk TCP directly.
    fn client_hello_bytes(&self) -> Vec<u8> {
        let mut conn = rustls::ClientConnection::new(Arc::new(self.config()), self.server_name()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }
}

/// An HTTP connection over the TLS stream, HTTP/2 or HTTP/1.1 as ALPN said.
enum Http {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Http {
    async fn over(tls: TlsStream<TcpStream>) -> hyper::Result<Http> {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Http::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Http::H1(send))
        }
    }

    /// Sends a request for `path_and_query` with Host/:authority `host`.
    async fn send(
        &mut self,
        method: &str,
        host: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> hyper::Result<Response<Incoming>> {
        let mut b = Request::builder().method(method);
        b = match self {
            // h2 carries scheme and authority as pseudo-headers.
            Http::H2(_) => b.uri(format!("https://{host}{path_and_query}")),
            Http::H1(_) => b.uri(path_and_query).header("host", host),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).unwrap();
        match self {
            Http::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Http::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    async fn get(&mut self, host: &str, path_and_query: &str) -> hyper::Result<Response<Incoming>> {
        self.send("GET", host, path_and_query, &[], Bytes::new()).await
    }
}

async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    tokio::time::timeout(IO_TIMEOUT, resp.into_body().collect())
        .await
        .expect("body timed out")
        .expect("body ok")
        .to_bytes()
}

async fn json(resp: Response<Incoming>) -> Value {
    assert_eq!(resp.status(), StatusCode::OK, "echo status");
    serde_json::from_slice(&body_bytes(resp).await).expect("echo JSON")
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("missing header {name}"))
}

fn service<'a>(mesh: &'a Mesh, name: &str) -> &'a ServiceSpec {
    mesh.spec()
        .services
        .iter()
        .find(|s| s.name == name)
        .expect("service in spec")
}

fn client_identity(mesh: &Mesh) -> WorkloadCert {
    mesh.ca().issue("meshgate", "meshgate").unwrap()
}

const CLIENT_ID: &str = "spiffe://cluster.local/ns/meshgate/sa/meshgate";

async fn wait(mesh: &Mesh, pred: impl Fn(&StatsSnapshot) -> bool) -> StatsSnapshot {
    match mesh.wait_for_stats(STATS_TIMEOUT, pred).await {
        Ok(s) => s,
        Err(s) => panic!("stats never matched: {s:#?}"),
    }
}

/// Sends `hello` on a raw TCP connection and returns every byte the gateway sends back before
/// it closes. A passthrough gateway that refuses must send nothing (no TLS alert) and close.
async fn raw_hello_reply(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut reply = Vec::new();
    let r = tokio::time::timeout(IO_TIMEOUT, tcp.read_to_end(&mut reply))
        .await
        .expect("gateway neither answered nor closed");
    // A reset also counts as a close; either way nothing TLS came back.
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    reply
}

fn xfcc_fields(element: &str) -> Vec<(String, String)> {
    element
        .split(';')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The mesh can be shared with and started from spawned tasks.
#[allow(dead_code)]
fn mesh_is_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let start = Mesh::start(demo_spec());
    send(&start);
    let _ = |m: &Mesh| {
        send_sync(m);
        send(&m.stop_gateway());
        send(&m.start_gateway());
        send(&m.stop_pod("x"));
    };
}

// ---------------------------------------------------------------------------------------------
// (1) and (2): the happy paths.

#[tokio::test]
async fn happy_path_h2() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let host = reviews.host(CLUSTER_DOMAIN);
        let me = client_identity(&mesh);
        let tls = Dial::new(&mesh, reviews, None, &me)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let client_leaf = me.chain_der().unwrap()[0].clone();

        let mut http = Http::over(tls).await.unwrap();
        let resp = http.get(&format!("{host}:9080"), "/hello?a=1").await.unwrap();
        assert_eq!(header(&resp, "server"), "istio-envoy");
        let pod = header(&resp, "x-echo-pod").to_string();
        // Istio answers with its own metadata only to a request that carried some.
        assert!(resp.headers().get("x-envoy-peer-metadata-id").is_none());
        let j = json(resp).await;
        assert_eq!(j["pod"], pod.as_str());
        assert!(pod.starts_with("reviews-"));
        assert_eq!(j["service"], "reviews");
        assert_eq!(j["namespace"], "bookinfo");
        assert_eq!(j["alpn"], "h2");
        assert_eq!(j["version"], "HTTP/2.0");
        assert_eq!(j["tls_version"], "TLSv1.3");
        assert_eq!(j["method"], "GET");
        assert_eq!(j["path"], "/hello");
        assert_eq!(j["query"], "a=1");
        assert_eq!(j["host"], format!("{host}:9080").as_str());
        assert_eq!(j["peer_principal"], CLIENT_ID);
        assert_eq!(j["body_bytes"], 0);
        assert_eq!(j["body_sha256"], hex::encode(Sha256::digest(b"")).as_str());

        // Exactly one XFCC element, by this pod's identity, about our certificate.
        let xfcc = j["xfcc"].as_str().unwrap();
        assert!(!xfcc.contains(','), "one element: {xfcc}");
        let fields = xfcc_fields(xfcc);
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["By", "Hash", "Subject", "URI"]);
        assert_eq!(fields[0].1, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews");
        assert_eq!(Some(fields[0].1.clone()), mesh.pod_spiffe_id(&pod));
        assert_eq!(fields[1].1, hex::encode(Sha256::digest(&client_leaf)));
        assert_eq!(fields[2].1, "\"\"");
        assert_eq!(fields[3].1, CLIENT_ID);
        assert_eq!(j["headers"]["x-forwarded-client-cert"][0].as_str(), Some(xfcc));

        // Every stream on this connection reaches the same pod (tcp_proxy: one pod per connection).
        for _ in 0..5 {
            let resp = http.get(&host, "/again").await.unwrap();
            assert_eq!(header(&resp, "x-echo-pod"), pod);
            body_bytes(resp).await;
        }
        let s = mesh.stats();
        assert_eq!(s.gateway_accepted, 1);
        assert_eq!(s.gateway_routed, 1);
        assert_eq!(s.gateway_refused, 0);
        assert_eq!(s.pods[&pod].tls_handshakes, 1);
        assert_eq!(s.pods[&pod].app_requests, 6);
        assert_eq!(s.pods[&pod].connections_open, 1);
        assert_eq!(s.pods_total(|p| p.tls_handshakes), 1);
    })
    .await;
}

#[tokio::test]
async fn happy_path_http11() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let details = service(&mesh, "details");
        let me = client_identity(&mesh);
        let tls = Dial::new(&mesh, details, None, &me)
            .alpn(&ALPN_ISTIO_HTTP11)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut http = Http::over(tls).await.unwrap();
        let resp = http
            .send(
                "POST",
                "details.example",
                "/post",
                &[("content-type", "text/plain")],
                Bytes::from_static(b"hello mesh"),
            )
            .await
            .unwrap();
        assert_eq!(header(&resp, "x-echo-pod"), "details-a");
        let j = json(resp).await;
        assert_eq!(j["alpn"], "http/1.1");
        assert_eq!(j["version"], "HTTP/1.1");
        assert_eq!(j["method"], "POST");
        // Host is not matched by the inbound route (`domains: ["*"]`), only reported.
        assert_eq!(j["host"], "details.example");
        assert_eq!(j["body_bytes"], 10);
        assert_eq!(j["body_sha256"], hex::encode(Sha256::digest(b"hello mesh")).as_str());
        assert_eq!(j["headers"]["content-type"][0], "text/plain");
        assert_eq!(j["peer_principal"], CLIENT_ID);
        assert!(j["subset"].is_null());
        // Keep-alive: a second request on the same connection.
        let resp = http.get("details.example", "/2").await.unwrap();
        assert_eq!(json(resp).await["path"], "/2");
    })
    .await;
}

/// ALPN `istio` alone has no overlap with the sidecar's `h2, http/1.1`: Envoy carries on without
/// ALPN (rustls alone would abort), and the connection speaks HTTP/1.1. TLS 1.2 works too.
#[tokio::test]
async fn no_alpn_overlap_and_tls12_still_handshake() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let ratings = service(&mesh, "ratings");
        let me = client_identity(&mesh);
        let tls = Dial::new(&mesh, ratings, None, &me)
            .alpn(&["istio"])
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        let mut http = Http::over(tls).await.unwrap();
        let j = json(http.get("ratings", "/").await.unwrap()).await;
        assert!(j["alpn"].is_null());
        assert_eq!(j["version"], "HTTP/1.1");

        let mut dial = Dial::new(&mesh, ratings, None, &me);
        dial.tls12_only = true;
        let tls = dial.connect(mesh.gateway_addr()).await.unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let j = json(http.get("ratings", "/").await.unwrap()).await;
        assert_eq!(j["tls_version"], "TLSv1.2");
        assert_eq!(j["alpn"], "h2");

        // An RSA client certificate (the sidecar agent's default key type) is accepted as well.
        let mut opts = IssueOptions::workload("cluster.local", "meshgate", "meshgate");
        opts.rsa = true;
        let rsa = mesh.ca().issue_with(&opts).unwrap();
        let tls = Dial::new(&mesh, ratings, None, &rsa)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let j = json(http.get("ratings", "/").await.unwrap()).await;
        assert_eq!(j["peer_principal"], CLIENT_ID);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (3) and (4): the gateway refuses what matches no filter chain, by closing TCP.

#[tokio::test]
async fn unknown_sni_is_closed_without_alert() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);
        let host = reviews.host(CLUSTER_DOMAIN);
        let bad = [
            "outbound_.9080_._.nope.bookinfo.svc.cluster.local".to_string(),
            format!("outbound_.9081_._.{host}"),                  // wrong port
            format!("outbound_.9080_.v3_.{host}"),                // unknown subset
            format!("inbound_.9080_._.{host}"),                   // wrong direction
            format!("outbound_9080_._.{host}"),                   // malformed separators
            format!("outbound_.9080_._.{}", host.to_uppercase()), // exact match only
            host.clone(),                                         // the plain host name
        ];
        for (i, sni) in bad.iter().enumerate() {
            let dial = Dial::new(&mesh, reviews, None, &me).sni(sni);
            let err = dial.connect(mesh.gateway_addr()).await;
            assert!(err.is_err(), "{sni}: handshake must fail");
            let reply = raw_hello_reply(mesh.gateway_addr(), &dial.client_hello_bytes()).await;
            assert!(reply.is_empty(), "{sni}: gateway sent {} bytes", reply.len());
            let want = 2 * (i as u64 + 1);
            wait(&mesh, |s| s.gateway_refused == want).await;
        }
        // No SNI at all.
        let mut dial = Dial::new(&mesh, reviews, None, &me);
        dial.sni = None;
        assert!(dial.connect(mesh.gateway_addr()).await.is_err());
        // Not TLS at all.
        let reply = raw_hello_reply(mesh.gateway_addr(), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(reply.is_empty());

        let s = wait(&mesh, |s| s.gateway_refused == 2 * bad.len() as u64 + 2).await;
        assert_eq!(s.gateway_routed, 0);
        assert_eq!(s.pods_total(|p| p.tls_handshakes + p.tls_failures), 0, "{s:#?}");
    })
    .await;
}

#[tokio::test]
async fn truncated_hello_is_refused() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let me = client_identity(&mesh);
        let hello = Dial::new(&mesh, service(&mesh, "reviews"), None, &me).client_hello_bytes();
        let mut tcp = TcpStream::connect(mesh.gateway_addr()).await.unwrap();
        tcp.write_all(&hello[..hello.len() / 2]).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(IO_TIMEOUT, tcp.read_to_end(&mut reply))
            .await
            .unwrap();
        assert!(reply.is_empty());
        let s = wait(&mesh, |s| s.gateway_refused == 1).await;
        assert_eq!(s.gateway_routed, 0);
    })
    .await;
}

#[tokio::test]
async fn known_sni_without_istio_alpn_is_closed() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);
        let cases: [&[&str]; 3] = [&["h2"], &["h2", "http/1.1"], &[]];
        for (i, alpn) in cases.iter().enumerate() {
            let dial = Dial::new(&mesh, reviews, None, &me).alpn(alpn);
            assert!(dial.connect(mesh.gateway_addr()).await.is_err(), "{alpn:?}");
            let reply = raw_hello_reply(mesh.gateway_addr(), &dial.client_hello_bytes()).await;
            assert!(reply.is_empty(), "{alpn:?}");
            let want = 2 * (i as u64 + 1);
            wait(&mesh, |s| s.gateway_refused == want).await;
        }
        // Each Istio ALPN value alone is enough to match the chain.
        for alpn in meshsim::ISTIO_MTLS_ALPNS {
            if alpn == "istio-peer-exchange" {
                // Would be routed too, but the client then owes the metadata-exchange preamble.
                continue;
            }
            let tls = Dial::new(&mesh, reviews, None, &me)
                .alpn(&[alpn])
                .connect(mesh.gateway_addr())
                .await
                .unwrap_or_else(|e| panic!("{alpn}: {e}"));
            let mut http = Http::over(tls).await.unwrap();
            json(http.get("reviews", "/").await.unwrap()).await;
        }
        let s = mesh.stats();
        assert_eq!(s.gateway_refused, 6);
        assert_eq!(s.gateway_routed, 4);
        assert_eq!(s.pods_total(|p| p.tls_failures), 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (5) and (6): the sidecar requires a mesh client certificate.

async fn assert_sidecar_refuses(mesh: &Mesh, dial: Dial) {
    // With TLS 1.3 the client finishes its side before the server checks its certificate, so
    // the refusal may surface at connect, at the HTTP handshake, or at the first request.
    if let Ok(tls) = dial.connect(mesh.gateway_addr()).await {
        if let Ok(mut http) = Http::over(tls).await {
            let r = tokio::time::timeout(IO_TIMEOUT, http.get("reviews", "/")).await;
            assert!(matches!(r, Ok(Err(_))), "request must fail");
        }
    }
    let s = wait(mesh, |s| s.pods_total(|p| p.tls_failures) == 1).await;
    assert_eq!(s.gateway_routed, 1, "the gateway passed it on: {s:#?}");
    assert_eq!(s.pods_total(|p| p.tls_handshakes), 0);
    assert_eq!(s.pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let other_ca = MeshCa::new("cluster.local").unwrap();
        let stranger = other_ca.issue("meshgate", "meshgate").unwrap();
        assert_sidecar_refuses(&mesh, Dial::new(&mesh, reviews, None, &stranger)).await;
    })
    .await;
}

#[tokio::test]
async fn missing_client_cert_is_refused() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);
        assert_sidecar_refuses(&mesh, Dial::new(&mesh, reviews, None, &me).identity(None)).await;
    })
    .await;
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let mut opts = IssueOptions::workload("cluster.local", "meshgate", "meshgate");
        opts.not_before = std::time::SystemTime::now() - Duration::from_secs(7200);
        opts.not_after = std::time::SystemTime::now() - Duration::from_secs(3600);
        let expired = mesh.ca().issue_with(&opts).unwrap();
        assert_sidecar_refuses(&mesh, Dial::new(&mesh, reviews, None, &expired)).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (7) and (8): endpoint choice.

async fn pod_of_new_connection(mesh: &Mesh, dial: &Dial) -> (String, Http) {
    let tls = dial.connect(mesh.gateway_addr()).await.unwrap();
    let mut http = Http::over(tls).await.unwrap();
    let resp = http.get("reviews", "/").await.unwrap();
    let pod = header(&resp, "x-echo-pod").to_string();
    let j = json(resp).await;
    assert_eq!(j["pod"], pod.as_str());
    (pod, http)
}

#[tokio::test]
async fn subset_sni_lands_only_on_that_subset() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);
        let v2 = Dial::new(&mesh, reviews, Some("v2"), &me);
        assert_eq!(
            v2.sni.as_deref(),
            Some("outbound_.9080_.v2_.reviews.bookinfo.svc.cluster.local")
        );
        let mut held = Vec::new();
        for _ in 0..4 {
            let (pod, http) = pod_of_new_connection(&mesh, &v2).await;
            assert_eq!(pod, "reviews-v2-a");
            held.push(http);
        }
        let v1 = Dial::new(&mesh, reviews, Some("v1"), &me);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let (pod, http) = pod_of_new_connection(&mesh, &v1).await;
            seen.insert(pod);
            held.push(http);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["reviews-v1-a", "reviews-v1-b"]);
        let s = mesh.stats();
        assert_eq!(s.pods["reviews-v2-a"].tls_handshakes, 4);
        assert_eq!(s.pods["reviews-v2-a"].connections_open, 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_pods() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);
        let dial = Dial::new(&mesh, reviews, None, &me);
        // Held connections: least-open puts each new one on an idle pod.
        let mut held = Vec::new();
        let mut pods = Vec::new();
        for _ in 0..3 {
            let (pod, http) = pod_of_new_connection(&mesh, &dial).await;
            pods.push(pod);
            held.push(http);
        }
        pods.sort();
        assert_eq!(pods, ["reviews-v1-a", "reviews-v1-b", "reviews-v2-a"]);
        drop(held);

        // Short-lived connections rotate among the (all idle) pods too.
        let ratings = service(&mesh, "ratings");
        let dial = Dial::new(&mesh, ratings, None, &me);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let tls = dial.connect(mesh.gateway_addr()).await.unwrap();
            let mut http = Http::over(tls).await.unwrap();
            let resp = http.get("ratings", "/").await.unwrap();
            seen.insert(header(&resp, "x-echo-pod").to_string());
            body_bytes(resp).await;
            drop(http);
            // Wait for the sidecar to see the close, so the next pick sees no open connection.
            wait(&mesh, |s| s.pods_total(|p| p.connections_open) == 0).await;
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["ratings-a", "ratings-b"]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (9) AuthorizationPolicy-like allow lists.

#[tokio::test]
async fn allowed_principals_are_enforced() {
    bounded(async {
        let spec = MeshSpec::new()
            .service(
                ServiceSpec::new("open", "secure", 8080, "open")
                    .pod(PodSpec::new("open-a").allow(["cluster.local/ns/meshgate/sa/meshgate"])),
            )
            .service(
                ServiceSpec::new("closed", "secure", 8080, "closed")
                    .pod(PodSpec::new("closed-a").allow(["cluster.local/ns/other/sa/other"])),
            );
        let mesh = Mesh::start(spec).await.unwrap();
        let me = client_identity(&mesh);

        let tls = Dial::new(&mesh, service(&mesh, "open"), None, &me)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        assert_eq!(json(http.get("open", "/").await.unwrap()).await["pod"], "open-a");

        let tls = Dial::new(&mesh, service(&mesh, "closed"), None, &me)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let resp = http.get("closed", "/").await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(header(&resp, "server"), "istio-envoy");
        assert!(resp.headers().get("x-echo-pod").is_none(), "the app never saw it");
        assert_eq!(&body_bytes(resp).await[..], b"RBAC: access denied");

        let s = mesh.stats();
        assert_eq!(s.pods["closed-a"].rbac_denied, 1);
        assert_eq!(s.pods["closed-a"].app_requests, 0);
        assert_eq!(s.pods["open-a"].rbac_denied, 0);
        assert_eq!(s.pods["open-a"].app_requests, 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (10) Pods that present the wrong identity.

#[tokio::test]
async fn wrong_identity_pods_present_those_certs() {
    bounded(async {
        let spec = MeshSpec::new().service(
            ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews")
                .pod(PodSpec::new("evil").subset("other").other_identity("evil", "evil-sa"))
                .pod(
                    PodSpec::new("foreign")
                        .subset("foreign")
                        .identity(meshsim::PodIdentity::ForeignCa),
                ),
        );
        let mesh = Mesh::start(spec).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);
        let expected = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
        let mesh_int = x509_subject_of_pem(&mesh.ca().intermediate_pem());

        // Other: mesh-signed, wrong SPIFFE ID.
        let tls = Dial::new(&mesh, reviews, Some("other"), &me)
            .permissive()
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let certs = tls.get_ref().1.peer_certificates().unwrap().to_vec();
        assert_eq!(uri_sans(&certs[0]), ["spiffe://cluster.local/ns/evil/sa/evil-sa"]);
        assert_eq!(x509_issuer(&certs[0]), mesh_int);
        assert_eq!(
            mesh.pod_spiffe_id("evil").unwrap(),
            "spiffe://cluster.local/ns/evil/sa/evil-sa"
        );
        // The XFCC `By` is the pod's own (wrong) identity.
        let mut http = Http::over(tls).await.unwrap();
        let j = json(http.get("reviews", "/").await.unwrap()).await;
        assert!(j["xfcc"]
            .as_str()
            .unwrap()
            .starts_with("By=spiffe://cluster.local/ns/evil/sa/evil-sa;"));

        // ForeignCa: right SPIFFE ID, unrelated issuer.
        let tls = Dial::new(&mesh, reviews, Some("foreign"), &me)
            .permissive()
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let certs = tls.get_ref().1.peer_certificates().unwrap().to_vec();
        assert_eq!(uri_sans(&certs[0]), [expected]);
        assert_ne!(x509_issuer(&certs[0]), x509_issuer(&me.chain_der().unwrap()[0]).clone());
        assert_eq!(
            x509_issuer(&certs[0]),
            x509_subject_of_pem(&mesh.foreign_ca().intermediate_pem())
        );

        // An Istio client (root + exact SAN) refuses both.
        for subset in ["other", "foreign"] {
            let err = Dial::new(&mesh, reviews, Some(subset), &me)
                .connect(mesh.gateway_addr())
                .await
                .expect_err(subset);
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{subset}: {err}");
        }
    })
    .await;
}

fn x509_issuer(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(der).unwrap();
    c.issuer().as_raw().to_vec()
}

fn x509_subject_of_pem(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    use x509_parser::prelude::*;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    c.subject().as_raw().to_vec()
}

// ---------------------------------------------------------------------------------------------
// (11) XFCC APPEND_FORWARD, and metadata-exchange headers.

#[tokio::test]
async fn incoming_xfcc_is_kept_and_appended_to() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let details = service(&mesh, "details");
        let me = client_identity(&mesh);
        let tls = Dial::new(&mesh, details, None, &me)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let forged = "By=spiffe://cluster.local/ns/x/sa/x;URI=spiffe://cluster.local/ns/admin/sa/admin";
        let resp = http
            .send(
                "GET",
                "details",
                "/",
                &[
                    ("x-forwarded-client-cert", forged),
                    (
                        "x-envoy-peer-metadata-id",
                        "sidecar~10.0.0.1~vm.ns~ns.svc.cluster.local",
                    ),
                    ("x-envoy-peer-metadata", "Cg0KBE5BTUUSBRoDdm0x"),
                ],
                Bytes::new(),
            )
            .await
            .unwrap();
        // A request with metadata gets the pod's in the response (a node id of four parts).
        assert_eq!(header(&resp, "x-envoy-peer-metadata-id").split('~').count(), 4);
        let j = json(resp).await;
        let xfcc = j["xfcc"].as_str().unwrap();
        let (first, appended) = xfcc.split_once(',').expect("two elements");
        assert_eq!(first, forged);
        let fields = xfcc_fields(appended);
        assert_eq!(
            fields[0],
            (
                "By".into(),
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details".into()
            )
        );
        assert_eq!(fields[3], ("URI".into(), CLIENT_ID.into()));
        // The sidecar consumed the metadata-exchange headers: reported, not passed to the app.
        assert_eq!(j["peer_metadata_id"], "sidecar~10.0.0.1~vm.ns~ns.svc.cluster.local");
        assert_eq!(j["peer_metadata"], "Cg0KBE5BTUUSBRoDdm0x");
        // {NAME: "vm1"} names no workload; the namespace comes from the client certificate.
        assert_eq!(j["source"]["workload"], "unknown");
        assert_eq!(j["source"]["principal"], CLIENT_ID);
        assert_eq!(j["source"]["canonical_revision"], "latest");
        assert!(j["headers"].get("x-envoy-peer-metadata-id").is_none());
        assert!(j["headers"].get("x-envoy-peer-metadata").is_none());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (12) Streaming bodies.

fn pattern_sha256_independent(n: usize) -> String {
    let mut h = Sha256::new();
    let block: Vec<u8> = (0..n.min(1 << 20)).map(|i| (i % 251) as u8).collect();
    let mut off = 0;
    while off < n {
        // 1 MiB is a multiple of nothing in particular; regenerate each block at its offset.
        let len = (n - off).min(block.len());
        let chunk: Vec<u8> = (off..off + len).map(|i| (i % 251) as u8).collect();
        h.update(&chunk);
        off += len;
    }
    hex::encode(h.finalize())
}

async fn stream_and_hash(resp: Response<Incoming>) -> (u64, String) {
    let mut body = resp.into_body();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(frame) = tokio::time::timeout(IO_TIMEOUT, body.frame())
        .await
        .expect("body stalled")
    {
        if let Ok(data) = frame.expect("body frame").into_data() {
            h.update(&data);
            n += data.len() as u64;
        }
    }
    (n, hex::encode(h.finalize()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mebibytes_stream_with_the_right_hash() {
    bounded(async {
        const N: usize = 10 * 1024 * 1024;
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let ratings = service(&mesh, "ratings");
        let me = client_identity(&mesh);
        let want = pattern_sha256_independent(N);
        assert_eq!(meshsim::pattern_sha256(N as u64), want);

        for alpn in [&ALPN_ISTIO_H2, &ALPN_ISTIO_HTTP11] {
            let tls = Dial::new(&mesh, ratings, None, &me)
                .alpn(alpn)
                .connect(mesh.gateway_addr())
                .await
                .unwrap();
            let mut http = Http::over(tls).await.unwrap();
            let upload = Bytes::from(vec![7u8; 3 * 1024 * 1024 + 17]);
            let resp = http
                .send("POST", "ratings", &format!("/big?bytes={N}"), &[], upload.clone())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(&resp, "content-type"), "application/octet-stream");
            assert_eq!(header(&resp, "x-body-sha256"), want);
            assert_eq!(header(&resp, "x-request-body-bytes"), upload.len().to_string());
            assert_eq!(
                header(&resp, "x-request-body-sha256"),
                hex::encode(Sha256::digest(&upload))
            );
            let (n, got) = stream_and_hash(resp).await;
            assert_eq!(n, N as u64, "{alpn:?}");
            assert_eq!(got, want, "{alpn:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn status_and_delay_knobs() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let details = service(&mesh, "details");
        let me = client_identity(&mesh);
        let tls = Dial::new(&mesh, details, None, &me)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let started = std::time::Instant::now();
        let resp = http.get("details", "/?status=503&delay_ms=200").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&resp, "x-echo-pod"), "details-a");
        let j: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
        assert_eq!(j["query"], "status=503&delay_ms=200");
        let resp = http.get("details", "/?status=abc").await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn reset_knobs_inject_faults() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let details = service(&mesh, "details");
        let me = client_identity(&mesh);

        // HTTP/2: the stream is reset, the connection survives.
        let tls = Dial::new(&mesh, details, None, &me)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let err = http.get("details", "/?reset=1").await.expect_err("reset");
        assert!(format!("{err:?}").contains("INTERNAL_ERROR"), "{err:?}");
        json(http.get("details", "/").await.unwrap()).await;

        // Truncated body: at most K bytes, then a reset. Whether the head and how much of the
        // body arrive first depends on flushing (a reset discards frames still queued), so the
        // contract is "fails, never more than K bytes".
        let (n, failed) = fetch_counting(&mut http, "/?bytes=8000000&reset_after=4000000").await;
        assert!(failed, "truncated body must end in an error");
        assert!(n <= 4_000_000, "{n}");
        json(http.get("details", "/").await.unwrap()).await;

        // HTTP/1.1: the connection is closed.
        let tls = Dial::new(&mesh, details, None, &me)
            .alpn(&ALPN_ISTIO_HTTP11)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        assert!(http.get("details", "/?reset=1").await.is_err());
        assert!(http.get("details", "/").await.is_err());
        let tls = Dial::new(&mesh, details, None, &me)
            .alpn(&ALPN_ISTIO_HTTP11)
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let mut http = Http::over(tls).await.unwrap();
        let (n, failed) = fetch_counting(&mut http, "/?bytes=8000000&reset_after=4000000").await;
        assert!(failed && n <= 4_000_000, "{n} {failed}");
        assert_eq!(mesh.stats().pods["details-a"].app_requests, 6);
    })
    .await;
}

/// GETs `path`, reading the whole body; returns the body bytes seen and whether it failed.
async fn fetch_counting(http: &mut Http, path: &str) -> (usize, bool) {
    let resp = match http.get("details", path).await {
        Ok(r) => r,
        Err(_) => return (0, true),
    };
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut n = 0;
    loop {
        match tokio::time::timeout(IO_TIMEOUT, body.frame()).await.unwrap() {
            Some(Ok(f)) => n += f.into_data().map(|d| d.len()).unwrap_or(0),
            Some(Err(_)) => return (n, true),
            None => return (n, false),
        }
    }
}

#[tokio::test]
async fn goaway_pod_drains_open_connections() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let details = service(&mesh, "details");
        let me = client_identity(&mesh);
        for alpn in [&ALPN_ISTIO_H2, &ALPN_ISTIO_HTTP11] {
            let tls = Dial::new(&mesh, details, None, &me)
                .alpn(alpn)
                .connect(mesh.gateway_addr())
                .await
                .unwrap();
            let mut http = Http::over(tls).await.unwrap();
            // One slow request in flight while the drain starts: it still completes.
            let slow = http.send("GET", "details", "/?delay_ms=300", &[], Bytes::new()).await;
            let resp = slow.unwrap();
            mesh.goaway_pod("details-a");
            json(resp).await;
            // The connection then ends; the pod still takes new ones.
            wait(&mesh, |s| s.pods["details-a"].connections_open == 0).await;
            assert!(http.get("details", "/").await.is_err(), "{alpn:?}");
            let tls = Dial::new(&mesh, details, None, &me)
                .alpn(alpn)
                .connect(mesh.gateway_addr())
                .await
                .unwrap();
            let mut http = Http::over(tls).await.unwrap();
            json(http.get("details", "/").await.unwrap()).await;
            drop(http);
            wait(&mesh, |s| s.pods["details-a"].connections_open == 0).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (13) Gateway and pod lifecycle.

#[tokio::test]
async fn stop_and_start_gateway() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let details = service(&mesh, "details");
        let me = client_identity(&mesh);
        let dial = Dial::new(&mesh, details, None, &me);
        let addr = mesh.gateway_addr();

        let tls = dial.connect(addr).await.unwrap();
        let mut http = Http::over(tls).await.unwrap();
        json(http.get("details", "/").await.unwrap()).await;

        mesh.stop_gateway().await;
        let err = TcpStream::connect(addr).await.expect_err("gateway stopped");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        // The connection it carried is closed too.
        let r = tokio::time::timeout(IO_TIMEOUT, http.get("details", "/")).await;
        assert!(matches!(r, Ok(Err(_))), "old connection must be closed");
        wait(&mesh, |s| s.pods["details-a"].connections_open == 0).await;

        mesh.start_gateway().await.unwrap();
        assert_eq!(mesh.gateway_addr(), addr);
        let tls = dial.connect(addr).await.unwrap();
        let mut http = Http::over(tls).await.unwrap();
        json(http.get("details", "/").await.unwrap()).await;
        // Idempotent.
        mesh.start_gateway().await.unwrap();
        mesh.stop_gateway().await;
        mesh.stop_gateway().await;
    })
    .await;
}

#[tokio::test]
async fn stopped_pod_is_no_longer_routed_to() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let reviews = service(&mesh, "reviews");
        let me = client_identity(&mesh);

        let (pod, mut held) = pod_of_new_connection(&mesh, &Dial::new(&mesh, reviews, Some("v2"), &me)).await;
        assert_eq!(pod, "reviews-v2-a");
        let sidecar = mesh.sidecar_addr("reviews-v2-a").unwrap();
        mesh.stop_pod("reviews-v2-a").await;

        // Its connections are closed, its listener is gone.
        let r = tokio::time::timeout(IO_TIMEOUT, held.get("reviews", "/")).await;
        assert!(matches!(r, Ok(Err(_))));
        assert!(TcpStream::connect(sidecar).await.is_err());

        // The subset has no endpoint left: the gateway closes the connection.
        assert!(Dial::new(&mesh, reviews, Some("v2"), &me)
            .connect(mesh.gateway_addr())
            .await
            .is_err());
        wait(&mesh, |s| s.gateway_upstream_failures == 1).await;

        // The service as a whole still works, on the other pods.
        let dial = Dial::new(&mesh, reviews, None, &me);
        for _ in 0..4 {
            let (pod, _http) = pod_of_new_connection(&mesh, &dial).await;
            assert_ne!(pod, "reviews-v2-a");
        }
    })
    .await;
}

#[tokio::test]
async fn dropping_the_mesh_stops_everything() {
    bounded(async {
        let mesh = Mesh::start(demo_spec()).await.unwrap();
        let gw = mesh.gateway_addr();
        let sidecar = mesh.sidecar_addr("details-a").unwrap();
        let details = service(&mesh, "details").clone();
        let me = client_identity(&mesh);
        let tls = Dial::new(&mesh, &details, None, &me).connect(gw).await.unwrap();
        let mut http = Http::over(tls).await.unwrap();
        json(http.get("details", "/").await.unwrap()).await;
        drop(mesh);
        // Aborted tasks drop their sockets when the runtime next polls them; connection attempts
        // fail from then on, and the open HTTP connection ends.
        let r = tokio::time::timeout(IO_TIMEOUT, http.get("details", "/")).await;
        assert!(matches!(r, Ok(Err(_))));
        assert!(TcpStream::connect(gw).await.is_err());
        assert!(TcpStream::connect(sidecar).await.is_err());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (11) A port declared TCP: the TCP chain, opaque bytes echoed, half-close passed on, L4 RBAC.

#[tokio::test]
async fn tcp_port_echoes_bytes_and_passes_half_close_on() {
    bounded(async {
        let spec = MeshSpec::new()
            .service(
                ServiceSpec::new("db", "data", 5432, "db")
                    .tcp()
                    .pod(PodSpec::new("db-a")),
            )
            .service(
                ServiceSpec::new("queue", "data", 5672, "queue")
                    .tcp()
                    .pod(PodSpec::new("queue-a").allow(["cluster.local/ns/other/sa/other"])),
            );
        let mesh = Mesh::start(spec).await.unwrap();
        let me = client_identity(&mesh);

        // ALPN `istio` only, as istio-wire §0 prescribes for opaque TCP.
        let mut tls = Dial::new(&mesh, service(&mesh, "db"), None, &me)
            .alpn(&["istio"])
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        tls.write_all(&payload).await.unwrap();
        // Half-close: no more from us, but the echo of everything still comes back, then EOF.
        tls.shutdown().await.unwrap();
        let mut back = Vec::new();
        tls.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, payload);
        let s = wait(&mesh, |s| s.pods["db-a"].tcp_bytes == payload.len() as u64).await;
        assert_eq!(s.pods["db-a"].tcp_connections, 1);
        assert_eq!(s.pods["db-a"].app_requests, 0);

        // L4 RBAC: a principal not allowed gets the connection closed, nothing echoed.
        let mut tls = Dial::new(&mesh, service(&mesh, "queue"), None, &me)
            .alpn(&["istio"])
            .connect(mesh.gateway_addr())
            .await
            .unwrap();
        let _ = tls.write_all(b"ping").await;
        let mut back = Vec::new();
        let _ = tls.read_to_end(&mut back).await;
        assert!(back.is_empty());
        let s = wait(&mesh, |s| s.pods["queue-a"].rbac_denied == 1).await;
        assert_eq!(s.pods["queue-a"].tcp_connections, 0);
    })
    .await;
}

//! A mesh workload's client side, dialling like an Istio sidecar does for an `ISTIO_MUTUAL`
//! destination (istio-wire.md §2.2, §2.6): its own workload certificate (or another CA's, or
//! none, for the refusals), SNI `outbound_.PORT_._.HOST`, the ALPN list of the request's
//! protocol (`istio-http/1.1, istio, http/1.1`, `istio-h2, istio, h2`, or `istio` for TCP), and
//! the server checked against the mesh root and the expected SPIFFE IDs (`subjectAltNames`).
//! Built from the reference, not from meshgate's code.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::ca::WorkloadCert;

/// What the caller speaks: selects the ALPN list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshProtocol {
    Http1,
    Http2,
    /// A TCP cluster with the metadata exchange off: `istio` alone.
    Tcp,
}

impl MeshProtocol {
    pub fn alpn(self) -> Vec<Vec<u8>> {
        let list: &[&[u8]] = match self {
            MeshProtocol::Http1 => &[b"istio-http/1.1", b"istio", b"http/1.1"],
            MeshProtocol::Http2 => &[b"istio-h2", b"istio", b"h2"],
            MeshProtocol::Tcp => &[b"istio"],
        };
        list.iter().map(|p| p.to_vec()).collect()
    }
}

/// A sidecar's outbound TLS for one identity.
#[derive(Clone)]
pub struct MeshClient {
    roots: Arc<RootCertStore>,
    cert: Option<WorkloadCert>,
    expected_server: Vec<String>,
}

/// The server's chain to the mesh root, then its URI SAN among the expected SPIFFE IDs; no
/// hostname check (the SNI is a routing key, §2.6).
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Vec<String>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Any name: webpki's own name check is replaced by the SAN check below.
        let name = ServerName::try_from("meshsim.invalid").expect("a valid name");
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
        {
            Ok(_) | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)) => {}
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {}
            Err(e) => return Err(e),
        }
        let sans = crate::hbone::uri_sans(end_entity.as_ref());
        if self.expected.is_empty() || sans.iter().any(|s| self.expected.contains(s)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server identity {sans:?} is not one of {:?}",
                self.expected
            )))
        }
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

impl MeshClient {
    /// A client trusting `mesh_root`, presenting `cert` (none: no client certificate), and
    /// accepting a server whose SPIFFE ID is one of `expected_server` (empty: any).
    pub fn new(
        mesh_root: CertificateDer<'static>,
        cert: Option<WorkloadCert>,
        expected_server: &[&str],
    ) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        roots.add(mesh_root).context("mesh root")?;
        Ok(MeshClient {
            roots: Arc::new(roots),
            cert,
            expected_server: expected_server.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn config(&self, protocol: MeshProtocol) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .context("server verifier")?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SanVerifier {
                inner,
                expected: self.expected_server.clone(),
            }));
        let mut cfg = match &self.cert {
            Some(c) => builder.with_client_auth_cert(c.chain_der()?, c.key_der()?)?,
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = protocol.alpn();
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }

    /// A TLS connection to `addr` with SNI `sni`, as a sidecar opens one for `protocol`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
        protocol: MeshProtocol,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(sni.to_string()).context("SNI")?;
        let tls = tokio_rustls::TlsConnector::from(self.config(protocol)?)
            .connect(name, tcp)
            .await?;
        Ok(tls)
    }

    /// One request on a new connection; the response with its whole body.
    pub async fn request(
        &self,
        addr: SocketAddr,
        sni: &str,
        protocol: MeshProtocol,
        req: http::Request<Bytes>,
    ) -> anyhow::Result<http::Response<Bytes>> {
        let tls = self.connect(addr, sni, protocol).await?;
        let io = hyper_util::rt::TokioIo::new(tls);
        let req = req.map(Full::new);
        let resp = match protocol {
            MeshProtocol::Http2 => {
                let (mut s, conn) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                s.send_request(req).await?
            }
            _ => {
                let (mut s, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        Ok(http::Response::from_parts(parts, body.collect().await?.to_bytes()))
    }
}

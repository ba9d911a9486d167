//! One upstream connection: TCP to a gateway address, then TLS with the workload certificate,
//! the Istio SNI and ALPN (istio-wire.md §0), and the SPIFFE server check.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Gateway;
use super::UpstreamError;
use crate::config::{Service, UpstreamProtocol, UpstreamSettings};
use crate::identity::verifier::WrongServerIdentity;
use crate::identity::{ClientCert, Identity, SpiffeServerVerifier};

/// The ALPN list an Istio sidecar sends for this protocol (istio-wire.md §2.2). `istio` must be
/// there or a PERMISSIVE port passes our TLS bytes to the app (§2.3); the `istio-*` entry makes
/// auto-detecting STRICT ports treat the stream as HTTP.
pub fn alpn_for(protocol: UpstreamProtocol) -> Vec<Vec<u8>> {
    let list: &[&[u8]] = match protocol {
        UpstreamProtocol::Http2 => &[b"istio-h2", b"istio", b"h2"],
        UpstreamProtocol::Http1 | UpstreamProtocol::Auto => &[b"istio-http/1.1", b"istio", b"http/1.1"],
        // `istio-peer-exchange` only for tenants with `telemetry:` ([`TlsParams::exchanging`]):
        // it obliges both sides to the TCP metadata exchange (§2.5).
        UpstreamProtocol::Tcp => &[b"istio"],
    };
    list.iter().map(|p| p.to_vec()).collect()
}

/// Everything needed to open a TLS connection for one service.
#[derive(Clone)]
pub struct TlsParams {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl TlsParams {
    /// For a byte tunnel to `service` (CONNECT): ALPN `istio` alone, whatever the service's
    /// own protocol, because the bytes are the client's, not ours to frame.
    pub fn opaque(&self) -> TlsParams {
        self.with_alpn(alpn_for(UpstreamProtocol::Tcp))
    }

    /// For a TCP service when the tenant has `telemetry:`: ALPN `istio-peer-exchange`, then
    /// `istio` (Istio's `ALPNInMeshWithMxc`), so the sidecar runs the metadata exchange.
    pub fn exchanging(&self) -> TlsParams {
        self.with_alpn(vec![crate::telemetry::MX_ALPN.to_vec(), b"istio".to_vec()])
    }

    /// The same identity, server check and SNI, offering `alpn` instead.
    fn with_alpn(&self, alpn: Vec<Vec<u8>>) -> TlsParams {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn;
        TlsParams {
            config: Arc::new(config),
            server_name: self.server_name.clone(),
        }
    }

    pub fn new(identity: &Identity, service: &Service) -> TlsParams {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = SpiffeServerVerifier::new(
            identity.roots.clone(),
            service.expected_server.clone(),
            provider.signature_verification_algorithms,
        );
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientCert(identity.certified_key.clone())));
        config.alpn_protocols = alpn_for(service.protocol);
        // Each connection may land on a different pod behind the passthrough gateway; a resumed
        // session would skip checking that pod's certificate. ztunnel disables it for the same reason.
        config.resumption = rustls::client::Resumption::disabled();
        let server_name = ServerName::try_from(service.sni.clone()).expect("SNI validated when the config was loaded");
        TlsParams {
            config: Arc::new(config),
            server_name,
        }
    }
}

/// A connected, verified TLS stream and the protocol the sidecar chose.
pub struct Connected {
    pub stream: TlsStream<TcpStream>,
    pub alpn: Option<Vec<u8>>,
}

pub(crate) fn classify_tls(addr: SocketAddr, e: std::io::Error) -> UpstreamError {
    // rustls errors arrive wrapped in io::Error; identity failures are the operator-relevant ones.
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        if let rustls::Error::InvalidCertificate(ce) = tls {
            if let rustls::CertificateError::Other(other) = ce {
                if let Some(w) = other.0.downcast_ref::<WrongServerIdentity>() {
                    return UpstreamError::Identity { reason: w.to_string() };
                }
            }
            return UpstreamError::Identity {
                reason: format!("server certificate rejected: {ce}"),
            };
        }
        return UpstreamError::Tls {
            addr: addr.to_string(),
            reason: tls.to_string(),
        };
    }
    match e.kind() {
        // The passthrough gateway closes without an alert when no filter chain matches the SNI.
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => UpstreamError::GatewayClosed {
            addr: addr.to_string(),
            reason: format!("{e} (the gateway closed the connection: is the SNI routed, is the service exported?)"),
        },
        _ => UpstreamError::Tls {
            addr: addr.to_string(),
            reason: e.to_string(),
        },
    }
}

pub async fn connect(
    addr: SocketAddr,
    tls: &TlsParams,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Result<Connected, UpstreamError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr: addr.to_string() })?
        .map_err(|e| UpstreamError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let stream = tokio::time::timeout(handshake_timeout, connector.connect(tls.server_name.clone(), tcp))
        .await
        .map_err(|_| UpstreamError::HandshakeTimeout { addr: addr.to_string() })?
        .map_err(|e| classify_tls(addr, e))?;
    let alpn = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    Ok(Connected { stream, alpn })
}

/// Connects through the gateway: a gateway address that refuses or does not answer is skipped
/// for the next one (and counted towards its ejection), so one dead LB node costs a retry, not
/// a failed request or connection.
pub async fn connect_via(
    gateway: &Gateway,
    tls: &TlsParams,
    settings: &UpstreamSettings,
    service: &str,
) -> Result<(SocketAddr, Connected), UpstreamError> {
    let tries = gateway.addrs().len().clamp(1, 4);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let addr = gateway
            .pick()
            .ok_or_else(|| UpstreamError::Unresolved(gateway.target().to_string()))?;
        let connected = connect(addr, tls, settings.connect_timeout, settings.handshake_timeout).await;
        // Only failures to reach the address count against it; a TLS or identity failure is
        // the pod's or the config's, and another gateway address would not help.
        let unreachable = matches!(
            connected,
            Err(UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. })
        );
        gateway.record(addr, !unreachable);
        match connected {
            Err(e) if unreachable && attempt < tries => {
                tracing::debug!(%service, error = %e, "gateway address unreachable; trying the next one");
            }
            other => return other.map(|c| (addr, c)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_lists_match_istio_sidecars() {
        assert_eq!(
            alpn_for(UpstreamProtocol::Http2),
            vec![b"istio-h2".to_vec(), b"istio".to_vec(), b"h2".to_vec()]
        );
        assert_eq!(
            alpn_for(UpstreamProtocol::Http1),
            vec![b"istio-http/1.1".to_vec(), b"istio".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(alpn_for(UpstreamProtocol::Tcp), vec![b"istio".to_vec()]);
    }
}

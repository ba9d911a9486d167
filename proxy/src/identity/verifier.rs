//! Verifies the destination sidecar's certificate the way an Istio client does
//! (istio-wire.md §2.6): the chain must lead to the mesh root, and the leaf's URI SAN must be one
//! of the service's expected SPIFFE IDs, or, when none are configured, any SPIFFE ID in the trust
//! domain. There is deliberately no DNS-name check against the SNI: the SNI
//! (`outbound_.PORT_.SUBSET_.HOST`) is a routing key for the gateway, not a name in the cert.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, RootCertStore, SignatureScheme};

use super::{spiffe_trust_domain, uri_sans};

/// Who the server must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExpectedServer {
    /// One of these exact SPIFFE IDs.
    Exact(Vec<String>),
    /// Any SPIFFE ID in this trust domain.
    TrustDomain(String),
    /// Any service account of one namespace: `spiffe://TD/ns/NS/sa/*`.
    Namespace { trust_domain: String, namespace: String },
}

impl ExpectedServer {
    pub fn accepts(&self, sans: &[String]) -> bool {
        match self {
            ExpectedServer::Exact(ids) => sans.iter().any(|s| ids.contains(s)),
            ExpectedServer::TrustDomain(td) => sans.iter().any(|s| spiffe_trust_domain(s) == Some(td.as_str())),
            ExpectedServer::Namespace {
                trust_domain,
                namespace,
            } => sans.iter().any(|s| {
                s.strip_prefix("spiffe://")
                    .and_then(|r| r.strip_prefix(trust_domain.as_str()))
                    .and_then(|r| r.strip_prefix("/ns/"))
                    .and_then(|r| r.strip_prefix(namespace.as_str()))
                    .and_then(|r| r.strip_prefix("/sa/"))
                    .is_some_and(|sa| !sa.is_empty() && !sa.contains('/'))
            }),
        }
    }
}

impl std::fmt::Display for ExpectedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedServer::Exact(ids) => write!(f, "{}", ids.join(" or ")),
            ExpectedServer::TrustDomain(td) => write!(f, "any spiffe://{td}/ identity"),
            ExpectedServer::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "any spiffe://{trust_domain}/ns/{namespace}/sa/* identity"),
        }
    }
}

/// The server presented a valid mesh certificate for someone else.
#[derive(Debug, thiserror::Error)]
#[error("server identity {found} is not {expected}")]
pub struct WrongServerIdentity {
    pub found: String,
    pub expected: String,
}

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: ExpectedServer,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: ExpectedServer, algs: WebPkiSupportedAlgorithms) -> Self {
        SpiffeServerVerifier { roots, expected, algs }
    }
}

/// Human wording for chain errors; these end up in 502 reasons and config errors.
pub fn describe_webpki_error(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "issuer is not the mesh root (unknown CA)".into(),
        webpki::Error::CertExpired { .. } => "certificate expired".into(),
        webpki::Error::CertNotValidYet { .. } => "certificate not yet valid".into(),
        webpki::Error::InvalidSignatureForPublicKey => "bad signature in chain".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => "certificate lacks the required extended key usage".into(),
        other => format!("{other:?}"),
    }
}

fn webpki_to_rustls(e: webpki::Error) -> Error {
    let ce = match e {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        _ => CertificateError::Other(OtherError(Arc::new(ChainError(describe_webpki_error(&e))))),
    };
    Error::InvalidCertificate(ce)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ChainError(String);

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_to_rustls)?;
        ee.verify_for_usage(
            self.algs.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_to_rustls)?;
        let sans = uri_sans(end_entity.as_ref());
        if self.expected.accepts(&sans) {
            return Ok(ServerCertVerified::assertion());
        }
        let found = if sans.is_empty() {
            "(no URI SAN)".to_string()
        } else {
            sans.join(",")
        };
        Err(Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(WrongServerIdentity {
                found,
                expected: self.expected.to_string(),
            }),
        ))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_identity_match() {
        let e = ExpectedServer::Exact(vec!["spiffe://cluster.local/ns/b/sa/reviews".into()]);
        assert!(e.accepts(&["spiffe://cluster.local/ns/b/sa/reviews".into()]));
        assert!(!e.accepts(&["spiffe://cluster.local/ns/b/sa/ratings".into()]));
        assert!(!e.accepts(&[]));
    }

    #[test]
    fn trust_domain_match_is_not_a_prefix_match() {
        let e = ExpectedServer::TrustDomain("cluster.local".into());
        assert!(e.accepts(&["spiffe://cluster.local/ns/b/sa/x".into()]));
        assert!(!e.accepts(&["spiffe://cluster.local.evil/ns/b/sa/x".into()]));
        assert!(!e.accepts(&["spiffe://other.local/ns/b/sa/x".into()]));
        assert!(!e.accepts(&["https://cluster.local/ns/b/sa/x".into()]));
    }

    #[test]
    fn namespace_match_is_whole_segments() {
        let e = ExpectedServer::Namespace {
            trust_domain: "cluster.local".into(),
            namespace: "bookinfo".into(),
        };
        assert!(e.accepts(&["spiffe://cluster.local/ns/bookinfo/sa/reviews".into()]));
        for other in [
            "spiffe://cluster.local/ns/bookinfo2/sa/reviews",
            "spiffe://cluster.local/ns/book/sa/reviews",
            "spiffe://cluster.local.evil/ns/bookinfo/sa/reviews",
            "spiffe://cluster.local/ns/bookinfo/sa/",
            "spiffe://cluster.local/ns/bookinfo/sa/a/b",
            "spiffe://cluster.local/ns/other/sa/reviews",
        ] {
            assert!(!e.accepts(&[other.into()]), "{other}");
        }
    }
}

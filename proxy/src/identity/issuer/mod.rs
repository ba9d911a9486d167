//! Certificate issuers: where a workload identity comes from when it is not a set of files.
//!
//! - Istio CA (istiod or cert-manager istio-csr): `CreateCertificate` over gRPC (istio-wire.md
//!   §4.2/§4.3) with a fresh key and a CSR holding one URI SAN and an empty subject, the one shape
//!   both servers accept; authenticated by the current mesh certificate and/or a bearer token.
//! - Vault PKI (§4.4): `POST /v1/<mount>/issue/<role>` (Vault makes the key) or `sign/<role>`
//!   (our key, our CSR), with a token from a file or an AppRole login.
//!
//! Renewal runs at half the certificate's lifetime with jitter (what istio-agent does), and a
//! failed renewal keeps the last good certificate: see `app/identity.rs` for the loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use sha2::Digest;

use super::{ClientCert, Identity, IdentityPaths};

mod istio_ca;
#[cfg(test)]
mod tests;
mod vault;

use istio_ca::istio_ca;
pub use istio_ca::{decode_strings, encode_request, grpc_frame, grpc_unframe, Decoded, CREATE_CERTIFICATE_PATH};
use vault::vault;

/// Time allowed for one issuance (connect, handshake, request, answer).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// How far ahead of ours an issuer's clock may be: a fresh certificate whose `not_before` is
/// this much in our future is still taken (istiod backdates by 2 minutes; not every CA does).
const CA_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Issuer answers are small; anything bigger is not an issuer.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A resolved `identity:` block that names an issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerSpec {
    /// The SPIFFE ID asked for; an issued certificate for anything else is refused.
    pub spiffe_id: String,
    /// Requested lifetime; the issuer may shorten it.
    pub ttl: Duration,
    /// The mesh trust bundle: issued chains must lead to it.
    pub root_cert: PathBuf,
    /// A certificate to start with and to authenticate the first request to an Istio CA.
    pub bootstrap: Option<IdentityPaths>,
    pub kind: IssuerKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerKind {
    IstioCa {
        /// `host:port` of istiod (15012) or istio-csr (443).
        address: String,
        /// The DNS name in the CA's serving certificate.
        server_name: String,
        /// Trust for the CA's serving certificate (default: the mesh root).
        ca_cert: Option<PathBuf>,
        token_file: Option<PathBuf>,
        cluster_id: Option<String>,
    },
    Vault {
        /// `http://host:port` or `https://host:port`.
        address: String,
        ca_cert: Option<PathBuf>,
        mount: String,
        role: String,
        /// `sign`: our key and CSR; otherwise `issue`: Vault generates the key.
        sign: bool,
        common_name: Option<String>,
        auth: VaultAuth,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    TokenFile(PathBuf),
    AppRole {
        mount: String,
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
}

impl IssuerSpec {
    /// `istio_ca ADDRESS` or `vault ADDRESS`: for logs, metrics and errors.
    pub fn describe(&self) -> String {
        match &self.kind {
            IssuerKind::IstioCa { address, .. } => format!("istio_ca {address}"),
            IssuerKind::Vault { address, .. } => format!("vault {address}"),
        }
    }

    /// The metric label: which kind of issuer.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            IssuerKind::IstioCa { .. } => "istio_ca",
            IssuerKind::Vault { .. } => "vault",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IssueError(pub String);

fn err(msg: impl Into<String>) -> IssueError {
    IssueError(msg.into())
}

/// When to renew: half-way through the lifetime, moved by up to ±5% of it so that a fleet
/// started together does not renew together. `jitter` is in [-1, 1].
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(0.5 + 0.05 * jitter.clamp(-1.0, 1.0))
}

/// Wait before retrying a failed renewal: doubling from 1 s up to 60 s; before expiry never more
/// than a tenth of the time left (a short-lived certificate gets several tries before it
/// expires), never less than 1 s, and ±20% random (`jitter` in [-1, 1]) so that a fleet does
/// not retry in step when the issuer comes back. After expiry: plain backoff.
pub fn retry_delay(failures: u32, remaining: Duration, jitter: f64) -> Duration {
    let backoff = Duration::from_secs(1u64 << failures.min(6)).min(Duration::from_secs(60));
    let d = if remaining.is_zero() {
        backoff
    } else {
        backoff.min(remaining / 10)
    };
    d.max(Duration::from_secs(1))
        .mul_f64(1.0 + 0.2 * jitter.clamp(-1.0, 1.0))
}

/// A stand-in until the issuer answers: the configured SPIFFE ID and trust bundle, a throwaway
/// key, and validity "never" (`not_after` at the epoch), so readiness stays off and nothing can
/// mistake it for a usable certificate. `app::start` replaces it before serving.
pub fn pending(spec: Arc<IssuerSpec>, roots_der: Vec<CertificateDer<'static>>) -> Result<Identity, IssueError> {
    let key = rcgen::KeyPair::generate().map_err(|e| err(format!("cannot generate a key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![spiffe_san(&spec.spiffe_id)?];
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(format!("cannot build a placeholder certificate: {e}")))?;
    let certified_key = certified_key(vec![cert.der().clone()], &key)?;
    let mut roots = RootCertStore::empty();
    for r in &roots_der {
        roots
            .add(r.clone())
            .map_err(|e| err(format!("{}: not a trust anchor: {e}", spec.root_cert.display())))?;
    }
    // Equal specs share one identity (and its pools) across tenants, as equal files do.
    let mut h = sha2::Sha256::new();
    h.update(format!("{spec:?}").as_bytes());
    for r in &roots_der {
        h.update(r.as_ref());
    }
    Ok(Identity {
        spiffe_id: spec.spiffe_id.clone(),
        certified_key,
        roots: Arc::new(roots),
        not_before: UNIX_EPOCH,
        not_after: UNIX_EPOCH,
        paths: source_paths(&spec),
        fingerprint: h.finalize().into(),
        issuer: Some(spec),
    })
}

/// What error messages call each part of an issued identity.
fn source_paths(spec: &IssuerSpec) -> IdentityPaths {
    let from = PathBuf::from(format!("(certificate from {})", spec.describe()));
    IdentityPaths {
        cert_chain: from.clone(),
        key: from,
        root_cert: spec.root_cert.clone(),
    }
}

fn spiffe_san(id: &str) -> Result<rcgen::SanType, IssueError> {
    Ok(rcgen::SanType::URI(
        id.try_into()
            .map_err(|_| err(format!("SPIFFE ID {id:?} is not ASCII")))?,
    ))
}

fn certified_key(chain: Vec<CertificateDer<'static>>, key: &rcgen::KeyPair) -> Result<Arc<CertifiedKey>, IssueError> {
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| err(format!("unusable key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// A fresh key and a CSR with one URI SAN and an empty subject (§4.3: accepted by both istiod,
/// which ignores the SANs, and istio-csr, which requires exactly this).
fn key_and_csr(spiffe_id: &str) -> Result<(rcgen::KeyPair, String), IssueError> {
    let key = rcgen::KeyPair::generate().map_err(|e| err(format!("cannot generate a key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![spiffe_san(spiffe_id)?];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| err(format!("cannot build the CSR: {e}")))?;
    Ok((key, csr))
}

/// Asks the issuer for a new certificate and checks it like a file-based one (chain to the
/// configured root, SPIFFE ID in the trust domain, key match, validity), and that it is for the
/// SPIFFE ID asked for. `current` is the identity in use, presented to an Istio CA.
pub async fn obtain(
    spec: &Arc<IssuerSpec>,
    current: Option<&Identity>,
    trust_domain: &str,
) -> Result<Identity, IssueError> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, obtain_inner(spec, current, trust_domain))
        .await
        .map_err(|_| err(format!("{}: no answer within {ATTEMPT_TIMEOUT:?}", spec.describe())))?
        .map_err(|e| err(format!("{}: {e}", spec.describe())))
}

async fn obtain_inner(
    spec: &Arc<IssuerSpec>,
    current: Option<&Identity>,
    trust_domain: &str,
) -> Result<Identity, IssueError> {
    let roots_der = Identity::load_roots(&spec.root_cert).map_err(|e| err(e.to_string()))?;
    let (chain, key) = match &spec.kind {
        IssuerKind::IstioCa { .. } => istio_ca(spec, current, &roots_der).await?,
        IssuerKind::Vault { .. } => vault(spec, &roots_der).await?,
    };
    let mut identity = Identity::check(
        chain,
        key,
        roots_der,
        &source_paths(spec),
        trust_domain,
        SystemTime::now(),
        CA_CLOCK_SKEW,
    )
    .map_err(|e| err(format!("issued certificate rejected: {e}")))?;
    if identity.spiffe_id != spec.spiffe_id {
        return Err(err(format!(
            "issued a certificate for {}, not for the configured {}",
            identity.spiffe_id, spec.spiffe_id
        )));
    }
    identity.issuer = Some(spec.clone());
    Ok(identity)
}

fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, IssueError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("answer holds an unreadable PEM certificate: {e}")))?;
    Ok(certs)
}

fn read_trimmed(path: &std::path::Path, what: &str) -> Result<String, IssueError> {
    let s = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read {what} {}: {e}", path.display())))?;
    let s = s.trim().to_string();
    if s.is_empty() {
        return Err(err(format!("{what} {} is empty", path.display())));
    }
    Ok(s)
}

// ---- transport -------------------------------------------------------------------------

/// Where an issuer lives, parsed from its `address`.
struct Endpoint {
    host: String,
    port: u16,
    tls: bool,
}

impl Endpoint {
    fn parse(address: &str, default_tls: bool) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = address.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = address.strip_prefix("http://") {
            (false, r)
        } else {
            (default_tls, address)
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(format!("{address:?}: give only scheme, host and port (no path)"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once("]:")
                .ok_or_else(|| format!("{address:?}: expected [IPv6]:PORT"))?;
            (h.to_string(), p)
        } else {
            let (h, p) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{address:?}: missing :PORT"))?;
            (h.to_string(), p)
        };
        let port: u16 = port.parse().map_err(|_| format!("{address:?}: bad port {port:?}"))?;
        if host.is_empty() || port == 0 {
            return Err(format!("{address:?}: expected HOST:PORT"));
        }
        Ok(Endpoint { host, port, tls })
    }
}

/// Checks an issuer address when the config is loaded.
pub fn check_address(address: &str, default_tls: bool) -> Result<(), String> {
    Endpoint::parse(address, default_tls).map(|_| ())
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// TCP, then TLS when the endpoint asks for it (verifying `server_name` against `roots`).
async fn dial(
    ep: &Endpoint,
    server_name: &str,
    roots: &[CertificateDer<'static>],
    client_cert: Option<Arc<CertifiedKey>>,
    alpn: &[u8],
) -> Result<Box<dyn Io>, IssueError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| err(format!("cannot resolve {}: {e}", ep.host)))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(format!("cannot connect to {a}: {e}")),
        }
    }
    let tcp = tcp.ok_or_else(|| err(last.unwrap_or_else(|| format!("{} resolves to no address", ep.host))))?;
    let _ = tcp.set_nodelay(true);
    if !ep.tls {
        return Ok(Box::new(tcp));
    }
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| err(format!("a CA certificate to verify the issuer is unusable: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| err(format!("no usable CA certificate to verify the issuer: {e}")))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_webpki_verifier(verifier);
    let mut config = match client_cert {
        Some(k) => builder.with_client_cert_resolver(Arc::new(ClientCert(k))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let name =
        ServerName::try_from(server_name.to_string()).map_err(|_| err(format!("bad server name {server_name:?}")))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| err(format!("TLS handshake with {}:{} failed: {e}", ep.host, ep.port)))?;
    Ok(Box::new(tls))
}

/// One request on its own connection (issuance is rare; pooling would only add state).
async fn exchange(
    io: Box<dyn Io>,
    h2: bool,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::response::Parts, Bytes, Option<http::HeaderMap>), IssueError> {
    let io = hyper_util::rt::TokioIo::new(io);
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|e| err(format!("HTTP/2 handshake failed: {e}")))?;
        tokio::spawn(conn);
        send.send_request(req).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| err(format!("HTTP/1.1 handshake failed: {e}")))?;
        tokio::spawn(conn);
        send.send_request(req).await
    }
    .map_err(|e| err(format!("request failed: {e}")))?;
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| err(format!("reading the answer: {e}")))?;
        match frame.into_data() {
            Ok(d) => {
                data.extend_from_slice(&d);
                if data.len() > MAX_ANSWER_BYTES {
                    return Err(err("answer larger than 1 MiB"));
                }
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((parts, data.freeze(), trailers))
}

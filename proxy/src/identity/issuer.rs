//! Certificate issuers: where a workload identity comes from when it is not a set of files.
//!
//! - Istio CA (istiod or cert-manager istio-csr): `CreateCertificate` over gRPC (istio-wire.md
//!   §4.2/§4.3) with a fresh key and a CSR holding one URI SAN and an empty subject, the one shape
//!   both servers accept; authenticated by the current mesh certificate and/or a bearer token.
//! - Vault PKI (§4.4): `POST /v1/<mount>/issue/<role>` (Vault makes the key) or `sign/<role>`
//!   (our key, our CSR), with a token from a file or an AppRole login.
//!
//! Renewal runs at half the certificate's lifetime with jitter (what istio-agent does), and a
//! failed renewal keeps the last good certificate: see `app.rs` for the loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use sha2::Digest;

use super::{ClientCert, Identity, IdentityPaths};

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

// ---- Istio CA ----------------------------------------------------------------------------

pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `IstioCertificateRequest { string csr = 1; int64 validity_duration = 3; }`, protobuf-encoded.
pub fn encode_request(csr: &str, validity_secs: i64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0x0a);
    put_varint(&mut b, csr.len() as u64);
    b.extend_from_slice(csr.as_bytes());
    b.put_u8(0x18);
    put_varint(&mut b, validity_secs as u64);
    b.freeze()
}

/// Field 1 strings of a protobuf message (`IstioCertificateResponse.cert_chain`; also the
/// request's `csr`), skipping every other field as protobuf readers must.
/// The wanted length-delimited field's values, and every varint field as (number, value).
pub type Decoded = (Vec<String>, Vec<(u64, u64)>);

pub fn decode_strings(mut msg: Bytes, want_field: u64) -> Result<Decoded, String> {
    let mut strings = Vec::new();
    let mut varints = Vec::new();
    while msg.has_remaining() {
        let key = get_varint(&mut msg).ok_or("truncated field key")?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = get_varint(&mut msg).ok_or("truncated varint")?;
                varints.push((field, v));
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if msg.remaining() < n {
                    return Err("truncated fixed field".into());
                }
                msg.advance(n);
            }
            2 => {
                let len = get_varint(&mut msg).ok_or("truncated length")? as usize;
                if msg.remaining() < len {
                    return Err("truncated string".into());
                }
                let v = msg.split_to(len);
                if field == want_field {
                    strings.push(String::from_utf8(v.to_vec()).map_err(|_| "string field is not UTF-8")?);
                }
            }
            w => return Err(format!("unsupported wire type {w}")),
        }
    }
    Ok((strings, varints))
}

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.extend_from_slice(msg);
    b.freeze()
}

/// The one message of a unary gRPC answer.
pub fn grpc_unframe(mut body: Bytes) -> Result<Bytes, String> {
    if body.remaining() < 5 {
        return Err("empty gRPC answer".into());
    }
    if body.get_u8() != 0 {
        return Err("compressed gRPC answer (not negotiated)".into());
    }
    let len = body.get_u32() as usize;
    if body.remaining() < len {
        return Err("truncated gRPC message".into());
    }
    Ok(body.split_to(len))
}

async fn istio_ca(
    spec: &IssuerSpec,
    current: Option<&Identity>,
    mesh_roots: &[CertificateDer<'static>],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IssueError> {
    let IssuerKind::IstioCa {
        address,
        server_name,
        ca_cert,
        token_file,
        cluster_id,
    } = &spec.kind
    else {
        unreachable!("called for an Istio CA issuer");
    };
    let ep = Endpoint::parse(address, true).map_err(err)?;
    let ca_roots = match ca_cert {
        Some(p) => Identity::load_roots(p).map_err(|e| err(e.to_string()))?,
        None => mesh_roots.to_vec(),
    };
    // The current certificate authenticates a renewal (istiod tries it first); a bootstrap or
    // pending stand-in that is not valid now would only make the handshake fail.
    let now = SystemTime::now();
    let client_cert = current
        .filter(|c| !c.is_pending() && c.not_before <= now && now < c.not_after)
        .map(|c| c.certified_key.clone());
    let token = token_file
        .as_deref()
        .map(|p| read_trimmed(p, "token file"))
        .transpose()?;
    if client_cert.is_none() && token.is_none() {
        return Err(err(
            "no way to authenticate: no valid current certificate and no token_file",
        ));
    }
    let (key, csr) = key_and_csr(&spec.spiffe_id)?;
    let io = dial(&ep, server_name, &ca_roots, client_cert, b"h2").await?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{server_name}{CREATE_CERTIFICATE_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = &token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(c) = cluster_id {
        req = req.header("clusterid", c.as_str());
    }
    let body = grpc_frame(&encode_request(&csr, spec.ttl.as_secs() as i64));
    let req = req.body(Full::new(body)).map_err(|e| err(e.to_string()))?;
    let (parts, data, trailers) = exchange(io, true, req).await?;
    if parts.status != http::StatusCode::OK {
        return Err(err(format!("CA answered HTTP {}", parts.status)));
    }
    // Trailers-only answers carry the status in the headers.
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|v| {
            let msg = h.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
            (v.to_str().unwrap_or("?").to_string(), msg.to_string())
        })
    };
    let status = trailers
        .as_ref()
        .and_then(status_of)
        .or_else(|| status_of(&parts.headers));
    match status {
        Some((code, _)) if code == "0" => {}
        Some((code, msg)) => {
            return Err(err(format!(
                "CA refused: grpc-status {code} ({}) {}",
                grpc_code_name(&code),
                percent_decode(&msg)
            )))
        }
        None => return Err(err("CA answer has no grpc-status")),
    }
    let msg = grpc_unframe(data).map_err(err)?;
    let (pems, _) = decode_strings(msg, 1).map_err(|e| err(format!("bad IstioCertificateResponse: {e}")))?;
    if pems.is_empty() {
        return Err(err("CA answered with an empty cert_chain"));
    }
    // "The leaf cert is the first element, and the root cert is the last element": present
    // the leaf and any intermediates, not the root (peers have it).
    let keep = if pems.len() > 1 { pems.len() - 1 } else { 1 };
    let mut chain = Vec::new();
    for p in &pems[..keep] {
        chain.extend(parse_pem_certs(p)?);
    }
    if chain.is_empty() {
        return Err(err("CA answer holds no certificate"));
    }
    Ok((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into())))
}

fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "7" => "PERMISSION_DENIED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "16" => "UNAUTHENTICATED",
        "2" => "UNKNOWN",
        "12" => "UNIMPLEMENTED",
        _ => "other",
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- Vault PKI -----------------------------------------------------------------------------

async fn vault_call(
    ep: &Endpoint,
    roots: &[CertificateDer<'static>],
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> Result<serde_json::Value, IssueError> {
    let io = dial(ep, &ep.host, roots, None, b"http/1.1").await?;
    let authority = if ep.host.contains(':') {
        format!("[{}]:{}", ep.host, ep.port)
    } else {
        format!("{}:{}", ep.host, ep.port)
    };
    let mut req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("x-vault-token", t);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| err(e.to_string()))?;
    let (parts, data, _) = exchange(io, false, req).await?;
    let json: serde_json::Value = serde_json::from_slice(&data).unwrap_or(serde_json::Value::Null);
    if !parts.status.is_success() {
        // Vault errors: {"errors": ["..."]}.
        let reasons = json
            .get("errors")
            .and_then(|e| e.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        return Err(err(format!("POST {path}: HTTP {} {reasons}", parts.status.as_u16())));
    }
    Ok(json)
}

async fn vault(
    spec: &IssuerSpec,
    mesh_roots: &[CertificateDer<'static>],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IssueError> {
    let IssuerKind::Vault {
        address,
        ca_cert,
        mount,
        role,
        sign,
        common_name,
        auth,
    } = &spec.kind
    else {
        unreachable!("called for a Vault issuer");
    };
    let ep = Endpoint::parse(address, true).map_err(err)?;
    let roots = match ca_cert {
        Some(p) => Identity::load_roots(p).map_err(|e| err(e.to_string()))?,
        None => mesh_roots.to_vec(),
    };
    let token = match auth {
        VaultAuth::TokenFile(p) => read_trimmed(p, "Vault token file")?,
        VaultAuth::AppRole {
            mount,
            role_id_file,
            secret_id_file,
        } => {
            let body = serde_json::json!({
                "role_id": read_trimmed(role_id_file, "AppRole role_id file")?,
                "secret_id": read_trimmed(secret_id_file, "AppRole secret_id file")?,
            });
            let answer = vault_call(&ep, &roots, &format!("/v1/auth/{mount}/login"), None, body).await?;
            answer["auth"]["client_token"]
                .as_str()
                .ok_or_else(|| err("AppRole login answer has no auth.client_token"))?
                .to_string()
        }
    };
    let mut body = serde_json::json!({
        "uri_sans": spec.spiffe_id,
        "ttl": format!("{}s", spec.ttl.as_secs()),
        "format": "pem",
        "exclude_cn_from_sans": true,
    });
    if let Some(cn) = common_name {
        body["common_name"] = cn.clone().into();
    }
    let generated = if *sign {
        let (key, csr) = key_and_csr(&spec.spiffe_id)?;
        body["csr"] = csr.into();
        Some(key)
    } else {
        body["private_key_format"] = "pkcs8".into();
        None
    };
    let op = if *sign { "sign" } else { "issue" };
    let answer = vault_call(&ep, &roots, &format!("/v1/{mount}/{op}/{role}"), Some(&token), body).await?;
    let data = &answer["data"];
    let leaf = data["certificate"]
        .as_str()
        .ok_or_else(|| err(format!("{op} answer has no data.certificate")))?;
    let mut chain = parse_pem_certs(leaf)?;
    // `ca_chain` (newer Vault) lists the issuing CA and its parents; older answers have only
    // `issuing_ca`. Certificates equal to a mesh root are left out, as for the Istio CA.
    let cas: Vec<String> = match data["ca_chain"].as_array() {
        Some(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        None => data["issuing_ca"].as_str().map(String::from).into_iter().collect(),
    };
    for pem in cas {
        for c in parse_pem_certs(&pem)? {
            if !mesh_roots.contains(&c) && !chain.contains(&c) {
                chain.push(c);
            }
        }
    }
    let key = match generated {
        Some(k) => PrivateKeyDer::Pkcs8(k.serialize_der().into()),
        None => {
            let pem = data["private_key"]
                .as_str()
                .ok_or_else(|| err("issue answer has no data.private_key"))?;
            PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| err(format!("unreadable data.private_key: {e}")))?
        }
    };
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_half_way_with_bounded_jitter() {
        let nb = UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(86400);
        assert_eq!(renew_at(nb, na, 0.0), nb + Duration::from_secs(43200));
        assert_eq!(renew_at(nb, na, 1.0), nb + Duration::from_secs(47520));
        assert_eq!(renew_at(nb, na, -1.0), nb + Duration::from_secs(38880));
        assert_eq!(renew_at(nb, na, 7.0), renew_at(nb, na, 1.0));
        // A certificate whose not_after is before not_before renews at once.
        assert_eq!(renew_at(na, nb, 0.0), na);
    }

    #[test]
    fn retries_back_off_but_fit_in_the_time_left() {
        let day = Duration::from_secs(86400);
        assert_eq!(retry_delay(0, day, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(3, day, 0.0), Duration::from_secs(8));
        assert_eq!(retry_delay(30, day, 0.0), Duration::from_secs(60));
        assert_eq!(retry_delay(30, Duration::from_secs(20), 0.0), Duration::from_secs(2));
        // Never below 1 s, even in the last seconds; after expiry, plain backoff.
        assert_eq!(retry_delay(5, Duration::from_millis(300), 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(5, Duration::ZERO, 0.0), Duration::from_secs(32));
        assert_eq!(retry_delay(3, day, 1.0), Duration::from_secs(8).mul_f64(1.2));
        assert_eq!(retry_delay(3, day, -1.0), Duration::from_secs(8).mul_f64(0.8));
    }

    #[test]
    fn request_encoding_round_trips_and_unknown_fields_are_skipped() {
        let req = encode_request("-----BEGIN CERTIFICATE REQUEST-----\n", 86400);
        let (s, v) = decode_strings(req.clone(), 1).unwrap();
        assert_eq!(s, vec!["-----BEGIN CERTIFICATE REQUEST-----\n".to_string()]);
        assert_eq!(v, vec![(3, 86400)]);
        // An answer with an unknown fixed64 and varint before two chain entries.
        let mut b = BytesMut::new();
        b.put_u8((9 << 3) | 1);
        b.put_u64(7);
        b.put_u8(5 << 3);
        put_varint(&mut b, 300);
        for s in ["leaf", "root"] {
            b.put_u8(0x0a);
            put_varint(&mut b, s.len() as u64);
            b.extend_from_slice(s.as_bytes());
        }
        let (s, _) = decode_strings(b.freeze(), 1).unwrap();
        assert_eq!(s, vec!["leaf", "root"]);
        assert!(decode_strings(Bytes::from_static(&[0x0a, 0x05, b'a']), 1).is_err());
    }

    #[test]
    fn grpc_frames_round_trip() {
        let f = grpc_frame(b"hello");
        assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(grpc_unframe(f).unwrap(), Bytes::from_static(b"hello"));
        assert!(grpc_unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
        assert!(grpc_unframe(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
    }

    #[test]
    fn csr_has_one_uri_san_and_an_empty_subject() {
        let (_, pem) = key_and_csr("spiffe://cluster.local/ns/vms/sa/meshgate").unwrap();
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        use x509_parser::prelude::FromDer as _;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref()).unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        let mut uris = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    match n {
                        x509_parser::extensions::GeneralName::URI(u) => uris.push(u.to_string()),
                        other => panic!("unexpected SAN {other:?}"),
                    }
                }
            }
        }
        assert_eq!(uris, vec!["spiffe://cluster.local/ns/vms/sa/meshgate"]);
    }

    #[test]
    fn addresses_parse_with_and_without_scheme() {
        let e = Endpoint::parse("istiod.istio-system.svc:15012", true).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("istiod.istio-system.svc", 15012, true)
        );
        let e = Endpoint::parse("http://127.0.0.1:8200/", true).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("127.0.0.1", 8200, false));
        let e = Endpoint::parse("https://[::1]:8200", false).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("::1", 8200, true));
        assert!(Endpoint::parse("vault:8200/v1", true).is_err());
        assert!(Endpoint::parse("vault", true).is_err());
        assert!(Endpoint::parse("vault:0", true).is_err());
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decode("request%20authenticate%20failure"),
            "request authenticate failure"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}

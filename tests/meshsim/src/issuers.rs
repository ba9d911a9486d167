//! Certificate issuers on loopback, signing with the mesh CA:
//!
//! - [`IstioCa`]: the Istio CA gRPC API (istio-wire.md §4.2), `CreateCertificate` over TLS +
//!   HTTP/2, authenticated by a mesh client certificate or `authorization: Bearer <token>`,
//!   with istio-csr's stricter CSR rules (§4.3): no subject, no DNS/IP/email SANs, URI SANs
//!   equal to the caller's identity; lifetime min(requested, max).
//!
//! It counts what it issues and can be taken down and brought back, for renewal tests. Vault
//! needs no stand-in: the tests run the real OpenBao server (`tests/e2e/src/bao.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpListener;

use crate::ca::{IssueOptions, MeshCa};
use crate::spec::spiffe_id;
use crate::tasks::{OwnedExecutor, Service};

/// The DNS name in the Istio CA's serving certificate (istiod's Service name).
pub const ISTIOD_NAME: &str = "istiod.istio-system.svc";
/// The gRPC method (istio-wire.md §4.2).
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// What one issuer has done, for tests.
#[derive(Debug, Default)]
pub struct IssuerCounters {
    /// Certificates issued.
    pub issued: AtomicU64,
    /// Requests refused (authentication, CSR rules, role rules, sealed/down).
    pub refused: AtomicU64,
    /// Requests authenticated by a client certificate (Istio CA only).
    pub by_certificate: AtomicU64,
    /// Requests authenticated by a token.
    pub by_token: AtomicU64,
}

// ---- Istio CA --------------------------------------------------------------------------------

struct CaState {
    ca: MeshCa,
    tokens: HashMap<String, String>,
    max_ttl: Duration,
    down: AtomicBool,
    counters: IssuerCounters,
    last_error: Mutex<Option<String>>,
}

/// A running Istio CA endpoint. Dropping it stops it.
pub struct IstioCa {
    addr: SocketAddr,
    state: Arc<CaState>,
    _service: Service,
}

impl IstioCa {
    /// Serves on a kernel-chosen loopback port. `tokens` maps bearer tokens to
    /// (namespace, service account), as a TokenReview would; `max_ttl` caps lifetimes
    /// (istio-csr's `maxCertificateDuration`).
    pub async fn start(ca: &MeshCa, tokens: &[(&str, &str, &str)], max_ttl: Duration) -> anyhow::Result<IstioCa> {
        let td = ca.trust_domain().to_string();
        let state = Arc::new(CaState {
            ca: ca.try_clone()?,
            tokens: tokens
                .iter()
                .map(|(t, ns, sa)| (t.to_string(), spiffe_id(&td, ns, sa)))
                .collect(),
            max_ttl,
            down: AtomicBool::new(false),
            counters: IssuerCounters::default(),
            last_error: Mutex::new(None),
        });
        // The serving certificate: what istiod presents on 15012, rooted in the mesh CA.
        let mut opts = IssueOptions::workload(&td, "istio-system", "istiod");
        opts.dns_names = vec![ISTIOD_NAME.to_string()];
        let serving = ca.issue_with(&opts)?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.root_der())?;
        let provider = Arc::new(crate::sidecar::envoy_server_provider());
        // Client certificates are optional: a token is the other way in (§4.2, tried in order).
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(serving.chain_der()?, serving.key_der()?)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let st = state.clone();
        let service = Service::spawn(listener, move |tcp, _peer| {
            let acceptor = acceptor.clone();
            let st = st.clone();
            async move {
                if st.down.load(Ordering::SeqCst) {
                    // Down: the connection is cut before TLS, like a CA pod that is gone.
                    return;
                }
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let peer_id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| {
                        crate::hbone::uri_sans(c.as_ref())
                            .into_iter()
                            .find(|u| u.starts_with("spiffe://"))
                    });
                let exec = OwnedExecutor::default();
                let svc = hyper::service::service_fn(move |req| {
                    let st = st.clone();
                    let peer_id = peer_id.clone();
                    async move { Ok::<_, std::convert::Infallible>(create_certificate(&st, peer_id, req).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(exec)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        });
        Ok(IstioCa {
            addr,
            state,
            _service: service,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Down: new connections are cut; up again: served.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn counters(&self) -> &IssuerCounters {
        &self.state.counters
    }

    /// Why the last refused request was refused.
    pub fn last_error(&self) -> Option<String> {
        self.state.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A unary gRPC answer: at most one message, then the trailers.
pub struct GrpcReply {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for GrpcReply {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(d))));
        }
        std::task::Poll::Ready(self.trailers.take().map(|t| Ok(http_body::Frame::trailers(t))))
    }
}

fn grpc_answer(message: Option<Bytes>, status: u32, msg: &str) -> Response<GrpcReply> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if !msg.is_empty() {
        // grpc-message is percent-encoded; spaces and % are what our messages need escaped.
        let enc = msg.replace('%', "%25").replace(' ', "%20");
        trailers.insert(
            "grpc-message",
            HeaderValue::from_str(&enc).unwrap_or(HeaderValue::from_static("error")),
        );
    }
    let data = message.map(|m| {
        let mut b = BytesMut::with_capacity(m.len() + 5);
        b.put_u8(0);
        b.put_u32(m.len() as u32);
        b.extend_from_slice(&m);
        b.freeze()
    });
    let mut resp = Response::new(GrpcReply {
        data,
        trailers: Some(trailers),
    });
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

async fn create_certificate(st: &CaState, peer_id: Option<String>, req: Request<Incoming>) -> Response<GrpcReply> {
    let refuse = |status: u32, msg: String| {
        st.counters.refused.fetch_add(1, Ordering::Relaxed);
        *st.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
        grpc_answer(None, status, &msg)
    };
    if req.uri().path() != CREATE_CERTIFICATE {
        return refuse(12, format!("unknown method {}", req.uri().path()));
    }
    // Authentication, in istiod's order: client certificate, then bearer token (§4.2).
    let token_id = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| st.tokens.get(t.trim()).cloned());
    let caller = match (&peer_id, token_id) {
        (Some(id), _) if id.starts_with(&format!("spiffe://{}/", st.ca.trust_domain())) => {
            st.counters.by_certificate.fetch_add(1, Ordering::Relaxed);
            id.clone()
        }
        (_, Some(id)) => {
            st.counters.by_token.fetch_add(1, Ordering::Relaxed);
            id
        }
        _ => return refuse(16, "request authenticate failure".into()),
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(13, format!("reading the request: {e}")),
    };
    let Some(msg) = unframe(body) else {
        return refuse(3, "malformed gRPC message".into());
    };
    let Some((csr_pem, validity)) = decode_request(msg) else {
        return refuse(3, "malformed IstioCertificateRequest".into());
    };
    let csr = match rcgen::CertificateSigningRequestParams::from_pem(&csr_pem) {
        Ok(c) => c,
        Err(e) => return refuse(3, format!("invalid CSR: {e}")),
    };
    if let Err(why) = csr_rules(&csr, &caller) {
        return refuse(3, why);
    }
    let requested = if validity > 0 {
        Duration::from_secs(validity as u64)
    } else {
        crate::ca::WORKLOAD_CERT_TTL
    };
    let ttl = requested.min(st.max_ttl);
    match st.ca.sign_csr(&csr, &caller, ttl) {
        Ok((leaf, _)) => {
            st.counters.issued.fetch_add(1, Ordering::Relaxed);
            // "The leaf cert is the first element, and the root cert is the last element."
            let chain = [leaf, st.ca.intermediate_pem(), st.ca.root_pem()];
            let mut out = BytesMut::new();
            for pem in chain {
                out.put_u8(0x0a);
                put_varint(&mut out, pem.len() as u64);
                out.extend_from_slice(pem.as_bytes());
            }
            grpc_answer(Some(out.freeze()), 0, "")
        }
        Err(e) => refuse(13, format!("signing failed: {e}")),
    }
}

/// istio-csr's rules (§4.3): no subject, no DNS/IP/email SANs, URI SANs exactly the caller.
fn csr_rules(csr: &rcgen::CertificateSigningRequestParams, caller: &str) -> Result<(), String> {
    if csr.params.distinguished_name.iter().next().is_some() {
        return Err("CSR subject must be empty".into());
    }
    let mut uris = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            rcgen::SanType::URI(u) => uris.push(u.as_str().to_string()),
            other => return Err(format!("CSR must not request {other:?}")),
        }
    }
    if uris != [caller.to_string()] {
        return Err(format!(
            "CSR URI SANs {uris:?} do not match the authenticated identity {caller}"
        ));
    }
    Ok(())
}

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

fn unframe(mut body: Bytes) -> Option<Bytes> {
    if body.remaining() < 5 || body.get_u8() != 0 {
        return None;
    }
    let len = body.get_u32() as usize;
    (body.remaining() == len).then_some(body)
}

/// `csr` (field 1) and `validity_duration` (field 3) of an `IstioCertificateRequest`; other
/// fields (the metadata Struct) are skipped.
fn decode_request(mut msg: Bytes) -> Option<(String, i64)> {
    let mut csr = None;
    let mut validity = 0i64;
    while msg.has_remaining() {
        let key = get_varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (f, 0) => {
                let v = get_varint(&mut msg)?;
                if f == 3 {
                    validity = v as i64;
                }
            }
            (f, 2) => {
                let len = get_varint(&mut msg)? as usize;
                if msg.remaining() < len {
                    return None;
                }
                let v = msg.split_to(len);
                if f == 1 {
                    csr = Some(String::from_utf8(v.to_vec()).ok()?);
                }
            }
            (_, 1) if msg.remaining() >= 8 => msg.advance(8),
            (_, 5) if msg.remaining() >= 4 => msg.advance(4),
            _ => return None,
        }
    }
    Some((csr?, validity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_and_skip_unknown_fields() {
        let mut b = BytesMut::new();
        b.put_u8(0x0a);
        put_varint(&mut b, 3);
        b.extend_from_slice(b"csr");
        b.put_u8(0x18);
        put_varint(&mut b, 3600);
        // metadata (field 4, a Struct): skipped.
        b.put_u8(0x22);
        put_varint(&mut b, 2);
        b.extend_from_slice(&[0x0a, 0x00]);
        assert_eq!(decode_request(b.freeze()), Some(("csr".to_string(), 3600)));
    }
}

//! The mesh → VM direction: `mesh-inbound` listeners accept Istio mTLS from mesh workloads the
//! way a sidecar's inbound does (istio-wire.md §2): meshgate's workload certificate as the
//! server's, a client certificate required and chained to the mesh root, ALPN answered from
//! `h2`, `http/1.1` (never `istio`). The caller is the SPIFFE ID in its certificate; the VM
//! service is the HOST and PORT of the SNI `outbound_.PORT_.SUBSET_.HOST` sidecars send (or a
//! plain SNI, or the Host header); its `allow:` decides (default deny). HTTP goes to a VM
//! backend with the caller in `x-forwarded-client-cert`; TCP is spliced.
//!
//! `Inbound` is built per config generation (certificate, routes, backend sets); backend sets
//! whose configuration did not change are carried over, with their health.

pub mod backends;
mod http;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{PrincipalRule, Snapshot, UpstreamProtocol, VmService};
use crate::lifecycle::CloseSignal;
use crate::listener::{Admission, ConnGauge, PrefaceSlot};
use crate::metrics::{InboundLabels, ListenerReasonLabels, Metrics};
use crate::runtime::{Generation, Runtime};
pub use backends::Backends;

/// What the inbound side of one config generation needs.
pub struct Inbound {
    pub routes: Routes,
    pub services: Vec<Arc<VmService>>,
    pub backends: Vec<Arc<Backends>>,
    /// One client per service: its connect timeout and HTTP version, pooled per backend.
    clients: Vec<http::BackendClient>,
    pub tls: Arc<ServerConfig>,
    /// The same without ALPN, for callers that offer none of ours (`istio` alone, for TCP).
    tls_no_alpn: Arc<ServerConfig>,
    /// meshgate's own SPIFFE ID (XFCC's `By=`).
    pub spiffe_id: String,
}

/// Which VM service a connection or request names, and whether its caller may call it: pure
/// tables, shared by the data path and `meshgate explain`.
pub struct Routes {
    pub services: Vec<Arc<VmService>>,
    /// (host, port) → service.
    by_host_port: HashMap<(String, u16), usize>,
    /// host → services (several when they differ by port).
    by_host: HashMap<String, Vec<usize>>,
    pub trust_domains: Vec<String>,
}

/// Why a mesh caller was refused; the reason label of `meshgate_inbound_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownVmService,
    PrincipalNotAllowed,
    UntrustedCaller,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::UnknownVmService => "unknown_vm_service",
            Refusal::PrincipalNotAllowed => "principal_not_allowed",
            Refusal::UntrustedCaller => "untrusted_caller",
        }
    }
}

/// What a request from `caller` for (SNI, Host) comes to: the one decision the data path and
/// `meshgate explain` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub service: Option<usize>,
    pub refusal: Option<Refusal>,
    /// The allow entry that matched.
    pub rule: Option<String>,
}

impl Inbound {
    pub fn new(snapshot: &Snapshot, metrics: &Arc<Metrics>, previous: Option<&Inbound>) -> Result<Inbound, String> {
        let identity = &snapshot.identity;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(identity.roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("client certificate verifier: {e}"))?;
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServerCert(identity.certified_key.clone())));
        let tls_no_alpn = Arc::new(tls.clone());
        // Istio's inbound answers from these, never `istio`, which "would interfere with
        // negotiation of the underlying protocol" (istio-wire.md §2.4); a TCP caller offering
        // `istio` alone gets no ALPN and the handshake goes on, as BoringSSL's NOACK does
        // (rustls would refuse it: hence the second config).
        tls.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        // A service whose backends and settings did not change keeps its backend set (with
        // the health learnt so far) and its client (with its pooled connections).
        let (backends, clients) = snapshot
            .vm_services
            .iter()
            .map(|s| {
                let kept = previous.and_then(|p| {
                    let j = p.backends.iter().position(|b| b.serves(s))?;
                    Some((p.backends[j].clone(), p.clients[j].clone()))
                });
                kept.unwrap_or_else(|| (Backends::new(s.clone(), metrics.clone()), http::BackendClient::new(s)))
            })
            .unzip();
        if let Some(p) = previous {
            // Backends no longer configured leave the health gauge.
            let kept = |name: &str, addr: &crate::config::schema::HostPort| {
                snapshot
                    .vm_services
                    .iter()
                    .any(|s| s.name == name && s.backends.contains(addr))
            };
            for old in &p.backends {
                old.forget_gauges(kept);
            }
        }
        Ok(Inbound {
            routes: Routes::new(snapshot),
            services: snapshot.vm_services.clone(),
            backends,
            clients,
            tls: Arc::new(tls),
            tls_no_alpn,
            spiffe_id: identity.spiffe_id.clone(),
        })
    }

    pub fn route(&self, sni: Option<&str>, authority: Option<&str>) -> Option<usize> {
        self.routes.route(sni, authority)
    }

    pub fn decide(&self, caller: Option<&str>, sni: Option<&str>, authority: Option<&str>) -> Decision {
        self.routes.decide(caller, sni, authority)
    }
}

impl Routes {
    pub fn new(snapshot: &Snapshot) -> Routes {
        let mut by_host_port = HashMap::new();
        let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
        for s in &snapshot.vm_services {
            for h in &s.hosts {
                by_host_port.insert((h.clone(), s.port), s.id);
                by_host.entry(h.clone()).or_default().push(s.id);
            }
        }
        Routes {
            services: snapshot.vm_services.clone(),
            by_host_port,
            by_host,
            trust_domains: snapshot.trust_domains.clone(),
        }
    }

    /// The VM service an SNI and/or Host names: `outbound_.PORT_.SUBSET_.HOST` by host and
    /// port, a plain name by host (its port when the Host header has one and several services
    /// share the name).
    pub fn route(&self, sni: Option<&str>, authority: Option<&str>) -> Option<usize> {
        if let Some(sni) = sni {
            if let Some((port, host)) = parse_outbound_sni(sni) {
                return self.by_host_port.get(&(host.to_ascii_lowercase(), port)).copied();
            }
        }
        let (host, port) = match (sni, authority) {
            (Some(s), _) => (
                s.to_ascii_lowercase(),
                authority.and_then(|a| crate::route::split_authority(a).ok()?.1),
            ),
            (None, Some(a)) => crate::route::split_authority(a).ok()?,
            (None, None) => return None,
        };
        let host = host.trim_end_matches('.');
        match (self.by_host.get(host)?.as_slice(), port) {
            ([one], _) => Some(*one),
            (many, Some(p)) => many.iter().copied().find(|i| self.services[*i].port == p),
            _ => None,
        }
    }

    /// Routes and authorizes a caller: the decision for the data path and for explain.
    pub fn decide(&self, caller: Option<&str>, sni: Option<&str>, authority: Option<&str>) -> Decision {
        let service = self.route(sni, authority);
        let caller = caller.filter(|c| {
            crate::identity::spiffe_trust_domain(c).is_some_and(|td| self.trust_domains.iter().any(|t| t == td))
        });
        let (refusal, rule) = match (service, caller) {
            (None, _) => (Some(Refusal::UnknownVmService), None),
            (Some(_), None) => (Some(Refusal::UntrustedCaller), None),
            (Some(s), Some(c)) => match self.services[s].allow.iter().find(|r| r.matches(c)) {
                Some(r) => (None, Some(r.to_string())),
                None => (Some(Refusal::PrincipalNotAllowed), None),
            },
        };
        Decision { service, refusal, rule }
    }
}

const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// `outbound_.PORT_.SUBSET_.HOST` → (PORT, HOST).
pub fn parse_outbound_sni(sni: &str) -> Option<(u16, &str)> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    let (_subset, host) = rest.split_once("_.")?;
    Some((port.parse().ok()?, host))
}

/// The caller's SPIFFE ID: the first `spiffe://` URI SAN of its leaf certificate.
fn caller_id(leaf: &[u8]) -> Option<String> {
    crate::identity::uri_sans(leaf)
        .into_iter()
        .find(|u| u.starts_with("spiffe://"))
}

/// The server side of `ClientCert`: always meshgate's current workload certificate.
#[derive(Debug)]
struct ServerCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Serves a `mesh-inbound` listener until told to close.
pub async fn serve(listener: TcpListener, name: Arc<str>, runtime: Arc<Runtime>, close: CloseSignal) {
    crate::listener::accept_loop(listener, name, runtime, close, |c| async move {
        let started = c.accepted_at.into_std();
        handle(
            c.gen,
            c.admission,
            c.guard,
            c.stream,
            c.peer,
            c.close,
            c.preface,
            started,
            c.behind_lb,
        )
        .await;
    })
    .await;
}

fn deny(metrics: &Metrics, listener: &str, reason: &str) {
    metrics
        .inbound_denied
        .get_or_create(&ListenerReasonLabels {
            listener: listener.to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

pub(crate) fn count(metrics: &Metrics, listener: &str, service: &str, code: u16) {
    metrics
        .inbound_requests
        .get_or_create(&InboundLabels {
            listener: listener.to_string(),
            service: service.to_string(),
            code: code.to_string(),
        })
        .inc();
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    gen: Arc<Generation>,
    admission: Admission,
    mut guard: ConnGauge,
    mut stream: TcpStream,
    peer: SocketAddr,
    close: CloseSignal,
    preface: PrefaceSlot,
    started: Instant,
    behind_lb: bool,
) {
    let name = admission.name.clone();
    let Some(inbound) = gen.inbound.clone() else { return };
    let cfg = gen.listener(&name);
    // PROXY header and TLS handshake: the connection's preface, due within the head deadline.
    let deadline = tokio::time::Instant::from_std(started) + gen.snapshot.limits.header_read_timeout;
    let evicted = preface.evicted();
    let handshake = async {
        let (client, _vpce, prefix) = crate::proxy_protocol::admit(&mut stream, cfg, peer)
            .await
            .map_err(|e| e.to_string())?;
        let io = crate::io::Prefixed::new(prefix, stream);
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
            .await
            .map_err(|e| e.to_string())?;
        let ours = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| SERVER_ALPN.contains(&p)));
        let config = if ours { &inbound.tls } else { &inbound.tls_no_alpn };
        let tls = start.into_stream(config.clone()).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((client, tls))
    };
    let (client, tls) = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => match r {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::debug!(listener = %name, %peer, error = %e, "mesh handshake failed");
                deny(&gen.metrics, &name, "handshake");
                return;
            }
            Err(_) => {
                deny(&gen.metrics, &name, "handshake");
                return;
            }
        },
        _ = evicted => return,
    };
    drop(preface);
    if behind_lb && !admission.admit_source(&gen, &mut guard, client.ip()) {
        return;
    }
    let session = tls.get_ref().1;
    let sni = session.server_name().map(str::to_string);
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let caller = leaf.as_deref().and_then(caller_id);
    let conn = http::MeshConn {
        listener: name.clone(),
        client,
        sni,
        caller,
        leaf: leaf.unwrap_or_default(),
    };
    // A TCP service takes the bytes as they come; the SNI alone must name it.
    let by_sni = inbound.route(conn.sni.as_deref(), None);
    match by_sni.map(|i| inbound.services[i].protocol) {
        Some(UpstreamProtocol::Tcp) => http::tcp(&gen, &inbound, conn, tls, close, guard).await,
        _ => http::serve_http(gen.clone(), inbound, conn, tls, alpn, close, guard).await,
    }
}

/// The allow entries of a service, for explanations.
pub fn allow_list(s: &VmService) -> Vec<String> {
    s.allow.iter().map(PrincipalRule::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_sni_forms() {
        assert_eq!(
            parse_outbound_sni("outbound_.8080_._.billing.vms.internal"),
            Some((8080, "billing.vms.internal"))
        );
        assert_eq!(
            parse_outbound_sni("outbound_.9080_.v1_.billing.vms.internal"),
            Some((9080, "billing.vms.internal"))
        );
        assert_eq!(parse_outbound_sni("billing.vms.internal"), None);
        assert_eq!(parse_outbound_sni("outbound_.x_._.h"), None);
    }
}

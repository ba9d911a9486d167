//! Config: the YAML file (`schema/`) validated into one immutable [`Snapshot`] (`validate/`).
//!
//! Every error names the file, the line and the reason. Validation collects all the errors it
//! can find in one pass, so an operator fixes a file in one round trip instead of five.

pub mod hbone;
pub mod inbound;
pub mod schema;
mod summary;
mod transcode;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderName;

pub use hbone::{HboneGateway, HboneRoute, Transport};
pub use inbound::{LoadBalancing, PrincipalRule, VmService};
pub use schema::{GatewayTarget, HostPort, ListenerProtocol, LogFormat, UpstreamProtocol};
pub use summary::summary;

use crate::identity::{ExpectedServer, Identity};

pub use yamlconf::{ConfigError, ConfigErrors};

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: ListenerProtocol,
    pub proxy_protocol: ProxyProtocolMode,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections: Option<usize>,
    /// `protocol: tcp`: the service id every connection goes to.
    pub service: Option<usize>,
    /// `protocol: tcp`: idle connections are closed after this.
    pub idle_timeout: Duration,
    /// `protocol: h3`: the server certificate, checked at load.
    pub tls: Option<ListenerTls>,
    /// `protocol: http`: the `Alt-Svc` header added to responses.
    pub alt_svc: Option<http::HeaderValue>,
}

/// A listener's TLS server certificate, as read (and checked) when the config was loaded. The
/// PEM is kept rather than parsed keys so that a reload can tell whether it changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    pub cert_chain: PathBuf,
    pub chain_pem: Arc<Vec<u8>>,
    pub key_pem: Arc<Vec<u8>>,
}

impl ListenerTls {
    /// Reads and checks a certificate chain and its key: parsable, key matches the leaf.
    pub fn load(cert_chain: &Path, key: &Path) -> Result<ListenerTls, String> {
        let chain_pem = std::fs::read(cert_chain).map_err(|e| format!("cannot read {}: {e}", cert_chain.display()))?;
        // "private key" in the message is what puts the error on the `key:` line.
        let key_pem = std::fs::read(key).map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
        let tls = ListenerTls {
            cert_chain: cert_chain.to_owned(),
            chain_pem: Arc::new(chain_pem),
            key_pem: Arc::new(key_pem),
        };
        tls.certified_key()?;
        Ok(tls)
    }

    pub fn certified_key(
        &self,
    ) -> Result<
        (
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        String,
    > {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not a PEM certificate file: {e}", self.cert_chain.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no PEM CERTIFICATE block found", self.cert_chain.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("no PEM private key found: {e}"))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("unsupported private key: {e}"))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|_| {
                format!(
                    "the private key does not match the certificate in {}",
                    self.cert_chain.display()
                )
            })?;
        Ok((chain, key))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections_per_source: usize,
    pub max_preface_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub max_request_body: Option<u64>,
}

/// What a listener does about PROXY headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    Off,
    /// Read a header if a trusted peer sends one.
    Optional,
    /// Trusted peers must send one; other peers are refused.
    Required,
}

/// Which services a tenant may reach.
#[derive(Debug, Clone)]
pub enum Allow {
    All,
    /// Indexed by service id.
    Services(Vec<bool>),
}

impl Allow {
    pub fn allows(&self, service: usize) -> bool {
        match self {
            Allow::All => true,
            Allow::Services(v) => v.get(service).copied().unwrap_or(false),
        }
    }
}

/// A tenant as configured: who it is (sources, keys, VPC endpoints) and what it may do. `policy`
/// builds its lookup tables from these.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub sources: Vec<ipnet::IpNet>,
    /// When non-empty, the client must have arrived through one of these VPC endpoints.
    pub vpce: Vec<String>,
    /// SHA-256 digests of the tenant's API keys.
    pub key_hashes: Vec<[u8; 32]>,
    pub allow: Allow,
    pub rate_limit: Option<RateLimit>,
    pub max_concurrent_requests: Option<usize>,
    /// Which identity the tenant's requests present upstream: 0 is `mesh.identity`, `k` is the
    /// snapshot's `tenant_identities[k - 1]` (see `Snapshot::identity_at`).
    pub identity: usize,
    /// How the mesh's telemetry names the tenant's requests; `None`: no peer metadata is sent.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// How the mesh's telemetry names a tenant, every default applied (docs/config.md,
/// "Telemetry"). The names become Istio's `source_*` labels at the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    pub workload: String,
    /// Only informative under mTLS: Istio takes `source_workload_namespace` from the client
    /// certificate, so validation makes this the certificate's namespace.
    pub namespace: String,
    pub app: String,
    pub version: Option<String>,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster_id: Option<String>,
    /// Extra workload labels, sorted by key.
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// Fraction of the traces meshgate starts that are marked sampled.
    pub sample_rate: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// A mesh service a VM may call, with everything needed to reach it.
#[derive(Debug, Clone)]
pub struct Service {
    /// Index into [`Snapshot::services`].
    pub id: usize,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub protocol: UpstreamProtocol,
    pub subset: Option<String>,
    pub aliases: Vec<String>,
    /// The Host names that route to this service: its host (unless it is a subset service with
    /// aliases, which VMs reach by those) and its aliases; none for a tcp service.
    pub routed: Vec<String>,
    /// What requests to it carry upstream as `:authority` / `Host`, whatever name or spelling
    /// the client used: its canonical host, with the port unless it is 80 (so mesh policies
    /// written for the canonical name always see it).
    pub authority: http::uri::Authority,
    pub expected_server: ExpectedServer,

    /// `outbound_.PORT_.SUBSET_.HOST`, what the gateway routes on.
    pub sni: String,
    /// Sidecar (through `mesh.gateway`) or HBONE (ambient).
    pub transport: Transport,
    /// REST/JSON requests matching these gRPC methods' HTTP bindings are transcoded.
    pub transcode: Option<Arc<crate::transcode::Transcoder>>,
    /// `host: "*.SUFFIX"`: the hosts and ports it matches, and whom their servers must be.
    pub pattern: Option<HostPattern>,
    /// This is one destination of a pattern (made by [`Service::destination`]): a handshake
    /// the gateway closes means it has no such service.
    pub via_pattern: bool,
}

/// What a service's host pattern matches (`route` matches it; this is what the config said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower case, without the leading `*.`: `bookinfo.svc.cluster.local`.
    pub suffix: String,
    pub ports: Vec<u16>,
    pub identity: PatternIdentity,
}

/// Whom the server of a pattern's destination must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternIdentity {
    /// The service's `expected_server`, whatever the host (`identity: any` or a list).
    Fixed,
    /// Any service account of this namespace: the pattern is `*.NS.svc.DOMAIN`.
    Namespace { trust_domain: String, namespace: String },
    /// Any service account of the namespace the host names: the pattern is `*.svc.DOMAIN` and
    /// hosts must be `NAME.NS.svc.DOMAIN`.
    HostNamespace { trust_domain: String },
}

impl Service {
    /// Whether requests to this service go to pools made per destination on demand (host
    /// patterns, and `protocol: auto`, whose pool depends on the client's protocol).
    pub fn is_dynamic(&self) -> bool {
        self.pattern.is_some() || self.protocol == UpstreamProtocol::Auto
    }

    /// Whom the server must be, in words (a pattern's rule, before a host is known).
    pub fn server_rule(&self) -> String {
        match self.pattern.as_ref().map(|p| &p.identity) {
            None | Some(PatternIdentity::Fixed) => self.expected_server.to_string(),
            Some(PatternIdentity::Namespace {
                trust_domain,
                namespace,
            }) => format!("any spiffe://{trust_domain}/ns/{namespace}/sa/* identity"),
            Some(PatternIdentity::HostNamespace { trust_domain }) => {
                format!(
                    "any spiffe://{trust_domain}/ns/NAMESPACE/sa/* identity (NAMESPACE from NAME.NAMESPACE.svc.DOMAIN)"
                )
            }
        }
    }

    /// The service as one destination: `host:port`, spoken in `protocol` (`http1`/`http2` for
    /// `auto`). `None` when the host does not fit the pattern's identity rule (a `*.svc.DOMAIN`
    /// pattern and a host that names no namespace).
    pub fn destination(&self, host: &str, port: u16, protocol: UpstreamProtocol) -> Option<Service> {
        let expected_server = match self.pattern.as_ref().map(|p| &p.identity) {
            None | Some(PatternIdentity::Fixed) => self.expected_server.clone(),
            Some(PatternIdentity::Namespace {
                trust_domain,
                namespace,
            }) => ExpectedServer::Namespace {
                trust_domain: trust_domain.clone(),
                namespace: namespace.clone(),
            },
            Some(PatternIdentity::HostNamespace { trust_domain }) => {
                let labels: Vec<&str> = host.split('.').collect();
                if labels.len() < 4 || labels[2] != "svc" {
                    return None;
                }
                ExpectedServer::Namespace {
                    trust_domain: trust_domain.clone(),
                    namespace: labels[1].to_string(),
                }
            }
        };
        let sni = sni_for(host, port, self.subset.as_deref());
        rustls::pki_types::ServerName::try_from(sni.clone()).ok()?;
        let authority = if port == 80 {
            http::uri::Authority::try_from(host).ok()?
        } else {
            http::uri::Authority::try_from(format!("{host}:{port}")).ok()?
        };
        Some(Service {
            id: self.id,
            name: self.name.clone(),
            host: host.to_string(),
            port,
            protocol,
            subset: self.subset.clone(),
            aliases: Vec::new(),
            routed: Vec::new(),
            authority,
            expected_server,
            sni,
            transport: Transport::Sidecar,
            transcode: None,
            pattern: None,
            via_pattern: self.pattern.is_some(),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_jitter: f64,
    pub min_connections: usize,
    pub max_connections: usize,
    pub target_streams_per_connection: usize,
    pub max_streams_per_connection: usize,
    pub http1_max_connections: usize,
    pub max_pending_requests: usize,
    pub body_idle_timeout: Duration,
    pub max_dynamic_destinations: usize,
    pub unknown_service_cache: Duration,
    pub max_metric_hosts: usize,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub bind: SocketAddr,
    /// The bearer token for every endpoint but health, readiness and metrics, read from
    /// `token_file` at load.
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSettings {
    pub delay: Duration,
    pub spread: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSettings {
    pub watch: bool,
    pub interval: Duration,
}

/// A validated config. Immutable: a reload builds a new one and swaps it in whole.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub path: PathBuf,
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    pub drain: DrainSettings,
    pub limits: Limits,
    pub log: LogSettings,
    pub reload: ReloadSettings,
    pub trust_domain: String,
    pub gateway: GatewayTarget,
    pub gateway_refresh: Duration,
    pub identity: Arc<Identity>,
    /// Tenants' own identities, distinct from `identity` and from each other.
    pub tenant_identities: Vec<Arc<Identity>>,
    pub services: Vec<Arc<Service>>,
    /// The mesh → VM direction's services (served by `mesh-inbound` listeners).
    pub vm_services: Vec<Arc<VmService>>,
    /// `trust_domain` and its aliases: the callers a `mesh-inbound` listener accepts.
    pub trust_domains: Vec<String>,
    /// `services_file:`, resolved: watched and reloaded with the config file.
    pub services_file: Option<PathBuf>,
    pub tenants: Vec<Tenant>,
    pub tenant_names: Vec<String>,
    pub api_key_header: HeaderName,
    pub upstream: UpstreamSettings,
    pub tracing: TracingSettings,
}

impl Snapshot {
    /// Identity number `i` as tenants refer to it: 0 is `mesh.identity`.
    pub fn identity_at(&self, i: usize) -> &Arc<Identity> {
        if i == 0 {
            &self.identity
        } else {
            &self.tenant_identities[i - 1]
        }
    }

    /// Replaces identity number `i` (a rotation or an issuance).
    pub fn set_identity_at(&mut self, i: usize, identity: Arc<Identity>) {
        if i == 0 {
            self.identity = identity;
        } else {
            self.tenant_identities[i - 1] = identity;
        }
    }

    /// How many identities tenants can present (the mesh one included).
    pub fn identity_count(&self) -> usize {
        1 + self.tenant_identities.len()
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    parse(path, &text, SystemTime::now())
}

/// Validates config text as if read from `path` (relative identity paths resolve against
/// its directory), checking certificate validity at `now`.
pub fn parse(path: &Path, text: &str, now: SystemTime) -> Result<Snapshot, ConfigErrors> {
    validate::parse(path, text, now)
}

/// Parses the config form `sha256:<64 hex digits>`.
pub fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s.strip_prefix("sha256:").ok_or_else(|| {
        "API keys are stored hashed: expected \"sha256:<64 hex digits>\" (see `meshgate hash-key`)".to_string()
    })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| "expected \"sha256:\" followed by exactly 64 hex digits".to_string())?;
    Ok(out)
}

/// `outbound_.PORT_.SUBSET_.HOST` (istio-wire.md §1.1): an empty subset leaves the literal `_._.`.
pub fn sni_for(host: &str, port: u16, subset: Option<&str>) -> String {
    format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_without_subset_has_empty_field() {
        assert_eq!(
            sni_for("reviews.default.svc.cluster.local", 8080, None),
            "outbound_.8080_._.reviews.default.svc.cluster.local"
        );
    }

    #[test]
    fn sni_with_subset() {
        assert_eq!(
            sni_for("reviews.default.svc.cluster.local", 9080, Some("v1")),
            "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
        );
    }
}

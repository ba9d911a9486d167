//! The config file as users write it: serde types that mirror the YAML one to one.
//!
//! Unknown fields are errors everywhere (`deny_unknown_fields`). Values whose shape can be checked
//! alone (addresses, CIDRs, durations, enums) are parsed during deserialization, so the YAML
//! library reports their line. Cross-references (allow lists, duplicate names, files) are checked
//! in `validate/`; the fields they need are `Spanned` so that errors can still name a line.
//! Defaults are written once, as functions next to their field, and documented in docs/config.md.
//! One file for the whole tree of sections (the value types are in `values.rs`): it reads as
//! the map of the config file, section by section.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

mod values;
pub use values::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    pub mesh: RawMesh,
    #[serde(default)]
    pub services: OrderedMap<RawService>,
    /// VM-side services that mesh workloads call through a `mesh-inbound` listener.
    #[serde(default)]
    pub vm_services: OrderedMap<super::inbound::RawVmService>,
    /// A file with more `services:` (e.g. written by `meshgate services import`), loaded and
    /// watched like this one; its names must not repeat this file's.
    #[serde(default)]
    pub services_file: Option<Spanned<String>>,
    pub tenants: OrderedMap<RawTenant>,
    /// Header that may carry an API key, besides `Proxy-Authorization`.
    #[serde(default = "default_api_key_header")]
    pub api_key_header: Spanned<String>,
    #[serde(default)]
    pub upstream: Option<Spanned<RawUpstream>>,
    #[serde(default)]
    pub drain: Option<Spanned<RawDrain>>,
    #[serde(default)]
    pub limits: Option<Spanned<RawLimits>>,
    #[serde(default)]
    pub log: Option<RawLog>,
    #[serde(default)]
    pub reload: Option<RawReload>,
    /// The workload names the mesh's telemetry sees for tenants without a `telemetry:` block
    /// of their own (and the fields theirs leave out).
    #[serde(default)]
    pub telemetry: Option<Spanned<RawTelemetry>>,
    #[serde(default)]
    pub tracing: Option<Spanned<RawTracing>>,
}

/// How a tenant appears in Istio's telemetry (`source_workload`, `source_app`, ...): sent as
/// the peer metadata a sidecar sends (docs/config.md, "Telemetry").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub workload: Option<Spanned<String>>,
    pub namespace: Option<Spanned<String>>,
    pub app: Option<Spanned<String>>,
    pub version: Option<Spanned<String>>,
    pub canonical_service: Option<Spanned<String>>,
    pub canonical_revision: Option<Spanned<String>>,
    pub cluster_id: Option<Spanned<String>>,
    /// Extra workload labels (as a pod's labels).
    #[serde(default)]
    pub labels: OrderedMap<String>,
}

/// Trace context for requests that arrive without one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// Fraction (0 to 1) of the traces meshgate starts that are marked sampled.
    #[serde(default = "d_sample_rate")]
    pub sample_rate: f64,
}

/// Istio's default (`meshConfig.defaultConfig.tracing.sampling: 1.0`, in percent).
pub fn d_sample_rate() -> f64 {
    0.01
}

/// Graceful drain on SIGTERM / `POST /drain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDrain {
    /// Readiness is off but listeners keep serving, so the load balancer notices first.
    #[serde(default = "d_drain_delay")]
    pub delay: Dur,
    /// Client connections are asked to close spread over this window, not all at once.
    #[serde(default = "d_drain_spread")]
    pub spread: Dur,
    /// From the start of the drain until whatever remains is cut.
    #[serde(default = "d_drain_timeout")]
    pub timeout: Dur,
}

pub fn d_drain_delay() -> Dur {
    Dur(Duration::from_secs(15))
}
pub fn d_drain_spread() -> Dur {
    Dur(Duration::from_secs(10))
}
pub fn d_drain_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

impl Default for RawDrain {
    fn default() -> Self {
        RawDrain {
            delay: d_drain_delay(),
            spread: d_drain_spread(),
            timeout: d_drain_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub format: Option<LogFormat>,
}

/// Watching the config and identity files for changes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    #[serde(default = "d_true")]
    pub watch: bool,
    #[serde(default = "d_watch_interval")]
    pub interval: Dur,
}

pub fn d_true() -> bool {
    true
}
pub fn d_watch_interval() -> Dur {
    Dur(Duration::from_secs(2))
}

pub fn default_api_key_header() -> Spanned<String> {
    Spanned::new(
        "x-meshgate-key".to_string(),
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Spanned<String>,
    pub bind: Spanned<Addr>,
    pub protocol: ListenerProtocol,
    /// Whether a PROXY protocol header (v1 or v2) precedes the traffic of trusted peers.
    #[serde(default = "d_proxy_protocol")]
    pub proxy_protocol: Spanned<super::ProxyProtocolMode>,
    /// Load balancer addresses whose PROXY headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Client connections on this listener at most (also bounded by `limits.max_connections`).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// `protocol: tcp` only: the service every connection goes to.
    #[serde(default)]
    pub service: Option<Spanned<String>>,
    /// `protocol: tcp` only: a connection with no byte moving either way for this long is closed.
    #[serde(default)]
    pub idle_timeout: Option<Spanned<Dur>>,
    /// `protocol: h3` only: the TLS server certificate QUIC requires.
    #[serde(default)]
    pub tls: Option<Spanned<RawListenerTls>>,
    /// `protocol: http` only: an `Alt-Svc` value added to every response (e.g.
    /// `h3=":443"; ma=86400`), so clients that speak HTTP/3 switch to the h3 listener.
    #[serde(default)]
    pub alt_svc: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    pub cert_chain: Spanned<String>,
    pub key: Spanned<String>,
}

pub fn d_proxy_protocol() -> Spanned<super::ProxyProtocolMode> {
    Spanned::new(
        super::ProxyProtocolMode::Off,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and h2c with prior knowledge on the same port.
    Http,
    /// Opaque TCP to one service (`service:`), each connection over its own mTLS connection.
    Tcp,
    /// HTTP/3 over QUIC (UDP), with a TLS server certificate (`tls:`); same routing and policy.
    H3,
    /// Istio mTLS from mesh workloads to `vm_services:` (the mesh → VM direction).
    #[serde(rename = "mesh-inbound")]
    MeshInbound,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Spanned<Addr>,
    /// File holding a bearer token required by every endpoint but `/healthz`, `/readyz` and
    /// `/metrics`.
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
    /// Serve the admin API without a token on a non-loopback address (refused otherwise).
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMesh {
    pub trust_domain: Spanned<String>,
    /// Other trust domains whose workloads are accepted as callers of `vm_services:` (Istio's
    /// `trustDomainAliases`).
    #[serde(default)]
    pub trust_domain_aliases: Vec<Spanned<String>>,
    /// `host:port`, or a list of them (the gateway's addresses when there is no DNS name).
    pub gateway: Spanned<OneOrMany<HostPort>>,
    /// How often the gateway name is resolved again (its addresses change as the LB scales).
    #[serde(default = "default_gateway_refresh")]
    pub gateway_refresh: Dur,
    pub identity: RawIdentity,
}

pub fn default_gateway_refresh() -> Dur {
    Dur(Duration::from_secs(30))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// Files: required unless an issuer is named; with an issuer, an optional bootstrap
    /// certificate (served until the first issuance, and authenticating it to an Istio CA).
    #[serde(default)]
    pub cert_chain: Option<Spanned<String>>,
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    pub root_cert: Spanned<String>,
    /// With an issuer: the SPIFFE ID to request.
    #[serde(default)]
    pub spiffe_id: Option<Spanned<String>>,
    /// With an issuer: the certificate lifetime to request.
    #[serde(default)]
    pub ttl: Option<Spanned<Dur>>,
    #[serde(default)]
    pub istio_ca: Option<Spanned<RawIstioCa>>,
    #[serde(default)]
    pub vault: Option<Spanned<RawVault>>,
}

/// istiod (`:15012`) or cert-manager istio-csr: `CreateCertificate` over gRPC.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIstioCa {
    pub address: Spanned<String>,
    #[serde(default)]
    pub server_name: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_cert: Option<Spanned<String>>,
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
    #[serde(default)]
    pub cluster_id: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    pub address: Spanned<String>,
    #[serde(default)]
    pub ca_cert: Option<Spanned<String>>,
    /// The PKI mount path (default `pki`).
    #[serde(default)]
    pub mount: Option<Spanned<String>>,
    pub role: Spanned<String>,
    /// `issue` (Vault makes the key) or `sign` (our key, our CSR).
    #[serde(default)]
    pub method: VaultMethod,
    #[serde(default)]
    pub common_name: Option<String>,
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
    #[serde(default)]
    pub approle: Option<Spanned<RawAppRole>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaultMethod {
    #[default]
    Issue,
    Sign,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    #[serde(default = "d_approle_mount")]
    pub mount: String,
    pub role_id_file: Spanned<String>,
    pub secret_id_file: Spanned<String>,
}

pub fn d_approle_mount() -> String {
    "approle".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// A DNS name, or a pattern `*.SUFFIX` matching any name under SUFFIX.
    pub host: Spanned<String>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    /// Several ports (host patterns only).
    #[serde(default)]
    pub ports: Option<Spanned<Vec<u16>>>,
    /// Required for exact hosts; `auto` by default for patterns.
    #[serde(default)]
    pub protocol: Option<Spanned<UpstreamProtocol>>,
    #[serde(default)]
    pub subset: Option<Spanned<String>>,
    #[serde(default)]
    pub identity: Option<Spanned<OneOrMany<String>>>,
    #[serde(default)]
    pub aliases: Vec<Spanned<String>>,
    /// `sidecar` (default), `hbone` or `double-hbone` (Istio ambient, see `config/hbone.rs`).
    #[serde(default)]
    pub transport: Option<Spanned<String>>,
    #[serde(default)]
    pub hbone: Option<Spanned<super::hbone::RawHbone>>,
    /// gRPC-JSON transcoding for an `http2` service (see `config/transcode.rs`).
    #[serde(default)]
    pub transcode: Option<Spanned<super::transcode::RawTranscode>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum UpstreamProtocol {
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "http2")]
    Http2,
    /// Opaque bytes (databases, queues): reached through `protocol: tcp` listeners, ALPN `istio`.
    #[serde(rename = "tcp")]
    Tcp,
    /// Mirror the client: HTTP/1.1 clients go out as HTTP/1.1, h2c, gRPC and HTTP/3 clients as
    /// HTTP/2, as Istio's sidecars do on ports whose protocol they do not know.
    #[serde(rename = "auto")]
    Auto,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    #[serde(default)]
    pub sources: Vec<Cidr>,
    #[serde(default)]
    pub api_keys: Vec<Spanned<String>>,
    /// AWS PrivateLink: only clients arriving through these VPC endpoints (from the PROXY v2
    /// header) match this tenant.
    #[serde(default)]
    pub vpce: Vec<String>,
    pub allow: Vec<Spanned<String>>,
    /// Token bucket: sustained requests per second and burst size. Over it: 429.
    #[serde(default)]
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// Requests of this tenant in flight at once. Over it: 429.
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// The tenant's own workload identity, presented upstream instead of `mesh.identity`, so
    /// the mesh sees a distinct principal per tenant.
    #[serde(default)]
    pub identity: Option<Spanned<RawIdentity>>,
    /// How the mesh's telemetry names this tenant's requests; fields left out come from the
    /// top-level `telemetry:`.
    #[serde(default)]
    pub telemetry: Option<Spanned<RawTelemetry>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<f64>,
}

/// Protection of the VM-facing side. Defaults are safe for a shared proxy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Client connections across all listeners; a listener may set its own lower `max_connections`.
    #[serde(default = "d_max_client_connections")]
    pub max_connections: usize,
    /// Bytes of request line plus headers (HTTP/1.1 read buffer; HTTP/2 header list size).
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "d_max_headers")]
    pub max_headers: usize,
    /// Time a client has to send a complete request head (slowloris); for the first request of
    /// a connection it counts from the accept, PROXY header and protocol preface included.
    #[serde(default = "d_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A client connection with no request in flight is closed after this (HTTP/1.1 keep-alive,
    /// h2c, HTTP/3; TCP listeners have their own `idle_timeout`).
    #[serde(default = "d_client_idle_timeout")]
    pub idle_timeout: Dur,
    /// Client connections from one source address at once (the PROXY header's source behind a
    /// trusted load balancer): one machine cannot take every connection slot.
    #[serde(default = "d_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Connections accepted that have not yet sent a complete first request head (or finished
    /// a QUIC handshake): silent or trickling sockets cannot take every connection slot.
    #[serde(default = "d_max_preface_connections")]
    pub max_preface_connections: usize,
    #[serde(default = "d_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Request body size limit in bytes; none by default (uploads stream through).
    #[serde(default)]
    pub max_request_body: Option<u64>,
}

pub fn d_max_client_connections() -> usize {
    20_000
}
pub fn d_max_header_bytes() -> usize {
    64 * 1024
}
pub fn d_max_headers() -> usize {
    100
}
pub fn d_header_read_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
pub fn d_h2_max_concurrent_streams() -> u32 {
    256
}
pub fn d_client_idle_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
pub fn d_max_connections_per_source() -> usize {
    256
}
pub fn d_max_preface_connections() -> usize {
    1024
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: d_max_client_connections(),
            max_header_bytes: d_max_header_bytes(),
            max_headers: d_max_headers(),
            header_read_timeout: d_header_read_timeout(),
            idle_timeout: d_client_idle_timeout(),
            max_connections_per_source: d_max_connections_per_source(),
            max_preface_connections: d_max_preface_connections(),
            h2_max_concurrent_streams: d_h2_max_concurrent_streams(),
            max_request_body: None,
        }
    }
}

/// Pool and timeout settings for connections to the east-west gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "d_handshake_timeout")]
    pub handshake_timeout: Dur,
    /// From sending the request until the response headers arrive.
    #[serde(default = "d_request_timeout")]
    pub request_timeout: Dur,
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default = "d_max_connection_age")]
    pub max_connection_age: Dur,
    /// Fraction (0..1) by which each connection's maximum age is randomly shortened or lengthened,
    /// so a fleet does not reconnect in waves.
    #[serde(default = "d_max_connection_age_jitter")]
    pub max_connection_age_jitter: f64,
    #[serde(default = "d_min_connections")]
    pub min_connections: usize,
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    #[serde(default = "d_target_streams")]
    pub target_streams_per_connection: usize,
    #[serde(default = "d_max_streams")]
    pub max_streams_per_connection: usize,
    #[serde(default = "d_http1_max_connections")]
    pub http1_max_connections: usize,
    /// Requests waiting for an upstream connection or stream, per service; beyond it requests
    /// fail at once with 503 instead of queueing into the request timeout.
    #[serde(default = "d_max_pending")]
    pub max_pending_requests: usize,
    /// A response body that makes no progress (no byte from the mesh reaches the client) for
    /// this long is reset: a client that stops reading cannot hold an upstream stream forever.
    #[serde(default = "d_body_idle_timeout")]
    pub body_idle_timeout: Dur,
    /// Pools made on demand (host patterns, `protocol: auto`) kept at once; the least recently
    /// used is closed first. Envoy's DNS cache default.
    #[serde(default = "d_max_dynamic_destinations")]
    pub max_dynamic_destinations: usize,
    /// How long the gateway's "no such service" answer is remembered for a destination.
    #[serde(default = "d_unknown_service_cache")]
    pub unknown_service_cache: Dur,
    /// Distinct hosts that get a `host` label of their own in
    /// `meshgate_dynamic_requests_total`; the rest are counted as `host="other"`.
    #[serde(default = "d_max_metric_hosts")]
    pub max_metric_hosts: usize,
}

pub fn d_max_dynamic_destinations() -> usize {
    1024
}
pub fn d_unknown_service_cache() -> Dur {
    Dur(Duration::from_secs(5))
}
pub fn d_max_metric_hosts() -> usize {
    100
}

pub fn d_max_pending() -> usize {
    1024
}
pub fn d_body_idle_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

pub fn d_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
pub fn d_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
pub fn d_request_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
pub fn d_idle_timeout() -> Dur {
    Dur(Duration::from_secs(90))
}
pub fn d_max_connection_age() -> Dur {
    Dur(Duration::from_secs(300))
}
pub fn d_max_connection_age_jitter() -> f64 {
    0.2
}
pub fn d_min_connections() -> usize {
    2
}
pub fn d_max_connections() -> usize {
    8
}
pub fn d_target_streams() -> usize {
    50
}
pub fn d_max_streams() -> usize {
    100
}
pub fn d_http1_max_connections() -> usize {
    256
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            connect_timeout: d_connect_timeout(),
            handshake_timeout: d_handshake_timeout(),
            request_timeout: d_request_timeout(),
            idle_timeout: d_idle_timeout(),
            max_connection_age: d_max_connection_age(),
            max_connection_age_jitter: d_max_connection_age_jitter(),
            min_connections: d_min_connections(),
            max_connections: d_max_connections(),
            target_streams_per_connection: d_target_streams(),
            max_streams_per_connection: d_max_streams(),
            http1_max_connections: d_http1_max_connections(),
            max_pending_requests: d_max_pending(),
            body_idle_timeout: d_body_idle_timeout(),
            max_dynamic_destinations: d_max_dynamic_destinations(),
            unknown_service_cache: d_unknown_service_cache(),
            max_metric_hosts: d_max_metric_hosts(),
        }
    }
}

//! meshsim: the parts of an Istio mesh data plane that meshgate talks to, on loopback, with real
//! sockets and real TLS: a mesh CA ([`ca`]), an AUTO_PASSTHROUGH east-west gateway
//! ([`gateway`]), mTLS sidecars ([`sidecar`]) in front of echo apps ([`echo`]), wired together by
//! [`Mesh`] from a [`MeshSpec`].
//!
//! Every wire detail (SNI form, ALPN lists, certificate shape, XFCC) is built here from
//! `shared/reference/istio-wire.md`, never borrowed from meshgate, so that a misreading on one
//! side cannot cancel out the same misreading on the other.

pub mod bookstore;
pub mod ca;
pub mod client;
pub mod echo;
pub mod gateway;
pub mod hbone;
pub mod hello;
pub mod issuers;
pub mod mesh;
pub mod peer;
pub mod sidecar;
pub mod spec;
pub mod stats;
mod tasks;

pub use ca::{IdentityFiles, IssueOptions, MeshCa, WorkloadCert};
pub use client::{MeshClient, MeshProtocol};
pub use echo::{pattern_byte, pattern_sha256};
pub use hbone::{ConnectSeen, HboneStats};
pub use mesh::Mesh;
pub use peer::Source;
pub use spec::{
    demo_spec, outbound_sni, spiffe_id, MeshSpec, PodIdentity, PodSpec, ServiceSpec, ALPN_ISTIO_H2, ALPN_ISTIO_HTTP10,
    ALPN_ISTIO_HTTP11, CLUSTER_DOMAIN, ISTIO_MTLS_ALPNS, TRUST_DOMAIN,
};
pub use stats::{PodStats, StatsSnapshot};

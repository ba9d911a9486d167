//! The mesh description (services, pods, identities, allow lists) and the Istio naming rules
//! derived from it: service host names, SPIFFE IDs, AUTO_PASSTHROUGH SNI names, Istio ALPN values.
//!
//! The naming rules are written here from `reference/istio-wire.md` (§1.1, §1.2, §2.6, §3.3) on
//! purpose, independently of meshgate's own code, so that a misreading in one cannot cancel out a
//! misreading in the other.

use std::collections::{BTreeSet, HashSet};

/// Default Kubernetes cluster domain: hosts are `{name}.{namespace}.svc.{cluster_domain}`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Default Istio trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// `allIstioMtlsALPNs` (istio-wire §1.2): the gateway's filter chains match only when the client
/// offers at least one of these.
pub const ISTIO_MTLS_ALPNS: [&str; 5] = [
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// What an Envoy sidecar sends for HTTP/2 upstream requests (istio-wire §2.2, `mtlsHTTP2ALPN`).
pub const ALPN_ISTIO_H2: [&str; 3] = ["istio-h2", "istio", "h2"];
/// What an Envoy sidecar sends for HTTP/1.1 upstream requests (`mtlsHTTP11ALPN`).
pub const ALPN_ISTIO_HTTP11: [&str; 3] = ["istio-http/1.1", "istio", "http/1.1"];
/// What an Envoy sidecar sends for HTTP/1.0 upstream requests (`mtlsHTTP10ALPN`).
pub const ALPN_ISTIO_HTTP10: [&str; 3] = ["istio-http/1.0", "istio", "http/1.0"];

/// `spiffe://<td>/ns/<ns>/sa/<sa>` (istio-wire §2.6, `pkg/spiffe/spiffe.go`).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// `BuildDNSSrvSubsetKey("outbound", subset, host, port)` (istio-wire §1.1): the SNI a client must
/// send to reach `host:port` (optionally one subset) through an AUTO_PASSTHROUGH gateway.
/// No subset gives the literal `_._.` in the middle.
pub fn outbound_sni(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or(""))
}

/// The whole mesh: what [`crate::Mesh::start`] brings up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSpec {
    pub trust_domain: String,
    pub cluster_domain: String,
    pub services: Vec<ServiceSpec>,
}

impl MeshSpec {
    /// An empty mesh with Istio's default trust domain and cluster domain.
    pub fn new() -> Self {
        MeshSpec {
            trust_domain: TRUST_DOMAIN.to_string(),
            cluster_domain: CLUSTER_DOMAIN.to_string(),
            services: Vec::new(),
        }
    }

    /// Builder: add a service.
    pub fn service(mut self, service: ServiceSpec) -> Self {
        self.services.push(service);
        self
    }

    /// Builder: set the trust domain.
    pub fn trust_domain(mut self, trust_domain: &str) -> Self {
        self.trust_domain = trust_domain.to_string();
        self
    }

    /// Finds a pod by name with the service it belongs to.
    pub fn find_pod(&self, pod: &str) -> Option<(&ServiceSpec, &PodSpec)> {
        self.services
            .iter()
            .find_map(|s| s.pods.iter().find(|p| p.name == pod).map(|p| (s, p)))
    }

    /// The SPIFFE ID a pod's sidecar presents (depends on its [`PodIdentity`]).
    pub fn pod_spiffe_id(&self, pod: &str) -> Option<String> {
        let (svc, p) = self.find_pod(pod)?;
        Some(match &p.identity {
            PodIdentity::ServiceAccount | PodIdentity::ForeignCa => svc.spiffe_id(&self.trust_domain),
            PodIdentity::Other {
                namespace,
                service_account,
            } => spiffe_id(&self.trust_domain, namespace, service_account),
        })
    }

    /// Rejects specs the simulator cannot represent faithfully (duplicate pods, names that would
    /// make ambiguous SNI or SPIFFE strings), so a typo in a test fails loudly at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_dns_name("trust_domain", &self.trust_domain)?;
        check_dns_name("cluster_domain", &self.cluster_domain)?;
        let mut pods = HashSet::new();
        let mut host_ports = HashSet::new();
        for s in &self.services {
            check_label("service name", &s.name)?;
            check_label("namespace", &s.namespace)?;
            check_label("service account", &s.service_account)?;
            anyhow::ensure!(s.port != 0, "service {}: port 0", s.name);
            anyhow::ensure!(
                host_ports.insert((s.host(&self.cluster_domain), s.port)),
                "service {}.{} port {} declared twice",
                s.name,
                s.namespace,
                s.port
            );
            for p in &s.pods {
                check_label("pod name", &p.name)?;
                anyhow::ensure!(pods.insert(p.name.clone()), "duplicate pod name {}", p.name);
                if let Some(subset) = &p.subset {
                    check_label("subset", subset)?;
                }
                if let PodIdentity::Other {
                    namespace,
                    service_account,
                } = &p.identity
                {
                    check_label("namespace", namespace)?;
                    check_label("service account", service_account)?;
                }
            }
        }
        Ok(())
    }
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self::new()
    }
}

/// One Kubernetes Service (one port) with its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// The Service port (what the SNI carries), not the container port.
    pub port: u16,
    pub service_account: String,
    pub pods: Vec<PodSpec>,
    /// The port is declared TCP (`tcp-…` port name or `appProtocol: tcp`): every mTLS connection
    /// lands on the TCP chain (§2.3) and the app echoes bytes. Otherwise the port is HTTP.
    pub tcp: bool,
    /// Istio ambient: each pod also gets an HBONE endpoint (ztunnel's port 15008), and the mesh
    /// an ambient east-west gateway (see [`crate::hbone`]).
    pub ambient: bool,
    /// The echo app also serves the `bookstore.Bookstore` gRPC service (see [`crate::bookstore`]).
    pub bookstore: bool,
}

impl ServiceSpec {
    pub fn new(name: &str, namespace: &str, port: u16, service_account: &str) -> Self {
        ServiceSpec {
            name: name.to_string(),
            namespace: namespace.to_string(),
            port,
            service_account: service_account.to_string(),
            pods: Vec::new(),
            tcp: false,
            ambient: false,
            bookstore: false,
        }
    }

    /// Builder: the echo app also serves `bookstore.Bookstore` (gRPC-JSON transcoding tests).
    pub fn bookstore(mut self) -> Self {
        self.bookstore = true;
        self
    }

    /// Builder: put the service in ambient mode (HBONE endpoints for its pods).
    pub fn ambient(mut self) -> Self {
        self.ambient = true;
        self
    }

    /// Builder: declare the port TCP (a TCP echo app behind the sidecar's TCP chain).
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// Builder: add a pod.
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }

    /// `{name}.{namespace}.svc.{cluster_domain}`.
    pub fn host(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{cluster_domain}", self.name, self.namespace)
    }

    /// The service account's SPIFFE ID: what an Istio client expects the server to present.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }

    /// The AUTO_PASSTHROUGH SNI for this service (and optionally one subset).
    pub fn sni(&self, cluster_domain: &str, subset: Option<&str>) -> String {
        outbound_sni(self.port, subset, &self.host(cluster_domain))
    }

    /// Distinct subset names of the pods, sorted.
    pub fn subsets(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter_map(|p| p.subset.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

/// One pod (with its sidecar and echo app).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    /// DestinationRule subset this pod belongs to (e.g. `v1`).
    pub subset: Option<String>,
    /// Which certificate the sidecar presents.
    pub identity: PodIdentity,
    /// AuthorizationPolicy-like allow list in Istio principal form (`cluster.local/ns/x/sa/y`);
    /// `None` allows every mTLS peer.
    pub allowed_principals: Option<Vec<String>>,
}

/// Which certificate a pod's sidecar presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodIdentity {
    /// The service's own service account, issued by the mesh CA (the normal case).
    ServiceAccount,
    /// Issued by the mesh CA, but for another service account (a mis-deployed or hijacked pod).
    Other { namespace: String, service_account: String },
    /// The right SPIFFE ID, signed by a CA unrelated to the mesh root.
    ForeignCa,
}

impl PodSpec {
    pub fn new(name: &str) -> Self {
        PodSpec {
            name: name.to_string(),
            subset: None,
            identity: PodIdentity::ServiceAccount,
            allowed_principals: None,
        }
    }

    /// Builder: put the pod in a subset.
    pub fn subset(mut self, subset: &str) -> Self {
        self.subset = Some(subset.to_string());
        self
    }

    /// Builder: choose the certificate the sidecar presents.
    pub fn identity(mut self, identity: PodIdentity) -> Self {
        self.identity = identity;
        self
    }

    /// Builder: present a mesh-CA certificate for another service account.
    pub fn other_identity(self, namespace: &str, service_account: &str) -> Self {
        self.identity(PodIdentity::Other {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Builder: only these principals (`<td>/ns/<ns>/sa/<sa>`) may call this pod.
    pub fn allow<I, S>(mut self, principals: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_principals = Some(principals.into_iter().map(Into::into).collect());
        self
    }
}

/// A bookinfo-like mesh: `reviews` (v1 ×2, v2 ×1), `ratings` (×2), `details` (×1), all in
/// namespace `bookinfo` on port 9080, each with its own service account.
pub fn demo_spec() -> MeshSpec {
    MeshSpec::new()
        .service(
            ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews")
                .pod(PodSpec::new("reviews-v1-a").subset("v1"))
                .pod(PodSpec::new("reviews-v1-b").subset("v1"))
                .pod(PodSpec::new("reviews-v2-a").subset("v2")),
        )
        .service(
            ServiceSpec::new("ratings", "bookinfo", 9080, "bookinfo-ratings")
                .pod(PodSpec::new("ratings-a"))
                .pod(PodSpec::new("ratings-b")),
        )
        .service(ServiceSpec::new("details", "bookinfo", 9080, "bookinfo-details").pod(PodSpec::new("details-a")))
}

// Kubernetes names are DNS-1123 labels; refusing anything else keeps `_.` (the SNI separator)
// and `/` (the SPIFFE separator) out of names.
fn check_label(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    anyhow::ensure!(ok, "{what} {s:?} is not a DNS-1123 label");
    Ok(())
}

fn check_dns_name(what: &str, s: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!s.is_empty(), "{what} is empty");
    for label in s.split('.') {
        check_label(what, label)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_matches_reference_examples() {
        // Verbatim examples from istio-wire §0 and §1.1.
        assert_eq!(
            outbound_sni(8080, None, "reviews.default.svc.cluster.local"),
            "outbound_.8080_._.reviews.default.svc.cluster.local"
        );
        assert_eq!(
            outbound_sni(9080, Some("v1"), "reviews.default.svc.cluster.local"),
            "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
        );
    }

    #[test]
    fn demo_spec_is_valid_and_named_like_kubernetes() {
        let spec = demo_spec();
        spec.validate().unwrap();
        let reviews = &spec.services[0];
        assert_eq!(reviews.host(CLUSTER_DOMAIN), "reviews.bookinfo.svc.cluster.local");
        assert_eq!(reviews.subsets(), vec!["v1", "v2"]);
        assert_eq!(
            spec.pod_spiffe_id("reviews-v2-a").unwrap(),
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
        );
    }

    #[test]
    fn validate_rejects_duplicates_and_bad_names() {
        let dup = MeshSpec::new().service(
            ServiceSpec::new("a", "ns", 80, "sa")
                .pod(PodSpec::new("p"))
                .pod(PodSpec::new("p")),
        );
        assert!(dup.validate().is_err());
        let bad = MeshSpec::new().service(ServiceSpec::new("a_b", "ns", 80, "sa"));
        assert!(bad.validate().is_err());
        let bad_subset =
            MeshSpec::new().service(ServiceSpec::new("a", "ns", 80, "sa").pod(PodSpec::new("p").subset("v1_.x")));
        assert!(bad_subset.validate().is_err());
    }
}

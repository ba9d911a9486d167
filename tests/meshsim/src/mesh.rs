//! A running mesh: wires the CA, the sidecars and the gateway together from a [`MeshSpec`], and
//! owns every listener and task. Dropping a [`Mesh`] stops everything.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket};

use crate::ca::MeshCa;
use crate::gateway::{self, Backend, GatewayShared, Route};
use crate::sidecar::{self, PodInfo, SidecarTls};
use crate::spec::{MeshSpec, PodIdentity};
use crate::stats::{Changes, GatewayCounters, PodCounters, StatsSnapshot};
use crate::tasks::Service;

struct Pod {
    info: Arc<PodInfo>,
    backend: Arc<Backend>,
    service: Mutex<Option<Service>>,
}

/// The running mesh. All listeners are on 127.0.0.1 with kernel-chosen ports (ambient pods' HBONE
/// endpoints on 127.0.0.N, an address per pod).
pub struct Mesh {
    spec: MeshSpec,
    ca: MeshCa,
    foreign_ca: MeshCa,
    changes: Arc<Changes>,
    gateway: Arc<GatewayShared>,
    gateway_addr: SocketAddr,
    // Async lock: stop/start of the gateway serialise, and hold it across the awaits.
    gateway_service: tokio::sync::Mutex<Option<Service>>,
    pods: Vec<Pod>,
    ambient: crate::hbone::Ambient,
    /// The sidecars' Prometheus endpoint, once [`Mesh::serve_istio_metrics`] started it.
    istio_metrics: Mutex<Option<Service>>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("gateway_addr", &self.gateway_addr)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Issues every pod's certificate, starts every sidecar, then the gateway.
    pub async fn start(spec: MeshSpec) -> anyhow::Result<Mesh> {
        spec.validate()?;
        let ca = MeshCa::new(&spec.trust_domain)?;
        // Same trust domain, unrelated keys: what a pod signed by the wrong CA looks like.
        let foreign_ca = MeshCa::new(&spec.trust_domain)?;
        let changes = Arc::new(Changes::default());

        let mut pods = Vec::new();
        let mut ambient = crate::hbone::Ambient::default();
        let mut routes: HashMap<String, Vec<Arc<Backend>>> = HashMap::new();
        for svc in &spec.services {
            // Every service/port has a chain, even with no pods (the gateway then has no endpoint).
            routes.entry(svc.sni(&spec.cluster_domain, None)).or_default();
            for p in &svc.pods {
                let cert = match &p.identity {
                    PodIdentity::ServiceAccount => ca.issue(&svc.namespace, &svc.service_account)?,
                    PodIdentity::Other {
                        namespace,
                        service_account,
                    } => ca.issue(namespace, service_account)?,
                    PodIdentity::ForeignCa => foreign_ca.issue(&svc.namespace, &svc.service_account)?,
                };
                // The sidecar trusts the mesh root whatever certificate it presents itself.
                let tls =
                    SidecarTls::new(&cert, ca.root_der()).with_context(|| format!("pod {}: TLS config", p.name))?;
                let mut info = PodInfo::new(
                    &p.name,
                    &svc.name,
                    &svc.namespace,
                    p.subset.as_deref(),
                    cert.spiffe_id.clone(),
                    &svc.service_account,
                    p.allowed_principals.clone(),
                    PodCounters::new(&changes),
                    tls,
                )?;
                info.tcp = svc.tcp;
                info.bookstore = svc.bookstore;
                let info = Arc::new(info);
                if svc.ambient {
                    ambient.add_pod(&spec, svc, info.clone(), &cert, ca.root_der()).await?;
                }
                let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
                let addr = listener.local_addr()?;
                let backend = Arc::new(Backend::new(&p.name, addr));
                let service = spawn_sidecar(listener, info.clone());
                routes
                    .entry(svc.sni(&spec.cluster_domain, None))
                    .or_default()
                    .push(backend.clone());
                if let Some(subset) = &p.subset {
                    routes
                        .entry(svc.sni(&spec.cluster_domain, Some(subset)))
                        .or_default()
                        .push(backend.clone());
                }
                pods.push(Pod {
                    info,
                    backend,
                    service: Mutex::new(Some(service)),
                });
            }
        }

        let gateway = Arc::new(GatewayShared {
            routes: routes
                .into_iter()
                .map(|(sni, backends)| (sni, Route::new(backends)))
                .collect(),
            counters: GatewayCounters::new(&changes),
        });
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let gateway_addr = listener.local_addr()?;
        let service = spawn_gateway(listener, gateway.clone());
        ambient.start_gateway(&spec, &ca).await?;
        Ok(Mesh {
            spec,
            ca,
            foreign_ca,
            changes,
            gateway,
            gateway_addr,
            gateway_service: tokio::sync::Mutex::new(Some(service)),
            pods,
            ambient,
            istio_metrics: Mutex::new(None),
        })
    }

    /// The AUTO_PASSTHROUGH gateway (what would be port 15443).
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway_addr
    }

    /// Istio ambient: the HBONE endpoints of ambient services' pods and the ambient gateway.
    pub fn ambient(&self) -> &crate::hbone::Ambient {
        &self.ambient
    }

    /// A pod's HBONE endpoint (ztunnel's `POD_IP:15008`), if its service is ambient.
    pub fn hbone_addr(&self, pod: &str) -> Option<SocketAddr> {
        self.ambient.hbone_addr(pod)
    }

    /// The ambient east-west gateway (`:15008`), if any service is ambient.
    pub fn ambient_gateway_addr(&self) -> Option<SocketAddr> {
        self.ambient.gateway_addr()
    }

    /// The mesh CA: its root is the trust bundle; issue client identities from it.
    pub fn ca(&self) -> &MeshCa {
        &self.ca
    }

    /// The unrelated CA that signs `PodIdentity::ForeignCa` pods.
    pub fn foreign_ca(&self) -> &MeshCa {
        &self.foreign_ca
    }

    pub fn spec(&self) -> &MeshSpec {
        &self.spec
    }

    /// A pod's sidecar listener (bypassing the gateway), if the pod exists.
    pub fn sidecar_addr(&self, pod: &str) -> Option<SocketAddr> {
        self.pod(pod).map(|p| p.backend.addr)
    }

    /// The SPIFFE ID a pod's sidecar presents.
    pub fn pod_spiffe_id(&self, pod: &str) -> Option<String> {
        self.pod(pod).and_then(|p| p.info.spiffe_id.clone())
    }

    pub fn stats(&self) -> StatsSnapshot {
        let c = &self.gateway.counters;
        StatsSnapshot {
            gateway_accepted: c.accepted.get(),
            gateway_routed: c.routed.get(),
            gateway_refused: c.refused.get(),
            gateway_upstream_failures: c.upstream_failures.get(),
            pods: self
                .pods
                .iter()
                .map(|p| (p.info.name.clone(), p.info.counters.snapshot()))
                .collect(),
        }
    }

    /// Waits until `pred` holds for the stats, or `timeout` passes. Returns the last snapshot
    /// either way (`Err` on timeout), so a failing test can print it.
    pub async fn wait_for_stats(
        &self,
        timeout: Duration,
        pred: impl Fn(&StatsSnapshot) -> bool,
    ) -> Result<StatsSnapshot, StatsSnapshot> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before looking, so a change between the check and the wait
            // is not missed.
            let notified = self.changes.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let snap = self.stats();
            if pred(&snap) {
                return Ok(snap);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.stats());
            }
        }
    }

    /// Stops accepting (new connections are refused) and closes every connection the gateway
    /// holds. Returns once the listening socket is closed.
    pub async fn stop_gateway(&self) {
        let mut svc = self.gateway_service.lock().await;
        if let Some(s) = svc.take() {
            s.stop().await;
        }
    }

    /// Listens again on the same address. A no-op if the gateway is running.
    pub async fn start_gateway(&self) -> anyhow::Result<()> {
        let mut svc = self.gateway_service.lock().await;
        if svc.is_some() {
            return Ok(());
        }
        let socket = TcpSocket::new_v4()?;
        // Connections of the previous listener may linger in TIME_WAIT on this port.
        socket.set_reuseaddr(true)?;
        socket
            .bind(self.gateway_addr)
            .with_context(|| format!("rebinding gateway on {}", self.gateway_addr))?;
        let listener = socket.listen(1024)?;
        *svc = Some(spawn_gateway(listener, self.gateway.clone()));
        Ok(())
    }

    /// Stops a pod: the gateway stops routing to it, its sidecar stops listening and closes its
    /// connections. Unknown names are ignored.
    pub async fn stop_pod(&self, pod: &str) {
        let Some(p) = self.pod(pod) else { return };
        // Out of the endpoint set first, so no new connection is routed to a dying pod.
        p.backend.alive.store(false, std::sync::atomic::Ordering::SeqCst);
        let svc = p.service.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = svc {
            s.stop().await;
        }
    }

    /// Asks a pod's open connections to go away, as an Envoy drain does: HTTP/2 gets GOAWAY
    /// (in-flight streams finish), HTTP/1.1 closes after the in-flight response. The pod keeps
    /// accepting new connections. Unknown names are ignored.
    pub fn goaway_pod(&self, pod: &str) {
        if let Some(p) = self.pod(pod) {
            p.info.goaway.send_modify(|generation| *generation += 1);
        }
    }

    /// What the sidecars' stats filters would export (destination reporter), in the Prometheus
    /// text format: `istio_requests_total` for HTTP pods, `istio_tcp_connections_opened_total`
    /// for TCP ones, with the `source_*` labels taken from peer metadata as [`crate::peer`]
    /// decodes it.
    pub fn istio_metrics(&self) -> String {
        let pods: Vec<Arc<PodInfo>> = self.pods.iter().map(|p| p.info.clone()).collect();
        istio_metrics_text(&pods)
    }

    /// Serves [`Mesh::istio_metrics`] at `GET /stats/prometheus` (any path) on a loopback port,
    /// for a Prometheus server to scrape like a mesh's sidecars.
    pub async fn serve_istio_metrics(&self) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let pods: Arc<Vec<Arc<PodInfo>>> = Arc::new(self.pods.iter().map(|p| p.info.clone()).collect());
        let service = Service::spawn(listener, move |stream, _| {
            let pods = pods.clone();
            async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let text = istio_metrics_text(&pods);
                    async move {
                        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            }
        });
        *self.istio_metrics.lock().unwrap_or_else(|e| e.into_inner()) = Some(service);
        Ok(addr)
    }

    fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.info.name == name)
    }
}

fn istio_metrics_text(pods: &[Arc<PodInfo>]) -> String {
    fn esc(v: &str) -> String {
        v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    }
    let mut http = String::new();
    let mut tcp = String::new();
    for pod in pods {
        for (src, n) in pod.counters.snapshot().sources {
            let line = format!(
                "{{reporter=\"destination\",source_workload=\"{}\",source_workload_namespace=\"{}\",source_app=\"{}\",source_version=\"{}\",source_canonical_service=\"{}\",source_canonical_revision=\"{}\",source_cluster=\"{}\",source_principal=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_canonical_service=\"{}\",destination_service_name=\"{}\"}} {n}\n",
                esc(&src.workload),
                esc(&src.namespace),
                esc(&src.app),
                esc(&src.version),
                esc(&src.canonical_service),
                esc(&src.canonical_revision),
                esc(&src.cluster),
                esc(&src.principal),
                esc(&pod.service),
                esc(&pod.namespace),
                esc(&pod.service),
                esc(&pod.service),
            );
            if pod.tcp {
                tcp.push_str("istio_tcp_connections_opened_total");
                tcp.push_str(&line);
            } else {
                http.push_str("istio_requests_total");
                http.push_str(&line);
            }
        }
    }
    format!("# TYPE istio_requests_total counter\n{http}# TYPE istio_tcp_connections_opened_total counter\n{tcp}")
}

fn spawn_gateway(listener: TcpListener, gw: Arc<GatewayShared>) -> Service {
    Service::spawn(listener, move |stream, peer| {
        gateway::serve_connection(gw.clone(), stream, peer)
    })
}

fn spawn_sidecar(listener: TcpListener, pod: Arc<PodInfo>) -> Service {
    Service::spawn(listener, move |stream, peer| {
        sidecar::serve_connection(pod.clone(), stream, peer)
    })
}

//! The VM backends of one `vm_service`: which one takes the next request (round robin or least
//! requests over the healthy, not ejected ones), active health checks, and passive ejection
//! after consecutive failures (Envoy's outlier detection). State is atomics per backend, so
//! picking is lock-free; a backend set is carried across reloads that leave it unchanged, so
//! its health is not forgotten.
//!
//! When no backend is healthy, all of them are candidates again (Envoy's panic mode): a health
//! check that is wrong, or a network blip that failed every check, should not turn a working
//! service into certain failure.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use crate::config::schema::HostPort;
use crate::config::{LoadBalancing, UpstreamProtocol, VmService};
use crate::metrics::{BackendLabels, Metrics};

pub struct Backend {
    pub addr: HostPort,
    /// As the active health check last concluded (true when there is none).
    healthy: AtomicBool,
    hc_streak_ok: AtomicU32,
    hc_streak_fail: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Milliseconds on the lifecycle clock until which the backend is ejected (0: not).
    ejected_until: AtomicU64,
    /// Requests in flight (least-requests balancing).
    pub active: AtomicUsize,
}

impl Backend {
    fn usable(&self, now_ms: u64) -> bool {
        self.healthy.load(Relaxed) && self.ejected_until.load(Relaxed) <= now_ms
    }
}

pub struct Backends {
    pub service: Arc<VmService>,
    pub members: Vec<Backend>,
    next: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Backends {
    pub fn new(service: Arc<VmService>, metrics: Arc<Metrics>) -> Arc<Backends> {
        let members = service
            .backends
            .iter()
            .map(|addr| Backend {
                addr: addr.clone(),
                healthy: AtomicBool::new(true),
                hc_streak_ok: AtomicU32::new(0),
                hc_streak_fail: AtomicU32::new(0),
                consecutive_failures: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
                active: AtomicUsize::new(0),
            })
            .collect();
        let b = Arc::new(Backends {
            service,
            members,
            next: AtomicUsize::new(0),
            metrics,
        });
        for m in &b.members {
            b.gauge(m).set(1);
        }
        if b.service.health_check.is_some() {
            tokio::spawn(health_checks(Arc::downgrade(&b)));
        }
        b
    }

    /// Whether this set can serve `service` as configured now (same backends and settings).
    pub fn serves(&self, service: &VmService) -> bool {
        let a = &*self.service;
        a.name == service.name
            && a.backends == service.backends
            && a.protocol == service.protocol
            && a.health_check == service.health_check
            && a.outlier == service.outlier
            && a.connect_timeout == service.connect_timeout
    }

    /// Removes this set's backends from `meshgate_vm_backend_healthy` unless `kept` says the
    /// new config still has them (a reload dropped the rest).
    pub fn forget_gauges(&self, kept: impl Fn(&str, &HostPort) -> bool) {
        for b in self.members.iter().filter(|b| !kept(&self.service.name, &b.addr)) {
            self.metrics.vm_backend_healthy.remove(&BackendLabels {
                service: self.service.name.clone(),
                backend: b.addr.to_string(),
            });
        }
    }

    fn gauge(&self, b: &Backend) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .vm_backend_healthy
            .get_or_create(&BackendLabels {
                service: self.service.name.clone(),
                backend: b.addr.to_string(),
            })
            .clone()
    }

    /// The backend for the next attempt, skipping `tried` (indices already attempted).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = crate::lifecycle::millis();
        let fresh = |i: &usize| !tried.contains(i);
        let mut candidates: Vec<usize> = (0..self.members.len())
            .filter(fresh)
            .filter(|i| self.members[*i].usable(now))
            .collect();
        if candidates.is_empty() && !(0..self.members.len()).any(|i| self.members[i].usable(now)) {
            candidates = (0..self.members.len()).filter(fresh).collect();
        }
        if candidates.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Relaxed);
        Some(match self.service.load_balancing {
            LoadBalancing::RoundRobin => candidates[turn % candidates.len()],
            // Fewest in flight; ties go round robin so equal backends share the load.
            LoadBalancing::LeastRequests => {
                let least = candidates
                    .iter()
                    .map(|i| self.members[*i].active.load(Relaxed))
                    .min()
                    .unwrap_or(0);
                let tied: Vec<usize> = candidates
                    .into_iter()
                    .filter(|i| self.members[*i].active.load(Relaxed) == least)
                    .collect();
                tied[turn % tied.len()]
            }
        })
    }

    /// The outcome of a request or connection to backend `i`: consecutive failures eject it.
    pub fn record(&self, i: usize, ok: bool) {
        let b = &self.members[i];
        if ok {
            b.consecutive_failures.store(0, Relaxed);
            return;
        }
        let n = b.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let o = &self.service.outlier;
        if n >= o.consecutive_failures {
            b.consecutive_failures.store(0, Relaxed);
            let until = crate::lifecycle::millis() + o.ejection_time.as_millis() as u64;
            b.ejected_until.store(until, Relaxed);
            tracing::warn!(service = %self.service.name, backend = %b.addr, failures = n, ejection = ?o.ejection_time, "VM backend ejected");
            self.metrics
                .vm_backend_ejections
                .get_or_create(&BackendLabels {
                    service: self.service.name.clone(),
                    backend: b.addr.to_string(),
                })
                .inc();
            self.gauge(b).set(0);
        }
    }

    /// Refreshes the health gauges (an ejection ends by time, not by an event).
    pub fn refresh_gauges(&self) {
        let now = crate::lifecycle::millis();
        for b in &self.members {
            self.gauge(b).set(i64::from(b.usable(now)));
        }
    }

    fn health_result(&self, i: usize, ok: bool) {
        let Some(hc) = &self.service.health_check else { return };
        let b = &self.members[i];
        if ok {
            b.hc_streak_fail.store(0, Relaxed);
            let n = b.hc_streak_ok.fetch_add(1, Relaxed) + 1;
            if n >= hc.healthy_threshold && !b.healthy.swap(true, Relaxed) {
                tracing::info!(service = %self.service.name, backend = %b.addr, "VM backend healthy again");
            }
        } else {
            b.hc_streak_ok.store(0, Relaxed);
            let n = b.hc_streak_fail.fetch_add(1, Relaxed) + 1;
            if n >= hc.unhealthy_threshold && b.healthy.swap(false, Relaxed) {
                tracing::warn!(service = %self.service.name, backend = %b.addr, "VM backend failed its health check");
            }
        }
        self.refresh_gauges();
    }
}

/// Checks every backend each interval until the set is dropped (a reload that changed it).
async fn health_checks(set: Weak<Backends>) {
    loop {
        let Some(b) = set.upgrade() else { return };
        let hc = b
            .service
            .health_check
            .clone()
            .expect("spawned only with a health check");
        let checks = (0..b.members.len()).map(|i| {
            let b = b.clone();
            let hc = hc.clone();
            async move {
                let ok = tokio::time::timeout(
                    hc.timeout,
                    check_one(&b.members[i].addr, b.service.protocol, hc.path.as_deref()),
                )
                .await
                .unwrap_or(false);
                b.health_result(i, ok);
            }
        });
        futures_join_all(checks).await;
        drop(b);
        tokio::time::sleep(hc.interval).await;
    }
}

/// Runs futures to completion together (a handful of backends: no need for a dependency).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(fs: impl Iterator<Item = F>) {
    let mut set = tokio::task::JoinSet::new();
    for f in fs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

/// One check: a TCP connect, then for HTTP services with a path `GET path` answered 2xx.
async fn check_one(addr: &HostPort, protocol: UpstreamProtocol, path: Option<&str>) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect((addr.host.as_str(), addr.port)).await else {
        return false;
    };
    let Some(path) = path else { return true };
    let io = hyper_util::rt::TokioIo::new(stream);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "meshgate-health-check")
        .body(http_body_util::Empty::<bytes::Bytes>::new());
    let Ok(req) = req else { return false };
    let status = if protocol == UpstreamProtocol::Http2 {
        let Ok((mut s, conn)) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await
        else {
            return false;
        };
        tokio::spawn(conn);
        s.send_request(req).await.map(|r| r.status())
    } else {
        let Ok((mut s, conn)) = hyper::client::conn::http1::handshake(io).await else {
            return false;
        };
        tokio::spawn(conn);
        s.send_request(req).await.map(|r| r.status())
    };
    status.is_ok_and(|s| s.is_success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::inbound::{Outlier, VmService};
    use std::time::Duration;

    fn service(lb: LoadBalancing, n: usize) -> Arc<VmService> {
        Arc::new(VmService {
            id: 0,
            name: "billing".into(),
            hosts: vec!["billing.vms.internal".into()],
            port: 8080,
            protocol: UpstreamProtocol::Http1,
            backends: (0..n)
                .map(|i| HostPort {
                    host: format!("10.0.0.{i}"),
                    port: 8080,
                })
                .collect(),
            load_balancing: lb,
            allow: vec![],
            health_check: None,
            outlier: Outlier {
                consecutive_failures: 2,
                ejection_time: Duration::from_secs(60),
            },
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
    }

    #[tokio::test]
    async fn round_robin_skips_tried_and_ejected_backends() {
        let b = Backends::new(service(LoadBalancing::RoundRobin, 3), Arc::new(Metrics::new()));
        let picks: Vec<usize> = (0..6).map(|_| b.pick(&[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // A failover attempt never goes back to a backend it tried.
        assert_eq!(b.pick(&[0, 1]), Some(2));
        assert_eq!(b.pick(&[0, 1, 2]), None);
        // Two failures in a row eject backend 1; a success in between resets the count.
        b.record(1, false);
        b.record(1, true);
        b.record(1, false);
        assert!((0..6).map(|_| b.pick(&[]).unwrap()).any(|i| i == 1));
        b.record(1, false);
        assert!((0..6).map(|_| b.pick(&[]).unwrap()).all(|i| i != 1));
        // Every backend out: all are candidates again (panic mode).
        b.record(0, false);
        b.record(0, false);
        b.record(2, false);
        b.record(2, false);
        assert!(b.pick(&[]).is_some());
    }

    #[tokio::test]
    async fn least_requests_prefers_the_idle_backend() {
        let b = Backends::new(service(LoadBalancing::LeastRequests, 3), Arc::new(Metrics::new()));
        b.members[0].active.store(3, Relaxed);
        b.members[2].active.store(1, Relaxed);
        assert_eq!(b.pick(&[]), Some(1));
        assert_eq!(b.pick(&[1]), Some(2));
    }
}

//! The east-west gateway's addresses. A DNS name may resolve to several addresses (one per LB
//! node or zone); connections go to them round robin, and the name is resolved again
//! periodically so a scaled or replaced LB is followed without a restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::{GatewayTarget, HostPort};

/// Consecutive connect failures after which an address is ejected.
const EJECT_AFTER: u32 = 3;
const EJECT_BASE: Duration = Duration::from_secs(5);
const EJECT_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Gateway {
    target: GatewayTarget,
    addrs: RwLock<Arc<Vec<SocketAddr>>>,
    next: AtomicUsize,
    /// Outlier detection: an address that keeps refusing connections is skipped for a while
    /// (doubling each time), then tried again by the next dial — that dial is the probe.
    health: Mutex<HashMap<SocketAddr, Health>>,
}

impl Gateway {
    pub fn new(target: GatewayTarget) -> Arc<Gateway> {
        // IP literals need no DNS; knowing them now lets the first request go straight out.
        let initial: Vec<SocketAddr> = target
            .0
            .iter()
            .filter_map(|hp| {
                hp.host
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, hp.port))
            })
            .collect();
        Arc::new(Gateway {
            target,
            addrs: RwLock::new(Arc::new(initial)),
            next: AtomicUsize::new(0),
            health: Mutex::new(HashMap::new()),
        })
    }

    pub fn target(&self) -> &GatewayTarget {
        &self.target
    }

    pub fn addrs(&self) -> Arc<Vec<SocketAddr>> {
        self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The next address, round robin, skipping ejected ones (unless all are ejected: then any
    /// address beats none).
    pub fn pick(&self) -> Option<SocketAddr> {
        self.pick_at(Instant::now())
    }

    fn pick_at(&self, now: Instant) -> Option<SocketAddr> {
        let addrs = self.addrs();
        if addrs.is_empty() {
            return None;
        }
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let usable = |a: &SocketAddr| {
            health
                .get(a)
                .and_then(|h| h.ejected_until)
                .is_none_or(|until| now >= until)
        };
        (0..addrs.len())
            .map(|i| addrs[(start + i) % addrs.len()])
            .find(usable)
            .or(Some(addrs[start % addrs.len()]))
    }

    /// Records the outcome of a connection attempt to `addr`.
    pub fn record(&self, addr: SocketAddr, ok: bool) {
        self.record_at(addr, ok, Instant::now());
    }

    fn record_at(&self, addr: SocketAddr, ok: bool, now: Instant) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let h = health.entry(addr).or_default();
        if ok {
            *h = Health::default();
            return;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures >= EJECT_AFTER && h.ejected_until.is_none_or(|u| now >= u) {
            let backoff = EJECT_BASE.saturating_mul(1 << h.ejections.min(6)).min(EJECT_MAX);
            h.ejections += 1;
            h.ejected_until = Some(now + backoff);
            tracing::warn!(gateway = %self.target, %addr, ?backoff, "gateway address ejected after consecutive connect failures");
        }
    }

    /// Replaces the known addresses (tests: stale addresses a resolution must replace).
    #[cfg(test)]
    pub(crate) fn set_addrs(&self, addrs: Vec<SocketAddr>) {
        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(addrs);
    }

    /// Addresses currently ejected.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health
            .iter()
            .filter(|(_, h)| h.ejected_until.is_some_and(|u| now < u))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Resolves the name once. On failure the previous addresses are kept: a DNS hiccup must not
    /// take the gateway away from a running fleet.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        let mut found: Vec<SocketAddr> = Vec::new();
        let mut last_err = None;
        for hp in &self.target.0 {
            match resolve_one(hp).await {
                Ok(a) => found.extend(a),
                Err(e) => last_err = Some(e),
            }
        }
        found.sort();
        found.dedup();
        if found.is_empty() {
            return Err(last_err.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "name resolved to no addresses")
            }));
        }
        let n = found.len();
        let mut guard = self.addrs.write().unwrap_or_else(|e| e.into_inner());
        if **guard != found {
            tracing::info!(gateway = %self.target, addrs = ?found, "gateway addresses updated");
            *guard = Arc::new(found);
        }
        Ok(n)
    }

    /// Re-resolves every `interval` until the task is aborted.
    pub async fn refresh_loop(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.resolve().await {
                tracing::warn!(gateway = %self.target, error = %e, "resolving gateway failed; keeping previous addresses");
            }
        }
    }
}

async fn resolve_one(hp: &HostPort) -> std::io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = hp.host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, hp.port)]);
    }
    let lookup = tokio::net::lookup_host((hp.host.as_str(), hp.port));
    Ok(tokio::time::timeout(Duration::from_secs(10), lookup)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out"))??
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literal_is_known_without_dns() {
        let g = Gateway::new(GatewayTarget(vec![HostPort {
            host: "127.0.0.1".into(),
            port: 15443,
        }]));
        assert_eq!(g.pick(), Some("127.0.0.1:15443".parse().unwrap()));
    }

    fn two() -> Arc<Gateway> {
        let g = Gateway::new(GatewayTarget(vec![HostPort {
            host: "gw.test".into(),
            port: 15443,
        }]));
        *g.addrs.write().unwrap() = Arc::new(vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.2:1".parse().unwrap()]);
        g
    }

    #[test]
    fn failing_address_is_ejected_then_probed_back() {
        let g = two();
        let bad: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let good: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..EJECT_AFTER - 1 {
            g.record_at(bad, false, t0);
        }
        // Not yet: both still picked.
        let picks: std::collections::HashSet<_> = (0..4).filter_map(|_| g.pick_at(t0)).collect();
        assert_eq!(picks.len(), 2);
        g.record_at(bad, false, t0);
        for _ in 0..6 {
            assert_eq!(g.pick_at(t0), Some(good));
        }
        // After the backoff the address is tried again; one more failure ejects it for longer.
        let t1 = t0 + EJECT_BASE;
        assert!((0..4).filter_map(|_| g.pick_at(t1)).any(|a| a == bad));
        g.record_at(bad, false, t1);
        assert!(
            (0..4).all(|_| g.pick_at(t1 + EJECT_BASE) == Some(good)),
            "second ejection must last longer"
        );
        // A success clears the record.
        g.record_at(bad, true, t1);
        assert!((0..4).filter_map(|_| g.pick_at(t1)).any(|a| a == bad));
    }

    #[test]
    fn all_ejected_still_picks_something() {
        let g = two();
        let t0 = Instant::now();
        for a in g.addrs().iter() {
            for _ in 0..EJECT_AFTER {
                g.record_at(*a, false, t0);
            }
        }
        assert!(g.pick_at(t0).is_some());
    }

    #[tokio::test]
    async fn localhost_resolves_and_round_robins() {
        let g = Gateway::new(GatewayTarget(vec![HostPort {
            host: "localhost".into(),
            port: 15443,
        }]));
        assert_eq!(g.pick(), None);
        let n = g.resolve().await.unwrap();
        assert!(n >= 1);
        let picks: std::collections::HashSet<_> = (0..n * 2).filter_map(|_| g.pick()).collect();
        assert_eq!(picks.len(), n);
    }
}

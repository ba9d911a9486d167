//! The east-west gateway's addresses. A DNS name may resolve to several addresses (one per LB
//! node or zone); connections go to them round robin, and the name is resolved again
//! periodically so a scaled or replaced LB is followed without a restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::HostPort;

#[derive(Debug)]
pub struct Gateway {
    target: HostPort,
    addrs: RwLock<Arc<Vec<SocketAddr>>>,
    next: AtomicUsize,
}

impl Gateway {
    pub fn new(target: HostPort) -> Arc<Gateway> {
        // An IP literal needs no DNS; knowing it now lets the first request go straight out.
        let initial = match target.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => Vec::new(),
        };
        Arc::new(Gateway {
            target,
            addrs: RwLock::new(Arc::new(initial)),
            next: AtomicUsize::new(0),
        })
    }

    pub fn target(&self) -> &HostPort {
        &self.target
    }

    pub fn addrs(&self) -> Arc<Vec<SocketAddr>> {
        self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The next address, round robin.
    pub fn pick(&self) -> Option<SocketAddr> {
        let addrs = self.addrs();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(addrs[i % addrs.len()])
    }

    /// Resolves the name once. On failure the previous addresses are kept: a DNS hiccup must not
    /// take the gateway away from a running fleet.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        if self.target.host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(1);
        }
        let lookup = tokio::net::lookup_host((self.target.host.as_str(), self.target.port));
        let mut found: Vec<SocketAddr> = tokio::time::timeout(Duration::from_secs(10), lookup)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out"))??
            .collect();
        found.sort();
        found.dedup();
        if found.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "name resolved to no addresses",
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literal_is_known_without_dns() {
        let g = Gateway::new(HostPort {
            host: "127.0.0.1".into(),
            port: 15443,
        });
        assert_eq!(g.pick(), Some("127.0.0.1:15443".parse().unwrap()));
    }

    #[tokio::test]
    async fn localhost_resolves_and_round_robins() {
        let g = Gateway::new(HostPort {
            host: "localhost".into(),
            port: 15443,
        });
        assert_eq!(g.pick(), None);
        let n = g.resolve().await.unwrap();
        assert!(n >= 1);
        let picks: std::collections::HashSet<_> = (0..n * 2).filter_map(|_| g.pick()).collect();
        assert_eq!(picks.len(), n);
    }
}

//! The one place that wires everything: from a validated snapshot to bound listeners and
//! background tasks. Returns the bound addresses (tests use port 0) and a shutdown handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Snapshot;
use crate::forward::Proxy;
use crate::metrics::Metrics;
use crate::upstream::{Gateway, Upstream};

/// How long in-flight requests get to finish after shutdown is requested.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

pub struct Bound {
    /// (listener name, bound address), in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub proxy: Arc<Proxy>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    background: JoinSet<()>,
}

impl Bound {
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    /// The first listener's address (most configs have one).
    pub fn first_addr(&self) -> SocketAddr {
        self.listeners[0].1
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain deadline), stops tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.background.shutdown().await;
    }

    /// Resolves when every listener task has ended (e.g. after a shutdown from elsewhere).
    pub async fn wait(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

pub async fn start(snapshot: Snapshot) -> anyhow::Result<Bound> {
    let snapshot = Arc::new(snapshot);
    let gateway = Gateway::new(snapshot.gateway.clone());
    if let Err(e) = gateway.resolve().await {
        // Not fatal: the gateway may come up after us. Requests get 503 until it resolves.
        tracing::warn!(gateway = %snapshot.gateway, error = %e, "cannot resolve gateway yet; will retry");
    }
    let upstream = Arc::new(Upstream::new(&snapshot, gateway.clone()));
    let metrics = Arc::new(Metrics::new());
    let proxy = Arc::new(Proxy {
        snapshot: snapshot.clone(),
        upstream: upstream.clone(),
        metrics,
    });

    let mut background = JoinSet::new();
    background.spawn(gateway.refresh_loop(snapshot.gateway_refresh));
    let sweeper = upstream.clone();
    background.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            sweeper.sweep();
        }
    });

    let (shutdown, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut listeners = Vec::new();
    for l in &snapshot.listeners {
        let tcp = TcpListener::bind(l.bind)
            .await
            .with_context(|| format!("listener {:?}: cannot bind {}", l.name, l.bind))?;
        let addr = tcp.local_addr()?;
        tracing::info!(listener = %l.name, %addr, "listening");
        listeners.push((l.name.clone(), addr));
        tasks.spawn(crate::listener::http::serve(
            tcp,
            Arc::from(l.name.as_str()),
            proxy.clone(),
            rx.clone(),
            DRAIN_DEADLINE,
        ));
    }
    Ok(Bound {
        listeners,
        proxy,
        shutdown,
        tasks,
        background,
    })
}

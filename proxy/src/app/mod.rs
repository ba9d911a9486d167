//! The one place that wires everything: from a validated snapshot to the [`Runtime`] handle,
//! bound listeners, the admin server and background tasks. Returns the bound addresses (tests
//! use port 0) and a shutdown handle. Only `main.rs` and `demo.rs` use it; everything that
//! serves traffic holds the `Runtime`, and the admin API reaches the operations here through
//! [`Control`].
//!
//! The operations on a running instance live beside it: `reload.rs` (config reloads and the
//! file watcher), `identity.rs` (certificate rotation, issuance, renewal and the readiness they
//! decide). Reloads are serialized by `reload_lock`, changes to listeners by `state`.

mod identity;
mod reload;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::{self, ConfigError, ConfigErrors, Snapshot};
use crate::lifecycle::ListenerState;
use crate::metrics::Metrics;
use crate::runtime::{BoxFuture, Control, Generation, Runtime};
use crate::upstream::{Gateway, Upstream};
use identity::{identity_metrics, obtain_identities, record_renewal_metrics, IdentityWatch, Renewal, START_ATTEMPTS};

pub use identity::MISMATCH_POLLS;

struct RunningListener {
    name: String,
    bind: SocketAddr,
    protocol: config::ListenerProtocol,
    addr: SocketAddr,
    close: watch::Sender<ListenerState>,
    task: JoinHandle<()>,
}

struct State {
    listeners: Vec<RunningListener>,
    gateway_refresh: AbortHandle,
}

pub struct App {
    config_path: PathBuf,
    runtime: Arc<Runtime>,
    /// Per identity, by its certificate path.
    identity_watch: std::sync::Mutex<HashMap<std::path::PathBuf, IdentityWatch>>,
    renewals: std::sync::Mutex<Vec<Renewal>>,
    reload_lock: Mutex<()>,
    state: Mutex<State>,
    background: std::sync::Mutex<JoinSet<()>>,
    drained: watch::Sender<bool>,
}

/// What `start` hands back: addresses and the running app.
pub struct Bound {
    pub app: Arc<App>,
    /// (listener name, bound address) at start, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
}

impl Bound {
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(n, _)| n == listener).map(|(_, a)| *a)
    }

    /// The first listener's address (most configs have one).
    pub fn first_addr(&self) -> SocketAddr {
        self.listeners[0].1
    }

    /// Drains (readiness off, wait `drain.delay`, close connections gradually) and stops.
    pub async fn shutdown(self) {
        self.app.drain().await;
        self.app.stop_background();
    }

    /// Stops at once: listeners close, in-flight requests are cut. For tests and the demo.
    pub async fn abort(self) {
        self.app.close_listeners(Duration::ZERO, Duration::ZERO).await;
        self.app.stop_background();
    }
}

fn bind_error(path: &std::path::Path, msg: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: path.to_owned(),
        line: None,
        message: msg,
    }])
}

/// A bound listener socket: TCP for http and tcp listeners, UDP for h3 (QUIC).
enum Socket {
    Tcp(TcpListener),
    Udp(std::net::UdpSocket),
}

async fn bind(l: &config::Listener) -> Result<Socket, String> {
    let err = |e: std::io::Error| format!("listener {:?}: cannot bind {}: {e}", l.name, l.bind);
    if l.protocol == config::ListenerProtocol::H3 {
        let udp = std::net::UdpSocket::bind(l.bind).map_err(err)?;
        udp.set_nonblocking(true).map_err(err)?;
        return Ok(Socket::Udp(udp));
    }
    TcpListener::bind(l.bind).await.map(Socket::Tcp).map_err(err)
}

impl App {
    /// The shared handle listeners, the pipeline and the admin API hold.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The metrics registry (also reachable through the runtime).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.runtime.metrics
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Listener name → bound address, as running now.
    pub async fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.state
            .lock()
            .await
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.addr))
            .collect()
    }

    fn spawn_listener(self: &Arc<Self>, l: &config::Listener, socket: Socket) -> RunningListener {
        let addr = match &socket {
            Socket::Tcp(t) => t.local_addr(),
            Socket::Udp(u) => u.local_addr(),
        }
        .unwrap_or(l.bind);
        tracing::info!(listener = %l.name, %addr, protocol = ?l.protocol, "listening");
        let (close, rx) = watch::channel(ListenerState::Serving);
        let name = Arc::from(l.name.as_str());
        let task = match (l.protocol, socket) {
            (config::ListenerProtocol::Tcp, Socket::Tcp(tcp)) => {
                tokio::spawn(crate::listener::tcp::serve(tcp, name, self.runtime.clone(), rx))
            }
            (config::ListenerProtocol::MeshInbound, Socket::Tcp(tcp)) => {
                tokio::spawn(crate::inbound::serve(tcp, name, self.runtime.clone(), rx))
            }
            (_, Socket::Tcp(tcp)) => tokio::spawn(crate::listener::http::serve(tcp, name, self.runtime.clone(), rx)),
            (_, Socket::Udp(udp)) => tokio::spawn(crate::listener::h3::serve(udp, name, self.runtime.clone(), rx)),
        };
        RunningListener {
            name: l.name.clone(),
            bind: l.bind,
            protocol: l.protocol,
            addr,
            close,
            task,
        }
    }

    async fn close_listeners(&self, spread: Duration, timeout: Duration) {
        let mut state = self.state.lock().await;
        let deadline = Instant::now() + timeout;
        // Taken out of the state: a listener is closed and awaited once, however often this runs.
        let listeners: Vec<RunningListener> = state.listeners.drain(..).collect();
        for l in &listeners {
            let _ = l.close.send(ListenerState::Closing { spread, deadline });
        }
        for mut l in listeners {
            // The listener cuts its own connections at the deadline; this bound is a backstop.
            if tokio::time::timeout_at(deadline + Duration::from_secs(1), &mut l.task)
                .await
                .is_err()
            {
                l.task.abort();
            }
        }
    }

    /// The graceful drain. Idempotent: a second call waits for the first to finish.
    pub async fn drain(self: &Arc<Self>) {
        if self.runtime.lifecycle.begin_drain() {
            let d = self.runtime.current().snapshot.drain.clone();
            tracing::info!(delay = ?d.delay, spread = ?d.spread, timeout = ?d.timeout, "draining: readiness off");
            self.runtime.metrics.draining.set(1);
            self.runtime.metrics.ready.set(0);
            let started = Instant::now();
            tokio::time::sleep(d.delay).await;
            tracing::info!("draining: closing client connections");
            let remaining = d.timeout.saturating_sub(started.elapsed());
            self.close_listeners(d.spread, remaining).await;
            tracing::info!(took = ?started.elapsed(), "drained");
            self.runtime.metrics.drained.set(1);
            let _ = self.drained.send(true);
        } else {
            let mut rx = self.drained.subscribe();
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    fn spawn_background(&self, f: impl std::future::Future<Output = ()> + Send + 'static) -> AbortHandle {
        self.background.lock().unwrap_or_else(|e| e.into_inner()).spawn(f)
    }

    fn stop_background(&self) {
        self.background.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }
}

impl Control for App {
    fn request_reload(self: Arc<Self>) -> BoxFuture<'static, Result<(), ConfigErrors>> {
        Box::pin(async move { App::reload(&self).await })
    }

    fn request_drain(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { App::drain(&self).await })
    }

    fn not_ready_reason(&self) -> Option<String> {
        App::not_ready_reason(self)
    }
}

/// Starts everything for `snapshot`, read from `config_path` (which reloads re-read).
pub async fn start(mut snapshot: Snapshot) -> anyhow::Result<Bound> {
    let config_path = snapshot.path.clone();
    let renewals = obtain_identities(&mut snapshot, None, START_ATTEMPTS)
        .await
        .map_err(anyhow::Error::msg)?;
    let gateway = Gateway::new(snapshot.gateway.clone());
    if let Err(e) = gateway.resolve().await {
        // Not fatal: the gateway may come up after us. Requests get 503 until it resolves.
        tracing::warn!(gateway = %snapshot.gateway, error = %e, "cannot resolve gateway yet; will retry");
    }
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(Upstream::new(&snapshot, gateway.clone(), metrics.clone(), None));
    identity_metrics(&metrics, &snapshot);
    for r in &renewals {
        record_renewal_metrics(&metrics, &r.spec, r.failures == 0, r.failures);
    }
    let mut tcp = Vec::new();
    for l in &snapshot.listeners {
        tcp.push(bind(l).await.map_err(anyhow::Error::msg)?);
    }
    let admin_tcp = match &snapshot.admin {
        Some(a) => Some(
            TcpListener::bind(a.bind)
                .await
                .map_err(|e| anyhow::anyhow!("admin: cannot bind {}: {e}", a.bind))?,
        ),
        None => None,
    };
    let watch = snapshot.reload.watch;
    let listeners_cfg = snapshot.listeners.clone();
    let app = Arc::new(App {
        config_path,
        runtime: Arc::new(Runtime::new(Generation::new(
            Arc::new(snapshot),
            upstream,
            metrics,
            None,
        ))),
        identity_watch: Default::default(),
        renewals: std::sync::Mutex::new(renewals),
        reload_lock: Mutex::new(()),
        state: Mutex::new(State {
            listeners: Vec::new(),
            gateway_refresh: tokio::spawn(async {}).abort_handle(),
        }),
        background: std::sync::Mutex::new(JoinSet::new()),
        drained: watch::channel(false).0,
    });
    {
        let mut state = app.state.lock().await;
        let refresh = app.runtime.current().snapshot.gateway_refresh;
        state.gateway_refresh = app.spawn_background(gateway.refresh_loop(refresh));
        for (l, t) in listeners_cfg.iter().zip(tcp) {
            let r = app.spawn_listener(l, t);
            state.listeners.push(r);
        }
    }
    let sweeper = app.clone();
    app.spawn_background(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            sweeper.runtime.current().upstream.sweep();
        }
    });
    if watch {
        app.spawn_background(reload::watch_files(app.clone()));
    }
    let renewer = app.clone();
    app.spawn_background(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !renewer.runtime.lifecycle.is_draining() {
                renewer.renew_due().await;
            }
        }
    });
    let admin = match admin_tcp {
        Some(t) => {
            let addr = t.local_addr()?;
            tracing::info!(%addr, "admin listening");
            app.spawn_background(crate::admin::serve(t, app.runtime.clone(), app.clone()));
            Some(addr)
        }
        None => None,
    };
    app.runtime
        .metrics
        .ready
        .set(i64::from(app.not_ready_reason().is_none()));
    let listeners = app.listener_addrs().await;
    Ok(Bound { app, listeners, admin })
}

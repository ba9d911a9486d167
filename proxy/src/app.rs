//! The one place that wires everything: from a validated snapshot to bound listeners, the admin
//! server and background tasks; and the operations on a running instance (reload, identity
//! rotation, drain). Returns the bound addresses (tests use port 0) and a shutdown handle.
//!
//! The current configuration is one immutable [`Proxy`] behind an `ArcSwap`: each request loads
//! it once and keeps it to the end, so a reload never changes the rules under a request in
//! flight. Reloads are serialized by `state`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sha2::Digest;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::{self, ConfigError, ConfigErrors, Snapshot};
use crate::forward::Proxy;
use crate::identity::issuer::{self, IssuerSpec};
use crate::identity::{rfc3339, Identity, IdentityError};
use crate::lifecycle::{Lifecycle, ListenerState};
use crate::metrics::Metrics;
use crate::upstream::{Gateway, Upstream};

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

/// Polls a key may stay mismatched with its certificate before that counts as a failure.
pub const MISMATCH_POLLS: u32 = 5;

/// Renewal bookkeeping for one issued identity.
struct Renewal {
    spec: Arc<IssuerSpec>,
    next: SystemTime,
    failures: u32,
    last_error: Option<String>,
}

/// Readiness turns off when an issued certificate has less than this share of its lifetime left
/// and renewing it keeps failing: the fleet's other instances can take the traffic before this
/// one's certificate expires.
const NOT_READY_BELOW_LIFETIME: f64 = 0.1;

/// Issuance attempts at start before giving up (a certificate is needed before serving).
const START_ATTEMPTS: u32 = 3;

#[derive(Default)]
struct IdentityWatch {
    last_sig: Option<[u8; 32]>,
    mismatch_polls: u32,
}

pub struct App {
    config_path: PathBuf,
    /// Client connections open across all listeners (for `limits.max_connections`).
    pub client_connections: std::sync::atomic::AtomicUsize,
    /// Per identity, by its certificate path.
    identity_watch: std::sync::Mutex<HashMap<std::path::PathBuf, IdentityWatch>>,
    renewals: std::sync::Mutex<Vec<Renewal>>,
    reload_lock: Mutex<()>,
    current: ArcSwap<Proxy>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Lifecycle,
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
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load_full()
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

    /// Why the instance should not receive traffic, if so (`/readyz`).
    pub fn not_ready_reason(&self) -> Option<String> {
        if *self.drained.borrow() {
            return Some("drained".into());
        }
        let proxy = self.current.load();
        let s = &proxy.snapshot;
        let now = SystemTime::now();
        if let Some(r) = self.lifecycle.not_ready_reason(s.identity.not_after, now) {
            return Some(r);
        }
        for i in 1..s.identity_count() {
            let id = s.identity_at(i);
            if now >= id.not_after {
                return Some(format!(
                    "workload identity {} expired at {}",
                    id.spiffe_id,
                    rfc3339(id.not_after)
                ));
            }
        }
        let renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        for r in renewals.iter().filter(|r| r.failures > 0) {
            let Some(id) = (0..s.identity_count())
                .map(|i| s.identity_at(i))
                .find(|id| id.issuer.as_ref() == Some(&r.spec))
            else {
                continue;
            };
            let life = id.not_after.duration_since(id.not_before).unwrap_or_default();
            let left = id.not_after.duration_since(now).unwrap_or_default();
            if left < life.mul_f64(NOT_READY_BELOW_LIFETIME) {
                return Some(format!(
                    "workload identity {} expires at {} and renewal from {} keeps failing: {}",
                    id.spiffe_id,
                    rfc3339(id.not_after),
                    r.spec.describe(),
                    r.last_error.as_deref().unwrap_or("?")
                ));
            }
        }
        None
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
                tokio::spawn(crate::listener::tcp::serve(tcp, name, self.clone(), rx))
            }
            (_, Socket::Tcp(tcp)) => tokio::spawn(crate::listener::http::serve(tcp, name, self.clone(), rx)),
            (_, Socket::Udp(udp)) => tokio::spawn(crate::listener::h3::serve(udp, name, self.clone(), rx)),
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

    fn set_identity_metrics(&self, snapshot: &Snapshot) {
        identity_metrics(&self.metrics, snapshot);
    }

    /// Re-reads the config file and applies it, or keeps the running config and returns why not.
    pub async fn reload(self: &Arc<Self>) -> Result<(), ConfigErrors> {
        // One reload at a time from start to end (SIGHUP, the file watcher and POST /reload
        // may overlap): otherwise an older file read first could be installed last.
        let _one = self.reload_lock.lock().await;
        // Certificates for new issuer blocks are requested before taking the state lock: an
        // issuer may take seconds, and drains and renewals must not wait for it.
        let prepared = match config::load(&self.config_path) {
            Ok(mut new) => {
                let old = self.current.load_full();
                obtain_identities(&mut new, Some(&old.snapshot), 1)
                    .await
                    .map(|renewals| (new, renewals))
                    .map_err(|m| bind_error(&self.config_path, m))
            }
            Err(e) => Err(e),
        };
        let mut state = self.state.lock().await;
        let result = match prepared {
            Ok((new, renewals)) => self.reload_locked(&mut state, new, renewals).await,
            Err(e) => Err(e),
        };
        Metrics::record_reload(&self.metrics.config_reloads, result.is_ok());
        match &result {
            Ok(()) => tracing::info!(config = %self.config_path.display(), "config reloaded"),
            Err(errs) => {
                for e in &errs.0 {
                    tracing::error!(error = %e, "config reload rejected; keeping the running config");
                }
            }
        }
        result
    }

    async fn reload_locked(
        self: &Arc<Self>,
        state: &mut State,
        mut new: Snapshot,
        renewals: Vec<Renewal>,
    ) -> Result<(), ConfigErrors> {
        if self.lifecycle.is_draining() {
            return Err(bind_error(
                &self.config_path,
                "instance is draining; reload ignored".into(),
            ));
        }
        let old = self.current.load_full();
        // A renewal may have installed a newer certificate while this reload was prepared.
        carry_over_issued(&mut new, &old.snapshot);
        // Bind new and moved listeners before anything changes, so a bind failure rejects the
        // whole reload and leaves the running config untouched.
        let mut fresh = Vec::new();
        for l in &new.listeners {
            if let Some(r) = state
                .listeners
                .iter()
                .find(|r| r.name == l.name && r.bind == l.bind && r.protocol != l.protocol)
            {
                return Err(bind_error(
                    &self.config_path,
                    format!(
                        "listener {:?} on {}: changing its protocol ({:?} to {:?}) needs a restart; the running config stays",
                        r.name, r.bind, r.protocol, l.protocol
                    ),
                ));
            }
            let same = state.listeners.iter().any(|r| r.name == l.name && r.bind == l.bind);
            if !same {
                let tcp = bind(l).await.map_err(|m| bind_error(&self.config_path, m))?;
                fresh.push((l.clone(), tcp));
            }
        }
        if new.admin.as_ref().map(|a| a.bind) != old.snapshot.admin.as_ref().map(|a| a.bind) {
            tracing::warn!("admin.bind changed: takes effect at the next restart");
        }
        let gateway = if new.gateway == old.snapshot.gateway {
            old.upstream.gateway.clone()
        } else {
            let g = Gateway::new(new.gateway.clone());
            if let Err(e) = g.resolve().await {
                tracing::warn!(gateway = %new.gateway, error = %e, "cannot resolve new gateway yet; will retry");
            }
            state.gateway_refresh.abort();
            state.gateway_refresh = self.spawn_background(g.clone().refresh_loop(new.gateway_refresh));
            g
        };
        self.install(new, gateway, Some(&old.upstream));
        for r in &renewals {
            record_renewal_metrics(&self.metrics, &r.spec, r.failures == 0, r.failures);
        }
        self.renewals.lock().unwrap_or_else(|e| e.into_inner()).extend(renewals);

        let snapshot = self.current.load().snapshot.clone();
        let mut keep = Vec::new();
        for r in state.listeners.drain(..) {
            if snapshot.listeners.iter().any(|l| l.name == r.name && l.bind == r.bind) {
                keep.push(r);
            } else {
                tracing::info!(listener = %r.name, addr = %r.addr, "listener removed or moved: draining the old one");
                let d = &snapshot.drain;
                let _ = r.close.send(ListenerState::Closing {
                    spread: d.spread,
                    deadline: Instant::now() + d.timeout,
                });
            }
        }
        for (l, tcp) in fresh {
            keep.push(self.spawn_listener(&l, tcp));
        }
        state.listeners = keep;
        Ok(())
    }

    /// Swaps in a new snapshot, taking over unchanged pools from `previous`.
    fn install(&self, snapshot: Snapshot, gateway: Arc<Gateway>, previous: Option<&Upstream>) {
        let upstream = Arc::new(Upstream::new(&snapshot, gateway, self.metrics.clone(), previous));
        self.set_identity_metrics(&snapshot);
        let previous = self.current.load_full();
        self.current.store(Arc::new(Proxy::new(
            Arc::new(snapshot),
            upstream,
            self.metrics.clone(),
            Some(&previous),
        )));
    }

    /// Loads the identity files again if their contents changed; installs them if they form a
    /// valid identity that differs from the running one. A key that does not match its cert is
    /// taken as a rotation caught half-way (files are written one at a time) and ignored until
    /// the pair is consistent; if it stays inconsistent for [`MISMATCH_POLLS`] polls it is
    /// reported as a failed reload.
    pub async fn reload_identity(self: &Arc<Self>) -> Result<bool, IdentityError> {
        let _state = self.state.lock().await;
        let old = self.current.load_full();
        let snap = &old.snapshot;
        let mut new: Option<Snapshot> = None;
        let mut first_error = None;
        // The mesh identity and every tenant's: each is watched and rotated on its own.
        for i in 0..snap.identity_count() {
            let current = snap.identity_at(i);
            if current.issuer.is_some() {
                // Renewed from its issuer by `renew_due`, not watched on disk.
                continue;
            }
            match self.check_identity_files(current, &snap.trust_domain) {
                Ok(Some(identity)) => {
                    tracing::info!(identity = %identity.spiffe_id, not_after = %crate::identity::rfc3339(identity.not_after), "workload identity rotated");
                    new.get_or_insert_with(|| (**snap).clone())
                        .set_identity_at(i, Arc::new(identity));
                }
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(new) = new else {
            return first_error.map_or(Ok(false), Err);
        };
        if let Some(e) = &first_error {
            // The others rotate anyway; this one keeps its running identity (logged and
            // counted where it failed) and is retried at the next poll.
            tracing::warn!(error = %e, "one identity failed to rotate while another rotated");
        }
        self.install(new, old.upstream.gateway.clone(), Some(&old.upstream));
        Metrics::record_reload(&self.metrics.identity_reloads, true);
        Ok(true)
    }

    /// A new identity from `current`'s files if they changed into a valid, different one.
    fn check_identity_files(&self, current: &Identity, trust_domain: &str) -> Result<Option<Identity>, IdentityError> {
        let paths = &current.paths;
        let sig = files_signature(&[&paths.cert_chain, &paths.key, &paths.root_cert]);
        {
            let mut all = self.identity_watch.lock().unwrap_or_else(|e| e.into_inner());
            let w = all.entry(paths.cert_chain.clone()).or_default();
            if w.last_sig == Some(sig) {
                if w.mismatch_polls > 0 {
                    w.mismatch_polls += 1;
                    if w.mismatch_polls == MISMATCH_POLLS {
                        Metrics::record_reload(&self.metrics.identity_reloads, false);
                        tracing::error!(key = %paths.key.display(), cert = %paths.cert_chain.display(),
                            "identity key still does not match its certificate; keeping the running identity");
                    }
                }
                return Ok(None);
            }
            w.last_sig = Some(sig);
            w.mismatch_polls = 0;
        }
        let identity = match Identity::load(paths, trust_domain, SystemTime::now()) {
            Ok(i) => i,
            Err(e @ IdentityError::KeyMismatch { .. }) => {
                tracing::debug!(error = %e, "identity files mid-rotation; waiting for a consistent pair");
                let mut all = self.identity_watch.lock().unwrap_or_else(|e| e.into_inner());
                all.entry(paths.cert_chain.clone()).or_default().mismatch_polls = 1;
                return Err(e);
            }
            Err(e) => {
                Metrics::record_reload(&self.metrics.identity_reloads, false);
                tracing::error!(error = %e, "new identity files rejected; keeping the running identity");
                return Err(e);
            }
        };
        if identity.fingerprint == current.fingerprint {
            return Ok(None);
        }
        Ok(Some(identity))
    }

    /// Renews every issued identity whose time has come; a failure keeps the current certificate
    /// and schedules a retry (doubling, bounded by the time left).
    async fn renew_due(self: &Arc<Self>) {
        let snap = self.current.load().snapshot.clone();
        let now = SystemTime::now();
        let mut due = Vec::new();
        {
            let mut renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
            let specs: Vec<Arc<IssuerSpec>> = (0..snap.identity_count())
                .filter_map(|i| snap.identity_at(i).issuer.clone())
                .collect();
            renewals.retain(|r| specs.contains(&r.spec));
            for i in 0..snap.identity_count() {
                let id = snap.identity_at(i);
                let Some(spec) = &id.issuer else { continue };
                let r = match renewals.iter().position(|r| r.spec == *spec) {
                    Some(k) => &renewals[k],
                    None => {
                        renewals.push(Renewal::scheduled(spec.clone(), id));
                        renewals.last().expect("just pushed")
                    }
                };
                if r.next <= now && !due.iter().any(|(_, s): &(usize, Arc<IssuerSpec>)| s == spec) {
                    due.push((i, spec.clone()));
                }
            }
        }
        for (i, spec) in due {
            let current = snap.identity_at(i).clone();
            let result = issuer::obtain(&spec, Some(&current), &snap.trust_domain).await;
            self.record_renewal(&spec, &current, &result);
            let Ok(fresh) = result else { continue };
            tracing::info!(identity = %fresh.spiffe_id, issuer = %spec.describe(), not_after = %rfc3339(fresh.not_after), "workload identity renewed");
            let _state = self.state.lock().await;
            // The snapshot may have been reloaded meanwhile: replace wherever this spec is now.
            let old = self.current.load_full();
            let mut new = (*old.snapshot).clone();
            let fresh = Arc::new(fresh);
            let mut found = false;
            for k in 0..new.identity_count() {
                if new.identity_at(k).issuer.as_ref() == Some(&spec) {
                    new.set_identity_at(k, fresh.clone());
                    found = true;
                }
            }
            if found {
                self.install(new, old.upstream.gateway.clone(), Some(&old.upstream));
            }
        }
    }

    fn record_renewal(
        &self,
        spec: &Arc<IssuerSpec>,
        current: &Identity,
        result: &Result<Identity, issuer::IssueError>,
    ) {
        let now = SystemTime::now();
        let mut renewals = self.renewals.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = renewals.iter_mut().find(|r| r.spec == *spec) else {
            return;
        };
        match result {
            Ok(fresh) => {
                *r = Renewal::scheduled(spec.clone(), fresh);
            }
            Err(e) => {
                r.failures += 1;
                let left = current.not_after.duration_since(now).unwrap_or_default();
                r.next = now + issuer::retry_delay(r.failures, left, rand::random::<f64>() * 2.0 - 1.0);
                r.last_error = Some(e.to_string());
                tracing::warn!(identity = %spec.spiffe_id, error = %e, failures = r.failures,
                    expires = %rfc3339(current.not_after), "certificate renewal failed; keeping the current certificate");
            }
        }
        record_renewal_metrics(&self.metrics, spec, result.is_ok(), r.failures);
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
        if self.lifecycle.begin_drain() {
            let d = self.current.load().snapshot.drain.clone();
            tracing::info!(delay = ?d.delay, spread = ?d.spread, timeout = ?d.timeout, "draining: readiness off");
            self.metrics.draining.set(1);
            self.metrics.ready.set(0);
            let started = Instant::now();
            tokio::time::sleep(d.delay).await;
            tracing::info!("draining: closing client connections");
            let remaining = d.timeout.saturating_sub(started.elapsed());
            self.close_listeners(d.spread, remaining).await;
            tracing::info!(took = ?started.elapsed(), "drained");
            self.metrics.drained.set(1);
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

/// A cheap change detector for small files: their contents' hash (missing files hash as empty).
fn files_signature(paths: &[&std::path::Path]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for p in paths {
        let data = std::fs::read(p).unwrap_or_default();
        h.update((data.len() as u64).to_be_bytes());
        h.update(&data);
    }
    h.finalize().into()
}

/// Polls the config file and the identity files. Polling rather than inotify: Kubernetes secret
/// mounts swap a symlink, Vault agent renames, cert-manager csi writes in place, and all of them
/// are seen the same way by comparing contents. A config change is applied once it has been
/// stable for one interval (editors write in several steps).
async fn watch_files(app: Arc<App>) {
    let mut pending: Option<[u8; 32]> = None;
    let mut applied = files_signature(&[&app.config_path]);
    loop {
        let interval = app.current.load().snapshot.reload.interval;
        tokio::time::sleep(interval).await;
        if app.lifecycle.is_draining() {
            continue;
        }
        let sig = files_signature(&[&app.config_path]);
        if sig != applied {
            if pending == Some(sig) {
                applied = sig;
                pending = None;
                let _ = app.reload().await;
                continue;
            }
            pending = Some(sig);
        } else {
            pending = None;
        }
        let _ = app.reload_identity().await;
    }
}

impl Renewal {
    /// Next renewal of a freshly issued (or carried-over) certificate.
    fn scheduled(spec: Arc<IssuerSpec>, id: &Identity) -> Renewal {
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        Renewal {
            spec,
            next: issuer::renew_at(id.not_before, id.not_after, jitter),
            failures: 0,
            last_error: None,
        }
    }

    /// A bootstrap certificate whose first issuance failed: retry soon.
    fn failed(spec: Arc<IssuerSpec>, id: &Identity, error: String) -> Renewal {
        let left = id.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        Renewal {
            spec,
            next: SystemTime::now() + issuer::retry_delay(1, left, rand::random::<f64>() * 2.0 - 1.0),
            failures: 1,
            last_error: Some(error),
        }
    }
}

fn record_renewal_metrics(metrics: &Metrics, spec: &IssuerSpec, ok: bool, failures: u32) {
    metrics
        .identity_renewals
        .get_or_create(&crate::metrics::RenewalLabels {
            identity: spec.spiffe_id.clone(),
            issuer: spec.kind_name().to_string(),
            result: if ok { "ok" } else { "error" }.to_string(),
        })
        .inc();
    metrics
        .identity_renewal_failures
        .get_or_create(&crate::metrics::IdentityLabels {
            identity: spec.spiffe_id.clone(),
        })
        .set(i64::from(failures));
}

/// Keeps the running certificate of every issued identity whose issuer block and trust bundle
/// are unchanged (a changed bundle needs a certificate checked against it).
fn carry_over_issued(snapshot: &mut Snapshot, old: &Snapshot) {
    for i in 0..snapshot.identity_count() {
        let id = snapshot.identity_at(i).clone();
        let Some(spec) = &id.issuer else { continue };
        let running = (0..old.identity_count())
            .map(|k| old.identity_at(k))
            .find(|x| x.issuer.as_ref() == Some(spec) && !x.is_pending() && x.roots.roots == id.roots.roots);
        if let Some(running) = running {
            snapshot.set_identity_at(i, running.clone());
        }
    }
}

/// Gives every issued identity of `snapshot` a certificate before it is served: carried over
/// from `old` when its issuer block is unchanged, otherwise requested now (`attempts` tries).
/// A pending identity that gets none fails the whole start or reload; a bootstrap certificate
/// is served meanwhile and retried soon.
async fn obtain_identities(
    snapshot: &mut Snapshot,
    old: Option<&Snapshot>,
    attempts: u32,
) -> Result<Vec<Renewal>, String> {
    let mut renewals = Vec::new();
    if let Some(old) = old {
        carry_over_issued(snapshot, old);
    }
    for i in 0..snapshot.identity_count() {
        let id = snapshot.identity_at(i).clone();
        let Some(spec) = id.issuer.clone() else { continue };
        if old.is_some_and(|o| (0..o.identity_count()).any(|k| Arc::ptr_eq(o.identity_at(k), &id))) {
            continue;
        }
        let mut failures = 0;
        let outcome = loop {
            match issuer::obtain(&spec, Some(&id), &snapshot.trust_domain).await {
                Ok(fresh) => break Ok(fresh),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(identity = %spec.spiffe_id, error = %e, attempt = failures, "certificate request failed");
                    if failures >= attempts {
                        break Err(e);
                    }
                    tokio::time::sleep(issuer::retry_delay(failures - 1, Duration::from_secs(60), 0.0)).await;
                }
            }
        };
        match outcome {
            Ok(fresh) => {
                tracing::info!(identity = %fresh.spiffe_id, issuer = %spec.describe(), not_after = %rfc3339(fresh.not_after), "workload certificate issued");
                renewals.push(Renewal::scheduled(spec.clone(), &fresh));
                snapshot.set_identity_at(i, Arc::new(fresh));
            }
            Err(e) if id.is_pending() => {
                return Err(format!("identity {}: no certificate: {e}", spec.spiffe_id));
            }
            Err(e) => {
                tracing::warn!(identity = %spec.spiffe_id, "serving the bootstrap certificate until the issuer answers");
                renewals.push(Renewal::failed(spec.clone(), &id, e.to_string()));
            }
        }
    }
    Ok(renewals)
}

/// The expiry gauge: the mesh identity and every tenant identity.
fn identity_metrics(metrics: &Metrics, snapshot: &Snapshot) {
    metrics.set_identity(&snapshot.identity.spiffe_id, snapshot.identity.not_after);
    for i in &snapshot.tenant_identities {
        metrics.add_identity(&i.spiffe_id, i.not_after);
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
        client_connections: Default::default(),
        identity_watch: Default::default(),
        renewals: std::sync::Mutex::new(renewals),
        reload_lock: Mutex::new(()),
        current: ArcSwap::from_pointee(Proxy::new(Arc::new(snapshot), upstream, metrics.clone(), None)),
        metrics,
        lifecycle: Lifecycle::default(),
        state: Mutex::new(State {
            listeners: Vec::new(),
            gateway_refresh: tokio::spawn(async {}).abort_handle(),
        }),
        background: std::sync::Mutex::new(JoinSet::new()),
        drained: watch::channel(false).0,
    });
    {
        let mut state = app.state.lock().await;
        let refresh = app.current.load().snapshot.gateway_refresh;
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
            sweeper.current.load().upstream.sweep();
        }
    });
    if watch {
        app.spawn_background(watch_files(app.clone()));
    }
    let renewer = app.clone();
    app.spawn_background(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !renewer.lifecycle.is_draining() {
                renewer.renew_due().await;
            }
        }
    });
    let admin = match admin_tcp {
        Some(t) => {
            let addr = t.local_addr()?;
            tracing::info!(%addr, "admin listening");
            app.spawn_background(crate::admin::serve(t, app.clone()));
            Some(addr)
        }
        None => None,
    };
    app.metrics.ready.set(i64::from(app.not_ready_reason().is_none()));
    let listeners = app.listener_addrs().await;
    Ok(Bound { app, listeners, admin })
}

/// Pool rows for metrics and `/pool`: (service, connections, streams in use).
pub fn pool_rows(proxy: &Proxy) -> Vec<(String, i64, i64)> {
    let mut by_service: HashMap<String, (i64, i64)> = HashMap::new();
    for p in proxy.upstream.pools() {
        let s = p.stats();
        let e = by_service.entry(s.service.clone()).or_default();
        e.0 += s.connections.len() as i64;
        e.1 += s.connections.iter().map(|c| c.streams_in_use as i64).sum::<i64>();
    }
    let mut rows: Vec<_> = by_service.into_iter().map(|(k, (a, b))| (k, a, b)).collect();
    rows.sort();
    rows
}

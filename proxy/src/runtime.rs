//! The shared handle of a running instance, below everything that serves traffic: listeners,
//! the pipeline and the admin API hold a [`Runtime`]; `app` builds it, installs new
//! [`Generation`]s on reload, and answers the admin API's operations through [`Control`].
//!
//! A [`Generation`] is one config snapshot with everything built from it (policy and routing
//! tables, upstream pools, tenant limit state). Each request loads the current one once and
//! keeps it to the end, so a reload never changes the rules under a request in flight; readers
//! never lock (one atomic pointer), and a reload never waits for them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{ConfigErrors, Snapshot};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::policy::limits::TenantState;
use crate::policy::Tenants;
use crate::route::RouteTable;
use crate::telemetry::PeerMetadata;
use crate::upstream::Upstream;

/// One config generation: what requests share. A reload swaps the whole value.
pub struct Generation {
    pub snapshot: Arc<Snapshot>,
    /// Who a client is: built from `snapshot.tenants`.
    pub tenants: Tenants,
    /// Which service an authority names: built from `snapshot.services`.
    pub routes: RouteTable,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    /// The per-request metric handles of this generation's tenants and services.
    pub request_metrics: crate::metrics::RequestMetrics,
    /// Indexed by tenant id; carried over by name across reloads.
    pub tenant_state: Vec<Arc<TenantState>>,
    /// Indexed by tenant id: the peer metadata of tenants with `telemetry:`, encoded once
    /// here so that a request only clones it.
    pub peer_metadata: Vec<Option<Arc<PeerMetadata>>>,
    /// The mesh → VM side (`vm_services:`), if configured.
    pub inbound: Option<Arc<crate::inbound::Inbound>>,
}

impl Generation {
    pub fn new(
        snapshot: Arc<Snapshot>,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        previous: Option<&Generation>,
    ) -> Generation {
        let tenant_state = snapshot
            .tenants
            .iter()
            .map(|t| {
                previous
                    .and_then(|p| {
                        p.snapshot
                            .tenants
                            .iter()
                            .position(|o| o.name == t.name)
                            .map(|i| p.tenant_state[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        let tenant_names: Vec<&str> = snapshot.tenants.iter().map(|t| t.name.as_str()).collect();
        let service_names: Vec<&str> = snapshot.services.iter().map(|s| s.name.as_str()).collect();
        let peer_metadata = snapshot
            .tenants
            .iter()
            .map(|t| t.telemetry.as_deref().map(|names| Arc::new(PeerMetadata::new(names))))
            .collect();
        metrics.set_tenant_telemetry(&snapshot.tenants);
        let inbound = (!snapshot.vm_services.is_empty())
            .then(|| {
                crate::inbound::Inbound::new(&snapshot, &metrics, previous.and_then(|p| p.inbound.as_deref()))
                    .map_err(|e| tracing::error!(error = %e, "mesh-inbound listeners cannot serve"))
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        Generation {
            inbound,
            peer_metadata,
            request_metrics: crate::metrics::RequestMetrics::new(metrics.clone(), &tenant_names, &service_names),
            tenants: Tenants::new(&snapshot.tenants),
            routes: RouteTable::for_services(&snapshot.services),
            snapshot,
            upstream,
            metrics,
            tenant_state,
        }
    }

    /// The listener of this name, as configured in this generation.
    pub fn listener(&self, name: &str) -> Option<&crate::config::Listener> {
        self.snapshot.listeners.iter().find(|l| l.name == name)
    }
}

/// What every part that serves traffic shares for the life of the process.
pub struct Runtime {
    current: ArcSwap<Generation>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Lifecycle,
    /// Client connections open across all listeners (for `limits.max_connections`).
    pub client_connections: AtomicUsize,
    /// Client connections by source address (for `limits.max_connections_per_source`).
    pub per_source: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Connections that have not yet sent a complete first request head or finished their
    /// QUIC handshake (for `limits.max_preface_connections`).
    pub prefaces: Prefaces,
}

/// The connections still in their preface, oldest first. When there are
/// `limits.max_preface_connections` of them, a new one does not wait or get refused: the
/// oldest is asked to close instead. A real client sends its request right after connecting
/// and leaves this set within a round trip; what stays is silent or trickling sockets, so a
/// flood of them from many addresses evicts itself, never the clients that talk.
#[derive(Default)]
pub struct Prefaces {
    queue: std::sync::Mutex<std::collections::VecDeque<std::sync::Weak<Evict>>>,
    count: AtomicUsize,
}

/// How a connection in its preface is asked to close.
#[derive(Default)]
pub struct Evict {
    notify: tokio::sync::Notify,
    done: std::sync::atomic::AtomicBool,
}

/// A connection's place in [`Prefaces`], until dropped (its first request head arrived).
pub struct PrefaceSlot {
    runtime: Arc<Runtime>,
    evict: Arc<Evict>,
}

impl PrefaceSlot {
    /// Resolves when this connection is asked to close to make room for a newer one.
    pub fn evicted(&self) -> impl Future<Output = ()> + Send + 'static {
        let evict = self.evict.clone();
        async move { evict.notify.notified().await }
    }
}

impl Drop for PrefaceSlot {
    fn drop(&mut self) {
        self.evict.done.store(true, std::sync::atomic::Ordering::SeqCst);
        self.runtime
            .prefaces
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Prefaces {
    /// Connections in their preface now.
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enters a new connection; if that makes more than `max`, the oldest is asked to close.
    /// Returns whether one was.
    pub fn enter(runtime: &Arc<Runtime>, max: usize) -> (PrefaceSlot, bool) {
        use std::sync::atomic::Ordering::SeqCst;
        let me = &runtime.prefaces;
        let before = me.count.fetch_add(1, SeqCst);
        let evict = Arc::new(Evict::default());
        let mut queue = me.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = false;
        if before >= max {
            while let Some(w) = queue.pop_front() {
                if let Some(old) = w.upgrade().filter(|o| !o.done.load(SeqCst)) {
                    old.done.store(true, SeqCst);
                    old.notify.notify_one();
                    evicted = true;
                    break;
                }
            }
        }
        queue.push_back(Arc::downgrade(&evict));
        // Entries of connections that left the preface stay until popped; keep them bounded.
        if queue.len() > 2 * max.max(16) {
            queue.retain(|w| w.upgrade().is_some_and(|e| !e.done.load(SeqCst)));
        }
        drop(queue);
        (
            PrefaceSlot {
                runtime: runtime.clone(),
                evict,
            },
            evicted,
        )
    }
}

impl Runtime {
    pub fn new(first: Generation) -> Runtime {
        Runtime {
            metrics: first.metrics.clone(),
            current: ArcSwap::from_pointee(first),
            lifecycle: Lifecycle::default(),
            client_connections: AtomicUsize::new(0),
            per_source: Default::default(),
            prefaces: Prefaces::default(),
        }
    }

    /// The generation current now; keep it for the whole request or connection step.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Installs a new generation; requests in flight keep the one they loaded.
    pub fn install(&self, generation: Generation) {
        self.current.store(Arc::new(generation));
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The operations on a running instance that the admin API may ask for; `app` implements them.
pub trait Control: Send + Sync {
    /// Re-reads the config file and applies it, or keeps the running config and says why not.
    fn request_reload(self: Arc<Self>) -> BoxFuture<'static, Result<(), ConfigErrors>>;
    /// The graceful drain (idempotent; a second call waits for the first).
    fn request_drain(self: Arc<Self>) -> BoxFuture<'static, ()>;
    /// Why the instance should not receive traffic, if so (`/readyz`).
    fn not_ready_reason(&self) -> Option<String>;
}

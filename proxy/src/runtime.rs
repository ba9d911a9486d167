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
        Generation {
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
}

impl Runtime {
    pub fn new(first: Generation) -> Runtime {
        Runtime {
            metrics: first.metrics.clone(),
            current: ArcSwap::from_pointee(first),
            lifecycle: Lifecycle::default(),
            client_connections: AtomicUsize::new(0),
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

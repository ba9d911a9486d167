//! Config reloads (SIGHUP, the file watcher, `POST /reload`): a new snapshot is validated,
//! its new listeners bound and its new identities obtained before anything changes, then
//! installed as a new generation; any failure keeps the running config.

use std::sync::Arc;

use sha2::Digest;
use tokio::time::Instant;

use super::identity::{carry_over_issued, obtain_identities, record_renewal_metrics, Renewal};
use super::{bind, bind_error, App, State};
use crate::config::{self, ConfigErrors, Snapshot};
use crate::lifecycle::ListenerState;
use crate::metrics::Metrics;
use crate::runtime::Generation;
use crate::upstream::{Gateway, Upstream};

impl App {
    /// Re-reads the config file and applies it, or keeps the running config and returns why not.
    pub async fn reload(self: &Arc<Self>) -> Result<(), ConfigErrors> {
        // One reload at a time from start to end (SIGHUP, the file watcher and POST /reload
        // may overlap): otherwise an older file read first could be installed last.
        let _one = self.reload_lock.lock().await;
        // Certificates for new issuer blocks are requested before taking the state lock: an
        // issuer may take seconds, and drains and renewals must not wait for it.
        let prepared = match config::load(&self.config_path) {
            Ok(mut new) => {
                let old = self.runtime.current();
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
        Metrics::record_reload(&self.runtime.metrics.config_reloads, result.is_ok());
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

    pub(super) async fn reload_locked(
        self: &Arc<Self>,
        state: &mut State,
        mut new: Snapshot,
        renewals: Vec<Renewal>,
    ) -> Result<(), ConfigErrors> {
        if self.runtime.lifecycle.is_draining() {
            return Err(bind_error(
                &self.config_path,
                "instance is draining; reload ignored".into(),
            ));
        }
        let old = self.runtime.current();
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
            record_renewal_metrics(&self.runtime.metrics, &r.spec, r.failures == 0, r.failures);
        }
        self.renewals.lock().unwrap_or_else(|e| e.into_inner()).extend(renewals);

        let snapshot = self.runtime.current().snapshot.clone();
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
    pub(super) fn install(&self, snapshot: Snapshot, gateway: Arc<Gateway>, previous: Option<&Upstream>) {
        let upstream = Arc::new(Upstream::new(
            &snapshot,
            gateway,
            self.runtime.metrics.clone(),
            previous,
        ));
        self.set_identity_metrics(&snapshot);
        let previous = self.runtime.current();
        self.runtime.install(Generation::new(
            Arc::new(snapshot),
            upstream,
            self.runtime.metrics.clone(),
            Some(&previous),
        ));
    }
}

/// A cheap change detector for small files: their contents' hash (missing files hash as empty).
pub(super) fn files_signature(paths: &[&std::path::Path]) -> [u8; 32] {
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
pub(super) async fn watch_files(app: Arc<App>) {
    let mut pending: Option<[u8; 32]> = None;
    // The config file and the services file it names (the running config's: a config that
    // failed to load names none that is watched).
    let signature = |app: &App| {
        let services_file = app.runtime.current().snapshot.services_file.clone();
        let mut paths: Vec<&std::path::Path> = vec![&app.config_path];
        paths.extend(services_file.as_deref());
        files_signature(&paths)
    };
    let mut applied = signature(&app);
    loop {
        let interval = app.runtime.current().snapshot.reload.interval;
        tokio::time::sleep(interval).await;
        if app.runtime.lifecycle.is_draining() {
            continue;
        }
        let sig = signature(&app);
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

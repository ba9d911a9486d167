//! Workload identities of a running instance: certificate files watched and rotated, issued
//! certificates obtained before serving and renewed at half-life, and the readiness these
//! decide (an expired identity, or renewals failing near expiry, take the instance out of
//! rotation).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::reload::files_signature;
use super::App;
use crate::config::Snapshot;
use crate::identity::issuer::{self, IssuerSpec};
use crate::identity::{rfc3339, Identity, IdentityError};
use crate::metrics::Metrics;

/// Polls a key may stay mismatched with its certificate before that counts as a failure.
pub const MISMATCH_POLLS: u32 = 5;

/// Renewal bookkeeping for one issued identity.
pub(super) struct Renewal {
    pub spec: Arc<IssuerSpec>,
    next: SystemTime,
    pub failures: u32,
    last_error: Option<String>,
}

/// Readiness turns off when an issued certificate has less than this share of its lifetime left
/// and renewing it keeps failing: the fleet's other instances can take the traffic before this
/// one's certificate expires.
const NOT_READY_BELOW_LIFETIME: f64 = 0.1;

/// Issuance attempts at start before giving up (a certificate is needed before serving).
pub(super) const START_ATTEMPTS: u32 = 3;

#[derive(Default)]
pub(super) struct IdentityWatch {
    last_sig: Option<[u8; 32]>,
    mismatch_polls: u32,
}

impl App {
    /// Why the instance should not receive traffic, if so (`/readyz`).
    pub fn not_ready_reason(&self) -> Option<String> {
        if *self.drained.borrow() {
            return Some("drained".into());
        }
        let proxy = self.runtime.current();
        let s = &proxy.snapshot;
        let now = SystemTime::now();
        if let Some(r) = self.runtime.lifecycle.not_ready_reason(s.identity.not_after, now) {
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

    pub(super) fn set_identity_metrics(&self, snapshot: &Snapshot) {
        identity_metrics(&self.runtime.metrics, snapshot);
    }

    /// Loads the identity files again if their contents changed; installs them if they form a
    /// valid identity that differs from the running one. A key that does not match its cert is
    /// taken as a rotation caught half-way (files are written one at a time) and ignored until
    /// the pair is consistent; if it stays inconsistent for [`MISMATCH_POLLS`] polls it is
    /// reported as a failed reload.
    pub async fn reload_identity(self: &Arc<Self>) -> Result<bool, IdentityError> {
        let _state = self.state.lock().await;
        let old = self.runtime.current();
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
        Metrics::record_reload(&self.runtime.metrics.identity_reloads, true);
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
                        Metrics::record_reload(&self.runtime.metrics.identity_reloads, false);
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
                Metrics::record_reload(&self.runtime.metrics.identity_reloads, false);
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
    pub(super) async fn renew_due(self: &Arc<Self>) {
        let snap = self.runtime.current().snapshot.clone();
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
            let old = self.runtime.current();
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
        record_renewal_metrics(&self.runtime.metrics, spec, result.is_ok(), r.failures);
    }
}

impl Renewal {
    /// Next renewal of a freshly issued (or carried-over) certificate.
    pub(super) fn scheduled(spec: Arc<IssuerSpec>, id: &Identity) -> Renewal {
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        Renewal {
            spec,
            next: issuer::renew_at(id.not_before, id.not_after, jitter),
            failures: 0,
            last_error: None,
        }
    }

    /// A bootstrap certificate whose first issuance failed: retry soon.
    pub(super) fn failed(spec: Arc<IssuerSpec>, id: &Identity, error: String) -> Renewal {
        let left = id.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        Renewal {
            spec,
            next: SystemTime::now() + issuer::retry_delay(1, left, rand::random::<f64>() * 2.0 - 1.0),
            failures: 1,
            last_error: Some(error),
        }
    }
}

pub(super) fn record_renewal_metrics(metrics: &Metrics, spec: &IssuerSpec, ok: bool, failures: u32) {
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
pub(super) fn carry_over_issued(snapshot: &mut Snapshot, old: &Snapshot) {
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
pub(super) async fn obtain_identities(
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
pub(super) fn identity_metrics(metrics: &Metrics, snapshot: &Snapshot) {
    metrics.set_identity(&snapshot.identity.spiffe_id, snapshot.identity.not_after);
    for i in &snapshot.tenant_identities {
        metrics.add_identity(&i.spiffe_id, i.not_after);
    }
}

//! The control loop: every `interval`, for each group, read the group (DescribeAutoScalingGroups)
//! and the signals (Prometheus), decide ([`crate::decide`]), log the decision with its inputs,
//! set the desired capacity, and take care of instances held by lifecycle hooks:
//! - `Terminating:Wait`: `POST /drain` on the instance's admin API, wait until it has nothing in
//!   flight and no client connection (its `/metrics`) or `drain_timeout` passes, heartbeat the
//!   hook meanwhile, then `CompleteLifecycleAction` CONTINUE;
//! - `Pending:Wait`: CONTINUE once the instance's `/readyz` is 200.
//!
//! Each held instance gets one task (owned here, aborted on shutdown; a restarted autoscaler
//! finds the instance still waiting and starts again: `POST /drain` is idempotent).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::asg::{Aws, GroupState, Hook, Transition};
use crate::config::{Config, GroupConfig};
use crate::decide::{Decider, Decision, Direction, Input, Reading};
use crate::http::Http;
use crate::instance::Admin;
use crate::metrics::{GroupLabels, Metrics, MissingLabels};
use crate::prom::{Prometheus, SignalValue};

/// Liveness of the loop for `/healthz`.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix milliseconds of the last finished evaluation round (0: none yet).
    last_round_ms: AtomicU64,
    /// The longest a round may be in the past before the loop counts as stuck.
    pub max_age_ms: AtomicU64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Health {
    pub fn new(max_age: Duration) -> Health {
        let h = Health::default();
        // Starting counts as a round, so a fresh process is healthy until it is overdue.
        h.last_round_ms.store(unix_ms(), Ordering::SeqCst);
        h.max_age_ms.store(max_age.as_millis() as u64, Ordering::SeqCst);
        h
    }

    pub fn round_done(&self) {
        self.last_round_ms.store(unix_ms(), Ordering::SeqCst);
    }

    /// Ok(age) when the last round is recent enough, Err(age) when the loop looks stuck.
    pub fn check(&self) -> Result<Duration, Duration> {
        let age = Duration::from_millis(unix_ms().saturating_sub(self.last_round_ms.load(Ordering::SeqCst)));
        if age.as_millis() as u64 <= self.max_age_ms.load(Ordering::SeqCst) {
            Ok(age)
        } else {
            Err(age)
        }
    }
}

/// What happened to one group in one round.
#[derive(Debug, Clone)]
pub struct GroupOutcome {
    pub group: String,
    /// None when the group could not be read.
    pub decision: Option<Decision>,
    /// The group's state as read this round.
    pub state: Option<GroupState>,
    pub error: Option<String>,
}

/// Shared by the loop and the lifecycle tasks.
struct Shared {
    aws: Aws,
    metrics: Arc<Metrics>,
    dry_run: bool,
}

struct GroupRuntime {
    cfg: Arc<GroupConfig>,
    decider: Decider,
    admin: Admin,
    /// InService instance → when first seen in service; instances found at start count as warm.
    in_service_since: HashMap<String, Instant>,
    first_round: bool,
    /// Lifecycle task per held instance.
    tasks: HashMap<String, JoinHandle<()>>,
    /// Instances whose lifecycle action we completed (not retried if still listed as waiting).
    completed: Arc<std::sync::Mutex<HashSet<String>>>,
}

pub struct Controller {
    cfg: Config,
    prom: Prometheus,
    shared: Arc<Shared>,
    groups: Vec<GroupRuntime>,
    started: Instant,
    health: Arc<Health>,
}

impl Controller {
    /// Builds the controller; `sdk` comes from [`crate::asg::sdk_config`].
    pub fn new(cfg: Config, sdk: &SdkConfig) -> anyhow::Result<Controller> {
        let metrics = Arc::new(Metrics::new());
        let http = Http::new();
        let aws = Aws::new(sdk, &cfg.aws, http.clone(), metrics.clone());
        let prom = Prometheus::new(
            http.clone(),
            &cfg.prometheus.url,
            cfg.prometheus.timeout,
            cfg.prometheus.max_sample_age,
        );
        let mut groups = Vec::new();
        for g in &cfg.groups {
            let token = match &g.admin_token_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("admin_token_file {}: {e}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            metrics.init_group(&g.name, &g.signals.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
            groups.push(GroupRuntime {
                cfg: Arc::new(g.clone()),
                decider: Decider::new(g.policy.clone()),
                admin: Admin::new(http.clone(), token, Duration::from_secs(5)),
                in_service_since: HashMap::new(),
                first_round: true,
                tasks: HashMap::new(),
                completed: Arc::default(),
            });
        }
        // A round may take the AWS and Prometheus timeouts on top of the interval.
        let max_age = cfg.interval * 3 + cfg.aws.timeout * 2 + cfg.prometheus.timeout * 2;
        Ok(Controller {
            prom,
            shared: Arc::new(Shared {
                aws,
                metrics,
                dry_run: cfg.dry_run,
            }),
            groups,
            started: Instant::now(),
            health: Arc::new(Health::new(max_age)),
            cfg,
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The AWS calls the controller makes (tests use its client to set groups up).
    pub fn aws(&self) -> &Aws {
        &self.shared.aws
    }

    /// Evaluates every group every `interval` until `shutdown` resolves; then aborts lifecycle
    /// tasks in progress.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.round().await;
                }
                _ = &mut shutdown => break,
            }
        }
        for g in &mut self.groups {
            for (_, t) in g.tasks.drain() {
                t.abort();
            }
        }
    }

    /// One evaluation of every group.
    pub async fn round(&mut self) -> Vec<GroupOutcome> {
        let mut out = Vec::new();
        for i in 0..self.groups.len() {
            out.push(self.evaluate(i).await);
        }
        self.health.round_done();
        out
    }

    async fn evaluate(&mut self, i: usize) -> GroupOutcome {
        let now = Instant::now();
        let elapsed = now.duration_since(self.started);
        let shared = self.shared.clone();
        let g = &mut self.groups[i];
        let name = g.cfg.name.clone();
        let fail = |error: String, state: Option<GroupState>| {
            tracing::error!(group = %name, error = %error, "evaluation failed");
            GroupOutcome {
                group: name.clone(),
                decision: None,
                state,
                error: Some(error),
            }
        };
        let state = match shared.aws.describe_group(&name).await {
            Ok(s) => s,
            Err(e) => return fail(e.to_string(), None),
        };

        // Warm-up bookkeeping.
        let warm_up = g.cfg.policy.warm_up;
        let in_service: Vec<&str> = state
            .instances
            .iter()
            .filter(|i| i.lifecycle_state == "InService")
            .map(|i| i.id.as_str())
            .collect();
        let first = g.first_round;
        g.in_service_since.retain(|id, _| in_service.contains(&id.as_str()));
        for id in &in_service {
            g.in_service_since.entry(id.to_string()).or_insert_with(|| {
                if first {
                    now.checked_sub(warm_up).unwrap_or(now)
                } else {
                    now
                }
            });
        }
        g.first_round = false;
        let warming = g
            .in_service_since
            .values()
            .filter(|since| now.duration_since(**since) < warm_up)
            .count() as u32;

        // Signals.
        let mut readings = Vec::new();
        for s in &g.cfg.signals {
            let v = self.prom.read(&s.query).await;
            if let SignalValue::Missing(reason, detail) = &v {
                tracing::warn!(group = %name, signal = %s.name, reason = reason.as_str(), detail = %detail, "signal missing: no scale-in this round");
                shared
                    .metrics
                    .signal_missing
                    .get_or_create(&MissingLabels {
                        group: name.clone(),
                        signal: s.name.clone(),
                        reason: reason.as_str().into(),
                    })
                    .inc();
            }
            readings.push(Reading::new(&s.name, v.value(), s.target));
        }

        let input = Input {
            now: elapsed,
            desired: state.desired,
            in_service: in_service.len() as u32,
            warming,
            pending: state.pending(),
            readings,
        };
        let mut d = g.decider.step(&input);
        // The group's own bounds: AWS refuses a desired capacity outside them.
        if state.min <= state.max {
            let bounded = d.desired.clamp(state.min, state.max);
            if bounded != d.desired {
                tracing::warn!(group = %name, wanted = d.desired, min = state.min, max = state.max, "decision outside the group's own min/max; clamped");
                d.desired = bounded;
                d.direction = match bounded.cmp(&state.desired) {
                    std::cmp::Ordering::Greater => Direction::Up,
                    std::cmp::Ordering::Less => Direction::Down,
                    std::cmp::Ordering::Equal => Direction::None,
                };
            }
        }
        log_decision(&name, &input, &d, shared.dry_run);
        shared.metrics.record_decision(&name, input.in_service, &d);

        let mut error = None;
        if d.direction != Direction::None && !shared.dry_run {
            if let Err(e) = shared.aws.set_desired_capacity(&name, d.desired).await {
                tracing::error!(group = %name, desired = d.desired, error = %e, "SetDesiredCapacity failed");
                error = Some(e.to_string());
            }
        }

        if let Err(e) = self.lifecycle(i, &state).await {
            error.get_or_insert(e);
        }
        GroupOutcome {
            group: self.groups[i].cfg.name.clone(),
            decision: Some(d),
            state: Some(state),
            error,
        }
    }

    /// Starts a task for each instance newly held in `Terminating:Wait` or `Pending:Wait`.
    async fn lifecycle(&mut self, i: usize, state: &GroupState) -> Result<(), String> {
        let shared = self.shared.clone();
        let g = &mut self.groups[i];
        let name = g.cfg.name.clone();
        g.tasks.retain(|_, t| !t.is_finished());
        let held: Vec<(String, Transition)> = state
            .instances
            .iter()
            .filter_map(|inst| match inst.lifecycle_state.as_str() {
                "Terminating:Wait" => Some((inst.id.clone(), Transition::Terminating)),
                "Pending:Wait" => Some((inst.id.clone(), Transition::Launching)),
                _ => None,
            })
            .collect();
        {
            // Forget completions of instances that left the wait states.
            let mut done = g.completed.lock().unwrap_or_else(|e| e.into_inner());
            done.retain(|id| held.iter().any(|(h, _)| h == id));
        }
        if held.is_empty() {
            shared
                .metrics
                .draining
                .get_or_create(&GroupLabels { group: name })
                .set(0);
            return Ok(());
        }
        let hooks = shared.aws.hooks(&name).await.map_err(|e| e.to_string())?;
        for (id, transition) in held {
            if g.tasks.contains_key(&id) || g.completed.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
                continue;
            }
            let Some(hook) = hooks.iter().find(|h| h.transition == transition).cloned() else {
                tracing::warn!(group = %name, instance = %id, transition = transition.as_str(), "instance in a wait state but the group has no such lifecycle hook");
                continue;
            };
            if shared.dry_run {
                println!(
                    "dry-run: group={name} instance={id} {}: would {} and complete lifecycle hook {}",
                    match transition {
                        Transition::Terminating => "Terminating:Wait",
                        Transition::Launching => "Pending:Wait",
                    },
                    match transition {
                        Transition::Terminating => "drain it",
                        Transition::Launching => "wait for /readyz",
                    },
                    hook.name
                );
                g.completed.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
                continue;
            }
            let task = HeldInstance {
                shared: shared.clone(),
                cfg: g.cfg.clone(),
                admin: g.admin.clone(),
                hook,
                id: id.clone(),
                completed: g.completed.clone(),
            };
            let handle = match transition {
                Transition::Terminating => tokio::spawn(task.drain()),
                Transition::Launching => tokio::spawn(task.await_ready()),
            };
            g.tasks.insert(id, handle);
        }
        let draining = g.tasks.len();
        shared
            .metrics
            .draining
            .get_or_create(&GroupLabels { group: name })
            .set(draining as i64);
        Ok(())
    }
}

fn log_decision(group: &str, input: &Input, d: &Decision, dry_run: bool) {
    let signals: Vec<String> = d
        .signals
        .iter()
        .map(|s| {
            format!(
                "{}={}/{}→{}",
                s.signal,
                s.value.map_or("missing".to_string(), |v| format!("{v:.3}")),
                s.target,
                s.recommendation.map_or("-".to_string(), |r| r.to_string())
            )
        })
        .collect();
    let notes: Vec<&str> = d.notes.iter().map(|n| n.as_str()).collect();
    tracing::info!(
        group,
        direction = d.direction.as_str(),
        previous = d.previous,
        desired = d.desired,
        recommended = d.recommended,
        in_service = input.in_service,
        warming = input.warming,
        pending = input.pending,
        signals = %signals.join(" "),
        missing = %d.missing.join(","),
        notes = %notes.join(","),
        dry_run,
        "decision"
    );
    if dry_run {
        println!(
            "dry-run: group={group} {} desired {} -> {} recommended={} in_service={} warming={} pending={} signals=[{}] notes=[{}]",
            d.direction.as_str(),
            d.previous,
            d.desired,
            d.recommended,
            input.in_service,
            input.warming,
            input.pending,
            signals.join(" "),
            notes.join(",")
        );
    }
}

/// One instance held by a lifecycle hook, and what to do before letting it go.
struct HeldInstance {
    shared: Arc<Shared>,
    cfg: Arc<GroupConfig>,
    admin: Admin,
    hook: Hook,
    id: String,
    completed: Arc<std::sync::Mutex<HashSet<String>>>,
}

impl HeldInstance {
    async fn address(&self) -> Result<SocketAddr, String> {
        if let Some(a) = self.cfg.admin_address_overrides.get(&self.id) {
            return Ok(*a);
        }
        let ips = self
            .shared
            .aws
            .private_ips(std::slice::from_ref(&self.id))
            .await
            .map_err(|e| e.to_string())?;
        let ip = ips
            .get(&self.id)
            .ok_or_else(|| format!("instance {} has no private IP", self.id))?;
        Ok(SocketAddr::new(*ip, self.cfg.admin_port))
    }

    async fn complete(&self, transition: &str, result: &str) {
        let g = &self.cfg.name;
        match self
            .shared
            .aws
            .complete_lifecycle_action(g, &self.hook.name, &self.id)
            .await
        {
            Ok(()) => {
                tracing::info!(group = %g, instance = %self.id, hook = %self.hook.name, transition, result, "lifecycle action completed: CONTINUE");
                self.completed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(self.id.clone());
                self.shared.metrics.lifecycle(g, transition, result);
            }
            Err(e) => {
                tracing::error!(group = %g, instance = %self.id, error = %e, "CompleteLifecycleAction failed; retried next round");
                self.shared.metrics.lifecycle(g, transition, "failed");
            }
        }
    }

    /// Drain, wait for in-flight to reach zero (heartbeating), complete.
    async fn drain(self) {
        let g = self.cfg.name.clone();
        let started = Instant::now();
        let deadline = started + self.cfg.drain_timeout;
        let poll = self.cfg.drain_poll_interval;
        let mut last_heartbeat = started;
        let mut addr = None;
        let mut drain_started = false;
        let mut unreachable = 0u32;
        let mut last_load = None;
        tracing::info!(group = %g, instance = %self.id, hook = %self.hook.name, "instance terminating: draining it");
        let result = loop {
            if Instant::now() >= deadline {
                break "drain_timeout";
            }
            if addr.is_none() {
                match self.address().await {
                    Ok(a) => addr = Some(a),
                    Err(e) => tracing::warn!(group = %g, instance = %self.id, error = %e, "no admin address yet"),
                }
            }
            if let Some(a) = addr {
                if !drain_started {
                    match self.admin.drain(a).await {
                        Ok(()) => {
                            drain_started = true;
                            tracing::info!(group = %g, instance = %self.id, admin = %a, "POST /drain accepted");
                        }
                        Err(e) => {
                            tracing::warn!(group = %g, instance = %self.id, admin = %a, error = %e, "POST /drain failed; retrying")
                        }
                    }
                }
                if drain_started {
                    match self.admin.load(a).await {
                        Ok(l) => {
                            unreachable = 0;
                            if last_load != Some(l) {
                                tracing::info!(group = %g, instance = %self.id, in_flight = l.in_flight, connections = l.connections, draining = l.draining, "drain progress");
                                last_load = Some(l);
                            }
                            if l.drained() {
                                break "completed";
                            }
                        }
                        Err(e) => {
                            // The drain was accepted; an instance that stops answering has
                            // exited (nothing left in flight). A few misses, not one blip.
                            unreachable += 1;
                            tracing::warn!(group = %g, instance = %self.id, error = %e, misses = unreachable, "instance metrics unreachable");
                            if unreachable >= 3 {
                                break "unreachable";
                            }
                        }
                    }
                }
            }
            if last_heartbeat.elapsed() >= self.cfg.heartbeat_interval {
                match self.shared.aws.heartbeat(&g, &self.hook.name, &self.id).await {
                    Ok(()) => tracing::debug!(group = %g, instance = %self.id, "lifecycle heartbeat"),
                    Err(e) => tracing::warn!(group = %g, instance = %self.id, error = %e, "lifecycle heartbeat failed"),
                }
                last_heartbeat = Instant::now();
            }
            tokio::time::sleep(poll).await;
        };
        if result == "drain_timeout" {
            tracing::warn!(group = %g, instance = %self.id, timeout = ?self.cfg.drain_timeout, last = ?last_load, "drain timed out; letting the instance go");
        }
        self.complete("terminating", result).await;
    }

    /// CONTINUE once `/readyz` is 200; on `launch_ready_timeout` the hook's own timeout decides.
    async fn await_ready(self) {
        let g = self.cfg.name.clone();
        let deadline = Instant::now() + self.cfg.launch_ready_timeout;
        let mut addr = None;
        while Instant::now() < deadline {
            if addr.is_none() {
                addr = self.address().await.ok();
            }
            if let Some(a) = addr {
                if let Ok(true) = self.admin.ready(a).await {
                    tracing::info!(group = %g, instance = %self.id, admin = %a, "instance ready");
                    self.complete("launching", "completed").await;
                    return;
                }
            }
            tokio::time::sleep(self.cfg.drain_poll_interval).await;
        }
        tracing::warn!(group = %g, instance = %self.id, "instance not ready in time; the hook's timeout decides");
        self.shared.metrics.lifecycle(&g, "launching", "not_ready");
        // Not retried while still in Pending:Wait.
        self.completed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.id.clone());
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped or aborted.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let m = metrics.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = health.clone();
                async move {
                    match h.check() {
                        Ok(age) => (
                            StatusCode::OK,
                            format!("ok: last round {:.1} s ago\n", age.as_secs_f64()),
                        ),
                        Err(age) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("stuck: last round {:.1} s ago\n", age.as_secs_f64()),
                        ),
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

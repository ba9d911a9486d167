//! The autoscaler's own metrics (`GET /metrics`). Label values are group and signal names from
//! the config and fixed sets (direction, reason, operation, kind, transition, result).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::asg::ErrorKind;
use crate::decide::Decision;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    pub group: String,
    pub signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MissingLabels {
    pub group: String,
    pub signal: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub group: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsErrorLabels {
    pub operation: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LifecycleLabels {
    pub group: String,
    pub transition: String,
    pub result: String,
}

type FGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub current: Family<GroupLabels, Gauge>,
    pub desired: Family<GroupLabels, Gauge>,
    pub recommended: Family<GroupLabels, Gauge>,
    pub signal_value: Family<SignalLabels, FGauge>,
    pub signal_missing: Family<MissingLabels, Counter>,
    pub decisions: Family<DirectionLabels, Counter>,
    pub aws_errors: Family<AwsErrorLabels, Counter>,
    pub lifecycle_actions: Family<LifecycleLabels, Counter>,
    pub draining: Family<GroupLabels, Gauge>,
    pub last_evaluation: Family<GroupLabels, FGauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        let current = reg!(
            "meshgate_autoscaler_current_capacity",
            "Instances in service in the group",
            Family::<GroupLabels, Gauge>::default()
        );
        let desired = reg!(
            "meshgate_autoscaler_desired_capacity",
            "The group's desired capacity after the last decision",
            Family::<GroupLabels, Gauge>::default()
        );
        let recommended = reg!(
            "meshgate_autoscaler_recommended_capacity",
            "The capacity the signals recommend, before stabilization and the scale-up limit",
            Family::<GroupLabels, Gauge>::default()
        );
        let signal_value = reg!(
            "meshgate_autoscaler_signal_value",
            "The last value of each signal (per instance); NaN when missing",
            Family::<SignalLabels, FGauge>::default()
        );
        let signal_missing = reg!(
            "meshgate_autoscaler_signal_missing",
            "Evaluations where a signal had no usable value, by reason (error, empty, ambiguous, nan, stale)",
            Family::<MissingLabels, Counter>::default()
        );
        let decisions = reg!(
            "meshgate_autoscaler_decisions",
            "Decisions, by direction (up, down, none)",
            Family::<DirectionLabels, Counter>::default()
        );
        let aws_errors = reg!(
            "meshgate_autoscaler_aws_errors",
            "Failed AWS call attempts, by operation and kind (throttling, resource_contention, transport, other)",
            Family::<AwsErrorLabels, Counter>::default()
        );
        let lifecycle_actions = reg!(
            "meshgate_autoscaler_lifecycle_actions",
            "Lifecycle actions handled, by transition and result (completed, drain_timeout, failed)",
            Family::<LifecycleLabels, Counter>::default()
        );
        let draining = reg!(
            "meshgate_autoscaler_instances_draining",
            "Instances in Terminating:Wait being drained now",
            Family::<GroupLabels, Gauge>::default()
        );
        let last_evaluation = reg!(
            "meshgate_autoscaler_last_evaluation_timestamp_seconds",
            "When the group was last evaluated successfully (Unix time)",
            Family::<GroupLabels, FGauge>::default()
        );
        // Every AWS error series exists at 0 from the start, so `increase()` sees the first one.
        for operation in [
            "DescribeAutoScalingGroups",
            "SetDesiredCapacity",
            "DescribeLifecycleHooks",
            "CompleteLifecycleAction",
            "RecordLifecycleActionHeartbeat",
            "DescribeInstances",
        ] {
            for kind in [
                ErrorKind::Throttling,
                ErrorKind::ResourceContention,
                ErrorKind::Transport,
                ErrorKind::Other,
            ] {
                let _ = aws_errors.get_or_create(&AwsErrorLabels {
                    operation: operation.into(),
                    kind: kind.as_str().into(),
                });
            }
        }
        Metrics {
            registry: r,
            current,
            desired,
            recommended,
            signal_value,
            signal_missing,
            decisions,
            aws_errors,
            lifecycle_actions,
            draining,
            last_evaluation,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn aws_error(&self, operation: &str, kind: ErrorKind) {
        self.aws_errors
            .get_or_create(&AwsErrorLabels {
                operation: operation.to_string(),
                kind: kind.as_str().to_string(),
            })
            .inc();
    }

    pub fn lifecycle(&self, group: &str, transition: &str, result: &str) {
        self.lifecycle_actions
            .get_or_create(&LifecycleLabels {
                group: group.to_string(),
                transition: transition.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn record_decision(&self, group: &str, in_service: u32, d: &Decision) {
        let g = GroupLabels {
            group: group.to_string(),
        };
        self.current.get_or_create(&g).set(i64::from(in_service));
        self.desired.get_or_create(&g).set(i64::from(d.desired));
        self.recommended.get_or_create(&g).set(i64::from(d.recommended));
        for s in &d.signals {
            self.signal_value
                .get_or_create(&SignalLabels {
                    group: group.to_string(),
                    signal: s.signal.clone(),
                })
                .set(s.value.unwrap_or(f64::NAN));
        }
        self.decisions
            .get_or_create(&DirectionLabels {
                group: group.to_string(),
                direction: d.direction.as_str().to_string(),
            })
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.last_evaluation.get_or_create(&g).set(now);
    }

    /// Registers every series of a group at zero, so dashboards and `increase()` see them
    /// before the first event.
    pub fn init_group(&self, group: &str, signals: &[String]) {
        for direction in ["up", "down", "none"] {
            let _ = self.decisions.get_or_create(&DirectionLabels {
                group: group.to_string(),
                direction: direction.into(),
            });
        }
        for s in signals {
            for reason in ["error", "empty", "ambiguous", "nan", "stale"] {
                let _ = self.signal_missing.get_or_create(&MissingLabels {
                    group: group.to_string(),
                    signal: s.clone(),
                    reason: reason.into(),
                });
            }
        }
        let _ = self.draining.get_or_create(&GroupLabels {
            group: group.to_string(),
        });
    }
}

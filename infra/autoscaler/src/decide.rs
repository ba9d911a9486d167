//! The scaling decision: a pure function of the group's state, the signal readings and the
//! recent past (no I/O, no clock: time comes in as [`Input::now`]). The controller, `--dry-run`
//! and `simulate` all run this same code.
//!
//! The rule is Kubernetes HPA's, applied to an Auto Scaling group:
//! 1. per signal, `recommendation = ceil(base × value / target)`, where `value` is the signal per
//!    instance and `base` the instances in service that are past their warm-up (the warming ones'
//!    share of the metric is ignored: they have not taken their load yet). Within the tolerance
//!    band (`|value/target − 1| ≤ tolerance`) the recommendation is the current desired capacity;
//! 2. the largest recommendation of all signals wins;
//! 3. missing, stale or NaN data never shrinks the group: a missing signal floors the
//!    recommendation at the current desired capacity (the other signals may still grow it), and
//!    with no data at all the capacity holds. The controller logs and counts each case;
//! 4. while instances are launching or warming up the group does not shrink either (their
//!    metrics would pull the average down before the load balancer has shifted load to them);
//! 5. bounds `[min, max]`;
//! 6. scale-down stabilization: the highest recommendation within the window wins, so a dip has
//!    to last the whole window before capacity goes, and a flapping signal cannot flap capacity;
//! 7. scale-up limit: within any `scale_up_period` the group grows to at most
//!    `max(base + scale_up_max_instances, ceil(base × (1 + scale_up_max_percent/100)))`, where
//!    `base` is the capacity at the start of the period.
//!
//! Rejected: AWS target tracking (cannot read Prometheus) and step scaling (needs CloudWatch
//! alarms and tuned steps; the proportional rule needs only a target).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// The knobs of the rule, per group.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub tolerance: f64,
    pub min: u32,
    pub max: u32,
    pub scale_up_max_instances: u32,
    pub scale_up_max_percent: f64,
    pub scale_up_period: Duration,
    pub scale_down_stabilization: Duration,
    pub warm_up: Duration,
}

impl Default for Policy {
    /// The documented defaults, with bounds 1..=10.
    fn default() -> Self {
        Policy {
            tolerance: 0.1,
            min: 1,
            max: 10,
            scale_up_max_instances: 4,
            scale_up_max_percent: 100.0,
            scale_up_period: Duration::from_secs(60),
            scale_down_stabilization: Duration::from_secs(300),
            warm_up: Duration::from_secs(120),
        }
    }
}

/// One signal's value per instance; None when missing or stale.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub signal: String,
    pub value: Option<f64>,
    pub target: f64,
}

impl Reading {
    pub fn new(signal: &str, value: Option<f64>, target: f64) -> Reading {
        Reading {
            signal: signal.to_string(),
            value,
            target,
        }
    }
}

/// What the controller knows about the group at one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// Time since an arbitrary origin; only differences matter.
    pub now: Duration,
    /// The group's desired capacity now.
    pub desired: u32,
    /// Instances in service (`InService`).
    pub in_service: u32,
    /// Of those, the ones in service for less than the warm-up.
    pub warming: u32,
    /// Instances launching (`Pending`, `Pending:Wait`, `Pending:Proceed`).
    pub pending: u32,
    pub readings: Vec<Reading>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
    None,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::None => "none",
        }
    }
}

/// Why the decision is what it is (several may apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Every present signal is within the tolerance band.
    WithinTolerance,
    /// Some signal has no usable value: no scale-in.
    MissingData,
    /// No signal has a usable value: capacity holds.
    NoData,
    /// No instance is in service to size a per-instance value by: capacity holds.
    NoInstances,
    /// Instances are launching or warming up: no scale-in.
    WarmingUp,
    /// Raised to `min`.
    AtMin,
    /// Lowered to `max`.
    AtMax,
    /// A higher recommendation within the stabilization window held capacity up.
    Stabilized,
    /// The scale-up limit cut the step.
    ScaleUpLimited,
}

impl Note {
    pub fn as_str(self) -> &'static str {
        match self {
            Note::WithinTolerance => "within_tolerance",
            Note::MissingData => "missing_data",
            Note::NoData => "no_data",
            Note::NoInstances => "no_instances",
            Note::WarmingUp => "warming_up",
            Note::AtMin => "at_min",
            Note::AtMax => "at_max",
            Note::Stabilized => "stabilized",
            Note::ScaleUpLimited => "scale_up_limited",
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One signal's part in a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalOutcome {
    pub signal: String,
    /// The usable value (None: missing, stale, NaN, infinite or negative).
    pub value: Option<f64>,
    pub target: f64,
    pub recommendation: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The desired capacity before this decision.
    pub previous: u32,
    /// The new desired capacity.
    pub desired: u32,
    /// The recommendation after the data, warm-up and bound rules, before stabilization and
    /// the scale-up limit.
    pub recommended: u32,
    pub direction: Direction,
    pub signals: Vec<SignalOutcome>,
    /// Names of the signals without usable data.
    pub missing: Vec<String>,
    pub notes: Vec<Note>,
}

impl Decision {
    pub fn has(&self, n: Note) -> bool {
        self.notes.contains(&n)
    }
}

/// The rule plus the little history it needs (recent recommendations, recent scale-ups).
#[derive(Debug, Clone)]
pub struct Decider {
    policy: Policy,
    /// (time, recommendation) within the stabilization window.
    history: VecDeque<(Duration, u32)>,
    /// (time, capacity before) of scale-ups within the scale-up period.
    ups: VecDeque<(Duration, u32)>,
}

/// `ceil(x)` that ignores floating point dust (`2 × 1.5 = 3.0000000000000004` must give 3).
fn ceil(x: f64) -> u32 {
    let c = (x - 1e-9).ceil();
    if c <= 0.0 {
        0
    } else if c >= u32::MAX as f64 {
        u32::MAX
    } else {
        c as u32
    }
}

impl Decider {
    pub fn new(policy: Policy) -> Decider {
        Decider {
            policy,
            history: VecDeque::new(),
            ups: VecDeque::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn step(&mut self, inp: &Input) -> Decision {
        let p = &self.policy;
        let mut notes = Vec::new();
        let settled = inp.in_service.saturating_sub(inp.warming);
        // All in service are warming (the group just grew from nothing): size by all of them;
        // the warm-up rule below still prevents a scale-in.
        let base = if settled > 0 { settled } else { inp.in_service };

        let mut signals = Vec::new();
        let mut missing = Vec::new();
        let mut best: Option<u32> = None;
        let mut all_within = true;
        for r in &inp.readings {
            let value = r.value.filter(|v| v.is_finite() && *v >= 0.0);
            let recommendation = match value {
                None => {
                    missing.push(r.signal.clone());
                    None
                }
                Some(_) if base == 0 => None,
                Some(v) => {
                    let ratio = v / r.target;
                    // The epsilon keeps a value exactly on the band's edge inside it (1.1 − 1 > 0.1 in f64).
                    if (ratio - 1.0).abs() <= p.tolerance + 1e-9 {
                        Some(inp.desired)
                    } else {
                        all_within = false;
                        Some(ceil(base as f64 * ratio))
                    }
                }
            };
            if let Some(x) = recommendation {
                best = Some(best.map_or(x, |b| b.max(x)));
            }
            signals.push(SignalOutcome {
                signal: r.signal.clone(),
                value,
                target: r.target,
                recommendation,
            });
        }

        let mut rec = match best {
            Some(b) => {
                if all_within {
                    notes.push(Note::WithinTolerance);
                }
                b
            }
            None => {
                if base == 0 && missing.len() < inp.readings.len() {
                    notes.push(Note::NoInstances);
                } else {
                    notes.push(Note::NoData);
                }
                inp.desired
            }
        };
        if !missing.is_empty() && best.is_some() {
            notes.push(Note::MissingData);
            rec = rec.max(inp.desired);
        }
        if (inp.warming > 0 || inp.pending > 0) && rec < inp.desired {
            notes.push(Note::WarmingUp);
            rec = inp.desired;
        }
        if rec < p.min {
            notes.push(Note::AtMin);
            rec = p.min;
        }
        if rec > p.max {
            notes.push(Note::AtMax);
            rec = p.max;
        }
        let recommended = rec;

        // Stabilization: the highest recommendation within the window.
        let now = inp.now;
        self.history.push_back((now, rec));
        while let Some(&(t, _)) = self.history.front() {
            if now.saturating_sub(t) > p.scale_down_stabilization {
                self.history.pop_front();
            } else {
                break;
            }
        }
        let highest = self.history.iter().map(|&(_, r)| r).max().unwrap_or(rec);
        let mut desired = if rec > inp.desired {
            rec
        } else {
            let held = inp.desired.min(highest).max(rec);
            if held > rec {
                notes.push(Note::Stabilized);
            }
            held
        };

        // Scale-up limit, relative to the capacity at the start of the period.
        while let Some(&(t, _)) = self.ups.front() {
            if now.saturating_sub(t) >= p.scale_up_period {
                self.ups.pop_front();
            } else {
                break;
            }
        }
        if desired > inp.desired {
            let start = self.ups.iter().map(|&(_, from)| from).min().unwrap_or(inp.desired);
            let start = start.min(inp.desired);
            let limit = start
                .saturating_add(p.scale_up_max_instances)
                .max(ceil(start as f64 * (1.0 + p.scale_up_max_percent / 100.0)));
            if desired > limit {
                notes.push(Note::ScaleUpLimited);
                desired = limit.max(inp.desired);
            }
            if desired > inp.desired {
                self.ups.push_back((now, inp.desired));
            }
        }
        desired = desired.clamp(p.min, p.max);

        let direction = match desired.cmp(&inp.desired) {
            std::cmp::Ordering::Greater => Direction::Up,
            std::cmp::Ordering::Less => Direction::Down,
            std::cmp::Ordering::Equal => Direction::None,
        };
        Decision {
            previous: inp.desired,
            desired,
            recommended,
            direction,
            signals,
            missing,
            notes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A policy without stabilization, warm-up or a binding scale-up limit, bounds 1..=100:
    /// each test turns on what it is about.
    fn plain() -> Policy {
        Policy {
            tolerance: 0.1,
            min: 1,
            max: 100,
            scale_up_max_instances: 1000,
            scale_up_max_percent: 0.0,
            scale_up_period: secs(60),
            scale_down_stabilization: Duration::ZERO,
            warm_up: Duration::ZERO,
        }
    }

    /// A steady group of `n` instances, all in service and warm, with one signal of target 10.
    fn input(t: u64, n: u32, value: Option<f64>) -> Input {
        Input {
            now: secs(t),
            desired: n,
            in_service: n,
            warming: 0,
            pending: 0,
            readings: vec![Reading::new("load", value, 10.0)],
        }
    }

    #[test]
    fn proportional_rule_and_tolerance_band() {
        // (instances, value per instance with target 10, tolerance, expected desired)
        let table: &[(u32, f64, f64, u32)] = &[
            (4, 10.0, 0.1, 4),   // on target
            (4, 10.9, 0.1, 4),   // +9 %: inside the band
            (4, 9.1, 0.1, 4),    // −9 %: inside the band
            (4, 11.0, 0.1, 4),   // +10 % exactly: still inside (|ratio − 1| ≤ tolerance)
            (4, 11.5, 0.1, 5),   // +15 %: ceil(4 × 1.15) = 5
            (4, 8.5, 0.1, 4),    // −15 %: ceil(4 × 0.85 = 3.4) = 4
            (4, 7.4, 0.1, 3),    // ceil(2.96) = 3
            (4, 20.0, 0.1, 8),   // double the load, double the fleet
            (4, 0.0, 0.1, 1),    // idle: down to min
            (2, 15.0, 0.0, 3),   // no tolerance: 2 × 1.5 = 3 exactly, no float dust
            (10, 10.4, 0.0, 11), // no tolerance: any excess adds an instance
            (10, 10.4, 0.05, 10),
            (3, 10.0 / 3.0 * 2.0, 0.1, 2), // 3 × 0.666… = 2
        ];
        for &(n, v, tol, want) in table {
            let mut d = Decider::new(Policy {
                tolerance: tol,
                ..plain()
            });
            let dec = d.step(&input(0, n, Some(v)));
            assert_eq!(dec.desired, want, "n={n} v={v} tol={tol}: {dec:?}");
            assert_eq!(
                dec.has(Note::WithinTolerance),
                (v / 10.0 - 1.0).abs() <= tol + 1e-9,
                "{dec:?}"
            );
        }
    }

    #[test]
    fn bounds() {
        let pol = Policy {
            min: 2,
            max: 6,
            ..plain()
        };
        let table: &[(u32, Option<f64>, u32, Note)] = &[
            (4, Some(0.0), 2, Note::AtMin),
            (4, Some(100.0), 6, Note::AtMax),
            // A group below min is raised even without data.
            (1, None, 2, Note::AtMin),
            // A group above max is lowered to max (the operator's bound, not a measurement).
            (9, None, 6, Note::AtMax),
        ];
        for &(n, v, want, note) in table {
            let dec = Decider::new(pol.clone()).step(&input(0, n, v));
            assert_eq!(dec.desired, want, "{dec:?}");
            assert!(dec.has(note), "{dec:?}");
        }
    }

    #[test]
    fn largest_signal_wins() {
        let mut d = Decider::new(plain());
        let mut i = input(0, 4, Some(5.0)); // load says 2
        i.readings.push(Reading::new("cpu", Some(0.9), 0.6)); // cpu says 6
        let dec = d.step(&i);
        assert_eq!(dec.desired, 6, "{dec:?}");
        assert_eq!(dec.signals[0].recommendation, Some(2));
        assert_eq!(dec.signals[1].recommendation, Some(6));
    }

    #[test]
    fn missing_stale_and_nan_data_never_scale_in() {
        for bad in [None, Some(f64::NAN), Some(f64::INFINITY), Some(-1.0)] {
            // The only signal missing: hold.
            let dec = Decider::new(plain()).step(&input(0, 4, bad));
            assert_eq!((dec.desired, dec.direction), (4, Direction::None), "{bad:?}: {dec:?}");
            assert!(dec.has(Note::NoData), "{dec:?}");
            assert_eq!(dec.missing, vec!["load".to_string()]);

            // One of two signals missing, the other says shrink: hold.
            let mut i = input(0, 4, Some(1.0));
            i.readings.push(Reading::new("cpu", bad, 0.6));
            let dec = Decider::new(plain()).step(&i);
            assert_eq!(dec.desired, 4, "{dec:?}");
            assert!(dec.has(Note::MissingData), "{dec:?}");

            // One of two signals missing, the other says grow: grow.
            let mut i = input(0, 4, Some(20.0));
            i.readings.push(Reading::new("cpu", bad, 0.6));
            let dec = Decider::new(plain()).step(&i);
            assert_eq!(dec.desired, 8, "{dec:?}");
            assert_eq!(dec.direction, Direction::Up);
        }
    }

    #[test]
    fn scale_up_limit_per_period() {
        let pol = Policy {
            scale_up_max_instances: 4,
            scale_up_max_percent: 100.0,
            scale_up_period: secs(60),
            ..plain()
        };
        // (from, wanted by the load, allowed): max(+4, +100 %).
        for (n, v, want) in [(2, 100.0, 6), (10, 100.0, 20), (3, 20.0, 6), (4, 15.0, 6), (0, 0.0, 1)] {
            let mut i = input(0, n, Some(v));
            i.in_service = n.max(1);
            let dec = Decider::new(pol.clone()).step(&i);
            assert_eq!(dec.desired, want, "from {n}: {dec:?}");
        }

        // Within one period the limit is relative to the capacity at its start: 2 → 6 at t=0,
        // then at t=30 still at most 6 however high the load; at t=60 a new period: 6 → 12.
        let mut d = Decider::new(pol);
        let dec = d.step(&input(0, 2, Some(100.0)));
        assert_eq!(dec.desired, 6);
        assert!(dec.has(Note::ScaleUpLimited));
        let dec = d.step(&input(30, 6, Some(100.0)));
        assert_eq!((dec.desired, dec.direction), (6, Direction::None), "{dec:?}");
        assert!(dec.has(Note::ScaleUpLimited), "{dec:?}");
        let dec = d.step(&input(60, 6, Some(100.0)));
        assert_eq!(dec.desired, 12, "{dec:?}");
    }

    #[test]
    fn stabilization_window_holds_the_highest_recommendation() {
        let pol = Policy {
            scale_down_stabilization: secs(300),
            ..plain()
        };
        let mut d = Decider::new(pol);
        // 8 needed at t=0; then the load halves. Nothing goes for 300 s, then at once.
        assert_eq!(d.step(&input(0, 8, Some(10.0))).desired, 8);
        for t in [15, 100, 200, 299, 300] {
            let dec = d.step(&input(t, 8, Some(5.0)));
            assert_eq!(dec.desired, 8, "t={t}: {dec:?}");
            assert_eq!(dec.recommended, 4);
            assert!(dec.has(Note::Stabilized), "{dec:?}");
        }
        let dec = d.step(&input(301, 8, Some(5.0)));
        assert_eq!((dec.desired, dec.direction), (4, Direction::Down), "{dec:?}");

        // Gradual: the highest recommendation in the window, not the previous one.
        let mut d = Decider::new(Policy {
            scale_down_stabilization: secs(60),
            ..plain()
        });
        assert_eq!(d.step(&input(0, 10, Some(10.0))).desired, 10);
        assert_eq!(d.step(&input(30, 10, Some(7.0))).desired, 10); // rec 7
        assert_eq!(d.step(&input(61, 10, Some(5.0))).desired, 7); // rec 5; 7 from t=30 in window
        assert_eq!(d.step(&input(91, 7, Some(5.0 * 10.0 / 7.0))).desired, 5);

        // Scale-up is never delayed by the window.
        let mut d = Decider::new(Policy {
            scale_down_stabilization: secs(300),
            ..plain()
        });
        d.step(&input(0, 4, Some(2.0)));
        assert_eq!(d.step(&input(10, 4, Some(20.0))).desired, 8);
    }

    #[test]
    fn warm_up_ignores_new_instances_and_blocks_scale_in() {
        // 2 settled instances carry 30 each (target 10): the 4 warming ones do not count in the
        // base, so the fleet needs ceil(2 × 3) = 6, not ceil(6 × 3) = 18.
        let mut d = Decider::new(plain());
        let dec = d.step(&Input {
            now: secs(0),
            desired: 6,
            in_service: 6,
            warming: 4,
            pending: 0,
            readings: vec![Reading::new("load", Some(30.0), 10.0)],
        });
        assert_eq!(dec.desired, 6, "{dec:?}");

        // The new instances are ready and took load: the average falls, but no scale-in until
        // they are warm.
        let warming = Input {
            now: secs(10),
            desired: 6,
            in_service: 6,
            warming: 4,
            pending: 0,
            readings: vec![Reading::new("load", Some(10.0), 10.0 * 2.0)],
        };
        let dec = d.step(&warming);
        assert_eq!(dec.desired, 6, "{dec:?}");
        assert!(dec.has(Note::WarmingUp), "{dec:?}");
        // Same with instances still launching.
        let dec = Decider::new(plain()).step(&Input {
            warming: 0,
            pending: 2,
            in_service: 4,
            ..warming.clone()
        });
        assert_eq!(dec.desired, 6, "{dec:?}");
        assert!(dec.has(Note::WarmingUp));
        // Warm: the same reading shrinks the group.
        let dec = Decider::new(plain()).step(&Input {
            warming: 0,
            ..warming.clone()
        });
        assert_eq!((dec.desired, dec.direction), (3, Direction::Down), "{dec:?}");
        // All warming (grown from nothing): sized by all, scale-up still possible.
        let dec = Decider::new(plain()).step(&Input {
            now: secs(0),
            desired: 2,
            in_service: 2,
            warming: 2,
            pending: 0,
            readings: vec![Reading::new("load", Some(20.0), 10.0)],
        });
        assert_eq!(dec.desired, 4, "{dec:?}");
    }

    #[test]
    fn no_instances_in_service_holds() {
        let mut i = input(0, 3, Some(50.0));
        i.in_service = 0;
        i.pending = 3;
        let dec = Decider::new(plain()).step(&i);
        assert_eq!(dec.desired, 3, "{dec:?}");
        assert!(dec.has(Note::NoInstances), "{dec:?}");
    }

    /// Replays a per-instance trace on a group that follows its decisions at once; returns the
    /// number of capacity changes and the capacities.
    fn replay(pol: Policy, values: &[f64], step: u64) -> (usize, Vec<u32>) {
        let mut d = Decider::new(pol);
        let mut n = 4u32;
        let mut caps = Vec::new();
        let mut changes = 0;
        for (k, fleet_load) in values.iter().enumerate() {
            let dec = d.step(&input(k as u64 * step, n, Some(fleet_load / n as f64)));
            if dec.desired != n {
                changes += 1;
            }
            n = dec.desired;
            caps.push(n);
        }
        (changes, caps)
    }

    #[test]
    fn flapping_traces_do_not_flap_capacity() {
        // Fleet load alternating between needing 4 and 5 instances every 15 s for 10 minutes.
        let flap: Vec<f64> = (0..40).map(|k| if k % 2 == 0 { 45.0 } else { 36.0 }).collect();
        let stable = Policy {
            scale_down_stabilization: secs(300),
            ..plain()
        };
        let (changes, caps) = replay(stable, &flap, 15);
        assert_eq!(changes, 1, "{caps:?}");
        assert!(caps.iter().skip(1).all(|&c| c == 5), "{caps:?}");

        // Without the window the same trace flaps on every evaluation: the window is what helps.
        let (changes, _) = replay(plain(), &flap, 15);
        assert!(changes > 30, "{changes}");

        // Noise within the tolerance band changes nothing at all.
        let noise: Vec<f64> = (0..40).map(|k| 40.0 + if k % 2 == 0 { 3.0 } else { -3.0 }).collect();
        let (changes, caps) = replay(plain(), &noise, 15);
        assert_eq!(changes, 0, "{caps:?}");

        // A spike followed by a long dip: one step up, one step down after the window.
        let mut spike = vec![40.0; 4];
        spike.extend([120.0; 2]);
        spike.extend([40.0; 30]);
        let (changes, caps) = replay(
            Policy {
                scale_down_stabilization: secs(300),
                ..plain()
            },
            &spike,
            15,
        );
        assert_eq!(changes, 2, "{caps:?}");
        assert_eq!(*caps.iter().max().unwrap(), 12);
        assert_eq!(*caps.last().unwrap(), 4);
    }
}

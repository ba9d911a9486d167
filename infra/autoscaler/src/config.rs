//! The autoscaler's config file: YAML schema (unknown fields are errors), defaults, and
//! validation into an immutable [`Config`]. Every error names the file and line, like meshgate's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::decide::Policy;

/// The default load signal: requests in flight per ready meshgate instance. In-flight follows
/// load at once (no rate window to fill) and is what a meshgate instance saturates on: it is the
/// number of concurrent upstream streams and client connections it carries.
pub const DEFAULT_QUERY: &str =
    r#"sum(meshgate_requests_in_flight{job="meshgate"}) / clamp_min(sum(meshgate_ready{job="meshgate"}), 1)"#;

/// The name of a group's primary signal (`query` / `target`) in logs, metrics and traces.
pub const PRIMARY_SIGNAL: &str = "load";

// ---------------------------------------------------------------------------------------------
// Validated config

#[derive(Debug, Clone)]
pub struct Config {
    pub prometheus: PrometheusConfig,
    pub aws: AwsConfig,
    /// How often every group is evaluated.
    pub interval: Duration,
    /// Print decisions only: no SetDesiredCapacity, no drain, no lifecycle completion.
    pub dry_run: bool,
    /// The autoscaler's own `/metrics` and `/healthz`; None = not served.
    pub bind: Option<SocketAddr>,
    pub groups: Vec<GroupConfig>,
}

#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus:9090`.
    pub url: String,
    pub timeout: Duration,
    /// A sample older than this is stale and counts as missing data.
    pub max_sample_age: Duration,
}

#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// None = the standard chain (AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Sends every AWS call (Auto Scaling and EC2) here instead of AWS: for tests (moto) and
    /// VPC endpoints.
    pub endpoint_url: Option<String>,
    pub honor_cooldown: bool,
    /// Attempts per AWS call when throttled or on ResourceContention (1 = no retry).
    pub max_attempts: u32,
    /// First retry delay; doubles on each attempt, with jitter.
    pub retry_base_delay: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Signal {
    pub name: String,
    pub query: String,
    /// The value per instance the group is sized for.
    pub target: f64,
}

#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The Auto Scaling group name.
    pub name: String,
    /// The primary signal first, then `extra_signals`.
    pub signals: Vec<Signal>,
    pub policy: Policy,
    pub admin_port: u16,
    pub admin_token_file: Option<PathBuf>,
    /// Instance id → admin address, instead of `private_ip:admin_port`.
    pub admin_address_overrides: BTreeMap<String, SocketAddr>,
    pub drain_timeout: Duration,
    pub drain_poll_interval: Duration,
    pub heartbeat_interval: Duration,
    /// How long `Pending:Wait` instances get to report ready before the hook's own timeout
    /// decides; checked every `drain_poll_interval`.
    pub launch_ready_timeout: Duration,
}

// ---------------------------------------------------------------------------------------------
// Errors

use yamlconf::{line_of as line, Collector};
pub use yamlconf::{ConfigError, ConfigErrors};

fn spanned<T>(v: T) -> Spanned<T> {
    Spanned::new(v, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}

// ---------------------------------------------------------------------------------------------
// Schema

pub use yamlconf::{parse_duration, Dur};

fn dur(secs: f64) -> Spanned<Dur> {
    spanned(Dur(Duration::from_secs_f64(secs)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    prometheus: RawPrometheus,
    #[serde(default)]
    aws: RawAws,
    #[serde(default = "d_interval")]
    interval: Spanned<Dur>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    bind: Option<Spanned<String>>,
    groups: Vec<RawGroup>,
}

fn d_interval() -> Spanned<Dur> {
    dur(15.0)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrometheus {
    url: Spanned<String>,
    #[serde(default = "d_prom_timeout")]
    timeout: Spanned<Dur>,
    #[serde(default = "d_max_sample_age")]
    max_sample_age: Spanned<Dur>,
}

fn d_prom_timeout() -> Spanned<Dur> {
    dur(10.0)
}
fn d_max_sample_age() -> Spanned<Dur> {
    dur(120.0)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    endpoint_url: Option<Spanned<String>>,
    #[serde(default)]
    honor_cooldown: bool,
    #[serde(default = "d_max_attempts")]
    max_attempts: Spanned<u32>,
    #[serde(default = "d_retry_base")]
    retry_base_delay: Spanned<Dur>,
    #[serde(default = "d_aws_timeout")]
    timeout: Spanned<Dur>,
}

impl Default for RawAws {
    fn default() -> Self {
        RawAws {
            region: None,
            endpoint_url: None,
            honor_cooldown: false,
            max_attempts: d_max_attempts(),
            retry_base_delay: d_retry_base(),
            timeout: d_aws_timeout(),
        }
    }
}

fn d_max_attempts() -> Spanned<u32> {
    spanned(6)
}
fn d_retry_base() -> Spanned<Dur> {
    dur(0.2)
}
fn d_aws_timeout() -> Spanned<Dur> {
    dur(20.0)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignal {
    name: Spanned<String>,
    query: Spanned<String>,
    target: Spanned<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    #[serde(default = "d_query")]
    query: Spanned<String>,
    target: Spanned<f64>,
    #[serde(default)]
    extra_signals: Vec<RawSignal>,
    #[serde(default = "d_tolerance")]
    tolerance: Spanned<f64>,
    min_capacity: Spanned<u32>,
    max_capacity: Spanned<u32>,
    #[serde(default = "d_up_instances")]
    scale_up_max_instances: Spanned<u32>,
    #[serde(default = "d_up_percent")]
    scale_up_max_percent: Spanned<f64>,
    #[serde(default = "d_up_period")]
    scale_up_period: Spanned<Dur>,
    #[serde(default = "d_stabilization")]
    scale_down_stabilization: Spanned<Dur>,
    #[serde(default = "d_warm_up")]
    warm_up: Spanned<Dur>,
    #[serde(default = "d_admin_port")]
    admin_port: Spanned<u16>,
    #[serde(default)]
    admin_token_file: Option<String>,
    #[serde(default)]
    admin_address_overrides: BTreeMap<String, Spanned<String>>,
    #[serde(default = "d_drain_timeout")]
    drain_timeout: Spanned<Dur>,
    #[serde(default = "d_drain_poll")]
    drain_poll_interval: Spanned<Dur>,
    #[serde(default = "d_heartbeat")]
    heartbeat_interval: Spanned<Dur>,
    #[serde(default = "d_launch_ready")]
    launch_ready_timeout: Spanned<Dur>,
}

fn d_query() -> Spanned<String> {
    spanned(DEFAULT_QUERY.to_string())
}
fn d_tolerance() -> Spanned<f64> {
    spanned(0.1)
}
fn d_up_instances() -> Spanned<u32> {
    spanned(4)
}
fn d_up_percent() -> Spanned<f64> {
    spanned(100.0)
}
fn d_up_period() -> Spanned<Dur> {
    dur(60.0)
}
fn d_stabilization() -> Spanned<Dur> {
    dur(300.0)
}
fn d_warm_up() -> Spanned<Dur> {
    dur(120.0)
}
fn d_admin_port() -> Spanned<u16> {
    spanned(9901)
}
fn d_drain_timeout() -> Spanned<Dur> {
    dur(300.0)
}
fn d_drain_poll() -> Spanned<Dur> {
    dur(2.0)
}
fn d_heartbeat() -> Spanned<Dur> {
    dur(60.0)
}
fn d_launch_ready() -> Spanned<Dur> {
    dur(600.0)
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(path, &text)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Parses config text; `path` is only used in errors and to resolve relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        serde_saphyr::from_str(text).map_err(|e| ConfigErrors(vec![yamlconf::yaml_error(path, &e)]))?;
    let mut errs = Collector::new(path);
    let config = build(path, raw, &mut errs);
    if errs.list.is_empty() {
        return Ok(config);
    }
    Err(errs.into_errors())
}

fn positive(errs: &mut Collector, what: &str, d: &Spanned<Dur>) -> Duration {
    if d.value.0.is_zero() {
        errs.at(line(d), format!("{what} must be positive"));
    }
    d.value.0
}

fn check_url(errs: &mut Collector, what: &str, u: &Spanned<String>) {
    match u.value.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
        _ => errs.at(
            line(u),
            format!("{what} {:?} is not an http:// or https:// URL", u.value),
        ),
    }
}

fn build(path: &Path, raw: RawConfig, errs: &mut Collector) -> Config {
    check_url(errs, "prometheus.url", &raw.prometheus.url);
    if let Some(e) = &raw.aws.endpoint_url {
        check_url(errs, "aws.endpoint_url", e);
    }
    if raw.aws.max_attempts.value == 0 {
        errs.at(line(&raw.aws.max_attempts), "aws.max_attempts must be at least 1");
    }
    let bind = raw.bind.as_ref().and_then(|b| match b.value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.at(line(b), format!("bind {:?} is not IP:PORT", b.value));
            None
        }
    });
    if raw.groups.is_empty() {
        errs.at(None, "at least one group is required");
    }
    let mut groups = Vec::new();
    let mut names: BTreeMap<String, Option<u64>> = BTreeMap::new();
    for g in raw.groups {
        let name = g.name.value.clone();
        if name.is_empty() || name.len() > 255 {
            errs.at(line(&g.name), "group name must be 1 to 255 characters");
        }
        if let Some(prev) = names.insert(name.clone(), line(&g.name)) {
            errs.at(
                line(&g.name),
                format!("duplicate group {name:?} (first on line {})", prev.unwrap_or(0)),
            );
        }
        let mut signals = vec![Signal {
            name: PRIMARY_SIGNAL.into(),
            query: g.query.value.clone(),
            target: g.target.value,
        }];
        let check_signal = |errs: &mut Collector, query: &Spanned<String>, target: &Spanned<f64>| {
            if query.value.trim().is_empty() {
                errs.at(line(query), "query must not be empty");
            }
            if !(target.value.is_finite() && target.value > 0.0) {
                errs.at(
                    line(target),
                    format!("target must be a positive number, not {}", target.value),
                );
            }
        };
        check_signal(errs, &g.query, &g.target);
        for s in &g.extra_signals {
            check_signal(errs, &s.query, &s.target);
            if !valid_name(&s.name.value) {
                errs.at(
                    line(&s.name),
                    format!(
                        "invalid signal name {:?}: use lower-case letters, digits, '-' and '_'",
                        s.name.value
                    ),
                );
            }
            if signals.iter().any(|x| x.name == s.name.value) {
                errs.at(line(&s.name), format!("duplicate signal name {:?}", s.name.value));
            }
            signals.push(Signal {
                name: s.name.value.clone(),
                query: s.query.value.clone(),
                target: s.target.value,
            });
        }
        let tol = g.tolerance.value;
        if !(0.0..1.0).contains(&tol) {
            errs.at(line(&g.tolerance), format!("tolerance must be in [0, 1), not {tol}"));
        }
        if g.min_capacity.value > g.max_capacity.value {
            errs.at(
                line(&g.min_capacity),
                format!(
                    "min_capacity {} is above max_capacity {}",
                    g.min_capacity.value, g.max_capacity.value
                ),
            );
        }
        let pct = g.scale_up_max_percent.value;
        if !(pct.is_finite() && pct >= 0.0) {
            errs.at(line(&g.scale_up_max_percent), "scale_up_max_percent must be 0 or more");
        }
        if g.scale_up_max_instances.value == 0 && pct == 0.0 {
            errs.at(
                line(&g.scale_up_max_instances),
                "scale_up_max_instances and scale_up_max_percent are both 0: the group could never grow",
            );
        }
        if g.admin_port.value == 0 {
            errs.at(line(&g.admin_port), "admin_port must not be 0");
        }
        let mut overrides = BTreeMap::new();
        for (id, addr) in &g.admin_address_overrides {
            match addr.value.parse::<SocketAddr>() {
                Ok(a) => {
                    overrides.insert(id.clone(), a);
                }
                Err(_) => errs.at(
                    line(addr),
                    format!("admin address of {id} {:?} is not IP:PORT", addr.value),
                ),
            }
        }
        let policy = Policy {
            tolerance: tol,
            min: g.min_capacity.value,
            max: g.max_capacity.value,
            scale_up_max_instances: g.scale_up_max_instances.value,
            scale_up_max_percent: pct,
            scale_up_period: positive(errs, "scale_up_period", &g.scale_up_period),
            scale_down_stabilization: g.scale_down_stabilization.value.0,
            warm_up: g.warm_up.value.0,
        };
        groups.push(GroupConfig {
            name,
            signals,
            policy,
            admin_port: g.admin_port.value,
            admin_token_file: g.admin_token_file.map(|p| {
                let p = Path::new(&p);
                if p.is_absolute() {
                    p.to_owned()
                } else {
                    path.parent().unwrap_or(Path::new(".")).join(p)
                }
            }),
            admin_address_overrides: overrides,
            drain_timeout: positive(errs, "drain_timeout", &g.drain_timeout),
            drain_poll_interval: positive(errs, "drain_poll_interval", &g.drain_poll_interval),
            heartbeat_interval: positive(errs, "heartbeat_interval", &g.heartbeat_interval),
            launch_ready_timeout: positive(errs, "launch_ready_timeout", &g.launch_ready_timeout),
        });
    }
    Config {
        prometheus: PrometheusConfig {
            url: raw.prometheus.url.value.trim_end_matches('/').to_string(),
            timeout: positive(errs, "prometheus.timeout", &raw.prometheus.timeout),
            max_sample_age: positive(errs, "prometheus.max_sample_age", &raw.prometheus.max_sample_age),
        },
        aws: AwsConfig {
            region: raw.aws.region,
            endpoint_url: raw.aws.endpoint_url.map(|e| e.value.trim_end_matches('/').to_string()),
            honor_cooldown: raw.aws.honor_cooldown,
            max_attempts: raw.aws.max_attempts.value.max(1),
            retry_base_delay: raw.aws.retry_base_delay.value.0,
            timeout: positive(errs, "aws.timeout", &raw.aws.timeout),
        },
        interval: positive(errs, "interval", &raw.interval),
        dry_run: raw.dry_run,
        bind,
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigErrors> {
        parse(Path::new("/etc/as.yaml"), text)
    }

    const MINIMAL: &str = "prometheus:\n  url: http://127.0.0.1:9090\ngroups:\n  - name: meshgate\n    target: 20\n    min_capacity: 2\n    max_capacity: 10\n";

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = p(MINIMAL).unwrap();
        assert_eq!(c.interval, Duration::from_secs(15));
        assert!(!c.dry_run);
        assert_eq!(c.bind, None);
        assert_eq!(c.aws.max_attempts, 6);
        assert!(!c.aws.honor_cooldown);
        let g = &c.groups[0];
        assert_eq!(g.name, "meshgate");
        assert_eq!(g.signals.len(), 1);
        assert_eq!(g.signals[0].query, DEFAULT_QUERY);
        assert_eq!(g.signals[0].target, 20.0);
        assert_eq!(g.policy.tolerance, 0.1);
        assert_eq!((g.policy.min, g.policy.max), (2, 10));
        assert_eq!(g.policy.scale_up_max_instances, 4);
        assert_eq!(g.policy.scale_up_max_percent, 100.0);
        assert_eq!(g.policy.scale_down_stabilization, Duration::from_secs(300));
        assert_eq!(g.policy.warm_up, Duration::from_secs(120));
        assert_eq!(g.admin_port, 9901);
        assert_eq!(g.drain_timeout, Duration::from_secs(300));
        assert_eq!(g.heartbeat_interval, Duration::from_secs(60));
    }

    #[test]
    fn every_key_parses() {
        let text = r#"prometheus:
  url: http://prom:9090/
  timeout: 3s
  max_sample_age: 1m
aws:
  region: eu-west-1
  endpoint_url: http://127.0.0.1:5000
  honor_cooldown: true
  max_attempts: 3
  retry_base_delay: 50ms
  timeout: 5s
interval: 5s
dry_run: true
bind: 127.0.0.1:9902
groups:
  - name: meshgate-fleet
    query: sum(rate(meshgate_requests_total[1m])) / clamp_min(sum(meshgate_ready), 1)
    target: 200
    extra_signals:
      - name: cpu
        query: avg(rate(process_cpu_seconds_total{job="meshgate"}[1m]))
        target: 0.6
    tolerance: 0.05
    min_capacity: 1
    max_capacity: 40
    scale_up_max_instances: 2
    scale_up_max_percent: 50
    scale_up_period: 30s
    scale_down_stabilization: 10m
    warm_up: 90s
    admin_port: 9000
    admin_token_file: token
    admin_address_overrides:
      i-0abc: 127.0.0.1:19001
    drain_timeout: 2m
    drain_poll_interval: 500ms
    heartbeat_interval: 30s
    launch_ready_timeout: 5m
"#;
        let c = p(text).unwrap();
        assert_eq!(c.prometheus.url, "http://prom:9090");
        assert_eq!(c.aws.region.as_deref(), Some("eu-west-1"));
        assert!(c.aws.honor_cooldown && c.dry_run);
        assert_eq!(c.bind, Some("127.0.0.1:9902".parse().unwrap()));
        let g = &c.groups[0];
        assert_eq!(g.signals.len(), 2);
        assert_eq!(g.signals[1].name, "cpu");
        assert_eq!(g.policy.scale_down_stabilization, Duration::from_secs(600));
        assert_eq!(g.admin_token_file.as_deref(), Some(Path::new("/etc/token")));
        assert_eq!(g.admin_address_overrides["i-0abc"], "127.0.0.1:19001".parse().unwrap());
        assert_eq!(g.drain_poll_interval, Duration::from_millis(500));
    }

    #[test]
    fn errors_name_the_line() {
        let e = p("prometheus:\n  url: http://x:1\ngroups:\n  - name: g\n    target: 1\n    min_capacity: 1\n    max_capacity: 2\n    tolernce: 0.1\n").unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].line, Some(8), "{e}");
        assert!(e.0[0].message.contains("tolernce"), "{e}");

        let e = p("prometheus:\n  url: ftp://x\ngroups:\n  - name: g\n    target: -1\n    tolerance: 1.5\n    min_capacity: 5\n    max_capacity: 2\n    admin_address_overrides:\n      i-1: 10.0.0.1\n").unwrap_err();
        let lines: Vec<_> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![Some(2), Some(5), Some(6), Some(7), Some(10)], "{e}");
        assert!(e.to_string().starts_with("/etc/as.yaml:2: prometheus.url"), "{e}");

        let e = p("prometheus:\n  url: http://x:1\ninterval: 5 parsecs\ngroups: []\n").unwrap_err();
        assert_eq!(e.0[0].line, Some(3), "{e}");
    }
}

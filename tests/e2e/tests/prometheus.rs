//! The observability assets in `dashboards/` against the real thing: `promtool` accepts the rule
//! files (and their unit tests), every metric the dashboard and the rules name is exported by a
//! running meshgate, and a real Prometheus scraping a real meshgate evaluates every dashboard
//! query and every rule without error and with data where traffic must produce it.
//!
//! Needs `prometheus` and `promtool` on PATH (Debian package `prometheus`; `scripts/test.sh`
//! installs it). Missing tools fail the tests: they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use e2e::prom::{has_data, http_get, poll, Prometheus};
use e2e::*;
use http::Request;
use http_body_util::Full;
use serde::Deserialize;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The files under test

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../dashboards")
        .canonicalize()
        .expect("dashboards/ exists at the workspace root")
}

fn dashboard_path() -> PathBuf {
    dashboards_dir().join("meshgate-fleet.json")
}

fn rule_paths() -> [PathBuf; 2] {
    let d = dashboards_dir().join("rules");
    [d.join("meshgate-recording.yml"), d.join("meshgate-alerts.yml")]
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).unwrap();
    serde_json::from_str(&text).expect("dashboard is JSON")
}

#[derive(Debug, Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Rule {
    fn name(&self) -> &str {
        self.record.as_deref().or(self.alert.as_deref()).unwrap_or("?")
    }
}

fn rule_files() -> Vec<(PathBuf, RuleFile)> {
    rule_paths()
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let f: RuleFile = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, f)
        })
        .collect()
}

fn all_rules() -> Vec<Rule> {
    rule_files()
        .into_iter()
        .flat_map(|(_, f)| f.groups)
        .flat_map(|g| g.rules)
        .collect()
}

/// A query the dashboard runs: where it is (for messages) and its raw expression.
#[derive(Debug, Clone)]
struct DashQuery {
    origin: String,
    expr: String,
}

/// Every panel target's expression, rows' nested panels included.
fn dashboard_targets(d: &Value) -> Vec<DashQuery> {
    fn walk(panels: &[Value], out: &mut Vec<DashQuery>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(DashQuery {
                    origin: format!("panel {:?} target {}", title, t["refId"]),
                    expr: t["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("panel {title:?}: target without expr"))
                        .to_string(),
                });
            }
            if let Some(nested) = p["panels"].as_array() {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(d["panels"].as_array().expect("panels"), &mut out);
    out
}

/// The `label_values(...)` queries of the template variables.
fn dashboard_variable_queries(d: &Value) -> Vec<String> {
    d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("query variable has a query")
                .to_string()
        })
        .collect()
}

/// Grafana variables a dashboard expression may use, and what the tests substitute for them:
/// `$job` the scrape job, `$service`/`$tenant` "All" (only ever after `=~`), the interval
/// macros windows that hold enough 1 s samples.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__interval", "1m"),
    ("$__range", "5m"),
    ("$job", "meshgate"),
    ("$service", ".*"),
    ("$tenant", ".*"),
];

/// The expression Prometheus gets for a dashboard query; panics on any other `$` token.
fn substitute(origin: &str, expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let len = 1 + tail[1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len() - 1);
        let token = &tail[..len];
        let value = SUBSTITUTIONS
            .iter()
            .find(|(t, _)| *t == token)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{origin}: variable {token} is not one of {SUBSTITUTIONS:?}: {expr}"));
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Metric names (identifiers starting with `meshgate_` or `process_`) in a PromQL expression.
/// String literals are skipped, so label values and regexes cannot contribute names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("meshgate_") || word.starts_with("process_") {
                names.insert(word);
            }
        } else if c.is_ascii_digit() {
            // Numbers and durations (5m, 1e3): not identifiers.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every metric name the dashboard (targets and variables) and the rule files reference, with
/// where each is used.
fn referenced_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let d = dashboard();
    for q in dashboard_targets(&d) {
        for n in metric_names(&q.expr) {
            used.entry(n).or_default().insert("dashboard".into());
        }
    }
    for q in dashboard_variable_queries(&d) {
        for n in metric_names(&q) {
            used.entry(n).or_default().insert("dashboard variables".into());
        }
    }
    for (path, f) in rule_files() {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for r in f.groups.iter().flat_map(|g| &g.rules) {
            for n in metric_names(&r.expr) {
                used.entry(n).or_default().insert(file.clone());
            }
        }
    }
    used
}

// ---------------------------------------------------------------------------------------------
// Tools

/// `name` on PATH, or a failure that says how to get it. Never a skip: a missing tool must not
/// turn these tests green.
fn tool(name: &str) -> PathBuf {
    e2e::prom::tool(name, e2e::prom::PROMETHEUS_HINT)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

// ---------------------------------------------------------------------------------------------
// meshgate with traffic

/// The default services plus `ghost`, a service the mesh does not export: the gateway closes
/// the TLS handshake (no route for its SNI), so every request to it is an upstream failure
/// (502 upstream_tls) while the gateway keeps serving everything else. Tenant `laptops` may
/// call it (allow "*").
/// The default services and tenants, plus a service no pod serves, and `telemetry:` for
/// billing-vms so the mesh's own metrics name it (the dashboard's mesh panel).
fn services_with_ghost() -> String {
    default_services_and_tenants()
        .replacen(
            "tenants:\n",
            &format!(
                "  ghost:\n    host: {}\n    port: 9080\n    protocol: http2\ntenants:\n",
                host("ghost")
            ),
            1,
        )
        .replacen(
            "    allow: [reviews, reviews-v2, ratings]\n",
            "    allow: [reviews, reviews-v2, ratings]\n    telemetry:\n      workload: billing-batch\n      app: billing\n",
            1,
        )
}

const KEY: (&str, &str) = ("x-meshgate-key", LAPTOP_KEY);

/// One request of the test traffic and the status it must get.
struct Probe {
    what: &'static str,
    src: &'static str,
    host: String,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
}

fn probe(
    what: &'static str,
    src: &'static str,
    host: String,
    headers: &[(&'static str, &'static str)],
    status: u16,
) -> Probe {
    Probe {
        what,
        src,
        host,
        headers: headers.to_vec(),
        status,
    }
}

/// One request of each kind the dashboard shows.
fn traffic_mix() -> Vec<Probe> {
    let bad_key = ("x-meshgate-key", "not-a-key");
    vec![
        probe("allowed by subnet", BILLING_IP, host("reviews"), &[], 200),
        probe("allowed http1", BILLING_IP, host("ratings"), &[], 200),
        probe("allowed by key", "127.99.1.1", host("details"), &[KEY], 200),
        probe("unknown client", STRANGER_IP, host("reviews"), &[], 403),
        probe("not allowed", BILLING_IP, host("details"), &[], 403),
        probe("bad key", BILLING_IP, host("reviews"), &[bad_key], 401),
        probe("unknown host", BILLING_IP, "nope.example".into(), &[], 404),
        probe("upstream failure", "127.99.1.1", host("ghost"), &[KEY], 502),
    ]
}

/// Sends the whole mix once, each on a fresh client connection; fails on an unexpected status.
/// A `mesh-inbound` listener and one VM service with a live and a dead backend, so the mesh →
/// VM metrics exist: allowed and refused calls, backend connect errors, health gauges.
async fn with_inbound(builder: EnvBuilder) -> (Env, VmApp) {
    let app = VmApp::http("vm-a").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = builder
        .listener("  - name: mesh-in\n    bind: 127.0.0.1:0\n    protocol: mesh-inbound\n")
        .extra(&format!(
            "vm_services:\n  billing:\n    hosts: [billing.vms.internal]\n    port: 8080\n    protocol: http1\n    backends: [\"{}\", \"{dead}\"]\n    allow: [\"spiffe://{TD}/ns/shop/sa/cart\"]\n    outlier_detection: {{consecutive_failures: 1, ejection_time: 1s}}\n",
            app.addr
        ))
        .start()
        .await
        .unwrap();
    (env, app)
}

/// From the mesh: an allowed call (200, whichever backend it tries first) and a refused one.
async fn send_inbound(env: &Env) -> anyhow::Result<()> {
    let Some(addr) = env.gate.addr("mesh-in") else {
        return Ok(());
    };
    let ca = env.mesh.ca();
    for (ns, sa, want) in [("shop", "cart", 200), ("bookinfo", "reviews", 403)] {
        let client = meshsim::MeshClient::new(ca.root_der(), Some(ca.issue(ns, sa)?), &[])?;
        let req = Request::get("/")
            .header("host", "billing.vms.internal")
            .body(Bytes::new())?;
        let r = client
            .request(
                addr,
                "outbound_.8080_._.billing.vms.internal",
                meshsim::MeshProtocol::Http1,
                req,
            )
            .await?;
        anyhow::ensure!(
            r.status().as_u16() == want,
            "mesh caller {ns}/{sa}: got {}, want {want}",
            r.status()
        );
    }
    Ok(())
}

async fn send_mix(env: &Env) -> anyhow::Result<()> {
    send_inbound(env).await?;
    for p in traffic_mix() {
        let r = env.get(p.src, &p.host, "/traffic", &p.headers).await?;
        anyhow::ensure!(
            r.status.as_u16() == p.status,
            "{}: got {} {:?}, want {}",
            p.what,
            r.status,
            r.text(),
            p.status
        );
    }
    Ok(())
}

/// Traffic for as long as it is polled: the mix over fresh connections, plus requests on one
/// long-lived h2c connection (an open downstream connection, reused upstream streams). Never
/// returns; errors are printed, not fatal (the assertions are on what Prometheus sees).
async fn keep_traffic_flowing(env: &Env) {
    let mut kept = None;
    loop {
        if let Err(e) = send_mix(env).await {
            eprintln!("traffic: {e:#}");
        }
        if kept.is_none() {
            kept = env.h2c(BILLING_IP).await.ok();
        }
        if let Some(c) = kept.as_mut() {
            let req = Request::get("/kept")
                .header("host", host("reviews"))
                .body(Full::new(Bytes::from_static(b"some request body")))
                .unwrap();
            if let Err(e) = c.send(req).await {
                eprintln!("traffic (kept connection): {e:#}");
                kept = None;
            }
        }
        // Pacing only; nothing waits on it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The parsed `/metrics` exposition: sample names → sample lines, family name → type.
struct Exposition {
    text: String,
    samples: BTreeMap<String, Vec<String>>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut samples: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    types.insert(n.to_string(), t.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples
                    .entry(line[..end].to_string())
                    .or_default()
                    .push(line.to_string());
            }
        }
        Exposition {
            text: text.to_string(),
            samples,
            types,
        }
    }

    /// The metric family a sample name belongs to and its type (`meshgate_requests_total` →
    /// counter `meshgate_requests`, `…_seconds_bucket` → histogram `…_seconds`).
    fn family(&self, name: &str) -> Option<(&str, &str)> {
        if let Some((n, t)) = self.types.get_key_value(name) {
            return Some((n, t));
        }
        ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find_map(|base| self.types.get_key_value(base))
            .map(|(n, t)| (n.as_str(), t.as_str()))
    }

    /// Why `name`, as a query references it, is not exported; None if it is.
    fn problem(&self, name: &str) -> Option<String> {
        let Some((family, kind)) = self.family(name) else {
            return Some("no such metric family".into());
        };
        let want = if name.ends_with("_total") {
            Some("counter")
        } else if name.ends_with("_bucket") {
            Some("histogram")
        } else {
            None
        };
        if let Some(want) = want {
            if kind != want {
                return Some(format!("family {family} is a {kind}, not a {want}"));
            }
        }
        if !self.samples.contains_key(name) {
            return Some(format!("family {family} ({kind}) has no {name} sample"));
        }
        None
    }
}

async fn scrape(env: &Env) -> Exposition {
    let r = http_get(env.admin_addr(), "/metrics").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    Exposition::parse(&r.text())
}

// ---------------------------------------------------------------------------------------------
// Static checks

#[test]
fn promtool_accepts_rules() {
    let promtool = tool("promtool");
    let [recording, alerts] = rule_paths();
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&recording)
        .arg(&alerts));
    assert!(out.contains("SUCCESS"), "{out}");
    // The alerts' unit tests (synthetic series: each alert fires when and only when it should).
    run(Command::new(&promtool)
        .current_dir(dashboards_dir().join("rules/tests"))
        .args(["test", "rules", "meshgate-alerts.test.yml"]));
    // The example scrape config, with its rule_files resolved relative to it.
    run(Command::new(&promtool)
        .current_dir(dashboards_dir())
        .args(["check", "config", "prometheus.example.yml"]));
}

/// What promtool does not check: the conventions operators rely on.
#[test]
fn rules_carry_severity_annotations_and_runbooks() {
    let readme = std::fs::read_to_string(dashboards_dir().join("README.md")).unwrap();
    // GitHub heading anchors: lowercase, spaces to dashes, other punctuation dropped.
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let mut names = BTreeSet::new();
    for (path, f) in rule_files() {
        for g in &f.groups {
            assert!(g.name.starts_with("meshgate."), "group {}", g.name);
            for r in &g.rules {
                assert!(names.insert(r.name().to_string()), "duplicate {}", r.name());
                match (&r.record, &r.alert) {
                    (Some(rec), None) => {
                        assert!(rec.starts_with("meshgate:"), "{rec}");
                        assert_eq!(rec.matches(':').count(), 2, "level:metric:op: {rec}");
                    }
                    (None, Some(alert)) => {
                        let at = format!("{}: {alert}", path.display());
                        assert!(alert.starts_with("Meshgate"), "{at}");
                        assert!(r.for_.is_some(), "{at}: no `for`");
                        let sev = r.labels.get("severity").map(String::as_str);
                        assert!(matches!(sev, Some("critical" | "warning")), "{at}: severity {sev:?}");
                        for a in ["summary", "description", "runbook"] {
                            assert!(r.annotations.contains_key(a), "{at}: no {a} annotation");
                        }
                        let runbook = &r.annotations["runbook"];
                        let anchor = runbook
                            .strip_prefix("dashboards/README.md#")
                            .and_then(|s| s.split(':').next())
                            .unwrap_or_else(|| panic!("{at}: runbook {runbook:?}"));
                        assert_eq!(anchor, alert.to_lowercase(), "{at}");
                        assert!(anchors.contains(anchor), "{at}: no README heading for #{anchor}");
                    }
                    _ => panic!("{}: a rule is either record or alert", path.display()),
                }
            }
        }
    }
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["uid"], "meshgate-fleet");
    let schema = d["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    assert_eq!(vars["job"]["current"]["value"], "meshgate");
    for v in ["service", "tenant"] {
        assert_eq!(vars[v]["multi"], true, "{v}");
        assert_eq!(vars[v]["includeAll"], true, "{v}");
        assert_eq!(vars[v]["allValue"], ".*", "{v}");
    }
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {title}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{title}: wider than the grid");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title) {
                    panic!("panels {other:?} and {title:?} overlap");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], ds, "{title}");
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: no description"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            let expr = t["expr"].as_str().unwrap();
            // One fleet per dashboard: every query is scoped to the selected job...
            assert!(expr.contains(r#"job="$job""#), "{title}: {expr}");
            // ...and the multi-value variables are only used as regexes.
            for v in ["$service", "$tenant"] {
                assert_eq!(
                    expr.matches(v).count(),
                    expr.matches(&format!("=~\"{v}\"")).count(),
                    "{title}: {v} outside =~\"…\": {expr}"
                );
            }
            substitute(title, expr);
        }
    }
    // The promised views are all there.
    let uses = |m: &str| dashboard_targets(&d).iter().any(|q| q.expr.contains(m));
    for m in [
        "meshgate_requests_total",
        "meshgate_request_duration_seconds_bucket",
        "meshgate_requests_in_flight",
        "meshgate_denied_total",
        "meshgate_upstream_errors_total",
        "meshgate_downstream_connections",
        "meshgate_upstream_connections",
        "meshgate_upstream_streams_in_use",
        "meshgate_upstream_connects_total",
        "meshgate_upstream_handshake_duration_seconds_bucket",
        "meshgate_upstream_requests_total",
        "meshgate_bytes_total",
        "meshgate_config_reloads_total",
        "meshgate_identity_reloads_total",
        "meshgate_identity_expiry_timestamp_seconds",
        "meshgate_draining",
        "meshgate_ready",
        "meshgate_build_info",
        "meshgate_tenant_info",
        "istio_requests_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "up{",
    ] {
        assert!(uses(m), "no panel uses {m}");
    }
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(meshgate_request_duration_seconds_bucket{job="meshgate_x",service!="none"}[5m]))) > 1e3 and meshgate:requests:rate5m and process_open_fds / process_max_fds"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "meshgate_request_duration_seconds_bucket",
            "process_max_fds",
            "process_open_fds"
        ]
    );
    assert_eq!(
        substitute("t", r#"rate(x{job="$job",service=~"$service"}[$__rate_interval])"#),
        r#"rate(x{job="meshgate",service=~".*"}[1m])"#
    );
}

// ---------------------------------------------------------------------------------------------
// Against a running meshgate

#[tokio::test]
async fn metrics_used_by_dashboards_and_rules_are_exported() {
    let (env, _vm) = with_inbound(
        EnvBuilder::default()
            .services_and_tenants(&services_with_ghost())
            .admin(),
    )
    .await;
    send_mix(&env).await.unwrap();
    // A second round: upstream connections are now reused.
    send_mix(&env).await.unwrap();
    let ready = http_get(env.admin_addr(), "/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    let expo = scrape(&env).await;

    let used = referenced_metrics();
    assert!(used.len() >= 20, "{used:?}");
    let missing: Vec<String> = used
        .iter()
        .filter_map(|(name, by)| expo.problem(name).map(|p| format!("{name} (used by {by:?}): {p}")))
        .collect();
    assert!(
        missing.is_empty(),
        "referenced but not exported:\n  {}\n--- /metrics:\n{}",
        missing.join("\n  "),
        expo.text
    );

    // The traffic shows up under the label values the dashboard filters and groups on.
    for needle in [
        r#"meshgate_requests_total{listener="vm",tenant="billing-vms",service="reviews",code="200"}"#,
        r#"meshgate_requests_total{listener="vm",tenant="none",service="none",code="403"}"#,
        r#"meshgate_denied_total{listener="vm",reason="unknown_client"}"#,
        r#"meshgate_denied_total{listener="vm",reason="bad_key"}"#,
        r#"meshgate_denied_total{listener="vm",reason="service_not_allowed"}"#,
        r#"meshgate_denied_total{listener="vm",reason="unknown_host"}"#,
        r#"meshgate_upstream_errors_total{service="ghost",reason="upstream_tls"}"#,
        r#"meshgate_upstream_requests_total{service="reviews",connection="new"}"#,
        r#"meshgate_upstream_requests_total{service="reviews",connection="reused"}"#,
        r#"meshgate_upstream_connects_total{service="reviews",result="ok"}"#,
        r#"meshgate_bytes_total{service="reviews",direction="downstream"}"#,
        r#"meshgate_identity_expiry_timestamp_seconds{identity="spiffe://cluster.local/ns/meshgate/sa/meshgate"}"#,
        "meshgate_ready 1",
        "meshgate_draining 0",
    ] {
        assert!(expo.text.contains(needle), "no {needle}\n{}", expo.text);
    }
    // The reload failure alerts are `increase(…{result="error"}[15m]) > 0`: increase() only
    // sees a failure if the series existed (at 0) before it, so both results must be exported
    // from startup, not created by the first reload.
    for family in ["meshgate_config_reloads_total", "meshgate_identity_reloads_total"] {
        for result in ["ok", "error"] {
            let needle = format!(r#"{family}{{result="{result}"}}"#);
            assert!(
                expo.text.contains(&needle),
                "{needle} is not exported before any reload: the first failure would not \
                 fire MeshgateConfigReloadFailed/MeshgateIdentityReloadFailed\n{}",
                expo.text
            );
        }
    }
    // A process that has run has used CPU and memory.
    for name in ["process_resident_memory_bytes", "process_max_fds"] {
        let line = &expo.samples[name][0];
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v > 0.0, "{line}");
    }

    // An upstream failure with the gateway gone entirely.
    env.mesh.stop_gateway().await;
    let r = env
        .get(BILLING_IP, &host("ratings"), "/after-gateway-stop", &[])
        .await
        .unwrap();
    assert!(r.status == 502 || r.status == 503, "{} {}", r.status, r.text());
    let expo = scrape(&env).await;
    assert!(
        expo.text
            .lines()
            .any(|l| l.starts_with(r#"meshgate_upstream_errors_total{service="ratings","#)),
        "{}",
        expo.text
    );
}

/// What a query must produce against a meshgate carrying the test traffic.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Parses and evaluates; may be empty (alerts not firing).
    Parses,
    /// Parses and returns at least one series (or a scalar).
    Data,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_query_and_rule() {
    // An identity that expires in 3 h, inside the 6 h of MeshgateCertExpiringSoon.
    let expires = SystemTime::now() + Duration::from_secs(3 * 3600);
    let (env, _vm) = with_inbound(
        EnvBuilder::default()
            .services_and_tenants(&services_with_ghost())
            .identity(move |ca| {
                let mut o = meshsim::IssueOptions::workload(TD, "meshgate", "meshgate");
                o.not_after = expires;
                let c = ca.issue_with(&o).unwrap();
                (c.chain_pem, c.key_pem, ca.root_pem())
            })
            .admin(),
    )
    .await;
    // Every traffic kind works before Prometheus looks at it.
    send_mix(&env).await.unwrap();

    tokio::select! {
        _ = keep_traffic_flowing(&env) => unreachable!("traffic never stops"),
        _ = check_with_prometheus(&env) => {}
    }
}

async fn check_with_prometheus(env: &Env) {
    let mesh_metrics = env.mesh.serve_istio_metrics().await.unwrap();
    let prom = &Prometheus::start_with(&[env.admin_addr()], &[("istio-mesh", mesh_metrics)], &rule_paths()).await;
    // Everything below shares one bound: scrapes and rule evaluations run every second, so
    // rate() over 1m has its two samples within seconds; 90 s only stops a hung test.
    let deadline = Instant::now() + Duration::from_secs(90);

    poll(deadline, "up{job=\"meshgate\"} == 1", move || async move {
        prom.query(r#"up{job="meshgate"} == 1"#).await.ok().filter(has_data)
    })
    .await;
    // A few scrapes in: every rate()/increase() window holds at least two samples.
    poll(deadline, "3 scrapes of meshgate", move || async move {
        prom.query(r#"count_over_time(up{job="meshgate"}[1m]) >= 3"#)
            .await
            .ok()
            .filter(has_data)
    })
    .await;

    let mut queries: Vec<(String, String, Expect)> = Vec::new();
    let d = dashboard();
    for q in dashboard_targets(&d) {
        // Everything the dashboard shows is produced by the test traffic (both reload
        // counters are exported at 0, so their increase() is 0, not empty).
        queries.push((q.origin.clone(), substitute(&q.origin, &q.expr), Expect::Data));
    }
    let rules = all_rules();
    for r in &rules {
        match (&r.record, &r.alert) {
            (Some(rec), _) => {
                queries.push((format!("recording rule {rec} (expr)"), r.expr.clone(), Expect::Data));
                // What the rule recorded, once evaluated.
                queries.push((format!("recorded series {rec}"), rec.clone(), Expect::Data));
            }
            (_, Some(alert)) => {
                queries.push((format!("alert {alert}"), r.expr.clone(), Expect::Parses));
            }
            _ => unreachable!(),
        }
    }

    let mut failures = Vec::new();
    for (origin, expr, expect) in &queries {
        // Retried only while a series may still be on its way (first samples, first rule
        // evaluation); a query error is final at once.
        let outcome = loop {
            match prom.query(expr).await {
                Err(e) => break Err(format!("query error: {e}")),
                Ok(res) if *expect == Expect::Parses || has_data(&res) => break Ok(()),
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
                Ok(_) => break Err("no data".to_string()),
            }
        };
        if let Err(e) = outcome {
            failures.push(format!("{origin}: {e}\n    {expr}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n  {}\n--- prometheus log:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n  "),
        prom.log_text()
    );

    // Every rule group is loaded and every rule evaluates without error.
    let want_groups: BTreeSet<String> = rule_files()
        .into_iter()
        .flat_map(|(_, f)| f.groups)
        .map(|g| g.name)
        .collect();
    let (want_groups, rules) = (&want_groups, &rules);
    poll(deadline, "every rule evaluated with health ok", move || async move {
        let v = prom.api("/api/v1/rules").await;
        assert_eq!(v["status"], "success", "{v}");
        let groups = v["data"]["groups"].as_array().unwrap();
        let names: BTreeSet<String> = groups.iter().map(|g| g["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(&names, want_groups, "rule groups loaded");
        let mut pending = false;
        for g in groups {
            for r in g["rules"].as_array().unwrap() {
                match r["health"].as_str() {
                    Some("ok") => {}
                    Some("unknown") => pending = true,
                    _ => panic!(
                        "rule {} in group {}: health {}, lastError {}",
                        r["name"], g["name"], r["health"], r["lastError"]
                    ),
                }
            }
        }
        let count = groups
            .iter()
            .map(|g| g["rules"].as_array().unwrap().len())
            .sum::<usize>();
        assert_eq!(count, rules.len(), "rules loaded");
        (!pending).then_some(())
    })
    .await;

    // The alerts see the traffic as an operator would: the service that always fails trips the
    // 5xx alert (pending: `for` has not elapsed), the short-lived certificate trips the expiry
    // alert, and nothing says the instance is down, unready, expired or failing reloads.
    let active = poll(
        deadline,
        "alerts MeshgateHigh5xxRatio and MeshgateCertExpiringSoon",
        move || async move {
            let v = prom.api("/api/v1/alerts").await;
            let alerts = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
            let names: BTreeSet<&str> = alerts
                .iter()
                .filter_map(|a| a["labels"]["alertname"].as_str())
                .collect();
            (names.contains("MeshgateHigh5xxRatio") && names.contains("MeshgateCertExpiringSoon")).then_some(alerts)
        },
    )
    .await;
    for a in &active {
        let l = &a["labels"];
        match l["alertname"].as_str().unwrap() {
            "MeshgateHigh5xxRatio" => {
                assert_eq!(l["service"], "ghost", "{a}");
                assert_eq!(l["severity"], "critical", "{a}");
            }
            "MeshgateCertExpiringSoon" => {
                assert_eq!(l["identity"], "spiffe://cluster.local/ns/meshgate/sa/meshgate", "{a}");
                assert_eq!(l["instance"], env.admin_addr().to_string(), "{a}");
                let summary = a["annotations"]["summary"].as_str().unwrap();
                assert!(summary.contains("expires in 2h 5"), "{summary}");
            }
            // Latency depends on how loaded the test machine is; not asserted either way.
            "MeshgateHighLatencyP99" => {}
            other => panic!("unexpected alert {other}: {a}"),
        }
    }
}

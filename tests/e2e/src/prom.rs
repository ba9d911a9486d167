//! External tools the end-to-end tests drive, and the real Prometheus server on loopback.
//!
//! A missing tool fails the test with how to get it: never a skip, so a machine without the tool
//! cannot turn a test green (`scripts/test.sh` installs them).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

use super::{Client, Resp};

/// How to get `prometheus` and `promtool`.
pub const PROMETHEUS_HINT: &str = "install prometheus (apt-get install prometheus), which ships both prometheus and \
                                   promtool; scripts/test.sh does this";

/// The first of `candidates` that is a file, else `name` on PATH, else a failure that says how
/// to get it.
pub fn tool_in(name: &str, candidates: &[PathBuf], hint: &str) -> PathBuf {
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        })
        .unwrap_or_else(|| panic!("`{name}` is not on PATH: {hint}"))
}

/// `name` on PATH, or a failure that says how to get it.
pub fn tool(name: &str, hint: &str) -> PathBuf {
    tool_in(name, &[], hint)
}

/// A free loopback port, for servers that cannot bind port 0 and report it. Another process may
/// take it before the server binds it: callers retry on "address already in use".
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// GET `path` on a plain HTTP/1.1 server on loopback.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<Resp> {
    let mut c = Client::connect(addr, "127.0.0.1".parse()?, false).await?;
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    c.send(req).await
}

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A query result with at least one series (or a scalar).
pub fn has_data(result: &Value) -> bool {
    match result.as_array() {
        // A vector or matrix: at least one series.
        Some(a) if a.first().is_some_and(Value::is_object) => true,
        // A scalar or string: [time, "value"].
        Some(a) => a.len() == 2,
        None => false,
    }
}

/// Polls `f` every 250 ms until it returns Some, or fails with `what` once `deadline` passes.
pub async fn poll<T, F, Fut>(deadline: Instant, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A child process killed (and reaped) when dropped, also when a test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus server on loopback, killed when dropped.
pub struct Prometheus {
    child: KillOnDrop,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts prometheus scraping `targets` as job `meshgate` every second, evaluating
    /// `rule_files` every second. Waits (bounded) until its API answers.
    pub async fn start(targets: &[SocketAddr], rule_files: &[PathBuf]) -> Prometheus {
        Self::start_with(targets, &[], rule_files).await
    }

    /// [`Prometheus::start`], also scraping each `(job, target)` of `other_jobs` (e.g. the
    /// mesh's sidecars, at `/stats/prometheus` as Istio serves them).
    pub async fn start_with(
        targets: &[SocketAddr],
        other_jobs: &[(&str, SocketAddr)],
        rule_files: &[PathBuf],
    ) -> Prometheus {
        let bin = tool("prometheus", PROMETHEUS_HINT);
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let mut rules = String::new();
        if !rule_files.is_empty() {
            rules.push_str("rule_files:\n");
            for r in rule_files {
                rules.push_str(&format!("  - {r:?}\n"));
            }
        }
        // Prometheus cannot listen on port 0 and report it: take a free port from the kernel
        // and hand it over. Another process could grab it in between, so retry on a bind error.
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let dir = tempfile::tempdir().unwrap();
            let config = format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n{rules}\
                 scrape_configs:\n  - job_name: meshgate\n    static_configs:\n      - targets: [{}]\n{}",
                targets.join(", "),
                other_jobs
                    .iter()
                    .map(|(job, t)| format!(
                        "  - job_name: {job}\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: [\"{t}\"]\n"
                    ))
                    .collect::<String>()
            );
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = dir.path().join("prometheus.log");
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new(&bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut p = Prometheus {
                child: KillOnDrop(child),
                addr,
                log,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = p.child.0.try_wait().unwrap() {
                    last_log = p.log_text();
                    assert!(
                        last_log.contains("address already in use"),
                        "prometheus exited ({status}):\n{last_log}"
                    );
                    break;
                }
                if let Ok(r) = http_get(addr, "/-/ready").await {
                    if r.status == 200 {
                        return p;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready after 30 s:\n{}",
                    p.log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("prometheus could not bind a port in 3 attempts:\n{last_log}");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub async fn api(&self, path_and_query: &str) -> Value {
        let r = http_get(self.addr, path_and_query)
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e:#}"));
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {} not JSON ({e}): {}", r.status, r.text()))
    }

    /// An instant query: Ok(result) on status success (result = the `data.result` array, or the
    /// scalar/string pair), Err(error text) otherwise.
    pub async fn query(&self, expr: &str) -> Result<Value, String> {
        let v = self.api(&format!("/api/v1/query?query={}", url_encode(expr))).await;
        if v["status"] == "success" {
            Ok(v["data"]["result"].clone())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// The value of a one-series (or scalar) instant query, None if empty or failing.
    pub async fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr).await.ok()?;
        let pair = match r.as_array()?.first()? {
            Value::Object(o) => o.get("value")?.clone(),
            _ => r.clone(),
        };
        pair.get(1)?.as_str()?.parse().ok()
    }
}

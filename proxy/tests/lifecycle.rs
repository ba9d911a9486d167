//! The real `meshgate run` process against meshsim: SIGHUP reloads; SIGTERM drains under load
//! with zero failed requests for clients that honour `Connection: close`, readiness turning off
//! first, and exit status 0 within the drain timeout.

// The e2e harness (mesh + clients + load), shared by source: this test needs the binary, which
// only this package's tests can name (CARGO_BIN_EXE_meshgate).
#[path = "../../tests/e2e/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use http::StatusCode;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Starts `meshgate run` on a config with fixed loopback ports (picked free just before).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_binary(
    mesh: &meshsim::Mesh,
    dir: &std::path::Path,
    extra: &str,
) -> (Proc, std::net::SocketAddr, std::net::SocketAddr) {
    let (proc, listen, admin, _) = start_binary_with(mesh, dir, extra, &["--log-format", "json"], false).await;
    (proc, listen, admin)
}

/// Lines the process wrote to stderr so far (its log).
type Captured = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`start_binary`] with `args` after `run -c FILE`, and its stderr captured when `capture`.
async fn start_binary_with(
    mesh: &meshsim::Mesh,
    dir: &std::path::Path,
    extra: &str,
    args: &[&str],
    capture: bool,
) -> (Proc, std::net::SocketAddr, std::net::SocketAddr, Captured) {
    let cert = mesh.ca().issue("meshgate", "meshgate").unwrap();
    cert.write_files(dir, &mesh.ca().root_pem()).unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        "listeners:\n  - name: vm\n    bind: {listen}\n    protocol: http\nadmin:\n  bind: {admin}\nmesh:\n  trust_domain: {TD}\n  gateway: {gw}\n  identity:\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n{body}{extra}",
        gw = mesh.gateway_addr(),
        body = default_services_and_tenants(),
    );
    let path = dir.join("meshgate.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["run", "-c", path.to_str().unwrap()])
        .args(args)
        // The log settings under test are the config's and the flags', not the environment's.
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(if capture { Stdio::piped() } else { Stdio::inherit() })
        .spawn()
        .unwrap();
    let captured = Captured::default();
    if let Some(stderr) = child.stderr.take() {
        let lines = captured.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    let proc = Proc(child);
    eventually(Duration::from_secs(30), "meshgate to become ready", || async {
        matches!(
            admin_request(admin, http::Method::GET, "/readyz").await,
            Ok((StatusCode::OK, _))
        )
    })
    .await;
    (proc, listen, admin, captured)
}

#[tokio::test]
async fn sighup_reloads_the_config() {
    let mesh = meshsim::Mesh::start(meshsim::demo_spec()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (proc, listen, _admin) = start_binary(&mesh, dir.path(), "reload:\n  watch: false\n").await;
    let get = |h: &'static str| async move {
        let mut c = Client::connect(listen, BILLING_IP.parse().unwrap(), false)
            .await
            .unwrap();
        let req = http::Request::get("/")
            .header("host", h)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        c.send(req).await.unwrap().status
    };
    assert_eq!(get("hup.test").await, StatusCode::NOT_FOUND);
    let path = dir.path().join("meshgate.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\n",
        "    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\n    aliases: [hup.test]\n",
    );
    std::fs::write(&path, text).unwrap();
    signal(&proc.0, "-HUP");
    eventually(Duration::from_secs(20), "SIGHUP to apply the alias", || async {
        get("hup.test").await == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_under_load_without_failing_a_request() {
    let mesh = meshsim::Mesh::start(meshsim::demo_spec()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, listen, admin) =
        start_binary(&mesh, dir.path(), "drain:\n  delay: 1s\n  spread: 1s\n  timeout: 10s\n").await;
    let load = Load::start(listen, BILLING_IP, &host("reviews"), "/", 12);
    let load_h2 = Load::start_with(listen, BILLING_IP, &host("ratings"), "/", 4, true);
    load.wait_for_more(300).await;
    load_h2.wait_for_more(100).await;

    let t0 = Instant::now();
    signal(&proc.0, "-TERM");
    // Readiness flips first, while requests still succeed: the LB takes the instance out.
    eventually(Duration::from_secs(5), "readiness to turn off", || async {
        matches!(
            admin_request(admin, http::Method::GET, "/readyz").await,
            Ok((StatusCode::SERVICE_UNAVAILABLE, _))
        )
    })
    .await;
    let readiness_off = t0.elapsed();
    load.lb_removed.store(true, std::sync::atomic::Ordering::SeqCst);
    load_h2.lb_removed.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = load.ok();
    load.wait_for_more(100).await;
    assert!(load.ok() > before, "requests kept flowing after readiness went off");

    // The process exits 0 by itself within the drain timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = proc.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "meshgate did not exit after the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    let (ok_h2, failures_h2) = load_h2.finish().await;
    assert!(
        failures_h2.is_empty(),
        "h2c: {} failed requests: {:?}",
        failures_h2.len(),
        &failures_h2[..failures_h2.len().min(5)]
    );
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{ok} HTTP/1.1 + {ok_h2} h2c requests; readiness off after {readiness_off:?}; exited 0 after {exited:?}");
    assert!(
        exited < Duration::from_secs(10) + Duration::from_secs(2),
        "exceeded drain.timeout: {exited:?}"
    );
}

#[tokio::test]
async fn second_sigterm_exits_at_once() {
    let mesh = meshsim::Mesh::start(meshsim::demo_spec()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, _listen, admin) = start_binary(
        &mesh,
        dir.path(),
        "drain:\n  delay: 30s\n  spread: 1s\n  timeout: 60s\n",
    )
    .await;
    signal(&proc.0, "-TERM");
    // Once the first signal is taken (readiness off), the second must not wait out the drain.
    eventually(Duration::from_secs(5), "the drain to start", || async {
        matches!(
            admin_request(admin, http::Method::GET, "/readyz").await,
            Ok((StatusCode::SERVICE_UNAVAILABLE, _))
        )
    })
    .await;
    signal(&proc.0, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = proc.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "second SIGTERM did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
}

/// The README's promise: one access-log line per request with client, tenant, service, method,
/// authority, path, status, reason, duration, bytes, upstream reuse and request id; and
/// `--log-format`/`--log-level` override the config's `log:`.
#[tokio::test]
async fn one_access_log_line_per_request_and_flags_override_the_config() {
    let mesh = meshsim::Mesh::start(meshsim::demo_spec()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The config says pretty and warn (no access lines at all); the flags say JSON and info.
    let log = "log:\n  level: warn\n  format: pretty\n";
    let (proc, listen, _admin, lines) = start_binary_with(
        &mesh,
        dir.path(),
        log,
        &["--log-format", "json", "--log-level", "info"],
        true,
    )
    .await;
    let send = |method: &'static str, h: String, id: &'static str, body: &'static [u8]| async move {
        let mut c = Client::connect(listen, BILLING_IP.parse().unwrap(), false)
            .await
            .unwrap();
        let req = http::Request::builder()
            .method(method)
            .uri("/logged?q=1")
            .header("host", h)
            .header("x-request-id", id)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
            .unwrap();
        c.send(req).await.unwrap().status
    };
    assert_eq!(
        send("POST", host("reviews"), "log-ok-1", b"hello").await,
        StatusCode::OK
    );
    assert_eq!(
        send("GET", host("details"), "log-denied-1", b"").await,
        StatusCode::FORBIDDEN
    );

    let entry = |id: &'static str| {
        let lines = lines.clone();
        async move {
            let found: Vec<serde_json::Value> = lines
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|j| j["target"] == "access" && j["request_id"] == id)
                .collect();
            found
        }
    };
    eventually(Duration::from_secs(10), "both access-log lines", || async {
        !entry("log-ok-1").await.is_empty() && !entry("log-denied-1").await.is_empty()
    })
    .await;
    let ok = entry("log-ok-1").await;
    assert_eq!(ok.len(), 1, "one line per request: {ok:?}");
    let j = &ok[0];
    assert_eq!(j["level"], "INFO");
    assert_eq!(j["listener"], "vm");
    assert!(
        j["client"].as_str().unwrap().starts_with(&format!("{BILLING_IP}:")),
        "{j}"
    );
    assert_eq!(j["tenant"], "billing-vms");
    assert_eq!(j["service"], "reviews");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["authority"], host("reviews"));
    assert_eq!(j["path"], "/logged");
    assert_eq!(j["status"], 200);
    assert_eq!(j["reason"], "");
    assert!(j["duration_ms"].as_f64().unwrap() > 0.0, "{j}");
    assert_eq!(j["bytes_in"], 5);
    assert!(j["bytes_out"].as_u64().unwrap() > 0, "{j}");
    assert!(matches!(j["upstream_conn"].as_str(), Some("new" | "reused")), "{j}");
    assert_eq!(j["completed"], true);
    let denied = entry("log-denied-1").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    let j = &denied[0];
    assert_eq!(
        (j["status"].as_u64(), j["reason"].as_str()),
        (Some(403), Some("service_not_allowed"))
    );
    assert_eq!(j["service"], "details");
    assert_eq!(j["upstream_conn"], "-");
    drop(proc);

    // Without the flags, the config's own settings hold: warn keeps access lines out, and
    // whatever is logged is not JSON.
    let dir = tempfile::tempdir().unwrap();
    let (proc, listen, _admin, lines) = start_binary_with(&mesh, dir.path(), log, &[], true).await;
    let mut c = Client::connect(listen, BILLING_IP.parse().unwrap(), false)
        .await
        .unwrap();
    let req = http::Request::get("/")
        .header("host", host("reviews"))
        .header("x-request-id", "log-quiet-1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().status, StatusCode::OK);
    drop(c);
    drop(proc);
    let lines = lines.lock().unwrap();
    assert!(!lines.iter().any(|l| l.contains("log-quiet-1")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with('{')), "{lines:?}");
}

//! meshgate-autoscaler against real parts: moto's AWS server (PyPI `moto[server]`, started here
//! on loopback) holding an Auto Scaling group, the real Prometheus server scraping two running
//! meshgate instances (in-process, on the mesh simulator), and load generated against them. The
//! autoscaler runs in-process through its library API (and once as the real binary,
//! `the_binary_scales_the_group_through_prometheus_and_moto`), with a short interval and a short
//! stabilization window.
//!
//! What moto does not do, and how the lifecycle test covers it: moto 5.x stores lifecycle hooks
//! but never holds an instance in `Terminating:Wait` or `Pending:Wait`, and does not implement
//! `CompleteLifecycleAction` or `RecordLifecycleActionHeartbeat`. So the lifecycle test puts a
//! small recorder in front of moto ([`Recorder`]): it reports the instances the test chooses as
//! held in a wait state in `DescribeAutoScalingGroups` answers, answers those two calls itself in
//! the AWS query-protocol XML and records them (with the instance's in-flight requests at that
//! moment), can inject one throttling error, and forwards every other call to moto unchanged.
//!
//! Loopback only: moto's EC2 instances get private IPs in 10.0.0.0/8; the autoscaler reaches
//! instances through `admin_address_overrides` (instance id → the in-process meshgate's admin
//! address), and no packet is ever sent to a moto IP.
//!
//! Needs `moto_server` (in `target/tools-venv/bin`, which `scripts/test.sh` creates, or on
//! PATH) and `prometheus` on PATH. Missing tools fail the tests: they never skip.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::prom::{free_port, http_get, poll, tool_in, KillOnDrop, Prometheus};
use e2e::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use meshgate_autoscaler::aws_credential_types::Credentials;
use meshgate_autoscaler::aws_sdk_autoscaling as autoscaling;
use meshgate_autoscaler::config::{self, AwsConfig, DEFAULT_QUERY};
use meshgate_autoscaler::controller::{self, Controller};
use meshgate_autoscaler::decide::Direction;
use meshgate_autoscaler::instance::Admin;
use meshgate_autoscaler::prom::parse_exposition;
use meshgate_autoscaler::{asg, http::Http};

const GROUP: &str = "meshgate-fleet";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---------------------------------------------------------------------------------------------
// moto

/// `moto_server` on loopback, killed when dropped.
struct Moto {
    _child: KillOnDrop,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Moto {
    async fn start() -> Moto {
        let bin = tool_in(
            "moto_server",
            &[workspace_root().join("target/tools-venv/bin/moto_server")],
            "install moto's server: python3 -m venv target/tools-venv && \
             target/tools-venv/bin/pip install 'moto[server]==5.*' (scripts/test.sh does this)",
        );
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("moto.log");
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut child = KillOnDrop(child);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = child.0.try_wait().unwrap() {
                    last_log = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        last_log.contains("Address already in use") || last_log.contains("address already in use"),
                        "moto_server exited ({status}):\n{last_log}"
                    );
                    break;
                }
                // Any HTTP answer means it is serving.
                if http_get(addr, "/moto-api/").await.is_ok() {
                    return Moto {
                        _child: child,
                        addr,
                        _dir: dir,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "moto_server not answering after 60 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto_server could not bind a port in 3 attempts:\n{last_log}");
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Dummy credentials for moto, handed to the SDK directly (no environment variables).
fn creds() -> Credentials {
    Credentials::new("testing", "testing", None, None, "e2e")
}

fn aws_config(endpoint: &str) -> AwsConfig {
    AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.into()),
        honor_cooldown: false,
        max_attempts: 4,
        retry_base_delay: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
    }
}

async fn aws_client(endpoint: &str) -> autoscaling::Client {
    autoscaling::Client::new(&asg::sdk_config(&aws_config(endpoint), Some(creds())).await)
}

/// A launch configuration, a group of `desired` instances and its lifecycle hooks, created
/// through the AWS API; returns the group's instance ids.
async fn create_group(c: &autoscaling::Client, desired: i32, min: i32, max: i32) -> Vec<String> {
    c.create_launch_configuration()
        .launch_configuration_name("meshgate-lc")
        .image_id("ami-12c6146b")
        .instance_type("t3.micro")
        .send()
        .await
        .expect("CreateLaunchConfiguration");
    c.create_auto_scaling_group()
        .auto_scaling_group_name(GROUP)
        .launch_configuration_name("meshgate-lc")
        .min_size(min)
        .max_size(max)
        .desired_capacity(desired)
        .availability_zones("us-east-1a")
        .send()
        .await
        .expect("CreateAutoScalingGroup");
    for (name, transition) in [
        ("drain", "autoscaling:EC2_INSTANCE_TERMINATING"),
        ("ready", "autoscaling:EC2_INSTANCE_LAUNCHING"),
    ] {
        c.put_lifecycle_hook()
            .auto_scaling_group_name(GROUP)
            .lifecycle_hook_name(name)
            .lifecycle_transition(transition)
            .heartbeat_timeout(300)
            .default_result("CONTINUE")
            .send()
            .await
            .expect("PutLifecycleHook");
    }
    let g = describe(c).await;
    g.instances()
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect()
}

async fn describe(c: &autoscaling::Client) -> autoscaling::types::AutoScalingGroup {
    let out = c
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(GROUP)
        .send()
        .await
        .expect("DescribeAutoScalingGroups");
    out.auto_scaling_groups()[0].clone()
}

async fn desired_in_moto(c: &autoscaling::Client) -> i32 {
    describe(c).await.desired_capacity().unwrap_or(-1)
}

/// The autoscaler config file of these tests, with `group`'s keys under the one group.
fn autoscaler_yaml(prometheus: &str, aws_endpoint: &str, group: &str) -> String {
    format!(
        "prometheus:\n  url: {prometheus}\n  timeout: 5s\naws:\n  region: us-east-1\n  endpoint_url: {aws_endpoint}\n  \
         max_attempts: 4\n  retry_base_delay: 50ms\ninterval: 1s\ngroups:\n  - name: {GROUP}\n{group}"
    )
}

/// The same, through the real parser.
fn autoscaler_config(prometheus: &str, aws_endpoint: &str, group: &str) -> config::Config {
    let text = autoscaler_yaml(prometheus, aws_endpoint, group);
    config::parse(Path::new("autoscaler-e2e.yaml"), &text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

/// The scaling tests' group: target 4 in flight per instance, 2 to 6 instances, a 6 s
/// scale-down window, no warm-up.
const SCALING_GROUP: &str =
    "    target: 4\n    min_capacity: 2\n    max_capacity: 6\n    scale_down_stabilization: 6s\n    \
                             warm_up: 0s\n";

/// Where the scaling tests start: two meshgates on one mesh, the real Prometheus scraping both
/// (checked), and moto holding the group with its two instances.
struct Fleet {
    /// Held for the meshes and meshgates it runs.
    _env: Env,
    _second: meshgate::app::Bound,
    /// (proxy address, admin address) of each meshgate.
    gates: [(SocketAddr, SocketAddr); 2],
    prom: Prometheus,
    moto: Moto,
    client: autoscaling::Client,
}

impl Fleet {
    async fn start(deadline: Instant) -> Fleet {
        let env = EnvBuilder::default().admin().start().await.unwrap();
        let second = second_gate(&env).await;
        let gates = [
            (env.addr(), env.admin_addr()),
            (second.first_addr(), second.admin.expect("admin bound")),
        ];
        let prom = Prometheus::start(&[gates[0].1, gates[1].1], &[]).await;
        let moto = Moto::start().await;
        let client = aws_client(&moto.url()).await;
        let ids = create_group(&client, 2, 1, 8).await;
        assert_eq!(ids.len(), 2, "moto launched the group's instances");
        let p = &prom;
        poll(deadline, "Prometheus scraping both meshgates", move || async move {
            (p.value(r#"count(up{job="meshgate"} == 1)"#).await == Some(2.0)).then_some(())
        })
        .await;
        Fleet {
            _env: env,
            _second: second,
            gates,
            prom,
            moto,
            client,
        }
    }

    /// 12 workers per meshgate, each holding a 200 ms request: about 12 in flight on each,
    /// three times [`SCALING_GROUP`]'s target.
    fn load(&self) -> [Load; 2] {
        self.gates
            .map(|(proxy, _)| Load::start(proxy, BILLING_IP, &host("reviews"), "/slow?delay_ms=200", 12))
    }
}

async fn controller(cfg: config::Config, endpoint: &str) -> Controller {
    let sdk = asg::sdk_config(&cfg.aws, Some(creds())).await;
    assert_eq!(cfg.aws.endpoint_url.as_deref(), Some(endpoint));
    Controller::new(cfg, &sdk).unwrap()
}

/// Runs the controller's loop and its `/metrics` server until dropped.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
    metrics_addr: SocketAddr,
}

impl Running {
    async fn start(ctl: Controller) -> Running {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = l.local_addr().unwrap();
        let server = tokio::spawn(controller::serve(l, ctl.metrics(), ctl.health()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ctl.run(async {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
            server,
            metrics_addr,
        }
    }

    /// The value of the autoscaler's own metric `name` with exactly `labels`.
    async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let r = http_get(self.metrics_addr, "/metrics").await.ok()?;
        parse_exposition(&r.text())
            .into_iter()
            .find(|s| s.name == name && s.labels == labels)
            .map(|s| s.value)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        self.server.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.server.abort();
    }
}

/// A second meshgate on the same mesh and config as `env` (new ports: the config binds port 0).
async fn second_gate(env: &Env) -> meshgate::app::Bound {
    meshgate::app::start(meshgate::config::load(&env.config_path).unwrap())
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Scaling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_capacity_follows_load_through_prometheus() {
    let deadline = Instant::now() + Duration::from_secs(150);
    let fleet = Fleet::start(deadline).await;
    let (prom, moto, client) = (&fleet.prom, &fleet.moto, &fleet.client);
    let group = SCALING_GROUP;
    let cfg = autoscaler_config(&prom.url(), &moto.url(), group);
    let loads = fleet.load();
    let per_instance = poll(deadline, "Prometheus seeing the load", move || async move {
        prom.value(DEFAULT_QUERY).await.filter(|v| *v >= 6.0)
    })
    .await;
    eprintln!("in flight per instance under load: {per_instance}");

    // --dry-run: the decision is made and reported, the group is left alone.
    let mut dry = cfg.clone();
    dry.dry_run = true;
    let mut ctl = controller(dry, &moto.url()).await;
    let out = ctl.round().await;
    let d = out[0].decision.clone().unwrap_or_else(|| panic!("{:?}", out[0].error));
    assert_eq!(d.direction, Direction::Up, "{d:?}");
    assert!(d.desired > 2, "{d:?}");
    assert_eq!(desired_in_moto(client).await, 2, "dry-run changed the group");
    drop(ctl);

    // The loop, for real.
    let running = Running::start(controller(cfg, &moto.url()).await).await;
    let grown = poll(deadline, "desired capacity rising with the load", move || async move {
        let d = desired_in_moto(client).await;
        (d > 2).then_some(d)
    })
    .await;
    eprintln!("desired capacity under load: {grown}");
    for l in loads {
        let (ok, failures) = l.finish().await;
        assert!(ok > 0 && failures.is_empty(), "{ok} ok, failures: {failures:?}");
    }

    // No load: the recommendation falls to the minimum at once, the capacity only once the
    // stabilization window (6 s of lower recommendations) has passed.
    let r = &running;
    let labels = format!("group=\"{GROUP}\"");
    let labels = &labels;
    let held = poll(deadline, "recommendation falling to 2", move || async move {
        let rec = r.metric("meshgate_autoscaler_recommended_capacity", labels).await?;
        if rec != 2.0 {
            return None;
        }
        Some(desired_in_moto(client).await)
    })
    .await;
    assert!(held > 2, "capacity fell with the first low recommendation: {held}");
    poll(deadline, "desired capacity back to 2", move || async move {
        (desired_in_moto(client).await == 2).then_some(())
    })
    .await;
    for direction in ["up", "down"] {
        let n = running
            .metric(
                "meshgate_autoscaler_decisions_total",
                &format!("group=\"{GROUP}\",direction=\"{direction}\""),
            )
            .await;
        assert!(n >= Some(1.0), "{direction}: {n:?}");
    }
    let r = http_get(running.metrics_addr, "/healthz").await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // The production address path: the private IP from EC2 DescribeInstances (moto's EC2;
    // nothing is sent to that address).
    let ctl = controller(autoscaler_config(&prom.url(), &moto.url(), group), &moto.url()).await;
    let ids: Vec<String> = describe(client)
        .await
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    let ips = ctl.aws().private_ips(&ids).await.unwrap();
    assert_eq!(ips.len(), ids.len(), "{ips:?}");
    assert!(ips.values().all(|ip| !ip.is_loopback()), "{ips:?}");
    running.stop().await;
}

/// The binary as a fleet runs it (`meshgate-autoscaler run -c FILE`, credentials from the
/// environment), not the library: against real moto and the real Prometheus scraping two
/// meshgates under load, it raises the group's desired capacity, brings it back down once the
/// load is gone, serves its own `/metrics` and `/healthz`, and SIGTERM ends it with status 0.
/// Lifecycle actions are not part of it: moto does not implement them (see the module comment
/// and the recorder test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_scales_the_group_through_prometheus_and_moto() {
    let bin = workspace_root().join("target/debug/meshgate-autoscaler");
    assert!(
        bin.is_file(),
        "{} is missing: build it with the workspace (cargo build -p meshgate-autoscaler; \
         cargo nextest run --workspace builds it for infra/autoscaler's own tests)",
        bin.display()
    );
    let deadline = Instant::now() + Duration::from_secs(150);
    let fleet = Fleet::start(deadline).await;
    let loads = fleet.load();

    let dir = tempfile::tempdir().unwrap();
    let bind: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = format!(
        "bind: {bind}\n{}",
        autoscaler_yaml(&fleet.prom.url(), &fleet.moto.url(), SCALING_GROUP)
    );
    let path = dir.path().join("autoscaler.yaml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("autoscaler.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = KillOnDrop(
        Command::new(&bin)
            .args(["run", "-c", path.to_str().unwrap(), "--log-format", "json"])
            .env_remove("RUST_LOG")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let log = &log;
    let client = &fleet.client;
    let grown = poll(
        deadline,
        "the binary raising the desired capacity",
        move || async move {
            let d = desired_in_moto(client).await;
            (d > 2).then_some(d)
        },
    )
    .await;
    eprintln!("desired capacity under load: {grown}");
    let r = http_get(bind, "/metrics").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let up = parse_exposition(&r.text()).into_iter().find(|s| {
        s.name == "meshgate_autoscaler_decisions_total" && s.labels == format!("group=\"{GROUP}\",direction=\"up\"")
    });
    assert!(up.is_some_and(|s| s.value >= 1.0), "{}", r.text());
    assert_eq!(http_get(bind, "/healthz").await.unwrap().status, StatusCode::OK);
    for l in loads {
        let (ok, failures) = l.finish().await;
        assert!(ok > 0 && failures.is_empty(), "{ok} ok, failures: {failures:?}");
    }
    poll(
        deadline,
        "the binary bringing the capacity back to 2",
        move || async move { (desired_in_moto(client).await == 2).then_some(()) },
    )
    .await;

    let st = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = poll(deadline, "the binary to exit after SIGTERM", move || {
        let exited = child.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------------------------
// Lifecycle hooks

/// A call the recorder answered itself.
#[derive(Debug, Clone)]
struct Recorded {
    action: String,
    instance: String,
    hook: String,
    result: String,
    at: Instant,
    /// The instance's `meshgate_requests_in_flight` and `meshgate_draining` when the call came.
    in_flight: Option<f64>,
    draining: Option<bool>,
}

#[derive(Default)]
struct RecorderState {
    /// Instance id → the lifecycle state to report instead of moto's.
    held: HashMap<String, String>,
    /// Instance id → its admin address (to read its in-flight requests).
    admin: HashMap<String, SocketAddr>,
    calls: Vec<Recorded>,
    /// Action → error code to answer once.
    fail_once: HashMap<String, String>,
    forwarded: Vec<String>,
}

/// The AWS query-protocol recorder in front of moto (see the module comment).
struct Recorder {
    addr: SocketAddr,
    state: Arc<Mutex<RecorderState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn form(body: &[u8]) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn xml(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn empty_result(action: &str) -> String {
    format!(
        "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><{action}Result/>\
         <ResponseMetadata><RequestId>recorder</RequestId></ResponseMetadata></{action}Response>"
    )
}

/// Replaces the `LifecycleState` of `id`'s `<member>` in a DescribeAutoScalingGroups answer.
fn set_lifecycle_state(xml: &str, id: &str, state: &str) -> String {
    let needle = format!("<InstanceId>{id}</InstanceId>");
    let Some(at) = xml.find(&needle) else {
        return xml.to_string();
    };
    let start = xml[..at].rfind("<member>").expect("instance in a <member>");
    let end = at + xml[at..].find("</member>").expect("closed <member>");
    let member = &xml[start..end];
    let s = member.find("<LifecycleState>").expect("LifecycleState") + "<LifecycleState>".len();
    let e = member.find("</LifecycleState>").expect("/LifecycleState");
    format!("{}{}{}{}", &xml[..start], &member[..s], state, &xml[start + e..])
}

impl Recorder {
    async fn start(moto: SocketAddr) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<RecorderState>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(Recorder::handle(st, moto, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn handle(
        st: Arc<Mutex<RecorderState>>,
        moto: SocketAddr,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let params = form(&body);
        let action = params.get("Action").cloned().unwrap_or_default();
        let injected = st.lock().unwrap().fail_once.remove(&action);
        if let Some(code) = injected {
            return xml(
                StatusCode::BAD_REQUEST,
                format!(
                    "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type>\
                     <Code>{code}</Code><Message>Rate exceeded (injected by the test)</Message></Error>\
                     <RequestId>recorder</RequestId></ErrorResponse>"
                ),
            );
        }
        if action == "CompleteLifecycleAction" || action == "RecordLifecycleActionHeartbeat" {
            let instance = params.get("InstanceId").cloned().unwrap_or_default();
            let admin = st.lock().unwrap().admin.get(&instance).copied();
            // What the instance is doing at the moment its lifecycle action completes.
            let (in_flight, draining) = match admin {
                Some(a) => match Admin::new(Http::new(), None, Duration::from_secs(5)).load(a).await {
                    Ok(l) => (Some(l.in_flight), Some(l.draining)),
                    Err(_) => (None, None),
                },
                None => (None, None),
            };
            let mut s = st.lock().unwrap();
            s.calls.push(Recorded {
                action: action.clone(),
                instance: instance.clone(),
                hook: params.get("LifecycleHookName").cloned().unwrap_or_default(),
                result: params.get("LifecycleActionResult").cloned().unwrap_or_default(),
                at: Instant::now(),
                in_flight,
                draining,
            });
            if action == "CompleteLifecycleAction" {
                // CONTINUE: the instance leaves its wait state.
                let next = match s.held.remove(&instance).as_deref() {
                    Some("Terminating:Wait") => Some("Terminating:Proceed"),
                    Some("Pending:Wait") => Some("InService"),
                    _ => None,
                };
                if let Some(n) = next {
                    if n != "InService" {
                        s.held.insert(instance, n.to_string());
                    }
                }
            }
            return xml(StatusCode::OK, empty_result(&action));
        }
        // Everything else goes to moto as it came.
        st.lock().unwrap().forwarded.push(action.clone());
        let mut c = match Client::connect(moto, "127.0.0.1".parse().unwrap(), false).await {
            Ok(c) => c,
            Err(e) => return xml(StatusCode::BAD_GATEWAY, format!("recorder: moto: {e}")),
        };
        let mut fwd = Request::builder().method(parts.method).uri(parts.uri);
        for (k, v) in &parts.headers {
            fwd = fwd.header(k, v);
        }
        let resp = match c.send(fwd.body(Full::new(body)).unwrap()).await {
            Ok(r) => r,
            Err(e) => return xml(StatusCode::BAD_GATEWAY, format!("recorder: moto: {e}")),
        };
        let mut text = resp.text();
        if action == "DescribeAutoScalingGroups" {
            for (id, state) in st.lock().unwrap().held.iter() {
                text = set_lifecycle_state(&text, id, state);
            }
        }
        xml(resp.status, text)
    }

    fn calls(&self, action: &str, instance: &str) -> Vec<Recorded> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.action == action && c.instance == instance)
            .cloned()
            .collect()
    }
}

/// A missing tool is a failure that says how to get it, never a skip.
#[test]
#[should_panic(expected = "scripts/test.sh")]
fn a_missing_tool_fails_the_test() {
    tool_in(
        "moto_server-not-installed",
        &[workspace_root().join("target/no-such-venv/bin/x")],
        "see scripts/test.sh",
    );
}

#[test]
fn recorder_rewrites_one_instance() {
    let x = "<Instances><member><InstanceId>i-1</InstanceId><LifecycleState>InService</LifecycleState></member>\
             <member><HealthStatus>Healthy</HealthStatus><InstanceId>i-2</InstanceId><LifecycleState>InService</LifecycleState></member></Instances>";
    let y = set_lifecycle_state(x, "i-2", "Terminating:Wait");
    assert_eq!(
        y,
        x.replacen(
            "<InstanceId>i-2</InstanceId><LifecycleState>InService",
            "<InstanceId>i-2</InstanceId><LifecycleState>Terminating:Wait",
            1
        )
    );
    assert_eq!(form(b"Action=X&InstanceId=i-1&Hook=a%2Fb+c")["Hook"], "a/b c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_completes_the_lifecycle_action_only_after_the_drain() {
    let deadline = Instant::now() + Duration::from_secs(120);
    // drain.delay keeps the instance serving (readiness off) for 2 s, as it would while the
    // load balancer deregisters it; then its connections are asked to close within 1 s.
    let env = EnvBuilder::default()
        .admin()
        .extra("drain:\n  delay: 2s\n  spread: 1s\n  timeout: 20s\n")
        .start()
        .await
        .unwrap();
    let leaving_gate = second_gate(&env).await;
    let (leaving_addr, leaving_admin) = (leaving_gate.first_addr(), leaving_gate.admin.expect("admin bound"));
    let moto = Moto::start().await;
    let client = aws_client(&moto.url()).await;
    let ids = create_group(&client, 2, 1, 4).await;
    let (staying, leaving) = (ids[0].clone(), ids[1].clone());
    let recorder = Recorder::start(moto.addr).await;
    {
        let mut s = recorder.state.lock().unwrap();
        s.admin.insert(staying.clone(), env.admin_addr());
        s.admin.insert(leaving.clone(), leaving_admin);
        // One throttled call, to be retried.
        s.fail_once.insert("DescribeLifecycleHooks".into(), "Throttling".into());
    }

    // Requests in flight on the instance that will leave.
    let load = Load::start(leaving_addr, BILLING_IP, &host("reviews"), "/slow?delay_ms=200", 8);
    let admin = Admin::new(Http::new(), None, Duration::from_secs(5));
    let admin = &admin;
    poll(
        deadline,
        "requests in flight on the leaving instance",
        move || async move { admin.load(leaving_admin).await.ok().filter(|l| l.in_flight >= 1.0) },
    )
    .await;

    // The group shrinks: the leaving instance is held in Terminating:Wait; a new one is held
    // in Pending:Wait (the staying instance plays it: it is ready).
    {
        let mut s = recorder.state.lock().unwrap();
        s.held.insert(leaving.clone(), "Terminating:Wait".into());
        s.held.insert(staying.clone(), "Pending:Wait".into());
    }
    // Prometheus is not needed here: the signal is missing (nothing listens on its port), so
    // capacity holds, and min = max = 2 keeps the group as it is anyway.
    let group = format!(
        "    target: 1000\n    min_capacity: 2\n    max_capacity: 2\n    drain_timeout: 60s\n    \
         drain_poll_interval: 100ms\n    heartbeat_interval: 500ms\n    admin_address_overrides:\n      \
         {staying}: {}\n      {leaving}: {leaving_admin}\n",
        env.admin_addr()
    );
    let cfg = autoscaler_config(&format!("http://127.0.0.1:{}", free_port()), &recorder.url(), &group);
    let running = Running::start(controller(cfg, &recorder.url()).await).await;

    // The autoscaler calls POST /drain: readiness goes off while requests are still in flight.
    // The load balancer (the test) takes the instance out of rotation.
    let in_flight_at_drain = poll(
        deadline,
        "the leaving instance's /readyz turning 503",
        move || async move {
            let ready = admin.ready(leaving_admin).await.ok()?;
            if ready {
                return None;
            }
            Some(admin.load(leaving_admin).await.ok()?.in_flight)
        },
    )
    .await;
    load.lb_removed.store(true, std::sync::atomic::Ordering::SeqCst);
    let drain_seen = Instant::now();
    assert!(
        in_flight_at_drain >= 1.0,
        "drain called with {in_flight_at_drain} in flight: the test must drain a busy instance"
    );

    let recorder = &recorder;
    let leaving_ref = &leaving;
    let done = poll(
        deadline,
        "CompleteLifecycleAction for the leaving instance",
        move || async move {
            recorder
                .calls("CompleteLifecycleAction", leaving_ref)
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(
        (done.hook.as_str(), done.result.as_str()),
        ("drain", "CONTINUE"),
        "{done:?}"
    );
    assert_eq!(done.draining, Some(true), "{done:?}");
    assert_eq!(
        done.in_flight,
        Some(0.0),
        "the lifecycle action completed with requests in flight: {done:?}"
    );
    assert!(done.at > drain_seen, "{done:?}");
    // It waited, and said so to the hook meanwhile.
    let beats = recorder.calls("RecordLifecycleActionHeartbeat", &leaving);
    assert!(!beats.is_empty(), "no heartbeat while draining");
    assert!(beats.iter().all(|b| b.at < done.at && b.hook == "drain"), "{beats:?}");
    assert!(beats
        .iter()
        .any(|b| b.in_flight.unwrap_or(0.0) > 0.0 || b.draining == Some(true)));

    // Not one request was cut.
    let (ok, failures) = load.finish().await;
    assert!(ok > 0, "no request succeeded");
    assert!(failures.is_empty(), "requests failed during the drain: {failures:?}");

    // The launching instance: completed once ready.
    let staying_ref = &staying;
    let launched = poll(
        deadline,
        "CompleteLifecycleAction for the launching instance",
        move || async move {
            recorder
                .calls("CompleteLifecycleAction", staying_ref)
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(
        (launched.hook.as_str(), launched.result.as_str()),
        ("ready", "CONTINUE")
    );

    // Counted; the throttled call was retried.
    let labels = format!("group=\"{GROUP}\",transition=\"terminating\",result=\"completed\"");
    assert_eq!(
        running
            .metric("meshgate_autoscaler_lifecycle_actions_total", &labels)
            .await,
        Some(1.0)
    );
    assert_eq!(
        running
            .metric(
                "meshgate_autoscaler_aws_errors_total",
                "operation=\"DescribeLifecycleHooks\",kind=\"throttling\""
            )
            .await,
        Some(1.0)
    );
    let forwarded = recorder.state.lock().unwrap().forwarded.clone();
    assert!(forwarded.iter().any(|a| a == "DescribeLifecycleHooks"), "{forwarded:?}");
    running.stop().await;
    // Not `abort()`: on an instance that has finished a drain it panics (meshgate polls the
    // listener tasks' join handles a second time); dropping it ends with the runtime.
    drop(leaving_gate);
}

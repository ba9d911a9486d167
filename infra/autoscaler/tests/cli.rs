//! The `meshgate-autoscaler` binary: `check` and `simulate` on the bundled examples, and `run`
//! (`--dry-run`, `--once`, its `/metrics` and `/healthz`) against a stand-in AWS endpoint and a
//! stand-in Prometheus on loopback: small HTTP servers in this file that answer the few calls
//! the binary makes (the real moto and Prometheus are driven by `tests/e2e/tests/autoscaler.rs`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshgate-autoscaler"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Checks that `svg` is well-formed XML as far as a chart needs: one root `<svg>`, every tag
/// closed in order, attributes quoted, no stray `<` or `&`.
fn assert_well_formed(svg: &str) {
    let body = svg.trim();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => &rest[rest.find("?>").expect("XML declaration closed") + 2..],
        None => body,
    };
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = body;
    while let Some(lt) = rest.find('<') {
        let text = &rest[..lt];
        assert!(!text.contains('>'), "stray '>' in text {text:?}");
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare '&' in {text:?}"
            );
        }
        let gt = rest[lt..].find('>').expect("tag closed") + lt;
        let tag = &rest[lt + 1..gt];
        assert!(!tag.contains('<'), "'<' inside tag {tag:?}");
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(open, name.trim(), "mismatched tags");
        } else {
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name = tag.split_whitespace().next().expect("tag name").to_string();
            // Attributes: name="value" pairs.
            let attrs = tag[name.len()..].trim();
            assert_eq!(attrs.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, "svg", "root element");
            }
            if !self_closing {
                stack.push(name);
            }
        }
        rest = &rest[gt + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1, "one root element");
    assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
}

#[test]
fn check_accepts_the_example_and_names_lines_of_errors() {
    let (out, stdout, stderr) = run(bin().args(["check", "-c"]).arg(examples().join("autoscaler.yaml")));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("group meshgate-fleet capacity 2..=30"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "prometheus:\n  url: http://127.0.0.1:9090\ngroups:\n  - name: g\n    target: 0\n    min_capacity: 3\n    max_capacity: 1\n",
    )
    .unwrap();
    let (out, _, stderr) = run(bin().args(["check", "-c"]).arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    let f = bad.display();
    assert!(
        stderr.contains(&format!("{f}:5: target must be a positive number")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{f}:6: min_capacity 3 is above max_capacity 1")),
        "{stderr}"
    );
}

#[test]
fn simulate_the_example_trace() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("chart.svg");
    let (out, stdout, stderr) = run(bin()
        .arg("simulate")
        .arg("--trace")
        .arg(examples().join("load-trace.csv"))
        .arg("--config")
        .arg(examples().join("autoscaler.yaml"))
        .arg("--out")
        .arg(&chart));
    assert!(out.status.success(), "{stdout}{stderr}");
    println!("{stdout}");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"))
            .to_string()
    };
    // The example peaks at ~520 in flight against a target of 25 per instance (21 instances);
    // the bounds are 2..=30.
    let peak: u32 = line("peak capacity: ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((21..=30).contains(&peak), "peak {peak}");
    assert_eq!(line("min capacity: "), "2");
    let events = line("scale events: ");
    let (total, rest) = events.split_once(' ').unwrap();
    let total: u32 = total.parse().unwrap();
    assert!(total >= 4, "{events}");
    assert!(rest.contains(" up, ") && rest.contains(" down)"), "{events}");
    let over = line("time over target: ");
    let secs: f64 = over.split_whitespace().next().unwrap().parse().unwrap();
    assert!(secs > 0.0 && secs < 7200.0, "{over}");
    assert!(
        stdout.contains("signal cpu: no column in the trace, not simulated"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("chart: {}", chart.display())));

    let svg = std::fs::read_to_string(&chart).unwrap();
    assert_well_formed(&svg);
    for needle in ["desired capacity", "in service", "instances needed", "<path d=\"M"] {
        assert!(svg.contains(needle), "chart lacks {needle:?}");
    }

    // Errors are one line with the file and line.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "seconds,load\n0,1\nlater,2\n").unwrap();
    let (out, _, stderr) = run(bin()
        .arg("simulate")
        .arg("--trace")
        .arg(&bad)
        .arg("--config")
        .arg(examples().join("autoscaler.yaml")));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("bad.csv: line 3"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Stand-ins for AWS and Prometheus

/// Answers `DescribeAutoScalingGroups` (group `g`: desired 2, two instances in service),
/// `DescribeLifecycleHooks` (none) and `SetDesiredCapacity` (recorded), like the AWS query API;
/// and Prometheus' `/api/v1/query` with one sample of value `prom_value`.
struct Stub {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<HashMap<String, String>>>>,
    _rt: tokio::runtime::Runtime,
}

fn form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":")))
        .collect()
}

impl Stub {
    fn start(prom_value: &'static str) -> Stub {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let calls: Arc<Mutex<Vec<HashMap<String, String>>>> = Arc::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let c = calls.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(Stub::answer(&c, &path, &body, prom_value))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Stub { addr, calls, _rt: rt }
    }

    fn answer(
        calls: &Mutex<Vec<HashMap<String, String>>>,
        path: &str,
        body: &[u8],
        prom_value: &str,
    ) -> Response<Full<Bytes>> {
        if path == "/api/v1/query" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let json = format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[{now},"{prom_value}"]}}]}}}}"#
            );
            return Response::new(Full::new(Bytes::from(json)));
        }
        let params = form(body);
        let action = params.get("Action").cloned().unwrap_or_default();
        calls.lock().unwrap().push(params);
        let ns = "xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"";
        let meta = "<ResponseMetadata><RequestId>stub</RequestId></ResponseMetadata>";
        let xml = match action.as_str() {
            "DescribeAutoScalingGroups" => {
                let member = |id: &str| {
                    format!(
                        "<member><InstanceId>{id}</InstanceId><AvailabilityZone>us-east-1a</AvailabilityZone>\
                         <LifecycleState>InService</LifecycleState><HealthStatus>Healthy</HealthStatus>\
                         <ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>"
                    )
                };
                format!(
                    "<DescribeAutoScalingGroupsResponse {ns}><DescribeAutoScalingGroupsResult><AutoScalingGroups><member>\
                     <AutoScalingGroupName>g</AutoScalingGroupName><MinSize>1</MinSize><MaxSize>10</MaxSize>\
                     <DesiredCapacity>2</DesiredCapacity><DefaultCooldown>300</DefaultCooldown>\
                     <AvailabilityZones><member>us-east-1a</member></AvailabilityZones>\
                     <HealthCheckType>EC2</HealthCheckType><CreatedTime>2024-01-01T00:00:00Z</CreatedTime>\
                     <Instances>{}{}</Instances></member></AutoScalingGroups></DescribeAutoScalingGroupsResult>{meta}\
                     </DescribeAutoScalingGroupsResponse>",
                    member("i-0001"),
                    member("i-0002")
                )
            }
            "DescribeLifecycleHooks" => format!(
                "<DescribeLifecycleHooksResponse {ns}><DescribeLifecycleHooksResult><LifecycleHooks/>\
                 </DescribeLifecycleHooksResult>{meta}</DescribeLifecycleHooksResponse>"
            ),
            "SetDesiredCapacity" => format!("<SetDesiredCapacityResponse {ns}>{meta}</SetDesiredCapacityResponse>"),
            other => {
                let mut r = Response::new(Full::new(Bytes::from(format!("stub: unexpected action {other}"))));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            }
        };
        Response::new(Full::new(Bytes::from(xml)))
    }

    fn actions(&self, action: &str) -> Vec<HashMap<String, String>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.get("Action").map(String::as_str) == Some(action))
            .cloned()
            .collect()
    }
}

/// A config for group `g` against the stub: target 10 per instance, so a value of 30 on two
/// instances asks for 6.
fn stub_config(dir: &Path, stub: &Stub, extra: &str) -> PathBuf {
    let p = dir.join("as.yaml");
    std::fs::write(
        &p,
        format!(
            "prometheus:\n  url: http://{a}\naws:\n  region: us-east-1\n  max_attempts: 1\ninterval: 1s\n{extra}\
             groups:\n  - name: g\n    target: 10\n    min_capacity: 1\n    max_capacity: 10\n",
            a = stub.addr
        ),
    )
    .unwrap();
    p
}

/// The binary's environment: dummy credentials, no profile files, no instance metadata.
fn aws_env(cmd: &mut Command, dir: &Path) {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL");
}

#[test]
fn dry_run_prints_the_decision_and_changes_nothing() {
    let stub = Stub::start("30");
    let dir = tempfile::tempdir().unwrap();
    let cfg = stub_config(dir.path(), &stub, "");
    let endpoint = format!("http://{}", stub.addr);
    let mut cmd = bin();
    cmd.args([
        "--log-format",
        "json",
        "run",
        "--once",
        "--dry-run",
        "--endpoint-url",
        &endpoint,
        "-c",
    ])
    .arg(&cfg);
    aws_env(&mut cmd, dir.path());
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("dry-run: group=g up desired 2 -> 6 recommended=6 in_service=2"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("load=30.000/10→6"), "{stdout}");
    assert_eq!(stub.actions("DescribeAutoScalingGroups").len(), 1);
    assert!(
        stub.actions("SetDesiredCapacity").is_empty(),
        "dry-run set the capacity"
    );
    // The structured log has the decision and its inputs.
    let log = stderr
        .lines()
        .find(|l| l.contains("\"message\":\"decision\""))
        .unwrap_or_else(|| panic!("no decision log line:\n{stderr}"));
    for field in [
        "\"desired\":6",
        "\"previous\":2",
        "\"in_service\":2",
        "\"dry_run\":true",
        "\"direction\":\"up\"",
    ] {
        assert!(log.contains(field), "{field} not in {log}");
    }

    // The same without --dry-run sets it.
    let mut cmd = bin();
    cmd.args(["run", "--once", "--endpoint-url", &endpoint, "-c"]).arg(&cfg);
    aws_env(&mut cmd, dir.path());
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("dry-run"), "{stdout}");
    let set = stub.actions("SetDesiredCapacity");
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(set[0]["DesiredCapacity"], "6");
    assert_eq!(set[0]["HonorCooldown"], "false");
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn run_serves_metrics_and_healthz() {
    // A NaN signal: missing data, counted, and no scale-in.
    let stub = Stub::start("NaN");
    let dir = tempfile::tempdir().unwrap();
    let cfg = stub_config(dir.path(), &stub, "bind: 127.0.0.1:0\n");
    let mut cmd = bin();
    cmd.args([
        "--log-format",
        "json",
        "run",
        "--endpoint-url",
        &format!("http://{}", stub.addr),
        "-c",
    ])
    .arg(&cfg)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    aws_env(&mut cmd, dir.path());
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    // The bound address is in the log line "serving /metrics and /healthz".
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no 'serving' log line:\n{}", seen.join("\n")));
        if line.contains("serving /metrics") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
        seen.push(line);
    };
    let (status, body) = get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    // Poll (bounded) until the first round is in the metrics.
    let body = loop {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        if body.contains(r#"meshgate_autoscaler_decisions_total{group="g",direction="none"} 1"#) {
            break body;
        }
        assert!(Instant::now() < deadline, "no decision in the metrics:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for needle in [
        r#"meshgate_autoscaler_current_capacity{group="g"} 2"#,
        r#"meshgate_autoscaler_desired_capacity{group="g"} 2"#,
        r#"meshgate_autoscaler_recommended_capacity{group="g"} 2"#,
        r#"meshgate_autoscaler_signal_value{group="g",signal="load"} NaN"#,
        r#"meshgate_autoscaler_signal_missing_total{group="g",signal="load",reason="nan"} "#,
        r#"meshgate_autoscaler_decisions_total{group="g",direction="up"} 0"#,
        r#"meshgate_autoscaler_aws_errors_total{operation="SetDesiredCapacity",kind="throttling"} 0"#,
    ] {
        assert!(body.contains(needle), "no {needle} in:\n{body}");
    }
    assert!(stub.actions("SetDesiredCapacity").is_empty());
}

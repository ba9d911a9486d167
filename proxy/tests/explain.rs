//! `meshgate explain`, the real binary: from a config file (allowed, denied by subnet, by key,
//! unknown host, service not allowed, usage errors) and from a running instance's admin API,
//! which must give the same answer as the file it runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"listeners:
  - name: vm-http
    bind: 127.0.0.1:0
    protocol: http
mesh:
  trust_domain: cluster.local
  gateway: 127.0.0.1:15443
  identity:
    cert_chain: cert-chain.pem
    key: key.pem
    root_cert: root-cert.pem
services:
  reviews:
    host: reviews.bookinfo.svc.cluster.local
    port: 9080
    protocol: http2
    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews
  ratings:
    host: ratings.bookinfo.svc.cluster.local
    port: 9080
    protocol: http1
tenants:
  billing-vms:
    sources: [10.20.0.0/16]
    allow: [reviews]
    rate_limit: {requests_per_second: 50, burst: 100}
  laptops:
    api_keys: ["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]
    allow: ["*"]
  ci:
    sources: [192.168.1.0/24]
    api_keys: ["sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"]
    allow: [ratings]
"#;
/// The keys whose digests `laptops` and `ci` hold.
const LAPTOP_KEY: &str = "hello";
const CI_KEY: &str = "bar";
const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshsim::MeshCa::new("cluster.local").unwrap();
        let cert = ca.issue("meshgate", "meshgate").unwrap();
        cert.write_files(dir.path(), &ca.root_pem()).unwrap();
        std::fs::write(dir.path().join("meshgate.yaml"), format!("{CONFIG}{extra}")).unwrap();
        Fixture { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("meshgate.yaml")
    }

    /// `meshgate explain -c CONFIG ARGS…`
    fn explain(&self, args: &[&str]) -> (i32, String, String) {
        let config = self.config();
        let mut all = vec!["explain", "-c", config.to_str().unwrap()];
        all.extend_from_slice(args);
        meshgate(&all)
    }
}

fn meshgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("run meshgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of the text form's `label:` row.
fn row<'a>(out: &'a str, label: &str) -> &'a str {
    let prefix = format!("{label}:");
    out.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {label:?} row in\n{out}"))
        .trim()
}

fn refused(out: (i32, String, String), decision: &str) -> String {
    let (code, out, err) = out;
    assert_eq!(code, 1, "refusals exit 1\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(row(&out, "decision"), decision, "{out}");
    out
}

#[test]
fn allowed_shows_tenant_route_and_identities() {
    let f = Fixture::new("");
    let (code, out, err) = f.explain(&["--client", "10.20.3.4", &format!("http://{REVIEWS}:9080/reviews/1")]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(row(&out, "decision"), "forward (200 forwarded)");
    assert_eq!(row(&out, "client"), "10.20.3.4, no API key");
    assert_eq!(row(&out, "tenant"), "billing-vms (matched by source 10.20.0.0/16)");
    assert_eq!(row(&out, "tenant allows"), "reviews");
    assert_eq!(row(&out, "tenant limits"), "rate 50 requests/s, burst 100");
    assert_eq!(
        row(&out, "service"),
        "reviews (reviews.bookinfo.svc.cluster.local port 9080, http2)"
    );
    assert_eq!(row(&out, "sni"), "outbound_.9080_._.reviews.bookinfo.svc.cluster.local");
    assert_eq!(row(&out, "alpn"), "istio-h2, istio, h2");
    assert_eq!(row(&out, "gateway"), "127.0.0.1:15443");
    assert_eq!(
        row(&out, "server identity"),
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );
    assert_eq!(
        row(&out, "client identity"),
        "spiffe://cluster.local/ns/meshgate/sa/meshgate"
    );
    assert!(!out.contains("why:"), "{out}");

    // The same through --json, and by API key from anywhere.
    let (code, out, err) = f.explain(&["--client", "203.0.113.9", "--key", LAPTOP_KEY, "--json", REVIEWS]);
    assert_eq!(code, 0, "{out}{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["decision"], "forward");
    assert_eq!(j["status"], 200);
    assert_eq!(j["reason"], "forwarded");
    assert_eq!(j["api_key"], true);
    assert_eq!(j["tenant"]["name"], "laptops");
    assert_eq!(j["tenant"]["matched_by"], "API key");
    assert_eq!(
        j["route"]["sni"],
        "outbound_.9080_._.reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(j["route"]["alpn"], serde_json::json!(["istio-h2", "istio", "h2"]));
    assert_eq!(j["route"]["gateway"], serde_json::json!(["127.0.0.1:15443"]));
    assert_eq!(j["client_identity"], "spiffe://cluster.local/ns/meshgate/sa/meshgate");
    assert!(!out.contains(LAPTOP_KEY), "the key must not be echoed: {out}");
}

#[test]
fn deny_by_subnet() {
    let f = Fixture::new("");
    let out = refused(
        f.explain(&["--client", "172.16.0.1", REVIEWS]),
        "refuse (403 unknown_client: client address is not in any tenant)",
    );
    assert_eq!(row(&out, "why"), "no tenant lists a source containing 172.16.0.1");
    assert_eq!(row(&out, "tenant"), "none");
    assert_eq!(row(&out, "client identity"), "none (no tenant)");
    // A keyed tenant's subnet does not admit a request without the key.
    let out = refused(
        f.explain(&["--client", "192.168.1.7", REVIEWS]),
        "refuse (403 unknown_client: client address is not in any tenant)",
    );
    assert_eq!(row(&out, "why"), "tenant ci accepts 192.168.1.7 only with its API key");
}

#[test]
fn deny_by_key() {
    let f = Fixture::new("");
    let out = refused(
        f.explain(&["--client", "10.20.0.1", "--key", "not-a-key", REVIEWS]),
        "refuse (401 bad_key: invalid API key)",
    );
    assert!(row(&out, "why").starts_with("no tenant holds the key sha256:"), "{out}");
    assert_eq!(row(&out, "tenant"), "none");

    let out = refused(
        f.explain(&[
            "--client",
            "10.20.0.1",
            "--key",
            CI_KEY,
            "ratings.bookinfo.svc.cluster.local",
        ]),
        "refuse (403 key_wrong_source: API key not accepted from this client address)",
    );
    assert_eq!(
        row(&out, "why"),
        "the key belongs to tenant ci, which accepts it only from 192.168.1.0/24"
    );
    // From its source, the same key is forwarded.
    let (code, out, _) = f.explain(&[
        "--client",
        "192.168.1.7",
        "--key",
        CI_KEY,
        "ratings.bookinfo.svc.cluster.local",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&out, "alpn"), "istio-http/1.1, istio, http/1.1");
}

#[test]
fn unknown_host() {
    let f = Fixture::new("");
    let out = refused(
        f.explain(&["--client", "10.20.0.1", "http://details.bookinfo.svc.cluster.local/"]),
        "refuse (404 unknown_host: unknown host)",
    );
    assert_eq!(
        row(&out, "target"),
        "http://details.bookinfo.svc.cluster.local/ (authority details.bookinfo.svc.cluster.local)"
    );
    assert_eq!(
        row(&out, "why"),
        "no service has details.bookinfo.svc.cluster.local as its host or an alias"
    );
    assert_eq!(row(&out, "tenant"), "billing-vms (matched by source 10.20.0.0/16)");
    assert_eq!(row(&out, "service"), "none");
}

#[test]
fn service_not_allowed() {
    let f = Fixture::new("");
    let out = refused(
        f.explain(&["--client", "10.20.0.1", "ratings.bookinfo.svc.cluster.local:9080"]),
        "refuse (403 service_not_allowed: service not allowed for tenant)",
    );
    assert_eq!(row(&out, "why"), "tenant billing-vms may call only: reviews");
    assert_eq!(row(&out, "sni"), "outbound_.9080_._.ratings.bookinfo.svc.cluster.local");
}

#[test]
fn usage_and_config_errors_exit_2() {
    let f = Fixture::new("");
    let config = f.config();
    let config = config.to_str().unwrap();
    // Neither source, both, no client, a bad address, an empty key.
    for args in [
        vec!["explain", "--client", "10.20.0.1", REVIEWS],
        vec![
            "explain",
            "-c",
            config,
            "--admin",
            "127.0.0.1:1",
            "--client",
            "10.20.0.1",
            REVIEWS,
        ],
        vec!["explain", "-c", config, REVIEWS],
        vec!["explain", "-c", config, "--client", "10.20.0", REVIEWS],
        vec!["explain", "-c", config, "--client", "10.20.0.1", "--key", "", REVIEWS],
    ] {
        let (code, out, err) = meshgate(&args);
        assert_eq!(code, 2, "{args:?}\n{out}{err}");
    }
    std::fs::write(f.config(), "listeners: []\n").unwrap();
    let (code, _, err) = f.explain(&["--client", "10.20.0.1", REVIEWS]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("meshgate.yaml"), "{err}");
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn healthz(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut resp = String::new();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut resp).is_ok()
        && resp.starts_with("HTTP/1.1 200")
}

fn start(f: &Fixture, admin: SocketAddr) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["run", "-c", f.config().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthz(admin) {
        assert!(child.try_wait().unwrap().is_none(), "meshgate run exited");
        assert!(Instant::now() < deadline, "admin API did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

#[test]
fn running_instance_answers_like_its_config_file() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let f = Fixture::new(&format!("admin:\n  bind: {addr}\n  token_file: admin-token\n"));
    std::fs::write(f.dir.path().join("admin-token"), "s3cret\n").unwrap();
    let _proc = start(&f, addr);
    let admin = addr.to_string();
    let token = f.dir.path().join("admin-token");
    let token = token.to_str().unwrap();
    let via_admin = |args: &[&str]| {
        let mut all = vec!["explain", "--admin", &admin, "--token-file", token];
        all.extend_from_slice(args);
        meshgate(&all)
    };

    // Allowed, denied by subnet, by key, unknown host: the same answers and exit codes as the file.
    for args in [
        vec!["--client", "10.20.3.4", REVIEWS],
        vec!["--client", "203.0.113.9", "--key", LAPTOP_KEY, REVIEWS],
        vec!["--client", "172.16.0.1", REVIEWS],
        vec!["--client", "10.20.0.1", "--key", "not-a-key", REVIEWS],
        vec!["--client", "10.20.0.1", "--key", CI_KEY, REVIEWS],
        vec!["--client", "10.20.0.1", "http://details.bookinfo.svc.cluster.local/"],
        vec!["--client", "10.20.0.1", "--json", "ratings.bookinfo.svc.cluster.local"],
    ] {
        let (code, out, err) = via_admin(&args);
        let (fcode, fout, _) = f.explain(&args);
        assert!(code == 0 || code == 1, "{args:?}: {err}");
        assert_eq!((code, &out), (fcode, &fout), "{args:?}");
    }
    let (_, out, _) = via_admin(&["--client", "10.20.3.4", REVIEWS]);
    assert_eq!(row(&out, "decision"), "forward (200 forwarded)");
    assert_eq!(row(&out, "sni"), "outbound_.9080_._.reviews.bookinfo.svc.cluster.local");

    // The answer reveals tenants and sources: no token, no answer.
    let (code, _, err) = meshgate(&["explain", "--admin", &admin, "--client", "10.20.3.4", REVIEWS]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "{err}");
}

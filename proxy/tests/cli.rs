//! The `meshgate` binary's config handling: `check` and `run` reject each kind of bad config with
//! file, line and reason (exit status 1), accept a good one with a summary (exit status 0).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use meshsim::{IssueOptions, MeshCa, WorkloadCert};

pub(crate) const TD: &str = "cluster.local";
pub(crate) const BASE: &str = r#"listeners:
  - name: vm-http
    bind: 127.0.0.1:0
    protocol: http
admin:
  bind: 127.0.0.1:0
mesh:
  trust_domain: cluster.local
  gateway: eastwest.mesh.example.com:15443
  identity:
    cert_chain: cert-chain.pem
    key: key.pem
    root_cert: root-cert.pem
services:
  reviews:
    host: reviews.bookinfo.svc.cluster.local
    port: 9080
    protocol: http2
tenants:
  billing-vms:
    sources: [10.20.0.0/16]
    allow: [reviews]
  laptops:
    api_keys: ["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]
    allow: ["*"]
"#;

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    ca: MeshCa,
}

impl Fixture {
    /// A directory with a good identity from a fresh mesh CA.
    pub(crate) fn new() -> Fixture {
        let ca = MeshCa::new(TD).unwrap();
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        let cert = f.ca.issue("meshgate", "meshgate").unwrap();
        f.identity(&cert, &f.ca.root_pem());
        f
    }

    fn identity(&self, cert: &WorkloadCert, root: &str) {
        cert.write_files(self.dir.path(), root).unwrap();
    }

    pub(crate) fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    pub(crate) fn config(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("meshgate.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

pub(crate) fn meshgate(args: &[&str]) -> (i32, String, String) {
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

pub(crate) fn check(path: &Path) -> (i32, String, String) {
    meshgate(&["check", "-c", path.to_str().unwrap()])
}

/// `meshgate run`, killed if it is still running after `limit` (a config that should have been
/// refused would otherwise start serving and hang the test).
fn run_bounded(path: &Path, limit: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["run", "-c", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run meshgate");
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("meshgate run did not refuse the config within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

/// Asserts `meshgate check` and `meshgate run` both fail naming `file:line:` and a reason
/// containing `needle`.
pub(crate) fn assert_rejected(f: &Fixture, text: &str, line: u64, needle: &str) {
    let path = f.config(text);
    let (code, _out, err) = check(&path);
    assert_eq!(code, 1, "expected rejection, stderr: {err}");
    let want = format!("{}:{line}: ", path.display());
    let hit = err.lines().find(|l| l.contains(&want));
    let hit = hit.unwrap_or_else(|| panic!("no error at line {line} in:\n{err}"));
    assert!(hit.contains(needle), "error at line {line} lacks {needle:?}: {hit}");
    let (run_code, run_err) = run_bounded(&path, Duration::from_secs(20));
    assert_eq!(run_code, 1, "run accepted a config check refused: {run_err}");
    assert!(
        run_err.contains(hit.trim()),
        "run reported differently:\n{run_err}\ncheck said: {hit}"
    );
}

pub(crate) fn replace(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

#[test]
fn good_config_prints_summary() {
    let f = Fixture::new();
    let (code, out, err) = check(&f.config(BASE));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vm-http"), "{out}");
    assert!(
        out.contains("identity: spiffe://cluster.local/ns/meshgate/sa/meshgate (valid until 20"),
        "{out}"
    );
    assert!(
        out.contains("sni=outbound_.9080_._.reviews.bookinfo.svc.cluster.local"),
        "{out}"
    );
    assert!(out.contains("billing-vms"), "{out}");
    assert!(out.contains("laptops"), "{out}");
}

#[test]
fn syntax_error() {
    let f = Fixture::new();
    assert_rejected(&f, &replace("    allow: [reviews]\n", "    allow: [reviews\n"), 23, "");
    assert_rejected(
        &f,
        &replace("    protocol: http2\n", "    protocol: http2: x\n"),
        18,
        "",
    );
}

#[test]
fn unknown_field() {
    let f = Fixture::new();
    assert_rejected(
        &f,
        &replace("    protocol: http2\n", "    protocol: http2\n    colour: blue\n"),
        19,
        "unknown field `colour`",
    );
    assert_rejected(&f, &replace("admin:\n", "admn:\n"), 5, "unknown field `admn`");
}

#[test]
fn bad_cidr() {
    let f = Fixture::new();
    assert_rejected(&f, &replace("10.20.0.0/16", "10.20.0.0/33"), 21, "invalid CIDR");
    assert_rejected(&f, &replace("10.20.0.0/16", "10.20.1.0/16"), 21, "host bits");
}

#[test]
fn bad_addresses() {
    let f = Fixture::new();
    assert_rejected(
        &f,
        &replace("bind: 127.0.0.1:0\n    protocol", "bind: 127.0.0.1:99999\n    protocol"),
        3,
        "invalid address",
    );
    assert_rejected(
        &f,
        &replace("eastwest.mesh.example.com:15443", "eastwest.mesh.example.com"),
        9,
        "expected host:port",
    );
    assert_rejected(
        &f,
        &replace("  bind: 127.0.0.1:0\nmesh", "  bind: localhost:9901\nmesh"),
        6,
        "invalid address",
    );
}

#[test]
fn duplicate_names() {
    let f = Fixture::new();
    let dup_listener = replace(
        "    protocol: http\n",
        "    protocol: http\n  - name: vm-http\n    bind: 127.0.0.1:1\n    protocol: http\n",
    );
    assert_rejected(&f, &dup_listener, 5, "duplicate listener name \"vm-http\"");
    let dup_service = replace(
        "tenants:\n",
        "  reviews:\n    host: other.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http2\ntenants:\n",
    );
    assert_rejected(&f, &dup_service, 19, "duplicate");
    let dup_route = replace(
        "tenants:\n",
        "  reviews-again:\n    host: reviews.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\ntenants:\n",
    );
    assert_rejected(&f, &dup_route, 20, "already routed to service \"reviews\"");
}

#[test]
fn duplicate_keys() {
    let f = Fixture::new();
    let text = replace(
        "    sources: [10.20.0.0/16]\n",
        "    sources: [10.20.0.0/16]\n    api_keys: [\"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\"]\n",
    );
    assert_rejected(&f, &text, 25, "duplicate API key");
    assert_rejected(&f, &replace("sha256:2cf24d", "2cf24d"), 24, "sha256:");
}

#[test]
fn allow_list_naming_a_missing_service() {
    let f = Fixture::new();
    assert_rejected(
        &f,
        &replace("allow: [reviews]", "allow: [reviews, ratings]"),
        22,
        "unknown service \"ratings\"",
    );
}

#[test]
fn unreadable_identity_files() {
    let f = Fixture::new();
    assert_rejected(
        &f,
        &replace("cert_chain: cert-chain.pem", "cert_chain: missing.pem"),
        11,
        "cannot read",
    );
    assert_rejected(&f, &replace("key: key.pem", "key: missing-key.pem"), 12, "cannot read");
    assert_rejected(
        &f,
        &replace("root_cert: root-cert.pem", "root_cert: nope.pem"),
        13,
        "cannot read",
    );
}

#[test]
fn unparsable_identity_files() {
    let f = Fixture::new();
    f.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    f.write("empty.pem", "hello\n");
    assert_rejected(
        &f,
        &replace("cert_chain: cert-chain.pem", "cert_chain: garbage.pem"),
        11,
        "garbage.pem",
    );
    assert_rejected(
        &f,
        &replace("cert_chain: cert-chain.pem", "cert_chain: empty.pem"),
        11,
        "no PEM CERTIFICATE",
    );
    assert_rejected(&f, &replace("key: key.pem", "key: empty.pem"), 12, "no PEM private key");
    assert_rejected(
        &f,
        &replace("root_cert: root-cert.pem", "root_cert: empty.pem"),
        13,
        "no PEM CERTIFICATE",
    );
}

#[test]
fn key_that_does_not_match_its_cert() {
    let f = Fixture::new();
    let other = f.ca.issue("meshgate", "meshgate").unwrap();
    f.write("other-key.pem", &other.key_pem);
    assert_rejected(
        &f,
        &replace("key: key.pem", "key: other-key.pem"),
        12,
        "does not match the leaf certificate",
    );
}

#[test]
fn leaf_that_does_not_chain_to_the_root() {
    let f = Fixture::new();
    let stranger = MeshCa::new(TD).unwrap();
    f.write("other-root.pem", &stranger.root_pem());
    assert_rejected(
        &f,
        &replace("root_cert: root-cert.pem", "root_cert: other-root.pem"),
        11,
        "does not chain to the mesh root",
    );
}

#[test]
fn leaf_without_spiffe_san() {
    let f = Fixture::new();
    let mut opts = IssueOptions::workload(TD, "meshgate", "meshgate");
    opts.spiffe_id = None;
    opts.dns_names = vec!["meshgate.example.com".into()];
    f.identity(&f.ca.issue_with(&opts).unwrap(), &f.ca.root_pem());
    assert_rejected(&f, BASE, 11, "no SPIFFE URI SAN");
}

#[test]
fn leaf_outside_trust_domain() {
    let f = Fixture::new();
    let mut opts = IssueOptions::workload(TD, "meshgate", "meshgate");
    opts.spiffe_id = Some("spiffe://other.domain/ns/meshgate/sa/meshgate".into());
    f.identity(&f.ca.issue_with(&opts).unwrap(), &f.ca.root_pem());
    assert_rejected(&f, BASE, 11, "outside trust domain \"cluster.local\"");
}

#[test]
fn expired_leaf() {
    let f = Fixture::new();
    let mut opts = IssueOptions::workload(TD, "meshgate", "meshgate");
    opts.not_before = SystemTime::now() - Duration::from_secs(48 * 3600);
    opts.not_after = SystemTime::now() - Duration::from_secs(3600);
    f.identity(&f.ca.issue_with(&opts).unwrap(), &f.ca.root_pem());
    assert_rejected(&f, BASE, 11, "expired at");
}

#[test]
fn all_errors_are_reported_at_once() {
    let f = Fixture::new();
    let text = replace("10.20.0.0/16", "10.0.0.0/8").replace("allow: [reviews]", "allow: [nope]");
    let text = text.replace(
        "tenants:\n",
        "tenants:\n  other:\n    sources: [10.0.0.0/8]\n    allow: [reviews]\n",
    );
    let (code, _, err) = check(&f.config(&text));
    assert_eq!(code, 1);
    assert!(err.contains("unknown service \"nope\""), "{err}");
    assert!(err.contains("also claimed by tenant"), "{err}");
}

#[test]
fn run_refuses_a_bad_config_with_the_same_errors() {
    let f = Fixture::new();
    let path = f.config(&replace("allow: [reviews]", "allow: [ratings]"));
    let (code, _, err) = meshgate(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{}:22: tenant \"billing-vms\" allows unknown service \"ratings\"",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn missing_config_file() {
    let (code, _, err) = meshgate(&["check", "-c", "/nonexistent/meshgate.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/meshgate.yaml: cannot read config file"),
        "{err}"
    );
}

#[test]
fn hash_key_generates_a_key_and_its_config_form() {
    let (code, out, _) = meshgate(&["hash-key"]);
    assert_eq!(code, 0);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_string();
    let hashed = out
        .lines()
        .find_map(|l| l.strip_prefix("config:"))
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string();
    use sha2::Digest;
    assert_eq!(
        hashed,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(key.as_bytes())))
    );
    let (_, out2, _) = meshgate(&["hash-key"]);
    assert_ne!(out, out2, "keys must be random");
}

#[test]
fn tenant_identity_errors_name_the_tenant_and_its_line() {
    let f = Fixture::new();
    // Missing files: the error is at the tenant's cert_chain line (line 24).
    let text = replace(
        "    allow: [reviews]\n",
        "    allow: [reviews]\n    identity:\n      cert_chain: billing/cert-chain.pem\n      key: billing/key.pem\n      root_cert: root-cert.pem\n",
    );
    assert_eq!(
        text.lines().nth(23).unwrap().trim(),
        "cert_chain: billing/cert-chain.pem"
    );
    assert_rejected(&f, &text, 24, "tenant \"billing-vms\" identity: ");

    // A certificate from another trust domain: refused like mesh.identity would be.
    std::fs::create_dir_all(f.dir.path().join("billing")).unwrap();
    let mut opts = IssueOptions::workload(TD, "billing", "billing-vm");
    opts.spiffe_id = Some("spiffe://other.domain/ns/billing/sa/billing-vm".into());
    let c = f.ca.issue_with(&opts).unwrap();
    f.write("billing/cert-chain.pem", &c.chain_pem);
    f.write("billing/key.pem", &c.key_pem);
    assert_rejected(
        &f,
        &text,
        24,
        "sa/billing-vm, which is outside trust domain \"cluster.local\"",
    );

    // A good one is accepted, and check's summary still passes.
    let c = f.ca.issue("billing", "billing-vm").unwrap();
    f.write("billing/cert-chain.pem", &c.chain_pem);
    f.write("billing/key.pem", &c.key_pem);
    let (code, out, err) = check(&f.config(&text));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn tcp_listener_errors() {
    let f = Fixture::new();
    let text = replace("    protocol: http\n", "    protocol: tcp\n");
    assert_rejected(&f, &text, 2, "has protocol tcp but no service");
    let text = replace("    protocol: http\n", "    protocol: http\n    service: reviews\n");
    assert_rejected(&f, &text, 5, "only tcp listeners have one");
    let text = replace("    protocol: http\n", "    protocol: tcp\n    service: reviews\n");
    assert_rejected(&f, &text, 5, "service \"reviews\" is not protocol tcp");
    let text = replace("    protocol: http\n", "    protocol: tcp\n    service: nope\n");
    assert_rejected(&f, &text, 5, "unknown service \"nope\"");
}

#[test]
fn hbone_errors_name_the_line_and_reason() {
    let f = Fixture::new();
    let svc = "    protocol: http2\n";
    // `protocol: http2` of `reviews` is line 18; what is added starts at line 19.
    let with = |extra: &str| replace(svc, &format!("{svc}{extra}"));
    assert_rejected(&f, &with("    transport: hbone\n"), 19, "no hbone.address");
    assert_rejected(
        &f,
        &with("    transport: hbone\n    hbone:\n      address: pod.example:15008\n"),
        21,
        "invalid hbone.address \"pod.example:15008\": expected IP:PORT",
    );
    assert_rejected(
        &f,
        &with("    transport: hbone\n    hbone:\n      address: 10.1.2.3:15008\n      network: n1\n"),
        22,
        "hbone.network: only for transport double-hbone",
    );
    assert_rejected(
        &f,
        &with("    transport: double-hbone\n    hbone:\n      gateway: ew.example.com:15008\n"),
        21,
        "transport double-hbone needs hbone.gateway_identity, hbone.network",
    );
    assert_rejected(
        &f,
        &with("    transport: double-hbone\n    hbone:\n      gateway: ew.example.com:15008\n      gateway_identity: ew-gateway\n      network: n1\n"),
        22,
        "invalid hbone.gateway_identity",
    );
    assert_rejected(
        &f,
        &with("    hbone:\n      address: 10.1.2.3:15008\n"),
        20,
        "needs transport hbone or double-hbone",
    );
    assert_rejected(&f, &with("    transport: ambient\n"), 19, "transport");

    // Both transports, well formed: accepted.
    let good = with(
        "    transport: hbone\n    hbone:\n      address: \"[fd00::5]:15008\"\n      target: \"[fd00::5]:9080\"\n  ratings:\n    host: ratings.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\n    identity: spiffe://cluster.local/ns/bookinfo/sa/ratings\n    transport: double-hbone\n    hbone:\n      gateway: ew.remote.example.com:15008\n      gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
    );
    let (code, _, err) = check(&f.config(&good));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn issuer_identity_config_is_checked_with_lines() {
    let f = Fixture::new();
    f.write("istio-token", "token\n");
    let with = |block: &str| {
        replace(
            "  identity:\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n",
            &format!("  identity:\n{block}"),
        )
    };
    // A good Istio CA block: accepted; check says the certificate is requested at start.
    let good = "    spiffe_id: spiffe://cluster.local/ns/vms/sa/meshgate\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n      token_file: istio-token\n";
    let (code, out, err) = check(&f.config(&with(good)));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "identity: spiffe://cluster.local/ns/vms/sa/meshgate (requested from istio_ca 127.0.0.1:15012 at start"
        ),
        "{out}"
    );
    // The identity block starts at line 11; errors about an issuer point at its first key.
    assert_rejected(
        &f,
        &with("    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n      token_file: istio-token\n"),
        13,
        "identity.spiffe_id is required with an issuer",
    );
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://other.domain/ns/vms/sa/x\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n      token_file: istio-token\n"),
        11,
        "outside trust domain \"cluster.local\"",
    );
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://cluster.local/ns/vms/sa/x\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1\n      token_file: istio-token\n"),
        14,
        "istio_ca.address \"127.0.0.1\": missing :PORT",
    );
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://cluster.local/ns/vms/sa/x\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n"),
        14,
        "istio_ca needs token_file, or cert_chain and key",
    );
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://cluster.local/ns/vms/sa/x\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n      token_file: missing-token\n"),
        15,
        "cannot read token_file missing-token",
    );
    // A bootstrap certificate must be for the SPIFFE ID requested.
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://cluster.local/ns/vms/sa/x\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n"),
        12,
        "bootstrap certificate is for spiffe://cluster.local/ns/meshgate/sa/meshgate, not identity.spiffe_id",
    );
    // Vault: exactly one way to authenticate; not both issuers.
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://cluster.local/ns/vms/sa/x\n    root_cert: root-cert.pem\n    vault:\n      address: http://127.0.0.1:8200\n      role: meshgate\n"),
        14,
        "vault needs exactly one of token_file and approle",
    );
    assert_rejected(
        &f,
        &with("    spiffe_id: spiffe://cluster.local/ns/vms/sa/x\n    root_cert: root-cert.pem\n    istio_ca:\n      address: 127.0.0.1:15012\n      token_file: istio-token\n    vault:\n      address: http://127.0.0.1:8200\n      role: r\n      token_file: istio-token\n"),
        17,
        "names two issuers",
    );
    // Files without an issuer still need cert_chain and key; issuer-only keys are refused.
    assert_rejected(
        &f,
        &with("    root_cert: root-cert.pem\n"),
        11,
        "identity needs cert_chain and key files, or an issuer",
    );
    assert_rejected(
        &f,
        &with("    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n    ttl: 1h\n"),
        14,
        "identity.ttl is only for an issuer",
    );
}

#[test]
fn transcode_errors_name_the_line_and_reason() {
    let f = Fixture::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = protox::Compiler::new([root.join("tests/meshsim/proto"), root.join("third_party/googleapis")]).unwrap();
    c.include_imports(true);
    c.open_file("bookstore.proto").unwrap();
    std::fs::write(f.dir.path().join("bookstore.pb"), c.encode_file_descriptor_set()).unwrap();
    f.write("garbage.pb", "not protobuf at all");
    let svc = "    protocol: http2\n";
    // `protocol: http2` of `reviews` is line 18; `transcode:` is line 19.
    let with = |extra: &str| replace(svc, &format!("{svc}{extra}"));
    let block = |file: &str, services: &[&str]| {
        let items: String = services.iter().map(|s| format!("        - {s}\n")).collect();
        format!("    transcode:\n      descriptor_set: {file}\n      services:\n{items}")
    };
    assert_rejected(
        &f,
        &with(&block("bookstore.pb", &["bookstore.Bookstore", "bookstore.Nope"])),
        23,
        "gRPC service \"bookstore.Nope\" is not in the descriptor set (it has: bookstore.Bookstore)",
    );
    assert_rejected(
        &f,
        &with(&block("missing.pb", &["bookstore.Bookstore"])),
        20,
        "cannot read descriptor set",
    );
    assert_rejected(
        &f,
        &with(&block("garbage.pb", &["bookstore.Bookstore"])),
        20,
        "not a valid descriptor set",
    );
    let http1 = block("bookstore.pb", &["bookstore.Bookstore"]);
    assert_rejected(
        &f,
        &replace(svc, &format!("    protocol: http1\n{http1}")),
        20,
        "transcode: only for protocol http2 services",
    );
    assert_rejected(
        &f,
        &with("    transcode:\n      descriptor_set: bookstore.pb\n      services: [bookstore.Bookstore]\n      prefix: /api\n"),
        22,
        "prefix",
    );

    let (code, out, err) = check(&f.config(&with(&block("bookstore.pb", &["bookstore.Bookstore"]))));
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
}

#[test]
fn h3_listener_errors() {
    let f = Fixture::new();
    let c = f.ca.issue("meshgate", "meshgate").unwrap();
    f.write("h3.pem", &c.chain_pem);
    f.write("h3-key.pem", &c.key_pem);
    let other = f.ca.issue("meshgate", "other").unwrap();
    f.write("other-key.pem", &other.key_pem);
    let h3 = |extra: &str| replace("    protocol: http\n", &format!("    protocol: h3\n{extra}"));
    // A good one is accepted, and may share its port number with a TCP listener.
    let (code, out, err) = check(&f.config(&h3("    tls:\n      cert_chain: h3.pem\n      key: h3-key.pem\n")));
    assert_eq!(code, 0, "{out}{err}");
    assert_rejected(&f, &h3(""), 2, "has protocol h3 but no tls");
    assert_rejected(
        &f,
        &h3("    tls:\n      cert_chain: h3.pem\n      key: other-key.pem\n"),
        7,
        "the private key does not match the certificate in",
    );
    assert_rejected(
        &f,
        &h3("    tls:\n      cert_chain: missing.pem\n      key: h3-key.pem\n"),
        6,
        "cannot read",
    );
    assert_rejected(
        &f,
        &h3("    tls:\n      cert_chain: h3.pem\n      key: missing-key.pem\n"),
        7,
        "cannot read the private key",
    );
    assert_rejected(
        &f,
        &replace(
            "    protocol: http\n",
            "    protocol: http\n    tls:\n      cert_chain: h3.pem\n      key: h3-key.pem\n",
        ),
        6,
        "tls: only h3 listeners have one",
    );
    assert_rejected(
        &f,
        &h3("    tls:\n      cert_chain: h3.pem\n      key: h3-key.pem\n    alt_svc: 'h3=\":443\"'\n"),
        8,
        "alt_svc: only http listeners advertise one",
    );
    assert_rejected(
        &f,
        &replace(
            "    protocol: http\n",
            "    protocol: http\n    alt_svc: \"bad\\u0001value\"\n",
        ),
        5,
        "is not a valid header value",
    );
}

#[test]
fn a_public_admin_address_needs_a_token_or_an_explicit_opt_out() {
    let f = Fixture::new();
    let public = replace("admin:\n  bind: 127.0.0.1:0", "admin:\n  bind: 0.0.0.0:0");
    assert_rejected(&f, &public, 6, "admin.token_file is not set");
    let opted_out = replace(
        "admin:\n  bind: 127.0.0.1:0",
        "admin:\n  bind: 0.0.0.0:0\n  allow_unauthenticated: true",
    );
    let (code, _, err) = check(&f.config(&opted_out));
    assert_eq!(code, 0, "{err}");
    f.write("admin-token", "s3cret\n");
    let with_token = replace(
        "admin:\n  bind: 127.0.0.1:0",
        "admin:\n  bind: 0.0.0.0:0\n  token_file: admin-token",
    );
    let (code, _, err) = check(&f.config(&with_token));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn telemetry_blocks_merge_field_by_field() {
    let f = Fixture::new();
    let text = format!(
        "{BASE}telemetry:\n  workload: fleet\n  cluster_id: vm-net\n  labels:\n    team: platform\n    tier: batch\ntracing:\n  sample_rate: 0.25\n"
    )
    .replacen(
        "    allow: [reviews]\n",
        "    allow: [reviews]\n    telemetry:\n      workload: billing-batch\n      version: v3\n      labels:\n        team: billing\n",
        1,
    );
    let path = f.config(&text);
    let (code, _, err) = check(&path);
    assert_eq!(code, 0, "{err}");
    let snap = meshgate::config::load(&path).unwrap();
    assert_eq!(snap.tracing.sample_rate, 0.25);
    let billing = snap.tenants[0].telemetry.as_deref().unwrap();
    assert_eq!(billing.workload, "billing-batch");
    // The certificate's namespace (ns meshgate), as the mesh will see it.
    assert_eq!(billing.namespace, "meshgate");
    assert_eq!(billing.app, "billing-batch");
    assert_eq!(billing.version.as_deref(), Some("v3"));
    assert_eq!(billing.canonical_service, "billing-batch");
    assert_eq!(billing.canonical_revision, "v3");
    assert_eq!(billing.cluster_id.as_deref(), Some("vm-net"));
    assert_eq!(
        billing.labels,
        [
            ("team".to_string(), "billing".to_string()),
            ("tier".into(), "batch".into())
        ]
    );
    let laptops = snap.tenants[1].telemetry.as_deref().unwrap();
    assert_eq!(laptops.workload, "fleet");
    assert_eq!(laptops.canonical_revision, "latest");
    assert_eq!(laptops.labels[0], ("team".to_string(), "platform".to_string()));

    // Without any telemetry: block, no tenant sends metadata; tracing has its default.
    let snap = meshgate::config::load(&f.config(BASE)).unwrap();
    assert!(snap.tenants.iter().all(|t| t.telemetry.is_none()));
    assert_eq!(snap.tracing.sample_rate, 0.01);
}

#[test]
fn telemetry_errors_name_their_line() {
    let f = Fixture::new();
    let tenant_block = |body: &str| {
        replace(
            "    allow: [reviews]\n",
            &format!("    allow: [reviews]\n    telemetry:\n{body}"),
        )
    };
    // Line 23 is `telemetry:` under billing-vms; its keys start at 24.
    assert_rejected(
        &f,
        &tenant_block("      workload: billing-batch\n      namespace: billing\n"),
        25,
        "the mesh takes the namespace from the client certificate",
    );
    assert_rejected(
        &f,
        &tenant_block("      workload: w\n      labels:\n        app: x\n"),
        26,
        "own field",
    );
    assert_rejected(
        &f,
        &tenant_block("      workload: w\n      labels:\n        \"bad key\": x\n"),
        26,
        "label key",
    );
    assert_rejected(&f, &tenant_block("      workload: \"\"\n"), 24, "must not be empty");
    assert_rejected(&f, &tenant_block("      app: billing\n"), 24, "needs `workload:`");
    assert_rejected(
        &f,
        &format!("{BASE}tracing:\n  sample_rate: 5\n"),
        27,
        "between 0 and 1",
    );
}

#[test]
fn version_names_the_release_the_revision_and_the_target() {
    let (code, out, err) = meshgate(&["--version"]);
    assert_eq!(code, 0, "{err}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&root)
        .output()
        .expect("git runs");
    let rev = String::from_utf8_lossy(&git.stdout).trim().to_string();
    assert!(
        git.status.success() && rev.len() == 12,
        "the tests run in a git checkout: {rev:?}"
    );
    let prefix = format!(
        "meshgate {} (git {rev}, {}-",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    let line = out.trim();
    assert!(
        line.starts_with(&prefix) && line.ends_with(')'),
        "{line:?} does not start with {prefix:?}"
    );
    assert!(line.contains(std::env::consts::OS), "{line}");
}

#[test]
fn telemetry_needs_a_namespace_when_the_certificate_names_none() {
    let f = Fixture::new();
    let mut o = IssueOptions::workload(TD, "meshgate", "meshgate");
    o.spiffe_id = Some("spiffe://cluster.local/vm/meshgate".into());
    f.identity(&f.ca.issue_with(&o).unwrap(), &f.ca.root_pem());
    let block = |extra: &str| {
        replace(
            "    allow: [reviews]\n",
            &format!("    allow: [reviews]\n    telemetry:\n      workload: w\n{extra}"),
        )
    };
    assert_rejected(&f, &block(""), 24, "names no namespace");
    let (code, _, err) = check(&f.config(&block("      namespace: vms\n")));
    assert_eq!(code, 0, "{err}");
}

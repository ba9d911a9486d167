//! The side-by-side comparison: one loopback topology (meshsim's east-west gateway and sidecars),
//! and the same load against (a) meshgate, (b) HAProxy configured by us to do the same job, and
//! (c) the upstream directly (the generator itself speaking h2 over mTLS to the gateway), in
//! alternation, several rounds each. The proxy under test is pinned to CPU 1 and the rest (the
//! generator and the mesh) to CPU 0 where the machine has two CPUs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use meshsim::{Mesh, MeshSpec, PodSpec, ServiceSpec};
use rustls_pki_types::ServerName;
use serde::Serialize;

use crate::gen::{self, Load, Mode, Outcome, Proto};
use crate::procfs;
use crate::quota::Quota;

pub const HOST: &str = "reviews.bookinfo.svc.cluster.local";
pub const SNI: &str = "outbound_.9080_._.reviews.bookinfo.svc.cluster.local";
/// Tenant networks: allowed clients and clients no tenant claims.
pub const ALLOWED_NET: &str = "127.20.0.0/16";
pub const DENIED_NET: &str = "127.30.0.0/16";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Meshgate,
    Haproxy,
    Direct,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Meshgate => "meshgate",
            Target::Haproxy => "haproxy",
            Target::Direct => "direct",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub scenarios: Vec<String>,
    pub meshgate: PathBuf,
    pub haproxy: PathBuf,
    /// Run each proxy with `taskset -c 1`.
    pub pin: bool,
    /// Connections for the idle-connection scenarios (replaces 1,000 and 10,000 when set).
    pub idle_override: Option<usize>,
    /// Requests in the cold-start scenario.
    pub cold_requests: u64,
    pub command_line: String,
}

/// The scenarios, in the order they run (the half-saturation one needs HAProxy's peak first).
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "h1-small",
        "HTTP/1.1 keep-alive in, h2 out; 128-byte responses; closed loop, 32 in flight",
    ),
    (
        "h2c-small",
        "h2c in (4 connections), h2 out; 128-byte responses; closed loop, 32 in flight",
    ),
    ("h1-64k", "HTTP/1.1 in; 64 KiB responses; closed loop, 16 in flight"),
    ("h1-1m", "HTTP/1.1 in; 1 MiB responses; closed loop, 4 in flight"),
    (
        "mixed-deny",
        "HTTP/1.1 in; half the connections from a subnet no tenant allows (403); 32 in flight",
    ),
    (
        "peak",
        "HTTP/1.1 in, 128-byte responses, 64 in flight; each proxy held to a quarter of CPU 1 (cgroup CPU quota) so it, not the generator, saturates; req/s per CPU is the one-core peak",
    ),
    (
        "half-load",
        "HTTP/1.1 in; open loop at half of HAProxy's h1-small peak rate; latency from the due time",
    ),
    (
        "idle-1k",
        "1,000 idle HTTP/1.1 client connections after one request each: memory per connection",
    ),
    (
        "idle-10k",
        "10,000 idle HTTP/1.1 client connections: memory per connection",
    ),
    (
        "idle-h2c-10k",
        "10,000 idle h2c client connections after one request each: memory per connection",
    ),
    (
        "cold-start",
        "a freshly started proxy: its first requests (32 in flight), upstream handshakes included",
    ),
];

/// Figures of one run of one target.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub target: Target,
    pub round: usize,
    pub sent: u64,
    pub answered: u64,
    pub expected: u64,
    pub errors: u64,
    pub statuses: std::collections::BTreeMap<u16, u64>,
    /// Client connections the generator opened (a new one after each `Connection: close`).
    pub connections: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Proxy CPU seconds (user + system) during the run; none for `direct`.
    pub proxy_cpu_secs: Option<f64>,
    pub upstream_handshakes: u64,
    pub first_error: Option<String>,
    #[serde(skip)]
    pub latency: Option<hdrhistogram::Histogram<u64>>,
}

/// One target over all rounds of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub target: Target,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub cpu_secs_per_10k: Option<f64>,
    /// Share of one CPU the proxy used while under load.
    pub proxy_cpu_busy: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub handshakes_per_10k: f64,
    /// Idle scenarios: resident memory added per held client connection.
    pub kib_per_idle_connection: Option<f64>,
    pub idle_connections_held: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub description: String,
    pub runs: Vec<RunFigures>,
    pub summary: Vec<Summary>,
    pub notes: Vec<String>,
    /// The share of one CPU each proxy was held to (the peak scenario).
    pub cpu_quota: Option<f64>,
}

impl ScenarioReport {
    pub fn of(&self, t: Target) -> Option<&Summary> {
        self.summary.iter().find(|s| s.target == t)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub machine: String,
    pub haproxy_version: String,
    pub pinned: bool,
    pub rounds: usize,
    pub seconds_per_run: f64,
    pub scenarios: Vec<ScenarioReport>,
    pub checks: Vec<crate::report::Check>,
}

/// The mesh and the client identity every target uses.
pub struct Topology {
    pub mesh: Mesh,
    pub dir: tempfile::TempDir,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Topology {
    pub async fn start() -> anyhow::Result<Topology> {
        let spec = MeshSpec::new().service(
            ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews")
                .pod(PodSpec::new("reviews-a"))
                .pod(PodSpec::new("reviews-b")),
        );
        let mesh = Mesh::start(spec).await?;
        let dir = tempfile::tempdir()?;
        let cert = mesh.ca().issue("meshgate", "meshgate")?;
        let root = mesh.ca().root_pem();
        std::fs::write(dir.path().join("cert-chain.pem"), &cert.chain_pem)?;
        std::fs::write(dir.path().join("key.pem"), &cert.key_pem)?;
        std::fs::write(dir.path().join("root-cert.pem"), &root)?;
        // HAProxy wants the chain and the key in one file.
        std::fs::write(
            dir.path().join("haproxy-client.pem"),
            format!("{}{}", cert.chain_pem, cert.key_pem),
        )?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(mesh.ca().root_der())?;
        let verifier = meshgate::identity::verifier::SpiffeServerVerifier::new(
            Arc::new(roots),
            meshgate::identity::verifier::ExpectedServer::TrustDomain(meshsim::TRUST_DOMAIN.into()),
            rustls::crypto::ring::default_provider().signature_verification_algorithms,
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(cert.chain_der()?, cert.key_der()?)?;
        tls.alpn_protocols = vec![b"istio-h2".to_vec(), b"istio".to_vec(), b"h2".to_vec()];
        Ok(Topology {
            mesh,
            dir,
            tls: Arc::new(tls),
        })
    }

    fn handshakes(&self) -> u64 {
        self.mesh.stats().pods_total(|p| p.tls_handshakes)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A proxy under test, killed when dropped.
pub struct ProxyProc {
    pub target: Target,
    pub child: Child,
    pub addr: SocketAddr,
}

impl ProxyProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> anyhow::Result<Duration> {
        procfs::cpu_time(self.pid())
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(opts: &Options, program: &Path) -> Command {
    if opts.pin {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("1").arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn log_file(opts: &Options, name: &str) -> anyhow::Result<Stdio> {
    let dir = opts.out.join("logs");
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::File::create(dir.join(name))?.into())
}

pub fn meshgate_config(top: &Topology, port: u16, admin: u16) -> String {
    format!(
        "# Written by meshgate-loadtest: the same job as haproxy.cfg.\n\
listeners:\n  - name: vm\n    bind: 127.0.0.1:{port}\n    protocol: http\n\
admin:\n  bind: 127.0.0.1:{admin}\n\
mesh:\n  trust_domain: {td}\n  gateway: {gw}\n  identity:\n    cert_chain: {dir}/cert-chain.pem\n    key: {dir}/key.pem\n    root_cert: {dir}/root-cert.pem\n\
services:\n  reviews:\n    host: {HOST}\n    port: 9080\n    protocol: http2\n\
tenants:\n  billing:\n    sources: [{ALLOWED_NET}]\n    allow: [reviews]\n  laptops:\n    api_keys: [\"sha256:{key}\"]\n    allow: [reviews]\n\
limits:\n  max_connections: 25000\n\
# Per-request access logs off, as in the HAProxy config (no `log` line): both are measured\n\
# doing the forwarding job alone.\n\
log:\n  level: warn\n  format: json\n",
        td = meshsim::TRUST_DOMAIN,
        gw = top.mesh.gateway_addr(),
        dir = top.dir.path().display(),
        key = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(LAPTOP_KEY)),
    )
}

pub const LAPTOP_KEY: &str = "loadtest-laptop-key";
/// HAProxy reserves two FDs per connection and refuses to start when `maxconn` needs more FDs
/// than the hard limit allows (20,000 on the reference machine, and not raisable there).
pub const HAPROXY_MAXCONN: usize = 9_900;

pub fn haproxy_config(top: &Topology, port: u16) -> String {
    let key_hex = hex::encode_upper(<sha2::Sha256 as sha2::Digest>::digest(LAPTOP_KEY));
    format!(
        "# Written by meshgate-loadtest: HAProxy doing meshgate's job by hand.\n\
global\n    nbthread 1\n    # Two FDs per proxied connection: what a 20,000 FD limit allows.\n    maxconn {HAPROXY_MAXCONN}\n    \
defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    timeout http-keep-alive 60s\n    option http-keep-alive\n\
frontend vm\n    bind 127.0.0.1:{port}\n    option forwardfor\n\
    # Tenants: a source subnet, or an API key compared by its SHA-256 (as meshgate stores it).\n\
    acl billing src {ALLOWED_NET}\n\
    acl has_key req.hdr(x-meshgate-key) -m found\n\
    acl laptop req.hdr(x-meshgate-key),digest(sha256),hex -m str {key_hex}\n\
    http-request deny deny_status 401 if has_key !laptop\n\
    # A client in no tenant: 403 and the connection closed after it, as meshgate does (issue #19).\n\
    http-request deny deny_status 403 content-type text/plain string \"unknown_client: no tenant allows this source\" hdr Connection close unless billing or laptop\n\
    http-request del-header x-meshgate-key\n\
    # Routing by Host, port optional; anything else is not a mesh service.\n\
    acl reviews req.hdr(host),field(1,:),lower -m str {HOST}\n\
    http-request deny deny_status 404 unless reviews\n\
    default_backend reviews\n\
backend reviews\n\
    http-reuse always\n\
    # mTLS with the workload certificate to the east-west gateway: Istio SNI and ALPN, HTTP/2.\n\
    # `verify none`: with `sni` set, HAProxy checks the server certificate's DNS names against\n\
    # the SNI, and an Istio certificate carries only a SPIFFE URI, so `verify required` fails\n\
    # every handshake. HAProxy therefore skips the peer check meshgate does (chain + SPIFFE ID).\n\
    server gw {gw} ssl crt {dir}/haproxy-client.pem verify none sni str({SNI}) alpn istio-h2,istio,h2 proto h2\n",
        gw = top.mesh.gateway_addr(),
        dir = top.dir.path().display(),
    )
}

async fn wait_ready(
    target: Target,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{} exited during start-up ({status}); see the logs directory",
                target.name()
            );
        }
        let ready = match admin {
            Some(a) => matches!(admin_get(a, "/readyz").await, Ok((200, _))),
            None => tokio::net::TcpStream::connect(addr).await.is_ok(),
        };
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} not ready in 20 s",
            target.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A GET on meshgate's admin API.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

pub async fn start_meshgate(top: &Topology, opts: &Options) -> anyhow::Result<ProxyProc> {
    let (port, admin) = (free_port()?, free_port()?);
    let path = top.path("meshgate.yaml");
    std::fs::write(&path, meshgate_config(top, port, admin))?;
    std::fs::copy(&path, opts.out.join("meshgate.yaml")).ok();
    let mut child = command(opts, &opts.meshgate)
        .arg("run")
        .arg("-c")
        .arg(&path)
        .stdout(log_file(opts, "meshgate.log")?)
        .stderr(log_file(opts, "meshgate.err")?)
        .spawn()
        .with_context(|| format!("starting {}", opts.meshgate.display()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin_addr = Some(([127, 0, 0, 1], admin).into());
    wait_ready(Target::Meshgate, addr, admin_addr, &mut child).await?;
    Ok(ProxyProc {
        target: Target::Meshgate,
        child,
        addr,
    })
}

pub async fn start_haproxy(top: &Topology, opts: &Options) -> anyhow::Result<ProxyProc> {
    let port = free_port()?;
    let path = top.path("haproxy.cfg");
    std::fs::write(&path, haproxy_config(top, port))?;
    std::fs::copy(&path, opts.out.join("haproxy.cfg")).ok();
    // `-db`: foreground, no daemon, no master process: the child is the one worker we measure.
    let mut child = command(opts, &opts.haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(log_file(opts, "haproxy.log")?)
        .stderr(log_file(opts, "haproxy.err")?)
        .spawn()
        .with_context(|| format!("starting {}", opts.haproxy.display()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_ready(Target::Haproxy, addr, None, &mut child).await?;
    Ok(ProxyProc {
        target: Target::Haproxy,
        child,
        addr,
    })
}

/// The request a scenario sends.
#[derive(Clone)]
struct Shape {
    h2c: bool,
    path: String,
    concurrency: usize,
    mixed: bool,
    /// Hold each proxy to this share of one CPU (and leave `direct` out: it has no proxy).
    quota: Option<f64>,
}

/// The peak scenario's CPU share per proxy: small enough that the generator and the mesh, on
/// the other core, keep either proxy saturated.
pub const PEAK_SHARE: f64 = 0.25;

fn load_for(top: &Topology, target: Target, addr: SocketAddr, shape: &Shape, opts: &Options) -> anyhow::Result<Load> {
    let allowed = gen::sources(ALLOWED_NET, 64)?;
    let sources = if shape.mixed {
        let denied = gen::sources(DENIED_NET, 64)?;
        allowed.into_iter().zip(denied).flat_map(|(a, d)| [a, d]).collect()
    } else {
        allowed
    };
    let proto = match target {
        Target::Direct => Proto::H2Tls {
            config: top.tls.clone(),
            sni: ServerName::try_from(SNI.to_string())?,
        },
        _ if shape.h2c => Proto::H2c,
        _ => Proto::H1,
    };
    Ok(Load {
        target: addr,
        proto,
        host: HOST.into(),
        path: shape.path.clone(),
        headers: vec![],
        sources,
        h2_connections: 4,
        mode: Mode::Closed {
            concurrency: shape.concurrency,
        },
        duration: opts.duration,
        max_requests: u64::MAX,
        request_timeout: Duration::from_secs(30),
    })
}

/// Runs one load against one target and reads what it cost.
async fn measure(
    top: &Topology,
    target: Target,
    proc_: Option<&ProxyProc>,
    load: Load,
    round: usize,
    mixed: bool,
) -> anyhow::Result<RunFigures> {
    let cpu0 = proc_.map(|p| p.cpu()).transpose()?;
    let hs0 = top.handshakes();
    let out: Outcome = gen::run(load).await;
    let cpu = match (proc_, cpu0) {
        (Some(p), Some(c0)) => Some((p.cpu()? - c0).as_secs_f64()),
        _ => None,
    };
    let expected = out.status(200) + if mixed { out.status(403) } else { 0 };
    Ok(RunFigures {
        target,
        round,
        sent: out.sent,
        answered: out.answered(),
        expected,
        errors: out.sent - expected,
        statuses: out.statuses.clone(),
        connections: out.connections,
        seconds: out.elapsed.as_secs_f64(),
        requests_per_sec: out.requests_per_sec(),
        p50_ms: out.percentile_ms(0.5),
        p90_ms: out.percentile_ms(0.9),
        p99_ms: out.percentile_ms(0.99),
        p999_ms: out.percentile_ms(0.999),
        proxy_cpu_secs: cpu,
        upstream_handshakes: top.handshakes() - hs0,
        first_error: out.first_error.clone(),
        latency: Some(out.latency),
    })
}

fn summarize(target: Target, runs: &[RunFigures], peak_rss_kib: Option<u64>) -> Summary {
    let mine: Vec<&RunFigures> = runs.iter().filter(|r| r.target == target).collect();
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
    for r in &mine {
        if let Some(h) = &r.latency {
            hist.add(h).expect("same bounds");
        }
    }
    let requests: u64 = mine.iter().map(|r| r.answered).sum();
    let seconds: f64 = mine.iter().map(|r| r.seconds).sum();
    // No runs (the idle scenarios) means no CPU figure, not zero.
    let cpu: Option<f64> = if mine.is_empty() {
        None
    } else {
        mine.iter().map(|r| r.proxy_cpu_secs).sum()
    };
    let mut rps: Vec<f64> = mine.iter().map(|r| r.requests_per_sec).collect();
    rps.sort_by(|a, b| a.total_cmp(b));
    let q = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Summary {
        target,
        requests,
        errors: mine.iter().map(|r| r.errors).sum(),
        requests_per_sec: rps.get(rps.len() / 2).copied().unwrap_or(0.0),
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        cpu_secs_per_10k: cpu.map(|c| c / requests.max(1) as f64 * 10_000.0),
        proxy_cpu_busy: cpu.map(|c| c / seconds.max(1e-9)),
        peak_rss_mib: peak_rss_kib.map(|k| k as f64 / 1024.0),
        handshakes_per_10k: mine.iter().map(|r| r.upstream_handshakes).sum::<u64>() as f64 / requests.max(1) as f64
            * 10_000.0,
        kib_per_idle_connection: None,
        idle_connections_held: None,
    }
}

fn peak_kib(p: &ProxyProc) -> Option<u64> {
    procfs::memory_kib(p.pid()).ok().map(|(_, peak)| peak)
}

/// Runs the selected scenarios and writes the report into `opts.out`.
pub async fn compare(opts: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)?;
    let top = Topology::start().await?;
    let mut scenarios = Vec::new();
    let mut haproxy_peak: Option<f64> = None;
    for (name, what) in SCENARIOS {
        if !opts.scenarios.iter().any(|s| s == name || s == "all") {
            continue;
        }
        eprintln!("scenario {name}: {what}");
        let mut rep = ScenarioReport {
            name: name.to_string(),
            description: what.to_string(),
            runs: vec![],
            summary: vec![],
            notes: vec![],
            cpu_quota: None,
        };
        match *name {
            "idle-1k" | "idle-10k" | "idle-h2c-10k" => {
                let n = opts
                    .idle_override
                    .unwrap_or(if *name == "idle-1k" { 1000 } else { 10_000 });
                idle(&top, opts, n, *name == "idle-h2c-10k", &mut rep).await?;
            }
            "cold-start" => cold_start(&top, opts, &mut rep).await?,
            _ => {
                let (shape, open_rate) = match *name {
                    "h1-small" => (shape(false, "/?bytes=128", 32), None),
                    "h2c-small" => (shape(false, "/?bytes=128", 32).h2c(), None),
                    "h1-64k" => (shape(false, "/?bytes=65536", 16), None),
                    "h1-1m" => (shape(false, "/?bytes=1048576", 4), None),
                    "mixed-deny" => (shape(true, "/?bytes=128", 32), None),
                    "peak" => (shape(false, "/?bytes=128", 64).quota(PEAK_SHARE), None),
                    "half-load" => {
                        let peak = match haproxy_peak {
                            Some(p) => p,
                            None => {
                                let p = saturation(&top, opts).await?;
                                rep.notes
                                    .push(format!("HAProxy peak measured for this scenario: {p:.0} req/s"));
                                p
                            }
                        };
                        let rate = (peak / 2.0).max(10.0);
                        rep.notes.push(format!(
                            "offered rate: {rate:.0} req/s (half of HAProxy's h1-small peak)"
                        ));
                        (shape(false, "/?bytes=128", 256), Some(rate))
                    }
                    other => anyhow::bail!("unknown scenario {other}"),
                };
                requests(&top, opts, &shape, open_rate, &mut rep).await?;
                if *name == "h1-small" {
                    haproxy_peak = rep.of(Target::Haproxy).map(|s| s.requests_per_sec);
                }
            }
        }
        scenarios.push(rep);
    }
    let report = Report {
        date: crate::report::utc_now(),
        command: opts.command_line.clone(),
        machine: crate::report::machine(),
        haproxy_version: haproxy_version(&opts.haproxy),
        pinned: opts.pin,
        rounds: opts.rounds,
        seconds_per_run: opts.duration.as_secs_f64(),
        checks: crate::report::checks(&scenarios),
        scenarios,
    };
    crate::report::write(&report, &opts.out)?;
    Ok(report)
}

fn shape(mixed: bool, path: &str, concurrency: usize) -> Shape {
    Shape {
        h2c: false,
        path: path.into(),
        concurrency,
        mixed,
        quota: None,
    }
}

impl Shape {
    fn h2c(mut self) -> Self {
        self.h2c = true;
        self
    }

    fn quota(mut self, share: f64) -> Self {
        self.quota = Some(share);
        self
    }
}

fn haproxy_version(path: &Path) -> String {
    Command::new(path)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

async fn saturation(top: &Topology, opts: &Options) -> anyhow::Result<f64> {
    let hp = start_haproxy(top, opts).await?;
    let load = load_for(top, Target::Haproxy, hp.addr, &shape(false, "/?bytes=128", 32), opts)?;
    Ok(gen::run(load).await.requests_per_sec())
}

async fn requests(
    top: &Topology,
    opts: &Options,
    shape: &Shape,
    open_rate: Option<f64>,
    rep: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let mg = start_meshgate(top, opts).await?;
    let hp = start_haproxy(top, opts).await?;
    let quotas = match shape.quota {
        Some(share) => {
            let applied = Quota::apply(mg.pid(), share, "meshgate")
                .and_then(|m| Ok((m, Quota::apply(hp.pid(), share, "haproxy")?)));
            match applied {
                Ok(q) => {
                    rep.cpu_quota = Some(q.0.share);
                    Some(q)
                }
                // The other scenarios still run; the peak check falls back to h1-small and says so.
                Err(e) => {
                    eprintln!("  not run: {e:#}");
                    rep.notes.push(format!("not run: no CPU quota could be set: {e:#}"));
                    return Ok(());
                }
            }
        }
        None => None,
    };
    let mut targets: Vec<(Target, Option<&ProxyProc>, SocketAddr)> = vec![
        (Target::Meshgate, Some(&mg), mg.addr),
        (Target::Haproxy, Some(&hp), hp.addr),
    ];
    if !shape.mixed && shape.quota.is_none() {
        targets.push((Target::Direct, None, top.mesh.gateway_addr()));
    }
    let prepare = |t: Target, addr: SocketAddr| -> anyhow::Result<Load> {
        let mut load = load_for(top, t, addr, shape, opts)?;
        if let Some(rate) = open_rate {
            load.mode = Mode::Open {
                rate,
                concurrency: shape.concurrency,
            };
        }
        Ok(load)
    };
    // Warm-up: upstream pools filled, first-request costs paid, before anything is measured.
    for (t, _, addr) in &targets {
        let mut load = prepare(*t, *addr)?;
        load.duration = opts.warmup;
        gen::run(load).await;
    }
    for round in 1..=opts.rounds {
        for (t, p, addr) in &targets {
            let load = prepare(*t, *addr)?;
            let fig = measure(top, *t, *p, load, round, shape.mixed).await?;
            eprintln!(
                "  round {round} {:>8}: {:>8.0} req/s  p99 {:>7.2} ms  errors {}{}",
                t.name(),
                fig.requests_per_sec,
                fig.p99_ms,
                fig.errors,
                fig.proxy_cpu_secs
                    .map(|c| format!("  cpu {:.2} s", c))
                    .unwrap_or_default()
            );
            rep.runs.push(fig);
        }
    }
    for (t, p, _) in &targets {
        rep.summary.push(summarize(*t, &rep.runs, p.and_then(peak_kib)));
    }
    if let Some((qm, qh)) = &quotas {
        let throttled = |q: &Quota| {
            q.throttled_secs()
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "unknown".into())
        };
        rep.notes.push(format!(
            "each proxy held to {:.0}% of CPU 1 (CFS quota, 10 ms period); time refused by the quota over the scenario: meshgate {}, HAProxy {}",
            qm.share * 100.0,
            throttled(qm),
            throttled(qh)
        ));
    }
    // The processes first, so the cgroups are empty when removed.
    drop(targets);
    drop((mg, hp));
    drop(quotas);
    Ok(())
}

async fn idle(top: &Topology, opts: &Options, n: usize, h2c: bool, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    for target in [Target::Meshgate, Target::Haproxy] {
        let p = match target {
            Target::Meshgate => start_meshgate(top, opts).await?,
            _ => start_haproxy(top, opts).await?,
        };
        let one = if h2c {
            shape(false, "/?bytes=128", 1).h2c()
        } else {
            shape(false, "/?bytes=128", 1)
        };
        let mut load = load_for(top, target, p.addr, &one, opts)?;
        // Spread over many source addresses: loopback ports per address run out near 28,000.
        load.sources = gen::sources(ALLOWED_NET, 256)?;
        // One request first so the upstream pool exists before the baseline is read.
        let (warm, _) = gen::hold_idle(&load, 4).await;
        drop(warm);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (rss0, _) = procfs::memory_kib(p.pid())?;
        let n = if target == Target::Haproxy && n > HAPROXY_MAXCONN - 50 {
            rep.notes.push(format!(
                "HAProxy held {} connections, not {n}: its maxconn is capped by the FD limit (2 FDs per connection)",
                HAPROXY_MAXCONN - 50
            ));
            HAPROXY_MAXCONN - 50
        } else {
            n
        };
        let (held, failed) = gen::hold_idle(&load, n).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss1, peak) = procfs::memory_kib(p.pid())?;
        let held_n = held.len() as u64;
        let mut s = summarize(target, &[], Some(peak));
        s.requests = held_n;
        s.errors = failed;
        s.idle_connections_held = Some(held_n);
        s.kib_per_idle_connection = Some(rss1.saturating_sub(rss0) as f64 / held_n.max(1) as f64);
        eprintln!(
            "  {:>8}: {held_n} idle connections held ({failed} failed), {:.1} KiB each",
            target.name(),
            s.kib_per_idle_connection.unwrap_or(0.0)
        );
        rep.summary.push(s);
        drop(held);
        drop(p);
    }
    Ok(())
}

async fn cold_start(top: &Topology, opts: &Options, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    for round in 1..=opts.rounds {
        for target in [Target::Meshgate, Target::Haproxy] {
            let p = match target {
                Target::Meshgate => start_meshgate(top, opts).await?,
                _ => start_haproxy(top, opts).await?,
            };
            let mut load = load_for(top, target, p.addr, &shape(false, "/?bytes=128", 32), opts)?;
            load.max_requests = opts.cold_requests;
            load.duration = Duration::from_secs(60);
            let fig = measure(top, target, Some(&p), load, round, false).await?;
            eprintln!(
                "  round {round} {:>8}: first {} requests, p99 {:.2} ms, {} upstream handshakes",
                target.name(),
                fig.answered,
                fig.p99_ms,
                fig.upstream_handshakes
            );
            rep.runs.push(fig);
        }
    }
    for target in [Target::Meshgate, Target::Haproxy] {
        rep.summary.push(summarize(target, &rep.runs, None));
    }
    Ok(())
}

/// Pins this process (all its threads) to `cpu`, so the proxies get the other CPU to themselves.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux) is needed to pin CPUs")?;
    anyhow::ensure!(status.success(), "taskset failed: {status}");
    Ok(())
}

/// Where the proxies' binaries are by default: meshgate next to this binary, HAProxy on PATH.
pub fn default_meshgate() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("meshgate")))
        .unwrap_or_else(|| PathBuf::from("meshgate"))
}

pub fn find_haproxy() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let p = Path::new(dir).join("haproxy");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("haproxy")
}

//! Test harness: a meshsim mesh and an in-process meshgate wired to it, plus an HTTP client that
//! connects from a chosen loopback source address (distinct 127.x.y.z addresses stand in for
//! VM subnets). Everything binds port 0 on loopback; nothing waits on sleeps.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshsim::{Mesh, MeshSpec};
use tokio::net::TcpSocket;

pub use meshsim;

pub mod bao;
pub mod prom;

pub const TD: &str = "cluster.local";
/// The API key of tenant `laptops` in [`default_services_and_tenants`].
pub const LAPTOP_KEY: &str = "laptop-key-1";
/// Clients of tenant `billing-vms`.
pub const BILLING_IP: &str = "127.20.0.5";
/// A client in no tenant's subnet.
pub const STRANGER_IP: &str = "127.30.0.5";
/// Test timeout for a single client request: generous, it only stops a hung test.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn host(name: &str) -> String {
    format!("{name}.bookinfo.svc.{}", meshsim::CLUSTER_DOMAIN)
}

/// meshsim's bookstore descriptor set (`tests/meshsim/proto/bookstore.proto` with its imports),
/// as `protoc --include_imports --descriptor_set_out` writes it for a `transcode:` config.
pub fn bookstore_descriptor_set() -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut c = protox::Compiler::new([root.join("tests/meshsim/proto"), root.join("third_party/googleapis")])
        .expect("include paths");
    c.include_imports(true);
    c.open_file("bookstore.proto").expect("bookstore.proto compiles");
    c.encode_file_descriptor_set()
}

pub fn key_hash(key: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(key.as_bytes())))
}

/// Services and tenants matching `meshsim::demo_spec()`.
pub fn default_services_and_tenants() -> String {
    format!(
        r#"services:
  reviews:
    host: {reviews}
    port: 9080
    protocol: http2
    identity: spiffe://{TD}/ns/bookinfo/sa/bookinfo-reviews
  reviews-v2:
    host: {reviews}
    port: 9080
    protocol: http2
    subset: v2
    aliases: [reviews-v2.bookinfo.test]
  ratings:
    host: {ratings}
    port: 9080
    protocol: http1
  details:
    host: {details}
    port: 9080
    protocol: http2
tenants:
  billing-vms:
    sources: [127.20.0.0/16]
    allow: [reviews, reviews-v2, ratings]
  laptops:
    api_keys: ["{key}"]
    allow: ["*"]
"#,
        reviews = host("reviews"),
        ratings = host("ratings"),
        details = host("details"),
        key = key_hash(LAPTOP_KEY),
    )
}

/// `meshsim::demo_spec()` plus `db.data.svc.cluster.local:5432`, a service declared TCP (one pod,
/// `db-a`, that echoes bytes).
pub fn spec_with_db() -> MeshSpec {
    meshsim::demo_spec().service(
        meshsim::ServiceSpec::new("db", "data", 5432, "db")
            .tcp()
            .pod(meshsim::PodSpec::new("db-a")),
    )
}

/// From `src`, sends `CONNECT target` (plus `extra` header lines, each ending in CRLF) to a
/// meshgate listener and returns the response head and the stream, positioned after it.
pub async fn connect_tunnel(
    listener: SocketAddr,
    src: &str,
    target: &str,
    extra: &str,
) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect_from(listener, src.parse().unwrap()).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n == 1, "connection closed before the response head ended: {head:?}");
        head.push(b[0]);
    }
    (String::from_utf8(head).unwrap(), s)
}

/// A running mesh and a meshgate in front of it.
pub struct Env {
    pub mesh: Mesh,
    pub gate: meshgate::app::Bound,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// Makes meshgate's (cert chain, key, trust bundle) PEMs, given the running mesh's CA.
pub type IdentityFn = Box<dyn FnOnce(&meshsim::MeshCa) -> (String, String, String)>;

pub struct EnvBuilder {
    spec: MeshSpec,
    body: String,
    upstream: String,
    /// Identity for meshgate: None = issued by the mesh CA as ns meshgate / sa meshgate.
    identity: Option<IdentityFn>,
    /// Overrides the gateway address meshgate is given (default: the mesh's gateway).
    gateway: Option<String>,
    /// Extra gateway addresses listed before the mesh's own.
    gateway_also: Vec<String>,
    /// Extra top-level YAML (admin, drain, reload, ...).
    extra: String,
    /// Extra keys for the `vm` listener (indented by four spaces).
    listener_extra: String,
    /// Writes more files (tenant identities) into the config directory once the mesh CA exists.
    files: Option<FilesFn>,
    /// Writes `services:` and `tenants:` once the mesh runs (addresses known only then).
    body_fn: Option<BodyFn>,
    /// Replaces the keys under `mesh.identity:` (indented by four spaces).
    identity_block: Option<String>,
}

type FilesFn = Box<dyn FnOnce(&meshsim::MeshCa, &std::path::Path) -> anyhow::Result<()>>;
type BodyFn = Box<dyn FnOnce(&Mesh) -> String>;

impl Default for EnvBuilder {
    fn default() -> Self {
        EnvBuilder {
            spec: meshsim::demo_spec(),
            body: default_services_and_tenants(),
            upstream: "upstream:\n  connect_timeout: 2s\n  handshake_timeout: 5s\n  request_timeout: 20s\n".into(),
            identity: None,
            gateway: None,
            gateway_also: Vec::new(),
            extra: String::new(),
            listener_extra: String::new(),
            files: None,
            body_fn: None,
            identity_block: None,
        }
    }
}

impl EnvBuilder {
    /// Writes extra files into the config's directory (relative paths in the YAML find them).
    pub fn files(mut self, f: impl FnOnce(&meshsim::MeshCa, &std::path::Path) -> anyhow::Result<()> + 'static) -> Self {
        self.files = Some(Box::new(f));
        self
    }

    /// Adds a listener after `vm` (YAML of one list item: `  - name: …`).
    pub fn listener(mut self, yaml: &str) -> Self {
        self.listener_extra.push_str(yaml);
        self
    }

    pub fn mesh(mut self, spec: MeshSpec) -> Self {
        self.spec = spec;
        self
    }
    /// Replaces the `services:` and `tenants:` sections.
    pub fn services_and_tenants(mut self, yaml: &str) -> Self {
        self.body = yaml.to_string();
        self
    }
    /// Replaces the `services:` and `tenants:` sections with YAML built from the running mesh
    /// (e.g. its HBONE endpoint addresses).
    pub fn services_and_tenants_with(mut self, f: impl FnOnce(&Mesh) -> String + 'static) -> Self {
        self.body_fn = Some(Box::new(f));
        self
    }
    /// Replaces the `upstream:` section.
    pub fn upstream(mut self, yaml: &str) -> Self {
        self.upstream = yaml.to_string();
        self
    }
    /// Serves the admin API on a loopback port (see [`Env::admin_addr`]).
    pub fn admin(self) -> Self {
        self.extra("admin:\n  bind: 127.0.0.1:0\n")
    }
    /// Adds keys to the listener (e.g. `    proxy_protocol: optional\n`).
    pub fn listener_extra(mut self, yaml: &str) -> Self {
        self.listener_extra.push_str(yaml);
        self
    }
    /// Appends top-level YAML sections to the config.
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }
    /// Lists another gateway address (`host:port`) before the mesh's own.
    pub fn gateway_also(mut self, addr: &str) -> Self {
        self.gateway_also.push(addr.to_string());
        self
    }
    /// Points meshgate at another gateway address (`host:port`).
    pub fn gateway(mut self, addr: &str) -> Self {
        self.gateway = Some(addr.to_string());
        self
    }
    /// Replaces meshgate's mesh-issued identity.
    pub fn identity(mut self, f: impl FnOnce(&meshsim::MeshCa) -> (String, String, String) + 'static) -> Self {
        self.identity = Some(Box::new(f));
        self
    }

    /// Replaces the keys under `mesh.identity:` (e.g. an issuer); the default files
    /// (cert-chain.pem, key.pem, root-cert.pem) are still written for it to refer to.
    pub fn identity_block(mut self, yaml: &str) -> Self {
        self.identity_block = Some(yaml.to_string());
        self
    }

    pub async fn start(self) -> anyhow::Result<Env> {
        let mesh = Mesh::start(self.spec.clone()).await.context("start meshsim")?;
        self.start_on(mesh).await
    }

    /// Starts meshgate in front of a mesh the test already started (to run things that need
    /// its CA, such as certificate issuers, before meshgate).
    pub async fn start_on(self, mesh: Mesh) -> anyhow::Result<Env> {
        let dir = tempfile::tempdir()?;
        let (chain, key, root) = match self.identity {
            Some(f) => f(mesh.ca()),
            None => {
                let c = mesh.ca().issue("meshgate", "meshgate")?;
                (c.chain_pem, c.key_pem, mesh.ca().root_pem())
            }
        };
        std::fs::write(dir.path().join("cert-chain.pem"), chain)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        std::fs::write(dir.path().join("root-cert.pem"), root)?;
        if let Some(f) = self.files {
            f(mesh.ca(), dir.path())?;
        }
        let body = match self.body_fn {
            Some(f) => f(&mesh),
            None => self.body,
        };
        let config = format!(
            "listeners:\n  - name: vm\n    bind: 127.0.0.1:0\n    protocol: http\n{lx}mesh:\n  trust_domain: {TD}\n  gateway: {gw}\n  identity:\n{idb}{body}{up}{extra}",
            idb = self
                .identity_block
                .unwrap_or_else(|| "    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n".into()),
            gw = self.gateway.unwrap_or_else(|| {
                let mut all = self.gateway_also.clone();
                all.push(mesh.gateway_addr().to_string());
                format!("[{}]", all.join(", "))
            }),
            body = body,
            up = self.upstream,
            extra = self.extra,
            lx = self.listener_extra,
        );
        let config_path = dir.path().join("meshgate.yaml");
        std::fs::write(&config_path, &config)?;
        let snapshot = meshgate::config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}\n---\n{config}"))?;
        let gate = meshgate::app::start(snapshot).await?;
        Ok(Env {
            mesh,
            gate,
            dir,
            config_path,
        })
    }
}

impl Env {
    pub async fn start() -> anyhow::Result<Env> {
        EnvBuilder::default().start().await
    }

    pub fn addr(&self) -> SocketAddr {
        self.gate.first_addr()
    }

    /// The admin API address; panics unless built with [`EnvBuilder::admin`].
    pub fn admin_addr(&self) -> SocketAddr {
        self.gate.admin.expect("EnvBuilder::admin() was not called")
    }

    /// A plain GET on the admin API: (status, body).
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(StatusCode, String)> {
        admin_request(self.admin_addr(), http::Method::GET, path).await
    }

    /// An HTTP/1.1 client connected from `src`.
    pub async fn h1(&self, src: &str) -> anyhow::Result<Client> {
        Client::connect(self.addr(), src.parse()?, false).await
    }

    /// An h2c (prior knowledge) client connected from `src`.
    pub async fn h2c(&self, src: &str) -> anyhow::Result<Client> {
        Client::connect(self.addr(), src.parse()?, true).await
    }

    /// One GET over a fresh HTTP/1.1 connection from `src` with `Host: host` and extra headers.
    pub async fn get(&self, src: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
        let mut c = self.h1(src).await?;
        let mut b = Request::get(path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        c.send(b.body(Full::new(Bytes::new()))?).await
    }
}

/// A collected response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// The request never left: the HTTP/2 connection was going away (GOAWAY) or closed.
#[derive(Debug)]
pub struct NotSent;

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request not sent: connection going away")
    }
}

impl std::error::Error for NotSent {}

/// A client connection to meshgate from a chosen source address.
pub struct Client {
    sender: Sender,
}

/// One request to an admin API at `addr`: (status, body).
pub async fn admin_request(addr: SocketAddr, method: http::Method, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let mut c = Client::connect(addr, "127.0.0.1".parse()?, false).await?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let r = c.send(req).await?;
    Ok((r.status, r.text()))
}

pub async fn connect_from(dst: SocketAddr, src: IpAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    Ok(sock.connect(dst).await?)
}

impl Client {
    pub async fn connect(dst: SocketAddr, src: IpAddr, h2: bool) -> anyhow::Result<Client> {
        let io = TokioIo::new(connect_from(dst, src).await?);
        let sender = if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Ok(Client { sender })
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Resp> {
        let fut = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
                Sender::H2(s) => match s.try_send_request(req).await {
                    Ok(r) => r,
                    // hyper hands the request back when it never left: the connection got
                    // GOAWAY. A client honouring GOAWAY moves on; callers can tell by type.
                    Err(e) if e.message().is_some() => return Err(NotSent.into()),
                    Err(e) => return Err(e.into_error().into()),
                },
            };
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Resp {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(CLIENT_TIMEOUT, fut)
            .await
            .context("client request timed out")?
    }
}

/// Steady traffic for tests of changes under load: `workers` keep-alive HTTP/1.1 clients sending
/// GETs back to back. Every non-200 or error is recorded. A worker whose connection is closed by
/// meshgate (`Connection: close`) reconnects, unless `lb_removed` is set — the way a load
/// balancer stops sending new connections to an instance whose readiness went off.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub lb_removed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    pub fn start(addr: SocketAddr, src: &str, host: &str, path: &str, workers: usize) -> Load {
        Self::start_with(addr, src, host, path, workers, false)
    }

    /// Like [`Load::start`]; `h2` makes every worker an h2c client (which honours GOAWAY).
    pub fn start_with(addr: SocketAddr, src: &str, host: &str, path: &str, workers: usize, h2: bool) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let lb_removed = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        let src: IpAddr = src.parse().expect("source address");
        for _ in 0..workers {
            let (stop, lb_removed, ok, failures) = (stop.clone(), lb_removed.clone(), ok.clone(), failures.clone());
            let (host, path) = (host.to_string(), path.to_string());
            tasks.spawn(async move {
                let mut client: Option<Client> = None;
                while !stop.load(Ordering::SeqCst) {
                    if client.is_none() {
                        if lb_removed.load(Ordering::SeqCst) {
                            return;
                        }
                        match Client::connect(addr, src, h2).await {
                            Ok(c) => client = Some(c),
                            Err(e) => {
                                failures.lock().unwrap().push(format!("connect: {e}"));
                                return;
                            }
                        }
                    }
                    let c = client.as_mut().expect("connected above");
                    let req = if h2 {
                        Request::get(format!("http://{host}{path}"))
                    } else {
                        Request::get(path.as_str()).header("host", host.as_str())
                    };
                    let req = req.body(Full::new(Bytes::new())).expect("valid request");
                    match c.send(req).await {
                        Ok(r) if r.status == StatusCode::OK => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            let closing = r
                                .headers
                                .get(http::header::CONNECTION)
                                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                            if closing {
                                client = None;
                            }
                        }
                        Ok(r) => failures.lock().unwrap().push(format!("{} {}", r.status, r.text())),
                        Err(e) if e.is::<NotSent>() => client = None,
                        Err(e) => {
                            failures.lock().unwrap().push(format!("request: {e:#}"));
                            client = None;
                        }
                    }
                }
            });
        }
        Load {
            stop,
            lb_removed,
            ok,
            failures,
            tasks,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` more requests have succeeded (bounded; panics on timeout).
    pub async fn wait_for_more(&self, n: u64) {
        let target = self.ok() + n;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.ok() < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "load stalled at {} requests",
                self.ok()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers; returns (succeeded, failures).
    pub async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        while self.tasks.join_next().await.is_some() {}
        let f = self.failures.lock().unwrap().clone();
        (self.ok(), f)
    }
}

/// Polls `f` every 20 ms until it returns true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A VM app: answers every request with JSON naming itself and echoing what it saw.
pub struct VmApp {
    pub addr: SocketAddr,
    tasks: std::sync::Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
}

impl VmApp {
    pub async fn http(name: &'static str) -> VmApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let t = tasks.clone();
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                t.lock().unwrap().spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| async move {
                        let headers: serde_json::Map<String, serde_json::Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                            .collect();
                        let xfcc: Vec<&str> = req
                            .headers()
                            .get_all("x-forwarded-client-cert")
                            .iter()
                            .map(|v| v.to_str().unwrap_or(""))
                            .collect();
                        let body = serde_json::json!({
                            "backend": name,
                            "path": req.uri().path(),
                            "version": format!("{:?}", req.version()),
                            "headers": headers,
                            "xfcc_count": xfcc.len(),
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                            body.to_string(),
                        ))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        VmApp { addr, tasks }
    }

    pub async fn tcp_echo() -> VmApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let t = tasks.clone();
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                t.lock().unwrap().spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        VmApp { addr, tasks }
    }

    /// The VM dies: it stops listening and its open connections close.
    pub fn stop(&self) {
        self.tasks.lock().unwrap().abort_all();
    }
}

//! The load generator: HTTP/1.1 keep-alive, h2c (prior knowledge) or h2 over mTLS, closed loop
//! (a fixed number of requests in flight) or open loop (a fixed rate).
//!
//! Open loop corrects coordinated omission: request `i` is due at `start + i / rate`, and its
//! latency is measured from that due time, not from when a worker got round to sending it. A
//! slow server therefore shows up as latency, instead of quietly lowering the offered rate.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// How the generator talks to the target.
#[derive(Clone)]
pub enum Proto {
    H1,
    H2c,
    /// HTTP/2 over TLS: what a mesh client sends to the east-west gateway.
    H2Tls {
        config: Arc<rustls::ClientConfig>,
        sni: ServerName<'static>,
    },
}

impl Proto {
    fn is_h2(&self) -> bool {
        !matches!(self, Proto::H1)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Proto::H1 => "http/1.1",
            Proto::H2c => "h2c",
            Proto::H2Tls { .. } => "h2+mtls",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub enum Mode {
    /// `concurrency` requests in flight, each sent as soon as the previous one finished.
    Closed { concurrency: usize },
    /// `rate` requests per second, with up to `concurrency` in flight.
    Open { rate: f64, concurrency: usize },
}

impl Mode {
    fn concurrency(&self) -> usize {
        match *self {
            Mode::Closed { concurrency } | Mode::Open { concurrency, .. } => concurrency.max(1),
        }
    }
}

#[derive(Clone)]
pub struct Load {
    pub target: SocketAddr,
    pub proto: Proto,
    /// The `Host` (HTTP/1.1) or `:authority` (HTTP/2) of every request.
    pub host: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Client addresses to connect from, used in turn per connection.
    pub sources: Vec<IpAddr>,
    /// HTTP/2: connections the streams share. HTTP/1.1: one per request in flight.
    pub h2_connections: usize,
    pub mode: Mode,
    pub duration: Duration,
    pub max_requests: u64,
    /// A request still unanswered after this counts as a timeout.
    pub request_timeout: Duration,
}

/// What a run produced. Latency in microseconds.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub sent: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Client connections opened: HTTP/1.1, one per worker and another after each response
    /// that said `Connection: close` or failed; HTTP/2, one per shared connection and another
    /// for each that closed.
    pub connections: u64,
    /// Connection or protocol failures (no HTTP status).
    pub errors: u64,
    pub timeouts: u64,
    pub body_bytes: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    pub first_error: Option<String>,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            sent: 0,
            statuses: BTreeMap::new(),
            connections: 0,
            errors: 0,
            timeouts: 0,
            body_bytes: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
            first_error: None,
        }
    }

    fn merge(&mut self, o: Outcome) {
        self.sent += o.sent;
        for (s, n) in o.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.connections += o.connections;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        self.body_bytes += o.body_bytes;
        self.latency.add(&o.latency).expect("same bounds");
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    /// Responses with any HTTP status.
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code).copied().unwrap_or(0)
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// Opens a TCP connection from `source`.
pub async fn connect_from(target: SocketAddr, source: IpAddr) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let s = socket.connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub(crate) enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

async fn open(load: &Load, source: IpAddr) -> anyhow::Result<Sender> {
    let tcp = connect_from(load.target, source).await?;
    match &load.proto {
        Proto::H1 => {
            let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Ok(Sender::H1(send))
        }
        Proto::H2c => h2(TokioIo::new(tcp)).await,
        Proto::H2Tls { config, sni } => {
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(sni.clone(), tcp)
                .await?;
            h2(TokioIo::new(tls)).await
        }
    }
}

async fn h2<T>(io: TokioIo<T>) -> anyhow::Result<Sender>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(io)
        .await?;
    tokio::spawn(conn);
    Ok(Sender::H2(send))
}

fn request(load: &Load) -> Request<Full<Bytes>> {
    let uri = if load.proto.is_h2() {
        format!("http://{}{}", load.host, load.path)
    } else {
        load.path.clone()
    };
    let mut b = Request::builder().method(Method::GET).uri(uri);
    if !load.proto.is_h2() {
        b = b.header(http::header::HOST, &load.host);
    }
    for (k, v) in &load.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::new())).expect("valid request")
}

/// One request: the status and body size, or why there is none.
/// One request: the status, the body size, and whether the server said it closes the connection.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, u64, bool)> {
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Sender::H2(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let status = resp.status().as_u16();
    let close = resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
        }
    }
    Ok((status, n, close))
}

struct Shared {
    load: Load,
    tickets: AtomicU64,
    stop: AtomicBool,
    start: Instant,
    end: Instant,
    h2: Vec<tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>>,
}

/// Runs the load to its end (duration or request count) and returns what happened.
pub async fn run(load: Load) -> Outcome {
    assert!(!load.sources.is_empty(), "at least one source address");
    let workers = load.mode.concurrency();
    let start = Instant::now();
    let shared = Arc::new(Shared {
        h2: (0..load.h2_connections.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect(),
        end: start + load.duration,
        tickets: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        start,
        load,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        tasks.spawn(worker(shared.clone(), w));
    }
    let mut total = Outcome::new();
    while let Some(res) = tasks.join_next().await {
        total.merge(res.expect("worker panicked"));
    }
    total.elapsed = start.elapsed();
    total
}

async fn worker(sh: Arc<Shared>, index: usize) -> Outcome {
    let mut out = Outcome::new();
    let load = &sh.load;
    let source = load.sources[index % load.sources.len()];
    let mut h1: Option<Sender> = None;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let ticket = sh.tickets.fetch_add(1, Ordering::Relaxed);
        if ticket >= load.max_requests {
            break;
        }
        let due = match load.mode {
            Mode::Closed { .. } => None,
            Mode::Open { rate, .. } => Some(sh.start + Duration::from_secs_f64(ticket as f64 / rate)),
        };
        if due.unwrap_or_else(Instant::now) >= sh.end {
            break;
        }
        if let Some(due) = due {
            tokio::time::sleep_until(due).await;
        }
        let began = due.unwrap_or_else(Instant::now);
        out.sent += 1;
        let req = request(load);
        let mut opened = 0;
        let result = tokio::time::timeout(load.request_timeout, async {
            if load.proto.is_h2() {
                let slot = &sh.h2[index % sh.h2.len()];
                let mut sender = {
                    let mut guard = slot.lock().await;
                    match guard.as_ref().filter(|s| !s.is_closed()) {
                        Some(s) => Sender::H2(s.clone()),
                        None => {
                            let s = open(load, source).await?;
                            opened += 1;
                            if let Sender::H2(s) = &s {
                                *guard = Some(s.clone());
                            }
                            s
                        }
                    }
                };
                exchange(&mut sender, req).await
            } else {
                if h1.is_none() {
                    h1 = Some(open(load, source).await?);
                    opened += 1;
                }
                let r = exchange(h1.as_mut().expect("just opened"), req).await;
                // A connection the server closes (an error, or `Connection: close` after a
                // refusal) is replaced by a new one for the next request.
                if r.as_ref().is_ok_and(|(_, _, close)| *close) || r.is_err() {
                    h1 = None;
                }
                r
            }
        })
        .await;
        out.connections += opened;
        match result {
            Ok(Ok((status, bytes, _))) => {
                *out.statuses.entry(status).or_default() += 1;
                out.body_bytes += bytes;
                let us = began.elapsed().as_micros().clamp(1, 120_000_000) as u64;
                out.latency.saturating_record(us);
            }
            Ok(Err(e)) => {
                out.fail(format!("{e:#}"));
                // A refused or broken connection must not turn into a hot error loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                out.timeouts += 1;
                h1 = None;
            }
        }
    }
    out
}

/// Holds `count` client connections open, each after one complete request, spread over
/// `sources`; returns them (dropping closes them) and how many failed.
pub(crate) async fn hold_idle(load: &Load, count: usize) -> (Vec<Sender>, u64) {
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for chunk_start in (0..count).step_by(200) {
        let mut set = tokio::task::JoinSet::new();
        for i in chunk_start..(chunk_start + 200).min(count) {
            let load = load.clone();
            set.spawn(tokio::time::timeout(load.request_timeout, async move {
                let source = load.sources[i % load.sources.len()];
                let mut s = open(&load, source).await?;
                let (status, _, _) = exchange(&mut s, request(&load)).await?;
                anyhow::ensure!(status == 200, "status {status}");
                Ok::<_, anyhow::Error>(s)
            }));
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(Ok(s))) => held.push(s),
                _ => failed += 1,
            }
        }
    }
    (held, failed)
}

/// `count` addresses from a CIDR, skipping network and broadcast addresses.
pub fn sources(cidr: &str, count: usize) -> anyhow::Result<Vec<IpAddr>> {
    let net: ipnet::IpNet = cidr.parse()?;
    let v: Vec<IpAddr> = net.hosts().take(count).collect();
    anyhow::ensure!(!v.is_empty(), "no addresses in {cidr}");
    Ok(v)
}

//! The `meshgate` command: run, check, explain, services import, hash-key, demo.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand, ValueEnum};
use meshgate::config::{self, Snapshot};

/// `meshgate --version`: the release, the git revision it was built from and the target.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("MESHGATE_GIT_REV"),
    ", ",
    env!("MESHGATE_TARGET"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "meshgate",
    version = LONG_VERSION,
    about = "Carries plain HTTP from VMs into an Istio mesh over mTLS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format; `auto` is pretty on a terminal and JSON otherwise. Overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter (e.g. `info`, `meshgate=debug`). Overrides `log.level`; RUST_LOG overrides both.
    #[arg(long, global = true)]
    log_level: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the proxy (the normal service command).
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file and print a summary, or every error with its line.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show what meshgate would do with a request, and why: tenant, decision, route, identities.
    ///
    /// Exit status: 0 if the request would be forwarded, 1 if it would be refused, 2 on a usage,
    /// config or admin API error.
    #[command(group = clap::ArgGroup::new("source").required(true).args(["config", "admin"]))]
    Explain {
        /// Answer from this config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Ask a running instance's admin API (HOST:PORT) instead, about its running config.
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
        /// The file holding the admin bearer token (`admin.token_file`), for --admin.
        #[arg(long, requires = "admin")]
        token_file: Option<PathBuf>,
        /// The client address the request comes from.
        #[arg(long, required_unless_present = "principal")]
        client: Option<std::net::IpAddr>,
        /// Explain a call from the mesh to a VM service instead (mesh-inbound): the caller's
        /// SPIFFE ID; the target is then an SNI (outbound_.PORT_._.HOST) or a host[:port].
        #[arg(long, conflicts_with_all = ["client", "key", "vpce", "admin"])]
        principal: Option<String>,
        /// The API key the client presents, if any.
        #[arg(long)]
        key: Option<String>,
        /// The AWS VPC endpoint the client arrives through (from a PROXY v2 header), if any.
        #[arg(long)]
        vpce: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// A URL (`http://host[:port]/path`) or a `host[:port]` as the Host header.
        target: String,
    },
    /// Work with services files (`services_file:` in the config).
    Services {
        #[command(subcommand)]
        cmd: ServicesCmd,
    },
    /// Generate a random API key and print it with the `sha256:` form for the config.
    HashKey {
        /// Hash a key read from standard input instead of generating one.
        #[arg(long)]
        stdin: bool,
    },
    /// Start an embedded sandbox mesh and meshgate in front of it, and print commands to try.
    #[cfg(feature = "demo")]
    Demo {
        /// Where the demo's VM-facing listener binds.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum ServicesCmd {
    /// Write a services file from Kubernetes Services and Istio ServiceEntries, as printed by
    /// `kubectl get svc,serviceentries -A -o json` (or `-o yaml`).
    Import(meshgate::import::ImportArgs),
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().flatten_event(true).with_current_span(false).init();
    } else {
        b.init();
    }
}

fn load_or_report(path: &std::path::Path) -> Option<Snapshot> {
    match config::load(path) {
        Ok(s) => Some(s),
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) in {}", errs.0.len(), path.display());
            None
        }
    }
}

#[cfg(unix)]
async fn run(snapshot: Snapshot) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a signal that arrives while starting must not kill the process outright.
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("error: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let bound = match meshgate::app::start(snapshot).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let app = bound.app.clone();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading config");
                let _ = app.reload().await;
            }
        }
    }
    tracing::info!("shutting down: draining (send the signal again to exit at once)");
    let drain = bound.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => ExitCode::SUCCESS,
        _ = term.recv() => { tracing::warn!("second signal: exiting without finishing the drain"); ExitCode::FAILURE }
        _ = int.recv() => { tracing::warn!("second signal: exiting without finishing the drain"); ExitCode::FAILURE }
    }
}

#[cfg(not(unix))]
async fn run(snapshot: Snapshot) -> ExitCode {
    let bound = match meshgate::app::start(snapshot).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let _ = tokio::signal::ctrl_c().await;
    bound.shutdown().await;
    ExitCode::SUCCESS
}

const EXIT_USAGE: u8 = 2;

#[allow(clippy::too_many_arguments)]
fn explain_cmd(
    config: Option<PathBuf>,
    admin: Option<String>,
    token_file: Option<PathBuf>,
    client: std::net::IpAddr,
    key: Option<String>,
    vpce: Option<String>,
    json: bool,
    target: String,
) -> ExitCode {
    if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        eprintln!("error: --key is empty");
        return ExitCode::from(EXIT_USAGE);
    }
    let mut query = meshgate::explain::Query {
        client,
        target,
        key: None,
        key_sha256: None,
        vpce,
    };
    let answer = match (config, admin) {
        (Some(path), _) => {
            let Some(snapshot) = load_or_report(&path) else {
                return ExitCode::from(EXIT_USAGE);
            };
            query.key = key;
            query.answer(&snapshot)
        }
        (None, Some(addr)) => {
            // Only the digest goes over the wire: the admin API may be plain HTTP.
            query.key_sha256 = key.map(|k| format!("sha256:{}", hex::encode(meshgate::policy::hash_key(k.trim()))));
            ask_admin(&addr, token_file.as_deref(), &query)
        }
        (None, None) => Err("give -c FILE or --admin HOST:PORT".into()),
    };
    let e = match answer {
        Ok(e) => e,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    print_explanation(&e, json, e.forwarded())
}

/// An explanation as text or JSON; exit status 0 when the request would be forwarded.
fn print_explanation(e: &(impl serde::Serialize + std::fmt::Display), json: bool, forwarded: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string_pretty(e).expect("explanations serialise"));
    } else {
        print!("{e}");
    }
    if forwarded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `explain --principal`: a call from the mesh to a VM service, answered from a config file.
fn explain_inbound_cmd(config: Option<PathBuf>, principal: &str, json: bool, target: &str) -> ExitCode {
    let Some(path) = config else {
        eprintln!("error: --principal needs -c FILE");
        return ExitCode::from(EXIT_USAGE);
    };
    let Some(snapshot) = load_or_report(&path) else {
        return ExitCode::from(EXIT_USAGE);
    };
    let e = meshgate::explain::inbound::explain_inbound(&snapshot, principal, target);
    print_explanation(&e, json, e.forwarded())
}

/// `POST /explain` on a running instance's admin API.
fn ask_admin(
    addr: &str,
    token_file: Option<&std::path::Path>,
    query: &meshgate::explain::Query,
) -> Result<meshgate::explain::Explanation, String> {
    use http_body_util::{BodyExt, Full};
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read token file {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let body = serde_json::to_vec(query).map_err(|e| e.to_string())?;
    let mut req = http::Request::post("/explain")
        .header(http::header::HOST, addr)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = &token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| format!("invalid admin address {addr:?}: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let call = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to the admin API at {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("admin API at {addr}: {e}"))?;
        tokio::spawn(conn);
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("admin API at {addr}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("admin API at {addr}: {e}"))?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(format!(
                "admin API at {addr} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("unexpected answer from the admin API at {addr}: {e}"))
    };
    rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), call).await })
        .map_err(|_| format!("admin API at {addr} did not answer within 10s"))?
}

async fn wait_for_ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> ExitCode {
    // HPACK literals without indexing or Huffman coding for every HTTP/2 connection meshgate
    // opens or serves: less CPU per request for a few more header bytes (loadtest/RESULTS.md).
    h2::set_literal_header_encoding(true);
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => match load_or_report(&config) {
            Some(s) => {
                print!("{}", config::summary(&s));
                ExitCode::SUCCESS
            }
            None => ExitCode::FAILURE,
        },
        Cmd::Explain {
            config,
            admin,
            token_file,
            client,
            principal,
            key,
            vpce,
            json,
            target,
        } => match (principal, client) {
            (Some(p), _) => explain_inbound_cmd(config, &p, json, &target),
            (None, Some(client)) => explain_cmd(config, admin, token_file, client, key, vpce, json, target),
            (None, None) => unreachable!("clap requires --client without --principal"),
        },
        Cmd::Services {
            cmd: ServicesCmd::Import(args),
        } => match meshgate::import::command(&args) {
            Ok(summary) => {
                eprintln!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::HashKey { stdin } => {
            if stdin {
                let mut key = String::new();
                if std::io::stdin().read_line(&mut key).is_err() || key.trim().is_empty() {
                    eprintln!("error: no key on standard input");
                    return ExitCode::FAILURE;
                }
                let h = meshgate::policy::hash_key(key.trim());
                println!("sha256:{}", hex::encode(h));
            } else {
                let (key, hashed) = meshgate::policy::keys::generate_key();
                println!("key:    {key}");
                println!("config: \"{hashed}\"");
            }
            ExitCode::SUCCESS
        }
        Cmd::Run { config } => {
            let Some(snapshot) = load_or_report(&config) else {
                return ExitCode::FAILURE;
            };
            let format = cli.log_format.unwrap_or(match snapshot.log.format {
                Some(config::LogFormat::Json) => LogFormat::Json,
                Some(config::LogFormat::Pretty) => LogFormat::Pretty,
                Some(config::LogFormat::Auto) | None => LogFormat::Auto,
            });
            let level = cli
                .log_level
                .clone()
                .or_else(|| snapshot.log.level.clone())
                .unwrap_or_else(|| "info".into());
            init_logging(format, &level);
            runtime().block_on(run(snapshot))
        }
        #[cfg(feature = "demo")]
        Cmd::Demo { listen } => {
            init_logging(
                cli.log_format.unwrap_or(LogFormat::Auto),
                cli.log_level.as_deref().unwrap_or("warn"),
            );
            runtime().block_on(async move {
                let demo = match meshgate::demo::Demo::start(listen).await {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return ExitCode::FAILURE;
                    }
                };
                println!("{}", demo.instructions());
                wait_for_ctrl_c().await;
                demo.shutdown().await;
                ExitCode::SUCCESS
            })
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // On one CPU (a small instance, or pinned with taskset) work stealing has nothing to steal
    // from and costs atomics on every wake-up: a single-threaded scheduler does the same work
    // for less CPU per request (loadtest/RESULTS.md).
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut b = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    b.enable_all().build().expect("start tokio runtime")
}

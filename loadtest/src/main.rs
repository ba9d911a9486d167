//! `meshgate-loadtest compare` runs the comparison and writes the report;
//! `meshgate-loadtest gen` sends load at any HTTP endpoint.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshgate_loadtest::gen::{self, Load, Mode, Proto};
use meshgate_loadtest::runner::{self, Options, SCENARIOS};

#[derive(Parser)]
#[command(
    name = "meshgate-loadtest",
    about = "Load tests: meshgate vs HAProxy vs the upstream alone"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the loopback mesh, run every scenario against meshgate, HAProxy and the upstream
    /// directly, and write report.md, report.json and chart.svg.
    Compare {
        /// Where the report goes.
        #[arg(long, default_value = "loadtest/report")]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Seconds of warm-up per target before a scenario's rounds.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Comma-separated scenario names, or `all`.
        #[arg(long, default_value = "all", value_delimiter = ',')]
        scenarios: Vec<String>,
        /// The meshgate binary (default: next to this one).
        #[arg(long)]
        meshgate: Option<PathBuf>,
        /// The HAProxy binary (default: /usr/sbin/haproxy or PATH).
        #[arg(long)]
        haproxy: Option<PathBuf>,
        /// Do not pin the proxies and the generator to separate CPUs.
        #[arg(long)]
        no_pin: bool,
        /// Connections for both idle scenarios instead of 1,000 and 10,000.
        #[arg(long)]
        idle_connections: Option<usize>,
        /// Requests in the cold-start scenario.
        #[arg(long, default_value_t = 1000)]
        cold_requests: u64,
    },
    /// Send load to one HTTP endpoint and print throughput and latency.
    Gen {
        /// Where to connect, IP:PORT.
        #[arg(long)]
        target: std::net::SocketAddr,
        /// Host header / :authority.
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// Speak h2c (prior knowledge) instead of HTTP/1.1.
        #[arg(long)]
        h2c: bool,
        /// Requests in flight (closed loop), or the most in flight (open loop).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Open loop at this many requests per second (latency from each request's due time).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = u64::MAX)]
        requests: u64,
        /// Client source addresses, as a CIDR on loopback.
        #[arg(long, default_value = "127.0.0.1/32")]
        sources: String,
        /// Extra request headers, `name: value`.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    match cli.command {
        Cmd::Compare {
            out,
            rounds,
            seconds,
            warmup,
            scenarios,
            meshgate,
            haproxy,
            no_pin,
            idle_connections,
            cold_requests,
        } => {
            for s in &scenarios {
                anyhow::ensure!(
                    s == "all" || SCENARIOS.iter().any(|(n, _)| n == s),
                    "unknown scenario {s}; known: {}",
                    SCENARIOS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                );
            }
            let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let pin = !no_pin && cpus >= 2;
            if pin {
                // Before the runtime starts, so every thread of the load side inherits CPU 0.
                runner::pin_self(0)?;
            }
            let opts = Options {
                out,
                rounds,
                duration: Duration::from_secs_f64(seconds),
                warmup: Duration::from_secs_f64(warmup),
                scenarios,
                meshgate: meshgate.unwrap_or_else(runner::default_meshgate),
                haproxy: haproxy.unwrap_or_else(runner::find_haproxy),
                pin,
                idle_override: idle_connections,
                cold_requests,
                command_line,
            };
            anyhow::ensure!(
                opts.meshgate.exists(),
                "meshgate binary not found at {} (build it: cargo build --release -p meshgate)",
                opts.meshgate.display()
            );
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(runner::compare(&opts))?;
            println!("{}", meshgate_loadtest::report::markdown(&report));
            eprintln!("report written to {}", opts.out.display());
            Ok(())
        }
        Cmd::Gen {
            target,
            host,
            path,
            h2c,
            concurrency,
            rate,
            seconds,
            requests,
            sources,
            headers,
        } => {
            let headers = headers
                .iter()
                .map(|h| {
                    let (k, v) = h
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("header {h:?} is not `name: value`"))?;
                    Ok((k.trim().to_string(), v.trim().to_string()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let load = Load {
                target,
                proto: if h2c { Proto::H2c } else { Proto::H1 },
                host,
                path,
                headers,
                sources: gen::sources(&sources, 256)?,
                h2_connections: 4,
                mode: match rate {
                    Some(rate) => Mode::Open { rate, concurrency },
                    None => Mode::Closed { concurrency },
                },
                duration: Duration::from_secs_f64(seconds),
                max_requests: requests,
                request_timeout: Duration::from_secs(30),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let out = rt.block_on(gen::run(load));
            println!(
                "{} sent, {} answered {:?} over {} connections, {} errors, {} timeouts in {:.2} s: {:.0} req/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2}",
                out.sent,
                out.answered(),
                out.statuses,
                out.connections,
                out.errors,
                out.timeouts,
                out.elapsed.as_secs_f64(),
                out.requests_per_sec(),
                out.percentile_ms(0.5),
                out.percentile_ms(0.9),
                out.percentile_ms(0.99),
                out.percentile_ms(0.999)
            );
            if let Some(e) = out.first_error {
                eprintln!("first error: {e}");
            }
            Ok(())
        }
    }
}

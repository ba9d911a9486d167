//! The `meshgate-autoscaler` command: `run` (the service), `check` (validate a config) and
//! `simulate` (replay a load trace offline). Decisions and logs go to stderr; `--dry-run`
//! decisions and `simulate` summaries go to stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshgate_autoscaler::{asg, config, controller, simulate};

#[derive(Parser)]
#[command(
    name = "meshgate-autoscaler",
    version,
    about = "Sizes the meshgate Auto Scaling group from Prometheus load"
)]
struct Cli {
    /// Log format: auto (pretty on a terminal, JSON otherwise), json or pretty.
    #[arg(long, global = true, default_value = "auto")]
    log_format: String,
    /// A tracing filter; RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control loop (until SIGTERM or Ctrl-C).
    Run {
        #[arg(short, long)]
        config: PathBuf,
        /// Print decisions only: no SetDesiredCapacity, no drain, no lifecycle completion.
        #[arg(long)]
        dry_run: bool,
        /// Send AWS calls here instead of AWS (testing: a moto server; or a VPC endpoint).
        #[arg(long)]
        endpoint_url: Option<String>,
        /// One evaluation round, then exit (status 1 if a group could not be evaluated).
        #[arg(long)]
        once: bool,
    },
    /// Validate a config file; prints a summary or every error as FILE:LINE: reason.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Replay a load trace (CSV) through the decision rule and chart capacity against load.
    Simulate {
        #[arg(long)]
        trace: PathBuf,
        #[arg(short, long)]
        config: PathBuf,
        /// Write the chart here (SVG).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The group to simulate (default: the first in the config).
        #[arg(long)]
        group: Option<String>,
        /// How long a launched instance takes to come into service.
        #[arg(long, default_value = "60s")]
        launch_delay: String,
    },
}

fn init_logs(format: &str, level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let json = match format {
        "json" => true,
        "pretty" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn load(path: &Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => match load(&config) {
            Ok(c) => {
                for g in &c.groups {
                    println!(
                        "{}: group {} capacity {}..={}, signals {}",
                        config.display(),
                        g.name,
                        g.policy.min,
                        g.policy.max,
                        g.signals
                            .iter()
                            .map(|s| format!("{} (target {})", s.name, s.target))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Simulate {
            trace,
            config,
            out,
            group,
            launch_delay,
        } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match run_simulate(&c, &trace, out, group, &launch_delay) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("simulate: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Run {
            config,
            dry_run,
            endpoint_url,
            once,
        } => {
            init_logs(&cli.log_format, &cli.log_level);
            let mut c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            c.dry_run |= dry_run;
            if let Some(e) = endpoint_url {
                c.aws.endpoint_url = Some(e.trim_end_matches('/').to_string());
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(run(c, once)) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "exiting");
                    eprintln!("meshgate-autoscaler: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn run_simulate(
    c: &config::Config,
    trace: &Path,
    out: Option<PathBuf>,
    group: Option<String>,
    launch_delay: &str,
) -> anyhow::Result<()> {
    let g = match &group {
        Some(name) => c
            .groups
            .iter()
            .find(|g| &g.name == name)
            .with_context(|| format!("no group {name:?} in the config"))?,
        None => &c.groups[0],
    };
    let launch_delay = config::parse_duration(launch_delay).map_err(|e| anyhow::anyhow!("--launch-delay: {e}"))?;
    let text = std::fs::read_to_string(trace).with_context(|| format!("reading {}", trace.display()))?;
    let t = simulate::parse_trace(&text).map_err(|e| anyhow::anyhow!("{}: {e}", trace.display()))?;
    let sim = simulate::simulate(g, c.interval, &t, simulate::Options { launch_delay }).map_err(anyhow::Error::msg)?;
    print!("{}", sim.summary_text());
    if let Some(out) = out {
        std::fs::write(&out, sim.svg()).with_context(|| format!("writing {}", out.display()))?;
        println!("chart: {}", out.display());
    }
    Ok(())
}

async fn run(c: config::Config, once: bool) -> anyhow::Result<ExitCode> {
    let sdk = asg::sdk_config(&c.aws, None).await;
    let bind = c.bind;
    let mut ctl = controller::Controller::new(c, &sdk)?;
    let _server = match bind {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tracing::info!(addr = %l.local_addr()?, "serving /metrics and /healthz");
            Some(AbortOnDrop(tokio::spawn(controller::serve(
                l,
                ctl.metrics(),
                ctl.health(),
            ))))
        }
        None => None,
    };
    if once {
        let outcomes = ctl.round().await;
        let failed = outcomes.iter().any(|o| o.decision.is_none());
        return Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS });
    }
    ctl.run(shutdown()).await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

//! `meshsim` binary: runs the bookinfo-like demo mesh on loopback until Ctrl-C, and writes a
//! client identity (`spiffe://<td>/ns/meshgate/sa/meshgate`) for a proxy to use.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "meshsim", about = "An Istio mesh data plane on loopback (demo mesh)")]
struct Args {
    /// Where to write the client identity (cert-chain.pem, key.pem, root-cert.pem).
    #[arg(long, default_value = "./meshsim-certs")]
    out: PathBuf,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = meshsim::TRUST_DOMAIN)]
    trust_domain: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Registered before anything is printed: a supervisor that signals as soon as it sees
    // "serving" must not hit the window before the handler exists.
    let shutdown = Shutdown::register()?;
    let mut spec = meshsim::demo_spec();
    spec.trust_domain = args.trust_domain.clone();
    let mesh = meshsim::Mesh::start(spec).await?;

    let client = mesh.ca().issue("meshgate", "meshgate")?;
    let files = client
        .write_files(&args.out, &mesh.ca().root_pem())
        .with_context(|| format!("writing identity to {}", args.out.display()))?;

    let spec = mesh.spec();
    println!("gateway (AUTO_PASSTHROUGH): {}", mesh.gateway_addr());
    println!("client identity {}:", client.spiffe_id.as_deref().unwrap_or("-"));
    println!("  cert chain: {}", files.cert_chain.display());
    println!("  key:        {}", files.key.display());
    println!("  root:       {}", files.root_cert.display());
    println!("services:");
    for svc in &spec.services {
        let subsets = svc.subsets();
        println!(
            "  {}:{}  sa={}  subsets=[{}]  sni={}",
            svc.host(&spec.cluster_domain),
            svc.port,
            svc.spiffe_id(&spec.trust_domain),
            subsets.join(","),
            svc.sni(&spec.cluster_domain, None),
        );
        for pod in &svc.pods {
            println!(
                "    pod {}  subset={}  sidecar={}",
                pod.name,
                pod.subset.as_deref().unwrap_or("-"),
                mesh.sidecar_addr(&pod.name)
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    println!("serving; Ctrl-C to stop");
    shutdown.wait().await;
    drop(mesh);
    Ok(())
}

/// SIGINT or SIGTERM (Ctrl-C elsewhere), registered eagerly.
struct Shutdown {
    #[cfg(unix)]
    signals: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
}

impl Shutdown {
    fn register() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Shutdown {
                signals: (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?),
            })
        }
        #[cfg(not(unix))]
        Ok(Shutdown {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.signals.0.recv() => {}
            _ = self.signals.1.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

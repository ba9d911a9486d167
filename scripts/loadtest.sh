#!/usr/bin/env bash
# The side-by-side comparison of issue #6: meshgate vs HAProxy vs the upstream alone, on loopback.
# Installs HAProxy (Debian package) if missing, builds meshgate and the load tester in release
# mode, runs every scenario and writes loadtest/report/{report.md,report.json,chart.svg}.
# Extra arguments go to `meshgate-loadtest compare` (e.g. --rounds 5 --scenarios h1-small).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "haproxy is missing: run as root, or apt-get install haproxy" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy
  # The package starts a system HAProxy where an init system runs; the runner starts its own.
  service haproxy stop >/dev/null 2>&1 || pkill -x haproxy 2>/dev/null || true
fi
cargo build --release --locked -p meshgate -p meshgate-loadtest
exec target/release/meshgate-loadtest compare --out loadtest/report "$@"

#!/usr/bin/env bash
# Where meshgate's CPU goes on one load-test scenario, by component: `perf record` attached to
# the meshgate process of a `meshgate-loadtest compare --rounds 2` run (HAProxy and direct
# measured beside it as usual), then scripts/profile-owners.py over the samples. Prints each
# component's share, the codecs' share together, and the ratio left if the codecs cost nothing
# (RESULTS.md, "A floor for a codec of our own").
# usage: scripts/profile.sh [SCENARIO]   (default h2c-small; root, for perf and HAProxy)
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-h2c-small}
for tool in perf python3 pgrep; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing (perf: apt-get install linux-perf)" >&2; exit 1; }
done
cargo build --release --locked -p meshgate -p meshgate-loadtest
bin=$(realpath target/release/meshgate)
out=$(mktemp -d /tmp/meshgate-profile.XXXXXX)
target/release/meshgate-loadtest compare --out "$out" --rounds 2 --scenarios "$scenario" --meshgate "$bin" \
  >"$out/compare.log" 2>&1 &
runner=$!
pid=
for _ in $(seq 1 300); do
  pid=$(pgrep -f "^$bin run" | head -1 || true)
  [ -n "$pid" ] && break
  kill -0 "$runner" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$pid" ]; then
  echo "meshgate did not start; see $out/compare.log" >&2
  wait "$runner" || true
  exit 1
fi
# Until meshgate exits; 499 Hz keeps perf's own cost low, DWARF call chains see through inlining.
perf record -q -F 499 --call-graph dwarf,16384 -o "$out/perf.data" -p "$pid" >/dev/null 2>&1 || true
if ! wait "$runner"; then
  echo "the comparison failed; see $out/compare.log" >&2
  exit 1
fi
ratio=$(python3 - "$out/report.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["scenarios"][0]["summary"]
cpu = {r["target"]: r["cpu_secs_per_10k"] for r in s}
print(f"{cpu['meshgate'] / cpu['haproxy']:.3f}")
PY
)
echo "$scenario: meshgate's CPU per request ${ratio}x HAProxy's in this run (under perf, which adds to meshgate's)"
perf script -i "$out/perf.data" --no-inline -F ip,sym 2>/dev/null | python3 scripts/profile-owners.py --ratio "$ratio"
echo "samples and report: $out"

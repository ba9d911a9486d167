#!/usr/bin/env bash
# Checks what scripts/release.sh put in dist/ (run by it, or alone after it):
#   - both binaries need glibc 2.17 at most (their highest GLIBC_ symbol version), carry their
#     debug link, match SHA256SUMS, and `meshgate --version` names this revision;
#   - the portable meshgate runs `meshgate demo` to a 200;
#   - the .deb installs with dpkg into a scratch root (maintainer scripts included, through
#     DPKG_ROOT), creates the `meshgate` user there, registers its conffile, its unit verifies and
#     has a systemd-analyze security score, and `meshgate check` accepts the shipped config once
#     identity files are in place;
#   - the OCI image's manifest and config are valid (umoci stat, skopeo inspect: user,
#     entrypoint, labels), its rootfs holds only the listed files, and inside it (chroot)
#     `meshgate --version` runs and `meshgate check` accepts a mounted config.
# Needs root (dpkg --root and chroot), openssl, objdump, umoci, skopeo, systemd-analyze, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "release check: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg --root, chroot)"
[ -x /bin/kill ] || fail "missing tool: /bin/kill (procps)"
for t in openssl objdump umoci skopeo systemd-analyze curl dpkg useradd groupadd; do
  command -v "$t" >/dev/null 2>&1 || fail "missing tool: $t"
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
rev=$(git rev-parse --short=12 HEAD)
work=$(mktemp -d)
cleanup() {
  [ -n "${demo_pid:-}" ] && kill "$demo_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# ---- binaries ----
(cd dist && sha256sum --check --quiet SHA256SUMS) || fail "SHA256SUMS does not match"
for b in meshgate meshgate-autoscaler; do
  max=$(objdump -T "dist/$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
  [ "$(printf '%s\n2.17\n' "$max" | sort -V | tail -1)" = 2.17 ] || fail "$b needs glibc $max (> 2.17)"
  objdump -h "dist/$b" | grep -q gnu_debuglink || fail "$b has no .gnu_debuglink"
  objdump -h "dist/$b" | grep -q '\.debug_info' && fail "$b is not stripped"
  echo "$b: needs glibc $max, $(du -k "dist/$b" | cut -f1) KiB (+ $(du -k "dist/$b.debug" | cut -f1) KiB of debug info)"
done
v=$(dist/meshgate --version)
case "$v" in "meshgate $version (git $rev, x86_64-unknown-linux-gnu)") ;; *) fail "--version says: $v" ;; esac
v=$(dist/meshgate-autoscaler --version)
case "$v" in *"$version"*) ;; *) fail "autoscaler --version says: $v" ;; esac

# ---- the portable binary runs the demo to a 200 ----
dist/meshgate demo --listen 127.0.0.1:0 >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!
for _ in $(seq 1 300); do
  grep -q 'Press Ctrl-C' "$work/demo.out" && break
  sleep 0.1
done
first=$(grep -m1 '^  curl ' "$work/demo.out" || true)
[ -n "$first" ] || fail "the demo printed no curl line: $(cat "$work/demo.out" "$work/demo.err")"
out=$(sh -c "$first")
[ "$(printf '%s\n' "$out" | tail -1)" = "HTTP 200" ] || fail "demo request: $out"
kill -INT "$demo_pid"
wait "$demo_pid" || fail "the demo exited with $? after SIGINT"
demo_pid=
echo "demo: the portable binary served its first curl line with 200"

# ---- a test identity: a mesh root and meshgate's leaf (spiffe://cluster.local/ns/meshgate/sa/meshgate) ----
id="$work/identity"
mkdir -p "$id"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /O=cluster.local \
  -keyout "$id/root.key" -out "$id/root-cert.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj / -keyout "$id/key.pem" -out "$id/leaf.csr" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:spiffe://cluster.local/ns/meshgate/sa/meshgate\n' >"$id/leaf.ext"
openssl x509 -req -in "$id/leaf.csr" -CA "$id/root-cert.pem" -CAkey "$id/root.key" -CAcreateserial -days 1 \
  -extfile "$id/leaf.ext" -out "$id/cert-chain.pem" 2>/dev/null
install_identity() { install -m 0644 "$id/cert-chain.pem" "$id/root-cert.pem" "$1/" && install -m 0600 "$id/key.pem" "$1/"; }

# ---- the Debian package, installed into a scratch root ----
deb="dist/meshgate_${version}_amd64.deb"
r="$work/root"
mkdir -p "$r/etc" "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates"
: >"$r/var/lib/dpkg/status"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
printf 'root:x:0:\n' >"$r/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$r/etc/shadow"
printf 'root:*::\n' >"$r/etc/gshadow"
dpkg --root="$r" --force-script-chrootless --force-depends -i "$deb" >"$work/dpkg.log" 2>&1 ||
  fail "dpkg -i into a scratch root: $(cat "$work/dpkg.log")"
dpkg --root="$r" -s meshgate | grep -q '^Status: install ok installed' || fail "not installed: $(dpkg --root="$r" -s meshgate)"
dpkg --root="$r" -s meshgate | grep -q '/etc/meshgate/meshgate.yaml' || fail "meshgate.yaml is not a conffile"
grep -q '^meshgate:x:[0-9]*:[0-9]*:.*:/nonexistent:/usr/sbin/nologin$' "$r/etc/passwd" || fail "no meshgate system user: $(cat "$r/etc/passwd")"
gid=$(awk -F: '$1 == "meshgate" { print $3 }' "$r/etc/group")
[ "$(stat -c %g:%a "$r/etc/meshgate/meshgate.yaml")" = "$gid:640" ] || fail "config ownership: $(stat -c %U:%G:%a "$r/etc/meshgate/meshgate.yaml")"
unit="$r/lib/systemd/system/meshgate.service"
# verify resolves the units it depends on and the commands it runs inside the root: give the
# scratch root this machine's systemd units and kill(1), as a real system has them.
mkdir -p "$r/usr/lib/systemd/system" "$r/bin"
cp -a /usr/lib/systemd/system/. "$r/usr/lib/systemd/system/"
install -m 0755 /bin/kill "$r/bin/kill"
systemd-analyze verify --root="$r" /lib/systemd/system/meshgate.service >"$work/verify.log" 2>&1 ||
  fail "systemd-analyze verify: $(cat "$work/verify.log")"
systemd-analyze security --offline=true --root="$r" meshgate.service >"$work/security.log" 2>&1 ||
  fail "systemd-analyze security: $(cat "$work/security.log")"
echo "unit: $(grep -o 'Overall exposure level for meshgate.service: .*' "$work/security.log")"
grep -q '^ExecReload=/bin/kill -HUP \$MAINPID$' "$unit" || fail "no SIGHUP reload in the unit"
install_identity "$r/etc/meshgate/identity"
"$r/usr/bin/meshgate" check -c "$r/etc/meshgate/meshgate.yaml" >"$work/check.log" 2>&1 ||
  fail "meshgate check on the shipped config: $(cat "$work/check.log")"
echo "deb: $(du -k "$deb" | cut -f1) KiB, installs, its config checks"

# ---- the OCI image ----
oci="dist/oci:$version"
umoci stat --image "$oci" >"$work/stat.log" || fail "umoci stat"
skopeo inspect --config "oci:$oci" >"$work/config.json" || fail "skopeo inspect"
python3 - "$work/config.json" "$version" "$rev" <<'EOF' || fail "image config"
import json, sys
c = json.load(open(sys.argv[1]))["config"]
assert c["User"] == "65532:65532", c["User"]
assert c["Entrypoint"] + c["Cmd"] == ["/usr/bin/meshgate", "run", "-c", "/etc/meshgate/meshgate.yaml"], c
labels = c["Labels"]
assert labels["org.opencontainers.image.version"] == sys.argv[2], labels
assert labels["org.opencontainers.image.revision"] == sys.argv[3], labels
assert labels["org.opencontainers.image.source"], labels
EOF
skopeo inspect "docker-archive:dist/meshgate-$version.docker.tar" >/dev/null || fail "the docker-load tarball does not read"
b="$work/bundle"
umoci unpack --rootless --image "$oci" "$b" >/dev/null
(cd "$b/rootfs" && find . \( -type f -o -type l \) | sort) >"$work/files"
want="$work/want"
{
  echo ./etc/group
  echo ./etc/meshgate/meshgate.yaml
  echo ./etc/passwd
  echo ./usr/bin/meshgate
  for lib in $(ldd dist/meshgate | grep -o '/[^ ]*'); do echo ".$lib"; done
} | sort >"$want"
diff -u "$want" "$work/files" >"$work/files.diff" || fail "image rootfs holds other files: $(cat "$work/files.diff")"
chroot "$b/rootfs" /usr/bin/meshgate --version | grep -q "git $rev" || fail "meshgate --version inside the image"
# A config and identity mounted at /etc/meshgate, as `docker run -v` would.
install_identity "$b/rootfs/etc/meshgate/identity"
chroot "$b/rootfs" /usr/bin/meshgate check -c /etc/meshgate/meshgate.yaml >"$work/check.log" 2>&1 ||
  fail "meshgate check inside the image: $(cat "$work/check.log")"
echo "image: $(du -k "dist/meshgate-$version.docker.tar" | cut -f1) KiB docker tarball; manifest, config, rootfs and binary check out"
echo "release check passed"

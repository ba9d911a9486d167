#!/usr/bin/env bash
# Release artifacts into dist/, from a fresh Debian machine with the Rust toolchain:
#   meshgate, meshgate-autoscaler   portable x86_64 Linux binaries (glibc 2.17 or newer), stripped
#   *.debug                         their debug info (objcopy --only-keep-debug, linked back by
#                                   .gnu_debuglink)
#   meshgate_VERSION_amd64.deb      the binary, a `meshgate` system user, /etc/meshgate/meshgate.yaml
#                                   (conffile) and a hardened systemd unit
#   oci/                            an OCI image layout (tag VERSION): the binary, a non-root user,
#                                   the example config; entrypoint `meshgate run -c
#                                   /etc/meshgate/meshgate.yaml`
#   meshgate-VERSION.docker.tar     the same image for `docker load`
#   SHA256SUMS                      of all of the above (the layout's files excepted)
# Installs what it needs when missing: zig and cargo-zigbuild (PyPI `ziglang`, `cargo-zigbuild`,
# in a cached venv) for the glibc 2.17 link, umoci and skopeo (apt) for the image. Then checks the
# artifacts (scripts/release-check.sh). Fails, never skips, when a tool cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-gnu
GLIBC=2.17
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
rev=$(git rev-parse --short=12 HEAD)
export MESHGATE_GIT_REV="$rev"
started=$(date +%s)

need_apt=()
for t in umoci skopeo; do command -v "$t" >/dev/null 2>&1 || need_apt+=("$t"); done
command -v objcopy >/dev/null 2>&1 || need_apt+=(binutils)
command -v dpkg-deb >/dev/null 2>&1 || need_apt+=(dpkg)
[ -x /bin/kill ] || need_apt+=(procps)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
source scripts/tools.sh
apt_install "${need_apt[@]}"
# zig (the linker that targets glibc 2.17) and cargo-zigbuild, both from PyPI, in a cached venv.
cached_venv release-venv 'ziglang==0.17.*' 'cargo-zigbuild==0.24.*'
export PATH="$PWD/target/release-venv/bin:$PATH"
# cargo-zigbuild runs `zig`; PyPI's ziglang provides it as `python -m ziglang`.
mkdir -p target/zig-bin
printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$PWD/target/release-venv/bin/python3" >target/zig-bin/zig
chmod +x target/zig-bin/zig
export PATH="$PWD/target/zig-bin:$PATH"
cargo-zigbuild --version >/dev/null
zig version >/dev/null

cargo zigbuild --release --locked --target "$TARGET.$GLIBC" -p meshgate -p meshgate-autoscaler --bins
built="target/$TARGET/release"

rm -rf dist
mkdir -p dist
for b in meshgate meshgate-autoscaler; do
  objcopy --only-keep-debug "$built/$b" "dist/$b.debug"
  objcopy --strip-all "$built/$b" "dist/$b"
  # Run in dist/ so the link names the file beside the binary.
  (cd dist && objcopy --add-gnu-debuglink="$b.debug" "$b")
  chmod 0755 "dist/$b"
done

# ---- Debian package ----
deb="dist/meshgate_${version}_amd64.deb"
pkg=target/release-deb
rm -rf "$pkg"
install -D -m 0755 dist/meshgate "$pkg/usr/bin/meshgate"
install -D -m 0640 packaging/meshgate.yaml "$pkg/etc/meshgate/meshgate.yaml"
install -d -m 0750 "$pkg/etc/meshgate/identity"
install -D -m 0644 packaging/meshgate.service "$pkg/lib/systemd/system/meshgate.service"
install -D -m 0644 docs/release.md "$pkg/usr/share/doc/meshgate/release.md"
install -D -m 0644 docs/config.md "$pkg/usr/share/doc/meshgate/config.md"
install -d "$pkg/DEBIAN"
install -m 0755 packaging/postinst packaging/prerm packaging/postrm "$pkg/DEBIAN/"
echo /etc/meshgate/meshgate.yaml >"$pkg/DEBIAN/conffiles"
cat >"$pkg/DEBIAN/control" <<EOF
Package: meshgate
Version: $version
Architecture: amd64
Maintainer: meshgate developers <meshgate@example.invalid>
Depends: libc6 (>= $GLIBC), adduser | passwd
Section: net
Priority: optional
Installed-Size: $(du -sk "$pkg" --exclude=DEBIAN | cut -f1)
Homepage: https://example.invalid/meshgate
Description: VMs to Istio mesh services over mTLS, without onboarding them
 A forwarding proxy for machines outside an Istio mesh: plain HTTP, h2c, HTTP/3, CONNECT and
 TCP in; tenants by source subnet or API key; mTLS with a mesh workload certificate through
 the east-west gateway out. Built from git revision $rev.
EOF
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null

# ---- OCI image (no container daemon) ----
oci=dist/oci
root=target/release-oci-bundle
rm -rf "$oci" "$root"
umoci init --layout "$oci"
umoci new --image "$oci:$version"
umoci unpack --rootless --image "$oci:$version" "$root"
rootfs="$root/rootfs"
install -D -m 0755 dist/meshgate "$rootfs/usr/bin/meshgate"
install -D -m 0644 packaging/meshgate.yaml "$rootfs/etc/meshgate/meshgate.yaml"
install -d -m 0755 "$rootfs/etc/meshgate/identity" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nmeshgate:x:65532:65532:meshgate:/nonexistent:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nmeshgate:x:65532:\n' >"$rootfs/etc/group"
# The binary's dynamic loader and libraries (glibc, libgcc_s), copied from this machine: the
# binary needs glibc >= 2.17, and the image carries its own.
for lib in $(ldd dist/meshgate | grep -o '/[^ ]*'); do
  install -D -m 0755 "$lib" "$rootfs$lib"
done
umoci repack --image "$oci:$version" "$root"
umoci config --image "$oci:$version" \
  --config.user 65532:65532 \
  --config.workingdir / \
  --config.entrypoint /usr/bin/meshgate \
  --config.cmd run --config.cmd -c --config.cmd /etc/meshgate/meshgate.yaml \
  --config.exposedports 8080/tcp \
  --config.label "org.opencontainers.image.title=meshgate" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.revision=$rev" \
  --config.label "org.opencontainers.image.source=https://example.invalid/meshgate" \
  --config.label "org.opencontainers.image.licenses=Apache-2.0" \
  --history.created_by "scripts/release.sh $version ($rev)"
umoci gc --layout "$oci"
skopeo copy --quiet "oci:$oci:$version" "docker-archive:dist/meshgate-$version.docker.tar:meshgate:$version"

(cd dist && sha256sum meshgate meshgate.debug meshgate-autoscaler meshgate-autoscaler.debug \
  "meshgate_${version}_amd64.deb" "meshgate-$version.docker.tar" >SHA256SUMS)

echo "built dist/ in $(($(date +%s) - started)) s (git $rev):"
(cd dist && ls -l --block-size=K meshgate meshgate.debug meshgate-autoscaler meshgate-autoscaler.debug ./*.deb ./*.tar SHA256SUMS)
bash scripts/release-check.sh

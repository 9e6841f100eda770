#!/usr/bin/env bash
# Make this machine ready for BAI Hub: Docker engine, Python env, proxy, kernel images.
# Idempotent: a second run installs and rebuilds nothing that is already there.
#   scripts/setup.sh          hub only
#   scripts/setup.sh --test   also what the test suite needs (chromium, postgresql)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

say() { printf '\033[1m[bai-setup]\033[0m %s\n' "$*"; }
need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ $WITH_TEST = 1 ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Docker engine: start one when none answers.
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"
  mkdir -p /var/log
  (setsid dockerd >/var/log/bai-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /var/log/bai-dockerd.log" >&2; exit 1; }
fi

# Python environment.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.bai-installed
want=$(cat setup.cfg pyproject.toml extensions/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)-$WITH_TEST
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  say "installing BAI Hub into .venv"
  extras=""
  [ $WITH_TEST = 1 ] && extras="[test]"
  # pip >= 24.1 prints download progress for bai-images (--progress-bar raw)
  .venv/bin/pip install -q "pip>=24.1" -e ".$extras" -e ./extensions
  echo "$want" > $stamp
fi

# configurable-http-proxy, local to the checkout.
if [ ! -x .venv/node/node_modules/.bin/configurable-http-proxy ]; then
  say "installing configurable-http-proxy"
  npm install -s --prefix .venv/node configurable-http-proxy >/dev/null
fi
ln -sf ../node/node_modules/.bin/configurable-http-proxy .venv/bin/configurable-http-proxy

# Full MLflow in its own venv, as in the kernel images, for the session-app tests.
if [ $WITH_TEST = 1 ] && [ ! -x .venv/mlflow/bin/mlflow ]; then
  say "installing MLflow for the session-app tests"
  python3 -m venv .venv/mlflow
  .venv/mlflow/bin/pip install -q "mlflow==3.17.2"
fi

# Kernel images (cached: unchanged recipes are not rebuilt).
say "building kernel images (cached)"
.venv/bin/bai-images build

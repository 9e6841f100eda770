#!/bin/sh
# Full MLflow (the UI server) in its own venv, as in the kernel images
# (/opt/bai/mlflow); tests/test_session_apps.py finds it at /tmp/bai-mlflow.
set -e
DEST="${1:-/tmp/bai-mlflow}"
[ -x "$DEST/bin/mlflow" ] && exit 0
python3 -m venv "$DEST"
"$DEST/bin/pip" install -q mlflow

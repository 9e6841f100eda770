"""MLflow's own page, with the session's UI defaults (``open/mlflow-defaults.js``) run first.

The ``mlflow`` proxy entry's ``rewrite_response`` (jupyter-server-proxy): MLflow's index.html gets
the script inline at the top of its ``<head>``, before MLflow's bundle reads its settings. So
every way into the UI (the launcher, a run link printed in a notebook, a typed address) opens
on the view that lists training runs, unless the user chose another.
"""
from __future__ import annotations

from pathlib import Path

SCRIPT = (Path(__file__).resolve().parent / "open" / "mlflow-defaults.js").read_bytes()
HEAD = b"<head>"


def add_ui_defaults(response) -> None:
    """Put the defaults script first in an HTML page from MLflow (others are left alone)."""
    if response.code != 200 or not response.headers.get("Content-Type", "").startswith("text/html"):
        return
    if HEAD in response.body:
        response.body = response.body.replace(HEAD, HEAD + b"<script>" + SCRIPT + b"</script>", 1)

"""BAI Hub in-session apps: MLflow UI and a full-window terminal.

Registered with jupyter-server-proxy through ``jupyter_serverproxy_servers``
entry points (``mlflow``, ``terminal``), plus a Jupyter server extension that
exports ``MLFLOW_TRACKING_URI``/``MLFLOW_TRACKING_TOKEN`` to kernels and
terminals so that code in the session logs to the same store the UI shows.
"""

from __future__ import annotations

import os
import shutil
import sys

from . import config, readiness
from .config import session_env  # noqa: F401  (for spawners)

__version__ = "0.1.0"

HERE = os.path.dirname(os.path.abspath(__file__))
ICONS = os.path.join(HERE, "icons")


def setup_mlflow() -> dict:
    """``jupyter_serverproxy_servers`` entry point ``mlflow``."""
    from .mlflow_page import add_ui_defaults

    return config.mlflow_proxy_config(
        sys.executable, os.path.join(ICONS, "mlflow.svg"), dict(os.environ), rewrite_response=add_ui_defaults
    )


def setup_terminal() -> dict:
    """``jupyter_serverproxy_servers`` entry point ``terminal``."""
    environ = dict(os.environ)
    ttyd = None
    if environ.get(config.TERMINAL_BACKEND_ENV) == "ttyd":
        ttyd = environ.get(config.TTYD_BIN_ENV) or shutil.which("ttyd")
    return config.terminal_proxy_config(
        sys.executable, os.path.join(ICONS, "terminal.svg"), environ, ttyd_bin=ttyd
    )


# --- Jupyter server extension: export the tracking URI to kernels -----------

def _jupyter_server_extension_points():
    return [{"module": "bai_session_apps"}]


def _server_token(serverapp) -> str | None:
    token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if token:
        return token
    idp = getattr(serverapp, "identity_provider", None)
    token = getattr(idp, "token", None) or getattr(serverapp, "token", None)
    return token or None


def _export_tracking_env(serverapp) -> dict:
    if os.environ.get("BAI_MLFLOW_EXPORT_ENV", "1") == "0":
        return {}
    scheme = "https" if getattr(serverapp, "certfile", None) else "http"
    public = next((os.environ[k] for k in config.PUBLIC_URL_ENVS if os.environ.get(k)), None)
    env = session_env(
        serverapp.base_url, serverapp.port, _server_token(serverapp),
        ip=serverapp.ip or "", scheme=scheme, public_url=public,
    )
    exported = {}
    for key, value in env.items():
        # values set by the spawner, the image or the user win
        if key not in os.environ or os.environ.get("_BAI_MLFLOW_EXPORTED_" + key) == "1":
            os.environ[key] = value
            os.environ["_BAI_MLFLOW_EXPORTED_" + key] = "1"
            exported[key] = value
    return exported


def _load_jupyter_server_extension(serverapp):
    # jupyter-server-proxy's readiness backoff doubles without limit: cap it
    # for our apps so MLflow's first page is not delayed up to 2x (readiness.py)
    if not readiness.patch():
        serverapp.log.warning("bai_session_apps: could not cap the readiness backoff")
    from . import pages  # jupyter_server: only in the server (the apps' processes import this package too)

    pages.add_pages(serverapp)
    exported = _export_tracking_env(serverapp)
    if exported:
        serverapp.log.info(
            "bai_session_apps: MLFLOW_TRACKING_URI=%s", exported.get("MLFLOW_TRACKING_URI")
        )
    # The port is final once the server has bound (port_retries may move it):
    # refresh after start, before any kernel is launched.
    try:
        serverapp.io_loop.add_callback(_export_tracking_env, serverapp)
    except Exception:  # io_loop not there yet on some versions
        pass


# older name, still looked up by jupyter_server
load_jupyter_server_extension = _load_jupyter_server_extension

"""Pure functions that build the jupyter-server-proxy server configs.

Nothing here touches the filesystem, the network or the environment except
through explicit arguments, so every function can be tested as a plain
function. The entry points in ``bai_session_apps.__init__`` feed them the real
values (``sys.executable``, ``os.environ``, the icon paths).
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

#: seconds jupyter-server-proxy waits for MLflow to answer HTTP; the first
#: start creates the SQLite schema (alembic migrations), which is slow on a
#: cold volume. Override with BAI_MLFLOW_START_TIMEOUT.
MLFLOW_START_TIMEOUT = 180
TERMINAL_START_TIMEOUT = 30

MLFLOW_PATH = "mlflow"
TERMINAL_PATH = "terminal"
#: pages the server extension serves (folder ``open/``) under the server's URL
OPEN_PATH = "bai-session-apps"
#: where the launcher's "MLflow UI" goes: a page that waits for MLflow, saying so, then opens it
MLFLOW_OPEN_PAGE = OPEN_PATH + "/mlflow.html"
#: the session server's public URL (``<hub's browser address>user/<name>/<server>/``), set by the
#: spawner (``BAI_PUBLIC_URL``) or by JupyterHub when ``c.JupyterHub.public_url`` is set
PUBLIC_URL_ENVS = ("BAI_PUBLIC_URL", "JUPYTERHUB_PUBLIC_URL")

#: where the UI server's MLflow lives in the kernel images (full ``mlflow``,
#: in its own venv so the kernel venv only needs ``mlflow-skinny``).
MLFLOW_BIN_ENV = "BAI_MLFLOW_BIN"
#: per-user store; defaults to ~/mlflow (the persistent home volume).
MLFLOW_DIR_ENV = "BAI_MLFLOW_DIR"
TERMINAL_BACKEND_ENV = "BAI_TERMINAL_BACKEND"
TTYD_BIN_ENV = "BAI_TTYD_BIN"

# Variables a session must not leak into the MLflow *server* process: they
# point clients at the server itself, and MLflow's own server reads some.
_CLIENT_ONLY_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)


def proxied_prefix(base_url: str, name: str) -> str:
    """``/user/ann/`` + ``mlflow`` -> ``/user/ann/mlflow`` (no trailing slash)."""
    base = "/" + base_url.strip("/")
    return posixpath.join(base, name).rstrip("/") if base != "/" else "/" + name


def mlflow_paths(home: str, mlflow_dir: str | None = None) -> dict:
    """Store layout: ``{dir, db, artifacts, backend_store_uri}``."""
    root = mlflow_dir or os.path.join(home, "mlflow")
    db = os.path.join(root, "mlflow.db")
    return {
        "dir": root,
        "db": db,
        "artifacts": os.path.join(root, "artifacts"),
        # sqlite:/// + absolute path -> four slashes
        "backend_store_uri": "sqlite:///" + db,
    }


def parse_version(text: str) -> tuple[int, ...]:
    """``'3.17.2'`` -> ``(3, 17, 2)``; ``'2.22.0rc1'`` -> ``(2, 22, 0)``."""
    parts = []
    for piece in text.strip().split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def mlflow_server_command(
    mlflow_bin: str,
    version: tuple[int, ...],
    port: int | str,
    static_prefix: str,
    paths: dict,
    start_timeout: int = MLFLOW_START_TIMEOUT,
) -> list[str]:
    """The ``mlflow server`` argv for one session.

    Options common to MLflow 2.x and 3.x only; what differs by version:
    - 3.x serves with uvicorn by default, and passing ``--gunicorn-opts``
      would switch it back to gunicorn: nothing extra is passed.
    - 2.x serves with gunicorn, whose default worker timeout (30 s) can kill
      the single worker during a slow first request: raise it.
    Host/CORS checks (MLflow >= 3.5) are configured through the environment
    (see :func:`mlflow_server_env`), which older versions simply ignore.
    """
    cmd = [
        mlflow_bin,
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", paths["backend_store_uri"],
        "--serve-artifacts",
        "--artifacts-destination", paths["artifacts"],
        "--default-artifact-root", "mlflow-artifacts:/",
        "--static-prefix", static_prefix,
    ]
    if version and version[0] < 3:
        cmd += ["--gunicorn-opts", f"--timeout {int(start_timeout)}"]
    return cmd


def mlflow_server_env(environ: dict) -> dict:
    """Full environment for the ``mlflow server`` child process."""
    env = {k: v for k, v in environ.items() if k not in _CLIENT_ONLY_ENV}
    # The server only listens on 127.0.0.1 inside the session and is reached
    # through jupyter-server-proxy, which has already authenticated the
    # request and forwards the browser's Host/Origin unchanged (the hub's
    # public name, unknown here). Accept them; credentials stay off for "*".
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] = environ.get("BAI_MLFLOW_ALLOWED_HOSTS", "*")
    env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] = environ.get(
        "BAI_MLFLOW_CORS_ALLOWED_ORIGINS", "*"
    )
    # The UI is opened from the JupyterLab launcher in a tab of the same origin.
    env.setdefault("MLFLOW_SERVER_X_FRAME_OPTIONS", "SAMEORIGIN")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # MLflow >= 3.5 starts a pool of job workers (huey consumers, GenAI
    # scorers/evaluation) next to the server: ~7 processes and >1.5 GB of RAM
    # per session, not needed for tracking. Off unless the image/user opts in.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def mlflow_proxy_config(
    python: str,
    icon_path: str,
    environ: dict | None = None,
    rewrite_response=None,
) -> dict:
    """jupyter-server-proxy config for the ``mlflow`` entry.

    The process is our launcher (``bai_session_apps.mlflow_launcher``), not
    ``mlflow`` itself: it checks the store, starts ``mlflow server`` and, if
    MLflow cannot start or dies, answers on the port with an error page that
    gives the reason, so the proxy shows it instead of waiting out the timeout.
    ``{port}`` and ``{base_url}`` are filled in by jupyter-server-proxy.
    ``rewrite_response``: applied to MLflow's answers (``mlflow_page.add_ui_defaults``).
    """
    environ = environ or {}
    timeout = int(environ.get("BAI_MLFLOW_START_TIMEOUT", MLFLOW_START_TIMEOUT))
    extra = {"rewrite_response": rewrite_response} if rewrite_response else {}
    return {
        **extra,
        "command": [
            python, "-m", "bai_session_apps.mlflow_launcher",
            "--port", "{port}",
            "--base-url", "{base_url}",
            "--start-timeout", str(timeout),
        ],
        "timeout": timeout,
        # MLflow is told its full prefix (--static-prefix {base_url}mlflow), so
        # the proxy must forward the full path, not strip it.
        "absolute_url": True,
        "new_browser_tab": True,
        "launcher_entry": {
            "enabled": True,
            "title": "MLflow UI",
            "icon_path": icon_path,
            "path_info": MLFLOW_OPEN_PAGE,
        },
    }


def ttyd_command(ttyd_bin: str, port: int | str, base_path: str, shell=("bash", "-l")) -> list[str]:
    """ttyd 1.7 argv (only used with BAI_TERMINAL_BACKEND=ttyd)."""
    return [
        ttyd_bin,
        "--port", str(port),
        "--interface", "127.0.0.1",
        "--base-path", base_path,
        "--writable",
        *shell,
    ]


def terminal_proxy_config(
    python: str,
    icon_path: str,
    environ: dict | None = None,
    ttyd_bin: str | None = None,
) -> dict:
    """jupyter-server-proxy config for the ``terminal`` entry.

    Default backend: ``bai_session_apps.terminal``, a small tornado app on
    terminado (already in every JupyterLab install) with a vendored xterm.js.
    ``BAI_TERMINAL_BACKEND=ttyd`` uses ttyd when ``ttyd_bin`` is given (the
    caller resolved it); without a ttyd binary the built-in one is used.
    """
    environ = environ or {}
    backend = environ.get(TERMINAL_BACKEND_ENV, "builtin")
    if backend == "ttyd" and ttyd_bin:
        command = ttyd_command(ttyd_bin, "{port}", "{base_url}" + TERMINAL_PATH)
        absolute_url = True  # ttyd is told its base path
    else:
        command = [
            python, "-m", "bai_session_apps.terminal",
            "--port", "{port}",
            "--base-url", "{base_url}",
        ]
        absolute_url = False  # relative URLs only; the proxy strips the prefix
    return {
        "command": command,
        "timeout": TERMINAL_START_TIMEOUT,
        "absolute_url": absolute_url,
        "new_browser_tab": True,
        "launcher_entry": {
            "enabled": True,
            "title": "Terminal (full window)",
            "icon_path": icon_path,
            "path_info": TERMINAL_PATH + "/",
        },
    }


def _local_host(ip: str) -> str:
    if ip in ("", "0.0.0.0", "*", "::", "[::]", "localhost") or ip.startswith("127."):
        return "127.0.0.1"
    if ":" in ip and not ip.startswith("["):
        return f"[{ip}]"
    return ip


def reachable_public_url(public_url: str | None, port: int) -> str | None:
    """``public_url`` if code in the session can use it as is: a name the network resolves, or a
    loopback address on the port the session's own server listens on (the spawner makes it so
    when the hub's browser address is on loopback, as in the one-machine demo)."""
    if not public_url:
        return None
    parsed = urlparse(public_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    loopback = parsed.hostname in ("localhost", "::1") or parsed.hostname.startswith("127.")
    default = 443 if parsed.scheme == "https" else 80
    if loopback and (parsed.port or default) != int(port):
        return None
    return public_url


def session_env(
    base_url: str,
    port: int = 8888,
    token: str | None = None,
    ip: str = "0.0.0.0",
    scheme: str = "http",
    public_url: str | None = None,
) -> dict:
    """Environment that lets code in a session reach its MLflow server.

    The tracking URI is the session server's public URL (``public_url``, the
    address users' browsers use: see ``reachable_public_url``) plus ``mlflow``,
    so the run links the MLflow client prints open in the browser; without one,
    the server's own proxy route on the loopback interface. Either way the
    first ``mlflow`` call starts the server on demand and the store is the one
    the UI shows. ``token`` is the server's API token (``JUPYTERHUB_API_TOKEN``
    under the hub, whose default scopes include ``access:servers!server``);
    MLflow sends it as ``Authorization: Bearer <token>``, which jupyter_server
    and the hub's single-user auth both accept.

    The ``bai_session_apps`` server extension sets these at server start, so a
    spawner does not have to; this function is for spawners or tests that want
    to set them explicitly (an explicit value always wins over the extension).
    """
    public = reachable_public_url(public_url, port)
    if public:
        uri = public.rstrip("/") + "/" + MLFLOW_PATH
    else:
        uri = f"{scheme}://{_local_host(ip)}:{int(port)}" + proxied_prefix(base_url, MLFLOW_PATH)
    env = {"MLFLOW_TRACKING_URI": uri}
    if token:
        env["MLFLOW_TRACKING_TOKEN"] = token
    return env

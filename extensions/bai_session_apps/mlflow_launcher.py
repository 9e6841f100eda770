"""Start ``mlflow server`` for jupyter-server-proxy, or explain why it can't.

jupyter-server-proxy only learns that a process is "ready" by getting *any*
HTTP answer on its port; a process that exits is not noticed, the user just
waits for the timeout and gets "could not start mlflow in time". So this
launcher:

1. checks that the store (~/mlflow) is writable and that MLflow is installed,
2. runs ``mlflow server`` in its own process group, echoing its log,
3. if a check fails or MLflow exits (bad store, port taken, crash), listens on
   the same port itself and answers every request with ``503`` and a page that
   gives the reason and the end of MLflow's log. The proxy passes that page to
   the user at once.

SIGTERM/SIGINT (the proxy or the server shutting down) stop MLflow's whole
process group (``mlflow server`` runs uvicorn/gunicorn as a child).
"""

from __future__ import annotations

import argparse
import collections
import html
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import config

LOG_LINES = 40


def log(msg: str) -> None:
    print(f"[bai-mlflow] {msg}", file=sys.stderr, flush=True)


def find_mlflow(environ: dict) -> str | None:
    explicit = environ.get(config.MLFLOW_BIN_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("mlflow", path=environ.get("PATH"))


def mlflow_version(mlflow_bin: str) -> tuple[int, ...]:
    """Version of the MLflow that ``mlflow_bin`` runs, read from its venv's
    metadata (0.1 s) rather than ``mlflow --version`` (imports MLflow, ~4 s)."""
    python = os.path.join(os.path.dirname(mlflow_bin), "python")
    try:  # a console script: its shebang names the interpreter of its venv
        with open(mlflow_bin, "rb") as f:
            first = f.readline(500).decode(errors="replace")
        if first.startswith("#!") and len(first[2:].split()) == 1:
            python = first[2:].strip()
    except OSError:
        pass
    code = (
        "import importlib.metadata as m\n"
        "for d in ('mlflow', 'mlflow-skinny'):\n"
        "    try: print(m.version(d)); break\n"
        "    except Exception: pass\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
        return config.parse_version(out.stdout)
    except (OSError, subprocess.SubprocessError):
        return ()


def check_store(paths: dict) -> str | None:
    """None if the store is usable, else the reason it is not."""
    try:
        os.makedirs(paths["artifacts"], exist_ok=True)
    except OSError as e:
        return f"cannot create the MLflow store {paths['artifacts']}: {e.strerror or e}"
    for d in (paths["dir"], paths["artifacts"]):
        try:
            with tempfile.NamedTemporaryFile(dir=d, prefix=".bai-write-test-"):
                pass
        except OSError as e:
            return f"the MLflow store {d} is not writable: {e.strerror or e}"
    db = paths["db"]
    if os.path.exists(db) and not os.access(db, os.R_OK | os.W_OK):
        return f"the MLflow database {db} is not writable"
    return None


def port_free(port: int) -> str | None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        return f"port {port} on 127.0.0.1 is already in use: {e.strerror or e}"
    finally:
        s.close()
    return None


def watch_parent(on_orphaned, interval: float = 1.0) -> None:
    """Call ``on_orphaned`` once the process that started us is gone."""
    parent = os.getppid()

    def _watch():
        while os.getppid() == parent:
            time.sleep(interval)
        on_orphaned()

    threading.Thread(target=_watch, daemon=True, name="watch-parent").start()


def error_page(reason: str, log_lines: list[str]) -> bytes:
    tail = html.escape("\n".join(log_lines[-LOG_LINES:])) or "(no output)"
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MLflow UI could not start</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}
pre{{background:#f4f4f4;padding:1em;overflow:auto;white-space:pre-wrap}}</style></head>
<body><h1>MLflow UI could not start</h1>
<p id="reason"><strong>Reason:</strong> {html.escape(reason)}</p>
<p>Fix the cause, then restart your server (File &rarr; Hub Control Panel &rarr;
Stop My Server, then start it) to try again.</p>
<h2>MLflow output</h2><pre>{tail}</pre></body></html>
"""
    return body.encode()


class _ErrorPageServer(ThreadingHTTPServer):
    daemon_threads = True
    # never wait for a client's connection when stopping
    block_on_close = False


def serve_error(port: int, reason: str, log_lines: list[str],
                stop_requested: threading.Event | None = None) -> int:
    """Answer every request on ``port`` with the reason, until terminated (a signal, the
    parent gone, or ``stop_requested`` set)."""
    log(f"ERROR: {reason}")
    page = error_page(reason, log_lines)

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a client that sends nothing does not hold a thread for ever

        def _send(self, with_body=True):
            self.send_response(503)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-BAI-MLflow-Error", reason.encode("ascii", "replace").decode()[:300])
            self.end_headers()
            if with_body:
                self.wfile.write(page)

        def do_GET(self):
            self._send()

        do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def do_HEAD(self):
            self._send(with_body=False)

        def log_message(self, fmt, *args):
            pass

    try:
        server = _ErrorPageServer(("127.0.0.1", port), Handler)
    except OSError as e:
        # Someone else holds the port: nothing we can serve on it.
        log(f"cannot serve the error page on port {port}: {e}")
        return 1
    stopping: list = []

    def _term(signum, frame):
        # only append to a list: taking a lock (Event.set) inside a signal handler can
        # deadlock with the interrupted main thread
        stopping.append(signum)

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    watch_parent(lambda: stopping.append("orphaned"))
    # The page is served from a daemon thread and the main thread only watches for the stop:
    # whatever a client does to the listening socket (a connection reset between select and
    # accept leaves a blocking accept waiting), the launcher still exits when told to.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                     daemon=True, name="error-page").start()
    while not stopping and not (stop_requested is not None and stop_requested.is_set()):
        time.sleep(0.2)
    return 1


def run(argv=None, environ=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--base-url", default="/")
    p.add_argument("--start-timeout", type=int, default=config.MLFLOW_START_TIMEOUT)
    args = p.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)

    home = environ.get("HOME") or os.path.expanduser("~")
    paths = config.mlflow_paths(home, environ.get(config.MLFLOW_DIR_ENV))
    prefix = config.proxied_prefix(args.base_url, config.MLFLOW_PATH)

    reason = port_free(args.port)
    if reason:
        log(f"ERROR: {reason}")
        return 1
    reason = check_store(paths)
    if reason:
        return serve_error(args.port, reason, [])
    mlflow_bin = find_mlflow(environ)
    if not mlflow_bin:
        where = environ.get(config.MLFLOW_BIN_ENV) or "mlflow on PATH"
        return serve_error(
            args.port,
            f"MLflow is not installed in this image ({where} not found); "
            f"set {config.MLFLOW_BIN_ENV} to the mlflow executable of a full MLflow install",
            [],
        )

    version = mlflow_version(mlflow_bin)
    cmd = config.mlflow_server_command(
        mlflow_bin, version, args.port, prefix, paths, args.start_timeout
    )
    log(f"MLflow {'.'.join(map(str, version)) or '(unknown version)'}: {' '.join(cmd)}")

    lines: collections.deque[str] = collections.deque(maxlen=400)
    terminated = threading.Event()
    holder: dict = {}

    def _term(signum, frame):
        terminated.set()
        child = holder.get("child")
        if child is not None:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    # before the child exists, so a stop during start-up cannot orphan it
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    # jupyter-server-proxy does not always stop its processes when the Jupyter
    # server dies; don't leave MLflow behind.
    watch_parent(lambda: _term(None, None))
    try:
        child = subprocess.Popen(
            cmd,
            env=config.mlflow_server_env(environ),
            cwd=paths["dir"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors="replace",
        )
    except OSError as e:
        return serve_error(args.port, f"cannot run {mlflow_bin}: {e}", [], terminated)
    holder["child"] = child
    if terminated.is_set():
        _term(None, None)

    for line in child.stdout:
        sys.stderr.write(line)
        lines.append(line.rstrip("\n"))
    rc = child.wait()
    # make sure uvicorn/gunicorn workers are gone and the port is released
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if terminated.is_set():
        return 0

    reason = f"mlflow server exited with status {rc}"
    text = "\n".join(lines)
    if "Address already in use" in text or "address already in use" in text:
        reason += f": port {args.port} is already in use"
    elif "unable to open database file" in text or "readonly database" in text:
        reason += f": the database {paths['db']} cannot be written"
    return serve_error(args.port, reason, list(lines), terminated)


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()

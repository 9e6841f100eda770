"""In-session apps (extensions/, package ``bai-session-apps``).

(a) the jupyter-server-proxy configs, as plain functions;
(b) real servers WITHOUT docker: a real ``jupyter server`` on 127.0.0.1 with a
    temporary HOME, MLflow UI and the terminal reached through
    jupyter-server-proxy exactly as a browser or the MLflow client would.

Needs ``pip install -e extensions`` in the test venv (jupyter-server-proxy
comes with it). The MLflow server itself is a full ``mlflow`` install found at
$BAI_MLFLOW_BIN, /opt/bai/mlflow/bin/mlflow or /tmp/bai-mlflow/bin/mlflow
(``extensions/scripts/make-test-mlflow-venv.sh`` creates the last); the MLflow
tests are skipped, saying so, when none is there.

Through-the-hub tests (real JupyterHub + containers) belong with the ``hub``
and ``docker`` markers; these need neither.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import pids_whose_environ

bai_session_apps = pytest.importorskip(
    "bai_session_apps", reason="run `pip install -e extensions` first"
)
from bai_session_apps import config  # noqa: E402

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bai-test-token-0123456789"
BASE = "/user/ann/"


# --------------------------------------------------------------------------
# (a) plain functions
# --------------------------------------------------------------------------

PATHS = config.mlflow_paths("/home/jovyan")


def test_mlflow_paths_live_in_the_home_volume():
    assert PATHS == {
        "dir": "/home/jovyan/mlflow",
        "db": "/home/jovyan/mlflow/mlflow.db",
        "artifacts": "/home/jovyan/mlflow/artifacts",
        "backend_store_uri": "sqlite:////home/jovyan/mlflow/mlflow.db",
    }
    assert config.mlflow_paths("/x", "/data/ml")["db"] == "/data/ml/mlflow.db"


@pytest.mark.parametrize(
    "base,expected",
    [
        ("/user/ann/", "/user/ann/mlflow"),
        ("/user/ann/gpu-1/", "/user/ann/gpu-1/mlflow"),
        ("/user/ann", "/user/ann/mlflow"),
        ("/", "/mlflow"),
        ("", "/mlflow"),
    ],
)
def test_proxied_prefix(base, expected):
    assert config.proxied_prefix(base, "mlflow") == expected


def test_parse_version():
    assert config.parse_version("3.17.2\n") == (3, 17, 2)
    assert config.parse_version("2.22.0rc1") == (2, 22, 0)
    assert config.parse_version("") == ()


def test_mlflow_command_3x():
    cmd = config.mlflow_server_command(
        "/opt/bai/mlflow/bin/mlflow", (3, 17, 2), 4321, "/user/ann/mlflow", PATHS
    )
    assert cmd[:2] == ["/opt/bai/mlflow/bin/mlflow", "server"]
    assert "--serve-artifacts" in cmd
    cmd_wo_flag = [c for c in cmd if c != "--serve-artifacts"]
    opts = dict(zip(cmd_wo_flag[2::2], cmd_wo_flag[3::2]))
    assert opts == {
        "--host": "127.0.0.1",
        "--port": "4321",
        "--workers": "1",
        "--backend-store-uri": "sqlite:////home/jovyan/mlflow/mlflow.db",
        "--artifacts-destination": "/home/jovyan/mlflow/artifacts",
        "--default-artifact-root": "mlflow-artifacts:/",
        "--static-prefix": "/user/ann/mlflow",
    }
    # 3.x: uvicorn by default; --gunicorn-opts would switch to gunicorn
    assert "--gunicorn-opts" not in cmd


def test_mlflow_command_2x_raises_gunicorn_timeout():
    cmd = config.mlflow_server_command("mlflow", (2, 22, 1), 1, "/p", PATHS, start_timeout=99)
    assert cmd[-2:] == ["--gunicorn-opts", "--timeout 99"]


def test_mlflow_server_env():
    env = config.mlflow_server_env(
        {"PATH": "/bin", "MLFLOW_TRACKING_URI": "http://x", "MLFLOW_TRACKING_TOKEN": "t"}
    )
    assert env["PATH"] == "/bin"
    assert "MLFLOW_TRACKING_URI" not in env and "MLFLOW_TRACKING_TOKEN" not in env
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"] == "*"
    assert env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] == "*"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    narrowed = config.mlflow_server_env(
        {"BAI_MLFLOW_ALLOWED_HOSTS": "hub.example.org", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}
    )
    assert narrowed["MLFLOW_SERVER_ALLOWED_HOSTS"] == "hub.example.org"
    assert narrowed["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_mlflow_proxy_config():
    cfg = config.mlflow_proxy_config("/opt/bai/server/bin/python", "/icons/mlflow.svg", {})
    assert cfg == {
        "command": [
            "/opt/bai/server/bin/python", "-m", "bai_session_apps.mlflow_launcher",
            "--port", "{port}", "--base-url", "{base_url}", "--start-timeout", "180",
        ],
        "timeout": 180,
        "absolute_url": True,
        "new_browser_tab": True,
        "launcher_entry": {
            "enabled": True,
            "title": "MLflow UI",
            "icon_path": "/icons/mlflow.svg",
            "path_info": "bai-session-apps/mlflow.html",  # the page that waits for MLflow, saying so
        },
    }
    assert config.mlflow_proxy_config("p", "i", {"BAI_MLFLOW_START_TIMEOUT": "30"})["timeout"] == 30


def test_terminal_proxy_config_builtin():
    cfg = config.terminal_proxy_config("/py", "/icons/terminal.svg", {})
    assert cfg["command"] == [
        "/py", "-m", "bai_session_apps.terminal", "--port", "{port}", "--base-url", "{base_url}"
    ]
    assert cfg["absolute_url"] is False
    assert cfg["timeout"] == config.TERMINAL_START_TIMEOUT
    assert cfg["launcher_entry"] == {
        "enabled": True,
        "title": "Terminal (full window)",
        "icon_path": "/icons/terminal.svg",
        "path_info": "terminal/",
    }
    # ttyd asked for but not installed: the built-in terminal, not a broken entry
    cfg = config.terminal_proxy_config("/py", "i", {"BAI_TERMINAL_BACKEND": "ttyd"}, ttyd_bin=None)
    assert cfg["command"][1:3] == ["-m", "bai_session_apps.terminal"]


def test_terminal_proxy_config_ttyd():
    cfg = config.terminal_proxy_config(
        "/py", "i", {"BAI_TERMINAL_BACKEND": "ttyd"}, ttyd_bin="/usr/bin/ttyd"
    )
    assert cfg["command"] == [
        "/usr/bin/ttyd", "--port", "{port}", "--interface", "127.0.0.1",
        "--base-path", "{base_url}terminal", "--writable", "bash", "-l",
    ]
    assert cfg["absolute_url"] is True


def test_session_env():
    assert config.session_env("/user/ann/", 8888, "tok") == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:8888/user/ann/mlflow",
        "MLFLOW_TRACKING_TOKEN": "tok",
    }
    assert config.session_env("/user/ann/gpu/", 9000, ip="10.1.2.3") == {
        "MLFLOW_TRACKING_URI": "http://10.1.2.3:9000/user/ann/gpu/mlflow",
    }


def test_session_env_tracks_through_the_address_browsers_use():
    """Issue 14 (3): the run links MLflow prints (its tracking URI + "/#/experiments/...") named
    127.0.0.1:8888 inside the container: connection refused in the user's browser."""
    public = "http://127.0.0.1:8000/user/ann/gpu/"
    # The demo: the hub on this machine's loopback, the session's server on the same port inside.
    assert config.session_env("/user/ann/gpu/", 8000, "tok", public_url=public) == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:8000/user/ann/gpu/mlflow", "MLFLOW_TRACKING_TOKEN": "tok"}
    # A loopback address on another port would be nothing inside the container: the internal route.
    assert config.session_env("/user/ann/gpu/", 8888, public_url=public)["MLFLOW_TRACKING_URI"] == \
        "http://127.0.0.1:8888/user/ann/gpu/mlflow"
    # A public name: through the hub's proxy, like the browser.
    assert config.session_env("/user/ann/", 8888, public_url="https://hub.example.org/user/ann/") == {
        "MLFLOW_TRACKING_URI": "https://hub.example.org/user/ann/mlflow"}
    assert config.reachable_public_url("https://localhost/user/ann/", 443) == "https://localhost/user/ann/"
    assert config.reachable_public_url("ftp://x/", 21) is None and config.reachable_public_url("", 1) is None


def test_mlflow_page_gets_the_ui_defaults_first():
    """Issue 14 (3): MLflow 3 opened on its GenAI view, where a logged training run is not listed;
    a run link printed in a notebook opened there too."""
    from types import SimpleNamespace

    from bai_session_apps.mlflow_page import add_ui_defaults

    page = b'<!doctype html><html lang="en"><head><meta charset="utf-8"/><script defer src="static-files/x.js">'
    response = SimpleNamespace(code=200, headers={"Content-Type": "text/html; charset=utf-8"}, body=page)
    add_ui_defaults(response)
    head = response.body.split(b"<head>", 1)[1]
    assert head.startswith(b"<script>") and b'"mlflow.workflowType_v1": "machine_learning"' in head
    assert head.index(b"mlflow.workflowType_v1") < head.index(b"static-files/x.js")  # before MLflow's bundle
    for other in (SimpleNamespace(code=200, headers={"Content-Type": "application/json"}, body=b'{"<head>": 1}'),
                  SimpleNamespace(code=503, headers={"Content-Type": "text/html"}, body=b"<head>down</head>")):
        before = other.body
        add_ui_defaults(other)
        assert other.body == before


def test_entry_points_are_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="jupyter_serverproxy_servers")}
    assert eps["mlflow"].value == "bai_session_apps:setup_mlflow"
    assert eps["terminal"].value == "bai_session_apps:setup_terminal"
    cfg = eps["mlflow"].load()()
    assert cfg["command"][0] == sys.executable
    assert cfg["rewrite_response"].__name__ == "add_ui_defaults"
    assert os.path.isfile(cfg["launcher_entry"]["icon_path"])
    assert os.path.isfile(eps["terminal"].load()()["launcher_entry"]["icon_path"])


def test_error_page_escapes_reason():
    from bai_session_apps.mlflow_launcher import error_page

    page = error_page("store <b>x</b> not writable", ["line1", "<script>"])
    assert b"store &lt;b&gt;x&lt;/b&gt; not writable" in page
    assert b"&lt;script&gt;" in page and b"<script>" not in page


# --------------------------------------------------------------------------
# (b) real jupyter server + jupyter-server-proxy, no docker
# --------------------------------------------------------------------------

def _find_mlflow() -> str | None:
    for cand in (
        os.environ.get("BAI_MLFLOW_BIN"),
        "/opt/bai/mlflow/bin/mlflow",
        "/tmp/bai-mlflow/bin/mlflow",
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


MLFLOW_BIN = _find_mlflow()
needs_mlflow = pytest.mark.skipif(
    MLFLOW_BIN is None,
    reason="no full MLflow install (set BAI_MLFLOW_BIN or run "
    "extensions/scripts/make-test-mlflow-venv.sh)",
)


def _mlflow_python() -> str:
    first = Path(MLFLOW_BIN).read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``jupyter server`` with the extensions, in its own process group."""

    def __init__(self, home: Path, extra_env: dict | None = None):
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}{BASE}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "JUPYTER"))}
        env.update(
            HOME=str(home),
            JUPYTER_CONFIG_DIR=str(home / ".jupyter"),
            JUPYTER_RUNTIME_DIR=str(home / ".runtime"),
            SHELL="/bin/bash",
        )
        env.pop("BAI_MLFLOW_BIN", None)
        if MLFLOW_BIN:
            env["BAI_MLFLOW_BIN"] = MLFLOW_BIN
        env.update(extra_env or {})
        self.log = open(home / f"jupyter-{self.port}.log", "w")
        cmd = [
            sys.executable, "-m", "jupyter_server",
            "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={TOKEN}", f"--ServerApp.base_url={BASE}",
            # the wheel's etc/jupyter file enables it; editable installs lack it
            "--ServerApp.jpserver_extensions={'bai_session_apps': True}",
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=home, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited: {self.logtext()[-3000:]}")
            try:
                if self.get("api/status").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"jupyter server did not start: {self.logtext()[-3000:]}")

    def get(self, path, auth=True, **kw):
        headers = kw.pop("headers", {})
        if auth:
            headers["Authorization"] = f"token {TOKEN}"
        return requests.get(self.url + path, headers=headers, allow_redirects=False, **kw)

    def logtext(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self):
        # SIGTERM the server; the launcher/terminal follow their parent
        # (watchdog) and take MLflow's process group with them.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


def _procs_of(home: Path) -> list[str]:
    """Processes started for the server with this HOME (launcher, MLflow, shells)."""
    marker = f"HOME={home}".encode()
    found = []
    for pid in pids_whose_environ(lambda env: marker in env):
        try:
            found.append(f"{pid} " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass  # ended meanwhile
    return found


def _wait_mlflow_gone(home: Path, timeout=20):
    """No process may be left behind (or hold the store) after the server stopped."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _procs_of(home):
            return True
        time.sleep(0.5)
    left = _procs_of(home)
    print("left behind:", left)
    for entry in left:  # enough to tell a hang from a slow exit if it ever happens again
        pid = entry.split()[0]
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            print({k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines())
                   if k in ("State", "PPid", "SigBlk", "SigCgt", "Threads")})
            for task in Path(f"/proc/{pid}/task").iterdir():
                print(" task", task.name, (task / "comm").read_text().strip(), (task / "wchan").read_text())
        except OSError as e:
            print(" cannot read", pid, e)
    return False


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def _log_and_list(server: Server, name: str, run_code: str) -> dict:
    """Run the real MLflow client in a fresh process, tracking through the proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{server.port}{BASE}mlflow",
        MLFLOW_TRACKING_TOKEN=TOKEN,  # sent as "Authorization: Bearer <token>"
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        HOME=str(server.home),
    )
    code = f"""
import json, mlflow
mlflow.set_experiment({name!r})
{run_code}
runs = mlflow.search_runs(experiment_names=[{name!r}], output_format="list")
print("RESULT" + json.dumps([
    {{"id": r.info.run_id, "params": r.data.params, "metrics": r.data.metrics,
      "artifact_uri": r.info.artifact_uri}} for r in runs]))
"""
    out = subprocess.run(
        [_mlflow_python(), "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@needs_mlflow
def test_mlflow_ui_and_client_through_the_proxy(home):
    server = Server(home)
    try:
        # launcher entries as JupyterLab's launcher gets them
        info = server.get("server-proxy/servers-info").json()
        entries = {s["name"]: s["launcher_entry"] for s in info["server_processes"]}
        assert entries["mlflow"]["title"] == "MLflow UI"
        assert entries["terminal"]["title"] == "Terminal (full window)"
        icon = server.get("server-proxy/icon/mlflow")
        assert icon.status_code == 200 and b"<svg" in icon.content

        # a request without the token never reaches the app (and does not start it)
        r = server.get("mlflow/", auth=False)
        assert r.status_code in (302, 403), r.status_code
        assert "login" in r.headers.get("Location", "")
        assert server.get("mlflow/", auth=False, headers={"Authorization": "token wrong"}
                          ).status_code in (302, 403)
        assert "[bai-mlflow]" not in server.logtext()  # not even started

        t0 = time.time()
        r = server.get("mlflow/", timeout=240)
        started = time.time() - t0
        print(f"MLflow UI first response after {started:.1f}s")
        assert r.status_code == 200, r.text[:2000]
        assert "<title>MLflow</title>" in r.text
        assert '"mlflow.workflowType_v1": "machine_learning"' in r.text  # the session's UI defaults, first
        assets = re.findall(r'(?:src|href)="\.?/?(static-files/[^"]+\.(?:js|css))"', r.text)
        assert assets, r.text[:2000]
        for asset in assets:
            a = server.get("mlflow/" + asset)
            assert a.status_code == 200, (asset, a.status_code)
            assert len(a.content) > 1000
        # the UI's own API calls go under the same prefix
        r = server.get("mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=10")
        assert r.status_code == 200, r.text[:500]
        # a browser POST carries the hub's Origin; MLflow must accept it
        r = requests.post(
            server.url + "mlflow/ajax-api/2.0/mlflow/experiments/search",
            json={"max_results": 5},
            headers={"Authorization": f"token {TOKEN}", "Origin": "https://hub.example.org"},
        )
        assert r.status_code == 200, r.text[:500]

        runs = _log_and_list(server, "bai-seed", """
with mlflow.start_run(run_name="lr-0.1"):
    mlflow.log_params({"lr": 0.1, "epochs": 3})
    for step, loss in enumerate([0.9, 0.5, 0.3]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.log_text("weights", "model/notes.txt")
""")
        assert len(runs) == 1
        assert runs[0]["params"] == {"lr": "0.1", "epochs": "3"}
        assert runs[0]["metrics"] == {"loss": 0.3}
        run_id = runs[0]["id"]
        # stored in the user's persistent home
        assert (home / "mlflow" / "mlflow.db").is_file()
        stored = list((home / "mlflow" / "artifacts").rglob("notes.txt"))
        assert stored and stored[0].read_text() == "weights"

        # the server extension exported the tracking URI for kernels/terminals
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{server.port}{BASE}mlflow" in server.logtext()
    finally:
        server.stop()
    assert _wait_mlflow_gone(home), "MLflow still running after the server stopped"

    # runs survive a session restart (same home volume, new server, new port)
    server = Server(home)
    try:
        t0 = time.time()
        assert server.get("mlflow/", timeout=240).status_code == 200
        print(f"MLflow UI restart (existing store) after {time.time() - t0:.1f}s")
        runs = _log_and_list(server, "bai-seed", "")
        assert [r["id"] for r in runs] == [run_id]
    finally:
        server.stop()
    assert _wait_mlflow_gone(home)


def test_mlflow_unwritable_store_shows_reason_fast(home, tmp_path):
    # a regular file where the store directory should be (root can write
    # anywhere, so permissions alone would not fail here)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    server = Server(home, {"BAI_MLFLOW_DIR": str(blocker / "mlflow")})
    try:
        t0 = time.time()
        r = server.get("mlflow/", timeout=60)
        assert time.time() - t0 < 60  # not the 180 s start timeout
        assert r.status_code == 503
        assert "MLflow UI could not start" in r.text
        assert "cannot create the MLflow store" in r.text
        assert str(blocker) in r.text
        # every path under the prefix answers the same, including API calls
        assert server.get("mlflow/api/2.0/mlflow/experiments/search").status_code == 503
    finally:
        server.stop()
    assert _wait_mlflow_gone(home), "processes left behind after the server stopped"


def test_mlflow_that_exits_shows_its_output(home, tmp_path):
    fake = tmp_path / "mlflow"
    fake.write_text("#!/bin/sh\necho 'sqlite3.OperationalError: boom from fake mlflow' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = Server(home, {"BAI_MLFLOW_BIN": str(fake)})
    try:
        t0 = time.time()
        r = server.get("mlflow/", timeout=60)
        assert time.time() - t0 < 60  # not the 180 s start timeout
        assert r.status_code == 503
        assert "mlflow server exited with status 3" in r.text
        assert "boom from fake mlflow" in r.text
    finally:
        server.stop()
    assert _wait_mlflow_gone(home), "processes left behind after the server stopped"


def test_error_page_launcher_stops_with_an_idle_client_connected(home, tmp_path):
    """A client that connected and sent nothing (a proxy's readiness probe cut short) must not
    keep the error-page launcher alive after SIGTERM (its handler threads are never waited for)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    port = _free_port()
    env = {**os.environ, "HOME": str(home), config.MLFLOW_DIR_ENV: str(blocker / "mlflow")}
    launcher = subprocess.Popen([sys.executable, "-m", "bai_session_apps.mlflow_launcher", "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    idle = None
    try:
        deadline = time.time() + 60
        while True:
            try:
                assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 503
                break
            except requests.ConnectionError:
                assert time.time() < deadline and launcher.poll() is None, "the error page never came up"
                time.sleep(0.2)
        idle = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.5)  # accepted and waiting for a request line
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(15)  # raises TimeoutExpired if the idle client holds it
    finally:
        if idle is not None:
            idle.close()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_mlflow_missing_is_explained(home, tmp_path):
    server = Server(home, {"BAI_MLFLOW_BIN": str(tmp_path / "nope" / "mlflow")})
    try:
        r = server.get("mlflow/", timeout=60)
        assert r.status_code == 503
        assert "MLflow is not installed" in r.text and "BAI_MLFLOW_BIN" in r.text
    finally:
        server.stop()
    assert _wait_mlflow_gone(home), "processes left behind after the server stopped"


def test_terminal_starts_bash_as_a_login_shell_with_shell_set():
    from bai_session_apps import terminal

    bash = shutil.which("bash")
    assert terminal.shell_command({}) == [bash, "-l"]
    assert terminal.shell_command({"SHELL": "/no/such/shell"}) == [bash, "-l"]
    assert terminal.shell_command({"SHELL": "/bin/sh"}) == ["/bin/sh", "-l"]  # a user's own choice stays
    # a server started without $SHELL (containers have none unless the image sets it)
    manager = terminal.make_app({}).term_manager
    assert manager.shell_command == [bash, "-l"] and manager.extra_env["SHELL"] == bash


def test_terminal_through_the_proxy(home):
    websocket = pytest.importorskip("websocket", reason="pip install websocket-client")
    server = Server(home)
    try:
        assert server.get("terminal/", auth=False).status_code in (302, 403)

        page = server.get("terminal/", timeout=60)
        assert page.status_code == 200
        for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
            assert server.get("terminal/" + asset).status_code == 200, asset
        assert server.get("terminal").status_code in (301, 302)  # -> terminal/

        ws_url = f"ws://127.0.0.1:{server.port}{BASE}terminal/websocket"
        with pytest.raises(websocket.WebSocketException):
            websocket.create_connection(ws_url, timeout=10).recv()

        ws = websocket.create_connection(
            ws_url, header=[f"Authorization: token {TOKEN}"], timeout=15
        )
        try:
            ws.send(json.dumps(["set_size", 24, 80]))
            ws.send(json.dumps(["stdin", "echo hello-$((6*7)) in $PWD; echo uri=$MLFLOW_TRACKING_URI\r"]))
            out, deadline = "", time.time() + 20
            while time.time() < deadline and "uri=http" not in out:
                msg = json.loads(ws.recv())
                if msg[0] == "stdout":
                    out += msg[1]
        finally:
            ws.close()
        assert f"hello-42 in {home}" in out, out[-2000:]
        # code in the terminal finds MLflow without setup
        assert f"uri=http://127.0.0.1:{server.port}{BASE}mlflow" in out, out[-2000:]
    finally:
        server.stop()
    assert _wait_mlflow_gone(home), "processes left behind after the server stopped"


def test_the_launchers_mlflow_entry_opens_a_page_that_waits_for_mlflow(home):
    """Issue 14 (3): the first open took about 18 s on a blank tab, and MLflow 3 opened on its GenAI
    view, where a logged training run is not listed. The launcher now opens a page of this
    package (behind the server's login) that says what happens, then opens the runs."""
    server = Server(home)
    try:
        info = server.get("server-proxy/servers-info").json()
        entries = {s["name"]: s["launcher_entry"] for s in info["server_processes"]}
        assert entries["mlflow"]["path_info"] == "bai-session-apps/mlflow.html"
        assert server.get("bai-session-apps/mlflow.html", auth=False).status_code in (302, 403)
        page = server.get("bai-session-apps/mlflow.html")
        assert page.status_code == 200 and "Starting the MLflow UI of this session" in page.text
        script = server.get("bai-session-apps/mlflow.js")
        assert script.status_code == 200
        assert '"../mlflow/"' in script.text
        defaults = server.get("bai-session-apps/mlflow-defaults.js")
        assert defaults.status_code == 200 and '"mlflow.workflowType_v1": "machine_learning"' in defaults.text
        # As a browser opens it from the launcher: the login cookie, and no Referer (jupyter_server's
        # file handler refuses such requests, and the tab stayed on a blank page)
        browser = requests.Session()
        login = browser.get(server.url + "login")
        browser.post(server.url + "login", data={"password": TOKEN, "_xsrf": browser.cookies.get("_xsrf", "")},
                     allow_redirects=False)
        assert login.status_code == 200
        for name in ("mlflow.html", "mlflow.js", "mlflow-defaults.js"):
            r = browser.get(server.url + "bai-session-apps/" + name, allow_redirects=False)
            assert r.status_code == 200, (name, r.status_code)
        assert server.get("bai-session-apps/nothing.html").status_code == 404
        assert "[bai-mlflow]" not in server.logtext()  # the page itself starts nothing
    finally:
        server.stop()

"""In-session apps (MLflow UI, full-window terminal) through a real hub.

Everything goes through configurable-http-proxy and the single-user server's
hub authentication in a real kernel-image container, as a browser or the
MLflow client on a laptop would (tests/test_session_apps.py covers the same
apps against a bare ``jupyter server`` without Docker).

One session (``apps``) is shared by the module and restarted once; a second
user's session (``broken``) has an unwritable MLflow store. Both use 0 fGPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests

from helpers import ARTIFACTS, KERNEL_IMAGE
from helpers.hub import docker
from helpers.session import run_in_kernel

pytestmark = [pytest.mark.docker, pytest.mark.hub]

OPTIONS = {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"}
SERVER = "apps"
MLFLOW_FIRST_START = 90  # s; ~10 s measured, the proxy itself waits up to 180 s


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def exec_in(container, *cmd, user=None) -> subprocess.CompletedProcess:
    return docker("exec", *(["-u", user] if user else []), container["Id"], *cmd)


MLFLOW_PROCS = (
    "import os\n"
    "for p in os.listdir('/proc'):\n"
    "    try: cmd = open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0', b' ').decode()\n"
    "    except Exception: continue\n"
    "    if 'mlflow_launcher' in cmd or 'mlflow server' in cmd or 'mlflow/bin/mlflow' in cmd: print(p, cmd)\n"
)


def mlflow_processes(container) -> str:
    out = exec_in(container, "python3", "-c", MLFLOW_PROCS)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class Session:
    """A user's running server, reached through the hub's proxy."""

    def __init__(self, hub, user, token, server):
        self.hub, self.user, self.token, self.server = hub, user, token, server
        self.prefix = f"/user/{user}/{server}/"
        self.url = hub.url + self.prefix

    def get(self, path, token="own", **kw):
        headers = kw.pop("headers", {})
        tok = self.token if token == "own" else token
        if tok:
            headers["Authorization"] = f"token {tok}"
        kw.setdefault("timeout", 30)
        return requests.get(self.url + path, headers=headers, allow_redirects=False, **kw)

    def container(self):
        return self.hub.session_container(self.user, self.server, running_only=True)

    def start(self):
        r = self.hub.start_server(self.user, self.server, OPTIONS)
        assert r.status_code in (201, 202), r.text

    def wait(self):
        self.hub.wait_ready(self.user, self.server, timeout=120)

    def stop(self):
        if self.server in self.hub.servers(self.user):
            self.hub.stop_server(self.user, self.server)
            self.hub.wait_gone(self.user, self.server, timeout=90)


def save_logs(session: Session, name: str):
    c = session.container()
    if c:
        out = docker("logs", c["Id"])
        (ARTIFACTS / f"{name}.log").write_text(out.stdout + out.stderr)


@pytest.fixture(scope="module")
def sessions(hub):
    """User A's ``apps`` session and user C's ``broken`` session, started together."""
    tag = uuid.uuid4().hex[:4]
    made = {}
    for key, server in (("apps", SERVER), ("broken", "broken")):
        name = f"sapp{key[:3]}{tag}"
        made[key] = Session(hub, name, hub.add_user(name), server)
    try:
        for s in made.values():
            s.start()
        for s in made.values():
            s.wait()
        yield made
    finally:
        for key, s in made.items():
            save_logs(s, f"session-apps-{key}")
        for s in made.values():
            if s.server in hub.servers(s.user):
                hub.stop_server(s.user, s.server)
        for s in made.values():
            if s.server in hub.servers(s.user):
                hub.wait_gone(s.user, s.server, timeout=90)


@pytest.fixture(scope="module")
def apps(sessions):
    return sessions["apps"]


@pytest.fixture(scope="module")
def other_token(hub):
    """A second, real user with a valid token for their own servers."""
    name = f"sappother{uuid.uuid4().hex[:4]}"
    return hub.add_user(name)


def wait_mlflow_ui(session: Session, timeout=MLFLOW_FIRST_START) -> requests.Response:
    """First request starts MLflow; the proxy holds it until MLflow answers."""
    deadline = time.time() + timeout
    while True:
        try:
            r = session.get("mlflow/", timeout=timeout)
            if r.status_code == 200 or time.time() > deadline:
                return r
        except requests.RequestException:
            if time.time() > deadline:
                raise
        time.sleep(1)


def proxy_lag(session: Session) -> float:
    """Seconds from MLflow's "Uvicorn running" to the server's first 200 for mlflow/."""
    from datetime import datetime

    logs = docker("logs", session.container()["Id"])
    text = logs.stdout + logs.stderr
    up = re.search(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) INFO:\s+Uvicorn running", text, re.M)
    served = re.search(r"^\[I (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) ServerApp\] 200 GET "
                       + re.escape(session.prefix) + r"mlflow/ ", text, re.M)
    assert up and served, text[-3000:]
    t_up = datetime.strptime(up.group(1), "%Y/%m/%d %H:%M:%S")
    t_served = datetime.strptime(served.group(1), "%Y-%m-%d %H:%M:%S.%f")
    return (t_served - t_up).total_seconds()


# --------------------------------------------------------------------------
# authentication: nothing reaches MLflow without the owner's credentials
# --------------------------------------------------------------------------

def test_requests_without_hub_auth_or_with_another_users_token_never_reach_mlflow(apps, other_token):
    c = apps.container()
    started_before = mlflow_processes(c)
    for path in ("mlflow/", "mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=1",
                 "terminal/"):
        # no credentials at all: sent to the hub's login / OAuth, not to the app
        r = apps.get(path, token=None)
        assert r.status_code in (302, 403), (path, r.status_code)
        if r.status_code == 302:
            assert "/hub/" in r.headers["Location"] or "oauth" in r.headers["Location"], r.headers
        assert "MLflow" not in r.text
        # a bogus token: the same
        r = apps.get(path, token="not-a-real-token-0123456789")
        assert r.status_code in (302, 403), (path, r.status_code)
        # another user's valid token: refused by the single-user server
        r = apps.get(path, token=other_token)
        assert r.status_code in (302, 403, 404), (path, r.status_code)
        assert "<title>MLflow</title>" not in r.text
        # nor as MLflow's own "Bearer" header
        r = apps.get(path, token=None, headers={"Authorization": f"Bearer {other_token}"})
        assert r.status_code in (302, 403, 404), (path, r.status_code)
        # the same with POST (the REST API MLflow clients use)
        r = requests.post(apps.url + "mlflow/api/2.0/mlflow/experiments/create", json={"name": "evil"},
                          headers={"Authorization": f"Bearer {other_token}"}, allow_redirects=False,
                          timeout=30)
        assert r.status_code in (302, 403, 404), r.status_code
    if not started_before:
        # none of those requests started MLflow (or the terminal) in the session
        assert mlflow_processes(c) == ""
        logs = docker("logs", c["Id"])
        assert "[bai-mlflow]" not in logs.stdout + logs.stderr


# --------------------------------------------------------------------------
# MLflow UI, assets, REST API
# --------------------------------------------------------------------------

def test_mlflow_ui_and_its_static_assets_load_through_the_hub_proxy(apps):
    t0 = time.time()
    r = wait_mlflow_ui(apps)
    print(f"MLflow UI through the hub after {time.time() - t0:.1f}s")
    assert r.status_code == 200, r.text[:2000]
    # the proxy noticed at once that MLflow was up (no doubling backoff: readiness.py)
    lag = proxy_lag(apps)
    print(f"first page {lag:.1f}s after uvicorn was up")
    assert lag < 3, lag
    assert "<title>MLflow</title>" in r.text
    assets = re.findall(r'(?:src|href)="\.?/?(static-files/[^"]+\.(?:js|css))"', r.text)
    assert any(a.endswith(".js") for a in assets), r.text[:2000]
    assert any(a.endswith(".css") for a in assets), r.text[:2000]
    for asset in assets:
        a = apps.get("mlflow/" + asset)
        assert a.status_code == 200, (asset, a.status_code)
        assert len(a.content) > 1000, asset
        kind = "javascript" if asset.endswith(".js") else "css"
        assert kind in a.headers.get("Content-Type", ""), (asset, a.headers.get("Content-Type"))
    # the UI's API calls, under the same prefix, as the page's JS makes them
    r = apps.get("mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=10")
    assert r.status_code == 200, r.text[:500]
    assert "experiments" in r.json()
    r = requests.post(apps.url + "mlflow/ajax-api/2.0/mlflow/experiments/search", json={"max_results": 5},
                      headers={"Authorization": f"token {apps.token}", "Origin": apps.hub.url}, timeout=30)
    assert r.status_code == 200, r.text[:500]
    # MLflow runs inside the container, on loopback only
    procs = mlflow_processes(apps.container())
    assert "--host 127.0.0.1" in procs, procs
    assert f"--static-prefix {apps.prefix}mlflow" in procs, procs


# --------------------------------------------------------------------------
# the real MLflow client: on the host through the hub, and in the session
# --------------------------------------------------------------------------

def host_client(session: Session, experiment: str, run_code: str) -> list[dict]:
    """The real MLflow client (this venv's mlflow-skinny) in a fresh process."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pytest.fail("mlflow-skinny is missing from the test venv: scripts/setup.sh --test installs .[test]")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=f"{session.hub.url}/user/{session.user}/{session.server}/mlflow",
        MLFLOW_TRACKING_TOKEN=session.token,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    code = f"""
import json, mlflow
mlflow.set_experiment({experiment!r})
{run_code}
runs = mlflow.search_runs(experiment_names=[{experiment!r}], output_format="list")
print("RESULT" + json.dumps([
    {{"id": r.info.run_id, "name": r.info.run_name, "params": r.data.params,
      "metrics": r.data.metrics, "artifact_uri": r.info.artifact_uri}} for r in runs]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


SEED_CELL = """
import json, os, mlflow
print("URI=" + os.environ.get("MLFLOW_TRACKING_URI", ""))
print("TOKEN_SET=" + str(bool(os.environ.get("MLFLOW_TRACKING_TOKEN"))))
mlflow.set_experiment("bai-hub-seed")
with mlflow.start_run(run_name="in-session"):
    mlflow.log_params({"lr": 0.01, "where": "kernel"})
    for step, loss in enumerate([0.8, 0.4, 0.2]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.log_text("from the kernel", "notes/kernel.txt")
runs = mlflow.search_runs(experiment_names=["bai-hub-seed"], output_format="list")
print("RUNS=" + json.dumps(sorted(r.info.run_name for r in runs)))
"""


def test_mlflow_client_logs_runs_from_the_host_and_from_the_session_and_they_survive_a_restart(apps):
    assert wait_mlflow_ui(apps).status_code == 200

    # 1. on the host, through the hub proxy with the user's token
    runs = host_client(apps, "bai-hub-seed", """
with mlflow.start_run(run_name="from-host"):
    mlflow.log_params({"lr": 0.1, "epochs": 3})
    for step, loss in enumerate([0.9, 0.5, 0.3]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.log_text("weights", "model/notes.txt")
""")
    assert [r["name"] for r in runs] == ["from-host"]
    assert runs[0]["params"] == {"lr": "0.1", "epochs": "3"}
    assert runs[0]["metrics"] == {"loss": 0.3}
    assert runs[0]["artifact_uri"].startswith("mlflow-artifacts:/")

    # 2. in a kernel of the session, with no setup: the server extension's env
    out = run_in_kernel(apps, SEED_CELL)
    # the address the user's browser uses (issue 14: 127.0.0.1:8888 was the container's own)
    assert f"URI={apps.url}mlflow" in out, out
    assert "TOKEN_SET=True" in out, out
    assert 'RUNS=["from-host", "in-session"]' in out, out

    # both stored in the user's persistent home, artifacts included
    c = apps.container()
    store = exec_in(c, "sh", "-c", "ls -l /home/jovyan/mlflow && cat $(find /home/jovyan/mlflow/artifacts "
                                   "-name notes.txt -o -name kernel.txt | sort)")
    assert store.returncode == 0, store.stderr
    assert "mlflow.db" in store.stdout
    assert "from the kernel" in store.stdout and "weights" in store.stdout, store.stdout

    # 3. the session restarts (new container, same home volume): runs are still there
    old_id = c["Id"]
    apps.stop()
    apps.start()
    apps.wait()
    assert apps.container()["Id"] != old_id
    t0 = time.time()
    assert wait_mlflow_ui(apps).status_code == 200
    print(f"MLflow UI after restart (existing store) in {time.time() - t0:.1f}s")
    runs = host_client(apps, "bai-hub-seed", "")
    by_name = {r["name"]: r for r in runs}
    assert sorted(by_name) == ["from-host", "in-session"]
    assert by_name["in-session"]["params"] == {"lr": "0.01", "where": "kernel"}
    assert by_name["in-session"]["metrics"] == {"loss": 0.2}


# --------------------------------------------------------------------------
# terminal
# --------------------------------------------------------------------------

def test_terminal_websocket_through_the_hub_runs_a_command(apps, other_token):
    import websocket

    page = apps.get("terminal/", timeout=60)
    assert page.status_code == 200, page.text[:1000]
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert assets, page.text[:1000]
    for asset in assets:
        assert apps.get("terminal/" + asset).status_code == 200, asset

    ws_url = apps.url.replace("http://", "ws://") + "terminal/websocket"
    for header in ([], [f"Authorization: token {other_token}"]):
        with pytest.raises(websocket.WebSocketException):
            websocket.create_connection(ws_url, header=header, timeout=10).recv()

    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {apps.token}"], timeout=20)
    try:
        ws.send(json.dumps(["set_size", 24, 80]))
        # the markers only appear once the shell has run the line (not in its echo)
        ws.send(json.dumps(["stdin", "echo hello-$((6*7)) as $(id -un) in $PWD; "
                                     "echo uri=$MLFLOW_TRACKING_URI; echo done-$((1+1))\r"]))
        out, deadline = "", time.time() + 30
        while time.time() < deadline and "done-2" not in out:
            msg = json.loads(ws.recv())
            if msg[0] == "stdout":
                out += msg[1]
    finally:
        ws.close()
    assert "hello-42 as jovyan in /home/jovyan" in out, out[-2000:]
    assert f"uri={apps.url}mlflow\r\n" in out, out[-2000:]


# --------------------------------------------------------------------------
# MLflow that cannot start
# --------------------------------------------------------------------------

def test_mlflow_with_an_unwritable_store_shows_the_reason_quickly(sessions):
    broken = sessions["broken"]
    c = broken.container()
    # before MLflow is first opened: the store exists but jovyan can't use it (its owner may
    # still chmod it; the session has no capability that would let root bypass the mode)
    out = exec_in(c, "sh", "-c", "mkdir -p /home/jovyan/mlflow && chmod 000 /home/jovyan/mlflow")
    assert out.returncode == 0, out.stderr
    try:
        t0 = time.time()
        r = broken.get("mlflow/", timeout=60)
        took = time.time() - t0
        print(f"MLflow error page after {took:.1f}s")
        assert took < 60, took  # not MLflow's start timeout
        assert r.status_code == 503, (r.status_code, r.text[:1000])
        assert "MLflow UI could not start" in r.text
        assert "/home/jovyan/mlflow" in r.text and "Permission denied" in r.text, r.text
        assert "Permission denied" in r.headers.get("X-BAI-MLflow-Error", "")
        # the API answers the same (so the client fails fast, too)
        t0 = time.time()
        r = broken.get("mlflow/api/2.0/mlflow/experiments/search?max_results=1")
        assert r.status_code == 503 and time.time() - t0 < 60
        # the session itself is fine
        assert broken.get("api/status").status_code == 200
    finally:
        exec_in(c, "chmod", "755", "/home/jovyan/mlflow")


# --------------------------------------------------------------------------
# the apps above run in a hardened session
# --------------------------------------------------------------------------

def test_the_apps_run_in_a_hardened_session(apps):
    """The kernel, terminal and MLflow tests of this module ran under the default hardening."""
    host = apps.container()["HostConfig"]
    assert host["PidsLimit"] == 4096 and host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert "no-new-privileges:true" in host["SecurityOpt"] and host["Init"] is True
    status = exec_in(apps.container(), "cat", "/proc/self/status").stdout
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status

"""A real JupyterHub (with configurable-http-proxy, the bai-scheduler service
and the local Docker engine) run as a subprocess for the tests.

Everything it makes is named with a per-run prefix under ``bai-test-`` so that
``cleanup_docker`` removes exactly that.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from contextlib import contextmanager

import requests

from bai_spawner import pipconf

from . import ARTIFACTS, ROOT, pids_whose_environ

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, which
# this machine's closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CONFIG = ROOT / "hub_config" / "jupyterhub_config.py"
TEST_CONFIG = Path(__file__).resolve().parent / "hub_config.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def login(url: str, name: str, password: str) -> requests.Session:
    """A browser-like session logged in through the login form of the hub at ``url``; it also
    sends the xsrf token, which the hub's API wants with a cookie login."""
    s = requests.Session()
    r = s.get(f"{url}/hub/login", timeout=30)
    assert r.status_code == 200, r.text[:300]
    xsrf = s.cookies.get("_xsrf")
    r = s.post(f"{url}/hub/login", data={"username": name, "password": password, "_xsrf": xsrf},
               allow_redirects=False, timeout=30)
    assert r.status_code == 302, f"login as {name} failed: {r.status_code} {r.text[:300]}"
    s.headers["X-XSRFToken"] = s.cookies.get("_xsrf")  # the one the login set
    return s


def docker(*args, check=False) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


def cleanup_docker(prefix: str):
    """Remove the containers, volumes and images named with ``prefix``, on the engine and in the
    registry."""
    from .registry import forget  # (registry.py uses this module's helpers)

    forget(prefix)
    ids = docker("ps", "-aq", "--filter", f"name=^/{prefix}").stdout.split()
    if ids:
        docker("rm", "-f", *ids)
    vols = [v for v in docker("volume", "ls", "-q").stdout.split() if v.startswith(prefix)]
    if vols:
        docker("volume", "rm", "-f", *vols)
    images = [i for i in docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
              if i.startswith(prefix)]
    if images:
        docker("rmi", "-f", *images)


def wait_for(predicate, timeout=120, interval=0.5, what="condition", detail=lambda: ""):
    """The first true value of ``predicate()``, polled until ``timeout`` seconds."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last={last!r}\n{detail()}")


class Hub:
    def __init__(self, workdir: Path, *, nodes=None, extra: dict | None = None, prefix: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix or f"bai-test-{secrets.token_hex(3)}-"
        self.port = free_port()
        self.admin_token = secrets.token_hex(16)
        self.passwords: dict[str, str] = {}  # the logins set_password made: name -> password
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        self.env.update({
            "BAI_DATA_DIR": str(self.workdir / "var"),
            "BAI_HUB_PORT": str(self.port),
            "BAI_HUB_API_PORT": str(free_port()),
            "BAI_PROXY_API_PORT": str(free_port()),
            "BAI_SCHEDULER_PORT": str(free_port()),
            "BAI_NAME_PREFIX": self.prefix,
            "BAI_EXTRA_CONFIG": str(TEST_CONFIG),
            "BAI_TEST_ADMIN_TOKEN": self.admin_token,
            "BAI_TEST_NODES": json.dumps(nodes or [{"name": "local", "docker_url": "", "gpus": 1,
                                                    "gpu_memory": "8GiB"}]),
            "BAI_TEST_EXTRA": json.dumps(extra or {}),
            "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
        })
        # As scripts/run-hub does: sessions get this host's package index and CA bundle.
        settings, _ = pipconf.write_for_sessions(str(self.workdir / "session-pip.conf"))
        self.env.update(settings)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "jupyterhub.log"

    # -- process ------------------------------------------------------------------

    def start(self, timeout: float = 60):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(CONFIG)],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited:\n{self.tail()}")
            try:
                if (self.api("GET", "/").status_code == 200
                        and self.service("GET", "api/health").status_code == 200):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"jupyterhub did not come up in {timeout}s:\n{self.tail()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def service_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"bai_scheduler.app --config={CONFIG}"], capture_output=True, text=True)
        pids = []
        for pid in out.stdout.split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"BAI_NAME_PREFIX={self.prefix}".encode() in env:
                pids.append(int(pid))
        return pids

    def leftover_pids(self) -> list[int]:
        """Processes this hub started that outlived it. Its proxy and managed services run in process
        groups of their own, so a hub that died without cleaning up (a crash test's SIGKILL, a
        restart that adopted the old proxy) leaves them running: the proxy carries this hub's
        BAI_NAME_PREFIX, a managed service the hub's API port in JUPYTERHUB_API_URL."""
        prefix = f"BAI_NAME_PREFIX={self.prefix}".encode()
        api = f":{self.env['BAI_HUB_API_PORT']}/hub/api".encode()
        return pids_whose_environ(lambda env: prefix in env or any(
            e.startswith(b"JUPYTERHUB_API_URL=") and e.endswith(api) for e in env))

    def cleanup(self):
        """After stop(): end what the hub left running, then remove what it made in Docker and the
        registry."""
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        cleanup_docker(self.prefix)

    # -- REST -----------------------------------------------------------------------

    def api(self, method, path, token=None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {token or self.admin_token}"
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kw)

    def service(self, method, path, token=None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {token or self.admin_token}"
        return requests.request(method, f"{self.url}/services/bai-scheduler/{path}", headers=headers,
                                timeout=60, **kw)

    def add_user(self, name: str, admin: bool = False) -> str:
        r = self.api("POST", f"/users/{name}", json={"admin": admin})
        assert r.status_code in (201, 409), r.text
        r = self.api("POST", f"/users/{name}/tokens", json={"note": "test", "expires_in": 7200})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def set_password(self, name: str, password: str) -> None:
        """An approved NativeAuthenticator login for ``name`` with ``password``: made in the
        database if new, else changed on the hub's change-password page as its user does.

        Never changed in the database behind the hub: the hub's database session keeps the rows it
        has read (JupyterHub's expire_on_commit=False), so it went on checking the old password
        until its copy happened to be garbage-collected, and logins failed now and then."""
        from hub_config.bootstrap_admin import ensure_account

        if ensure_account(f"sqlite:///{self.workdir}/var/jupyterhub.sqlite", name, password):
            self.passwords[name] = password
            return
        old = self.passwords.get(name)
        assert old is not None, f"{name} has a login these tests did not make here: its password is unknown"
        if old == password:
            return
        s = login(self.url, name, old)
        r = s.post(f"{self.url}/hub/change-password", data={
            "old_password": old, "new_password": password, "new_password_confirmation": password,
            "_xsrf": self.form_xsrf(s, "/hub/change-password")}, timeout=30)
        assert r.status_code == 200 and "changed successfully" in r.text, r.text[:1000]
        self.passwords[name] = password

    def login(self, name: str, password: str) -> requests.Session:
        """A browser-like session logged in through the hub's login form (the account is made
        or given ``password`` first)."""
        self.set_password(name, password)
        return login(self.url, name, password)

    def form_xsrf(self, s: requests.Session, path: str) -> str:
        """The xsrf token a form page at ``path`` posts with (the hub's, or the service's)."""
        r = s.get(f"{self.url}{path}", timeout=60)
        assert r.status_code == 200, r.text[:300]
        m = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
        return m.group(1) if m else s.cookies.get("_xsrf")

    def server_path(self, user, server=""):
        return f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"

    def start_server(self, user, server="", options=None, token=None) -> requests.Response:
        return self.api("POST", self.server_path(user, server), token=token, json=options or {})

    def stop_server(self, user, server="", token=None) -> requests.Response:
        return self.api("DELETE", self.server_path(user, server), token=token)

    def servers(self, user, include_stopped: bool = False) -> dict:
        """The user's active servers; with ``include_stopped``, every server record."""
        query = "?include_stopped_servers=1" if include_stopped else ""
        return self.api("GET", f"/users/{user}{query}").json().get("servers", {})

    def requests(self, token=None) -> dict:
        """The scheduler's view: {"user/server": status}."""
        out = self.service("GET", "api/requests", token=token).json()["requests"]
        return {f"{r['user']}/{r['server']}": r for r in out}

    def wait_for(self, predicate, timeout=120, interval=0.5, what="condition"):
        return wait_for(predicate, timeout, interval, what, detail=lambda: self.tail(40))

    def wait_ready(self, user, server="", timeout=120):
        def ready():
            s = self.servers(user).get(server)
            return s if s and s.get("ready") else None

        return self.wait_for(ready, timeout, what=f"{user}/{server} ready")

    def wait_gone(self, user, server="", timeout=60):
        return self.wait_for(lambda: server not in self.servers(user) or
                             not self.servers(user)[server].get("pending") and
                             not self.servers(user)[server].get("ready"),
                             timeout, what=f"{user}/{server} stopped")

    def session_container(self, user: str, server: str = "", running_only: bool = False) -> dict | None:
        """The container of one session (from its labels), or None."""
        from bai_scheduler.contract import labels

        for c in self.containers():
            lab = c["Config"]["Labels"]
            if lab.get(labels.USER) == user and lab.get(labels.SERVER) == server:
                if not running_only or c["State"]["Running"]:
                    return c
        return None

    def wait_capacity_free(self, timeout=120):
        """Wait until no session holds any of the cluster's fGPU and nothing is queued.

        The scheduler adopts every BAI session container on the engine at start-up and in its
        periodic sweep, including those of other hubs on the same engine; when another suite
        runs in parallel its sessions show up here and hold the fGPU."""
        def free():
            cap = self.service("GET", "api/capacity").json()
            used = sum(d["used_quanta"] for n in cap["usage"] for d in n["devices"])
            return used == 0 and cap["queue_length"] == 0
        try:
            self.wait_for(free, timeout, interval=1, what="the cluster's fGPU to be free")
        except AssertionError:
            holders = sorted(f"{k} ({r['state']}, {r['fgpu']} fGPU)" for k, r in self.requests().items())
            raise AssertionError(f"The cluster is still held after {timeout}s by: {holders} "
                                 "(another hub on the same Docker engine?)") from None

    def fill(self, user: str, options: dict, names=("a", "b", "c")):
        """Start three 1-fGPU sessions on the 2-fGPU cluster: two run, the third queues."""
        for s in names:
            r = self.start_server(user, s, options)
            assert r.status_code in (201, 202), r.text
        self.wait_ready(user, names[0])
        self.wait_ready(user, names[1])
        key = f"{user}/{names[2]}"
        self.wait_for(lambda: self.requests().get(key, {}).get("state") == "PENDING", 30, what=f"{key} queued")

    def containers(self, engine: str = "") -> list[dict]:
        """This hub's session containers on one engine ("" = the local one)."""
        host = ["-H", engine] if engine else []
        ids = docker(*host, "ps", "-aq", "--filter", f"name=^/{self.prefix}").stdout.split()
        if not ids:
            return []
        return json.loads(docker(*host, "inspect", *ids).stdout)


@contextmanager
def running_hub(workdir: Path, log_name: str, **kw):
    """A started hub of a test module's own (``Hub(workdir, **kw)``); afterwards stopped, its log kept
    as test-artifacts/``log_name`` and what it made in Docker and the registry removed."""
    h = Hub(workdir, **kw)
    try:
        h.start()
        yield h
    finally:
        h.stop()
        if h.log_path.exists():
            shutil.copy(h.log_path, ARTIFACTS / log_name)
        h.cleanup()

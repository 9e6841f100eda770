"""The README's run command as a new user runs it: ``scripts/run-hub`` with only the
system's own folders on PATH (nothing of the checkout's .venv), then a login with
the password it prints, a session launched through the REST API, and Ctrl-C.

Its own data folder, ports and name prefix (environment variables the deployment's
config reads) keep it apart from the suite's hubs; nothing else is set for it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from helpers import ARTIFACTS, KERNEL_IMAGE, ROOT
from helpers.registry import reference
from helpers.hub import cleanup_docker, docker, free_port, login, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.hub, pytest.mark.slow]

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
OPTIONS = {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"}


def process_tree(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> command line."""
    parents, cmdlines = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        cmdlines[int(entry.name)] = cmd
    tree, frontier = {}, {root}
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree}
        tree.update({pid: cmdlines[pid] for pid in children})
        frontier = children
    return tree


def still_running(pid: int, cmdline: str) -> bool:
    """The same process (not a reused pid), and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return False
    return state != "Z" and now == cmdline


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def default_sigint():
    # What a terminal's Ctrl-C reaches: a process with SIGINT's default action. A
    # test runner started in the background may pass SIGINT on ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class RunHub:
    """scripts/run-hub as a subprocess in a session of its own; its output in a file."""

    def __init__(self, workdir: Path):
        self.prefix = f"bai-test-{secrets.token_hex(3)}-"
        self.ports = {k: free_port() for k in ("BAI_HUB_PORT", "BAI_HUB_API_PORT", "BAI_PROXY_API_PORT",
                                               "BAI_SCHEDULER_PORT")}
        self.env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"),
                    "BAI_DATA_DIR": str(workdir / "var"), "BAI_NAME_PREFIX": self.prefix,
                    **{k: str(v) for k, v in self.ports.items()}}
        self.url = f"http://127.0.0.1:{self.ports['BAI_HUB_PORT']}"
        self.log_path = workdir / "run-hub.log"
        self.proc: subprocess.Popen | None = None

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(ROOT / "scripts" / "run-hub")], cwd="/", env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=default_sigint)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"run-hub never printed {pattern!r} (exit status {self.proc.poll()}); "
                             f"its output ends:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def kill(self):
        """After a failure: everything it started, hard."""
        if self.proc is None:
            return
        tree = process_tree(self.proc.pid)
        for pgid in {self.proc.pid} | {os.getpgid(p) for p in tree if still_running(p, tree[p])}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(30)



def test_run_hub_with_system_path_serves_a_session_and_ctrl_c_stops_all_it_started(tmp_path, kernel_images):
    run = RunHub(tmp_path)
    try:
        run.start()
        # Setup (already done by the suite's own setup) then the hub; it ends with the URL and the login.
        password = run.wait_output(r"First admin 'admin' created\. Password: (\S+)", 600).group(1)
        run.wait_output(r"\[bai-hub\] BAI Hub is running at " + re.escape(run.url), 180)
        run.wait_output(r"\[bai-hub\] Log in as 'admin' with the password", 10)
        for step in ("Docker engine", "BAI Hub in .venv", "configurable-http-proxy"):
            assert re.search(rf"\[bai-setup\] {re.escape(step)} +.+\(\d+\.\d s\)", run.output()), step

        s = login(run.url, "admin", password)
        r = s.post(f"{run.url}/hub/api/users/admin/servers/first", json=OPTIONS, timeout=60)
        assert r.status_code in (201, 202), r.text
        wait_for(lambda: s.get(f"{run.url}/hub/api/users/admin", timeout=30).json()["servers"]
                 .get("first", {}).get("ready"), 180, what="the session to be ready")
        containers = docker("ps", "-q", "--filter", f"name=^/{run.prefix}").stdout.split()
        assert len(containers) == 1
        info = json.loads(docker("inspect", containers[0]).stdout)[0]
        assert info["Config"]["Image"] == reference(KERNEL_IMAGE) and info["State"]["Running"]
        token = s.post(f"{run.url}/hub/api/users/admin/tokens", json={"note": "run-hub test"}, timeout=30)
        assert token.status_code == 201, token.text
        r = requests.get(f"{run.url}/user/admin/first/api/status", timeout=30,
                         headers={"Authorization": f"token {token.json()['token']}"})
        assert r.status_code == 200, (r.status_code, r.text[:200])  # the proxy routes to it

        r = s.delete(f"{run.url}/hub/api/users/admin/servers/first", timeout=60)
        assert r.status_code in (202, 204), r.text
        wait_for(lambda: not docker("ps", "-aq", "--filter", f"name=^/{run.prefix}").stdout.split(), 90,
                 what="the session's container to be removed")

        # Ctrl-C: the terminal sends SIGINT to the command's process group.
        started = process_tree(run.proc.pid)
        kinds = {kind for kind in ("jupyterhub", "configurable-http-proxy", "bai_scheduler.app",
                                   "jupyterhub_idle_culler") if any(kind in c for c in started.values())}
        assert len(kinds) == 4, f"run-hub's processes: {started}"
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(120) == 0, run.tail()
        assert "[bai-hub] stopped" in run.output()
        left = {pid: cmd for pid, cmd in started.items() if still_running(pid, cmd)}
        assert not left, f"left running after Ctrl-C: {left}"
        assert not [name for name, port in run.ports.items() if port_open(port)]
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.kill()
        if run.log_path.exists():
            (ARTIFACTS / "run-hub.log").write_text(run.output())
        cleanup_docker(run.prefix)

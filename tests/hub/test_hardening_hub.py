"""Session hardening through a real hub and Docker engine: every session runs with a process
limit, no capabilities, no-new-privileges and an init process, and a process flood in one
session stops at its limit while the hub and another session keep answering.

(That a hardened session still runs a kernel, the terminal and MLflow is
tests/hub/test_session_apps_hub.py, whose sessions get these same defaults.)
"""
import subprocess
import time

import pytest
import requests

from helpers import KERNEL_IMAGE
from helpers.hub import docker

pytestmark = [pytest.mark.docker, pytest.mark.hub]

CPU_ONLY = {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"}
LIMIT = 192

FLOOD = """
import os, sys, time
kids = []
try:
    for _ in range({most}):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
    print("NOT STOPPED", len(kids), flush=True)
except OSError as e:
    print("STOPPED", len(kids), e.errno, flush=True)
sys.stdin.readline()  # hold the processes until the test has looked around
for pid in kids:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print("RELEASED", flush=True)
"""


def pids_max(container) -> str:
    """The pids limit the kernel enforces in the container (cgroup v2, else v1)."""
    out = docker("exec", container["Id"], "sh", "-c",
                 "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max")
    return out.stdout.strip()


def status_of(hub, user, server, token, timeout=10) -> int:
    return requests.get(f"{hub.url}/user/{user}/{server}/api/status",
                        headers={"Authorization": f"token {token}"}, timeout=timeout).status_code


def test_sessions_are_hardened_and_a_process_flood_stops_at_the_limit(fresh_hub):
    hub = fresh_hub(extra={"BaiSpawner": {"pids_limit": LIMIT}}).start()
    user = "flooder"
    token = hub.add_user(user)
    for server in ("a", "b"):
        r = hub.start_server(user, server, CPU_ONLY)
        assert r.status_code in (201, 202), r.text
    for server in ("a", "b"):
        hub.wait_ready(user, server)
    a, b = (hub.session_container(user, s, running_only=True) for s in ("a", "b"))

    for c in (a, b):
        host = c["HostConfig"]
        assert host["PidsLimit"] == LIMIT
        assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["Init"] is True
        status = docker("exec", c["Id"], "cat", "/proc/self/status").stdout
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        assert docker("exec", c["Id"], "cat", "/proc/1/comm").stdout.strip() == "docker-init"
    # Refuse to flood unless the kernel really holds this container to its limit: a flood
    # without one would take the whole machine down.
    if pids_max(a) != str(LIMIT):
        pytest.fail(f"the engine does not enforce the pids limit (pids.max={pids_max(a)!r}); not flooding")

    flood = subprocess.Popen(["docker", "exec", "-i", a["Id"], "python3", "-c", FLOOD.format(most=2 * LIMIT)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = flood.stdout.readline().split()
        assert line[:1] == ["STOPPED"], (line, flood.stderr.read() if flood.poll() is not None else "")
        assert 0 < int(line[1]) < LIMIT and int(line[2]) == 11  # EAGAIN: the limit, not memory
        # While session a is full: the hub, the scheduler and session b still answer.
        t0 = time.time()
        assert hub.api("GET", "/").status_code == 200
        assert hub.service("GET", "api/health").json()["ok"] is True
        assert status_of(hub, user, "b", token) == 200
        assert docker("exec", b["Id"], "python3", "-c", "print(6 * 7)").stdout.strip() == "42"
        assert time.time() - t0 < 90  # answered, not stalled until a timeout
    finally:
        out, _ = flood.communicate("go\n", timeout=120)
    assert "RELEASED" in out
    # Session a recovers once its processes are gone.
    hub.wait_for(lambda: status_of(hub, user, "a", token) == 200, 60, what="session a answers again")
    for server in ("a", "b"):
        hub.stop_server(user, server)
    for server in ("a", "b"):
        hub.wait_gone(user, server)

"""An extra Docker engine on this machine (own socket, data root and bridge),
so the scheduler can be tested across several nodes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


class ExtraEngine:
    def __init__(self, name: str, subnet_octet: int):
        self.name = name
        self.bridge = name[:15]
        self.gateway = f"172.30.{subnet_octet}.1/24"
        self.data_root = f"/var/lib/{name}"
        self.exec_root = f"/run/{name}"
        self.sock = f"/run/{name}.sock"
        self.url = f"unix://{self.sock}"
        self.proc = None

    def docker(self, *args, **kw):
        return subprocess.run(["docker", "-H", self.url, *args], capture_output=True, text=True, **kw)

    def start(self):
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], capture_output=True)
        subprocess.run(["ip", "addr", "replace", self.gateway, "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        # A fresh engine: nothing left by a run that ended before destroy() (a test may rely on an empty node).
        shutil.rmtree(self.data_root, ignore_errors=True)
        os.makedirs(self.data_root, exist_ok=True)
        os.makedirs(self.exec_root, exist_ok=True)
        # iptables off: the main engine owns the host's DOCKER chains; ports are
        # still published to 127.0.0.1 through docker-proxy.
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", self.data_root, "--exec-root", self.exec_root,
             "--pidfile", f"/run/{self.name}.pid", "-H", self.url, "--bridge", self.bridge,
             "--iptables=false", "--ip-masq=false"],
            stdout=open(f"/tmp/{self.name}.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        for _ in range(60):
            if self.docker("info").returncode == 0:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"extra dockerd {self.name} did not start; see /tmp/{self.name}.log")

    def copy_image(self, ref: str):
        """Copy image ``ref`` from the main engine with every tag it has there: the catalog may
        name it by any of them (e.g. a registry's ``127.0.0.1:5000/...`` tag on a shared engine)."""
        tags = subprocess.run(["docker", "image", "inspect", "--format", "{{join .RepoTags \" \"}}", ref],
                              capture_output=True, text=True, check=True).stdout.split() or [ref]
        if all(self.docker("image", "inspect", t).returncode == 0 for t in tags):
            return
        save = subprocess.Popen(["docker", "save", *tags], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "-H", self.url, "load"], stdin=save.stdout, capture_output=True, text=True)
        save.wait()
        if load.returncode != 0:
            raise RuntimeError(f"could not copy {ref} to {self.name}: {load.stderr}")

    def stop(self):
        """Stop this dockerd (its containers stop with it); ``start()`` brings it back."""
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def destroy(self):
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids)
        self.stop()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.data_root, ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)


MAIN_PIDFILE = "/var/run/docker.pid"


def engine_answers(url: str = "") -> bool:
    host = ["-H", url] if url else []
    return subprocess.run(["docker", *host, "info"], capture_output=True).returncode == 0


def stop_main_engine(timeout: float = 90) -> None:
    """Stop the machine's dockerd and wait until the process is really gone."""
    pid = int(open(MAIN_PIDFILE).read().strip())
    os.kill(pid, signal.SIGTERM)
    end = time.time() + timeout
    while time.time() < end and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.2)
    if os.path.exists(f"/proc/{pid}"):
        raise RuntimeError(f"dockerd {pid} did not stop in {timeout}s")


def start_main_engine(timeout: float = 90) -> None:
    """Start dockerd the way scripts/setup.sh does, and wait until it answers."""
    subprocess.Popen(["setsid", "dockerd"], stdout=open("/var/log/bai-dockerd.log", "ab"),
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    end = time.time() + timeout
    while time.time() < end:
        if engine_answers():
            return
        time.sleep(0.5)
    raise RuntimeError("dockerd did not come back; see /var/log/bai-dockerd.log")

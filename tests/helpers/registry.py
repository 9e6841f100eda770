"""Image registries in tests: the one scripts/setup.sh runs (the suite's kernel images are there), a
registry of a test's own (Debian's docker-registry on a free port, its data in the test's folder,
optionally with htpasswd logins: one a test may stop or that wants a login), and tiny images to
push into either."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import bcrypt
import requests

from bai_scheduler.contract.registry import DEFAULT_URL, BaiRegistry, split_name

from .hub import docker, free_port

# The registry scripts/setup.sh starts (or BAI_REGISTRY_URL): the hubs of the suite use it.
SHARED_URL = os.environ.get("BAI_REGISTRY_URL", DEFAULT_URL)
SHARED = BaiRegistry(url=SHARED_URL)


def reference(name: str) -> str:
    """What a node runs for a name users type: ``bai/sklearn:1.6.1`` → ``127.0.0.1:5000/bai/sklearn:1.6.1``."""
    return SHARED.reference(name)


def answers(url: str) -> bool:
    try:
        return requests.get(url + "/v2/", timeout=3).status_code in (200, 401)
    except requests.RequestException:
        return False


class LocalRegistry:
    """Debian's docker-registry on 127.0.0.1:<free port>, data under ``root``; ``users``:
    {name: password} for htpasswd logins (plain HTTP on 127.0.0.1, which Docker trusts)."""

    def __init__(self, root: Path, users: dict[str, str] | None = None):
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.users = users or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LocalRegistry":
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users:
            (self.root / "htpasswd").write_text("".join(
                f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n" for u, p in self.users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: bai-test\n    path: {self.root / 'htpasswd'}\n"
        (self.root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n{auth}")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.root / "config.yml")],
                                     stdout=open(self.root / "registry.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if answers(self.url):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"docker-registry did not start: {(self.root / 'registry.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


def tiny_image(ref: str, labels: dict[str, str], content: bytes = b"tiny\n") -> str:
    """A one-file image ``ref`` on the local engine (``docker import``), with ``labels``; its id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    changes = [a for k, v in labels.items() for a in ("--change", f"LABEL {json.dumps(k)}={json.dumps(v)}")]
    out = subprocess.run(["docker", "import", *changes, "-", ref], input=buf.getvalue(), capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    return docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def push(ref: str) -> None:
    out = docker("push", ref)
    assert out.returncode == 0, out.stderr + out.stdout


def delete_from(registry: BaiRegistry, name: str) -> bool:
    """Delete ``name``'s manifest in ``registry`` (and so every tag naming it); False if not there."""
    client = registry.client()
    repo, tag = split_name(registry.name_of(name))
    digest = client.digest(repo, tag)
    return digest is not None and client.delete(repo, digest)


def forget(prefix: str) -> None:
    """Remove what a test made under ``prefix`` (bai-test-…): its repositories in the shared registry
    (their manifests; the registry's garbage collection frees the space) and the engine's tags of them."""
    client = SHARED.client()
    for repository in client.repositories():
        if repository.startswith(prefix):
            for tag in client.tags(repository):
                delete_from(SHARED, f"{repository}:{tag}")
    tags = [t for t in docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
            if t.startswith(reference(prefix))]
    if tags:
        docker("rmi", "-f", *tags)

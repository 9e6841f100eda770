"""Kernel images in tests: the catalog recipes and how to check their framework, small
wheels made on the spot, images a spawn may name (catalog ones, another user's private
one, one the catalog does not list) and the checks that the session runs exactly the
one allowed."""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bai_scheduler.contract import labels as L
from bai_spawner.images import recipes as R
from bai_spawner.images import sources

from . import EXTRA_IMAGES, IMAGE_PREFIX, KERNEL_IMAGE, OLD_IMAGE
from .hub import docker
from .registry import SHARED, delete_from, push, reference

# framework label -> (module the seed's check imports, distribution its recipes pin)
FRAMEWORKS = {
    "scikit-learn": ("sklearn", {"scikit-learn"}),
    "TensorFlow": ("tensorflow", {"tensorflow", "tensorflow-cpu"}),
    "PyTorch": ("torch", {"torch"}),
}


@dataclass(frozen=True)
class CatalogRecipe:
    name: str
    ref: str
    module: str
    version: str     # the pinned version, e.g. 2.13.0+cpu
    default: bool

    def says(self, printed: str) -> bool:
        """``module.__version__`` is the pin, or the pin with the build's local
        label (PyPI's torch 2.14.1 says 2.14.1+cu130)."""
        return printed == self.version or printed.startswith(self.version + "+")

    def seed_check(self) -> str:
        """The seed's check, as typed in a terminal."""
        return f'python -c "import {self.module}; print({self.module}.__version__)"'


def catalog_recipes() -> list[CatalogRecipe]:
    """Every offered recipe whose Python this base has, with its expected version."""
    out = []
    for name, r in sorted(R.load_recipes(sources.recipes_dir()).items()):
        if not r.offered or r.python is not None or r.framework not in FRAMEWORKS:
            continue
        module, dists = FRAMEWORKS[r.framework]
        pin = next(p for p in r.packages if R.dist_name(p) in dists)
        out.append(CatalogRecipe(name, r.image_ref(IMAGE_PREFIX), module, pin.split("==", 1)[1], r.default))
    return out


def recipe_params() -> list:
    """``catalog_recipes()`` as pytest params; images not built by default are
    marked ``extra_images`` (run with ``scripts/run-tests -m extra_images``)."""
    extra = (pytest.mark.slow, getattr(pytest.mark, EXTRA_IMAGES))
    return [pytest.param(c, id=c.name, marks=() if c.default else extra) for c in catalog_recipes()]


def make_wheel(directory: Path, name: str, version: str = "1.0", init: str = "", payload_size: int = 0) -> Path:
    """A pure-Python wheel made on the host (no network, no build tools) of
    package ``name`` (importable with dashes as underscores; ``init`` is its
    ``__init__.py``), with ``payload_size`` random bytes to make it large."""
    dist = name.replace("-", "_")
    files = {
        f"{dist}/__init__.py": (init or f"__version__ = {version!r}\n").encode(),
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}-{version}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: bai-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if payload_size:
        files[f"{dist}/payload.bin"] = os.urandom(payload_size)
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    record.append(f"{dist}-{version}.dist-info/RECORD,,")
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


# A session's shape that never waits for a GPU share.
SHAPE = {"fgpu": "0", "cpu": "0.5", "memory": "1"}


def image_id(ref: str) -> str:
    out = docker("image", "inspect", "--format", "{{.Id}}", ref)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def commit_image(hub, source: str, ref: str, *label_changes: str, pushed: bool = False) -> str:
    """An image made from ``source`` with changed labels, under the hub's bai-test- prefix; with
    ``pushed``, also in the registry (named there as users name it: ``ref`` without the host)."""
    tmp = f"{hub.prefix}mkimage"
    assert docker("create", "--name", tmp, source, "true").returncode == 0
    try:
        changes = [a for lab in label_changes for a in ("--change", f"LABEL {lab}")]
        out = docker("commit", *changes, tmp, ref)
        assert out.returncode == 0, out.stderr
    finally:
        docker("rm", "-f", tmp)
    if pushed:
        assert docker("tag", ref, reference(ref)).returncode == 0
        push(reference(ref))
    return image_id(ref)


def wait_listed(hub, *names: str, timeout: float = 60) -> None:
    """Until the service's catalog lists ``names`` (pushed from outside the hub, which announces
    nothing: the service reads the registry again after ``c.BaiRegistry.catalog_ttl``)."""
    def listed():
        r = hub.service("GET", "api/catalog")
        return r.status_code == 200 and set(names) <= {i["short_ref"] for i in r.json()["images"]}
    hub.wait_for(listed, timeout, 1.0, what=f"{', '.join(names)} in the service's catalog")


@contextmanager
def choice_images(hub):
    """Every way of naming an image a spawn may meet: name -> (value, the reference
    that must run, or None where the spawn must be refused). Made under the hub's
    bai-test- prefix and removed afterwards."""
    owner = "imgchoiceowner"
    private = f"{hub.prefix}private/{owner}:secret"
    # In the registry, in its owner's namespace: a real private image of someone else.
    private_id = commit_image(hub, KERNEL_IMAGE, private, f"{L.KIND}={L.KIND_PRIVATE}", f"{L.OWNER}={owner}",
                              f"{L.DISPLAY_NAME}=someone-elses", pushed=True)
    # In the registry and on the engine, runnable, but no catalog image: its kind label is cleared.
    plain = f"{hub.prefix}plain:1"
    plain_id = commit_image(hub, KERNEL_IMAGE, plain, f"{L.KIND}=", pushed=True)
    wait_listed(hub, private)  # so that the catalog's rules, not a stale cache, refuse it
    try:
        yield {
            "catalog": (KERNEL_IMAGE, KERNEL_IMAGE),
            "catalog-by-id": (image_id(OLD_IMAGE), OLD_IMAGE),
            "private": (private, None),
            "private-id-prefix": (private_id[:19], None),
            "not-in-catalog": (plain, None),
            "not-in-catalog-id": (plain_id, None),
            "not-in-catalog-short-id": (plain_id[7:19], None),
            "nothing": ("", KERNEL_IMAGE),  # the hub's default image
        }
    finally:
        for name in (private, plain):
            delete_from(SHARED, name)
        docker("rmi", "-f", private, plain, reference(private), reference(plain))


def chosen(values, picker: str, typed: str):
    """The typed name wins; without one the picker; without both the default."""
    return values[typed][1] if typed != "nothing" else values[picker][1]


def assert_runs(hub, user, server, name):
    """The session's container, request and record all name the registry's reference of ``name``
    (what users type, e.g. bai/sklearn:1.6.1), and the container runs that very image."""
    ref = reference(name)
    c = hub.wait_for(lambda: hub.session_container(user, server, running_only=True), 120,
                     what=f"{user}/{server}'s container")
    assert c["Config"]["Image"] == ref, (c["Config"]["Image"], ref)
    assert c["Image"] == image_id(ref) == image_id(name)
    assert c["Config"]["Labels"][L.IMAGE] == ref
    assert hub.requests()[f"{user}/{server}"]["image"] == ref
    assert hub.servers(user)[server]["user_options"]["image"] == ref
    assert "image_name" not in hub.servers(user)[server]["user_options"]


def assert_refused(hub, user, server, r):
    if r.status_code in (201, 202):  # refused after the hub's slow-spawn wait: a failed spawn
        hub.wait_for(lambda: not hub.servers(user).get(server, {}).get("pending"), 60, what="the refusal")
        assert not hub.servers(user).get(server, {}).get("ready")
    else:
        assert r.status_code == 400, r.text
        assert "not in the catalog" in r.json()["message"] or "either" in r.json()["message"], r.text
    assert hub.session_container(user, server) is None
    assert f"{user}/{server}" not in hub.requests()
    # ...and the refusal leaves no stopped named server behind.
    hub.wait_for(lambda: server not in hub.servers(user, include_stopped=True), 30,
                 what=f"{user}/{server}'s record to go")


def stop(hub, user, server):
    """Stop the session and delete the named server (a user has at most 16)."""
    hub.stop_server(user, server)
    hub.wait_gone(user, server, timeout=90)
    hub.wait_for(lambda: hub.session_container(user, server) is None, 60, what="the container to go")
    r = hub.api("DELETE", hub.server_path(user, server), json={"remove": True})
    assert r.status_code in (202, 204), r.text

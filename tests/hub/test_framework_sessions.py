"""One session per catalog image through the real hub: the seed's check
(``python -c "import tensorflow; print(tensorflow.__version__)"``) in both
terminals and the framework in a notebook kernel, and ``pip install`` in a
terminal landing in the image's kernel environment.

The sessions of the images built by default start together (0 fGPU); the
second version of each framework (``-m extra_images``) joins them when asked.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import pytest

from bai_spawner.images import layout as Y
from helpers.registry import reference
from helpers.hub import docker
from helpers.images import CatalogRecipe, catalog_recipes, make_wheel, recipe_params
from helpers.session import run_in_kernel, run_in_lab_terminal, run_in_web_terminal

pytestmark = [pytest.mark.docker, pytest.mark.hub]

SITE = f"{Y.KERNEL_ENV}/lib/python3.11/site-packages"
PIP_IMAGE = next(c for c in catalog_recipes() if c.default)


@dataclass
class Session:
    hub: object
    user: str
    token: str
    server: str

    @property
    def url(self) -> str:
        return f"{self.hub.url}/user/{self.user}/{self.server}/"

    def container(self) -> dict:
        return self.hub.session_container(self.user, self.server, running_only=True)


def _wanted(items) -> set[str]:
    """The catalog images the selected tests of this module use."""
    names = set()
    for item in items:
        if item.module.__name__ != __name__ or item.get_closest_marker("skip"):
            continue
        image = getattr(item, "callspec", None) and item.callspec.params.get("image")
        names.add(image.name if image else PIP_IMAGE.name)
    return names


@pytest.fixture(scope="module")
def sessions(hub, kernel_images, request) -> dict[str, Session]:
    """A session of every catalog image the selected tests use, started at once."""
    wanted = _wanted(request.session.items)
    images = [c for c in catalog_recipes() if c.name in wanted]
    user = f"frameworks{uuid.uuid4().hex[:4]}"
    token = hub.add_user(user)
    made = {c.name: Session(hub, user, token, c.name.replace(".", "-")) for c in images}
    try:
        for c in images:
            r = hub.start_server(user, made[c.name].server,
                                 {"image": c.ref, "fgpu": "0", "cpu": "1", "memory": "3"})
            assert r.status_code in (201, 202), r.text
        for s in made.values():
            hub.wait_ready(user, s.server, timeout=300)
        yield made
    finally:
        for s in made.values():
            hub.stop_server(user, s.server)
        for s in made.values():
            hub.wait_gone(user, s.server, timeout=120)


def _lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.replace("\r", "").splitlines() if ln.strip()]


@pytest.mark.parametrize("image", recipe_params())
def test_seed_check_in_both_terminals_and_the_framework_in_a_kernel(sessions, image: CatalogRecipe):
    session = sessions[image.name]
    assert session.container()["Config"]["Image"] == reference(image.ref)
    command = f"echo shell=$(ps -o comm= -p $$) SHELL=$SHELL; command -v python pip; {image.seed_check()}"
    for run in (run_in_lab_terminal, run_in_web_terminal):
        lines = _lines(run(session, command, timeout=180))
        assert "shell=bash SHELL=/bin/bash" in lines, (run.__name__, lines)
        assert f"{Y.KERNEL_ENV}/bin/python" in lines and f"{Y.KERNEL_ENV}/bin/pip" in lines, (run.__name__, lines)
        assert image.says(lines[-1]), (run.__name__, lines)
    out = run_in_kernel(session, f"import sys, {image.module}\nprint(sys.executable)\n"
                                 f"print({image.module}.__version__)", timeout=180)
    # (TensorFlow logs its CPU features on stderr first)
    executable, version = _lines(out)[-2:]
    assert executable == f"{Y.KERNEL_ENV}/bin/python" and image.says(version), out


def test_pip_install_in_a_terminal_lands_in_the_kernel_environment(sessions, tmp_path):
    """Plain ``pip install`` in a terminal goes where notebooks import from and
    what a snapshot keeps (the container's layer, not the home volume).
    Sessions do not reach a package index yet (the site's pip configuration
    and CA are not mounted into them), so the wheel is copied in and
    installed with ``--no-index``."""
    session = sessions[PIP_IMAGE.name]
    wheel = make_wheel(tmp_path, f"bai-test-pip-{uuid.uuid4().hex[:6]}", "1.0")
    module = wheel.name.split("-", 1)[0]
    container = session.container()["Id"]
    assert docker("cp", str(wheel), f"{container}:/tmp/{wheel.name}").returncode == 0
    out = run_in_lab_terminal(session, f"pip install --no-index /tmp/{wheel.name} && "
                                       f"python -c 'import {module}; print(\"at=\" + {module}.__file__)'")
    assert f"at={SITE}/{module}/__init__.py" in _lines(out), out[-2000:]
    # a new kernel imports it from the same place
    assert _lines(run_in_kernel(session, f"import {module}; print({module}.__file__)")) == \
        [f"{SITE}/{module}/__init__.py"]
    changed = docker("diff", container).stdout
    assert re.search(rf"^A {re.escape(SITE)}/{module}$", changed, re.M), changed[-2000:]

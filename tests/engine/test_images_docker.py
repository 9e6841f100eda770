"""The image builder against the real Docker engine.

Builds tiny kernel recipes on the real base image into throwaway
``bai-test-<id>/...`` names (the base is found by its recipe-hash label, so it
is not rebuilt when ``bai-images build`` has run), breaks builds on purpose
(a failing test step, no wheel for the base's Python, a download cut off
half-way by a local index), and checks the real catalog images. Everything
created is named ``bai-test-...`` and removed.
"""

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.catalog import build_catalog, resolve_image
from bai_spawner.images import layout as Y
from bai_spawner.images import sources
from bai_spawner.images.builder import DEFAULT_CACHE, BuildError, Builder, docker_client
from bai_spawner.images.cli import main
from bai_scheduler.contract.registry import BaiRegistry
from helpers.images import catalog_recipes, make_wheel, recipe_params
from helpers.registry import SHARED, delete_from, reference

pytestmark = pytest.mark.docker

RUN = uuid.uuid4().hex[:8]
PREFIX = f"{L.TEST_PREFIX}{RUN}/"
CACHE = Path(os.environ.get("BAI_CACHE_DIR") or DEFAULT_CACHE)
NAMES = ("bai-test-tiny", "bai-test-broken", "bai-test-nowheel", "bai-test-py37", "bai-test-halfway",
         "bai-test-stopped")

TINY = """
name = "{name}"
framework = "threadpoolctl"
version = "3.5.0"
display_name = "Test threadpoolctl 3.5"
base = "{base}"
packages = ["{package}"]
{extra}
"""


@pytest.fixture(scope="module")
def client():
    try:
        return docker_client()
    except BuildError as e:
        pytest.fail(f"{e} (the docker tests need a running engine: scripts/setup.sh starts one)")


def _cleanup(client):
    for repository in SHARED.client().repositories():
        if repository.startswith(PREFIX):
            for tag in SHARED.client().tags(repository):
                delete_from(SHARED, f"{repository}:{tag}")
    for c in client.containers.list(all=True, filters={"name": f"{L.TEST_PREFIX}{RUN}"}):
        c.remove(force=True)
    for img in client.images.list():
        for tag in img.tags:
            if tag.startswith(PREFIX):
                client.images.remove(tag, force=True)
    for lab in NAMES:
        for img in client.api.images(all=True, filters={"label": f"{L.NAME}={lab}"}):
            client.api.remove_image(img["Id"], force=True)
    for pattern in ("wheels/bai-test-*", "wheels/.bai-test-*", "tmp/bai-test-*"):
        for d in CACHE.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def recipes_dir(tmp_path_factory, client):
    """The real base and tiny kernel recipes: one on the base (a new kernel
    environment), the rest on it (added to that environment, quick)."""
    d = tmp_path_factory.mktemp("recipes")
    shutil.copy(sources.recipes_dir() / "base.toml", d / "base.toml")

    def recipe(name, base="bai-test-tiny", package="threadpoolctl==3.5.0", extra=""):
        (d / f"{name}.toml").write_text(TINY.format(name=name, base=base, package=package, extra=extra))

    recipe("bai-test-tiny", base="base", extra="test = \"python -c 'import threadpoolctl; "
                                               "print(threadpoolctl.__version__)'\"")
    recipe("bai-test-broken", extra='test = "echo the model did not learn; exit 3"')
    # numpy 1.21 has wheels up to Python 3.10 only: none for the base's 3.11
    recipe("bai-test-nowheel", package="numpy==1.21.6")
    recipe("bai-test-py37", extra='python = "3.7"')
    recipe("bai-test-halfway", package="bai-test-halfway==1.0")
    recipe("bai-test-stopped", extra='test = "echo testing; sleep 120"')
    yield d
    _cleanup(client)


def builder(client, recipes_dir, out, **kw):
    return Builder(client=client, recipes_dir=recipes_dir, cache_dir=CACHE, prefix=PREFIX,
                   on_progress=out.append, **kw)


def leftovers(client, name):
    containers = client.containers.list(all=True, filters={"name": f"{L.TEST_PREFIX}{RUN}"})
    images = client.api.images(all=True, filters={"label": f"{L.NAME}={name}"})
    tags = [t for i in client.images.list() for t in i.tags if t.startswith(PREFIX)]
    debris = [str(p.relative_to(CACHE)) for pattern in (f"wheels/*{name}-*", f"tmp/{name}-*")
              for p in CACHE.glob(pattern)]
    return containers, images, tags, debris


def catalog(client) -> list[tuple[str, str]]:
    """The catalog entries these builds could change (other work may build
    its own images on a shared engine meanwhile)."""
    return sorted((c.ref, c.id) for c in build_catalog(client.api.images(filters={"label": L.KIND}))
                  if c.ref.startswith(PREFIX))


def run(client, image, *cmd):
    return client.containers.run(image, list(cmd), remove=True, network_mode="none",
                                 name=f"{L.TEST_PREFIX}{RUN}-{uuid.uuid4().hex[:6]}").decode().strip()


def test_kernel_recipe_builds_two_environments_with_progress_and_then_is_cached(client, recipes_dir):
    out = []
    b = builder(client, recipes_dir, out, progress_interval=0)
    ids = b.build(["bai-test-tiny"])
    ref = f"{PREFIX}bai-test-tiny:3.5.0"
    img = client.images.get(ref)
    assert img.id == ids["bai-test-tiny"]
    lab = img.labels
    assert lab[L.KIND] == "kernel" and lab[L.NAME] == "bai-test-tiny"
    assert lab[L.FRAMEWORK] == "threadpoolctl" and lab[L.VERSION] == "3.5.0"
    assert lab[L.DISPLAY_NAME] == "Test threadpoolctl 3.5" and lab[L.PYTHON] == "3.11"
    assert lab[L.RECIPE_HASH] == b.hashes["bai-test-tiny"]
    cfg = img.attrs["Config"]
    assert cfg["User"] == "jovyan" and cfg["WorkingDir"] == "/home/jovyan"
    assert cfg["Entrypoint"] == ["tini", "-g", "--"] and cfg["Cmd"] == ["jupyterhub-singleuser"]
    assert f"PATH={Y.KERNEL_ENV}/bin:" in " ".join(cfg["Env"]) and "SHELL=/bin/bash" in cfg["Env"]

    # the kernel environment: the recipe's package, ipykernel, the MLflow client; the default kernel
    assert run(client, ref, "python", "-c", "import threadpoolctl; print(threadpoolctl.__version__)") == "3.5.0"
    assert run(client, ref, "sh", "-c", "id -un; id -u; id -g; command -v python; command -v pip; echo $HOME").split() == \
        ["jovyan", "1000", "100", f"{Y.KERNEL_ENV}/bin/python", f"{Y.KERNEL_ENV}/bin/pip", "/home/jovyan"]
    specs = json.loads(run(client, ref, f"{Y.SERVER_ENV}/bin/jupyter", "kernelspec", "list", "--json"))
    default = specs["kernelspecs"]["python3"]
    assert default["resource_dir"].startswith(Y.KERNEL_ENV)
    assert default["spec"]["argv"][0] == f"{Y.KERNEL_ENV}/bin/python"
    assert default["spec"]["display_name"] == "Python 3 (Test threadpoolctl 3.5)"
    # the server environment is apart: it has JupyterLab and not the framework, and the reverse
    assert run(client, ref, f"{Y.SERVER_ENV}/bin/jupyterhub-singleuser", "--version") == \
        importlib.metadata.version("jupyterhub")
    apart = run(client, ref, "sh", "-c",
                f"{Y.SERVER_ENV}/bin/python -c 'import threadpoolctl' 2>/dev/null || echo server-has-no-framework; "
                "python -c 'import jupyterlab' 2>/dev/null || echo kernel-has-no-jupyterlab; "
                "python -c 'import ipykernel, mlflow; print(\"kernel-ok\")'")
    assert apart.split() == ["server-has-no-framework", "kernel-has-no-jupyterlab", "kernel-ok"], apart

    # progress: every step of the kernel image, in order, with bytes for the download and the install
    mine = [p for p in out if p.ref == ref]
    assert {(p.index, p.total) for p in mine} == {(2, 2)}
    steps = [p.step for p in mine]
    order = ["start", "check", "download", "install", "compile", "kernelspec", "commit", "test", "done"]
    assert [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s] == order, steps
    installs = [p for p in mine if p.step == "install" and p.done]
    assert installs and installs[-1].unit == "bytes" and installs[-1].size > 50e6, installs[-3:]
    assert [p.done for p in installs] == sorted(p.done for p in installs)
    assert any("kernel environment" in p.detail and "packages" in p.detail for p in mine if p.step == "download")
    assert "ok 3.5.0" in [p.detail for p in mine if p.step == "test"][-1]
    assert str(mine[-1]).startswith(f"[2/2] {ref}: done: built in ")
    assert str(out[0]).startswith(f"[1/2] {PREFIX}base:bookworm: ")  # up to date, or built here
    # nothing is left of the build
    containers, _, tags, debris = leftovers(client, "bai-test-tiny")
    assert containers == [] and ref in tags
    assert [d for d in debris if not d.startswith("wheels/bai-test-tiny-")] == []  # the wheelhouse stays

    out2 = []
    t0 = time.monotonic()
    ids2 = builder(client, recipes_dir, out2).build(["bai-test-tiny"])
    assert ids2["bai-test-tiny"] == ids["bai-test-tiny"]
    assert [p.step for p in out2] == ["up to date", "up to date"], out2
    assert time.monotonic() - t0 < 15


def test_a_build_pushes_its_images_and_a_second_build_pushes_nothing(client, recipes_dir):
    """Into the registry every node pulls from (the suite's, scripts/setup.sh's): each image once
    tested, under its name there; the base's layers are already there (bai-images build pushed the
    real base), so this is quick."""
    out = []
    ids = builder(client, recipes_dir, out, progress_interval=0, registry=SHARED).build(["bai-test-tiny"])
    for name, tag in (("base", "bookworm"), ("bai-test-tiny", "3.5.0")):
        there = SHARED.client().image(f"{PREFIX}{name}", tag)
        assert there is not None and there.config == ids[name], (name, there)
        ref = f"{PREFIX}{name}:{tag}"
        pushes = [p for p in out if p.ref.endswith(ref) and p.step == "push"]
        assert pushes[0].detail == reference(ref)
        assert re.fullmatch(rf"{re.escape(reference(ref))}: pushed [\d.]+ MB compressed \(sha256:[0-9a-f]{{12}}\)",
                            pushes[-1].detail), pushes[-1]
    mine = [p.step for p in out if p.ref == f"{PREFIX}bai-test-tiny:3.5.0"]
    first_push = mine.index("push")  # after its test (in this build, or the one that made it)
    assert "test" not in mine[first_push:] and ("test" in mine[:first_push] or mine[0] == "up to date")
    out2 = []
    builder(client, recipes_dir, out2, registry=SHARED).build(["bai-test-tiny"])
    assert [p.step for p in out2] == ["up to date", "registry", "up to date", "registry"], out2
    assert all("is up to date in the registry (nothing pushed)" in p.detail for p in out2 if p.step == "registry")


def test_a_push_to_a_registry_that_is_down_says_so_and_keeps_the_tested_image(client, recipes_dir):
    down = BaiRegistry(url="http://127.0.0.1:9")
    with pytest.raises(BuildError) as e:
        builder(client, recipes_dir, [], registry=down).build(["bai-test-tiny"])
    assert e.value.step == "push" and "The image registry at http://127.0.0.1:9 does not answer" in str(e.value)
    assert "build again to push it, or pass --no-push" in str(e.value)
    assert client.images.get(f"{PREFIX}bai-test-tiny:3.5.0")  # built and tested: kept on this engine


def test_failing_test_step_names_recipe_and_step_and_leaves_nothing(client, recipes_dir):
    before = catalog(client)
    with pytest.raises(BuildError) as e:
        builder(client, recipes_dir, []).build(["bai-test-broken"])
    msg = str(e.value)
    assert e.value.recipe == "bai-test-broken" and e.value.step == "test"
    assert msg.startswith("recipe 'bai-test-broken' (") and "bai-test-broken.toml), step 'test': " in msg
    assert "exit 3" in msg and "the model did not learn" in msg
    containers, images, tags, debris = leftovers(client, "bai-test-broken")
    assert containers == [] and images == [] and not any("bai-test-broken" in t for t in tags)
    assert [d for d in debris if not d.startswith("wheels/bai-test-broken-")] == []
    assert catalog(client) == before


def test_engine_failing_mid_build_names_the_step_and_leaves_nothing(client, recipes_dir, monkeypatch):
    """An engine call that times out (seen on a busy engine) is reported like
    any failed step, and cleaned up like one."""
    import requests

    def timed_out(*args, **kwargs):
        raise requests.exceptions.ReadTimeout("UnixHTTPConnectionPool: Read timed out. (read timeout=60)")

    monkeypatch.setattr(client.api, "commit", timed_out)
    before = catalog(client)
    with pytest.raises(BuildError) as e:
        builder(client, recipes_dir, []).build(["bai-test-broken"])
    assert e.value.step == "commit" and "recipe 'bai-test-broken'" in str(e.value)
    assert "ReadTimeout" in str(e.value) and "run the build again" in str(e.value)
    containers, images, tags, _ = leftovers(client, "bai-test-broken")
    assert containers == [] and images == [] and not any("bai-test-broken" in t for t in tags)
    assert catalog(client) == before


def test_no_wheel_for_the_base_python_fails_at_download_and_leaves_nothing(client, recipes_dir):
    before = catalog(client)
    with pytest.raises(BuildError) as e:
        builder(client, recipes_dir, []).build(["bai-test-nowheel"])
    msg = str(e.value)
    assert e.value.step == "download" and "recipe 'bai-test-nowheel'" in msg and "step 'download'" in msg
    assert "numpy==1.21.6" in msg and "Python 3.11" in msg and "'packages'" in msg
    assert "No matching distribution found for numpy==1.21.6" in msg, msg
    containers, images, tags, debris = leftovers(client, "bai-test-nowheel")
    assert (containers, images, debris) == ([], [], []) and not any("nowheel" in t for t in tags)
    assert catalog(client) == before


class _HalfwayIndex(BaseHTTPRequestHandler):
    """A package index whose one wheel stops half-way, every time it is asked."""
    wheel: Path

    def do_GET(self):
        name = self.wheel.name
        if self.path.rstrip("/") == "/simple/bai-test-halfway":
            digest = hashlib.sha256(self.wheel.read_bytes()).hexdigest()
            body = f'<a href="/files/{name}#sha256={digest}">{name}</a>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == f"/files/{name}":
            data = self.wheel.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def halfway_index(tmp_path, monkeypatch):
    _HalfwayIndex.wheel = make_wheel(tmp_path / "files", "bai-test-halfway", payload_size=8_000_000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HalfwayIndex)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # one more index beside the host's own (pip reads the extra indexes from one setting)
    cfg = subprocess.run([shutil.which("pip") or "pip", "config", "get", "global.extra-index-url"],
                         capture_output=True, text=True)
    extra = cfg.stdout.strip() if cfg.returncode == 0 else ""
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple {extra}".strip())
    yield
    server.shutdown()


def test_download_stopping_half_way_names_recipe_and_step_and_leaves_nothing(client, recipes_dir, halfway_index):
    before = catalog(client)
    out = []
    with pytest.raises(BuildError) as e:
        builder(client, recipes_dir, out, progress_interval=0).build(["bai-test-halfway"])
    msg = str(e.value)
    assert e.value.step == "download" and "recipe 'bai-test-halfway'" in msg and "bai-test-halfway==1.0" in msg
    assert "not enough bytes were received" in msg, msg
    # it was seen moving before it stopped
    assert any(p.step == "download" and "bai_test_halfway-1.0-py3-none-any.whl" in p.detail for p in out), out
    containers, images, tags, debris = leftovers(client, "bai-test-halfway")
    assert (containers, images, debris) == ([], [], []) and not any("halfway" in t for t in tags)
    assert catalog(client) == before


def test_build_stopped_with_sigterm_during_its_test_leaves_nothing(client, recipes_dir):
    """`bai-images build` terminated while the new (committed, untested) image
    runs its test: the test container and that image are removed."""
    before = catalog(client)
    env = dict(os.environ, BAI_RECIPES_DIR=str(recipes_dir), BAI_CACHE_DIR=str(CACHE), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "bai_spawner.images.cli", "build", "--prefix", PREFIX,
                             "bai-test-stopped"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if ": test: echo testing" in line:
                break
        assert seen and ": test: echo testing" in seen[-1], "".join(seen)
        time.sleep(2)  # the test container is running
        assert any(c.name.startswith(f"{L.TEST_PREFIX}{RUN}-run-") for c in client.containers.list())
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130 and "interrupted; nothing half-built was kept" in proc.stderr.read()
    containers, images, tags, debris = leftovers(client, "bai-test-stopped")
    assert containers == [] and images == [] and not any("stopped" in t for t in tags)
    assert [d for d in debris if not d.startswith("wheels/bai-test-stopped-")] == []
    assert catalog(client) == before


def test_wrong_python_fails_before_building(client, recipes_dir):
    with pytest.raises(BuildError, match="step 'check': .*needs Python 3.7.*has Python 3.11"):
        builder(client, recipes_dir, []).build(["bai-test-py37"])
    containers, images, _, _ = leftovers(client, "bai-test-py37")
    assert containers == [] and images == []


def test_tensorflow_115_recipe_refuses_clearly(client, capsys):
    # the shipped TF 1.15 recipe needs Python 3.7; with the base built this fails at once
    if not client.api.images(filters={"label": f"{L.NAME}=base"}):
        pytest.skip("no base image on the engine")
    rc = main(["build", "--prefix", PREFIX, "tensorflow-1.15"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "needs Python 3.7" in err and "recipe 'tensorflow-1.15'" in err and "step 'check'" in err


def test_engine_down_message(monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    with pytest.raises(BuildError, match=r"Cannot reach the Docker engine at tcp://127.0.0.1:9: "
                                         r"start dockerd or set DOCKER_HOST"):
        docker_client()
    assert main(["build", "--prefix", PREFIX, "sklearn-1.6"]) == 1
    assert "Cannot reach the Docker engine" in capsys.readouterr().err
    assert main(["list", "--registry", "http://127.0.0.1:9"]) == 1
    assert "The image registry at http://127.0.0.1:9 does not answer" in capsys.readouterr().err


def test_unknown_recipe_name(client, capsys):
    assert main(["build", "--prefix", PREFIX, "no-such-recipe"]) == 1
    assert "no recipe named 'no-such-recipe'" in capsys.readouterr().err


@pytest.mark.parametrize("image", recipe_params())
def test_catalog_image_has_its_framework_in_the_kernel_environment(client, kernel_images, image):
    """Each image `bai-images build` made: labels, the catalog, the seed's check
    in a login shell (as terminals start), and the layout other code relies on."""
    img = client.images.get(image.ref)
    assert img.labels[L.KIND] == "kernel" and img.labels[L.NAME] == image.name
    assert img.labels[L.PYTHON] == "3.11"
    assert resolve_image(build_catalog(client.api.images(filters={"label": L.KIND})), "someone",
                         image.ref).name == image.name
    out = run(client, image.ref, "bash", "-lc", "echo $SHELL; command -v python pip; " + image.seed_check())
    *_, shell, python, pip, version = out.splitlines()
    assert [shell, python, pip] == [Y.SHELL, f"{Y.KERNEL_ENV}/bin/python", f"{Y.KERNEL_ENV}/bin/pip"], out
    assert image.says(version), out
    # pip --user goes to the home volume; plain pip into the kernel environment, which the user owns
    out = run(client, image.ref, "sh", "-c", f"python -m site --user-site; test -w {Y.KERNEL_ENV}/lib "
                                              f"&& echo kernel-writable; test -w {Y.SERVER_ENV}/lib || echo server-not")
    assert out.split() == ["/home/jovyan/.local/lib/python3.11/site-packages", "kernel-writable", "server-not"]


def test_real_base_image(client, kernel_images):
    base = client.images.get(f"{kernel_images.rsplit('/', 1)[0]}/base:bookworm")
    assert base.labels[L.KIND] == "base"
    assert not any(c.name == "base" for c in build_catalog(client.api.images(filters={"label": L.KIND})))
    # MLflow server in its own environment; the session apps in the server's
    out = run(client, base.id, "sh", "-c", f"$BAI_MLFLOW_BIN --version; mlflow-server --version; "
                                           f"{Y.SERVER_ENV}/bin/python -c 'import bai_session_apps; print(\"apps\")'")
    assert "apps" in out and out.count("version") >= 2


def test_list_shows_catalog(client, kernel_images, capsys):
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    for image in catalog_recipes():
        if image.default:
            assert image.ref in table
    assert "scikit-learn 1.6" in table and "TensorFlow 2.21" in table and "GiB" in table

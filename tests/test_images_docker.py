"""The image builder against the real Docker engine.

Builds tiny derived recipes on the real base image into throwaway
``bai-test-<id>/...`` names (the base is found by its recipe-hash label, so it
is not rebuilt when ``bai-images build`` has run), and checks the real
default images. Everything created is named ``bai-test-...`` and removed.
"""

import importlib.metadata
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from bai_spawner import labels as L
from bai_spawner.catalog import build_catalog, resolve_image
from bai_spawner.images.builder import DEFAULT_CACHE, DEFAULT_RECIPES, BuildError, Builder, docker_client, main

pytestmark = pytest.mark.docker

RUN = uuid.uuid4().hex[:8]
PREFIX = f"{L.TEST_PREFIX}{RUN}/"
CACHE = Path(os.environ.get("BAI_CACHE_DIR") or DEFAULT_CACHE)

TINY = """
name = "{name}"
framework = "threadpoolctl"
version = "3.5.0"
display_name = "Test threadpoolctl 3.5"
base = "base"
packages = ["threadpoolctl==3.5.0"]
{extra}
"""


@pytest.fixture(scope="module")
def client():
    try:
        return docker_client()
    except BuildError as e:
        pytest.fail(f"{e} (the docker tests need a running engine: scripts/setup.sh starts one)")


def _cleanup(client):
    for c in client.containers.list(all=True, filters={"name": f"{L.TEST_PREFIX}{RUN}"}):
        c.remove(force=True)
    for img in client.images.list():
        for tag in img.tags:
            if tag.startswith(PREFIX):
                client.images.remove(tag, force=True)
    for lab in ("bai-test-tiny", "bai-test-broken", "bai-test-nowheel", "bai-test-py37"):
        for img in client.api.images(all=True, filters={"label": f"{L.NAME}={lab}"}):
            client.api.remove_image(img["Id"], force=True)
    for d in CACHE.glob("wheels/bai-test-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in CACHE.glob("wheels/.bai-test-*"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def recipes_dir(tmp_path_factory, client):
    d = tmp_path_factory.mktemp("recipes")
    shutil.copy(DEFAULT_RECIPES / "base.toml", d / "base.toml")
    (d / "bai-test-tiny.toml").write_text(TINY.format(
        name="bai-test-tiny",
        extra="test = \"python -c 'import threadpoolctl; assert threadpoolctl.__version__ == \\\"3.5.0\\\"'\""))
    (d / "bai-test-broken.toml").write_text(TINY.format(name="bai-test-broken", extra='test = "exit 3"'))
    (d / "bai-test-nowheel.toml").write_text(TINY.format(name="bai-test-nowheel", extra="").replace(
        "threadpoolctl==3.5.0", "threadpoolctl==0.0.999"))
    (d / "bai-test-py37.toml").write_text(TINY.format(name="bai-test-py37", extra='python = "3.7"'))
    yield d
    _cleanup(client)


def builder(client, recipes_dir, out):
    return Builder(client=client, recipes_dir=recipes_dir, cache_dir=CACHE, prefix=PREFIX, out=out.append)


def leftovers(client, name):
    containers = client.containers.list(all=True, filters={"name": f"{L.TEST_PREFIX}{RUN}"})
    images = client.api.images(all=True, filters={"label": f"{L.NAME}={name}"})
    tags = [t for i in client.images.list() for t in i.tags if t.startswith(PREFIX)]
    return containers, images, tags


def run(client, image, *cmd):
    return client.containers.run(image, list(cmd), remove=True, network_mode="none",
                                 name=f"{L.TEST_PREFIX}{RUN}-{uuid.uuid4().hex[:6]}").decode().strip()


def test_derived_recipe_builds_with_labels_and_then_is_cached(client, recipes_dir):
    out = []
    b = builder(client, recipes_dir, out)
    t0 = time.monotonic()
    ids = b.build(["bai-test-tiny"])
    fresh = time.monotonic() - t0
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
    assert "PATH=/opt/bai/venv/bin:" in " ".join(cfg["Env"])
    # the version inside is the recipe's; the session runs as jovyan from the shared venv
    assert run(client, ref, "python", "-c", "import threadpoolctl; print(threadpoolctl.__version__)") == "3.5.0"
    assert run(client, ref, "sh", "-c", "id -un; id -u; id -g; command -v python; echo $HOME").split() == \
        ["jovyan", "1000", "100", "/opt/bai/venv/bin/python", "/home/jovyan"]
    # base packages are still there
    assert run(client, ref, "jupyterhub-singleuser", "--version") == importlib.metadata.version("jupyterhub")
    # nothing is left of the build
    containers, _, tags = leftovers(client, "bai-test-tiny")
    # (the base is tagged under PREFIX too when the real one was stale and got built here)
    assert containers == [] and set(tags) <= {ref, f"{PREFIX}base:bookworm"} and ref in tags

    out2 = []
    t0 = time.monotonic()
    ids2 = builder(client, recipes_dir, out2).build(["bai-test-tiny"])
    cached = time.monotonic() - t0
    assert ids2["bai-test-tiny"] == ids["bai-test-tiny"]
    assert any(ref in line and "up to date" in line for line in out2), out2
    assert not any("building" in line for line in out2), out2
    assert cached < 15, (cached, fresh)


def test_failing_test_step_leaves_no_container_or_image(client, recipes_dir):
    b = builder(client, recipes_dir, [])
    with pytest.raises(BuildError) as e:
        b.build(["bai-test-broken"])
    assert "test failed" in str(e.value) and "exit 3" in str(e.value)
    containers, images, tags = leftovers(client, "bai-test-broken")
    assert containers == [] and images == []
    assert not any("bai-test-broken" in t for t in tags)


def test_missing_wheel_fails_clearly_and_leaves_nothing(client, recipes_dir):
    b = builder(client, recipes_dir, [])
    with pytest.raises(BuildError) as e:
        b.build(["bai-test-nowheel"])
    msg = str(e.value)
    assert "pip download failed" in msg and "threadpoolctl==0.0.999" in msg
    assert "bai-test-nowheel.toml" in msg and "'packages'" in msg
    containers, images, _ = leftovers(client, "bai-test-nowheel")
    assert containers == [] and images == []
    assert not list(CACHE.glob("wheels/*bai-test-nowheel*"))


def test_wrong_python_fails_before_building(client, recipes_dir):
    b = builder(client, recipes_dir, [])
    with pytest.raises(BuildError, match="needs Python 3.7.*has Python 3.11"):
        b.build(["bai-test-py37"])
    containers, images, _ = leftovers(client, "bai-test-py37")
    assert containers == [] and images == []


def test_tensorflow_115_recipe_refuses_clearly(client, capsys):
    # the shipped TF 1.15 recipe needs Python 3.7; with the base built this fails at once
    if not client.api.images(filters={"label": f"{L.NAME}=base"}):
        pytest.skip("no base image on the engine")
    rc = main(["build", "--prefix", PREFIX, "tensorflow-1.15"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "needs Python 3.7" in err and "tensorflow-1.15" in err


def test_engine_down_message(monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    with pytest.raises(BuildError, match=r"Cannot reach the Docker engine at tcp://127.0.0.1:9: "
                                         r"start dockerd or set DOCKER_HOST"):
        docker_client()
    assert main(["build", "--prefix", PREFIX, "sklearn-1.6"]) == 1
    assert "Cannot reach the Docker engine" in capsys.readouterr().err
    assert main(["list"]) == 1


def test_unknown_recipe_name(client, capsys):
    assert main(["build", "--prefix", PREFIX, "no-such-recipe"]) == 1
    assert "no recipe named 'no-such-recipe'" in capsys.readouterr().err


def test_real_default_images(client, kernel_images):
    """The images `bai-images build` made: labels, version inside, catalog."""
    expected = {"bai/sklearn:1.6.1": "1.6.1", "bai/sklearn:1.5.2": "1.5.2"}
    catalog = build_catalog(client.api.images(filters={"label": L.KIND}))
    for ref, version in expected.items():
        img = client.images.get(ref)
        assert img.labels[L.KIND] == "kernel" and img.labels[L.VERSION] == version
        assert img.labels[L.FRAMEWORK] == "scikit-learn" and img.labels[L.PYTHON] == "3.11"
        assert run(client, ref, "python", "-c", "import sklearn; print(sklearn.__version__)") == version
        assert resolve_image(catalog, "someone", ref).version == version
    base = client.images.get("bai/base:bookworm")
    assert base.labels[L.KIND] == "base"
    assert not any(c.ref == "bai/base:bookworm" for c in catalog)
    # MLflow server isolated in its own venv; session apps installed; pip --user goes to the home
    out = run(client, "bai/sklearn:1.6.1", "sh", "-c",
              "$BAI_MLFLOW_BIN --version; mlflow-server --version; "
              "python -c 'import bai_session_apps, mlflow; print(\"ok\")'; "
              "python -m site --user-site; test -w /opt/bai/venv/lib && echo venv-writable")
    assert "ok" in out and "/home/jovyan/.local/lib/python3.11/site-packages" in out
    assert "venv-writable" in out and out.count("version") >= 2


def test_list_shows_catalog(client, kernel_images, capsys):
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "bai/sklearn:1.6.1" in table and "scikit-learn 1.6" in table and "GiB" in table

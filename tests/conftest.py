import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ARTIFACTS, EXTRA_IMAGES, IMAGE_PREFIX, KERNEL_IMAGE
from helpers.hub import CHROMIUM, CHROMIUM_ARGS, Hub, docker


def pytest_configure(config):
    ARTIFACTS.mkdir(exist_ok=True)
    config.addinivalue_line("markers", f"{EXTRA_IMAGES}: the second version of each framework (large builds); "
                                       f"run only when asked: scripts/run-tests -m {EXTRA_IMAGES}")


def pytest_collection_modifyitems(config, items):
    """Tests of images that are not built by default run only when ``-m`` names them."""
    if EXTRA_IMAGES in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason=f"second framework versions: run with scripts/run-tests -m {EXTRA_IMAGES}")
    for item in items:
        if EXTRA_IMAGES in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def docker_engine():
    if docker("info").returncode != 0:
        pytest.fail("No Docker engine answers: run scripts/setup.sh (it starts dockerd).")
    return True


@pytest.fixture(scope="session")
def kernel_images(docker_engine):
    """The images `bai-images build` makes by default, in the registry every hub of the suite uses
    (scripts/setup.sh has built and pushed them)."""
    from bai_scheduler.contract.registry import RegistryError, split_name
    from bai_spawner.images import recipes, sources
    from helpers.registry import SHARED

    try:
        SHARED.client().ping()
    except RegistryError as e:
        pytest.fail(f"{e.message} (the suite's hubs use it)")
    shipped = recipes.load_recipes(sources.recipes_dir())
    wanted = [shipped[n].image_ref(IMAGE_PREFIX) for n in recipes.default_names(shipped)]
    if any(docker("image", "inspect", i).returncode != 0 or SHARED.client().image(*split_name(i)) is None
           for i in wanted):
        subprocess.run([shutil.which("bai-images") or ".venv/bin/bai-images", "build"], check=True)
    return KERNEL_IMAGE


@pytest.fixture(scope="session")
def hub(tmp_path_factory, kernel_images):
    """One hub for the suite: 1 simulated 8 GiB GPU at 2 fGPU per GPU (the seed's demo)."""
    h = Hub(tmp_path_factory.mktemp("hub"))
    try:
        h.start()
        yield h
    finally:
        h.stop()
        shutil.copy(h.log_path, ARTIFACTS / "jupyterhub-main.log") if h.log_path.exists() else None
        h.cleanup()


@pytest.fixture
def fresh_hub(tmp_path, kernel_images):
    """A hub of its own, for tests that restart or break things."""
    hubs = []

    def make(**kw):
        h = Hub(tmp_path / f"hub{len(hubs)}", **kw)
        hubs.append(h)
        return h

    yield make
    for h in hubs:
        h.stop()
        h.cleanup()


@pytest.fixture
def users(hub, request):
    """Makes users with tokens; stops their servers afterwards so capacity is free again."""
    made = []

    def make(name, admin=False):
        full = f"{request.node.name[:20].replace('_', '').lower()}{name}"
        token = hub.add_user(full, admin=admin)
        made.append(full)
        return full, token

    yield make
    for name in made:
        for server in list(hub.servers(name)):
            hub.stop_server(name, server)
        for server in list(hub.servers(name)):
            hub.wait_gone(name, server)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser).

    Module-scoped on purpose: Playwright's sync API keeps an event loop running
    in the main thread while it is open, which would break later asyncio tests.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh --test installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()

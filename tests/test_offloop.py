"""Finding 6 of issue 13: Docker and NVML calls never run on the event loop.

Each test makes the blocking call slow (0.6 s) and checks that a heartbeat task on the loop
kept beating meanwhile."""
import asyncio
import sys
import time
import types

from bai_scheduler.core.model import Device, Node

from helpers.loopwatch import longest_stall

SLOW = 0.6


class SlowRegistry:
    def images(self):
        time.sleep(SLOW)  # the registry's catalog, tags and config blobs: round trips
        return []


async def test_launch_catalog_reads_the_registry_off_the_loop():
    from bai_scheduler.contract.registry import BaiRegistry
    from bai_scheduler.images import CatalogCache

    cache = CatalogCache(BaiRegistry(url="http://127.0.0.1:5000"), "bai-private")
    cache.client = SlowRegistry()
    assert await longest_stall(cache.get(max_age=0)) < SLOW / 2


async def test_live_gpu_stats_read_nvml_off_the_loop(monkeypatch):
    from bai_scheduler import inventory
    from bai_scheduler.core.units import FgpuUnits
    from bai_scheduler.web import pages

    def slow(*args):
        time.sleep(SLOW / 3)
        return types.SimpleNamespace(used=1, total=2, gpu=5)

    fake = types.SimpleNamespace(nvmlInit=slow, nvmlDeviceGetHandleByUUID=slow, nvmlDeviceGetMemoryInfo=slow,
                                 nvmlDeviceGetUtilizationRates=slow)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setitem(inventory._live_cache, "at", 0.0)
    monkeypatch.setattr(pages, "node_rows", lambda *args: [])  # only the reading is under test
    node = Node("local", "", (Device("GPU-1", 0, "real", 2, 1, 4),))
    handler = types.SimpleNamespace(
        service=types.SimpleNamespace(units=FgpuUnits(2, "0.5"), nodes=[node], records={}, capacity=lambda: [],
                                      statuses=lambda records: [], group_usage=lambda: {}, groups={}),
        settings={"readiness": {}, "registry": types.SimpleNamespace(host="127.0.0.1:5000")},
        notices=types.SimpleNamespace(for_user=lambda user, listed=None: []),
    )

    async def no_users(who):
        return []

    handler.hub_users = no_users
    gap = await longest_stall(pages.PageHandler.page_data(handler, {"admin": True, "name": "boss"}))
    assert gap < SLOW / 2


def slow_client(*args, **kw):
    time.sleep(SLOW)  # what docker.APIClient(version="auto") does: a round trip
    return object()


async def test_spawner_makes_its_docker_client_off_the_loop(monkeypatch):
    from jupyterhub.objects import Hub

    from bai_scheduler.contract.catalog import CatalogImage
    from bai_spawner import spawner as spawner_mod
    from bai_spawner.spawner import BaiSpawner

    user = types.SimpleNamespace(name="alice", escaped_name="alice", url="/user/alice/", id=1, settings={},
                                 spawners={})
    spawner = BaiSpawner(user=user, hub=Hub(), _log_name="alice")
    monkeypatch.setattr(BaiSpawner, "client", property(lambda self: slow_client()))
    image = CatalogImage("127.0.0.1:5000/bai/x:1", "x", "1", "x", "3.12", "kernel", id="sha256:1")
    monkeypatch.setattr(spawner_mod, "local_id", lambda client, ref: image.id)  # the node holds it: no pull
    # The first call on a node (before the pull or the container) makes the node's client.
    assert await longest_stall(spawner._ensure_image(image, "local", {"epoch": 0})) < SLOW / 2

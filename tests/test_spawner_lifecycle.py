"""BaiSpawner's stop and release paths against a scripted engine and scheduler (no hub)."""
import contextlib
import types

import docker
import pytest
from dockerspawner import DockerSpawner
from jupyterhub.objects import Hub

from bai_spawner.spawner import BaiSpawner

ATTEMPT = "a" * 32


class FakeScheduler:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        async def call(*args, **kw):
            self.calls.append((name, args))
            return {}

        return call


@pytest.fixture
def spawner(monkeypatch):
    user = types.SimpleNamespace(name="alice", escaped_name="alice", url="/user/alice/", id=1, settings={},
                                 spawners={})
    sp = BaiSpawner(user=user, hub=Hub(), _log_name="alice")
    sp.request_id = ATTEMPT
    sp.object_id = "c0ffee"
    fake = FakeScheduler()
    monkeypatch.setattr(BaiSpawner, "scheduler", property(lambda self: fake))
    return sp, fake


def stop_raising(monkeypatch, exc):
    async def stop(self, now=False):
        raise exc

    monkeypatch.setattr(DockerSpawner, "stop", stop)


async def test_finding_1c_failed_docker_stop_keeps_the_share(spawner, monkeypatch):
    sp, fake = spawner
    stop_raising(monkeypatch, docker.errors.APIError("500 Server Error", explanation="engine busy"))
    with contextlib.suppress(docker.errors.APIError):  # whether stop() raises is not the point
        await sp.stop()
    names = [name for name, _ in fake.calls]
    assert "release" not in names, "the share was released while the container may still run"
    assert names == ["stop_failed"] and fake.calls[0][1][0] == ATTEMPT
    assert "engine busy" in fake.calls[0][1][1]
    assert sp.request_id == ""  # the hub forgets the attempt; the scheduler owns it now


async def test_stopped_or_missing_container_releases_its_attempt(spawner, monkeypatch):
    sp, fake = spawner

    async def stop(self, now=False):
        self.clear_state()

    monkeypatch.setattr(DockerSpawner, "stop", stop)
    await sp.stop()
    assert fake.calls == [("release", (ATTEMPT,))]
    sp.request_id, sp.object_id = ATTEMPT, "c0ffee"
    fake.calls.clear()
    stop_raising(monkeypatch, docker.errors.NotFound("gone"))
    await sp.stop()
    assert fake.calls == [("release", (ATTEMPT,))]


async def test_queued_spawn_stop_releases_without_touching_docker(spawner, monkeypatch):
    sp, fake = spawner
    sp.object_id = ""
    stop_raising(monkeypatch, AssertionError("no container to stop"))
    assert await sp.poll() is None  # a queued request counts as alive, so the hub calls stop()
    await sp.stop()
    assert fake.calls == [("release", (ATTEMPT,))]


async def test_lost_scheduler_while_queued_keeps_the_request_and_the_server(spawner, monkeypatch):
    """A hub shutdown stops the service first: the queued spawn's long-poll fails. That is no
    refusal: nothing is released (not by the spawn, nor by the hub's stop() after it) and the
    named server is not removed, so the request starts by itself after the restart."""
    from bai_scheduler.contract.catalog import CatalogImage
    from bai_scheduler.contract.client import SchedulerError
    from bai_scheduler.contract.options import SessionOptions
    from bai_scheduler.core.units import FgpuUnits
    from bai_spawner.spawner import StillQueued

    sp, fake = spawner
    sp.request_id, sp.object_id = "", ""
    image = CatalogImage("bai/sklearn:1.6.1", "sklearn", "1.6.1", "scikit-learn 1.6", "3.11", "kernel")

    async def resolve(self):
        return SessionOptions(image.ref, 2, 500, 2**30), FgpuUnits(), image

    async def register(*args, **kw):
        fake.calls.append(("register", args))
        return {"id": ATTEMPT, "state": "PENDING", "epoch": 1, "position": 1}

    async def wait(*args):
        fake.calls.append(("wait", args))
        raise SchedulerError(500, "Internal Server Error")

    monkeypatch.setattr(BaiSpawner, "_resolve", resolve)
    fake.register, fake.wait = register, wait
    removals = []

    async def remove_failed_server(self):
        removals.append(self.name)

    monkeypatch.setattr(BaiSpawner, "_remove_failed_server", remove_failed_server)
    sp.orm_spawner = types.SimpleNamespace(name="c", state=None, user_options=None, server=None)  # a fresh named server
    with pytest.raises(StillQueued, match="stays queued"):
        await sp.start()
    await sp.stop()  # what the hub does after a failed spawn
    assert [name for name, _ in fake.calls] == ["register", "wait"]
    assert removals == []

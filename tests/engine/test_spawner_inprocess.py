"""BaiSpawner in the test's process (tests/helpers/spawner.py) against the real Docker engine and
a real scheduler service process: the progress it streams while queued and admitted, poll, stop,
and the share it gives back.  No hub: the container runs ``sleep`` instead of a notebook server.
(The same through a real hub: tests/hub/test_hub_sessions.py.)
"""
from __future__ import annotations

import asyncio
import json
import secrets

import pytest

from helpers import KERNEL_IMAGE
from helpers.registry import reference
from helpers.hub import docker
from helpers.service import PREFIX, standalone_service
from helpers.spawner import make_spawner

from bai_scheduler.contract import labels

pytestmark = pytest.mark.docker

GOOD = {"image": KERNEL_IMAGE, "fgpu": "1", "cpu": "0.5", "memory": "1"}


@pytest.fixture
def deployment(tmp_path, kernel_images):
    """A service on the local engine (1 simulated GPU = 2 fGPU) under a hub id of its own."""
    name = f"bai-test-{secrets.token_hex(3)}"
    config = f"""
c = get_config()
c.BaiScheduler.db_url = "sqlite:///{tmp_path / 'sched.sqlite'}"
c.BaiScheduler.hub_id = "{name}"
c.BaiScheduler.nodes = [{{"name": "local", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB"}}]
c.BaiScheduler.wait_timeout = 5
# The fake hub runs no servers, so a periodic reconcile would rightly free the test's blocker
# (a request with no container that no hub starts) if a slow run reached it mid-test.
c.BaiScheduler.reconcile_interval = 3600
"""
    with standalone_service(tmp_path, config, "spawner-inprocess-service.log") as (raw, token, hub, log):
        def call(method, path, body=None):
            code, _, out = raw.call(method, PREFIX + path, json.dumps(body).encode() if body else None, token=token)
            return code, json.loads(out) if out else {}

        yield {"name": name, "url": f"http://127.0.0.1:{raw.port}", "token": token, "call": call}
    ids = docker("ps", "-aq", "--filter", f"name=^/{name}").stdout.split()
    if ids:
        docker("rm", "-f", *ids)
    vols = [v for v in docker("volume", "ls", "-q").stdout.split() if v.startswith(name)]
    if vols:
        docker("volume", "rm", "-f", *vols)


def spawner_for(d, user="alice", server="work", **options):
    sp = make_spawner(user, server, scheduler_url=d["url"], scheduler_token=d["token"], hub_id=d["name"],
                      name_template=d["name"] + "-{username}--{servername}",
                      volumes={d["name"] + "-home-{username}": "/home/jovyan"},
                      cmd=["sh", "-c", "exec sleep 600"], image=KERNEL_IMAGE, wait_poll_seconds=2)
    sp.user_options = {**GOOD, **options}
    return sp


async def watch(sp) -> list[dict]:
    """The spawn's progress events, as the hub's progress page reads them."""
    while not hasattr(sp, "_events"):
        await asyncio.sleep(0.01)
    return [ev async for ev in sp.progress()]


async def until(predicate, timeout=60, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def requests_of(d) -> dict:
    code, out = d["call"]("GET", "api/requests")
    assert code == 200, out
    return {f"{r['user']}/{r['server']}": r for r in out["requests"]}


async def test_queued_then_admitted_then_stopped_in_process(deployment):
    d = deployment
    # Someone holds the whole GPU: the spawn must queue, and say so.
    code, blocker = d["call"]("PUT", "api/requests/bob/big", {"quanta": 4, "image": KERNEL_IMAGE})
    assert code == 201 and blocker["state"] == "RUNNING", blocker
    sp = spawner_for(d)
    start = asyncio.ensure_future(sp.start())
    events = asyncio.ensure_future(watch(sp))
    # (the spawner knows its request once the registration's answer is back, a moment after the
    # service lists it: on a loaded machine poll() came in between)
    await until(lambda: sp.request_id and requests_of(d).get("alice/work", {}).get("state") == "PENDING",
                what="alice/work queued")
    assert await sp.poll() is None  # queued counts as alive: the hub's Stop must reach stop()
    assert not start.done()

    code, _ = d["call"]("DELETE", f"api/attempts/{blocker['id']}")
    assert code == 200
    ip, port = await asyncio.wait_for(start, 120)
    assert ip == "127.0.0.1" and port > 0
    messages = [e["message"] for e in await asyncio.wait_for(events, 60)]
    progress = [e["progress"] for e in await asyncio.wait_for(watch(sp), 60)]
    assert progress == sorted(progress), progress
    assert messages[0].startswith("Requesting 1 fGPU, 0.5 CPU, 1 GiB")
    assert any(m.startswith("Needs 1 fGPU; ") and " (#1 in queue)" in m for m in messages), messages
    assert any(m.startswith("Admitted on node local with 1 fGPU") for m in messages), messages
    assert messages[-1] == "Container started; waiting for the notebook server"

    # The container is the admitted request's, and the state says where it runs.
    (info,) = json.loads(docker("inspect", sp.object_id).stdout)
    lab = info["Config"]["Labels"]
    assert lab[labels.REQUEST_ID] == sp.request_id == requests_of(d)["alice/work"]["id"]
    assert lab[labels.HUB] == d["name"] and info["Config"]["Image"] == reference(KERNEL_IMAGE)
    assert sp.get_state()["request_id"] == sp.request_id
    assert await sp.poll() is None

    await sp.stop()
    assert "alice/work" not in requests_of(d)  # the share is back
    # and the container goes (remove=True: the engine may still be removing it when stop returns)
    await until(lambda: docker("inspect", info["Id"]).returncode != 0, 120, what="the container removed")
    assert sp.get_state().get("request_id") is None and await sp.poll() == 0


async def test_stop_while_queued_cancels_the_request_and_makes_nothing(deployment):
    d = deployment
    code, blocker = d["call"]("PUT", "api/requests/bob/big", {"quanta": 4, "image": KERNEL_IMAGE})
    assert code == 201
    sp = spawner_for(d, server="later")
    start = asyncio.ensure_future(sp.start())
    await until(lambda: requests_of(d).get("alice/later", {}).get("state") == "PENDING", what="alice/later queued")
    # What the hub does on Stop of a pending spawn: cancel start(), then stop().
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert "alice/later" in requests_of(d)  # a cancelled start alone keeps the place in the queue
    await sp.stop()
    assert "alice/later" not in requests_of(d)
    assert not docker("ps", "-aq", "--filter", f"name=^/{d['name']}-alice--later").stdout.strip()
    assert requests_of(d)["bob/big"]["state"] == "RUNNING"  # someone else's share untouched


async def test_a_refused_request_releases_nothing_and_says_why(deployment):
    sp = spawner_for(deployment, fgpu="4")  # more than the 2-fGPU cluster
    with pytest.raises(Exception, match="at most 2 fGPU"):
        await sp.start()
    assert requests_of(deployment) == {} and not sp.request_id

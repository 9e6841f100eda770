"""The scheduler service's state machine with a real database (no HTTP)."""
import asyncio

import pytest

from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.model import RequestKey, Share
from bai_scheduler.service import ContainerFacts, Refused, Service
from bai_scheduler.store import Store
from bai_scheduler.core.units import FgpuUnits

UNITS = FgpuUnits(2, "0.5")  # the seed: 1 GPU = 2 fGPU, steps of 0.5
ONE_FGPU = 2  # quanta


def make(db_url, gpus=1):
    nodes = simulated_nodes([{"name": "local", "docker_url": "", "gpus": gpus, "gpu_memory": "8GiB"}], UNITS)
    return Service(nodes, UNITS, Store(db_url))


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 's.sqlite'}"


def key(n):
    return RequestKey("alice", f"s{n}")


def held(svc):
    """Quanta held per device, from the capacity view."""
    return {d["uuid"]: d["used_quanta"] for n in svc.capacity() for d in n["devices"]}


async def test_seed_scenario_two_running_one_pending_then_promoted(db):
    svc = make(db)
    recs = [await svc.submit(key(i), ONE_FGPU) for i in range(3)]
    assert [r.state for r in recs] == ["RUNNING", "RUNNING", "PENDING"]
    assert svc.status(recs[2])["position"] == 1
    admitted = await svc.release(key(0))
    assert [r.key for r in admitted] == [key(2)]
    assert svc.get(key(2)).state == "RUNNING"
    assert sum(held(svc).values()) == 2 * ONE_FGPU


async def test_state_survives_restart_without_double_grants(db):
    svc = make(db)
    for i in range(3):
        await svc.submit(key(i), ONE_FGPU)
    again = make(db)
    assert {k: r.state for k, r in again.records.items()} == {
        key(0): "RUNNING", key(1): "RUNNING", key(2): "PENDING"}
    assert sum(held(again).values()) == 2 * ONE_FGPU
    await again.release(key(1))
    assert again.get(key(2)).state == "RUNNING"
    third = make(db)
    assert third.get(key(2)).state == "RUNNING" and third.get(key(1)) is None


async def test_duplicate_and_never_fitting_requests_change_nothing(db):
    svc = make(db)
    await svc.submit(key(0), ONE_FGPU)
    with pytest.raises(Refused) as e:
        await svc.submit(key(0), ONE_FGPU)
    assert e.value.status == 409
    with pytest.raises(Refused):
        await svc.submit(key(1), 3 * ONE_FGPU)  # more than the node has
    assert list(svc.records) == [key(0)]
    assert make(db).records.keys() == {key(0)}


async def test_reattach_returns_the_same_record(db):
    svc = make(db)
    first = await svc.submit(key(0), ONE_FGPU)
    again = await svc.submit(key(0), ONE_FGPU, reattach=True)
    assert again.id == first.id and len(svc.records) == 1


async def test_stale_release_does_not_free_a_newer_session(db):
    svc = make(db)
    old = await svc.submit(key(0), ONE_FGPU)
    await svc.release(key(0), old.id)
    new = await svc.submit(key(0), ONE_FGPU)
    assert await svc.release(key(0), old.id) == []
    assert svc.get(key(0)).id == new.id


async def test_waiter_wakes_on_admission(db):
    svc = make(db)
    await svc.submit(key(0), ONE_FGPU)
    await svc.submit(key(1), ONE_FGPU)
    pending = await svc.submit(key(2), ONE_FGPU)
    waiter = asyncio.ensure_future(svc.wait(key(2), svc.epoch, timeout=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await svc.release(key(1))
    rec = await asyncio.wait_for(waiter, 1)
    assert rec.id == pending.id and rec.state == "RUNNING"


async def test_reconcile_engine_wins(db):
    svc = make(db)
    a = await svc.submit(key(0), ONE_FGPU)
    await svc.submit(key(1), ONE_FGPU)
    await svc.submit(key(2), ONE_FGPU)
    dev = svc.nodes[0].devices[0].uuid
    # Engine: key 0 still runs; key 1's container is gone; a container for
    # bob exists that the database never heard of.
    svc._attached.clear()
    facts = [
        ContainerFacts(a.id, key(0), "local", (Share(dev, ONE_FGPU),), 0, 0, "img", True),
        ContainerFacts("x" * 32, RequestKey("bob", ""), "local", (), 500, 0, "img", True),
    ]
    first = await svc.reconcile(facts)
    assert first["released"] == []  # just admitted: its container may be being created
    assert first["restored"] == ["bob"]
    result = await svc.reconcile(facts, grace=0)
    assert result["released"] == [str(key(1))]
    assert svc.get(key(1)) is None
    assert svc.get(key(2)).state == "RUNNING"  # freed share went to the queue
    assert svc.get(RequestKey("bob", "")).state == "RUNNING"
    assert make(db).get(key(2)).state == "RUNNING"

"""The scheduler service's state machine with a real database (no HTTP), and a scripted engine.

The tests named after a finding of issue 13 each failed on the code before it was fixed."""
import asyncio
import sqlite3
import threading
import time

import pytest

from bai_scheduler.core.model import RequestKey
from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.units import FgpuUnits
from bai_scheduler.service import ContainerFacts, Refused, Service
from bai_scheduler.store import Store, StoreUnavailable

from helpers.loopwatch import Heartbeat

UNITS = FgpuUnits(2, "0.5")  # the seed: 1 GPU = 2 fGPU, steps of 0.5
ONE_FGPU = 2  # quanta
WHOLE = 4


class FakeEngines:
    """Containers by attempt id, as the engines would list them; removal can be made to fail."""

    def __init__(self):
        self.containers: dict[str, ContainerFacts] = {}
        self.fail: str | None = None
        self.removed: list[str] = []

    def run(self, rec, state="running"):
        p = rec.placement
        self.containers[rec.id] = ContainerFacts(rec.id, rec.key, p.node, p.shares, p.cpu_millis,
                                                 p.memory_bytes, rec.request.image, state)

    def set_state(self, rec, state):
        f = self.containers[rec.id]
        self.containers[rec.id] = ContainerFacts(f.request_id, f.key, f.node, f.shares, f.cpu_millis,
                                                 f.memory_bytes, f.image, state)

    def listing(self, nodes=("local",)):
        return {n: [f for f in self.containers.values() if f.node == n] for n in nodes}

    async def remove(self, node, request_id):
        if self.fail:
            raise RuntimeError(self.fail)
        self.removed.append(request_id)
        return 1 if self.containers.pop(request_id, None) else 0


def make(db_url, gpus=1, engines=None, **kw):
    nodes = simulated_nodes([{"name": "local", "docker_url": "", "gpus": gpus, "gpu_memory": "8GiB"}], UNITS)
    return Service(nodes, UNITS, Store(db_url), engines=engines, **kw)


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 's.sqlite'}"


def key(n):
    return RequestKey("alice", f"s{n}")


def held(svc):
    """Quanta held per device, from the capacity view."""
    return {d["uuid"]: d["used_quanta"] for n in svc.capacity() for d in n["devices"]}


async def settle(svc):
    """Let the service's background removals run to their end."""
    for _ in range(200):
        if not svc._removals:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"removals still running: {list(svc._removals)}")


async def reconcile(svc, engines, since=None, hub=None):
    return await svc.reconcile(engines.listing(), svc.begin_listing() if since is None else since, hub)


# -- the basics --------------------------------------------------------------------------------------


async def test_seed_scenario_two_running_one_pending_then_promoted(db):
    svc = make(db)
    recs = [await svc.submit(key(i), ONE_FGPU) for i in range(3)]
    assert [r.state for r in recs] == ["RUNNING", "RUNNING", "PENDING"]
    assert svc.status(recs[2])["position"] == 1
    admitted = await svc.release(recs[0].id)
    assert [r.key for r in admitted] == [key(2)]
    assert svc.get(key(2)).state == "RUNNING"
    assert sum(held(svc).values()) == 2 * ONE_FGPU


async def test_state_survives_restart_without_double_grants(db):
    svc = make(db)
    recs = [await svc.submit(key(i), ONE_FGPU) for i in range(3)]
    again = make(db)
    assert {r.key: r.state for r in again.records.values()} == {
        key(0): "RUNNING", key(1): "RUNNING", key(2): "PENDING"}
    assert sum(held(again).values()) == 2 * ONE_FGPU
    await again.release(recs[1].id)
    assert again.get(key(2)).state == "RUNNING"
    third = make(db)
    assert third.get(key(2)).state == "RUNNING" and third.get(key(1)) is None


async def test_never_fitting_request_is_refused_and_changes_nothing(db):
    svc = make(db)
    await svc.submit(key(0), ONE_FGPU)
    with pytest.raises(Refused) as e:
        await svc.submit(key(1), 3 * ONE_FGPU)  # more than the node has
    assert e.value.status == 400 and "largest" in str(e.value)
    assert [r.key for r in svc.records.values()] == [key(0)]
    assert [r.key for r in make(db).records.values()] == [key(0)]


async def test_waiter_wakes_on_admission(db):
    svc = make(db)
    first = await svc.submit(key(0), ONE_FGPU)
    await svc.submit(key(1), ONE_FGPU)
    pending = await svc.submit(key(2), ONE_FGPU)
    waiter = asyncio.ensure_future(svc.wait(pending.id, svc.epoch, timeout=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await svc.release(first.id)
    rec = await asyncio.wait_for(waiter, 1)
    assert rec.id == pending.id and rec.state == "RUNNING"


async def test_reconcile_engine_wins(db):
    engines = FakeEngines()
    svc = make(db, engines=engines, admission_grace=0)
    a = await svc.submit(key(0), ONE_FGPU)
    b = await svc.submit(key(1), ONE_FGPU)
    await svc.submit(key(2), ONE_FGPU)
    engines.run(a)  # key 1's container never came; bob runs a container nobody recorded
    bob = ContainerFacts("b" * 32, RequestKey("bob", ""), "local", (), 500, 0, "img", "running")
    engines.containers[bob.request_id] = bob
    svc._seen.clear()  # no spawner waits any more
    result = await reconcile(svc, engines)
    assert result["released"] == [str(key(1))] and result["restored"] == ["bob"]
    assert svc.attempt(b.id) is None
    assert svc.get(key(2)).state == "RUNNING"  # the freed share went to the queue
    assert svc.get(RequestKey("bob", "")).state == "RUNNING"
    assert make(db).get(key(2)).state == "RUNNING"


# -- finding 1: a share given to two sessions ------------------------------------------------------------


async def test_finding_1a_paused_container_keeps_its_share(db):
    """During a snapshot the container is paused: reconcile must not free its share."""
    engines = FakeEngines()
    svc = make(db, engines=engines, admission_grace=0)
    a = await svc.submit(key(0), WHOLE)
    engines.run(a, state="paused")
    svc._seen.clear()
    for state in ("paused", "restarting", "created"):
        engines.set_state(a, state)
        await reconcile(svc, engines)
        assert svc.get(key(0)).state == "RUNNING", state
        assert (await svc.submit(key(1), WHOLE)).state == "PENDING", state
    assert sum(held(svc).values()) == WHOLE


async def test_finding_1b_old_attempts_events_never_touch_the_new_one(db):
    """Registering again makes a new attempt; the old container's events name the old one."""
    engines = FakeEngines()
    svc = make(db, engines=engines)
    old = await svc.submit(key(0), WHOLE)
    engines.run(old)
    new = await svc.submit(key(0), WHOLE)  # e.g. the hub restarts the server
    assert new.id != old.id and svc.get(key(0)) is new
    await settle(svc)  # the service removed the old container: its share went to the new attempt
    assert old.id in engines.removed and svc.attempt(old.id) is None
    assert new.state == "RUNNING" and sum(held(svc).values()) == WHOLE
    engines.run(new)
    # Late events of the old container (die, destroy) change nothing now.
    await svc.container_exited(old.id)
    assert await svc.container_gone(old.id) == []
    assert svc.get(key(0)) is new and new.state == "RUNNING" and sum(held(svc).values()) == WHOLE
    assert (await svc.submit(key(1), WHOLE)).state == "PENDING"


async def test_register_again_keeps_the_place_in_the_queue(db):
    svc = make(db)
    await svc.submit(key(0), WHOLE)
    first = await svc.submit(key(1), ONE_FGPU)
    await svc.submit(key(2), ONE_FGPU)
    again = await svc.submit(key(1), ONE_FGPU)
    assert again.id != first.id and svc.attempt(first.id) is None
    assert svc.status(again)["position"] == 1
    assert svc.gone_reason(first.id).startswith("A newer spawn")
    changed = await svc.submit(key(1), WHOLE)  # a different request goes to the back
    assert svc.status(changed)["position"] == 2


async def test_finding_1c_failed_stop_keeps_the_share_and_is_retried(db):
    engines = FakeEngines()
    svc = make(db, engines=engines)
    a = await svc.submit(key(0), WHOLE)
    engines.run(a)
    engines.fail = "engine down"
    rec = await svc.stopping(a.id, "APIError: 500 Server Error")  # what the spawner reports
    assert rec.state == "STOPPING" and svc.status(rec)["stop_error"]
    await asyncio.sleep(0.05)  # the service tried to remove it and failed
    assert svc.attempt(a.id).stop_error == "RuntimeError: engine down"
    assert (await svc.submit(key(1), WHOLE)).state == "PENDING"  # the share is still held
    assert make(db).attempt(a.id).state == "STOPPING"  # and stays held across a restart
    engines.fail = None
    await asyncio.sleep(1.2)  # the retry removes it, then frees the share
    await settle(svc)
    assert svc.attempt(a.id) is None and svc.get(key(1)).state == "RUNNING"


async def test_finding_1c_stop_without_the_hub_removes_before_freeing(db):
    """The Stop button / DELETE when the hub cannot be reached: the share stays until the
    container is gone (the service removes it)."""
    from bai_scheduler.web.api import stop_session

    engines = FakeEngines()
    engines.fail = "engine down"
    svc = make(db, engines=engines)
    a = await svc.submit(key(0), WHOLE)
    engines.run(a)
    await stop_session(svc, a, hub_stops_it=False)
    assert svc.attempt(a.id).state == "STOPPING" and sum(held(svc).values()) == WHOLE
    engines.fail = None
    await asyncio.sleep(1.2)
    await settle(svc)
    assert svc.attempt(a.id) is None and sum(held(svc).values()) == 0


async def test_exited_container_is_removed_then_freed(db):
    engines = FakeEngines()
    svc = make(db, engines=engines)
    a = await svc.submit(key(0), WHOLE)
    engines.run(a)
    engines.set_state(a, "exited")
    await svc.container_exited(a.id)  # the "die" event
    await settle(svc)
    assert a.id in engines.removed and svc.attempt(a.id) is None


# -- finding 2: reconcile applied a stale list -----------------------------------------------------------


async def test_finding_2_changes_made_during_the_listing_are_not_undone(db):
    engines = FakeEngines()
    svc = make(db, engines=engines, admission_grace=0)
    a = await svc.submit(key(0), ONE_FGPU)
    engines.run(a)
    since = svc.begin_listing()
    listing = engines.listing()  # taken now, applied later
    await svc.release(a.id)  # stopped while the listing was on its way
    b = await svc.submit(key(1), ONE_FGPU)  # and a new session admitted (no container yet)
    svc._seen.clear()
    await svc.reconcile(listing, since)
    assert svc.attempt(a.id) is None, "a stopped session's share came back"
    assert svc.attempt(b.id) is b and b.state == "RUNNING", "the new request was dropped"
    assert sum(held(svc).values()) == ONE_FGPU


async def test_finding_2_engine_restored_container_wins_a_conflict(db):
    """A container the records do not know needs the device an admission (not started yet)
    holds: the admission goes back to the queue, the running container keeps its share."""
    engines = FakeEngines()
    svc = make(db, engines=engines)
    first = await svc.submit(key(0), WHOLE)
    waiting = await svc.submit(key(1), WHOLE)
    await svc.release(first.id)  # key 1 is admitted from the queue; no spawner has it yet
    assert waiting.state == "RUNNING" and not waiting.delivered
    stranger = ContainerFacts("c" * 32, RequestKey("carol", ""), "local", waiting.placement.shares, 0, 0,
                              "img", "running")
    engines.containers[stranger.request_id] = stranger
    result = await reconcile(svc, engines)
    assert result["requeued"] == [str(key(1))] and result["restored"] == ["carol"]
    assert waiting.state == "PENDING" and svc.overcommitted() == {}
    again = await reconcile(svc, engines)  # stable: nothing repeats
    assert not any(again.values())


async def test_overcommit_found_on_the_engine_is_shown(db):
    from bai_scheduler.web.metrics import render

    engines = FakeEngines()
    svc = make(db, engines=engines)
    a = await svc.submit(key(0), WHOLE)  # handed to its spawner: it counts as started
    engines.run(a)
    twin = ContainerFacts("d" * 32, RequestKey("dave", ""), "local", a.placement.shares, 0, 0, "img", "running")
    engines.containers[twin.request_id] = twin
    await reconcile(svc, engines)
    dev = a.placement.shares[0].device_uuid
    assert svc.overcommitted() == {dev: WHOLE}
    assert svc.capacity()[0]["devices"][0]["overcommitted_quanta"] == WHOLE
    assert f'bai_fgpu_overcommitted_quanta{{device="{dev}"}} 4.0' in render(svc).decode()
    await svc.release(a.id)  # the debt is paid off first: nothing is free yet
    assert svc.overcommitted() == {} and held(svc)[dev] == WHOLE


async def test_reconcile_writes_only_what_changed(db):
    engines = FakeEngines()
    svc = make(db, gpus=8, engines=engines, admission_grace=0)
    recs = [await svc.submit(key(i), ONE_FGPU) for i in range(16)]  # all 8 GPUs
    for r in recs[1:]:
        engines.run(r)
    svc._seen.clear()
    writes = []
    apply = svc.store.apply
    svc.store.apply = lambda up, de: (writes.append((len(up), len(de))), apply(up, de))[1]
    await reconcile(svc, engines)
    assert writes == [(0, 1)]  # one release, nothing else rewritten


# -- finding 3: a hub restart during container start ------------------------------------------------------


async def whole_gpu_taken_and_one_queued(db):
    """A service whose hub-start requests are recorded in ``asked``; ``first`` runs on the whole
    GPU (with its container), ``queued`` waits for it."""
    engines = FakeEngines()
    svc = make(db, engines=engines)
    asked = []

    async def orphan(rec):
        asked.append(rec.key)

    svc.on_orphan_admitted = orphan
    first = await svc.submit(key(0), WHOLE)
    engines.run(first)
    return engines, svc, asked, first, await svc.submit(key(1), WHOLE)


async def test_admission_whose_spawner_died_with_the_hub_is_started_not_dropped(db):
    """A queued session admitted a moment after its spawner's long-poll ended (the hub restarted,
    so the admission took the spawner for one between two polls) is still wanted: when the hub
    says it does not start that server, it is asked to, and the share is kept. The code before
    freed the share and forgot the session (the service model test found it)."""
    engines, svc, asked, first, queued = await whole_gpu_taken_and_one_queued(db)
    assert queued.state == "PENDING"
    await svc.wait(queued.id, svc.epoch, timeout=0.01)  # its spawner's last poll, then the hub died
    del engines.containers[first.id]
    await svc.release(first.id)  # its container is gone
    assert svc.get(key(1)) is queued and queued.state == "RUNNING"
    await asyncio.sleep(0)
    assert asked == []  # taken for attached: its spawner was seen a moment ago
    report = await reconcile(svc, engines, hub=set())  # the restarted hub starts nothing
    await asyncio.sleep(0)
    assert svc.get(key(1)) is queued and queued.state == "RUNNING", report
    assert asked == [key(1)] and report["orphans"] == [str(key(1))]
    assert sum(held(svc).values()) == WHOLE
    # Once the hub starts it, its spawner's registration claims the admission as usual; a
    # session nobody starts within the admission grace is freed as before.
    svc.admission_grace = 0
    report = await reconcile(svc, engines, hub=set())
    assert svc.get(key(1)) is None and report["released"] == [str(key(1))]


async def test_a_release_the_database_missed_is_dropped_not_started(db):
    """A spawner released its waiting request (the user stopped it) while the database was down:
    memory went back, so the request lives on and may be admitted later. Nobody wants it: the
    reconcile drops it and never asks the hub to start it."""
    engines, svc, asked, first, queued = await whole_gpu_taken_and_one_queued(db)
    apply = svc.store.apply

    def down_once(*args):
        svc.store.apply = apply
        raise StoreUnavailable("database unavailable (the test's)")

    svc.store.apply = down_once
    with pytest.raises(StoreUnavailable):
        await svc.release(queued.id)
    assert svc.get(key(1)) is not None  # not written, so not forgotten either
    report = await reconcile(svc, engines, hub={key(0)})
    assert svc.get(key(1)) is None and report["released"] == [str(key(1))]
    await asyncio.sleep(0)
    assert asked == []


async def test_finding_3_container_the_hub_does_not_know_is_removed(db):
    engines = FakeEngines()
    svc = make(db, engines=engines, orphan_grace=0)
    a = await svc.submit(key(0), WHOLE)
    engines.run(a)  # created just before the hub restarted: the hub never saved this spawn
    await reconcile(svc, engines, hub={key(9)})
    await settle(svc)
    assert a.id in engines.removed and svc.attempt(a.id) is None and sum(held(svc).values()) == 0


async def test_container_the_hub_knows_is_kept_and_unknown_hub_removes_nothing(db):
    engines = FakeEngines()
    svc = make(db, engines=engines, orphan_grace=0)
    a = await svc.submit(key(0), WHOLE)
    engines.run(a)
    await reconcile(svc, engines, hub={key(0)})
    await reconcile(svc, engines, hub=None)  # the hub did not answer
    await settle(svc)
    assert svc.get(key(0)).state == "RUNNING" and engines.removed == []


# -- finding 6: the event loop blocked -------------------------------------------------------------------


async def test_finding_6_a_locked_database_does_not_block_the_loop(tmp_path):
    path = tmp_path / "s.sqlite"
    svc = make(f"sqlite:///{path}")
    svc.store = Store(f"sqlite:///{path}", timeout=1.5)
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock():
        conn = sqlite3.connect(path)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        conn.rollback()
        conn.close()

    t = threading.Thread(target=hold_the_write_lock)
    t.start()
    locked.wait(5)
    try:
        async with Heartbeat(0.02) as beat:
            with pytest.raises(StoreUnavailable):
                await svc.submit(key(0), ONE_FGPU)
    finally:
        release.set()
        t.join()
    assert beat.longest < 0.5, f"the loop stalled {beat.longest:.2f} s"
    assert svc.records == {} and sum(held(svc).values()) == 0  # nothing half-done
    assert (await svc.submit(key(0), ONE_FGPU)).state == "RUNNING"


async def test_finding_6_only_the_changed_waiter_wakes(db):
    svc = make(db)
    await svc.submit(key(0), WHOLE)
    a = await svc.submit(key(1), ONE_FGPU)
    b = await svc.submit(key(2), ONE_FGPU)
    wa = asyncio.ensure_future(svc.wait(a.id, svc.epoch, 1.0))
    wb = asyncio.ensure_future(svc.wait(b.id, svc.epoch, 1.0))
    await asyncio.sleep(0.01)
    await svc.submit(key(3), ONE_FGPU)  # changes neither a nor b
    await svc.release(a.id)  # a is gone: only its waiter wakes
    await asyncio.sleep(0.05)
    assert wa.done() and await wa is None
    assert not wb.done()
    await wb


# -- finding 7: smaller ----------------------------------------------------------------------------------


def test_finding_7_a_server_named_wait_has_its_own_routes():
    from tornado import web
    from tornado.httputil import HTTPHeaders, HTTPServerRequest

    from bai_scheduler.web import api

    prefix = "/services/bai-scheduler/"
    application = web.Application([(prefix + path, handler) for path, handler in api.default_handlers])
    for method, server in (("PUT", "wait"), ("GET", "wait"), ("DELETE", "wait"), ("GET", "status"),
                           ("PUT", "stop-failed")):
        req = HTTPServerRequest(method=method, uri=f"{prefix}api/requests/alice/{server}", headers=HTTPHeaders())
        found = application.find_handler(req)
        assert found.handler_class is api.RequestHandler, (method, server, found.handler_class)
        assert found.path_args in ([b"alice", server.encode()], ["alice", server])


async def test_finding_7_waiters_hear_of_a_restart_at_once(db):
    svc = make(db)
    await svc.submit(key(0), WHOLE)
    pending = await svc.submit(key(1), WHOLE)
    seen = svc.status(pending)["epoch"]
    again = make(db)  # the service restarted; the spawner waits with what it saw before
    t0 = time.monotonic()
    rec = await again.wait(pending.id, seen, timeout=5)
    assert rec.id == pending.id and time.monotonic() - t0 < 1


async def test_finding_7_attachment_bookkeeping_does_not_grow(db):
    svc = make(db)
    for i in range(50):
        rec = await svc.submit(key(i), ONE_FGPU)
        await svc.wait(rec.id, svc.epoch, 0)
        await svc.release(rec.id)
        await svc.wait(rec.id, svc.epoch, 0)  # a late long-poll of the released attempt
    assert svc._seen == {} and svc._open_waits == {} and svc._waiters == {}


async def test_finding_7_restored_requests_that_can_never_fit_are_dropped_with_a_reason(tmp_path):
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    svc = make(url, gpus=2)
    await svc.submit(key(0), WHOLE)
    await svc.submit(key(1), WHOLE)
    big = await svc.submit(key(2), 2 * WHOLE)  # waits for both GPUs
    small = await svc.submit(key(3), ONE_FGPU)
    again = make(url, gpus=1)  # a GPU was removed from the configuration
    assert again.attempt(big.id) is None
    assert "can never start" in again.gone_reason(big.id)
    assert await again.wait(big.id, 0, 1) is None
    assert again.attempt(small.id).state == "PENDING"
    assert {r.id for r in make(url, gpus=1).records.values()} == {r.id for r in again.records.values()}


async def test_teams_group_pools_lifetime_and_eta_survive_a_restart(db):
    """Group and pools are stored with the request; a group's pending quota refuses at the door;
    a running session has its group's deadline; a waiting one an ETA; a restart keeps all of it."""
    from bai_scheduler.core.quotas import GroupPolicy, Quota

    groups = {"vision": GroupPolicy(Quota(max_quanta=WHOLE, max_pending=1), ("default",), lifetime_s=60)}
    svc = make(db, groups=groups, default_lifetime=3600)
    run = await svc.submit(key(1), WHOLE, group="vision", pools=("default",))
    assert run.state == "RUNNING" and svc.deadline(run) == pytest.approx(run.admitted_at + 60)
    wait = await svc.submit(key(2), ONE_FGPU, group="vision", pools=("default",))
    status = svc.status(wait)
    assert status["reason"] == "Waiting: vision uses 2 of 2 fGPU"
    assert (status["group"], status["pools"]) == ("vision", ["default"])
    # the oldest, but a quota may hold it back: no bound; nothing departed yet: no estimate
    assert (status["eta"]["basis"], status["eta"]["text"]) == ("unknown", "unknown")
    with pytest.raises(Refused, match="vision already has 1 of 1 waiting session"):
        await svc.submit(key(3), ONE_FGPU, group="vision")
    assert svc.expired(run.admitted_at + 61) == [run]
    svc.close()
    again = make(db, groups=groups, default_lifetime=3600)
    assert again.get(key(2)).request.group == "vision" and again.get(key(2)).request.pools == ("default",)
    assert again.queue.group_usage()["vision"].quanta == WHOLE
    await again.release(again.get(key(1)).id)
    assert again.get(key(2)).state == "RUNNING" and len(again.departures) == 1
    again.close()

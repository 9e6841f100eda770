"""A model test of the whole scheduler service (hypothesis RuleBasedStateMachine).

The real ``Service`` and ``Store`` (SQLite) are driven by a scripted hub (which servers
it runs, and their spawners) and a scripted engine (containers by attempt, their states, events,
a removal that can fail), on a fake clock: register, poll, create / start / pause / die / remove
containers, stops that fail, the Stop button without the hub, reconciles (also with changes made
while the listing was on its way), hub restarts (also while a container was starting), service
restarts, database errors and time passing.  After every step:

* no device holds more than its capacity, in the scheduler or on the engine;
* every running (created, paused, restarting) container belongs to an attempt holding exactly
  its share;
* every server has at most one live attempt, and every spawn the hub is doing is queued,
  admitted or running exactly once (or its spawner was told why it is gone);
* every share belongs to an attempt that still needs it: a live spawn, a container, or an
  admission young enough that its container may still come;
* the database holds exactly what memory holds.

The number of steps run is printed; BAI_MODEL_EXAMPLES sets how many runs (default 300).
"""
from __future__ import annotations

import asyncio
import os
import time as real_time
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bai_scheduler import service as service_mod
from bai_scheduler.web.api import stop_session
from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.model import RequestKey
from bai_scheduler.service import ContainerFacts, Refused, Service
from bai_scheduler.store import Store, StoreUnavailable
from bai_scheduler.core.units import FgpuUnits

UNITS = FgpuUnits(2, "0.5")  # 4 quanta per GPU
LIVE_STATES = {"created", "running", "paused", "restarting"}  # Docker's, where a share is in use
NODES = simulated_nodes([{"name": "n0", "gpus": 2, "gpu_memory": "8GiB"},
                         {"name": "n1", "gpus": 1, "gpu_memory": "8GiB"}], UNITS)
CAPACITY = {d.uuid: d.quanta for n in NODES for d in n.devices}
ADMISSION_GRACE = 120.0  # the service's
START_TIMEOUT = 60.0  # the spawners' (below the grace, as the docs ask)
ORPHAN_GRACE = 60.0
KEYS = [RequestKey(u, s) for u in ("ann", "bo") for s in ("", "a", "b")]
STEPS = {"steps": 0, "runs": 0}


class FakeTime:
    """The service's clock: it moves only when the model says so."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self):
        return self.now

    def monotonic(self):
        return self.now

    def perf_counter(self):
        return self.now

    def time_ns(self):
        return int(self.now * 1e9)


class Engine:
    """Containers by attempt id, with Docker's states; ``down`` makes removals fail."""

    def __init__(self):
        self.containers: dict[str, ContainerFacts] = {}
        self.down = False
        self.may_remove = lambda facts: True  # the model's check of every removal the service asks
        self.wrong_removals: list[str] = []  # (kept here: the service calls remove in its own tasks)

    def run(self, attempt_id, key, placement, state="running"):
        self.containers[attempt_id] = ContainerFacts(
            attempt_id, key, placement.node, placement.shares, placement.cpu_millis, placement.memory_bytes,
            "img", state)

    def set_state(self, attempt_id, state):
        f = self.containers[attempt_id]
        self.containers[attempt_id] = ContainerFacts(f.request_id, f.key, f.node, f.shares, f.cpu_millis,
                                                     f.memory_bytes, f.image, state)

    def listing(self):
        return {n.name: [f for f in self.containers.values() if f.node == n.name] for n in NODES}

    async def remove(self, node, request_id):
        if self.down:
            raise RuntimeError("engine down")
        facts = self.containers.pop(request_id, None)
        if facts is not None and facts.state in LIVE_STATES and not self.may_remove(facts):
            self.wrong_removals.append(f"the service removed the {facts.state} container of {facts.key}")
        return 1 if facts else 0


@dataclass
class Spawn:
    """What the hub does for one server: its spawner's attempt and how far it got."""

    attempt: str
    phase: str  # waiting (queued), admitted (has its placement), running (container made)
    placement: object = None
    admitted_at: float = 0.0


class FlakyStore(Store):
    """A Store whose next write fails when armed (the database went away)."""

    fail_next = False

    def apply(self, upserts=(), deletes=()):
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailable("database unavailable: OperationalError (injected)")
        return super().apply(upserts, deletes)


class ServiceModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        STEPS["runs"] += 1
        self.loop = asyncio.new_event_loop()
        self.clock = FakeTime()
        self._real_time = service_mod.time
        service_mod.time = self.clock
        self.tmp = f"/tmp/bai-model-{os.getpid()}-{id(self)}.sqlite"
        self.engine = Engine()
        self.engine.may_remove = self.may_remove
        self.hub: dict[RequestKey, Spawn] = {}
        self.hub_down = False
        self.orphans: list[RequestKey] = []
        self.ended: set[str] = set()  # attempts the model itself ended (stopped, released, replaced)
        self.queued: set[str] = set()  # attempts that were PENDING at the last check
        self.svc = None

    # -- plumbing ---------------------------------------------------------------------------------

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def start_service(self):
        store = FlakyStore(f"sqlite:///{self.tmp}", timeout=2)
        svc = Service(NODES, UNITS, store, engines=self.engine, admission_grace=ADMISSION_GRACE,
                               orphan_grace=ORPHAN_GRACE)
        svc.REMOVE_RETRY_S = (0.0, 0.0)

        async def orphan(rec):
            self.orphans.append(rec.key)

        svc.on_orphan_admitted = orphan
        self.svc = svc

    def pump(self):
        """Let the service's background work (container removals) run until it settles: done,
        or retrying against an engine that is down, or waiting for a container that may still
        come.  (Waiting for that, not for a number of loop turns, keeps runs reproducible.)"""
        deadline = real_time.monotonic() + 20
        while real_time.monotonic() < deadline:
            self.run(asyncio.sleep(0.001))
            busy = self.svc._lock.locked()  # a change is being written
            for attempt in list(self.svc._removals):
                r = self.svc.records.get(attempt)
                if r is None or r.state != "STOPPING":
                    busy = True  # about to end
                elif self.engine.down:
                    busy = busy or r.stop_error != "RuntimeError: engine down"
                else:
                    busy = busy or attempt in self.engine.containers \
                        or not self.svc._may_be_starting(r, self.clock.now)
            if not busy:
                return
        raise AssertionError("the service's background work did not settle")

    def stop_service(self):
        self.svc.close()
        self.svc.store.engine.dispose()  # its pooled connections, else every run leaks file handles

    def teardown(self):
        try:
            if self.svc is not None:
                self.stop_service()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()
        finally:
            service_mod.time = self._real_time
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.remove(self.tmp + suffix)
                except OSError:
                    pass

    def may_remove(self, facts) -> bool:
        """A running (or paused, ...) container may go only when someone ended its attempt, or
        the hub does not run it (an orphan, or an older attempt of a server started again)."""
        spawn = self.hub.get(facts.key)
        return facts.request_id in self.ended or spawn is None or spawn.attempt != facts.request_id

    def hub_servers(self):
        return None if self.hub_down else set(self.hub)

    # -- rules --------------------------------------------------------------------------------------

    @initialize()
    def boot(self):
        self.start_service()

    @rule(key=st.sampled_from(KEYS), quanta=st.sampled_from([1, 2, 4, 4, 8]))
    def register(self, key, quanta):
        """The hub starts a server (only one it believes stopped): its spawner registers."""
        if key in self.hub:
            return
        replaced = self.svc.get(key)
        try:
            rec = self.run(self.svc.submit(key, quanta, image="img"))
        except StoreUnavailable:
            return  # the spawn fails with a message; nothing was queued
        if replaced is not None:
            self.ended.add(replaced.id)
        spawn = Spawn(rec.id, "waiting")
        if rec.state == "RUNNING":
            spawn.phase, spawn.placement, spawn.admitted_at = "admitted", rec.placement, self.clock.now
        self.hub[key] = spawn

    @rule(data=st.data())
    def poll(self, data):
        """A waiting spawner's long-poll answers."""
        waiting = [k for k, s in self.hub.items() if s.phase == "waiting"]
        if waiting:
            self.poll_one(data.draw(st.sampled_from(waiting)))

    def poll_one(self, key):
        spawn = self.hub[key]
        rec = self.run(self.svc.wait(spawn.attempt, 0, 0))
        if rec is None:  # someone ended it (a restarted service no longer says who)
            assert spawn.attempt in self.ended or self.svc.gone_reason(spawn.attempt), \
                "a spawner's request vanished without a reason"
            del self.hub[key]  # the spawn fails, saying why
        elif rec.state == "RUNNING":
            try:
                self.run(self.svc.mark_delivered(rec))
            except StoreUnavailable:
                return  # the long-poll fails; the spawner asks again
            spawn.phase, spawn.placement, spawn.admitted_at = "admitted", rec.placement, self.clock.now

    @rule(data=st.data(), state=st.sampled_from(["running", "running", "created"]))
    def make_container(self, data, state):
        """An admitted spawner makes its container (or gives up after its start timeout)."""
        admitted = [k for k, s in self.hub.items() if s.phase == "admitted"]
        if not admitted:
            return
        key = data.draw(st.sampled_from(admitted))
        spawn = self.hub[key]
        if self.clock.now - spawn.admitted_at > START_TIMEOUT:
            self.spawner_releases(key)
            return
        self.engine.run(spawn.attempt, key, spawn.placement, state)
        spawn.phase = "running"

    def spawner_releases(self, key):
        spawn = self.hub.pop(key)
        self.ended.add(spawn.attempt)
        try:
            self.run(self.svc.release(spawn.attempt))
        except StoreUnavailable:
            pass  # reconcile frees it later

    @rule(data=st.data(), fails=st.booleans())
    def user_stops(self, data, fails):
        """Stop through the hub: the spawner stops and removes its container, then releases."""
        if not self.hub:
            return
        key = data.draw(st.sampled_from(sorted(self.hub, key=str)))
        spawn = self.hub[key]
        container = self.engine.containers.get(spawn.attempt)
        if container is None:
            self.spawner_releases(key)
        elif fails or self.engine.down:
            del self.hub[key]  # the hub forgets it; the scheduler owns the attempt now
            try:
                self.run(self.svc.stopping(spawn.attempt, "APIError: 500 Server Error"))
            except StoreUnavailable:
                pass  # its container is found by reconcile: the hub no longer knows it
        else:
            del self.engine.containers[spawn.attempt]
            self.engine_event(spawn.attempt, "removed")
            self.spawner_releases(key)

    @rule(data=st.data())
    def stop_button_without_hub(self, data):
        """The Stop button (or DELETE api/requests) while the hub cannot be reached."""
        live = [r for r in self.svc.records.values() if r.state in ("PENDING", "RUNNING")]
        if not live:
            return
        rec = data.draw(st.sampled_from(sorted(live, key=lambda r: str(r.key))))
        self.ended.add(rec.id)
        try:
            self.run(stop_session(self.svc, rec, hub_stops_it=False))
        except StoreUnavailable:
            pass

    def engine_event(self, attempt_id, what):
        try:
            if what == "removed":
                self.run(self.svc.container_gone(attempt_id))
            else:
                self.run(self.svc.container_exited(attempt_id))
        except StoreUnavailable:
            pass  # missed: reconcile catches up

    @rule(data=st.data(), action=st.sampled_from(["pause", "unpause", "restart", "die", "docker-rm"]))
    def container_changes(self, data, action):
        if not self.engine.containers:
            return
        attempt = data.draw(st.sampled_from(sorted(self.engine.containers,
                                                    key=lambda i: str(self.engine.containers[i].key))))
        state = self.engine.containers[attempt].state
        if action == "pause" and state == "running":
            self.engine.set_state(attempt, "paused")  # e.g. a snapshot commits it
        elif action == "unpause" and state == "paused":
            self.engine.set_state(attempt, "running")
        elif action == "restart" and state in ("running", "created"):
            self.engine.set_state(attempt, "restarting")
        elif action == "die" and state in ("running", "paused", "restarting"):
            self.engine.set_state(attempt, "exited")
            self.engine_event(attempt, "exited")
        elif action == "docker-rm":
            del self.engine.containers[attempt]
            self.engine_event(attempt, "removed")

    @rule()
    def hub_polls(self):
        """The hub's poll notices servers whose container is gone and forgets them."""
        for key, spawn in list(self.hub.items()):
            c = self.engine.containers.get(spawn.attempt)
            if spawn.phase == "running" and (c is None or c.state not in LIVE_STATES):
                del self.hub[key]

    @rule(down=st.booleans())
    def engine_up_or_down(self, down):
        self.engine.down = down

    @rule(down=st.booleans())
    def hub_up_or_down(self, down):
        self.hub_down = down

    @rule(data=st.data(), during_start=st.booleans())
    def hub_restarts(self, data, during_start):
        """Spawns in progress die with the hub; one may have made its container just before
        (JupyterHub saves a spawn only once start() returns, so it never learns of it)."""
        admitted = [k for k, s in self.hub.items()
                    if s.phase == "admitted" and self.clock.now - s.admitted_at <= START_TIMEOUT]
        if during_start and admitted:
            key = data.draw(st.sampled_from(admitted))
            self.engine.run(self.hub[key].attempt, key, self.hub[key].placement)
        self.hub = {k: s for k, s in self.hub.items() if s.phase == "running"}
        self.orphans.clear()

    @rule(data=st.data())
    def hub_starts_an_orphan(self, data):
        """An admission nobody waited for: the service asked the hub to start it."""
        todo = [k for k in self.orphans if k not in self.hub]
        if todo:
            key = data.draw(st.sampled_from(todo))
            self.orphans.remove(key)
            rec = self.svc.get(key)
            if rec is not None:
                self.register(key, rec.request.quanta)

    @rule(seconds=st.sampled_from([1, 30, 70, 130]))
    def time_passes(self, seconds):
        # A waiting spawner's long-poll is open all along: it hears of its admission at once.
        for key in [k for k, s in self.hub.items() if s.phase == "waiting"]:
            self.poll_one(key)
        self.clock.now += seconds
        for key, spawn in list(self.hub.items()):  # spawners past their start timeout give up
            if spawn.phase == "admitted" and self.clock.now - spawn.admitted_at > START_TIMEOUT:
                self.spawner_releases(key)

    @rule()
    def reconcile(self):
        hub = self.hub_servers()
        try:
            self.run(self.svc.reconcile(self.engine.listing(), self.svc.begin_listing(), hub))
        except StoreUnavailable:
            return
        self.pump()
        self.every_share_has_a_reason(hub_answered=hub is not None)

    def every_share_has_a_reason(self, hub_answered: bool):
        """Right after a reconcile: every share belongs to an attempt that still needs it.  A
        recent admission without a container may wait for one only while the hub could not
        say whether it still starts that server."""
        svc, now = self.svc, self.clock.now
        spawns = {s.attempt for s in self.hub.values()}
        for r in svc.records.values():
            if not r.holds_share:
                continue
            container = self.engine.containers.get(r.id)
            recent = now - (r.admitted_at or 0) <= ADMISSION_GRACE
            if r.state == "RUNNING":
                # (an orphan: the service asked the hub to start it)
                assert container is not None or r.id in spawns or (recent and not hub_answered) \
                    or (recent and r.key in self.orphans), f"{r.key} holds a share for nothing"
            else:
                assert container is not None or (r.delivered and recent), f"stopping {r.key} holds a share for nothing"

    @rule(data=st.data())
    def reconcile_with_changes_during_the_listing(self, data):
        since = self.svc.begin_listing()
        listing = self.engine.listing()
        hub = self.hub_servers()
        for _ in range(data.draw(st.integers(1, 3))):
            step = data.draw(st.sampled_from(["register", "poll", "make_container", "user_stops",
                                              "container_changes", "time_passes"]))
            if step == "register":
                self.register(data.draw(st.sampled_from(KEYS)), data.draw(st.sampled_from([1, 2, 4])))
            elif step == "container_changes":
                self.container_changes(data, data.draw(st.sampled_from(["die", "docker-rm", "pause"])))
            elif step == "user_stops":
                self.user_stops(data, data.draw(st.booleans()))
            elif step == "time_passes":
                self.time_passes(30)
            elif step == "make_container":
                self.make_container(data, "running")
            else:
                self.poll(data)
        try:
            self.run(self.svc.reconcile(listing, since, hub))
        except StoreUnavailable:
            pass

    @rule()
    def service_restarts(self):
        """The service process restarts: memory is rebuilt from the database, then the engines."""
        self.stop_service()
        self.start_service()
        self.reconcile()

    @rule(step=st.sampled_from(["register", "user_stops", "reconcile", "poll", "stop_button"]), data=st.data())
    def database_fails_once(self, step, data):
        self.svc.store.fail_next = True
        if step == "register":
            self.register(data.draw(st.sampled_from(KEYS)), 2)
        elif step == "user_stops":
            self.user_stops(data, False)
        elif step == "poll":
            self.poll(data)
        elif step == "stop_button":
            self.stop_button_without_hub(data)
        else:
            self.reconcile()
        self.svc.store.fail_next = False

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def holds(self):
        if self.svc is None:
            return
        self.pump()
        STEPS["steps"] += 1
        svc, now = self.svc, self.clock.now
        recs = svc.records
        # Capacity: the scheduler never over-commits, and agrees with the records.
        assert svc.overcommitted() == {}, svc.overcommitted()
        used = defaultdict(int)
        for r in recs.values():
            if r.holds_share:
                for s in r.placement.shares:
                    used[s.device_uuid] += s.quanta
        for node in svc.capacity():
            for d in node["devices"]:
                assert d["used_quanta"] == used[d["uuid"]] <= d["capacity_quanta"], (d, dict(used))
        core = svc.queue.admitted()
        assert {k.id for k in core} == {r.id for r in recs.values() if r.holds_share}
        assert {r.key.id for r in svc.queue.pending()} == {r.id for r in recs.values() if r.state == "PENDING"}
        assert not self.engine.wrong_removals, self.engine.wrong_removals
        # The engine: no device runs more than it holds; no container runs without its share.
        on_engine = defaultdict(int)
        for f in self.engine.containers.values():
            if f.state in LIVE_STATES:
                for s in f.shares:
                    on_engine[s.device_uuid] += s.quanta
                r = recs.get(f.request_id)
                assert r is not None and r.holds_share, f"container of {f.key} runs without a share"
                assert r.placement.shares == f.shares, (r.placement, f)
        for dev, q in on_engine.items():
            assert q <= CAPACITY[dev], f"{dev}: the engine runs {q} quanta of {CAPACITY[dev]}"
        # One live attempt per server, and every spawn in progress is known (or told why not).
        assert set(svc.live.values()) == {r.id for r in recs.values() if r.state in ("PENDING", "RUNNING")}
        assert all(recs[i].key == k for k, i in svc.live.items())
        for key, spawn in self.hub.items():
            r = recs.get(spawn.attempt)
            if spawn.phase != "running":  # live, or being stopped, or ended by someone
                assert r is not None or spawn.attempt in self.ended or svc.gone_reason(spawn.attempt), \
                    f"{key}'s spawn lost its request"
                assert r is None or r.state == "STOPPING" or svc.live.get(key) == r.id
        # A queued request leaves the queue only when admitted or ended by someone.
        lost = {i for i in self.queued if i not in recs and i not in self.ended}
        assert not lost, f"queued requests lost: {lost}"
        self.queued = {r.id for r in recs.values() if r.state == "PENDING"}
        # A STOPPING attempt whose container is gone waits only while a spawner may still make
        # it; other shares without a reason go at the next reconcile (checked there).
        for r in recs.values():
            if r.state == "STOPPING" and r.id not in self.engine.containers and not self.engine.down \
                    and not (r.delivered and now - (r.admitted_at or 0) <= ADMISSION_GRACE):
                assert r.id in svc._removals, f"stopping {r.key} is not being removed"
        # The database holds what memory holds.
        stored = {r.id: (r.state, r.placement, r.request.seq) for r in svc.store.load()}
        assert stored == {r.id: (r.state, r.placement, r.request.seq) for r in recs.values()}


ServiceModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("BAI_MODEL_EXAMPLES", "300")), stateful_step_count=40, deadline=None,
    suppress_health_check=list(HealthCheck))
TestServiceModel = ServiceModel.TestCase


@pytest.fixture(scope="module", autouse=True)
def report_steps():
    yield
    print(f"\n[model] {STEPS['steps']} steps checked in {STEPS['runs']} runs of the service model")


def test_refused_registration_changes_nothing():
    """Bad input the model does not draw: a request that can never fit."""
    async def go():
        svc = Service(NODES, UNITS, Store("sqlite://"))
        with pytest.raises(Refused):
            await svc.submit(KEYS[0], 16)
        assert svc.records == {}
        svc.close()

    asyncio.run(go())


def test_found_queued_session_admitted_after_a_hub_restart_is_started():
    """A case the model found (shrunk): the hub restarts while ann/b waits; the reconcile frees
    the two sessions that never got a container and admits ann/b, whose spawner died with the
    hub a moment after it was last seen. The hub must be asked to start it (before, its share
    was held for nothing and then freed: the queued session was lost)."""
    m = ServiceModel()
    try:
        m.boot()
        m.register(RequestKey("ann", ""), 8)
        m.register(RequestKey("ann", "a"), 4)
        m.register(RequestKey("ann", "b"), 8)
        assert m.svc.get(RequestKey("ann", "b")).state == "PENDING"
        m.hub_restarts(None, False)
        m.reconcile()  # checks every share has a reason
        m.holds()
        assert m.orphans == [RequestKey("ann", "b")]
        m.hub_starts_an_orphan(type("Draw", (), {"draw": staticmethod(lambda s: RequestKey("ann", "b"))})())
        m.poll_one(RequestKey("ann", "b"))
        assert m.hub[RequestKey("ann", "b")].phase == "admitted"
    finally:
        m.teardown()

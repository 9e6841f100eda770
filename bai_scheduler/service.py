"""The scheduler service's state machine, without HTTP.

Wraps the pure ``AdmissionQueue`` with durability (``Store``), wake-ups for the spawners waiting on
their attempt, and repair from the Docker engines.

Spawn attempts
    Every registration is a new attempt with a fresh id: the spawner labels its container with
    it, and every event, release and reconcile names the attempt it is about, so nothing about
    an older attempt of the same server can touch a newer one.  A server has at most one *live*
    attempt (PENDING or RUNNING); a new registration replaces it, keeping its place in the queue
    when the request is the same.  A replaced RUNNING attempt becomes STOPPING.

Shares
    A share is released only when its container is known gone: removed (engine ``destroy``),
    or exited and then removed by this service, or never made (the spawner says so, or nothing
    shows on the engine long after the admission).  Paused, restarting and created containers
    hold theirs.  STOPPING attempts hold their share while this service removes their container
    through ``engines`` (retrying, with the engine's message in ``stop_error`` meanwhile).

Concurrency
    Every change runs under one lock: memory is changed first, then written to the database in
    the database thread (the loop stays free meanwhile).  If the write fails, memory goes back
    to what was last written.  Waiters are woken, and engine work is started, only after the
    write, and only the waiters of the attempts that changed.

Reconcile (``reconcile``)
    Listings of the engines are taken while the service keeps working: a record changed after
    the listing began, or an attempt released after it began, is left alone.  Only changed
    records are written.  Rules for what the engines show:

    * a record's container is running, paused, restarting or created: it keeps its share (the
      labels win if they say otherwise); when the hub has not known the server for
      ``orphan_grace`` seconds (e.g. the hub restarted while the container started, so it never
      saved that spawn), the container is removed and the share freed;
    * a record's container exited: it is removed, then the share is freed;
    * no container: the share is freed once no spawner can still be making one: nobody waits
      on it, and it was admitted more than ``admission_grace`` seconds ago or the hub neither
      runs nor starts its server; but an admission no spawner ever heard of (its spawner died
      with the hub between two polls) is still wanted: the hub is asked to start it, within
      the admission grace; one its spawner released while the database could not take it is
      not (a waiting one of those is dropped from the queue);
    * a container no record knows (complete labels): it is adopted with the share its labels
      state; if its server has another live attempt, it is adopted as STOPPING and removed.
      An adopted share that does not fit sends the newest admissions not yet handed to a
      spawner on those devices back to the queue; what still does not fit is an over-commit,
      logged and shown (``overcommitted``, the admin capacity view, ``/metrics``).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Iterable, Protocol

from .core.eta import QueueEta
from .core.model import Placement, Request, RequestKey, Share
from .core.placement import Capacity
from .core.queue import AdmissionQueue, QueuePolicy, UserLimits, cyclic_gc_paused
from .core.quotas import GroupPolicy, Usage, pending_reason
from .core.units import FgpuUnits
from .store import Record, Store, StoreUnavailable

log = logging.getLogger("bai_scheduler")

# Docker container states in which a session may still use its GPU share.
HOLDING_STATES = frozenset({"created", "running", "paused", "restarting", "removing"})


class Refused(Exception):
    """A request the scheduler will not take; ``str(e)`` tells the user why."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class ContainerFacts:
    """What the engine says about one session container (from its labels and state)."""

    request_id: str
    key: RequestKey
    node: str
    shares: tuple[Share, ...]
    cpu_millis: int
    memory_bytes: int
    image: str
    state: str  # Docker's: created, running, paused, restarting, removing, exited, dead
    group: str = ""

    @property
    def holds(self) -> bool:
        return self.state in HOLDING_STATES

    @property
    def placement(self) -> Placement:
        return Placement(self.node, self.shares, self.cpu_millis, self.memory_bytes)


@dataclass(frozen=True)
class Attempt:
    """The scheduler core's key for one attempt (a server may have a live and a stopping one)."""

    user: str
    server: str
    id: str

    def __str__(self):
        return f"{self.user}/{self.server}" if self.server else self.user


class Engines(Protocol):
    async def remove(self, node: str, request_id: str) -> int:
        """Remove every container of attempt ``request_id`` on ``node`` (running or not);
        returns how many there were.  Raises when the engine cannot do it."""


class Service:
    # A spawner long-poll that returned this recently still counts as attached.
    WAITER_GRACE_S = 5.0
    # Released attempts remembered (for a clear GONE answer, and so that a listing taken
    # before a release does not bring the attempt back).
    GONE_KEPT = 10_000
    # Seconds between tries to remove a STOPPING attempt's container: first, at most.
    REMOVE_RETRY_S = (1.0, 30.0)
    # Sessions that ended, kept for the queue ETA's estimate from recent departures.
    DEPARTURES_KEPT = 50

    def __init__(
        self,
        nodes,
        units: FgpuUnits,
        store: Store,
        policy: QueuePolicy | None = None,
        limits: UserLimits | None = None,
        span: str = "whole-then-fraction",
        strategy: str = "concentrate",
        *,
        engines: Engines | None = None,
        admission_grace: float = 300.0,
        orphan_grace: float = 120.0,
        groups: dict[str, GroupPolicy] | None = None,
        default_lifetime: float = 0,
    ):
        self.nodes = list(nodes)
        self.units = units
        self.store = store
        self.policy = policy or QueuePolicy()
        self.limits = limits or UserLimits()
        self.span = span
        self.strategy = strategy
        self.engines = engines
        self.admission_grace = admission_grace
        self.orphan_grace = orphan_grace
        # Teams: each group's quota, pools and session lifetime; the lifetime of the rest.
        self.groups = dict(groups or {})
        self.default_lifetime = default_lifetime
        self.departures: deque[tuple[float, int]] = deque(maxlen=self.DEPARTURES_KEPT)
        self._eta: tuple[tuple[int, int], QueueEta] | None = None
        self.records: dict[str, Record] = {}  # every attempt, by id
        self.live: dict[RequestKey, str] = {}  # server -> id of its PENDING or RUNNING attempt
        # The change counter. It starts from the clock so that it only ever grows across
        # restarts: a spawner still waiting with an epoch from before sees every change.
        self.epoch = time.time_ns() // 1000
        self._lock = asyncio.Lock()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="bai-db")
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._open_waits: dict[str, int] = {}
        self._seen: dict[str, float] = {}  # attempt id -> when its spawner last waited
        # Attempts whose spawner released them while the database could not take it: memory went
        # back, but nobody wants them; the reconcile drops them (never asks the hub to start one).
        self._cancelled: set[str] = set()
        self._orphan_since: dict[str, float] = {}  # attempt id -> when the hub was seen not to know it
        self._gone: OrderedDict[str, tuple[int, str]] = OrderedDict()  # id -> (epoch, reason)
        self._removals: dict[str, asyncio.Task] = {}
        # Called with each record admitted while no spawner waits for it
        # (e.g. the hub was down): the app asks the hub to start that server.
        self.on_orphan_admitted: Callable[[Record], Awaitable[None]] | None = None
        self.admission_latencies: list[float] = []
        self.degraded: str | None = None
        self._fgpu_text: dict[int, str] = {}
        # Nodes whose GPUs get no new share: real GPUs start here until their backend is
        # checked (bai_scheduler.readiness); CPU-only requests still go there.
        self.gpu_not_ready: set[str] = {n.name for n in self.nodes if n.devices and not n.simulated}
        # Image references each node's engine holds: placement's tie-breaker (no pull needed there).
        self.node_images: dict[str, frozenset[str]] = {}
        self.reload()

    # -- building state ----------------------------------------------------

    def _new_queue(self) -> AdmissionQueue:
        capacity = Capacity(
            self.nodes, self.units.quanta_per_gpu, span=self.span, strategy=self.strategy, units=self.units
        )
        for name in self.gpu_not_ready:
            capacity.set_gpu_ready(name, False)
        for name, refs in self.node_images.items():
            capacity.set_node_images(name, refs)
        return AdmissionQueue(capacity, self.policy, self.limits,
                              {g: p.quota for g, p in self.groups.items()})

    def _queued(self, rec: Record) -> Request | None:
        """The queue's own request of a PENDING attempt, or None if the queue does not hold it.
        Found by seq, which the record keeps in step with the queue: no key to build and hash
        (a status refresh asks this for every waiting attempt)."""
        core = self.queue.request_by_seq(rec.request.seq)
        return core if core is not None and core.key.id == rec.id else None

    @staticmethod
    def _core(rec: Record) -> Request:
        return replace(rec.request, key=Attempt(rec.key.user, rec.key.server, rec.id))

    def _rebuild(self, records: Iterable[Record]) -> list[tuple[Record, str]]:
        """Make memory match ``records`` exactly (no pass is run).  Returns the records that
        cannot be kept, with why (their node is gone, or they can never fit any more)."""
        self.queue = self._new_queue()
        self.records, self.live = {}, {}
        dropped = []
        known_nodes = {n.name for n in self.nodes}
        records = list(records)
        holders = sorted((r for r in records if r.holds_share), key=lambda r: (r.admitted_at or 0, r.request.seq))
        for rec in holders:
            if rec.placement is None or rec.placement.node not in known_nodes:
                dropped.append((rec, f"its node {rec.placement.node if rec.placement else '?'} is no longer configured"))
                continue
            try:
                self._restore_share(rec)
            except ValueError as e:  # a device that is no longer there
                dropped.append((rec, f"its share cannot be restored: {e}"))
                continue
            self.records[rec.id] = rec
        for rec in sorted((r for r in records if r.state == "PENDING"), key=lambda r: r.request.seq):
            reason = self.queue.never_reason(rec.request)
            if reason:
                dropped.append((rec, f"it can never start here any more: it {reason}"))
                continue
            rec.request = replace(rec.request, seq=self.queue.restore_pending(self._core(rec)).seq)
            self.records[rec.id] = rec
        for rec in self.records.values():
            if rec.state in ("PENDING", "RUNNING"):
                self.live[rec.key] = rec.id
        for rec in self.records.values():
            rec.changed = self.epoch
        return dropped

    def _restore_share(self, rec: Record) -> None:
        try:
            self.queue.restore_admitted(self._core(rec), rec.placement)
        except ValueError:
            if not self._fits_somehow(rec.placement):
                raise
            self.queue.restore_admitted(self._core(rec), rec.placement, force=True)
            log.error("Over-commit: %s holds %s on %s beyond its capacity; shown on the capacity view "
                      "and in /metrics until sessions there end", rec.key, rec.placement.shares, rec.placement.node)

    def _fits_somehow(self, placement: Placement) -> bool:
        """True if ``placement`` names known devices of its node (only capacity is short)."""
        node = next((n for n in self.nodes if n.name == placement.node), None)
        if node is None:
            return False
        uuids = {d.uuid for d in node.devices}
        return all(s.device_uuid in uuids and s.quanta > 0 for s in placement.shares)

    def set_gpu_ready(self, node: str, ready: bool) -> None:
        """Let placement use ``node``'s GPUs or not; run ``schedule()`` after a node became ready."""
        (self.gpu_not_ready.discard if ready else self.gpu_not_ready.add)(node)
        self.queue.set_gpu_ready(node, ready)

    def set_node_images(self, node: str, refs: frozenset[str]) -> None:
        """The image references ``node`` holds now (placement prefers it for those images)."""
        self.node_images[node] = frozenset(refs)
        self.queue.capacity.set_node_images(node, refs)

    def reload(self) -> None:
        """Throw away memory and rebuild from the database (at start-up, before serving)."""
        dropped = self._rebuild(self.store.load())
        for rec, why in dropped:
            log.error("Dropping the request of %s (%s): %s", rec.key, rec.state.lower(), why)
            self._forget(rec.id, f"The request was dropped: {why}.")
        if dropped:
            self.store.apply([], [r.id for r, _ in dropped])
        self._committed = {r.id: replace(r) for r in self.records.values()}

    def _forget(self, attempt_id: str, reason: str) -> None:
        self.epoch += 1
        self._gone[attempt_id] = (self.epoch, reason)
        self._gone.move_to_end(attempt_id)
        while len(self._gone) > self.GONE_KEPT:
            self._gone.popitem(last=False)
        self._seen.pop(attempt_id, None)
        self._orphan_since.pop(attempt_id, None)

    async def _commit(self, changed: dict[str, Record], deleted: dict[str, tuple[Record, str]]) -> None:
        """Write a change in the database thread.  If it fails, memory goes back to the last
        state that was written, so no share is granted or freed that the database does not
        know of, and StoreUnavailable is raised."""
        changed = {i: r for i, r in changed.items() if i not in deleted}
        rows = [replace(r) for r in changed.values()]
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._db, self.store.apply, rows, list(deleted))
        except StoreUnavailable as e:
            self.degraded = str(e)
            gone = dict(self._gone)
            self._rebuild([replace(r) for r in self._committed.values()])
            self._gone = OrderedDict(gone)
            raise
        self.degraded = None
        for attempt_id, (rec, reason) in deleted.items():
            self._committed.pop(attempt_id, None)
            self._cancelled.discard(attempt_id)
            self._forget(attempt_id, reason)
        for rec in changed.values():
            self.epoch += 1
            rec.changed = self.epoch
            self._committed[rec.id] = replace(rec)
        for attempt_id in (*changed, *deleted):
            for fut in self._waiters.pop(attempt_id, ()):
                if not fut.done():
                    fut.set_result(None)

    # -- queries -------------------------------------------------------------

    def get(self, key: RequestKey) -> Record | None:
        """The live (PENDING or RUNNING) attempt of a server."""
        attempt_id = self.live.get(key)
        return self.records.get(attempt_id) if attempt_id else None

    def attempt(self, attempt_id: str) -> Record | None:
        return self.records.get(attempt_id)

    def gone_reason(self, attempt_id: str) -> str | None:
        """Why an attempt that is no longer known went away (None if never heard of)."""
        gone = self._gone.get(attempt_id)
        return gone[1] if gone else None

    def status(self, rec: Record) -> dict:
        """The public view of one attempt."""
        return self._status(rec, None)

    def statuses(self, records: Iterable[Record]) -> list[dict]:
        """``status`` of each of ``records``: one refresh of a list (GET api/requests, the sessions
        page).  When the list covers much of the queue, the places in it come from one walk of
        the queue order rather than a search for each."""
        records = list(records)
        with cyclic_gc_paused():
            places = self.queue.places() if 8 * len(records) >= len(self.queue) else None
            return [self._status(rec, places) for rec in records]

    def _status(self, rec: Record, places: dict[int, int] | None) -> dict:
        """``status``; ``places``: ``AdmissionQueue.places()`` (None: search the queue)."""
        req = rec.request
        key = req.key
        fgpu = self._fgpu_text.get(req.quanta)
        if fgpu is None:
            fgpu = self._fgpu_text[req.quanta] = self.units.to_fgpu(req.quanta)
        out = {
            "id": rec.id,
            "user": key.user,
            "server": key.server,
            "state": rec.state,
            "image": req.image,
            "quanta": req.quanta,
            "fgpu": fgpu,
            "cpu_millis": req.cpu_millis,
            "memory_bytes": req.memory_bytes,
            "submitted_at": rec.submitted_at,
            "admitted_at": rec.admitted_at,
            "epoch": self.epoch,
            "group": req.group,
            "pools": list(req.pools),
        }
        if rec.state == "PENDING" and (core := self._queued(rec)) is not None:
            out["position"] = position = places[core.seq] if places is not None else self.queue.position_of(core)
            out["reason"] = self.queue.wait_reason_of(core, position)
            if req.quanta and self.gpu_not_ready:
                out["reason"] += f" (GPUs not ready on {', '.join(sorted(self.gpu_not_ready))})"
            now = time.time()
            out["eta"] = self._queue_eta(now).eta(core).to_json(now)
        if rec.state == "RUNNING" and (deadline := self.deadline(rec)) is not None:
            out["deadline"] = deadline
            out["lifetime_notice"] = self.lifetime_notice(rec, deadline)
        if rec.state == "STOPPING":
            out["stop_error"] = rec.stop_error
        if rec.placement is not None:
            out["placement"] = self.placement_details(rec.placement)
        return out

    def placement_details(self, p: Placement) -> dict:
        """A placement plus what the spawner needs to build the container on it."""
        out = placement_to_json(p)
        node = next((n for n in self.nodes if n.name == p.node), None)
        if node is None:
            return out
        devices = {d.uuid: d for d in node.devices}
        out["docker_url"] = node.docker_url
        out["tls"] = dict(node.tls)
        out["simulated"] = node.simulated
        out["gpu"] = node.gpu.to_json()
        out["quanta_per_gpu"] = self.units.quanta_per_gpu
        for share in out["shares"]:
            d = devices.get(share["device"])
            if d is not None:
                share.update(index=d.index, name=d.name, memory_bytes=d.memory_bytes,
                             sm_count=d.sm_count, capacity=d.quanta, mig_parent=d.mig_parent,
                             mig_profile=d.mig_profile)
        return out

    # -- teams and time ----------------------------------------------------------

    def lifetime(self, group: str) -> float:
        """Longest a session of ``group`` may run, in seconds (0: no limit)."""
        policy = self.groups.get(group) if group else None
        return (policy.lifetime_s if policy is not None and policy.lifetime_s else 0) or self.default_lifetime

    def deadline(self, rec: Record) -> float | None:
        """When an admitted session is stopped for its lifetime (None: never)."""
        lifetime = self.lifetime(rec.request.group)
        if not lifetime or rec.admitted_at is None:
            return None
        return rec.admitted_at + lifetime

    # Seconds before the stop from which the notice is shown (c.BaiScheduler.lifetime_notice).
    notice_before: float = 600.0

    def lifetime_notice(self, rec: Record, deadline: float) -> str:
        """The notice shown once a session is within ``notice_before`` of its lifetime ("" before)."""
        left = deadline - time.time()
        if left > self.notice_before:
            return ""
        when = time.strftime("%H:%M", time.localtime(deadline))
        group = rec.request.group
        return (f"This session reaches its lifetime{f' for {group}' if group else ''} and is stopped at {when} "
                f"(in {max(0, round(left / 60))} min). Save your work; files in /home/jovyan are kept.")

    def expired(self, now: float) -> list[Record]:
        """Running sessions past their lifetime (to stop)."""
        return [r for r in self.records.values()
                if r.state == "RUNNING" and (d := self.deadline(r)) is not None and d <= now]

    def max_lifetime(self) -> float | None:
        """The longest a session admitted from now on may run (None: some may run for ever)."""
        if not self.default_lifetime:
            return None
        return max([self.default_lifetime] + [p.lifetime_s for p in self.groups.values()])

    def _queue_eta(self, now: float) -> QueueEta:
        """When the waiting attempts start (``core.eta``); one snapshot per change and second."""
        stamp = (self.epoch, int(now))
        if self._eta is None or self._eta[0] != stamp:
            deadlines = {Attempt(r.key.user, r.key.server, r.id): self.deadline(r) for r in self.holding()}
            self._eta = (stamp, QueueEta(self.queue, deadlines, self.max_lifetime(), self.departures, now))
        return self._eta[1]

    def group_usage(self) -> dict[str, dict]:
        """Per group with a quota: what it holds and has waiting, and its quota (admin view)."""
        out = {}
        for group, used in self.queue.group_usage().items():
            quota = self.groups[group].quota
            out[group] = {"running": used.running, "pending": used.pending, "quanta": used.quanta,
                          "fgpu": self.units.to_fgpu(used.quanta), "cpu_millis": used.cpu, "memory_bytes": used.mem,
                          "quota": {"running": quota.max_running, "pending": quota.max_pending,
                                    "fgpu": self.units.to_fgpu(quota.max_quanta), "quanta": quota.max_quanta,
                                    "cpu_millis": quota.max_cpu_millis, "memory_bytes": quota.max_memory_bytes}}
        return out

    def pending(self) -> list[Record]:
        return [self.records[r.key.id] for r in self.queue.pending() if r.key.id in self.records]

    def running(self) -> list[Record]:
        """Live admitted attempts (their containers run or are being made)."""
        return [r for r in self.records.values() if r.state == "RUNNING"]

    def holding(self) -> list[Record]:
        """Every attempt that holds a share (RUNNING and STOPPING)."""
        return [r for r in self.records.values() if r.holds_share]

    def capacity(self) -> list[dict]:
        return self.queue.capacity.usage()

    def overcommitted(self) -> dict[str, int]:
        """Quanta in use beyond capacity, by device uuid (the engines run more than fits)."""
        return self.queue.capacity.overcommitted()

    # -- changes ---------------------------------------------------------------

    def _admitted(self, pairs, changed: dict) -> list[Record]:
        now = time.time()
        out = []
        for request, placement in pairs:
            rec = self.records[request.key.id]
            rec.state = "RUNNING"
            rec.placement = placement
            rec.admitted_at = now
            changed[rec.id] = rec
            out.append(rec)
        return out

    def _after(self, admitted: list[Record], stopping: Iterable[Record] = ()) -> None:
        """What follows a written change: removals to start, servers to start."""
        for rec in stopping:
            self._ensure_removal(rec)
        if self.on_orphan_admitted is None:
            return
        for rec in admitted:
            if rec.state == "RUNNING" and not self.is_attached(rec):
                log.info("Admitted %s while no spawner waits: asking the hub to start it", rec.key)
                asyncio.ensure_future(self.on_orphan_admitted(rec))

    async def submit(
        self,
        key: RequestKey,
        quanta: int,
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        image: str = "",
        user_options: dict | None = None,
        group: str = "",
        pools: tuple[str, ...] = (),
    ) -> Record:
        """A new spawn attempt for server ``key``: queued or admitted at once.

        It replaces the server's live attempt: a waiting one is dropped (the new one keeps its
        place when the request is the same), an admitted one becomes STOPPING (its container,
        if any, is removed before its share is freed).
        """
        request = Request(key=key, quanta=quanta, cpu_millis=cpu_millis, memory_bytes=memory_bytes, image=image,
                          group=group, pools=tuple(sorted(pools)))
        async with self._lock:
            old = self.get(key)
            reason = self.queue.never_reason(request)
            if reason:
                raise Refused(reason, 400)
            lim = self.limits
            waiting = sum(1 for r in self.records.values() if r.state == "PENDING" and r.key.user == key.user)
            if old is not None and old.state == "PENDING":
                waiting -= 1
            if lim.max_pending and waiting >= lim.max_pending:
                n = lim.max_pending
                raise Refused(f"user limit of {n} waiting session{'s' if n != 1 else ''} reached", 400)
            same = old is not None and (old.request.quanta, old.request.cpu_millis, old.request.memory_bytes,
                                        old.request.image, old.request.group, old.request.pools) == (
                quanta, cpu_millis, memory_bytes, image, request.group, request.pools)
            if group in self.groups:
                group_waiting = sum(1 for r in self.records.values()
                                    if r.state == "PENDING" and r.request.group == group and r is not old)
                reason = pending_reason(group, self.groups[group].quota, Usage(pending=group_waiting))
                if reason:
                    raise Refused(reason, 400)
            rec = Record(id=uuid.uuid4().hex, request=request, state="PENDING",
                         user_options=dict(user_options or {}))
            changed, deleted, stopping, pairs = {rec.id: rec}, {}, [], []
            sched = self.queue
            if old is not None:
                log.info("%s registers again (attempt %s replaces %s)", key, rec.id[:8], old.id[:8])
            if old is not None and old.state == "PENDING" and same:
                core = sched.rename_pending(self._core(old).key, self._core(rec).key)
                rec.request = replace(request, seq=core.seq)
                rec.submitted_at = old.submitted_at
                del self.records[old.id]
                deleted[old.id] = (old, "A newer spawn of this server replaced this request.")
                self.records[rec.id] = rec
                pairs += sched.schedule()
            else:
                if old is not None and old.state == "PENDING":
                    pairs += sched.release(self._core(old).key)
                    del self.records[old.id]
                    deleted[old.id] = (old, "A newer spawn of this server replaced this request.")
                elif old is not None:
                    old.state = "STOPPING"
                    changed[old.id] = old
                    stopping.append(old)
                self.records[rec.id] = rec
                if same:  # keeps the replaced admission's place in the queue
                    core = sched.restore_pending(replace(self._core(rec), seq=old.request.seq))
                    rec.request = replace(request, seq=core.seq)
                    pairs += sched.schedule()
                else:
                    decision = sched.submit(self._core(rec))
                    assert decision.state != "REFUSED", decision.reason  # checked above
                    rec.request = replace(request, seq=decision.request.seq)
                    if decision.state == "RUNNING":
                        pairs.append((decision.request, decision.placement))
                    pairs += decision.also_admitted
            self.live[key] = rec.id
            self._seen[rec.id] = time.monotonic()
            admitted = self._admitted(pairs, changed)
            if rec.state == "RUNNING":
                rec.delivered = True  # the answer to this registration hands it over
            await self._commit(changed, deleted)
        self._after(admitted, stopping)
        return rec

    async def release(self, attempt_id: str, reason: str = "The request was cancelled.") -> list[Record]:
        """Attempt ``attempt_id`` needs nothing any more: its container is gone or was never
        made.  Frees its share (or drops it from the queue), then admits what now fits.
        Unknown ids are ignored (release is idempotent)."""
        async with self._lock:
            rec = self.records.get(attempt_id)
            if rec is None:
                return []
            t0 = time.perf_counter()
            changed: dict = {}
            if rec.holds_share:
                self.departures.append((time.time(), rec.request.quanta))
            pairs = self.queue.release(self._core(rec).key)
            del self.records[rec.id]
            if self.live.get(rec.key) == rec.id:
                del self.live[rec.key]
            admitted = self._admitted(pairs, changed)
            try:
                await self._commit(changed, {rec.id: (rec, reason)})
            except StoreUnavailable:
                self._cancelled.add(attempt_id)
                raise
        if admitted:
            self.admission_latencies.append(time.perf_counter() - t0)
            del self.admission_latencies[:-10000]
        self._after(admitted)
        return admitted

    async def stop(self, key: RequestKey, error: str = "") -> Record | None:
        """Stop a server's live attempt: a waiting one leaves the queue; an admitted one becomes
        STOPPING (its container is removed, then its share freed).  ``error``: why the stop
        failed so far (the engine's message), shown until the container is gone."""
        rec = self.get(key)
        if rec is None:
            return None
        if rec.state == "PENDING":
            await self.release(rec.id)
            return rec
        return await self.stopping(rec.id, error)

    async def stopping(self, attempt_id: str, error: str = "") -> Record | None:
        """Attempt ``attempt_id``'s container must go (its stop failed, it exited, or nobody
        wants it): it keeps its share as STOPPING until this service has removed it."""
        async with self._lock:
            rec = self.records.get(attempt_id)
            if rec is None:
                return None
            if rec.state == "PENDING":
                raise Refused("A waiting request has no container to stop.", 409)
            if rec.state == "STOPPING" and (not error or rec.stop_error == error):
                self._ensure_removal(rec)
                return rec
            rec.state = "STOPPING"
            rec.stop_error = error[:1000]
            if self.live.get(rec.key) == rec.id:
                del self.live[rec.key]
            await self._commit({rec.id: rec}, {})
        self._after([], [rec])
        return rec

    async def mark_delivered(self, rec: Record) -> None:
        """The spawner now has this admission: from here on it counts as started."""
        if rec.state != "RUNNING" or rec.delivered:
            return
        async with self._lock:
            if self.records.get(rec.id) is rec and not rec.delivered:
                rec.delivered = True
                await self._commit({rec.id: rec}, {})

    async def schedule(self) -> list[Record]:
        async with self._lock:
            changed: dict = {}
            admitted = self._admitted(self.queue.schedule(), changed)
            if admitted:
                await self._commit(changed, {})
        self._after(admitted)
        return admitted

    # -- removing containers -----------------------------------------------------

    def _ensure_removal(self, rec: Record) -> None:
        if self.engines is None or rec.id in self._removals or rec.state != "STOPPING":
            return
        task = asyncio.ensure_future(self._remove(rec.id))
        self._removals[rec.id] = task
        task.add_done_callback(lambda _t, i=rec.id: self._removals.pop(i, None))

    def _may_be_starting(self, rec: Record, now: float) -> bool:
        """Could a spawner still be making this attempt's container?"""
        if rec.state == "RUNNING" and self.is_attached(rec):
            return True
        recent = (rec.admitted_at or 0) > now - self.admission_grace
        return recent and (rec.delivered or rec.state == "RUNNING")

    async def _remove(self, attempt_id: str) -> None:
        delay, longest = self.REMOVE_RETRY_S
        while True:
            rec = self.records.get(attempt_id)
            if rec is None or rec.state != "STOPPING" or rec.placement is None:
                return
            try:
                removed = await self.engines.remove(rec.placement.node, attempt_id)
                error = ""
            except Exception as e:  # the engine is down or refuses
                removed, error = 0, f"{e.__class__.__name__}: {e}"[:1000]
            try:
                if error:
                    if rec.stop_error != error:  # said once; the retries go on quietly
                        log.warning("Could not remove the container of %s yet (retrying): %s", rec.key, error)
                        await self.stopping(attempt_id, error)
                elif removed or not self._may_be_starting(rec, time.time()):
                    await self.release(attempt_id, "The session was stopped.")
                    return
            except StoreUnavailable as e:
                log.error("Could not record the stop of %s: %s", rec.key, e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, longest)

    async def container_gone(self, attempt_id: str) -> list[Record]:
        """The engine removed this attempt's container (``destroy``)."""
        return await self.release(attempt_id, "The session's container is gone.")

    async def container_exited(self, attempt_id: str) -> None:
        """This attempt's container exited (``die``/``stop``): remove it, then free the share."""
        rec = self.records.get(attempt_id)
        if rec is not None and rec.holds_share:
            await self.stopping(attempt_id, rec.stop_error)

    # -- spawner long-poll -----------------------------------------------------

    def is_waited_on(self, rec: Record) -> bool:
        """A spawner's long-poll for this attempt is open now."""
        return bool(self._open_waits.get(rec.id))

    def is_attached(self, rec: Record) -> bool:
        """A spawner waits for this attempt, or did a moment ago (it may be between two polls)."""
        if self.is_waited_on(rec):
            return True
        seen = self._seen.get(rec.id)
        return seen is not None and time.monotonic() - seen < self.WAITER_GRACE_S

    async def wait(self, attempt_id: str, epoch: int, timeout: float) -> Record | None:
        """Return once attempt ``attempt_id`` changed after ``epoch`` (or at ``timeout``).

        None if the attempt is gone.  An ``epoch`` from the future means this service restarted
        since the caller last heard from it: the answer is immediate."""
        rec = self.records.get(attempt_id)
        if rec is None:
            return None
        if rec.changed <= epoch <= self.epoch:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(attempt_id, []).append(fut)
            self._open_waits[attempt_id] = self._open_waits.get(attempt_id, 0) + 1
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(attempt_id)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[attempt_id]
                self._open_waits[attempt_id] -= 1
                if not self._open_waits[attempt_id]:
                    del self._open_waits[attempt_id]
        rec = self.records.get(attempt_id)
        if rec is not None:
            self._seen[attempt_id] = time.monotonic()
        return rec

    # -- repair from the engines ------------------------------------------------

    def close(self) -> None:
        """Stop background removals and the database thread (the state stays in the database)."""
        for task in list(self._removals.values()):
            task.cancel()
        self._db.shutdown(wait=True)

    def begin_listing(self) -> int:
        """Call before listing the engines; pass the result to ``reconcile``."""
        return self.epoch

    async def reconcile(self, listing: dict[str, list[ContainerFacts] | None], since: int,
                        hub_servers: set[RequestKey] | None = None) -> dict:
        """Make the allocations agree with the engines (rules in the module docstring).

        ``listing``: per node, its session containers, or None where the node could not be
        listed (nothing on it is touched).  ``since``: ``begin_listing()`` from before the
        listing.  ``hub_servers``: servers the hub runs or is starting, None if the hub could
        not be asked (then no container is removed as unknown to the hub).
        """
        async with self._lock:
            now = time.time()
            listed = {n for n, facts in listing.items() if facts is not None}
            facts_by_id = {f.request_id: f for facts in listing.values() if facts for f in facts}
            changed, deleted, stopping, pairs, unclaimed = {}, {}, [], [], []
            report = {k: [] for k in ("restored", "repaired", "released", "exited", "orphans",
                                      "requeued", "unknown_removed")}
            sched = self.queue
            unseen = {r.id for r in self.records.values() if r.changed > since}  # new since the hub was asked
            for rec in list(self.records.values()):
                if rec.id in self._cancelled and rec.state == "PENDING" and rec.changed <= since:
                    pairs += self._drop(rec, "The request was cancelled.", deleted)  # the release that failed
                    report["released"].append(str(rec.key))
                    continue
                if rec.changed > since or not rec.holds_share or rec.placement.node not in listed:
                    continue
                f = facts_by_id.get(rec.id)
                if f is not None and f.holds:
                    if f.placement != rec.placement and self._fits_somehow(f.placement):
                        log.warning("%s runs with %s, not %s as recorded: the engine wins",
                                    rec.key, f.placement, rec.placement)
                        sched.move_admitted(self._core(rec).key, f.placement)
                        rec.placement = f.placement
                        changed[rec.id] = rec
                        report["repaired"].append(str(rec.key))
                    if rec.state == "RUNNING" and hub_servers is not None:
                        if rec.key in hub_servers:
                            self._orphan_since.pop(rec.id, None)
                        elif now - self._orphan_since.setdefault(rec.id, now) >= self.orphan_grace:
                            self._to_stopping(rec, changed, stopping)
                            report["orphans"].append(str(rec.key))
                    elif rec.state == "STOPPING":
                        stopping.append(rec)
                elif f is not None:
                    self._to_stopping(rec, changed, stopping)
                    report["exited"].append(str(rec.key))
                elif (hub_servers is not None and rec.key not in hub_servers and not self._open_waits.get(rec.id)
                      and rec.state == "RUNNING" and not rec.delivered and rec.id not in self._cancelled
                      and (rec.admitted_at or 0) > now - self.admission_grace
                      and self.on_orphan_admitted is not None):
                    # Admitted, but the spawner that queued it never heard: it died with the hub
                    # between two polls (so the admission took it for attached). The session is
                    # still wanted: the hub is asked to start it, as for any admission nobody
                    # waits for, until the admission grace ends.
                    unclaimed.append(rec)
                    report["orphans"].append(str(rec.key))
                elif not self._may_be_starting(rec, now) or (
                        hub_servers is not None and rec.key not in hub_servers and not self._open_waits.get(rec.id)):
                    # No container, and no spawner can make one: either the grace is over, or the
                    # hub (asked after the listing began) neither runs nor starts that server (a
                    # spawn that stopped while this service was away, so its release was lost).
                    pairs += self._drop(rec, "No container of the session was found.", deleted)
                    report["released"].append(str(rec.key))
                elif rec.state == "STOPPING":
                    stopping.append(rec)  # its removal frees the share once no container can come
            known_nodes = {n.name for n in self.nodes}
            for f in facts_by_id.values():
                gone = self._gone.get(f.request_id)
                if f.request_id in self.records or (gone and gone[0] > since) or f.node not in listed:
                    continue
                if f.node not in known_nodes or not self._fits_somehow(f.placement):
                    log.warning("Container of %s (attempt %s) names node/devices this service does not "
                                "know; it is left alone", f.key, f.request_id[:8])
                    continue
                if not f.holds:
                    self._remove_unknown(f)
                    report["unknown_removed"].append(str(f.key))
                    continue
                rec = self._adopt(f, now, changed, stopping, report)
                report["restored"].append(str(rec.key))
            pairs += sched.schedule()
            admitted = self._admitted(pairs, changed)
            if hub_servers is not None:
                # Admitted now, and the hub (asked after the listing began) does not start them:
                # their spawners died with it, even one seen a moment ago. Asked to start them.
                unclaimed += [r for r in admitted if r.key not in hub_servers and r.id not in unseen
                              and not self.is_waited_on(r) and r.id not in self._cancelled]
            if changed or deleted:
                await self._commit(changed, deleted)
        if self.overcommitted():
            log.error("Over-commit on the engines (quanta beyond capacity by device): %s", self.overcommitted())
        asked = {r.id for r in unclaimed}
        self._after([r for r in admitted if r.id not in asked], stopping)
        for rec in unclaimed:
            asyncio.ensure_future(self.on_orphan_admitted(rec))
        return report

    def _drop(self, rec: Record, reason: str, deleted: dict) -> list:
        """Take ``rec`` out of the queue and the records (written with ``deleted``); what that admits."""
        pairs = self.queue.release(self._core(rec).key)
        del self.records[rec.id]
        if self.live.get(rec.key) == rec.id:
            del self.live[rec.key]
        deleted[rec.id] = (rec, reason)
        return pairs

    def _to_stopping(self, rec: Record, changed: dict, stopping: list) -> None:
        rec.state = "STOPPING"
        if self.live.get(rec.key) == rec.id:
            del self.live[rec.key]
        changed[rec.id] = rec
        stopping.append(rec)

    def _remove_unknown(self, f: ContainerFacts) -> None:
        if self.engines is None:
            return

        async def remove():
            try:
                await self.engines.remove(f.node, f.request_id)
            except Exception as e:
                log.warning("Could not remove the exited container of %s: %s", f.key, e)

        asyncio.ensure_future(remove())

    def _adopt(self, f: ContainerFacts, now: float, changed: dict, stopping: list, report: dict) -> Record:
        """A container no record knows: account for it with the share its labels state."""
        live = self.get(f.key)
        request = Request(f.key, sum(s.quanta for s in f.shares), f.cpu_millis, f.memory_bytes, f.image,
                          group=f.group if f.group in self.groups else "")
        rec = Record(id=f.request_id, request=request, state="RUNNING" if live is None else "STOPPING",
                     placement=f.placement, submitted_at=now, admitted_at=now, delivered=True)
        try:
            self.queue.restore_admitted(self._core(rec), rec.placement)
        except ValueError:
            for other in self._unstarted_on(f.placement):
                core = self.queue.requeue(self._core(other).key)
                other.request = replace(other.request, seq=core.seq)
                other.state, other.placement, other.admitted_at = "PENDING", None, None
                changed[other.id] = other
                report["requeued"].append(str(other.key))
                log.warning("%s goes back to the queue: the engine runs %s on its devices", other.key, f.key)
                try:
                    self.queue.restore_admitted(self._core(rec), rec.placement)
                    break
                except ValueError:
                    continue
            else:
                self._restore_share(rec)
        rec.request = replace(rec.request, seq=self.queue.admitted()[self._core(rec).key][0].seq)
        self.records[rec.id] = rec
        if live is None:
            self.live[f.key] = rec.id
        else:
            stopping.append(rec)
        changed[rec.id] = rec
        log.warning("Adopted the container of %s (attempt %s) from the engine%s", f.key, f.request_id[:8],
                    "" if live is None else "; it is removed: the server has a newer attempt")
        return rec

    def _unstarted_on(self, placement: Placement) -> list[Record]:
        """Admissions not yet handed to a spawner that share a device with ``placement``,
        newest first."""
        devices = {s.device_uuid for s in placement.shares}
        out = [r for r in self.records.values()
               if r.state == "RUNNING" and not r.delivered and r.placement is not None
               and r.placement.node == placement.node
               and (devices & {s.device_uuid for s in r.placement.shares} or not devices)]
        return sorted(out, key=lambda r: r.admitted_at or 0, reverse=True)


def placement_to_json(p: Placement) -> dict:
    return {
        "node": p.node,
        "shares": [{"device": s.device_uuid, "quanta": s.quanta} for s in p.shares],
        "cpu_millis": p.cpu_millis,
        "memory_bytes": p.memory_bytes,
    }

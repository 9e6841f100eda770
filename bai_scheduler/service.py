"""The scheduler service's state machine, without HTTP.

Wraps the pure ``AdmissionQueue`` with durability (``Store``), wake-ups for the
spawners waiting on their request, and repair from the Docker engine's labels.
Every method runs on the event loop; nothing here blocks on Docker.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Iterable

from .core.model import Placement, Request, RequestKey, Share
from .core.placement import Capacity
from .core.queue import AdmissionQueue, DuplicateRequest, QueuePolicy, UserLimits
from .core.units import FgpuUnits
from .store import Record, Store, StoreUnavailable

log = logging.getLogger("bai_scheduler")


class Refused(Exception):
    """A request the scheduler will not take; ``str(e)`` tells the user why."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class ContainerFacts:
    """What the engine says about one session container (from its labels)."""

    request_id: str
    key: RequestKey
    node: str
    shares: tuple[Share, ...]
    cpu_millis: int
    memory_bytes: int
    image: str
    running: bool


class Service:
    # A spawner long-poll that returned this recently still counts as attached.
    WAITER_GRACE_S = 5.0

    def __init__(
        self,
        nodes,
        units: FgpuUnits,
        store: Store,
        policy: QueuePolicy | None = None,
        limits: UserLimits | None = None,
        span: str = "whole-then-fraction",
        strategy: str = "concentrate",
    ):
        self.nodes = list(nodes)
        self.units = units
        self.store = store
        self.policy = policy or QueuePolicy()
        self.limits = limits or UserLimits()
        self.span = span
        self.strategy = strategy
        self.records: dict[RequestKey, Record] = {}
        self.epoch = 0
        self._changed = asyncio.Condition()
        self._attached: dict[RequestKey, float] = {}
        self._open_waits: dict[RequestKey, int] = {}
        # Called with each record admitted while no spawner waits for it
        # (e.g. the hub was down): the app asks the hub to start that server.
        self.on_orphan_admitted: Callable[[Record], Awaitable[None]] | None = None
        self.admission_latencies: list[float] = []
        self.degraded: str | None = None
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
        return AdmissionQueue(capacity, self.policy, self.limits)

    def _rebuild(self, records: Iterable[Record]) -> None:
        """Make the in-memory scheduler match ``records`` exactly (no pass is run)."""
        self.queue = self._new_queue()
        self.records = {}
        known_nodes = {n.name for n in self.nodes}
        for rec in sorted(records, key=lambda r: r.request.seq):
            if rec.state == "RUNNING" and rec.placement is not None:
                if rec.placement.node not in known_nodes:
                    log.warning("Dropping %s: node %s is no longer configured", rec.key, rec.placement.node)
                    continue
                try:
                    self.queue.restore_admitted(rec.request, rec.placement)
                except ValueError as e:
                    log.error("Cannot restore %s on %s: %s", rec.key, rec.placement.node, e)
                    continue
            else:
                rec.state = "PENDING"
                rec.placement = None
                self.queue.restore_pending(rec.request)
            self.records[rec.key] = rec

    def set_gpu_ready(self, node: str, ready: bool) -> None:
        """Let placement use ``node``'s GPUs or not; run ``schedule()`` after a node became ready."""
        (self.gpu_not_ready.discard if ready else self.gpu_not_ready.add)(node)
        self.queue.capacity.set_gpu_ready(node, ready)

    def set_node_images(self, node: str, refs: frozenset[str]) -> None:
        """The image references ``node`` holds now (placement prefers it for those images)."""
        self.node_images[node] = frozenset(refs)
        self.queue.capacity.set_node_images(node, refs)

    def reload(self) -> None:
        """Throw away memory and rebuild from the database."""
        self._rebuild(self.store.load())
        self._committed = {k: replace(r) for k, r in self.records.items()}

    def _persist(self, upserts=(), deletes=()) -> None:
        """Write a change; if the database fails, memory goes back to the last
        state that was written (kept in ``_committed``), so no share is granted
        or freed that the database does not know of."""
        upserts, deletes = list(upserts), list(deletes)
        try:
            self.store.apply(upserts, [r.id for r in deletes])
        except StoreUnavailable as e:
            self.degraded = str(e)
            self._rebuild([replace(r) for r in self._committed.values()])
            raise
        self.degraded = None
        for r in deletes:
            if self._committed.get(r.key) is not None and self._committed[r.key].id == r.id:
                del self._committed[r.key]
        for r in upserts:
            self._committed[r.key] = replace(r)

    # -- queries -------------------------------------------------------------

    def get(self, key: RequestKey) -> Record | None:
        return self.records.get(key)

    def status(self, rec: Record) -> dict:
        """The public view of one request."""
        out = {
            "id": rec.id,
            "user": rec.key.user,
            "server": rec.key.server,
            "state": rec.state,
            "image": rec.request.image,
            "quanta": rec.request.quanta,
            "fgpu": self.units.to_fgpu(rec.request.quanta),
            "cpu_millis": rec.request.cpu_millis,
            "memory_bytes": rec.request.memory_bytes,
            "submitted_at": rec.submitted_at,
            "admitted_at": rec.admitted_at,
            "epoch": self.epoch,
        }
        if rec.state == "PENDING":
            out["position"] = self.queue.position(rec.key)
            out["reason"] = self.queue.wait_reason(rec.key)
            if rec.request.quanta and self.gpu_not_ready:
                out["reason"] += f" (GPUs not ready on {', '.join(sorted(self.gpu_not_ready))})"
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

    def pending(self) -> list[Record]:
        return [self.records[r.key] for r in self.queue.pending() if r.key in self.records]

    def running(self) -> list[Record]:
        return [r for r in self.records.values() if r.state == "RUNNING"]

    # -- changes ---------------------------------------------------------------

    async def submit(
        self,
        key: RequestKey,
        quanta: int,
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        image: str = "",
        user_options: dict | None = None,
        reattach: bool = False,
    ) -> Record:
        """Queue or admit a request.

        ``reattach``: the spawner (re)starting this server takes over an existing
        record of the same shape instead of being refused as a duplicate.
        """
        existing = self.records.get(key)
        if existing is not None:
            same = (
                existing.request.quanta == quanta
                and existing.request.cpu_millis == cpu_millis
                and existing.request.memory_bytes == memory_bytes
                and existing.request.image == image
            )
            if reattach and same:
                self.attach(key)
                return existing
            if reattach:
                # A changed request for the same server replaces the old one.
                await self.release(key)
            else:
                raise Refused(f"{key} already has a {existing.state.lower()} request", 409)
        request = Request(key=key, quanta=quanta, cpu_millis=cpu_millis, memory_bytes=memory_bytes, image=image)
        try:
            decision = self.queue.submit(request)
        except DuplicateRequest:
            raise Refused(f"{key} already has a request", 409) from None
        if decision.state == "REFUSED":
            raise Refused(decision.reason, 400)
        request = decision.request
        rec = Record(
            id=uuid.uuid4().hex,
            request=request,
            state=decision.state,
            placement=decision.placement,
            user_options=dict(user_options or {}),
        )
        if decision.state == "RUNNING":
            rec.admitted_at = time.time()
        self.records[key] = rec
        self.attach(key)
        # The same pass may admit others (e.g. a skipped head now behind us).
        others = self._mark_admitted(decision.also_admitted)
        self._persist(upserts=[rec, *others])
        await self._notify()
        self._start_orphans(others)
        return rec

    async def release(self, key: RequestKey, request_id: str | None = None) -> list[Record]:
        """Cancel a queued request or free an admitted one, then admit what now fits.

        With ``request_id``, only that incarnation is released: a stale event
        for an old container never frees the share of a newer session.
        """
        rec = self.records.get(key)
        if rec is None or (request_id is not None and rec.id != request_id):
            return []
        t0 = time.perf_counter()
        admitted_pairs = self.queue.release(key)
        del self.records[key]
        self._attached.pop(key, None)
        admitted = self._mark_admitted(admitted_pairs)
        self._persist(upserts=admitted, deletes=[rec])
        if admitted:
            self.admission_latencies.append(time.perf_counter() - t0)
            del self.admission_latencies[:-10000]
        await self._notify()
        self._start_orphans(admitted)
        return admitted

    async def schedule(self) -> list[Record]:
        admitted = self._mark_admitted(self.queue.schedule())
        if admitted:
            self._persist(upserts=admitted)
            await self._notify()
            self._start_orphans(admitted)
        return admitted

    def _mark_admitted(self, pairs) -> list[Record]:
        now = time.time()
        out = []
        for request, placement in pairs:
            rec = self.records[request.key]
            rec.state = "RUNNING"
            rec.placement = placement
            rec.admitted_at = now
            out.append(rec)
        return out

    def _start_orphans(self, admitted: list[Record]) -> None:
        if self.on_orphan_admitted is None:
            return
        for rec in admitted:
            if not self.is_attached(rec.key):
                log.info("Admitted %s while no spawner waits: asking the hub to start it", rec.key)
                asyncio.ensure_future(self.on_orphan_admitted(rec))

    async def _notify(self) -> None:
        self.epoch += 1
        async with self._changed:
            self._changed.notify_all()

    # -- spawner long-poll -----------------------------------------------------

    def attach(self, key: RequestKey) -> None:
        self._attached[key] = time.monotonic()

    def is_attached(self, key: RequestKey) -> bool:
        if self._open_waits.get(key):
            return True
        seen = self._attached.get(key)
        return seen is not None and time.monotonic() - seen < self.WAITER_GRACE_S

    async def wait(self, key: RequestKey, epoch: int, timeout: float) -> Record | None:
        """Return once anything changed after ``epoch`` (or at ``timeout``)."""
        self._open_waits[key] = self._open_waits.get(key, 0) + 1
        try:
            deadline = time.monotonic() + timeout
            async with self._changed:
                while self.epoch <= epoch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), left)
                    except asyncio.TimeoutError:
                        break
            return self.records.get(key)
        finally:
            self._open_waits[key] -= 1
            if not self._open_waits[key]:
                del self._open_waits[key]
            self.attach(key)

    # -- repair from the engine ------------------------------------------------

    async def reconcile(self, containers: list[ContainerFacts], grace: float = 300.0) -> dict:
        """Make the allocations agree with the session containers on the engines.

        The engine wins: a running container keeps exactly the share its labels
        state; an admitted request whose container is gone is released, unless
        a spawner still waits on it or it was admitted less than ``grace``
        seconds ago (its container may be being created right now); a running
        container the database forgot is restored.
        """
        now = time.time()
        running = {c.key: c for c in containers if c.running}
        records = dict(self.records)
        restored, repaired, released = [], [], []
        for key, c in running.items():
            rec = records.get(key)
            placement = Placement(c.node, c.shares, c.cpu_millis, c.memory_bytes)
            if rec is None or rec.id != c.request_id or rec.placement != placement:
                old = rec
                request = Request(key, sum(s.quanta for s in c.shares), c.cpu_millis, c.memory_bytes, c.image,
                                  seq=old.request.seq if old else 0)
                records[key] = Record(
                    id=c.request_id, request=request, state="RUNNING", placement=placement,
                    user_options=old.user_options if old else {},
                    submitted_at=old.submitted_at if old else time.time(),
                    admitted_at=(old.admitted_at if old else None) or time.time(),
                )
                (repaired if old else restored).append(key)
        for key, rec in list(records.items()):
            if (rec.state == "RUNNING" and key not in running and not self.is_attached(key)
                    and (rec.admitted_at or 0) < now - grace):
                del records[key]
                released.append(key)
        if restored or repaired or released:
            # Engine-restored records first, so they win any contention for devices.
            order = sorted(records.values(), key=lambda r: (r.key not in running, r.request.seq))
            seq = self.store.max_seq()
            fixed = []
            for rec in order:
                if rec.request.seq == 0:
                    seq += 1
                    rec.request = replace(rec.request, seq=seq)
                fixed.append(rec)
            self._rebuild(fixed)
            self._persist(upserts=list(self.records.values()),
                          deletes=[r for r in self.store.load() if r.key not in self.records
                                   or self.records[r.key].id != r.id])
            await self._notify()
        await self.schedule()
        return {"restored": [str(k) for k in restored], "repaired": [str(k) for k in repaired],
                "released": [str(k) for k in released]}

    # -- views -------------------------------------------------------------------

    def capacity(self) -> list[dict]:
        return self.queue.capacity.usage()


def placement_to_json(p: Placement) -> dict:
    return {
        "node": p.node,
        "shares": [{"device": s.device_uuid, "quanta": s.quanta} for s in p.shares],
        "cpu_millis": p.cpu_millis,
        "memory_bytes": p.memory_bytes,
    }

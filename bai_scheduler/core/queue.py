"""The pending queue and its admission policy, on top of ``Capacity``.  Pure: no I/O.

Order (``QueuePolicy.order``)
  * ``fifo``: submission order (``Request.seq``).
  * ``drf``: dominant-resource fairness.  Users take turns by their dominant share (the largest
    of fGPU, CPU and memory fractions of the cluster they hold); within a user, submission
    order.  Shares grow as a pass admits, so a pass interleaves users by progressive filling.

Head rule (``QueuePolicy.head``): what happens when a request in that order does not fit.
  * ``strict``: nothing passes it; the pass stops.
  * ``skip``: it blocks the queue like ``strict`` for ``skip_after`` rounds; from then on later
    requests may be admitted ahead of it.  A round is its first try, then each time capacity is
    given back while it still does not fit (so a pass run only because someone else submitted
    does not count: the submit fast path and a full pass agree).
  * ``backfill``: the first ``reservations`` requests that do not fit each get a reservation
    (``Capacity.reserve``: the device, or for multi-GPU requests the node and devices, closest
    to fitting, plus the CPU/memory they need on that node).  Later requests may start only on
    resources outside every reservation.  This is EASY-backfill without run-time estimates
    (sessions have none), i.e. the conservative rule.

Starvation guard (every order and head rule)
  The *senior* request is the oldest waiting one (lowest ``seq``) that its own user's limits do
  not hold back.  It becomes *due* once it has been passed over: somewhere it could run (a
  device, or enough whole devices of one node), every session that was there when it arrived
  has ended and a younger one has started.  (When it asks for CPU or memory that node limits,
  the sessions on the whole node count.)  From then on each pass tries it first, before the
  queue order, and if it does not fit it keeps a *pin* there: a reservation that, unlike the
  per-pass ones above, stays on the same devices (and CPU/memory of that node) until it starts,
  and that nothing else may use.  The pinned devices only ever free up.

  Bound: with L the longest a session runs, a request that became the oldest waiting one at
  t_oldest after arriving at t_arrived starts by max(t_oldest, t_arrived + L) + L, so at most
  2·L after it became the oldest (sooner when it fits earlier).  A queue order that keeps putting
  other requests first (DRF) or a head rule that lets others pass (skip, backfill) can delay it
  only until then.  ``tests/test_starvation.py`` checks this on adversarial and random traces.

User limits (``UserLimits``, 0 = unlimited) and group quotas (``quotas.Quota`` of the group a
request names) never block other users or groups: a request held back by its own user's limit or
its group's quota is passed over (its wait reason says which limit) without reserving anything.
A request that exceeds a limit or quota on its own, or a user or group already at ``max_pending``
waiting requests, is refused at submit.  A request with ``pools`` is placed only on nodes of
those pools (``Capacity``); the passes' shortcuts (shapes, failures) tell pools apart.
"""
from __future__ import annotations

import gc
import heapq
from bisect import bisect_left, insort
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, replace

from .model import Placement, Request, RequestKey
from .placement import Capacity, Reservation, Reservations
from .quotas import Quota, Usage, held_reason, never_reason, pending_reason
from .units import format_bytes

ORDERS = ("fifo", "drf")
HEADS = ("strict", "skip", "backfill")


@contextmanager
def cyclic_gc_paused():
    """CPython's cyclic collector paused while many short-lived objects are made that form no
    cycles (a pass, the status of every request): each collection it would start meanwhile
    rescans the whole large, long-lived queue and index again, making big builds super-linear."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class DuplicateRequest(ValueError):
    """A request with this key is already pending or running."""


@dataclass(frozen=True)
class QueuePolicy:
    order: str = "fifo"
    head: str = "backfill"
    skip_after: int = 3
    reservations: int = 1  # backfill: how many blocked requests get a reservation per pass

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.skip_after < 0:
            raise ValueError("skip_after must be >= 0")
        if self.reservations < 0:
            raise ValueError("reservations must be >= 0")


@dataclass(frozen=True)
class UserLimits:
    max_running: int = 0
    max_pending: int = 0
    max_quanta: int = 0
    max_cpu_millis: int = 0
    max_memory_bytes: int = 0


@dataclass(frozen=True)
class Decision:
    state: str  # "RUNNING" | "PENDING" | "REFUSED"
    placement: Placement | None = None
    position: int | None = None
    reason: str = ""
    request: Request | None = None
    # Other requests the same scheduling pass admitted (act on them like release()'s result).
    also_admitted: tuple = ()


NEVER = float("inf")


def _within(pools: tuple, other: tuple) -> bool:
    """True if the nodes of ``pools`` are among those of ``other`` (() means every node)."""
    return not other or pools == other or (bool(pools) and set(pools).issubset(other))


class _Ages:
    """For each of n slots (nodes or devices), its sessions in admission order, so the oldest
    one still running is found at once; sessions that ended are dropped lazily."""

    def __init__(self, n: int, born: dict):
        self._born = born  # key -> admission number of the sessions running now
        self._queues = [deque() for _ in range(n)]
        self._live = [0] * n

    def add(self, i: int, number: int, key):
        self._queues[i].append((number, key))
        self._live[i] += 1

    def remove(self, i: int):
        """One session on slot ``i`` ended (already gone from ``born``)."""
        self._live[i] -= 1
        q = self._queues[i]
        if len(q) > 2 * self._live[i] + 64:  # ended sessions pile up behind a long one
            self._queues[i] = deque(e for e in q if self._born.get(e[1]) == e[0])

    def oldest(self, i: int) -> float:
        """Admission number of the oldest session running on slot ``i`` (NEVER if none)."""
        q = self._queues[i]
        while q and self._born.get(q[0][1]) != q[0][0]:
            q.popleft()
        return q[0][0] if q else NEVER


class AdmissionQueue:
    """Queue + admission on top of a ``Capacity``.  Never admits a request twice, never loses one."""

    def __init__(self, capacity: Capacity, policy: QueuePolicy | None = None, limits: UserLimits | None = None,
                 quotas: dict[str, Quota] | None = None):
        self.capacity = capacity
        self.policy = policy or QueuePolicy()
        self.limits = limits or UserLimits()
        self.quotas = {g: q for g, q in (quotas or {}).items() if q != Quota()}
        self._group_usage: dict[str, Usage] = {}
        self._seq = 0
        self._pending: dict[RequestKey, Request] = {}
        self._order: list[int] = []  # pending seqs, ascending
        self._by_seq: dict[int, RequestKey] = {}
        self._req_by_seq: dict[int, Request] = {}
        self._admitted: dict[RequestKey, tuple[Request, Placement]] = {}
        self._usage: dict[str, Usage] = {}
        # skip head: seq -> rounds it failed (capped at skip_after + 1), and the round last counted
        self._fails: dict[int, int] = {}
        self._fail_round: dict[int, int] = {}
        self._round = 0  # +1 each time capacity is given back
        self._pending_q: Counter = Counter()  # quanta of pending requests
        # pending seqs by (quanta, cpu, memory, pools): a pass skips a whole shape once one such fails
        self._by_shape: dict[tuple[int, int, int, tuple], list[int]] = {}
        # DRF display order (``_drf_order``), kept per user: a change to one user's sessions or
        # waiting requests moves only that user's entries, so positions stay cheap to read.
        self._user_pending: dict[str, dict[int, Request]] = {}  # user -> seq -> pending request
        self._drf_keys: list[tuple[float, int]] = []  # (share, seq) of each pending but the pinned, sorted
        self._drf_key: dict[int, tuple[float, int]] = {}  # seq -> its entry in _drf_keys
        self._drf_user_keys: dict[str, list[tuple[float, int]]] = {}  # user -> their entries
        self._drf_stale: set[str] = set()  # users whose entries are out of date
        self._drf_first: tuple[int, str] | None = None  # (seq, user) of the pinned request shown first
        self._drf_cache: list[Request] | None = None
        # Starvation guard: sessions are numbered as admitted (``_clock``); a pending request
        # remembers the number when it arrived (``_mark``), each node its sessions in admission
        # order (``_node_born``, stale entries dropped lazily).
        self._clock = 0
        self._mark: dict[int, int] = {}
        self._born: dict[RequestKey, int] = {}
        self._node_born = _Ages(len(capacity.nodes), self._born)
        self._dev_born = _Ages(sum(len(n.devices) for n in capacity.nodes), self._born)
        self._pin: tuple[RequestKey, Reservation] | None = None
        self._passed_over: int | None = None  # seq of a senior passed over on a free place
        self._senior_seq: int | None = None  # the senior of the pass under way
        # (stopped, reservations, count) left by the last full FIFO pass; None when capacity was
        # given back or restored since, so the next pass must be a full one.
        self._settled = None
        self._done: set[int] = set()
        lim = self.limits
        self._has_limits = bool(
            lim.max_running or lim.max_quanta or lim.max_cpu_millis or lim.max_memory_bytes
        ) or any(q.holds for q in self.quotas.values())

    # ------------------------------------------------------------------ helpers
    def _user(self, user: str) -> Usage:
        u = self._usage.get(user)
        if u is None:
            u = self._usage[user] = Usage()
        return u

    def _group(self, req: Request) -> Usage | None:
        """The usage of ``req``'s group, if that group has a quota."""
        if not req.group or req.group not in self.quotas:
            return None
        g = self._group_usage.get(req.group)
        if g is None:
            g = self._group_usage[req.group] = Usage()
        return g

    def group_usage(self) -> dict[str, Usage]:
        """What each group with a quota holds and has waiting now."""
        return {g: self._group_usage.get(g, Usage()) for g in self.quotas}

    def _check_duplicate(self, key: RequestKey):
        if key in self._pending or key in self._admitted:
            raise DuplicateRequest(f"{key} already has a pending or running session")

    @staticmethod
    def _shape(req: Request) -> tuple[int, int, int, tuple]:
        return (req.quanta, req.cpu_millis, req.memory_bytes, req.pools)

    @staticmethod
    def _insert(lst: list[int], seq: int):
        if not lst or seq > lst[-1]:
            lst.append(seq)
        else:
            insort(lst, seq)

    def _changed_user(self, user: str):
        """``user``'s sessions or waiting requests changed: so may their places in DRF order
        (kept under FIFO too, at the cost of a set of names, so the order may change later)."""
        self._drf_stale.add(user)
        self._drf_cache = None

    def _add_pending(self, req: Request):
        self._pending[req.key] = req
        self._by_seq[req.seq] = req.key
        self._req_by_seq[req.seq] = req
        self._mark[req.seq] = self._clock
        self._insert(self._order, req.seq)
        self._user_pending.setdefault(req.key.user, {})[req.seq] = req
        shape = self._shape(req)
        lst = self._by_shape.get(shape)
        if lst is None:
            lst = self._by_shape[shape] = []
        self._insert(lst, req.seq)
        self._user(req.key.user).pending += 1
        g = self._group(req)
        if g is not None:
            g.pending += 1
        self._pending_q[req.quanta] += 1
        self._changed_user(req.key.user)

    def _remove_pending(self, req: Request, deferred: set | None = None):
        """Forget a pending request.  With ``deferred`` (inside a pass) its seq stays in the
        ordered lists until ``_compact`` drops all of the pass's seqs at once (deleting from the
        front of a long list one by one would make a big pass quadratic)."""
        del self._pending[req.key]
        del self._by_seq[req.seq]
        del self._req_by_seq[req.seq]
        del self._mark[req.seq]
        self._forget_user_pending(req.key.user, req.seq)
        if deferred is not None:
            deferred.add(req.seq)
        else:
            del self._order[bisect_left(self._order, req.seq)]
            shape = self._shape(req)
            lst = self._by_shape[shape]
            del lst[bisect_left(lst, req.seq)]
            if not lst:
                del self._by_shape[shape]
        self._fails.pop(req.seq, None)
        self._fail_round.pop(req.seq, None)
        self._user(req.key.user).pending -= 1
        g = self._group(req)
        if g is not None:
            g.pending -= 1
        c = self._pending_q[req.quanta] - 1
        if c:
            self._pending_q[req.quanta] = c
        else:
            del self._pending_q[req.quanta]
        self._changed_user(req.key.user)

    def _forget_user_pending(self, user: str, seq: int):
        mine = self._user_pending[user]
        del mine[seq]
        if not mine:
            del self._user_pending[user]

    def _admit(self, req: Request, placement: Placement):
        self._admitted[req.key] = (req, placement)
        self._user(req.key.user).add(req)
        g = self._group(req)
        if g is not None:
            g.add(req)
        self._clock += 1
        self._born[req.key] = self._clock
        self._node_born.add(self.capacity.node_index(placement.node), self._clock, req.key)
        for share in placement.shares:
            self._dev_born.add(self.capacity.device_index(share.device_uuid), self._clock, req.key)
        self._changed_user(req.key.user)

    def _unadmit(self, key: RequestKey) -> tuple[Request, Placement]:
        req, placement = self._admitted.pop(key)
        self._user(key.user).add(req, -1)
        g = self._group(req)
        if g is not None:
            g.add(req, -1)
        del self._born[key]
        self._node_born.remove(self.capacity.node_index(placement.node))
        for share in placement.shares:
            self._dev_born.remove(self.capacity.device_index(share.device_uuid))
        self._changed_user(key.user)
        return req, placement

    def _fresh(self, req: Request, empty_too: bool = False) -> tuple[set[int], set[int]]:
        """Where ``req`` was passed over, so it may be pinned there: (nodes, devices) that could
        host it, run no session it would wait for that is older than it, and run at least one
        younger session (``empty_too``: or none).  The sessions it would wait for are those on
        the devices, and those on the whole node when it asks for CPU or memory the node limits.
        (An empty device alone is not a sign of it: ``req`` may simply take it.)"""
        mark = self._mark[req.seq]
        cap = self.capacity
        nodes, devices = set(), set()
        q, Q = req.quanta, cap.quanta_per_gpu
        for ni in range(len(cap.nodes)):
            if not cap.hosts(ni, req) or (q and cap.gpu_off(ni)):
                continue  # could never run it, or gives no GPU share now (not ready)
            limited = (req.cpu_millis and cap.nodes[ni].cpu_millis) or (
                req.memory_bytes and cap.nodes[ni].memory_bytes)
            node_oldest = self._node_born.oldest(ni)
            if limited and node_oldest <= mark:
                continue
            if q == 0:
                if node_oldest < NEVER or empty_too:
                    nodes.add(ni)
                continue
            clean = [di for di in cap.node_devices(ni) if self._dev_born.oldest(di) > mark
                     and (cap.device_capacity(di) >= q and not cap.refuses(di, q) if q <= Q
                          else cap.device_capacity(di) == Q)]
            if q <= Q:
                clean = [di for di in clean if empty_too or self._dev_born.oldest(di) < NEVER]
                if clean:
                    nodes.add(ni)
                    devices.update(clean)
                continue
            k, r = divmod(q, Q)
            if len(clean) >= k + (1 if r else 0) and (
                    empty_too or any(self._dev_born.oldest(di) < NEVER for di in clean)):
                nodes.add(ni)
                devices.update(clean)
        return nodes, devices

    def _senior(self) -> Request | None:
        """The oldest pending request its own user's limits do not hold back."""
        for s in self._order:
            req = self._req_by_seq.get(s)
            if req is not None and not (self._has_limits and self._limit_reason(req)):
                return req
        return None

    def _due_at(self, senior: Request) -> tuple[set[int], set[int]]:
        """Where the (unpinned) senior may be pinned now; empty sets if it is not due."""
        fresh = self._fresh(senior)
        if not fresh[0] and self._passed_over == senior.seq:
            fresh = self._fresh(senior, empty_too=True)
        return fresh

    def _senior_stable(self) -> bool:
        """True if the next pass would start with the same senior and pin as now."""
        senior = self._senior()
        if self._pin is not None:
            return senior is not None and self._pin[0] == senior.key
        return senior is None or not self._due_at(senior)[0]

    def _note_passed_over(self, req: Request) -> None:
        """The unpinned senior did not fit in its turn while a place of its was free (the queue
        order or a reservation gave it to someone else): it is due from the next pass on."""
        if req.seq == self._senior_seq and self._pin is None and self._fresh(req, empty_too=True)[0]:
            self._passed_over = req.seq

    def _never_reason(self, req: Request) -> str | None:
        lim = self.limits
        cap = self.capacity
        if lim.max_quanta and req.quanta > lim.max_quanta:
            return f"asks for {cap.fmt(req.quanta)} but the per-user limit is {cap.fmt(lim.max_quanta)}"
        if lim.max_cpu_millis and req.cpu_millis > lim.max_cpu_millis:
            return (
                f"asks for {req.cpu_millis / 1000:g} CPU but the per-user limit is "
                f"{lim.max_cpu_millis / 1000:g} CPU"
            )
        if lim.max_memory_bytes and req.memory_bytes > lim.max_memory_bytes:
            return (
                f"asks for {format_bytes(req.memory_bytes)} memory but the per-user limit is "
                f"{format_bytes(lim.max_memory_bytes)}"
            )
        quota = self.quotas.get(req.group) if req.group else None
        if quota is not None:
            reason = never_reason(req.group, quota, req, cap.units)
            if reason:
                return reason
        return cap.can_ever_fit(req)

    def never_reason(self, request: Request) -> str | None:
        """Why ``request`` could never start here (too big for every node, or a per-user limit
        on its own), or None."""
        return self._never_reason(request)

    def _limit_reason(self, req: Request) -> str | None:
        """Why the user's own limits or its group's quota hold ``req`` back right now, or None."""
        reason = self._user_limit_reason(req)
        if reason is None and req.group:
            quota = self.quotas.get(req.group)
            if quota is not None and quota.holds:
                reason = held_reason(req.group, quota, self._group(req), req, self.capacity.units)
                if reason:
                    reason = "Waiting: " + reason
        return reason

    def _user_limit_reason(self, req: Request) -> str | None:
        lim = self.limits
        u = self._usage.get(req.key.user)
        if u is None:
            return None
        if lim.max_running and u.running >= lim.max_running:
            n = lim.max_running
            return f"Waiting: user limit of {n} running session{'s' if n != 1 else ''}"
        if lim.max_quanta and u.quanta + req.quanta > lim.max_quanta:
            return f"Waiting: user limit of {self.capacity.fmt(lim.max_quanta)} in use"
        if lim.max_cpu_millis and u.cpu + req.cpu_millis > lim.max_cpu_millis:
            return f"Waiting: user limit of {lim.max_cpu_millis / 1000:g} CPU in use"
        if lim.max_memory_bytes and u.mem + req.memory_bytes > lim.max_memory_bytes:
            return f"Waiting: user limit of {format_bytes(lim.max_memory_bytes)} memory in use"
        return None

    def _dominant(self, u: Usage | None, extra: Request | None = None) -> float:
        cap = self.capacity
        q = (u.quanta if u else 0) + (extra.quanta if extra else 0)
        c = (u.cpu if u else 0) + (extra.cpu_millis if extra else 0)
        m = (u.mem if u else 0) + (extra.memory_bytes if extra else 0)
        share = q / cap.total_quanta if cap.total_quanta else 0.0
        if cap.total_cpu_millis:
            share = max(share, c / cap.total_cpu_millis)
        if cap.total_memory_bytes:
            share = max(share, m / cap.total_memory_bytes)
        return share

    # ------------------------------------------------------------------ public API
    def submit(self, request: Request) -> Decision:
        """Queue ``request`` (assigning its ``seq``) and run a pass.

        RUNNING: admitted now.  PENDING: queued.  REFUSED: can never fit, exceeds a per-user
        limit on its own, or the user already has ``max_pending`` waiting requests.
        Raises ``DuplicateRequest`` if the key is already pending or running.
        """
        self._check_duplicate(request.key)
        reason = self._never_reason(request)
        if reason:
            return Decision("REFUSED", reason=reason, request=request)
        lim = self.limits
        if lim.max_pending and self._user(request.key.user).pending >= lim.max_pending:
            n = lim.max_pending
            return Decision(
                "REFUSED",
                reason=f"user limit of {n} waiting session{'s' if n != 1 else ''} reached",
                request=request,
            )
        g = self._group(request)
        reason = g is not None and pending_reason(request.group, self.quotas[request.group], g)
        if reason:
            return Decision("REFUSED", reason=reason, request=request)
        self._seq += 1
        req = replace(request, seq=self._seq)
        self._add_pending(req)
        if self._settled is not None and self.policy.order == "fifo":
            placement = self._submit_settled(req)
            if placement is not None:
                return Decision("RUNNING", placement, None, "", req)
            return Decision("PENDING", None, self.position(req.key), self.wait_reason(req.key), req)
        admitted = self.schedule()
        others = tuple(a for a in admitted if a[0].key != req.key)
        if req.key in self._admitted:
            _, placement = self._admitted[req.key]
            return Decision("RUNNING", placement, None, "", req, others)
        return Decision("PENDING", None, self.position(req.key), self.wait_reason(req.key), req, others)

    def release(self, key: RequestKey) -> list[tuple[Request, Placement]]:
        """Drop a pending request or free an admitted one, then run a pass; returns the newly admitted.

        Unknown keys are ignored (release is idempotent).
        """
        if key in self._pending:
            self._settled = None
            self._remove_pending(self._pending[key])
        elif key in self._admitted:
            _, placement = self._unadmit(key)
            self.capacity.give_back(placement)
            self._settled = None
            self._round += 1
        else:
            return []
        return self.schedule()

    def restore_admitted(self, request: Request, placement: Placement, force: bool = False) -> None:
        """After a restart: a running session; takes its capacity (ValueError if it cannot).

        ``force``: count it even on a full device (the engine runs it; see ``Capacity.take``).
        """
        self._check_duplicate(request.key)
        self.capacity.take(placement, force=force)
        self._settled = None
        self._admit(request, placement)
        self._seq = max(self._seq, request.seq)

    def restore_pending(self, request: Request) -> Request:
        """After a restart: a queued request, keeping its ``seq`` (a new one if it has none)."""
        self._check_duplicate(request.key)
        if request.seq <= 0 or request.seq in self._by_seq:
            self._seq += 1
            request = replace(request, seq=self._seq)
        self._seq = max(self._seq, request.seq)
        self._settled = None
        self._add_pending(request)
        return request

    def set_gpu_ready(self, node: str, ready: bool) -> None:
        """Let placement use ``node``'s GPUs or not (``Capacity.set_gpu_ready``); run a pass
        after a node became ready."""
        if self.capacity.gpu_ready(node) != ready:
            self.capacity.set_gpu_ready(node, ready)
            self._settled = None  # reservations and placements a pass makes may differ now
            self._round += ready  # GPUs coming back count as capacity given back

    def rename_pending(self, key: RequestKey, new_key: RequestKey) -> Request:
        """A waiting request continues under another key, in the same place (no pass is run)."""
        self._check_duplicate(new_key)
        old = self._pending.pop(key)
        req = replace(old, key=new_key)
        self._pending[new_key] = req
        self._by_seq[req.seq] = new_key
        self._req_by_seq[req.seq] = req
        self._forget_user_pending(key.user, req.seq)
        self._user_pending.setdefault(new_key.user, {})[req.seq] = req
        if key.user != new_key.user:
            self._user(key.user).pending -= 1
            self._user(new_key.user).pending += 1
        if self._pin is not None and self._pin[0] == key:
            self._pin = (new_key, self._pin[1])
        self._settled = None
        self._changed_user(key.user)
        self._changed_user(new_key.user)
        return req

    def move_admitted(self, key: RequestKey, placement: Placement) -> None:
        """An admitted request turns out to hold ``placement`` instead (the engine says so):
        its capacity is moved, over-committing a device if it must.  No pass is run."""
        req, old = self._unadmit(key)
        self.capacity.give_back(old)
        self._round += 1
        self.restore_admitted(req, placement, force=True)

    def requeue(self, key: RequestKey) -> Request:
        """An admitted request that has not started goes back to its place in the queue, its
        capacity returned (an over-committed device is paid off first).  No pass is run."""
        req, placement = self._unadmit(key)
        self.capacity.give_back(placement)
        self._round += 1
        return self.restore_pending(req)

    def get(self, key: RequestKey) -> Decision | None:
        """The current state of ``key`` (RUNNING or PENDING), or None if unknown."""
        if key in self._admitted:
            req, placement = self._admitted[key]
            return Decision("RUNNING", placement, None, "", req)
        req = self._pending.get(key)
        if req is None:
            return None
        return Decision("PENDING", None, self.position(key), self.wait_reason(key), req)

    def pending(self) -> list[Request]:
        """Pending requests in queue order."""
        if self.policy.order == "drf":
            return list(self._drf_order())
        return [self._req_by_seq[s] for s in self._order]

    def admitted(self) -> dict[RequestKey, tuple[Request, Placement]]:
        return dict(self._admitted)

    @property
    def has_limits(self) -> bool:
        """Whether any user limit or group quota may hold a request back."""
        return self._has_limits

    def may_be_held(self, req: Request) -> bool:
        """Whether its user's limits or its group's quota could ever hold ``req`` back."""
        lim = self.limits
        if lim.max_running or lim.max_quanta or lim.max_cpu_millis or lim.max_memory_bytes:
            return True
        quota = self.quotas.get(req.group) if req.group else None
        return quota is not None and quota.holds

    def request_by_seq(self, seq: int) -> Request | None:
        """The pending request with ``seq``, or None."""
        return self._req_by_seq.get(seq)

    @property
    def pin(self) -> tuple[RequestKey, Reservation] | None:
        """The senior request's pinned reservation (see the module docstring), or None."""
        return self._pin

    def position(self, key: RequestKey) -> int | None:
        """1-based place in the queue, or None if not pending."""
        req = self._pending.get(key)
        return None if req is None else self.position_of(req)

    def pending_seqs(self) -> list[int]:
        """The pending requests' seqs, ascending (their order of arrival, whatever the policy)."""
        return list(self._order)

    def places(self) -> dict[int, int]:
        """Every pending request's ``position``, by seq: one walk of the queue order (for a list
        of many requests, instead of a search for each)."""
        return {r.seq: i for i, r in enumerate(self.pending(), 1)}

    def position_of(self, req: Request) -> int:
        """1-based place of ``req``, one of this queue's pending requests (as ``pending()`` or
        ``request_by_seq`` give them: no key to look up)."""
        if self.policy.order == "drf":
            self._drf_refresh()
            first = self._drf_first
            if first is not None and first[0] == req.seq:
                return 1
            return bisect_left(self._drf_keys, self._drf_key[req.seq]) + 1 + (first is not None)
        return bisect_left(self._order, req.seq) + 1

    def wait_reason(self, key: RequestKey, position: int | None = None) -> str | None:
        """Why a pending request waits: what it lacks now ("Needs 1 fGPU; 0.5 free on GPU 0"), or
        that it fits but earlier requests go first; None if not pending.  Its place in the queue
        is ``position`` (pages show both); pass it when the caller has it already."""
        req = self._pending.get(key)
        return None if req is None else self.wait_reason_of(req, position)

    def wait_reason_of(self, req: Request, position: int | None = None) -> str:
        """``wait_reason`` of ``req``, one of this queue's pending requests."""
        limit = self._limit_reason(req) if self._has_limits else None
        if limit:
            return limit
        held = ""
        if self._pin is not None and self._pin[0] == req.key:
            held = f"; node {self._pin[1].node} is kept free for it"
        missing = self.capacity.missing(req)
        if missing:
            return missing[0].upper() + missing[1:] + held
        ahead = (position or self.position_of(req)) - 1
        if not ahead:
            return "Fits now; starts on the scheduler's next pass" + held
        return f"Fits now, but waits behind {ahead} earlier request{'s' if ahead != 1 else ''} (queue policy){held}"

    def __len__(self):
        return len(self._pending)

    # ------------------------------------------------------------------ order
    def _drf_order(self) -> list[Request]:
        """Pending requests in DRF order (the pinned senior first), cached until a change.

        Progressive filling: the user with the smallest dominant share goes next, counting
        their requests ahead as granted.  A user's share only grows with each request, so this
        is the same as sorting every request by (its user's dominant share with the user's
        earlier requests granted, seq): the sorted ``_drf_keys``."""
        self._drf_refresh()
        if self._drf_cache is None:
            reqs = self._req_by_seq
            out = [reqs[self._drf_first[0]]] if self._drf_first is not None else []
            out += [reqs[s] for _, s in self._drf_keys]
            self._drf_cache = out
        return self._drf_cache

    def _drf_entries(self, user: str, pinned_seq: int | None) -> list[tuple[float, int]]:
        """``user``'s sort keys in DRF order: (dominant share with the user's earlier waiting
        requests granted, seq), the pinned request left out (it is shown first, uncounted)."""
        have = self._usage.get(user)
        granted = Usage(have.running, have.quanta, have.cpu, have.mem) if have else Usage()
        out = []
        mine = self._user_pending.get(user, {})
        for s in sorted(mine):
            if s != pinned_seq:
                out.append((self._dominant(granted), s))
                granted.add(mine[s])
        return out

    def _drf_refresh(self):
        """Bring the DRF keys up to date: only the users that changed (and those of the pinned
        request before and now) are recomputed; when many entries move, one sort is cheaper."""
        pinned = self._pending.get(self._pin[0]) if self._pin is not None else None
        first = (pinned.seq, pinned.key.user) if pinned is not None else None
        stale = self._drf_stale
        if first != self._drf_first:
            stale.update(f[1] for f in (first, self._drf_first) if f is not None)
            self._drf_first = first
            self._drf_cache = None
        if not stale:
            return
        fresh = {user: self._drf_entries(user, first[0] if first else None) for user in stale}
        stale.clear()
        old = [self._drf_user_keys.pop(user, []) for user in fresh]
        keys, by_seq = self._drf_keys, self._drf_key
        resort = sum(map(len, old)) + sum(map(len, fresh.values())) > len(keys) // 16 + 32
        for entries in old:  # all removals first: a renamed request's seq moves between users
            for e in entries:
                del by_seq[e[1]]
                if not resort:
                    del keys[bisect_left(keys, e)]
        for user, entries in fresh.items():
            if entries:
                self._drf_user_keys[user] = entries
                for e in entries:
                    by_seq[e[1]] = e
                    if not resort:
                        insort(keys, e)
        if resort:
            self._drf_keys = sorted(by_seq.values())

    # ------------------------------------------------------------------ the pass
    def schedule(self) -> list[tuple[Request, Placement]]:
        """One scheduling pass; returns the requests it admitted, with their placements."""
        if not self._pending:
            self._pin = None
            return []
        with cyclic_gc_paused():
            try:
                if self.policy.order == "drf":
                    return self._pass_drf()
                return self._pass_fifo()
            finally:
                self._compact()  # no-op when the pass already compacted

    def _pass_setup(self):
        self._settled = None
        self._done: set[int] = set()  # seqs admitted in this pass, still in the ordered lists
        self._res = Reservations()
        # Requests that did not fit in this pass, to rule out those no smaller in every way:
        # (cpu, mem, pools) -> least quanta that failed.  Under GPU backend limits or GPUs out of
        # service a larger request may fit where a smaller one did not (a whole GPU on a "whole"
        # node, where a fraction may not go), so failures then rule out the same size only:
        # (cpu, mem, pools, quanta) -> quanta.
        self._failed: dict[tuple, int] = {}
        self._exact = self.capacity.restricted
        self._reserved_count = 0
        self._maxfree_dirty = True
        self._maxfree = 0
        # Set once nothing more can fit in this pass: the rest is only walked while a head
        # rule still has something to record (a skip round, a backfill reservation).
        self._all_fail = False

    def _senior_first(self, out) -> tuple[Request | None, bool]:
        """The starvation guard's step at the start of a pass.

        Returns the senior if it was tried here (it is then left out of the queue walk), and
        whether the pass stops."""
        senior = self._senior()
        self._senior_seq = senior.seq if senior is not None else None
        if self._pin is not None and (senior is None or self._pin[0] != senior.key):
            self._pin = None
        if senior is None:
            return None, False
        fresh = None
        if self._pin is None:
            fresh = self._due_at(senior)
            if not fresh[0]:
                return None, False
        placement = self._try(senior)  # nothing is reserved yet: its own pin is free for it
        if placement is not None:
            self._pin = None
            self._admit_pending(senior, placement, out)
            return senior, False
        if self._pin is None:
            nodes, devices = fresh
            self._pin = (senior.key, self.capacity.reserve(senior, only_nodes=nodes, only_devices=devices))
        self.capacity.hold(self._pin[1], self._res)
        self._maxfree_dirty = True
        self._reserved_count = 1  # the pin is the first reservation
        return senior, self._blocked(senior, reserve=False) == "stop"

    def _exhausted(self) -> bool:
        """True when no pending request can fit any more in this pass."""
        pq = self._pending_q
        if not pq:
            return True
        if 0 in pq:
            return False
        smallest = min(pq)
        # every pending request asks for at least ``smallest`` quanta and some CPU/memory >= 0,
        # so once a request of that size without CPU/memory failed, all the rest fail too
        f = None if self._exact else self._failed.get((0, 0, ()))
        if f is not None and f <= smallest:
            return True
        if self._maxfree_dirty:
            self._maxfree = self.capacity.max_free(self._res)
            self._maxfree_dirty = False
        return self._maxfree < min(smallest, self.capacity.quanta_per_gpu)

    def _records_more(self) -> bool:
        """Once nothing fits, is walking on still needed (see ``_all_fail``)?"""
        if self.policy.head == "skip":
            return True  # the next request that has not used up its skips stops the pass
        return self.policy.head == "backfill" and self._reserved_count < self.policy.reservations

    def _try(self, req: Request) -> Placement | None:
        """Place and take ``req`` if it fits outside the reservations; None otherwise."""
        if self._all_fail:
            return None
        q, cpu, mem, pools = req.quanta, req.cpu_millis, req.memory_bytes, req.pools
        failed = self._failed
        if failed and self._dominated((q, cpu, mem, pools)):
            return None
        placement = self.capacity.place(req, self._res)
        if placement is None:
            key = (cpu, mem, pools, q) if self._exact else (cpu, mem, pools)
            if q < failed.get(key, q + 1):
                failed[key] = q
            return None
        self.capacity.take(placement)  # raises on a bug rather than over-allocating
        self._maxfree_dirty = True
        return placement

    def _blocked(self, req: Request, reserve: bool = True) -> str:
        """A request that fits nowhere: returns "stop", or "pass" (later requests may go)."""
        head = self.policy.head
        if head == "strict":
            return "stop"
        if head == "skip":
            if self._fail_round.get(req.seq) != self._round:  # one count per round
                self._fail_round[req.seq] = self._round
                self._fails[req.seq] = min(self._fails.get(req.seq, 0) + 1, self.policy.skip_after + 1)
            return "pass" if self._fails[req.seq] > self.policy.skip_after else "stop"
        if reserve and self._reserved_count < self.policy.reservations:
            self._reserved_count += 1
            # Reserving only removes resources for the rest of the pass, so earlier failures
            # stay failures and the failure cache remains valid.
            if self.capacity.reserve(req, self._res) is not None:
                self._maxfree_dirty = True
        return "pass"

    def _failed_here(self, req: Request) -> str:
        """``_blocked``, then notes when nothing more can fit: "stop", "pass" or "end"."""
        self._note_passed_over(req)
        if self._blocked(req) == "stop":
            return "stop"
        if not self._all_fail and self._exhausted():
            self._all_fail = True
        if self._all_fail and not self._records_more():
            return "end"
        return "pass"

    def _dominated(self, shape) -> bool:
        """True if a request of ``shape`` cannot fit: one no bigger in every way, allowed on every
        node this one is, failed (of the same size, under GPU backend limits)."""
        q, cpu, mem, pools = shape
        exact = self._exact
        for key, fq in self._failed.items():
            if (cpu >= key[0] and mem >= key[1] and (q == fq if exact else q >= fq)
                    and _within(pools, key[2])):
                return True
        return False

    def _pass_fifo(self):
        """FIFO pass.  Strict/backfill merge the per-shape lists in seq order and drop a shape
        (and every shape it dominates) as soon as one of its requests fails: the same requests
        are admitted as by walking the whole queue, in far fewer steps.  Skip walks the queue,
        since each failing request there may stop the pass."""
        self._pass_setup()
        out = []
        senior, stopped = self._senior_first(out)
        if not stopped:
            skip = senior.seq if senior is not None else None
            if self.policy.head == "skip":
                stopped = self._walk_fifo(out, skip)
            else:
                stopped = self._merge_fifo(out, skip)
        self._compact()
        # Nothing more can start until capacity is given back: a later submit only has to try
        # the new request against the same reservations (see _submit_settled), unless the
        # next pass would begin differently (a new senior to try first, or a pin to drop).
        if self._senior_stable():
            self._settled = (stopped, self._res, self._reserved_count)
        return out

    def _admit_pending(self, req, placement, out):
        out.append((req, placement))
        self._admit(req, placement)
        self._remove_pending(req, self._done)

    def _compact(self):
        done = self._done
        if not done:
            return
        if len(done) <= 16:  # a few: delete each (cheap memmove); many: filter once
            for seq in done:
                del self._order[bisect_left(self._order, seq)]
            for shape in list(self._by_shape):
                lst = self._by_shape[shape]
                for seq in done:
                    i = bisect_left(lst, seq)
                    if i < len(lst) and lst[i] == seq:
                        del lst[i]
                if not lst:
                    del self._by_shape[shape]
            done.clear()
            return
        self._order = [s for s in self._order if s not in done]
        for shape in list(self._by_shape):
            lst = self._by_shape[shape]
            kept = [s for s in lst if s not in done]
            if len(kept) != len(lst):
                if kept:
                    self._by_shape[shape] = kept
                else:
                    del self._by_shape[shape]
        done.clear()

    def _walk_fifo(self, out, skip_seq) -> bool:
        """Skip head: walk the queue in order; returns True if a request stopped the pass."""
        reqs = self._req_by_seq
        limited = self._has_limits
        for s in list(self._order):
            req = reqs.get(s)
            if req is None or s == skip_seq:  # admitted this pass, or the senior (tried first)
                continue
            if limited and self._limit_reason(req):
                continue
            placement = self._try(req)
            if placement is not None:
                self._admit_pending(req, placement, out)
                continue
            verdict = self._failed_here(req)
            if verdict != "pass":
                return verdict == "stop"
        return False

    def _merge_fifo(self, out, skip_seq) -> bool:
        """Strict and backfill heads; returns True if a request stopped the pass."""
        reqs = self._req_by_seq
        limited = self._has_limits
        by_shape = self._by_shape
        heap = [(lst[0], shape, 0) for shape, lst in by_shape.items()]
        heapq.heapify(heap)
        reservations = self.policy.reservations
        while heap:
            s, shape, i = heap[0]
            if self._failed and self._reserved_count >= reservations and self._dominated(shape):
                heapq.heappop(heap)
                continue
            req = reqs.get(s)
            if req is None or s == skip_seq or (limited and self._limit_reason(req)):
                i += 1  # admitted this pass, the senior (tried first), or held by its user's limits
            else:
                placement = self._try(req)
                if placement is not None:
                    self._admit_pending(req, placement, out)
                    i += 1
                else:
                    verdict = self._failed_here(req)
                    if verdict != "pass":
                        return verdict == "stop"
                    if self._reserved_count >= reservations:
                        heapq.heappop(heap)  # the rest of this shape fails too (now dominated)
                        continue
                    i += 1
            lst = by_shape[shape]
            if i < len(lst):
                heapq.heapreplace(heap, (lst[i], shape, i))
            else:
                heapq.heappop(heap)
        return False

    def _submit_settled(self, req: Request) -> Placement | None:
        """Admit ``req`` if a full pass would, given that the queue before it is settled.

        The previous full pass left every earlier request unable to start, and capacity has only
        shrunk since (outside the reservations, which a full pass would therefore choose again),
        so they still cannot start; only the new (last in FIFO order) request can.
        """
        stopped, res, nres = self._settled
        if stopped or (self._has_limits and self._limit_reason(req)):
            return None
        placement = self.capacity.place(req, res)
        if placement is not None:
            self.capacity.take(placement)
            self._admit(req, placement)
            self._remove_pending(req)
            g = self._group(req)
            if self._has_limits and (self._user(req.key.user).pending or (g is not None and g.pending)):
                # The user's (or group's) other waiting requests may now be held by a limit: a
                # full pass would then skip them (no reservation, no senior) where the last one
                # did not.
                self._settled = None
            return placement
        head = self.policy.head
        if head == "strict":
            stopped = True
        elif head == "skip":
            stopped = self._blocked(req) == "stop"
        elif nres < self.policy.reservations:
            nres += 1
            self.capacity.reserve(req, res)
        self._settled = (stopped, res, nres)
        return None

    def _pass_drf(self):
        self._pass_setup()
        out = []
        senior, stopped = self._senior_first(out)
        if stopped:
            return out
        per_user: dict[str, list[Request]] = {}
        for s in self._order:
            r = self._req_by_seq.get(s)
            if r is not None and r is not senior:
                per_user.setdefault(r.key.user, []).append(r)
        heap = [
            (self._dominant(self._usage.get(user)), reqs[0].seq, user, 0)
            for user, reqs in per_user.items()
        ]
        heapq.heapify(heap)
        while heap:
            _, _, user, i = heapq.heappop(heap)
            req = per_user[user][i]
            if self._limit_reason(req):
                if self.limits.max_running and self._user(user).running >= self.limits.max_running:
                    continue  # none of this user's requests can start this pass
            else:
                placement = self._try(req)
                if placement is not None:
                    self._admit_pending(req, placement, out)
                elif self._failed_here(req) != "pass":
                    break
            if i + 1 < len(per_user[user]):
                nxt = per_user[user][i + 1]
                heapq.heappush(heap, (self._dominant(self._usage.get(user)), nxt.seq, user, i + 1))
        return out

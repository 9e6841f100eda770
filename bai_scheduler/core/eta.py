"""When a waiting request will start: an upper bound where one can be proven, else an estimate.
Pure: no I/O.

Basis of an ``Eta``, best first:

``lifetime``: "at the latest 14:20, when sessions reach their lifetime".  Stated only when it
  follows from the queue's rules (``core.queue``, its starvation guard) and the lifetimes every
  session is stopped at (``deadlines``; ``max_lifetime``, the longest any new session may run):

  * The *oldest* waiting request R, when no user limit or group quota can hold it back (so it is
    the queue's senior until it starts):
      - pinned (the guard keeps a place free for it): nothing else may use that place and it
        only frees up, so R starts once the sessions there now have ended: by their latest
        deadline (with the node's sessions when R needs CPU or memory the node limits);
      - not pinned: take any place X that could host R (a device; the node when R spans
        devices or needs CPU or memory the node limits), and T_X the latest deadline there.  At
        the pass when the last of X's sessions leaves (by T_X), either R takes X (FIFO tries
        the oldest request first, and nothing is reserved ahead of it), or X holds only
        sessions younger than R, so R is due and is pinned on a place whose sessions all
        started by then, which end within ``max_lifetime``: R starts by
        min_X T_X + c·max_lifetime (c = 1 for FIFO; 2 for DRF, whose order may give X to
        someone else once more before R is due).
  * The k-th oldest (k > 1), when no limit or quota exists at all (so seniority passes in
    arrival order): it is the oldest by the (k-1)-th's bound B, and then every place's sessions
    end within ``max_lifetime``, so it starts by B + (1 + c)·max_lifetime.

  The bound assumes sessions are stopped at their deadlines, GPU nodes stay ready and the
  service is not restarted meanwhile (a restart renumbers the queue's ages).

``departures``: "about 12 min, from recent departures": the fGPU (or, for CPU-only requests,
  the sessions) ahead of the request and its own, less what is free now, at the rate recent
  sessions gave capacity back.  Never later than a stated bound.

``unknown``: neither applies (nothing departed recently, some session has no lifetime).
"""
from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterable

from .model import Request, RequestKey
from .queue import AdmissionQueue


@dataclass(frozen=True)
class Eta:
    basis: str  # "lifetime" | "departures" | "unknown"
    latest: float | None = None  # start at or before this time (basis "lifetime")
    expected: float | None = None  # the estimate (never after ``latest``)

    @property
    def point(self) -> float | None:
        """The single time to show or score: the estimate, else the bound."""
        return self.expected if self.expected is not None else self.latest

    def text(self, now: float, clock: Callable[[float], str] | None = None) -> str:
        """E.g. "about 12 min, from recent departures (at the latest 14:20, when sessions reach
        their lifetime)"."""
        parts = []
        if self.expected is not None:
            parts.append(f"about {_span(self.expected - now)}, from recent departures")
        if self.latest is not None:
            when = clock(self.latest) if clock else time.strftime("%H:%M", time.localtime(self.latest))
            bound = f"at the latest {when}, when sessions reach their lifetime"
            parts.append(f"({bound})" if parts else bound)
        return " ".join(parts) or "unknown"

    def to_json(self, now: float, clock: Callable[[float], str] | None = None) -> dict:
        return {"basis": self.basis, "latest": self.latest, "expected": self.expected,
                "text": self.text(now, clock)}


def _span(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes / 60
    return f"{hours:.0f} h" if hours >= 10 else f"{hours:.1f} h"


UNKNOWN = Eta("unknown")


class QueueEta:
    """ETAs of the waiting requests of ``queue`` at ``now`` (one snapshot; build a new one after
    any change).

    ``deadlines``: for each admitted key, when its session is stopped at the latest (None: no
    lifetime).  ``max_lifetime``: the longest a session admitted from now on may run (None: some
    may run for ever).  ``departures``: (time, quanta) of sessions that ended recently, oldest
    first (the caller keeps a window).
    """

    def __init__(self, queue: AdmissionQueue, deadlines: dict[RequestKey, float | None],
                 max_lifetime: float | None, departures: Iterable[tuple[float, int]], now: float):
        self.queue = queue
        self.deadlines = deadlines
        self.max_lifetime = max_lifetime
        self.now = now
        # The departures the estimate counts, once per snapshot rather than per request.
        departed = [d for d in departures if d[0] <= now]
        self._span = now - departed[0][0] if departed else 0.0  # <= 0: no estimate
        self._departed = len(departed)
        self._freed = sum(q for _, q in departed)
        self.c = 2 if queue.policy.order == "drf" else 1
        self._seqs: list[int] | None = None
        self._first_bound: float | None | bool = False  # False: not computed yet
        self._ahead: dict[int, tuple[int, int]] | None = None  # by seq: (quanta, count) up to it
        self._by_device: dict[int, float | None] | None = None
        self._by_node: dict[int, float | None] = {}

    # -- the bound ------------------------------------------------------------------
    def latest(self, req: Request) -> float | None:
        """The proven upper bound on ``req``'s start (see the module docstring), or None."""
        q = self.queue
        if self._seqs is None:
            self._seqs = q.pending_seqs()
        k = bisect_left(self._seqs, req.seq)
        if k == 0:
            if q.may_be_held(req):
                return None
            return self._oldest_bound(req)
        if q.has_limits or self.max_lifetime is None:
            return None
        if self._first_bound is False:
            oldest = q.request_by_seq(self._seqs[0])
            self._first_bound = None if q.may_be_held(oldest) else self._oldest_bound(oldest)
        if self._first_bound is None:
            return None
        return self._first_bound + k * (1 + self.c) * self.max_lifetime

    def _oldest_bound(self, req: Request) -> float | None:
        q = self.queue
        cap = q.capacity
        pin = q.pin
        if pin is not None and pin[0] == req.key:
            res = pin[1]
            ni = cap.node_index(res.node)
            if req.quanta and cap.gpu_off(ni):
                return None
            devices = {cap.device_index(u) for u in res.devices}
            whole_node = bool((res.cpu_millis and cap.nodes[ni].cpu_millis)
                              or (res.memory_bytes and cap.nodes[ni].memory_bytes))
            return self._ends(ni, devices, whole_node)
        if self.max_lifetime is None:
            return None
        best = None
        Q = cap.quanta_per_gpu
        for ni, node in enumerate(cap.nodes):
            if not cap.hosts(ni, req) or (req.quanta and cap.gpu_off(ni)):
                continue
            whole_node = req.quanta > Q or bool((req.cpu_millis and node.cpu_millis)
                                                 or (req.memory_bytes and node.memory_bytes))
            if whole_node or req.quanta == 0:
                places = [None]
            else:
                places = [di for di in cap.node_devices(ni)
                          if cap.device_capacity(di) >= req.quanta and not cap.refuses(di, req.quanta)]
            for di in places:
                t = self._ends(ni, {di} if di is not None else set(), whole_node)
                if t is not None and (best is None or t < best):
                    best = t
        return None if best is None else best + self.c * self.max_lifetime

    def _ends(self, ni: int, devices: set[int], whole_node: bool) -> float | None:
        """When every session now on ``devices`` of node ``ni`` (all of the node's with
        ``whole_node``) has reached its deadline; None if one has none."""
        if self._by_device is None:
            self._index_deadlines()
        end = self.now
        for t in ([self._by_node.get(ni, self.now)] if whole_node
                  else [self._by_device.get(di, self.now) for di in devices]):
            if t is None:
                return None
            end = max(end, t)
        return end

    def _index_deadlines(self):
        """The latest deadline on each device and node (None where a session has none)."""
        cap = self.queue.capacity
        self._by_device, self._by_node = {}, {}

        def later(index: dict, i: int, t: float | None):
            if i in index and index[i] is None:
                return
            index[i] = None if t is None else max(index.get(i, t), t)

        for key, (_, placement) in self.queue.admitted().items():
            t = self.deadlines.get(key)
            later(self._by_node, cap.node_index(placement.node), t)
            for share in placement.shares:
                later(self._by_device, cap.device_index(share.device_uuid), t)

    # -- the estimate ---------------------------------------------------------------
    def expected(self, req: Request) -> float | None:
        """When ``req`` may start at the rate recent sessions ended, or None without departures."""
        span = self._span
        if span <= 0:
            return None
        if self._ahead is None:
            self._ahead, quanta, count = {}, 0, 0
            for r in self.queue.pending():
                quanta += r.quanta
                count += 1
                self._ahead[r.seq] = (quanta, count)
        quanta, count = self._ahead[req.seq]
        freed = self._freed
        if req.quanta and freed:
            need = max(quanta - self.queue.capacity.free_quanta, req.quanta)
            return self.now + need * span / freed
        return self.now + count * span / self._departed

    def eta(self, req: Request) -> Eta:
        latest = self.latest(req)
        expected = self.expected(req)
        if latest is not None:
            return Eta("lifetime", latest, None if expected is None else min(expected, latest))
        if expected is not None:
            return Eta("departures", None, expected)
        return UNKNOWN

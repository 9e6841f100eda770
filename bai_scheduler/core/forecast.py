"""The session form's live note: what is free, and whether a shape would start now.  Pure: no I/O.

The count comes from the real placement (``Capacity.place`` and ``take``) on a
copy of the live capacity, so the note and the scheduler use one set of rules
(best fit, spans above one GPU).  It is a rough, optimistic picture all the
same: the queue, CPU and memory are left out; the scheduler decides.
"""
from __future__ import annotations

from typing import Iterable

from .model import DEFAULT_POOL, Node, Placement, Request, RequestKey
from .placement import Capacity, Reservation, Reservations
from .queue import QueuePolicy
from .units import FgpuUnits

_TRIAL = RequestKey("", "")


def trial_capacity(nodes: Iterable[Node], units: FgpuUnits, held: Iterable[Placement], *,
                   span: str = "whole-then-fraction", strategy: str = "concentrate") -> Capacity:
    """A fresh ``Capacity`` of ``nodes`` with the GPU shares of ``held`` taken (CPU and memory left out;
    an over-commit the engines run is counted too)."""
    capacity = Capacity(list(nodes), units.quanta_per_gpu, span=span, strategy=strategy, units=units)
    for p in held:
        capacity.take(Placement(p.node, p.shares), force=True)
    return capacity


def kept_for_queue(capacity: Capacity, pending: Iterable[Request], pin: tuple[RequestKey, Reservation] | None,
                   policy: QueuePolicy) -> Reservations:
    """What the queue keeps from a newcomer now: the senior's pinned reservation, and under the
    'backfill' head a reservation for each of the first ``policy.reservations`` other waiting
    requests, as a pass makes them (``Capacity.reserve``). Requests that their own user's limits
    hold back get one too, so the note errs on the side of waiting."""
    kept = Reservations()
    if pin is not None:
        capacity.hold(pin[1], kept)
    if policy.head == "backfill":
        others = (r for r in pending if pin is None or r.key != pin[0])
        for req, _ in zip(others, range(policy.reservations)):
            capacity.reserve(req, kept)
    return kept


def sessions_that_fit(capacity: Capacity, quanta: int, count: int, kept: Reservations | None = None,
                      pools: tuple[str, ...] = ()) -> int:
    """How many of ``count`` sessions of ``quanta`` each ``capacity`` takes now, one after the other,
    outside ``kept`` (``kept_for_queue``), on the nodes of ``pools`` (a request's ``pools``:
    ``quotas.resolve``; () = any node).

    ``capacity`` is changed: pass a trial copy."""
    for n in range(max(0, count)):
        placement = capacity.place(Request(_TRIAL, quanta, pools=pools), kept)
        if placement is None:
            return n
        capacity.take(placement)
    return max(0, count)


def never_fits(capacity: Capacity, quanta: int, pools: tuple[str, ...] = ()) -> str | None:
    """Why a session of ``quanta`` can never start on these nodes (of ``pools``; even empty), or None."""
    return capacity.can_ever_fit(Request(_TRIAL, quanta, pools=pools))


def capacity_note(usage: list[dict], units: FgpuUnits, quanta: int, count: int, fit: int,
                  queue_length: int, never: str | None = None, kept: bool = False,
                  pools: tuple[str, ...] = ()) -> tuple[str, str]:
    """(level, text) of the note: what is free and whether ``count`` × ``quanta`` would start or queue.

    ``usage``: ``Capacity.usage()``; ``fit``: ``sessions_that_fit`` of this shape outside what the
    queue keeps; ``never``: ``never_fits`` of it; ``kept``: whether the queue keeps anything
    (``kept_for_queue``); ``pools``: the pools the session may go to (() = any node), the only
    nodes whose free fGPU the note counts. ``level`` is a Bootstrap contextual class: "success",
    "warning" or "secondary".
    """
    devices = [d for n in usage if not pools or n.get("pool", DEFAULT_POOL) in pools for d in n.get("devices", [])]
    total = sum(d["capacity_quanta"] for d in devices)
    free = total - sum(d["used_quanta"] for d in devices)
    largest = max((d["capacity_quanta"] - d["used_quanta"] for d in devices), default=0)
    where = f"pool{'s' if len(pools) > 1 else ''} {', '.join(pools)}" if pools else ""
    free_text = (f"Free now{' in ' + where if where else ''}: {units.to_fgpu(free)} of {units.to_fgpu(total)} fGPU"
                 + (f" (largest piece on one GPU: {units.to_fgpu(largest)})" if len(devices) > 1 else "")
                 + ".")
    waiting = (f" {queue_length} request{'s' if queue_length != 1 else ''} already waiting." if queue_length
               else " Nobody is waiting.")
    if quanta and total and quanta > total:
        return "warning", f"{free_text}{waiting} {units.to_fgpu(quanta)} fGPU is more than {where or 'this hub'} has."
    if never:
        return "warning", f"{free_text}{waiting} This session {never}: it cannot start here."
    what = "session" if count == 1 else "sessions"
    if fit >= count:
        verdict = f"This {what} would start at once." if count == 1 else f"All {count} {what} would start at once."
        level = "success"
        if queue_length:
            verdict = verdict[:-1] + ", unless the queue policy makes it wait behind them."
            level = "secondary"
    elif fit == 0:
        verdict = ((f"This {what} would wait in the queue" if count == 1
                    else f"These {count} {what} would wait in the queue")
                   + (" behind them: what is free is kept for the requests ahead" if kept
                      else " until enough fGPU is free")
                   + "; it starts by itself.")
        level = "warning"
    else:
        verdict = (f"{fit} of {count} would start at once; {count - fit} would wait in the queue"
                   + (" (what is free is kept for the requests ahead)" if kept else "")
                   + " and start by themselves.")
        level = "warning"
    return level, f"{free_text}{waiting} {verdict}"

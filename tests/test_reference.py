"""The indexed scheduler (core.queue.AdmissionQueue on core.placement.Capacity) against the slow
reference (core.reference.ReferenceQueue): the same answer from every call on thousands of random
traces, with every queue order, head rule, span, strategy and GPU backend, nodes' GPUs going out of
and back into service.  Submits in the reference always run a
full pass, so this also checks that the indexed submit fast path equals a full pass."""
from __future__ import annotations

import os
from decimal import Decimal

from hypothesis import HealthCheck, event, given, settings, strategies as st

from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.model import Request, RequestKey
from bai_scheduler.core.placement import Capacity
from bai_scheduler.core.queue import AdmissionQueue, QueuePolicy, UserLimits
from bai_scheduler.core.reference import ReferenceQueue
from bai_scheduler.core.units import FgpuUnits

U = FgpuUnits(fgpu_per_gpu=2, fgpu_step=Decimal("0.5"))
Q = U.quanta_per_gpu  # 4
EXAMPLES = int(os.environ.get("BAI_REFERENCE_EXAMPLES", "3000"))

POLICIES = [
    QueuePolicy(order=o, head=h, skip_after=k, reservations=r)
    for o in ("fifo", "drf") for h in ("strict", "skip", "backfill") for k in (0, 1, 3) for r in (0, 1, 2)
    if not (h != "skip" and k) and not (h != "backfill" and r != 1)
]
LIMITS = [UserLimits(), UserLimits(max_running=2, max_pending=4), UserLimits(max_quanta=Q),
          UserLimits(max_cpu_millis=2000)]

ops = st.lists(
    st.tuples(
        st.sampled_from(["submit"] * 5 + ["release"] * 3 + ["cancel", "schedule", "gpu"]),
        st.integers(0, 4),  # user
        st.sampled_from([0, 1, 1, 2, 3, 4, 4, 5, 7, 8, 9, 12]),  # quanta: fractions, whole, multi-GPU
        st.sampled_from([0, 0, 500, 1500]),  # cpu millis
        st.integers(0, 10_000),  # which key to release / cancel
    ),
    min_size=10,
    max_size=80,
)


def build(layout, cpu, policy, limits, span, strategy, backends=("hami",)):
    nodes = simulated_nodes(
        [{"name": f"n{i}", "gpus": g, "gpu_memory": "8GiB", "cpu": cpu, "gpu_backend": backends[i % len(backends)]}
         for i, g in enumerate(layout)], U)
    indexed = AdmissionQueue(Capacity(nodes, Q, span=span, strategy=strategy, units=U), policy, limits)
    reference = ReferenceQueue(nodes, Q, policy, limits, span=span, strategy=strategy)
    return indexed, reference


def pairs(admitted):
    return [(r.key, r.seq, p) for r, p in admitted]


def pin_of(indexed, reference):
    a = indexed.pin
    b = reference.pin
    a = None if a is None else (a[0], a[1].node, set(a[1].devices))
    if b is not None:
        ni, devs, _, _ = b[1]
        b = (b[0], reference.nodes[ni].name, {reference.devs[d].uuid for d in devs})
    return a, b


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    policy=st.sampled_from(POLICIES),
    layout=st.lists(st.sampled_from([0, 1, 2, 2, 3]), min_size=1, max_size=3),
    cpu=st.sampled_from([0, 3]),
    limits=st.sampled_from(LIMITS),
    span=st.sampled_from(["whole-then-fraction", "whole-only"]),
    strategy=st.sampled_from(["concentrate", "spread"]),
    backends=st.sampled_from([("hami",), ("hami",), ("mps", "hami"), ("whole",), ("mig", "hami")]),
    steps=ops,
)
def test_indexed_scheduler_equals_reference(policy, layout, cpu, limits, span, strategy, backends, steps):
    indexed, reference = build(layout, cpu, policy, limits, span, strategy, backends)
    live: list[RequestKey] = []
    n = 0
    for op, user, q, c, pick in steps:
        if op == "submit":
            n += 1
            req = Request(RequestKey(f"u{user}", f"s{n}"), q, cpu_millis=c)
            d = indexed.submit(req)
            state, placement, others = reference.submit(req)
            assert (d.state, d.placement) == (state, placement), (op, req)
            assert pairs(d.also_admitted) == pairs(others)
            if d.state != "REFUSED":
                live.append(req.key)
        elif op in ("release", "cancel") and live:
            running = [k for k in live if k in indexed.admitted()]
            waiting = [k for k in live if k not in running]
            pool = running if op == "release" and running else waiting or running
            key = pool[pick % len(pool)]
            live.remove(key)
            assert pairs(indexed.release(key)) == pairs(reference.release(key)), (op, key)
        elif op == "gpu":  # a node's GPUs go out of service, or come back
            node = f"n{user % len(layout)}"
            ready = pick % 2 == 0
            indexed.set_gpu_ready(node, ready)
            reference.set_gpu_ready(node, ready)
            if ready:
                assert pairs(indexed.schedule()) == pairs(reference.schedule())
        else:
            assert pairs(indexed.schedule()) == pairs(reference.schedule())
        assert sorted(r.seq for r in indexed.pending()) == [r.seq for r in reference.pending]
        assert {k: p for k, (_, p) in indexed.admitted().items()} == {
            k: p for k, (_, p, _) in reference.running.items()}
        a, b = pin_of(indexed, reference)
        assert a == b
        if a is not None:
            event("a senior was pinned")
        if indexed.pending() and indexed.admitted():
            event("queue and sessions at once")


@settings(max_examples=int(os.environ.get("BAI_FASTPATH_EXAMPLES", "800")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(
    policy=st.sampled_from([p for p in POLICIES if p.order == "fifo"]),
    layout=st.lists(st.sampled_from([0, 1, 2, 2, 3]), min_size=1, max_size=3),
    cpu=st.sampled_from([0, 3]),
    limits=st.sampled_from(LIMITS),
    steps=ops,
)
def test_submit_fast_path_equals_a_full_pass(policy, layout, cpu, limits, steps):
    """Finding 5: the FIFO submit fast path (_submit_settled) must answer exactly what a full
    pass over the whole queue answers.  Two indexed schedulers get the same calls; one is made
    to run a full pass before every submit."""
    fast, _ = build(layout, cpu, policy, limits, "whole-then-fraction", "concentrate")
    full, _ = build(layout, cpu, policy, limits, "whole-then-fraction", "concentrate")
    live: list[RequestKey] = []
    n = 0
    for op, user, q, c, pick in steps:
        if op == "submit":
            n += 1
            req = Request(RequestKey(f"u{user}", f"s{n}"), q, cpu_millis=c)
            full._settled = None
            a, b = fast.submit(req), full.submit(req)
            assert (a.state, a.placement, pairs(a.also_admitted)) == (b.state, b.placement, pairs(b.also_admitted))
            if a.state != "REFUSED":
                live.append(req.key)
        elif op in ("release", "cancel") and live:
            key = live.pop(pick % len(live))
            assert pairs(fast.release(key)) == pairs(full.release(key))
        else:
            assert pairs(fast.schedule()) == pairs(full.schedule())

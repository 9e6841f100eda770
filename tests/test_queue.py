"""AdmissionQueue: queue order, head rules, DRF, limits, restore, and property tests."""
import os
import sys
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.model import Placement, Request, RequestKey, Share
from bai_scheduler.core.placement import Capacity
from bai_scheduler.core.queue import AdmissionQueue, Decision, DuplicateRequest, QueuePolicy, UserLimits, ordinal
from bai_scheduler.core.units import FgpuUnits

U = FgpuUnits(fgpu_per_gpu=2, fgpu_step=Decimal("0.5"))  # 4 quanta per GPU
Q = U.quanta_per_gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(gpus=(1,), policy=None, limits=None, cpu=0, **kw):
    nodes = simulated_nodes(
        [{"name": f"n{i}", "gpus": g, "gpu_memory": "8GiB", "cpu": cpu} for i, g in enumerate(gpus)], U
    )
    return AdmissionQueue(Capacity(nodes, Q, units=U, **kw), policy or QueuePolicy(), limits)


def K(user, server=""):
    return RequestKey(user, server)


def R(user, fgpu, server="", cpu=0):
    return Request(K(user, server), U.to_quanta(fgpu), cpu_millis=cpu)


def test_seed_scenario():
    """1 node, 1 GPU, fgpu_per_gpu=2, step 0.5: three 1-fGPU requests, release one."""
    for head in ("strict", "skip", "backfill"):
        s = make(policy=QueuePolicy(head=head))
        d = [s.submit(R(u, "1")) for u in ("a", "b", "c")]
        assert [x.state for x in d] == ["RUNNING", "RUNNING", "PENDING"]
        assert d[2].position == 1 and d[2].reason == "Waiting for 1 fGPU: 1st in queue"
        assert d[0].placement.shares == (Share("GPU-sim-n0-0", 2),)
        newly = s.release(K("a"))
        assert [(r.key, p.quanta) for r, p in newly] == [(K("c"), 2)]
        assert set(s.admitted()) == {K("b"), K("c")} and s.pending() == []
        assert s.get(K("c")).state == "RUNNING"


def test_seq_is_assigned_and_monotonic():
    s = make(gpus=(0,))
    d1 = s.submit(Request(K("a"), 0, seq=99))
    d2 = s.submit(Request(K("b"), 0))
    assert d1.request.seq < d2.request.seq


def test_fifo_order_and_positions():
    s = make()
    s.submit(R("x", "2"))  # fills the GPU
    for u in "abc":
        s.submit(R(u, "0.5"))
    assert [r.key.user for r in s.pending()] == ["a", "b", "c"]
    assert [s.position(K(u)) for u in "abc"] == [1, 2, 3]
    assert s.wait_reason(K("b")) == "Waiting for 0.5 fGPU: 2nd in queue"
    assert s.position(K("x")) is None and s.wait_reason(K("x")) is None
    assert [r.key.user for r, _ in s.release(K("x"))] == ["a", "b", "c"]


def test_strict_head_blocks_smaller_requests():
    s = make(gpus=(2,), policy=QueuePolicy(head="strict"))
    s.submit(R("x", "1.5"))  # 3 of 4 quanta on one device
    s.submit(R("y", "1.5"))  # the other device
    assert s.submit(R("big", "2")).state == "PENDING"  # needs a whole GPU
    d = s.submit(R("small", "0.5"))
    assert d.state == "PENDING" and d.position == 2  # fits, but may not pass the head
    assert s.schedule() == []


def test_skip_lets_others_pass_after_n_rounds():
    """A round is the head's first try, then each release while it still does not fit; passes
    run only because someone else submitted do not count (they change nothing for the head)."""
    s = make(gpus=(2,), policy=QueuePolicy(head="skip", skip_after=2))
    s.submit(R("x", "1.5"))  # dev0: 3 of 4 quanta
    s.submit(R("y", "1.5"))  # dev1: 3 of 4
    s.submit(R("z", "0.5"))  # dev0 full
    s.submit(R("w", "0.5"))  # dev1 full
    assert s.submit(R("big", "2")).state == "PENDING"  # round 1
    assert s.submit(R("small", "0.5")).state == "PENDING"
    assert s.schedule() == [] and s.schedule() == []  # no capacity came back: still round 1
    assert s.release(K("z")) == []  # round 2: the head still blocks
    admitted = s.release(K("w"))  # round 3 > skip_after: later requests may pass it
    assert [r.key.user for r, _ in admitted] == ["small"]
    assert [r.key.user for r in s.pending()] == ["big"]


def test_backfill_never_uses_what_the_head_waits_for():
    s = make(gpus=(2,), policy=QueuePolicy(head="backfill"))
    s.submit(R("x", "1.5"))  # dev0: 3 used, 1 free
    s.submit(R("y", "1"))  # dev1: 2 used, 2 free (the head's reservation: closest to a whole GPU)
    assert s.submit(R("big", "2")).state == "PENDING"
    d = s.submit(R("small", "0.5"))  # fits on dev0, outside the reservation
    assert d.state == "RUNNING" and d.placement.shares[0].device_uuid == "GPU-sim-n0-0"
    # 0.5 more would fit only on dev1, which is reserved for the head
    assert s.submit(R("small2", "0.5")).state == "PENDING"
    assert s.capacity.device_used("GPU-sim-n0-1") == 2
    newly = s.release(K("y"))  # dev1 empties: the head goes first, then backfill continues
    assert [r.key.user for r, _ in newly] == ["big"]
    assert newly[0][1].shares == (Share("GPU-sim-n0-1", 4),)


def test_backfill_for_multi_gpu_head():
    s = make(gpus=(2, 2), policy=QueuePolicy(head="backfill"))
    s.submit(R("a", "0.5"))  # n0 dev?  best-fit keeps the rest whole
    s.submit(R("b", "0.5"))
    s.submit(R("c", "2"))
    s.submit(R("d", "2"))
    # all four devices in use now; a 2-GPU request must wait for a whole node
    assert s.submit(R("big", "4")).state == "PENDING"
    res_node_busy = {p.node for _, p in s.admitted().values()}
    assert res_node_busy == {"n0", "n1"}
    d = s.submit(R("tiny", "0.5"))
    if d.state == "RUNNING":  # only outside the devices held for the head
        held_for_head = s._settled[1].devices
        di = s.capacity._dev_idx[d.placement.shares[0].device_uuid]
        assert di not in held_for_head


def test_drf_orders_by_dominant_share():
    s = make(gpus=(2,), policy=QueuePolicy(order="drf", head="strict"))
    s.submit(R("heavy", "2", server="1"))
    s.submit(R("heavy", "2", server="2"))  # heavy holds all 4 fGPU
    s.submit(R("heavy", "0.5", server="3"))  # pending
    s.submit(R("light", "0.5"))  # pending, but light holds nothing: goes first
    assert [r.key.user for r in s.pending()] == ["light", "heavy"]
    assert s.position(K("light")) == 1
    newly = s.release(K("heavy", "2"))  # 2 fGPU free: both fit, light is first
    assert [r.key.user for r, _ in newly] == ["light", "heavy"]


def test_drf_interleaves_users():
    s = make(gpus=(0,), policy=QueuePolicy(order="drf"), cpu=4)
    s.submit(Request(K("a", "0"), 0, cpu_millis=4000))  # a holds the whole node
    for i in range(1, 4):
        s.submit(Request(K("a", str(i)), 0, cpu_millis=1000))
    for i in range(3):
        s.submit(Request(K("b", str(i)), 0, cpu_millis=1000))
    assert [r.key.user for r in s.pending()] == ["b", "b", "b", "a", "a", "a"]
    newly = s.release(K("a", "0"))
    # equal shares (none held): earlier submission first, then users alternate
    assert [r.key for r, _ in newly] == [K("a", "1"), K("b", "0"), K("a", "2"), K("b", "1")]


def test_refuse_never_fits():
    s = make()
    d = s.submit(R("a", "2.5"))
    assert d.state == "REFUSED" and "largest node has 2 fGPU" in d.reason
    s2 = make(cpu=1)
    assert s2.submit(R("a", "1", cpu=2000)).state == "REFUSED"
    assert s.pending() == [] and s.get(K("a")) is None


def test_duplicate_raises():
    s = make()
    s.submit(R("a", "2"))
    with pytest.raises(DuplicateRequest):
        s.submit(R("a", "0.5"))
    s.submit(R("b", "1"))
    with pytest.raises(DuplicateRequest):
        s.submit(R("b", "1"))
    assert s.submit(R("a", "0.5", server="other")).state == "PENDING"  # another server is fine


def test_limits_running_and_pending():
    s = make(gpus=(4,), limits=UserLimits(max_running=2, max_pending=1))
    assert [s.submit(R("a", "0.5", server=str(i))).state for i in range(2)] == ["RUNNING", "RUNNING"]
    d = s.submit(R("a", "0.5", server="2"))
    assert d.state == "PENDING" and d.reason == "Waiting: user limit of 2 running sessions"
    d = s.submit(R("a", "0.5", server="3"))
    assert d.state == "REFUSED" and "1 waiting session" in d.reason
    assert s.submit(R("b", "0.5")).state == "RUNNING"  # other users are not held up
    newly = s.release(K("a", "0"))
    assert [r.key for r, _ in newly] == [K("a", "2")]


def test_limits_quanta():
    s = make(gpus=(2,), limits=UserLimits(max_quanta=U.to_quanta("1")))
    assert "per-user limit is 1 fGPU" in s.submit(R("a", "1.5")).reason
    assert s.submit(R("a", "1", server="1")).state == "RUNNING"
    d = s.submit(R("a", "0.5", server="2"))
    assert d.state == "PENDING" and d.reason == "Waiting: user limit of 1 fGPU in use"
    assert s.submit(R("b", "1")).state == "RUNNING"


def test_release_unknown_and_pending():
    s = make()
    assert s.release(K("ghost")) == []
    s.submit(R("a", "2"))
    s.submit(R("b", "1"))
    assert s.release(K("b")) == []
    assert s.pending() == [] and s.get(K("b")) is None


def test_release_of_strict_head_unblocks():
    s = make(gpus=(1,), policy=QueuePolicy(head="strict"))
    s.submit(R("x", "1.5"))
    s.submit(R("big", "1"))
    s.submit(R("small", "0.5"))
    assert [r.key.user for r, _ in s.release(K("big"))] == ["small"]


def test_restore():
    s = make(gpus=(1,))
    p = Placement("n0", (Share("GPU-sim-n0-0", 3),))
    s.restore_admitted(Request(K("a"), 3, seq=5), p)
    s.restore_pending(Request(K("c"), 2, seq=9))
    s.restore_pending(Request(K("b"), 2, seq=7))
    assert [r.key.user for r in s.pending()] == ["b", "c"]
    assert s.capacity.used_quanta == 3
    with pytest.raises(DuplicateRequest):
        s.restore_pending(Request(K("a"), 1, seq=11))
    with pytest.raises(ValueError):
        s.restore_admitted(Request(K("z"), 2), Placement("n0", (Share("GPU-sim-n0-0", 2),)))
    assert s.schedule() == []
    d = s.submit(R("d", "0.5"))
    assert d.request.seq > 9
    assert [r.key.user for r, _ in s.release(K("a"))] == ["b", "c"]


def test_ordinal():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]


def test_policy_validation():
    with pytest.raises(ValueError):
        QueuePolicy(order="lifo")
    with pytest.raises(ValueError):
        QueuePolicy(head="random")


def test_cpu_only_wait_reason():
    s = make(gpus=(0,), cpu=1)
    s.submit(Request(K("a"), 0, cpu_millis=1000))
    d = s.submit(Request(K("b"), 0, cpu_millis=1000))
    assert d.reason == "Waiting for CPU/memory: 1st in queue"


# ---------------------------------------------------------------- properties
POLICIES = [
    QueuePolicy(order=o, head=h, skip_after=k, reservations=r)
    for o in ("fifo", "drf") for h in ("strict", "skip", "backfill") for k in (0, 2) for r in (1, 2)
    if not (h != "skip" and k) and not (h != "backfill" and r != 1)
]

actions = st.lists(
    st.tuples(
        st.sampled_from(["submit", "submit", "submit", "release", "schedule"]),
        st.integers(min_value=0, max_value=5),  # user
        st.integers(min_value=0, max_value=2 * Q + 2),  # quanta
        st.sampled_from([0, 0, 500, 1500]),  # cpu
        st.integers(min_value=0, max_value=1000),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    layout=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=3),
    cpu=st.sampled_from([0, 2]),
    limits=st.sampled_from([None, UserLimits(max_running=2, max_pending=3), UserLimits(max_quanta=Q)]),
    steps=actions,
)
def test_never_lost_never_twice(policy, layout, cpu, limits, steps):
    s = make(gpus=tuple(layout), policy=policy, limits=limits, cpu=cpu)
    live: set = set()  # keys submitted and not released
    admitted_ever: dict = {}
    n = 0

    def record(pairs):
        for r, p in pairs:
            assert r.key not in admitted_ever, "admitted twice"
            admitted_ever[r.key] = p
            assert p.quanta == r.quanta and p.cpu_millis == r.cpu_millis
            if r.quanta <= Q:
                assert len(p.shares) <= 1

    for op, user, q, c, pick in steps:
        if op == "submit":
            n += 1
            d = s.submit(Request(K(f"u{user}", str(n)), q, cpu_millis=c))
            assert isinstance(d, Decision)
            if d.state == "RUNNING":
                record([(d.request, d.placement)])
            record(d.also_admitted)
            if d.state != "REFUSED":
                live.add(d.request.key)
            else:
                assert d.reason
        elif op == "release" and live:
            key = sorted(live, key=str)[pick % len(live)]
            live.discard(key)
            record(s.release(key))
            admitted_ever.pop(key, None)
        else:
            record(s.schedule())
        pend = {r.key for r in s.pending()}
        adm = s.admitted()
        assert pend.isdisjoint(adm)
        assert pend | set(adm) == live  # nothing lost
        assert set(adm) == set(admitted_ever)
        assert s.capacity.used_quanta == sum(p.quanta for _, p in adm.values())
        assert [s.position(k) for k in (r.key for r in s.pending())] == list(range(1, len(pend) + 1))
        for k in pend:
            assert s.wait_reason(k).startswith("Waiting")
        if policy.head != "skip":
            # after every call the queue is settled: another pass admits nothing
            record(s.schedule())
            assert set(s.admitted()) == set(admitted_ever)
        for node in s.capacity.usage():
            for dev in node["devices"]:
                assert dev["used_quanta"] <= dev["capacity_quanta"]
            assert not node["cpu_millis_total"] or node["cpu_millis_used"] <= node["cpu_millis_total"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions)
def test_strict_fifo_admits_in_submission_order(steps):
    s = make(gpus=(2, 1), policy=QueuePolicy(head="strict"))
    order = []
    n = 0
    for op, user, q, c, pick in steps:
        if op == "submit":
            n += 1
            d = s.submit(Request(K(f"u{user}", str(n)), q))
            if d.state == "RUNNING":
                order.append(d.request.seq)
            order += [r.seq for r, _ in d.also_admitted]
        elif op == "release" and s.admitted():
            keys = sorted(s.admitted(), key=str)
            order += [r.seq for r, _ in s.release(keys[pick % len(keys)])]
    assert order == sorted(order)


def test_benchmark_quick_modes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import scheduler_bench
    finally:
        sys.path.pop(0)
    res = scheduler_bench.main(["--quick", "--json"])
    assert res["placement_failures"] == 0 and res["split_allocations"] == 0 and res["short_allocations"] == 0
    assert res["admitted"] > 0
    if not os.path.exists(scheduler_bench.DEFAULT_TRACE):
        pytest.skip("trace not available")
    res = scheduler_bench.main(["--quick", "--trace", "--json"])
    assert res["placement_failures"] == 0 and res["split_allocations"] == 0 and res["short_allocations"] == 0
    assert res["mean_utilization"] > 0.8


def test_a_whole_gpu_still_starts_where_a_fraction_may_not():
    """Under GPU backend limits a larger request may fit where a smaller one failed: a fraction
    may not go on a "mig" node, a whole GPU may.  The pass must not give up after the fraction."""
    nodes = simulated_nodes([{"name": "n0", "gpus": 1, "gpu_memory": "8GiB", "gpu_backend": "mig"},
                             {"name": "n1", "gpus": 1, "gpu_memory": "8GiB", "gpu_backend": "hami"}], U)
    for order in ("fifo", "drf"):
        s = AdmissionQueue(Capacity(nodes, Q, units=U), QueuePolicy(order=order))
        s.set_gpu_ready("n1", False)  # the node that could take the fraction is out of service
        assert s.submit(R("a", "0.5")).state == "PENDING"
        s.schedule()
        d = s.submit(R("b", "2"))  # a whole GPU, which the mig node gives
        assert d.state == "RUNNING" and d.placement.node == "n0", (order, d)

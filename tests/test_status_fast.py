"""``Service.status`` (what GET api/requests and the sessions page build for every attempt on
each refresh) against a slow, obviously right reference: the status as it was computed before
it was made fast (issue: 10,000 waiting requests well under 100 ms), with every queue fact
worked out from scratch for each attempt: its place by searching the queue's order, its wait
reason through the key-based queue API, and its ETA from a fresh snapshot and the recent
departures counted again.  Random queues under FIFO and DRF, every head rule, user limits,
group quotas, pools, lifetimes, CPU and memory, GPUs not ready, stopping sessions and
departures; the same JSON for every attempt after every step."""
import asyncio
import time
from unittest import mock

from hypothesis import HealthCheck, event, given, settings, strategies as st

from bai_scheduler.core.eta import UNKNOWN, Eta, QueueEta, _span
from bai_scheduler.core.model import RequestKey
from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.queue import HEADS, ORDERS, QueuePolicy, UserLimits
from bai_scheduler.core.quotas import GroupPolicy, Quota
from bai_scheduler.core.units import FgpuUnits
from bai_scheduler.service import Attempt, Refused, Service
from bai_scheduler.store import Store

UNITS = FgpuUnits(2, "0.5")  # 4 quanta per GPU
GIB = 1 << 30


def reference_text(eta: Eta, now: float) -> str:
    clock = lambda t: time.strftime("%H:%M", time.localtime(t))  # noqa: E731
    parts = []
    if eta.expected is not None:
        parts.append(f"about {_span(eta.expected - now)}, from recent departures")
    if eta.latest is not None:
        bound = f"at the latest {clock(eta.latest)}, when sessions reach their lifetime"
        parts.append(f"({bound})" if parts else bound)
    return " ".join(parts) or "unknown"


def reference_eta(svc: Service, core, now: float) -> Eta:
    """``core.eta`` from nothing kept: the bound from a fresh snapshot, the estimate counted here."""
    q = svc.queue
    deadlines = {svc._core(r).key: svc.deadline(r) for r in svc.holding()}
    latest = QueueEta(q, deadlines, svc.max_lifetime(), svc.departures, now).latest(core)
    expected = None
    deps = [d for d in svc.departures if d[0] <= now]
    if deps and now - deps[0][0] > 0:
        span = now - deps[0][0]
        order = q.pending()
        upto = order[:[r.key for r in order].index(core.key) + 1]
        quanta, count = sum(r.quanta for r in upto), len(upto)
        freed = sum(qu for _, qu in deps)
        if core.quanta and freed:
            expected = now + max(quanta - q.capacity.free_quanta, core.quanta) * span / freed
        else:
            expected = now + count * span / len(deps)
    if latest is not None:
        return Eta("lifetime", latest, None if expected is None else min(expected, latest))
    if expected is not None:
        return Eta("departures", None, expected)
    return UNKNOWN


def reference_status(svc: Service, rec, now: float) -> dict:
    req = rec.request
    key = req.key
    out = {
        "id": rec.id, "user": key.user, "server": key.server, "state": rec.state, "image": req.image,
        "quanta": req.quanta, "fgpu": svc.units.to_fgpu(req.quanta), "cpu_millis": req.cpu_millis,
        "memory_bytes": req.memory_bytes, "submitted_at": rec.submitted_at, "admitted_at": rec.admitted_at,
        "epoch": svc.epoch, "group": req.group, "pools": list(req.pools),
    }
    if rec.state == "PENDING":
        core_key = Attempt(key.user, key.server, rec.id)
        out["position"] = position = [r.key for r in svc.queue.pending()].index(core_key) + 1
        out["reason"] = svc.queue.wait_reason(core_key, position)
        if req.quanta and svc.gpu_not_ready:
            out["reason"] += f" (GPUs not ready on {', '.join(sorted(svc.gpu_not_ready))})"
        core = svc._core(rec)
        eta = reference_eta(svc, core, now)
        out["eta"] = {"basis": eta.basis, "latest": eta.latest, "expected": eta.expected,
                      "text": reference_text(eta, now)}
    deadline = svc.deadline(rec)
    if deadline is not None and rec.state == "RUNNING":
        out["deadline"] = deadline
        out["lifetime_notice"] = svc.lifetime_notice(rec, deadline)
    if rec.state == "STOPPING":
        out["stop_error"] = rec.stop_error
    if rec.placement is not None:
        out["placement"] = svc.placement_details(rec.placement)
    return out


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


submit = st.tuples(st.just("submit"), st.integers(0, 3), st.integers(0, 5),
                   st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(5, 9)),
                   st.sampled_from([0, 0, 1000, 3000]), st.sampled_from([0, 0, GIB]),
                   st.sampled_from(["", "", "g1", "g2"]), st.sampled_from([(), (), ("a",), ("b",), ("a", "b")]))
step = st.one_of(
    submit, submit, submit, submit, submit,
    st.tuples(st.just("release"), st.integers(0, 1000)),
    st.tuples(st.just("stop"), st.integers(0, 1000)),
    st.tuples(st.just("gpu"), st.integers(0, 1), st.sampled_from([True, True, False])),
    # Whole seconds: the service keeps one ETA snapshot per change and second, so within a
    # second without a change its ETAs are those of the second's first status (by design).
    st.tuples(st.just("tick"), st.sampled_from([0, 0, 1, 45, 700])),
)
node = st.tuples(st.integers(1, 2), st.sampled_from(["a", "b"]), st.sampled_from([0, 4]),
                 st.sampled_from([0, "4GiB"]))
quota = st.builds(Quota, max_running=st.integers(0, 2), max_pending=st.sampled_from([0, 3]),
                  max_quanta=st.sampled_from([0, 2, 6]), max_cpu_millis=st.sampled_from([0, 2000]))
group = st.builds(GroupPolicy, quota=quota, pools=st.sampled_from([(), ("a",)]),
                  lifetime_s=st.sampled_from([0, 600, 7200]))
limits = st.just(UserLimits()) | st.builds(UserLimits, max_running=st.sampled_from([0, 0, 2]),
                                           max_pending=st.sampled_from([0, 0, 4]), max_quanta=st.sampled_from([0, 0, 6]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.sampled_from(ORDERS), head=st.sampled_from(HEADS), nodes=st.lists(node, min_size=1, max_size=2),
       limits=limits, groups=st.one_of(st.just({}), st.dictionaries(st.sampled_from(["g1", "g2"]), group, max_size=2)),
       default_lifetime=st.sampled_from([0, 3600, 3600]), steps=st.lists(step, min_size=20, max_size=80))
def test_status_is_the_reference_status_for_every_attempt_after_every_step(
        tmp_path_factory, order, head, nodes, limits, groups, default_lifetime, steps):
    spec = [{"name": f"n{i}", "gpus": g, "gpu_memory": "8GiB", "pool": p, "cpu": c, "memory": m}
            for i, (g, p, c, m) in enumerate(nodes)]
    db = f"sqlite:///{tmp_path_factory.mktemp('status') / 's.sqlite'}"
    clock = Clock()

    kinds = set()  # what the steps reached, for --hypothesis-show-statistics

    async def scenario():
        svc = Service(simulated_nodes(spec, UNITS), UNITS, Store(db), policy=QueuePolicy(order=order, head=head),
                      limits=limits, groups=groups, default_lifetime=default_lifetime, admission_grace=0)
        for op, *args in steps:
            try:
                if op == "submit":
                    user, server, quanta, cpu, mem, grp, pools = args
                    await svc.submit(RequestKey(f"u{user}", f"s{server}"), quanta, cpu, mem, image=f"img{quanta % 2}",
                                     group=grp, pools=pools)
                elif op in ("release", "stop") and svc.records:
                    rec = list(svc.records.values())[args[0] % len(svc.records)]
                    await (svc.release(rec.id) if op == "release" else svc.stop(rec.key))
                elif op == "gpu" and args[0] < len(spec):
                    svc.set_gpu_ready(f"n{args[0]}", args[1])
                    await svc.schedule()
                    clock.now += 1  # the ETA snapshot is kept per change and second (this is no change)
                elif op == "tick":
                    clock.now += args[0]
            except Refused:
                pass
            records = list(svc.records.values())
            expected = [reference_status(svc, rec, clock.now) for rec in records]
            assert svc.statuses(records) == expected, (op, args)
            subset = records[::3]  # a part of the list (a user's own), in its order
            assert svc.statuses(subset) == expected[::3], (op, args)
            for rec, status in zip(records, expected):
                assert svc.status(rec) == status, (op, args, rec.id)
                if rec.state == "PENDING":
                    reason = status["reason"]
                    kinds.add(f"{order} ETA {status['eta']['basis']}, {reason.split(' ')[0]}")
                    kinds.update(k for k in ("kept free", "not ready", "behind") if k in reason)
                else:
                    kinds.add(rec.state)
        svc.close()

    with mock.patch("time.time", clock):
        asyncio.run(scenario())
    for kind in kinds:
        event(kind)

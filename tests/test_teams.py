"""Teams and time, the pure parts: group quotas, node pools, presets, and the queue ETA
(bai_scheduler/core/quotas.py, placement pools, presets.py, eta.py)."""
from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bai_scheduler.core.eta import Eta, QueueEta
from bai_scheduler.core.model import Request, RequestKey
from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.placement import Capacity
from bai_scheduler.core.presets import Preset, check_teams, presets_from_config
from bai_scheduler.core.queue import AdmissionQueue, QueuePolicy, UserLimits
from bai_scheduler.core.quotas import GroupPolicy, Quota, pick_group
from bai_scheduler.core.units import GIB, FgpuUnits

U = FgpuUnits(fgpu_per_gpu=1, fgpu_step=Decimal("0.25"))  # 4 quanta per GPU
Q = U.quanta_per_gpu


def nodes(*spec):
    """spec: (name, gpus, pool) per node."""
    return simulated_nodes([{"name": n, "gpus": g, "gpu_memory": "8GiB", "pool": p} for n, g, p in spec], U)


def queue(*spec, policy=None, limits=None, quotas=None):
    return AdmissionQueue(Capacity(nodes(*spec), Q, units=U), policy or QueuePolicy(), limits, quotas)


def req(user, server, quanta, group="", pools=(), cpu=0, mem=0):
    return Request(RequestKey(user, server), quanta, cpu, mem, group=group, pools=tuple(pools))


# -- group quotas -------------------------------------------------------------------------

def test_group_quota_holds_and_names_the_limit():
    q = queue(("n0", 4, "default"), quotas={"team-vision": Quota(max_quanta=8)})
    assert q.submit(req("ann", "a", 4, "team-vision")).state == "RUNNING"
    assert q.submit(req("bob", "b", 4, "team-vision")).state == "RUNNING"
    d = q.submit(req("cid", "c", 1, "team-vision"))
    assert d.state == "PENDING"
    assert d.reason == "Waiting: team-vision uses 2 of 2 fGPU"  # 8 quanta = 2 fGPU at 4 per GPU
    # Another group's request is not blocked by it, and reserves nothing for it.
    assert q.submit(req("dan", "d", 4, "team-nlp")).state == "RUNNING"
    # A release inside the group lets the held one start.
    admitted = q.release(RequestKey("ann", "a"))
    assert [r.key.server for r, _ in admitted] == ["c"]


def test_group_quota_partial_use_says_what_this_session_asks():
    q = queue(("n0", 4, "default"), quotas={"t": Quota(max_quanta=6)})
    q.submit(req("a", "1", 4, "t"))
    d = q.submit(req("b", "2", 4, "t"))
    assert d.reason == "Waiting: t uses 1 of 1.5 fGPU; this session asks for 1"


def test_group_running_cpu_memory_and_pending_quotas():
    q = queue(("n0", 4, "default"), quotas={
        "r": Quota(max_running=1, max_pending=1), "c": Quota(max_cpu_millis=2000),
        "m": Quota(max_memory_bytes=4 * GIB)})
    q.submit(req("a", "1", 1, "r"))
    assert q.submit(req("a", "2", 1, "r")).reason == "Waiting: r runs 1 of 1 session"
    refused = q.submit(req("b", "3", 1, "r"))
    assert (refused.state, refused.reason) == ("REFUSED", "r already has 1 of 1 waiting session")
    q.submit(req("c", "1", 0, "c", cpu=1500))
    assert q.submit(req("c", "2", 0, "c", cpu=1000)).reason == (
        "Waiting: c uses 1.5 of 2 CPU; this session asks for 1")
    q.submit(req("m", "1", 0, "m", mem=4 * GIB))
    assert q.submit(req("m", "2", 0, "m", mem=GIB)).reason == "Waiting: m uses 4 GiB of 4 GiB memory"


def test_request_larger_than_its_group_quota_is_refused_at_once():
    q = queue(("n0", 4, "default"), quotas={"t": Quota(max_quanta=4)})
    d = q.submit(req("a", "1", 8, "t"))
    assert (d.state, d.reason) == ("REFUSED", "asks for 2 fGPU but t's quota is 1 fGPU")


def test_group_usage_counts_running_and_waiting():
    q = queue(("n0", 1, "default"), quotas={"t": Quota(max_quanta=8)})
    q.submit(req("a", "1", 4, "t"))
    q.submit(req("b", "2", 4, "t"))
    u = q.group_usage()["t"]
    assert (u.running, u.quanta, u.pending) == (1, 4, 1)


def test_pick_group():
    policies = {"vision": GroupPolicy(), "nlp": GroupPolicy()}
    assert pick_group(["staff", "nlp", "vision"], policies) == "nlp"
    assert pick_group(["staff", "nlp", "vision"], policies, "vision") == "vision"
    assert pick_group(["staff"], policies) == ""
    with pytest.raises(ValueError, match="not in a group named 'vision'"):
        pick_group(["nlp"], policies, "vision")


# -- node pools --------------------------------------------------------------------------

def test_placement_stays_in_the_allowed_pools():
    q = queue(("cpu0", 1, "cheap"), ("a0", 1, "a100"), ("a1", 1, "a100"))
    for i in range(2):
        d = q.submit(req("u", f"s{i}", 4, pools=("a100",)))
        assert d.state == "RUNNING" and d.placement.node in ("a0", "a1")
    # pool a100 is full; the cheap node is free but not allowed
    d = q.submit(req("u", "s2", 4, pools=("a100",)))
    assert d.state == "PENDING"
    # a request of the same shape for the cheap pool still starts in the same pass
    d = q.submit(req("v", "s0", 4, pools=("cheap",)))
    assert (d.state, d.placement.node) == ("RUNNING", "cpu0")


def test_a_failure_in_one_pool_does_not_stop_another_pools_request_in_the_pass():
    q = queue(("a0", 1, "a"), ("b0", 1, "b"), policy=QueuePolicy(head="strict"))
    q.submit(req("u", "1", 4, pools=("a",)))
    q.submit(req("u", "2", 4, pools=("b",)))
    assert q.submit(req("u", "3", 4, pools=("a",))).state == "PENDING"
    q.release(RequestKey("u", "2"))
    q.submit(req("u", "4", 4, pools=("b",)))
    # strict head: request 3 (pool a) blocks everything behind it, whatever the pool
    assert q.get(RequestKey("u", "4")).state == "PENDING"
    q2 = queue(("a0", 1, "a"), ("b0", 1, "b"), policy=QueuePolicy(head="backfill", reservations=0))
    q2.submit(req("u", "1", 4, pools=("a",)))
    assert q2.submit(req("u", "2", 4, pools=("a",))).state == "PENDING"
    assert q2.submit(req("u", "3", 4, pools=("a", "b"))).state == "RUNNING"


def test_can_ever_fit_within_pools():
    cap = Capacity(nodes(("s0", 1, "small"), ("b0", 4, "big")), Q, units=U)
    assert cap.can_ever_fit(req("u", "1", 8, pools=("small",))) == (
        "asks for 2 fGPU but the largest node has 1 fGPU (in pool small)")
    assert cap.can_ever_fit(req("u", "1", 8, pools=("big",))) is None
    assert cap.can_ever_fit(req("u", "1", 1, pools=("gone",))) == "there are no nodes in pool gone"
    assert cap.pools() == {"big": ["b0"], "small": ["s0"]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8), st.sampled_from(
    [(), ("a",), ("b",), ("a", "b")]), st.sampled_from(["", "g1", "g2"])), min_size=1, max_size=40),
    order=st.sampled_from(["fifo", "drf"]), head=st.sampled_from(["strict", "skip", "backfill"]))
def test_pools_and_quotas_hold_whatever_happens(steps, order, head):
    """Every admission is in an allowed pool and keeps its group within quota; nothing that could
    start waits for ever (after all releases the queue drains)."""
    quotas = {"g1": Quota(max_quanta=6, max_running=2), "g2": Quota(max_running=1)}
    q = queue(("a0", 2, "a"), ("b0", 1, "b"), policy=QueuePolicy(order=order, head=head, skip_after=1),
              quotas=quotas)
    pool_of = {"a0": "a", "b0": "b"}
    running: dict = {}

    def check(pairs):
        for r, p in pairs:
            assert not r.pools or pool_of[p.node] in r.pools
            running[r.key] = r
        for g, quota in quotas.items():
            mine = [r for r in running.values() if r.group == g]
            assert not quota.max_quanta or sum(r.quanta for r in mine) <= quota.max_quanta
            assert not quota.max_running or len(mine) <= quota.max_running

    for i, (user, quanta, pools, group) in enumerate(steps):
        if quanta == 0 and running:  # a release
            key = sorted(running, key=str)[i % len(running)]
            del running[key]
            check(q.release(key))
            continue
        d = q.submit(req(f"u{user}", f"s{i}", quanta, group, pools))
        if d.state == "RUNNING":
            check([(d.request, d.placement)])
        check(d.also_admitted)
    while running:
        key = sorted(running, key=str)[0]
        del running[key]
        check(q.release(key))
    assert len(q) == 0


# -- presets -----------------------------------------------------------------------------

def test_presets_from_config_profile_list_shape():
    presets = presets_from_config([
        {"display_name": "Small GPU", "description": "for notebooks", "default": True, "fgpu": "0.5",
         "cpu": "2", "memory": "4GiB"},
        {"display_name": "Training", "slug": "train", "fgpu": 2, "cpu": 4, "memory": "16GiB",
         "image": "bai/pytorch:2.13.0", "pool": "a100"},
    ], U)
    assert presets[0] == Preset("small-gpu", "Small GPU", "for notebooks", 2, 2000, 4 * GIB, default=True)
    assert presets[1] == Preset("train", "Training", "", 8, 4000, 16 * GIB, "bai/pytorch:2.13.0", "a100")
    assert Preset.from_json(presets[1].to_json()) == presets[1]


@pytest.mark.parametrize("entry, message", [
    ({"slug": "x"}, "preset #0: display_name must be a non-empty string"),
    ({"display_name": "X", "fgpu": "0.3"}, "preset 'x': fgpu: 0.3 fGPU is not a whole number of steps"),
    ({"display_name": "X", "gpus": 1}, "preset #0: unknown key(s) gpus"),
    ({"display_name": "X", "memory": "lots"}, "preset 'x': memory: cannot read size"),
])
def test_bad_presets_name_the_entry(entry, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        presets_from_config([entry], U)


def test_check_teams_says_what_could_never_run():
    presets = presets_from_config([
        {"display_name": "Big", "fgpu": "2", "pool": "a100", "image": "bai/x:1"},
        {"display_name": "Gone", "fgpu": "1.5", "pool": "nowhere"},
    ], U)
    groups = {"tiny": GroupPolicy(Quota(max_quanta=4)), "lost": GroupPolicy(pools=("empty",))}
    cap = Capacity(nodes(("a0", 4, "a100")), Q, units=U)
    problems = check_teams(presets, groups, cap.pools(), U, images={"bai/y:1"}, can_ever_fit=cap.can_ever_fit)
    assert problems == [
        "preset 'big' names image 'bai/x:1', which is not in the catalog (build it with bai-images, or fix the name)",
        "preset 'gone' names pool 'nowhere', which no node has (pools: a100)",
        "group 'tiny''s quota is smaller than every preset: preset 'gone' asks for 1.5 fGPU but tiny's quota is 1 fGPU",
        "group 'lost' may use pool 'empty', which has no nodes (pools: a100)",
        "group 'lost' may use none of the presets (their pools are not its pools)",
    ]


# -- ETA: literal cases -------------------------------------------------------------------

def test_eta_pinned_senior_is_bounded_by_the_deadlines_on_its_pin():
    q = queue(("n0", 1, "default"), policy=QueuePolicy(reservations=0))
    q.submit(req("a", "1", 2))
    q.submit(req("b", "2", 2))
    q.submit(req("c", "3", 4))  # waits for the whole GPU
    q.release(RequestKey("a", "1"))
    assert q.submit(req("d", "4", 2)).state == "RUNNING"  # a younger one takes the freed half
    q.release(RequestKey("b", "2"))  # only younger sessions left there: c is pinned
    assert q.pin is not None and q.pin[0] == RequestKey("c", "3")
    deadlines = {RequestKey("d", "4"): 1500.0}
    eta = QueueEta(q, deadlines, max_lifetime=None, departures=[], now=100.0)
    assert eta.eta(q.get(RequestKey("c", "3")).request) == Eta("lifetime", 1500.0, None)


def test_eta_unpinned_oldest_and_the_chain_behind_it():
    q = queue(("n0", 2, "default"))
    for i in range(2):
        q.submit(req("a", f"r{i}", 4))
    q.submit(req("b", "w1", 4))
    q.submit(req("c", "w2", 4))
    deadlines = {RequestKey("a", "r0"): 400.0, RequestKey("a", "r1"): 700.0}
    eta = QueueEta(q, deadlines, max_lifetime=600.0, departures=[], now=100.0)
    # the oldest: the device that frees first (400) plus one lifetime (FIFO)
    assert eta.latest(q.get(RequestKey("b", "w1")).request) == 1000.0
    # the next: then two lifetimes more
    assert eta.latest(q.get(RequestKey("c", "w2")).request) == 2200.0
    # DRF's order may pass the oldest over once more
    q.policy = QueuePolicy(order="drf")
    assert QueueEta(q, deadlines, 600.0, [], 100.0).latest(q.get(RequestKey("b", "w1")).request) == 1600.0


def test_eta_without_lifetimes_or_with_limits_states_no_bound():
    q = queue(("n0", 1, "default"), limits=UserLimits(max_running=5))
    q.submit(req("a", "1", 4))
    q.submit(req("b", "2", 4))
    eta = QueueEta(q, {RequestKey("a", "1"): 500.0}, 600.0, [], 100.0)
    assert eta.latest(q.get(RequestKey("b", "2")).request) is None  # a limit could hold it
    q2 = queue(("n0", 1, "default"))
    q2.submit(req("a", "1", 4))
    q2.submit(req("b", "2", 4))
    assert QueueEta(q2, {RequestKey("a", "1"): None}, 600.0, [], 100.0).eta(
        q2.get(RequestKey("b", "2")).request) == Eta("unknown")


def test_eta_from_recent_departures():
    q = queue(("n0", 1, "default"))
    q.submit(req("a", "1", 4))
    q.submit(req("b", "2", 2))
    q.submit(req("c", "3", 2))
    # 8 quanta left in the last 600 s: 1 quantum per 75 s
    deps = [(0.0, 4), (300.0, 4)]
    eta = QueueEta(q, {RequestKey("a", "1"): None}, None, deps, now=600.0)
    b, c = q.get(RequestKey("b", "2")).request, q.get(RequestKey("c", "3")).request
    assert eta.eta(b) == Eta("departures", None, 600.0 + 2 * 75)
    assert eta.eta(c) == Eta("departures", None, 600.0 + 4 * 75)
    assert eta.eta(c).text(600.0) == "about 5 min, from recent departures"
    both = Eta("lifetime", 600.0 + 3600, 600.0 + 720)
    assert both.text(600.0, clock=lambda t: "14:20") == (
        "about 12 min, from recent departures (at the latest 14:20, when sessions reach their lifetime)")
    assert Eta("lifetime", 1.0).text(0.0, clock=lambda t: "14:20") == (
        "at the latest 14:20, when sessions reach their lifetime")


# -- ETA: a stated bound is never broken ----------------------------------------------------

def replay_with_etas(policy, gpus, arrivals, lifetime, ticks):
    """Tick by tick (departures first, then arrivals), sessions stopped at their lifetime.
    Returns [(key, latest, started)] for every bound stated at any tick."""
    q = AdmissionQueue(Capacity(nodes(*[(f"n{i}", g, "default") for i, g in enumerate(gpus)]), Q, units=U),
                       policy)
    ends: dict[int, list] = {}
    deadlines: dict = {}
    started: dict = {}
    stated: list = []
    departures: list = []
    n = 0

    def admitted(t, pairs, holds):
        for r, _ in pairs:
            started[r.key] = t
            deadlines[r.key] = t + lifetime
            ends.setdefault(t + min(holds[r.key], lifetime), []).append(r)

    holds: dict = {}
    last_arrival = max(arrivals, default=0)
    for t in range(ticks):
        if t > last_arrival and not ends and not len(q):
            break
        for r in ends.pop(t, ()):
            departures.append((t, r.quanta))
            del deadlines[r.key]
            admitted(t, q.release(r.key), holds)
        for user, quanta, hold in arrivals.get(t, ()):
            n += 1
            key = RequestKey(user, f"r{n}")
            holds[key] = hold
            d = q.submit(Request(key, quanta))
            if d.state == "RUNNING":
                admitted(t, [(d.request, d.placement)], holds)
            admitted(t, d.also_admitted, holds)
        eta = QueueEta(q, deadlines, lifetime, departures[-20:], t)
        for r in q.pending():
            latest = eta.latest(r)
            if latest is not None:
                stated.append((r.key, latest))
    return [(k, latest, started.get(k)) for k, latest in stated]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    order=st.sampled_from(["fifo", "drf"]), head=st.sampled_from(["strict", "skip", "backfill"]),
    gpus=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    events=st.lists(st.tuples(st.integers(0, 30), st.sampled_from("abc"), st.sampled_from([1, 2, 3, 4, 6, 8]),
                              st.integers(1, 25)), max_size=30),
    lifetime=st.integers(3, 20),
)
def test_a_stated_upper_bound_is_never_broken_in_trace_replay(order, head, gpus, events, lifetime):
    arrivals: dict = {}
    for t, user, quanta, hold in events:
        if quanta <= max(gpus) * Q:
            arrivals.setdefault(t, []).append((user, quanta, hold))
    ticks = 31 + 40 * (len(events) + 1) * lifetime  # long enough for every request to start
    policy = QueuePolicy(order=order, head=head, skip_after=1)
    for key, latest, start in replay_with_etas(policy, gpus, arrivals, lifetime, ticks):
        assert start is not None and start <= latest, (key, latest, start)


def test_resolve_group_and_pools():
    from bai_scheduler.core.quotas import resolve
    policies = {"vision": GroupPolicy(pools=("a100",)), "nlp": GroupPolicy()}
    pools = {"a100", "cheap"}
    assert resolve(["vision", "nlp"], policies, pools) == ("vision", ("a100",))
    assert resolve(["vision", "nlp"], policies, pools, "nlp") == ("nlp", ())
    assert resolve(["vision", "nlp"], policies, pools, "nlp", "cheap") == ("nlp", ("cheap",))
    with pytest.raises(ValueError, match="vision may not use pool 'cheap'; allowed: a100"):
        resolve(["vision"], policies, pools, "", "cheap")
    with pytest.raises(ValueError, match="no node pool 'gpu'"):
        resolve(["nlp"], policies, pools, "", "gpu")
    assert resolve(["staff"], policies, pools) == ("", ())
    with pytest.raises(ValueError, match="in no group that may start sessions here"):
        resolve(["staff"], policies, pools, ungrouped=False)


def test_the_form_note_is_about_the_pools_a_launch_may_use():
    from bai_scheduler.core.quotas import note_pools
    policies = {"vision": GroupPolicy(pools=("a100",)), "nlp": GroupPolicy(pools=("cheap",)), "all": GroupPolicy()}
    pools = {"a100", "cheap"}
    assert note_pools(["nlp", "vision"], policies, pools) == (("cheap",), "")  # the default group's
    assert note_pools(["nlp", "vision"], policies, pools, "vision") == (("a100",), "")
    assert note_pools(["all"], policies, pools, "all", "cheap") == (("cheap",), "")
    assert note_pools(["all"], policies, pools) == ((), "")  # any node
    # Not the user's group (a stale form, a hand-made URL): the default group, never wider pools.
    assert note_pools(["nlp"], policies, pools, "all") == (("cheap",), "")
    assert note_pools(["nlp"], policies, pools, "", "a100") == ((), "nlp may not use pool 'a100'; allowed: cheap.")
    assert note_pools(["staff"], policies, pools, ungrouped=False)[1].startswith("You are in no group that may")


def test_start_up_refuses_teams_that_could_never_run():
    from traitlets.config import Config

    from bai_scheduler.app import BaiScheduler, parse_duration

    c = Config()
    c.BaiScheduler.nodes = [{"name": "a0", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB", "pool": "a100"}]
    c.BaiScheduler.presets = [{"display_name": "Big", "fgpu": "1", "pool": "h100"}]
    c.BaiScheduler.group_pools = {"t": ["gone"]}
    c.BaiScheduler.group_quotas = {"t": {"fgpu": "0.5"}}
    c.BaiScheduler.group_lifetimes = {"t": "8h"}
    app = BaiScheduler(config=c)
    app.node_list = app.build_nodes()
    app.form_limits = app.session_limits()
    app.groups = app.group_policies()
    assert app.groups["t"] == GroupPolicy(Quota(max_quanta=1), ("gone",), 8 * 3600)
    with pytest.raises(ValueError) as e:
        app.check_teams(None)
    assert str(e.value) == (
        "Teams configuration: preset 'big' names pool 'h100', which no node has (pools: a100); "
        "group 't' may use pool 'gone', which has no nodes (pools: a100); "
        "group 't' may use none of the presets (their pools are not its pools).")
    c.BaiScheduler.group_quotas = {"t": {"gpus": 1}}
    with pytest.raises(ValueError, match=re.escape("group_quotas['t']: a dict of running, pending, fgpu")):
        BaiScheduler(config=c).group_policies()
    assert parse_duration("90m", "x") == 5400 and parse_duration(30, "x") == 30
    with pytest.raises(ValueError, match="x: 'soon' is not a duration"):
        parse_duration("soon", "x")

"""Capacity: placement rules, take/give_back bookkeeping, and property tests against brute force."""
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bai_scheduler.core.nodes import simulated_nodes
from bai_scheduler.core.model import Device, Node, Placement, Request, RequestKey, Share
from bai_scheduler.core.placement import Capacity, Reservations
from bai_scheduler.core.units import FgpuUnits

U = FgpuUnits(fgpu_per_gpu=2, fgpu_step=Decimal("0.5"))  # 4 quanta per GPU
Q = U.quanta_per_gpu


def nodes(*gpus, cpu=0, memory=0):
    return simulated_nodes(
        [{"name": f"n{i}", "gpus": g, "gpu_memory": "8GiB", "cpu": cpu, "memory": memory}
         for i, g in enumerate(gpus)],
        U,
    )


def req(q, cpu=0, mem=0, name="s"):
    return Request(RequestKey("u", name), q, cpu, mem)


def cap_of(*gpus, **kw):
    return Capacity(nodes(*gpus), Q, units=U, **kw)


def test_sub_gpu_goes_on_one_device_exactly():
    cap = cap_of(2)
    p = cap.place(req(3))
    assert p.node == "n0" and len(p.shares) == 1 and p.quanta == 3
    cap.take(p)
    assert cap.device_used(p.shares[0].device_uuid) == 3
    # 2 quanta: 1 left on that device, 4 on the other: never split 1+1, goes whole to the other
    p2 = cap.place(req(2))
    assert len(p2.shares) == 1 and p2.shares[0].device_uuid != p.shares[0].device_uuid


def test_concentrate_is_best_fit_and_keeps_whole_gpus_free():
    cap = cap_of(2, 2)
    a = cap.place(req(1))
    cap.take(a)
    b = cap.place(req(1))
    assert b.shares[0].device_uuid == a.shares[0].device_uuid  # fullest device that fits
    cap.take(b)
    # a full GPU still goes to an empty device; three stay entirely free
    assert sum(1 for n in cap.usage() for d in n["devices"] if d["used_quanta"] == 0) == 3


def test_concentrate_prefers_fullest_node_on_ties():
    cap = cap_of(2, 2)
    cap.take(Placement("n1", (Share("GPU-sim-n1-0", 4),)))
    p = cap.place(req(2))
    assert p.node == "n1" and p.shares[0].device_uuid == "GPU-sim-n1-1"


def test_spread_takes_emptiest():
    cap = cap_of(2, 2, strategy="spread")
    cap.take(Placement("n0", (Share("GPU-sim-n0-0", 1),)))
    p = cap.place(req(1))
    assert p.node == "n1"
    cap.take(p)
    p = cap.place(req(1))
    assert cap.device_used(p.shares[0].device_uuid) == 0  # an untouched device


def test_whole_then_fraction():
    cap = cap_of(4)
    cap.take(Placement("n0", (Share("GPU-sim-n0-3", 3),)))
    p = cap.place(req(2 * Q + 1))  # 2 whole + 1 quantum: the 1 goes on the partly used device
    assert p.quanta == 2 * Q + 1
    assert sorted(s.quanta for s in p.shares) == [1, Q, Q]
    assert Share("GPU-sim-n0-3", 1) in p.shares
    cap.take(p)
    assert cap.place(req(Q + 1)) is None  # one whole device left, no room for the remainder
    assert cap.place(req(Q)) is not None


def test_whole_only():
    cap = cap_of(4, span="whole-only")
    assert cap.place(req(Q + 1)) is None
    assert "only whole GPUs" in cap.can_ever_fit(req(Q + 1))
    p = cap.place(req(3 * Q))
    assert len(p.shares) == 3 and all(s.quanta == Q for s in p.shares)
    assert cap.place(req(2)) is not None  # fractions up to one device are still fine


def test_multi_gpu_stays_on_one_node():
    cap = cap_of(2, 2)
    assert cap.place(req(3 * Q)) is None
    assert cap.can_ever_fit(req(3 * Q)) == "asks for 6 fGPU but the largest node has 4 fGPU"
    assert cap.can_ever_fit(req(2 * Q)) is None


def test_can_ever_fit_reasons():
    cap = Capacity(nodes(1, cpu=2, memory="4GiB"), Q, units=U)
    assert cap.can_ever_fit(req(Q)) is None
    assert "CPU" in cap.can_ever_fit(req(1, cpu=3000))
    assert "memory" in cap.can_ever_fit(req(1, mem=5 * 1024**3))
    nogpu = Capacity(nodes(0), Q, units=U)
    assert "no GPU" in nogpu.can_ever_fit(req(1))
    assert nogpu.can_ever_fit(req(0, cpu=100)) is None
    assert "no nodes" in Capacity([], Q, units=U).can_ever_fit(req(1))


def test_cpu_memory_limits_are_respected():
    cap = Capacity(nodes(1, 1, cpu=1, memory="2GiB"), Q, units=U)
    a = cap.place(req(1, cpu=800))
    cap.take(a)
    b = cap.place(req(1, cpu=800))
    assert b.node != a.node  # no CPU left on the first node
    cap.take(b)
    assert cap.place(req(1, cpu=800)) is None
    assert cap.place(req(1, cpu=200)) is not None
    with pytest.raises(ValueError):
        cap.take(Placement(a.node, (), 300, 0))
    assert cap.node_used(a.node) == (800, 0)


def test_cpu_only_requests():
    cap = Capacity(nodes(0, 1, cpu=1), Q, units=U)
    p = cap.place(req(0, cpu=1000))
    assert p.shares == () and p.cpu_millis == 1000
    cap.take(p)
    p2 = cap.place(req(0, cpu=1000))
    assert p2.node != p.node
    cap.take(p2)
    assert cap.place(req(0, cpu=1)) is None
    assert cap.place(req(0)) is not None  # nothing asked, always room


def test_take_and_give_back_refuse_bad_placements():
    cap = cap_of(1)
    with pytest.raises(ValueError, match="unknown node"):
        cap.take(Placement("nope", ()))
    with pytest.raises(ValueError, match="unknown device"):
        cap.take(Placement("n0", (Share("GPU-x", 1),)))
    with pytest.raises(ValueError, match="free"):
        cap.take(Placement("n0", (Share("GPU-sim-n0-0", Q + 1),)))
    with pytest.raises(ValueError, match="free"):  # duplicate shares add up
        cap.take(Placement("n0", (Share("GPU-sim-n0-0", 3), Share("GPU-sim-n0-0", 2))))
    with pytest.raises(ValueError, match="positive"):
        cap.take(Placement("n0", (Share("GPU-sim-n0-0", 0),)))
    assert cap.used_quanta == 0
    with pytest.raises(ValueError, match="in use"):
        cap.give_back(Placement("n0", (Share("GPU-sim-n0-0", 1),)))
    cap.take(Placement("n0", (Share("GPU-sim-n0-0", 2),)))
    with pytest.raises(ValueError):
        cap.give_back(Placement("n0", (Share("GPU-sim-n0-0", 3),)))
    cap.give_back(Placement("n0", (Share("GPU-sim-n0-0", 2),)))
    assert cap.used_quanta == 0


def test_device_on_wrong_node_refused():
    cap = cap_of(1, 1)
    with pytest.raises(ValueError, match="not on node"):
        cap.take(Placement("n0", (Share("GPU-sim-n1-0", 1),)))


def test_constructor_checks():
    with pytest.raises(ValueError):
        Capacity(nodes(1), Q, span="any")
    with pytest.raises(ValueError):
        Capacity(nodes(1), Q, strategy="random")
    with pytest.raises(ValueError, match="duplicate node"):
        Capacity(nodes(1) + nodes(1), Q)


def test_usage():
    cap = Capacity(nodes(2, cpu=4, memory="8GiB"), Q, units=U)
    cap.take(Placement("n0", (Share("GPU-sim-n0-1", 3),), 500, 1024))
    (n,) = cap.usage()
    assert n["name"] == "n0" and n["cpu_millis_total"] == 4000 and n["cpu_millis_used"] == 500
    assert n["memory_bytes_total"] == 8 * 1024**3 and n["memory_bytes_used"] == 1024
    assert [(d["uuid"], d["index"], d["capacity_quanta"], d["used_quanta"]) for d in n["devices"]] == [
        ("GPU-sim-n0-0", 0, 4, 0), ("GPU-sim-n0-1", 1, 4, 3)]
    assert n["devices"][0]["memory_bytes"] == 8 * 1024**3 and n["devices"][0]["name"] == "Simulated GPU"


def test_reservation_is_avoided():
    cap = cap_of(2)
    cap.take(Placement("n0", (Share("GPU-sim-n0-0", 3),)))
    cap.take(Placement("n0", (Share("GPU-sim-n0-1", 2),)))
    held = Reservations()
    r = cap.reserve(req(Q), held)  # a whole GPU: closest is device 1 (2 free)
    assert r.devices == ("GPU-sim-n0-1",)
    assert cap.place(req(1), held).shares[0].device_uuid == "GPU-sim-n0-0"
    assert cap.place(req(2), held) is None
    assert cap.place(req(2)) is not None
    assert cap.max_free(held) == 1 and cap.max_free() == 2


def test_mig_devices_and_uneven_sizes():
    devs = (Device("MIG-a", 0, "1g", 5, 14, Q, "GPU-p", "1g.5gb"), Device("MIG-b", 0, "3g", 20, 42, Q, "GPU-p", "3g.20gb"))
    cap = Capacity([Node("m", "", devs)], Q, units=U)
    p = cap.place(req(Q))
    assert p.shares[0].device_uuid in {"MIG-a", "MIG-b"}


# ---------------------------------------------------------------- properties against brute force
def brute_fit(cap: Capacity, r: Request) -> bool:
    """Does any placement exist for r right now (no reservations)?"""
    for node in cap.nodes:
        cpu_used, mem_used = cap.node_used(node.name)
        if node.cpu_millis and cpu_used + r.cpu_millis > node.cpu_millis:
            continue
        if node.memory_bytes and mem_used + r.memory_bytes > node.memory_bytes:
            continue
        free = [cap.device_free(d.uuid) for d in node.devices]
        if r.quanta == 0:
            return True
        if r.quanta <= Q:
            if any(f >= r.quanta for f in free):
                return True
            continue
        k, rem = divmod(r.quanta, Q)
        if rem and cap.span == "whole-only":
            continue
        whole = [i for i, f in enumerate(free) if f == Q]
        if len(whole) < k:
            continue
        others = [f for i, f in enumerate(free) if i not in whole[:k]]
        if not rem or any(f >= rem for f in others):
            return True
    return False


ops = st.lists(
    st.tuples(
        st.sampled_from(["place", "place", "place", "release"]),
        st.integers(min_value=0, max_value=3 * Q),
        st.sampled_from([0, 0, 300, 700]),
        st.integers(min_value=0, max_value=100),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=4),
    cpu=st.sampled_from([0, 1, 2]),
    span=st.sampled_from(["whole-then-fraction", "whole-only"]),
    strategy=st.sampled_from(["concentrate", "spread"]),
    steps=ops,
)
def test_random_workloads_never_overallocate(layout, cpu, span, strategy, steps):
    cap = Capacity(nodes(*layout, cpu=cpu), Q, span=span, strategy=strategy, units=U)
    held = []
    for op, q, c, pick in steps:
        if op == "release" and held:
            p = held.pop(pick % len(held))
            before = {d["uuid"]: d["used_quanta"] for n in cap.usage() for d in n["devices"]}
            cap.give_back(p)
            after = {d["uuid"]: d["used_quanta"] for n in cap.usage() for d in n["devices"]}
            for s in p.shares:
                before[s.device_uuid] -= s.quanta
            assert before == after  # exactly what was taken
            continue
        r = req(q, cpu=c)
        p = cap.place(r)
        if p is None:
            assert not brute_fit(cap, r), f"{r} fits somewhere but was not placed"
            continue
        assert p.quanta == q and p.cpu_millis == c  # never short
        if q <= Q:
            assert len(p.shares) <= 1  # never split
        else:
            assert len({s.device_uuid for s in p.shares}) == len(p.shares)
            wholes = [s for s in p.shares if s.quanta == Q]
            assert len(wholes) >= q // Q
            if span == "whole-only":
                assert all(s.quanta == Q for s in p.shares)
        if strategy == "concentrate" and 0 < q <= Q:
            chosen = cap.device_free(p.shares[0].device_uuid)
            feasible = [
                cap.device_free(d.uuid)
                for n in cap.nodes
                for d in n.devices
                if cap.device_free(d.uuid) >= q
                and (not n.cpu_millis or cap.node_used(n.name)[0] + c <= n.cpu_millis)
            ]
            assert chosen == min(feasible)  # best fit
        cap.take(p)
        held.append(p)
        for n in cap.usage():
            for d in n["devices"]:
                assert 0 <= d["used_quanta"] <= d["capacity_quanta"]
            assert not n["cpu_millis_total"] or n["cpu_millis_used"] <= n["cpu_millis_total"]
    assert cap.used_quanta == sum(p.quanta for p in held)
    for p in held:
        cap.give_back(p)
    assert cap.used_quanta == 0
    # the indexes survived all that: a fresh capacity places identically
    fresh = Capacity(nodes(*layout, cpu=cpu), Q, span=span, strategy=strategy, units=U)
    for q in range(0, 3 * Q + 1):
        a, b = cap.place(req(q)), fresh.place(req(q))
        assert (a is None) == (b is None)
        if a:
            assert a.quanta == b.quanta


def test_many_takes_rebuild_indexes():
    cap = Capacity(nodes(*[8] * 4), Q, units=U)
    taken = []
    for i in range(20000):
        p = cap.place(req(1 + i % Q))
        if p is None:
            cap.give_back(taken.pop(0))
            continue
        cap.take(p)
        taken.append(p)
    assert cap.used_quanta == sum(p.quanta for p in taken)
    assert cap._entries <= cap._entry_limit + 64


# ---------------------------------------------------------------- GPU backends and readiness
def backend_nodes(*specs):
    """specs: (gpus, backend) per node."""
    return simulated_nodes(
        [{"name": f"n{i}", "gpus": g, "gpu_memory": "8GiB", "gpu_backend": b} for i, (g, b) in enumerate(specs)],
        U,
    )


def test_mig_node_gives_one_instance_per_session():
    """CUDA enumerates one MIG instance per process: several in one container would be invisible."""
    cap = Capacity(backend_nodes((4, "mig")), Q, units=U)
    assert cap.place(req(Q)) is not None
    assert cap.place(req(2 * Q)) is None
    assert "one MIG instance per session" in cap.can_ever_fit(req(2 * Q))
    assert "whole GPUs only" in cap.can_ever_fit(req(1))
    both = Capacity(backend_nodes((4, "mig"), (2, "hami")), Q, units=U)
    assert both.place(req(2 * Q)).node == "n1"
    assert both.can_ever_fit(req(2 * Q)) is None


def test_whole_node_takes_whole_gpus_only():
    cap = Capacity(backend_nodes((2, "whole")), Q, units=U)
    assert cap.place(req(1)) is None and cap.place(req(Q + 1)) is None
    assert [s.quanta for s in cap.place(req(2 * Q)).shares] == [Q, Q]
    assert "whole GPUs only" in cap.can_ever_fit(req(1))
    assert "multiple of" in cap.can_ever_fit(req(Q + 2))


def test_mps_node_takes_no_fraction_next_to_whole_gpus():
    cap = Capacity(backend_nodes((2, "mps")), Q, units=U)
    assert cap.place(req(1)).quanta == 1
    assert cap.place(req(2 * Q)).quanta == 2 * Q
    assert cap.place(req(Q + 2)) is None
    assert "cannot enforce" in cap.can_ever_fit(req(Q + 2))
    assert Capacity(backend_nodes((2, "hami")), Q, units=U).place(req(Q + 2)).quanta == Q + 2


def test_node_not_ready_gets_no_gpu_share_but_cpu_only_sessions():
    cap = Capacity(backend_nodes((2, "hami"), (1, "hami")), Q, units=U)
    cap.set_gpu_ready("n1", False)
    assert cap.place(req(Q)).node == "n0"
    cap.set_gpu_ready("n0", False)
    assert cap.place(req(1)) is None and cap.place(req(2 * Q)) is None
    assert cap.reserve(req(1), Reservations()) is None  # nothing to wait for there either
    assert cap.place(req(0, cpu=500)) is not None  # CPU-only still runs
    assert cap.can_ever_fit(req(1)) is None  # it waits: the node may become ready
    assert [n["gpu_ready"] for n in cap.usage()] == [False, False]
    cap.set_gpu_ready("n1", True)
    assert cap.place(req(1)).node == "n1"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(st.tuples(st.integers(min_value=0, max_value=3),
                              st.sampled_from(["hami", "mps", "mig", "whole"])), min_size=1, max_size=4),
    steps=st.lists(st.tuples(st.sampled_from(["place", "place", "release", "toggle"]),
                             st.integers(min_value=0, max_value=3 * Q), st.integers(min_value=0, max_value=100)),
                   max_size=50),
)
def test_backends_and_readiness_against_brute_force(layout, steps):
    """Every placement obeys its node's backend and readiness; nothing that fits is refused."""
    ns = backend_nodes(*layout)
    cap = Capacity(ns, Q, units=U)
    ready = {n.name: True for n in ns}
    by_name = {n.name: n for n in ns}
    held = []

    def allowed(node, q):
        if q == 0:
            return True
        free = [cap.device_free(d.uuid) for d in node.devices]
        if not ready[node.name] or not free:
            return False
        if q <= Q:
            return any(f >= q for f in free) and (q == Q or node.gpu.fractions)
        k, rem = divmod(q, Q)
        if not node.gpu.multi_device or (rem and not node.gpu.mixed):
            return False
        whole = [i for i, f in enumerate(free) if f == Q]
        others = [f for i, f in enumerate(free) if i not in whole[:k]]
        return len(whole) >= k and (not rem or any(f >= rem for f in others))

    for op, q, pick in steps:
        if op == "toggle":
            name = ns[pick % len(ns)].name
            ready[name] = not ready[name]
            cap.set_gpu_ready(name, ready[name])
        elif op == "release" and held:
            cap.give_back(held.pop(pick % len(held)))
        elif op == "place":
            p = cap.place(req(q))
            if p is None:
                assert not any(allowed(n, q) for n in ns), f"{q} quanta fit somewhere but were not placed"
                continue
            node = by_name[p.node]
            assert p.quanta == q and (q == 0 or ready[node.name])
            assert node.gpu.multi_device or len(p.shares) <= 1
            assert node.gpu.fractions or all(s.quanta == Q for s in p.shares)
            assert node.gpu.mixed or len(p.shares) <= 1 or all(s.quanta == Q for s in p.shares)
            cap.take(p)
            held.append(p)


# -- the image preference ---------------------------------------------------------------------------------


def with_image(q, image="reg/bai/x:1", cpu=0):
    return Request(RequestKey("u", "s"), q, cpu, 0, image=image)


def test_an_empty_twin_that_holds_the_image_gets_the_request():
    cap = cap_of(2, 2, 2)
    assert cap.place(with_image(1)).node == "n0"  # nobody holds it: as without an image
    cap.set_node_images("n2", {"reg/bai/x:1", "reg/bai/y:1"})
    p = cap.place(with_image(1))
    assert p == Placement("n2", (Share("GPU-sim-n2-0", 1),))
    assert cap.place(with_image(2 * Q)).node == "n2"  # several GPUs
    assert cap.place(with_image(0)).node == "n2"  # CPU-only
    assert cap.place(with_image(1, image="reg/bai/z:1")).node == "n2"  # n2 now comes first among the twins
    assert cap.place(req(1)).node == "n2"
    cap.take(p)
    # n2 has a session now: its best fit is taken as it is, image or not
    cap.set_node_images("n1", {"reg/bai/w:1"})
    assert cap.place(with_image(1, image="reg/bai/w:1")).node == "n2"
    # a node that lets the image go is no longer preferred
    cap.set_node_images("n1", set())
    assert cap._holders == {"reg/bai/x:1": {2}, "reg/bai/y:1": {2}}


def test_no_preference_for_a_node_that_is_not_an_exact_twin():
    cap = Capacity(nodes(2, 2, cpu=4), Q, units=U)
    other = Capacity(simulated_nodes([{"name": "n0", "gpus": 2, "gpu_memory": "8GiB", "cpu": 4},
                                      {"name": "n1", "gpus": 2, "gpu_memory": "8GiB", "cpu": 8}], U), Q, units=U)
    other.set_node_images("n1", {"reg/bai/x:1"})
    assert other.place(with_image(1)).node == "n0"  # more CPU: not a twin
    cap.set_node_images("n1", {"reg/bai/x:1"})
    res = Reservations()
    cap.reserve(req(Q), res)  # the pass holds a device of n0 back for someone
    assert res.items[0].node == "n0"
    assert cap.place(with_image(1), res).node == "n0"  # reservations are not exchanged
    cap.set_gpu_ready("n1", False)
    assert cap.place(with_image(1)).node == "n0"
    # nodes of two pools are not twins: a request for pool "a" stays there, and so does the order
    pooled = Capacity(simulated_nodes([{"name": f"n{i}", "gpus": 2, "gpu_memory": "8GiB", "pool": pool}
                                       for i, pool in enumerate(["a", "b"])], U), Q, units=U)
    pooled.set_node_images("n1", {"reg/bai/x:1"})
    assert pooled.place(replace(with_image(1), pools=("a",))).node == "n0"
    assert pooled.place(with_image(1)).node == "n0"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=5),
    strategy=st.sampled_from(["concentrate", "spread"]),
    held=st.lists(st.lists(st.sampled_from(["a", "b"]), max_size=2), min_size=5, max_size=5),
    node_pools=st.lists(st.sampled_from(["p", "p", "q"]), min_size=5, max_size=5),
    steps=st.lists(st.tuples(st.sampled_from(["place", "place", "release"]), st.integers(0, 3 * Q),
                             st.sampled_from([0, 0, 300]), st.integers(0, 100), st.sampled_from(["a", "b", ""]),
                             st.sampled_from([(), (), ("p",), ("q",)])),
                   max_size=50),
)
def test_with_images_every_decision_is_the_one_without_under_other_names(layout, strategy, held, node_pools, steps):
    """The same requests with and without the image preference: at every step both say the same
    (fits or not, how much, on how many devices), and the names of the nodes differ only by a
    renaming of empty twins of one pool, the same renaming for every later decision."""
    def make():
        return Capacity(simulated_nodes([{"name": f"n{i}", "gpus": g, "gpu_memory": "8GiB", "cpu": 2,
                                          "pool": node_pools[i]} for i, g in enumerate(layout)], U),
                        Q, strategy=strategy, units=U)
    plain, preferring = make(), make()
    for i, images in enumerate(held[:len(layout)]):
        preferring.set_node_images(f"n{i}", {f"reg/{x}:1" for x in images})
    rename: dict[str, str] = {n.name: n.name for n in plain.nodes}  # plain's node -> preferring's
    taken = []
    pool_of = {n.name: n.pool for n in plain.nodes}
    for op, q, c, pick, image, pools in steps:
        if op == "release" and taken:
            a, b = taken.pop(pick % len(taken))
            plain.give_back(a)
            preferring.give_back(b)
            continue
        a = plain.place(replace(req(q, cpu=c), pools=pools))
        b = preferring.place(replace(with_image(q, f"reg/{image}:1" if image else "", cpu=c), pools=pools))
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert not pools or pool_of[b.node] in pools
        if b.node != rename[a.node]:
            # only an empty twin may stand in, and from now on the two are exchanged
            x, y = rename[a.node], b.node
            assert not preferring._sessions[preferring._node_idx[x]] and not preferring._sessions[preferring._node_idx[y]]
            back = {v: k for k, v in rename.items()}
            rename[a.node], rename[back[y]] = y, x
        assert b.node == rename[a.node]
        pos = {d.uuid: i for n in plain.nodes for i, d in enumerate(n.devices)}
        assert [(pos[s.device_uuid], s.quanta) for s in a.shares] == [(pos[s.device_uuid], s.quanta) for s in b.shares]
        plain.take(a)
        preferring.take(b)
        taken.append((a, b))
    assert plain.used_quanta == preferring.used_quanta

"""Scheduling benchmark: one big scheduling pass, or a replay of a churn trace.

    .venv/bin/python benchmarks/scheduler_bench.py [--nodes 1000 --gpus-per-node 8 --requests 10000] --json
    .venv/bin/python benchmarks/scheduler_bench.py --trace [PATH] --json
    .venv/bin/python benchmarks/scheduler_bench.py --trace [PATH] --images 8 --json
    .venv/bin/python benchmarks/scheduler_bench.py --quick [--trace] --json

Both modes drive the real ``Capacity`` and ``AdmissionQueue``.  The last line printed is one JSON
object with the figures.  Every placement is checked independently: a second, shadow
``Capacity`` takes (and gives back) every admitted placement, and a ``take`` that raises counts
as a placement failure; requests of up to one GPU spread over more than one device count as
split, placements smaller than the request as short.

The trace replay also scores the queue's ETA (``core.eta``): for every request that has to
wait, the estimate it is shown when it arrives against the tick it really starts (mean and p90
absolute error, in ticks), and how often a stated upper bound ("at the latest ...") was broken,
which must be never.  Sessions are stopped at ``--lifetime`` ticks (default: the longest hold in
the trace, so no session is cut short and the other figures are unchanged).

``--images N`` replays the trace twice with N kernel images (each arrival's image drawn with
Zipf-like popularity, seeded by its id; each node keeps the ``--image-slots`` images it ran
last): once with placement told which node holds which image (its tie-breaker), once without.
It prints both utilizations and how many admissions had to pull their image.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from decimal import Decimal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bai_scheduler.core.eta import QueueEta  # noqa: E402
from bai_scheduler.core.nodes import simulated_nodes  # noqa: E402
from bai_scheduler.core.model import Request, RequestKey  # noqa: E402
from bai_scheduler.core.placement import Capacity  # noqa: E402
from bai_scheduler.core.queue import AdmissionQueue, QueuePolicy  # noqa: E402
from bai_scheduler.core.units import FgpuUnits  # noqa: E402

DEFAULT_TRACE = os.path.normpath(os.path.join(ROOT, "..", "shared", "traces", "churn.jsonl"))
UNITS = FgpuUnits(fgpu_per_gpu=10, fgpu_step=1)  # 0.1 GPU = 1 quantum, as the trace README says
Q = UNITS.quanta_per_gpu
# the trace's size mix (GPUs: count of arrivals in churn.jsonl)
SIZE_MIX = {0.1: 2990, 0.2: 2029, 0.3: 999, 0.5: 2042, 1.0: 1020, 2.0: 707, 4.0: 314}


def make_nodes(n: int, gpus: int):
    return simulated_nodes(
        [{"name": f"n{i}", "gpus": gpus, "gpu_memory": "80GiB", "sm_count": 132} for i in range(n)],
        UNITS,
    )


def quanta_of(size_gpus: float) -> int:
    """A size in whole GPUs (the trace's unit) as quanta: 0.1 GPU = 1 fGPU = 1 quantum."""
    return UNITS.to_quanta(Decimal(str(size_gpus)) * UNITS.fgpu_per_gpu)


class Checker:
    """Independent check of every placement against a shadow Capacity."""

    def __init__(self, nodes):
        self.shadow = Capacity(nodes, Q, units=UNITS)
        self.failures = self.split = self.short = 0

    def admit(self, req, placement) -> bool:
        if req.quanta <= Q and len(placement.shares) > 1:
            self.split += 1
        if placement.quanta < req.quanta:
            self.short += 1
        try:
            self.shadow.take(placement)
            return True
        except ValueError:
            self.failures += 1
            return False

    def release(self, placement):
        self.shadow.give_back(placement)


def policy_from(args) -> QueuePolicy:
    return QueuePolicy(
        order=args.policy, head=args.head, skip_after=args.skip_after, reservations=args.reservations
    )


def one_pass(nodes_n, gpus, requests_n, args, seed=1):
    rng = random.Random(seed)
    sizes = list(SIZE_MIX)
    weights = list(SIZE_MIX.values())
    nodes = make_nodes(nodes_n, gpus)
    cap = Capacity(nodes, Q, span=args.span, strategy=args.strategy, units=UNITS)
    queue = AdmissionQueue(cap, policy_from(args))
    users = max(1, requests_n // 4)
    for i, size in enumerate(rng.choices(sizes, weights, k=requests_n)):
        queue.restore_pending(
            Request(RequestKey(f"user{rng.randrange(users)}", f"s{i}"), quanta_of(size), seq=i + 1)
        )
    t0 = time.perf_counter()
    admitted = queue.schedule()
    dt = time.perf_counter() - t0
    check = Checker(nodes)
    for req, placement in admitted:
        check.admit(req, placement)
    assert len(queue.pending()) + len(admitted) == requests_n
    return {
        "pass_seconds": round(dt, 4),
        "admitted": len(admitted),
        "pending_after": requests_n - len(admitted),
        "placement_failures": check.failures,
        "split_allocations": check.split,
        "short_allocations": check.short,
        "fgpu_utilization": round(cap.used_quanta / cap.total_quanta, 4),
        "us_per_request": round(dt / requests_n * 1e6, 2),
    }


def run_pass(args):
    res = {"mode": "pass", "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
           "requests": args.requests}
    res.update(one_pass(args.nodes, args.gpus_per_node, args.requests, args))
    if not args.no_10x:
        big = one_pass(args.nodes * 10, args.gpus_per_node, args.requests * 10, args)
        res["pass_seconds_10x"] = big["pass_seconds"]
        res["admitted_10x"] = big["admitted"]
        res["placement_failures"] += big["placement_failures"]
        res["split_allocations"] += big["split_allocations"]
        res["short_allocations"] += big["short_allocations"]
        res["growth_10x"] = round(big["pass_seconds"] / max(res["pass_seconds"], 1e-9), 2)
    return res


def load_trace(path, max_ticks=None):
    arrivals = {}
    last_t = 0
    with open(path) as f:
        for line in f:
            ev = json.loads(line)
            t = ev["t"]
            if max_ticks is not None and t >= max_ticks:
                break
            last_t = max(last_t, t)
            if ev["op"] == "arrive":  # the trace's depart lines are ignored: we queue
                arrivals.setdefault(t, []).append(ev)
    return arrivals, last_t + 1


class NodeImages:
    """Which images each node holds: the last ``slots`` it ran (a pull evicts the oldest)."""

    def __init__(self, cap: Capacity, slots: int, tell: bool):
        self.cap, self.slots, self.tell = cap, slots, tell
        self.held: dict[str, list[str]] = {n.name: [] for n in cap.nodes}
        self.pulls = 0

    def ran(self, node: str, image: str) -> None:
        held = self.held[node]
        if image in held:
            held.remove(image)
        else:
            self.pulls += 1
            if len(held) >= self.slots:
                held.pop(0)
        held.append(image)
        if self.tell:
            self.cap.set_node_images(node, held)


def image_of(arrival_id: int, images: int) -> str:
    """The arrival's kernel image: image k with weight 1/(k+1), the same for every run."""
    rng = random.Random(arrival_id)
    return f"registry/bai/img{rng.choices(range(images), [1 / (k + 1) for k in range(images)])[0]}:1"


def percentile(values, p):
    """The p-th percentile (nearest rank) of ``values``."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, -(-len(ranked) * p // 100) - 1))]


def eta_figures(etas: dict, started: dict, still_pending: set, ticks: int) -> dict:
    """ETA error against the replayed starts.  ``etas``: key -> (arrival tick, Eta)."""
    errors, breaks, bounds, unknown = [], 0, 0, 0
    for key, (arrived, eta) in etas.items():
        start = started.get(key)
        if eta.latest is not None:
            bounds += 1
            if (start is None and key in still_pending and eta.latest < ticks) or (
                    start is not None and start > eta.latest):
                breaks += 1
        if eta.point is None:
            unknown += 1
        elif start is not None:
            errors.append(abs(eta.point - start))
    return {
        "eta_requests": len(etas),
        "eta_mean_abs_error_ticks": round(sum(errors) / len(errors), 1) if errors else None,
        "eta_p90_abs_error_ticks": round(percentile(errors, 90), 1) if errors else None,
        "eta_bounds_stated": bounds,
        "eta_bound_breaks": breaks,
        "eta_unknown": unknown,
    }


def run_trace(args, tell_images: bool = True):
    arrivals, ticks = load_trace(args.trace, args.max_ticks)
    lifetime = args.lifetime or max((ev["hold"] for evs in arrivals.values() for ev in evs), default=1)
    nodes = make_nodes(args.trace_nodes, args.trace_gpus)
    cap = Capacity(nodes, Q, span=args.span, strategy=args.strategy, units=UNITS)
    held = NodeImages(cap, args.image_slots, tell_images) if args.images else None
    queue = AdmissionQueue(cap, policy_from(args))
    check = Checker(nodes)
    departs: dict[int, list] = {}
    info = {}  # key -> (arrival tick, hold)
    waits = []
    started = {}  # key -> tick it started
    deadlines = {}  # key -> tick its session is stopped at the latest
    departed = []  # (tick, quanta) of sessions that ended, for the ETA's estimate
    etas = {}  # key -> (arrival tick, the ETA it was shown on arrival)
    util_sum = 0.0
    peak = 0.0
    sched_time = 0.0
    decisions = 0
    perf = time.perf_counter
    placing = [0, 0.0]  # Capacity.place calls, seconds spent in them
    real_place = cap.place

    def timed_place(request, reserved=None):
        t0 = perf()
        try:
            return real_place(request, reserved)
        finally:
            placing[1] += perf() - t0
            placing[0] += 1

    cap.place = timed_place  # instance attribute: the AdmissionQueue's calls go through it

    def admitted_now(t, pairs):
        for req, placement in pairs:
            arr, hold = info[req.key]
            waits.append(t - arr)
            if held is not None:
                held.ran(placement.node, req.image)
            started[req.key] = t
            deadlines[req.key] = t + lifetime
            if check.admit(req, placement):
                departs.setdefault(t + min(hold, lifetime), []).append((req.key, placement))

    for t in range(ticks):
        for key, placement in departs.pop(t, ()):
            departed.append((t, placement.quanta))
            del deadlines[key]
            t0 = perf()
            newly = queue.release(key)
            sched_time += perf() - t0
            decisions += 1
            check.release(placement)
            admitted_now(t, newly)
        for ev in arrivals.get(t, ()):
            key = RequestKey(f"u{ev['id'] % 97}", f"s{ev['id']}")
            info[key] = (t, ev["hold"])
            t0 = perf()
            image = image_of(ev["id"], args.images) if args.images else ""
            d = queue.submit(Request(key, quanta_of(ev["size"]), image=image))
            sched_time += perf() - t0
            decisions += 1
            if d.state == "RUNNING":
                admitted_now(t, [(d.request, d.placement)])
            admitted_now(t, d.also_admitted)
            if d.state == "PENDING":
                eta = QueueEta(queue, deadlines, lifetime, departed[-args.eta_window:], t)
                etas[key] = (t, eta.eta(d.request))
        u = cap.used_quanta / cap.total_quanta
        util_sum += u
        peak = max(peak, u)
    n_arrivals = sum(len(v) for v in arrivals.values())
    # The longest any request waited: admitted ones, and those still queued at the end (a
    # starved request shows here, never in the mean wait of the admitted).
    ages = waits + [ticks - info[r.key][0] for r in queue.pending()]
    images = {}
    if held is not None:
        images = {"images": args.images, "image_slots": args.image_slots, "pulls": held.pulls}
    return {**images,
        "mode": "trace",
        "trace": os.path.relpath(args.trace, ROOT),
        "ticks": ticks,
        "arrivals": n_arrivals,
        "nodes": args.trace_nodes,
        "gpus_per_node": args.trace_gpus,
        "mean_utilization": round(util_sum / ticks, 4),
        "peak_utilization": round(peak, 4),
        "admitted": len(waits),
        "still_pending": len(queue.pending()),
        "mean_wait_ticks": round(sum(waits) / len(waits), 1) if waits else 0.0,
        "max_wait_ticks": max(ages, default=0),
        "split_allocations": check.split,
        "short_allocations": check.short,
        "placement_failures": check.failures,
        # one placement decision: a Capacity.place() call (found a spot or said no)
        "us_per_placement": round(placing[1] / max(1, placing[0]) * 1e6, 2),
        "placement_decisions": placing[0],
        # everything: all submit/release calls and the passes they run, per call and per admission
        "us_per_scheduler_call": round(sched_time / max(1, decisions) * 1e6, 2),
        "us_per_admission_all_in": round(sched_time / max(1, len(waits)) * 1e6, 2),
        "lifetime_ticks": lifetime,
        **eta_figures(etas, started, {r.key for r in queue.pending()}, ticks),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--no-10x", action="store_true", help="skip the 10x nodes and requests pass")
    ap.add_argument("--trace", nargs="?", const=DEFAULT_TRACE, default=None,
                    help=f"replay a churn trace (default path: {DEFAULT_TRACE})")
    ap.add_argument("--trace-nodes", type=int, default=20)
    ap.add_argument("--trace-gpus", type=int, default=4)
    ap.add_argument("--max-ticks", type=int, default=None, help="replay only ticks below this")
    ap.add_argument("--images", type=int, default=0,
                    help="replay with this many kernel images, with and without placement's image preference")
    ap.add_argument("--image-slots", type=int, default=3, help="images each node keeps (--images)")
    ap.add_argument("--lifetime", type=int, default=None,
                    help="trace: sessions are stopped after this many ticks (default: the longest hold)")
    ap.add_argument("--eta-window", type=int, default=50,
                    help="trace: recent departures the ETA's estimate uses")
    ap.add_argument("--policy", choices=["fifo", "drf"], default="fifo", help="queue order")
    ap.add_argument("--head", choices=["strict", "skip", "backfill"], default="backfill")
    ap.add_argument("--skip-after", type=int, default=3)
    ap.add_argument("--reservations", type=int, default=1)
    ap.add_argument("--strategy", choices=["concentrate", "spread"], default="concentrate")
    ap.add_argument("--span", choices=["whole-then-fraction", "whole-only"], default="whole-then-fraction")
    ap.add_argument("--quick", action="store_true", help="small sizes / a trace prefix (seconds)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.quick:
        if args.trace:
            args.max_ticks = args.max_ticks or 3000
        else:
            args.nodes, args.requests = min(args.nodes, 50), min(args.requests, 500)
    if args.trace and args.images:
        res = run_trace(args)
        without = run_trace(args, tell_images=False)
        res["without_image_preference"] = {k: without[k] for k in (
            "mean_utilization", "peak_utilization", "admitted", "mean_wait_ticks", "pulls")}
        res["utilization_cost"] = round(without["mean_utilization"] - res["mean_utilization"], 4)
        res["pulls_saved"] = without["pulls"] - res["pulls"]
    else:
        res = run_trace(args) if args.trace else run_pass(args)
    res["policy"] = {
        "order": args.policy, "head": args.head, "skip_after": args.skip_after,
        "reservations": args.reservations, "strategy": args.strategy, "span": args.span,
    }
    res["default_policy"] = "order=fifo head=backfill reservations=1 strategy=concentrate span=whole-then-fraction"
    if not args.json:
        for k, v in res.items():
            print(f"{k:>22}: {v}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The scheduler service's own costs (real Service, SQLite), figures for issue 13:

* ``status_ms_fifo`` / ``status_ms_drf``: right after one user cancels a request, the status of
  every one of N pending requests (what GET api/requests and the sessions page do on each
  refresh), queue positions included;
* ``loop_stall_ms``: the longest the event loop went without running while a submit waited on
  a database another connection keeps write-locked (the submit fails after ``db_timeout``);
* ``reconcile_rows_written`` / ``reconcile_ms``: one reconcile of R running sessions of which
  one container is gone (only that row may be written).

    .venv/bin/python benchmarks/service_bench.py [--pending 10000 --running 3000] --json

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bai_scheduler.core.nodes import simulated_nodes  # noqa: E402
from bai_scheduler.core.model import Placement, Request, RequestKey, Share  # noqa: E402
from bai_scheduler.core.queue import QueuePolicy  # noqa: E402
from bai_scheduler.service import ContainerFacts, Service  # noqa: E402
from bai_scheduler.store import Record, Store, StoreUnavailable  # noqa: E402
from bai_scheduler.core.units import FgpuUnits  # noqa: E402
from helpers.loopwatch import Heartbeat  # noqa: E402

UNITS = FgpuUnits(2, "0.5")


def service(path, gpus, order="fifo", timeout=5.0):
    nodes = simulated_nodes([{"name": "n0", "gpus": gpus, "gpu_memory": "8GiB"}], UNITS)
    return Service(nodes, UNITS, Store(f"sqlite:///{path}", timeout=timeout),
                            policy=QueuePolicy(order=order), admission_grace=0)


async def status_of_pending(tmp, n: int, order: str) -> tuple[float, int]:
    path = os.path.join(tmp, f"status-{order}.sqlite")
    # The queue as the database holds it (a DRF submit runs a full pass: filling a queue of
    # 10,000 one by one would take minutes), then a restart loads it.
    holder = Record("f" * 32, Request(RequestKey("holder", ""), 4, seq=1), "RUNNING",
                    Placement("n0", (Share("GPU-sim-n0-0", 4),)), admitted_at=time.time())
    queued = [Record(f"{i:032x}", Request(RequestKey(f"user{i % 97}", f"s{i}"), 1 + i % 4, seq=i + 2), "PENDING")
              for i in range(n + 5)]  # 5 are cancelled below
    Store(f"sqlite:///{path}").apply([holder, *queued], [])
    svc = service(path, gpus=1, order=order)
    best = None
    for i in range(5):  # the best of five: this machine may be busy with other work
        # As after any change: one user cancels their oldest waiting request, which moves all
        # of that user's others (under DRF their share with earlier requests granted drops).
        await svc.release(f"{i:032x}")
        t0 = time.perf_counter()
        out = svc.statuses(svc.records.values())
        ms = (time.perf_counter() - t0) * 1000
        best = ms if best is None else min(best, ms)
    ms = best
    pending = svc.pending()
    assert sorted(s["position"] for s in out if s["state"] == "PENDING") == list(range(1, len(pending) + 1))
    return ms, len(pending)


async def loop_stall(tmp, timeout: float) -> tuple[float, bool]:
    path = os.path.join(tmp, "locked.sqlite")
    svc = service(path, gpus=1, timeout=timeout)
    locked, done = threading.Event(), threading.Event()

    def hold():
        conn = sqlite3.connect(path)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        done.wait(4 * timeout + 5)
        conn.rollback()
        conn.close()

    t = threading.Thread(target=hold)
    t.start()
    locked.wait(5)
    failed = False
    try:
        async with Heartbeat(0.005) as beat:
            try:
                await svc.submit(RequestKey("u", "s"), 1)
            except StoreUnavailable:
                failed = True
    finally:
        done.set()
        t.join()
    return beat.longest * 1000, failed


async def reconcile_one_change(tmp, running: int) -> tuple[int, float]:
    svc = service(os.path.join(tmp, "reconcile.sqlite"), gpus=(running + 3) // 4)
    recs = [await svc.submit(RequestKey(f"user{i % 97}", f"s{i}"), 1) for i in range(running)]
    facts = [ContainerFacts(r.id, r.key, r.placement.node, r.placement.shares, 0, 0, "", "running")
             for r in recs[1:]]
    svc._seen.clear()
    writes = []
    apply = svc.store.apply
    svc.store.apply = lambda up, de: (writes.append(len(up) + len(de)), apply(up, de))[1]
    since = svc.begin_listing()
    t0 = time.perf_counter()
    result = await svc.reconcile({"n0": facts}, since)
    ms = (time.perf_counter() - t0) * 1000
    assert result["released"] == [str(recs[0].key)], result
    return sum(writes), ms


async def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bai-service-bench-") as tmp:
        fifo_ms, n = await status_of_pending(tmp, args.pending, "fifo")
        drf_ms, _ = await status_of_pending(tmp, args.pending, "drf")
        stall_ms, failed = await loop_stall(tmp, args.db_timeout)
        rows, rec_ms = await reconcile_one_change(tmp, args.running)
    return {
        "pending": n,
        "status_ms_fifo": round(fifo_ms, 1),
        "status_ms_drf": round(drf_ms, 1),
        "db_timeout_s": args.db_timeout,
        "locked_submit_failed_cleanly": failed,
        "loop_stall_ms": round(stall_ms, 1),
        "running": args.running,
        "reconcile_rows_written": rows,
        "reconcile_ms": round(rec_ms, 1),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", type=int, default=10_000)
    ap.add_argument("--running", type=int, default=3_000)
    ap.add_argument("--db-timeout", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.quick:
        args.pending, args.running, args.db_timeout = 1000, 300, 1.0
    res = asyncio.run(run(args))
    if not args.json:
        for k, v in res.items():
            print(f"{k:>30}: {v}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

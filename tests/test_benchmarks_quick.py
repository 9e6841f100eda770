"""Every benchmark in benchmarks/ runs in its short mode (--quick --json) and its
correctness targets hold. Timings are printed, never asserted: they depend on
the machine (and on whatever else it runs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TRACE = ROOT.parent / "shared" / "traces" / "churn.jsonl"


def run_bench(name: str, *args: str, timeout: float = 600) -> dict:
    cmd = [sys.executable, str(BENCH / name), "--quick", "--json", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing:\n{out.stderr[-2000:]}"
    result = json.loads(lines[-1])
    print(f"\n{name} {' '.join(args)}: {lines[-1]}")
    return result


def check_scheduler(res: dict):
    assert res["placement_failures"] == 0, res
    assert res["short_allocations"] == 0, res
    if res["mode"] == "pass":
        assert res["admitted"] + res["pending_after"] == res["requests"], res
    else:  # the queue ETA: a stated upper bound is never broken
        assert res["eta_bounds_stated"] > 0 and res["eta_bound_breaks"] == 0, res


def check_admission(res: dict):
    # The benchmark raises unless every release admitted the waiting head.
    assert res["releases"] > 0 and res["p99_ms"] >= res["p50_ms"] >= 0, res


def check_service(res: dict):
    assert res["pending"] > 0 and res["locked_submit_failed_cleanly"], res
    assert res["reconcile_rows_written"] == 1, res  # one container gone: one row, nothing else rewritten


def check_load(res: dict):
    assert res["served"] == res["sessions"], res
    assert res["lost"] == 0 and res["failed"] == 0, res
    assert res["duplicates"] == 0, res
    assert 0 < res["max_concurrent"] <= res["capacity"], res
    assert res["max_concurrent_scheduler"] <= res["capacity"], res
    assert res["max_concurrent_containers"] <= res["capacity"], res
    assert res["leftover_requests"] == 0 and res["leftover_containers"] == 0, res
    assert res["p99_ms"] is not None


def check_spawn(res: dict):
    assert res["bai_median_s"] > 0 and res["dockerspawner_median_s"] > 0, res
    assert len(res["bai_s"]) == len(res["dockerspawner_s"]) == res["runs"], res
    assert res["ratio"] == pytest.approx(res["bai_median_s"] / res["dockerspawner_median_s"], rel=0.01), res


def check_chaos(res: dict):
    assert res["actions"] >= 20 and res["launched"] > 0, res
    assert res["lost"] == 0 and res["double_allocated"] == 0 and res["leaked_shares"] == 0, res["details"]
    assert res["settled"], res


# name -> (extra args, check, marks, timeout)
KNOWN = {
    "scheduler_bench.py": ((), check_scheduler, (), 300),
    "admission_bench.py": ((), check_admission, (), 300),
    "service_bench.py": ((), check_service, (), 300),
    "load_bench.py": ((), check_load, (pytest.mark.docker, pytest.mark.hub, pytest.mark.slow), 600),
    "spawn_bench.py": ((), check_spawn, (pytest.mark.docker, pytest.mark.hub, pytest.mark.slow), 600),
    # Its own second dockerd (bai-test-chaos), which it stops and starts: never the main engine.
    "chaos_bench.py": ((), check_chaos, (pytest.mark.docker, pytest.mark.hub, pytest.mark.slow), 1200),
}


def cases():
    out = []
    for path in sorted(BENCH.glob("*.py")):
        args, check, marks, timeout = KNOWN.get(path.name, ((), None, (), 600))
        out.append(pytest.param(path.name, args, check, timeout, marks=list(marks), id=path.stem))
    if TRACE.exists():
        out.append(pytest.param("scheduler_bench.py", ("--trace",), check_scheduler, 300, id="scheduler_bench-trace"))
    return out


@pytest.mark.parametrize("name, args, check, timeout", cases())
def test_benchmark_quick(name, args, check, timeout, request):
    if name in ("load_bench.py", "spawn_bench.py", "chaos_bench.py"):
        request.getfixturevalue("kernel_images")
    res = run_bench(name, *args, timeout=timeout)
    if check is not None:
        check(res)

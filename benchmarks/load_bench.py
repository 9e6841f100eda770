#!/usr/bin/env python3
"""Load: many concurrent launches through the hub's REST API on little capacity.

Starts a real hub (JupyterHub + configurable-http-proxy + the bai-scheduler
service + the local Docker engine, as the tests do) whose simulated GPUs hold
exactly ``--capacity`` sessions, launches ``--sessions`` named servers at once
(spread over several users: JupyterHub caps named servers per user), stops each
one as soon as it is ready, and goes on until every session has run once.

While it runs it samples the scheduler (RUNNING requests) and the engine
(running session containers) and times the hub API calls it makes. Prints one
JSON object last:

  served          sessions that became ready (target: all)
  lost            sessions that never ran (target 0)
  failed          spawns that ended with an error (counted in lost)
  duplicates      sessions seen with two containers or two admissions (target 0)
  max_concurrent  most sessions holding capacity at once, from the scheduler and
                  the engine (target: never above capacity)
  p99_ms          99th percentile of the hub API's answer time under that load
                  (its GET calls: the driver's polls and a steady dashboard-like
                  reader; a POST start waits up to JupyterHub's slow_spawn_timeout
                  and a DELETE up to slow_stop_timeout by design, so those are
                  reported apart as start_call_* and stop_call_*)

    .venv/bin/python benchmarks/load_bench.py --sessions 100 --capacity 10 --json
    .venv/bin/python benchmarks/load_bench.py --quick --json     # 8 sessions on capacity 4
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers import KERNEL_IMAGE  # noqa: E402
from helpers.hub import Hub, docker  # noqa: E402

from bai_scheduler.contract import labels as L  # noqa: E402

IMAGE = KERNEL_IMAGE  # follows BAI_IMAGE_PREFIX, as bai-images names it
PER_USER = 10  # JupyterHub's named_server_limit_per_user is 16 in hub_config


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


class Load:
    def __init__(self, hub: Hub, sessions: int, capacity: int, fgpu: str, timeout: float, log=print):
        self.hub, self.n, self.capacity, self.fgpu, self.timeout, self.log = hub, sessions, capacity, fgpu, timeout, log
        users = (sessions + PER_USER - 1) // PER_USER
        self.users = [f"load{u}" for u in range(users)]
        self.keys = [(self.users[i // PER_USER], f"s{i % PER_USER}") for i in range(sessions)]
        self.options = {"image": IMAGE, "fgpu": fgpu, "cpu": "0.25", "memory": "0.5"}
        self.lock = threading.Lock()
        self.api_ms: list[float] = []   # reads (GET): the hub API's answer time
        self.stop_ms: list[float] = []  # DELETE: waits for the stop, up to slow_stop_timeout
        self.start_ms: list[float] = []
        self.start_codes: dict[str, int] = {}
        self.ready_at: dict[tuple, float] = {}
        self.stop_sent: set = set()
        self.failed: dict[tuple, str] = {}
        self.containers_seen: dict[tuple, set] = {}
        self.admissions_seen: dict[tuple, set] = {}
        self.max_sched = 0
        self.max_docker = 0
        self.samples = 0
        self.done = threading.Event()
        self.http = threading.local()

    # -- timed hub API ---------------------------------------------------------------------------

    def session(self) -> requests.Session:
        s = getattr(self.http, "s", None)
        if s is None:
            s = self.http.s = requests.Session()
            s.headers["Authorization"] = f"token {self.hub.admin_token}"
        return s

    def api(self, method, path, record=True, **kw):
        t0 = time.perf_counter()
        r = self.session().request(method, f"{self.hub.url}/hub/api{path}", timeout=120, **kw)
        ms = (time.perf_counter() - t0) * 1000
        if record:
            with self.lock:
                (self.api_ms if method == "GET" else self.stop_ms).append(ms)
        return r, ms

    # -- the run ---------------------------------------------------------------------------------

    def start_one(self, key):
        user, server = key
        r, ms = self.api("POST", f"/users/{user}/servers/{server}", record=False, json=self.options)
        with self.lock:
            self.start_ms.append(ms)
            self.start_codes[str(r.status_code)] = self.start_codes.get(str(r.status_code), 0) + 1
        if r.status_code not in (201, 202):
            with self.lock:
                self.failed[key] = f"start answered {r.status_code}: {r.text[:200]}"

    def sample(self):
        """Scheduler and engine views; remembers every admission and container per session."""
        try:
            reqs = self.hub.service("GET", "api/requests").json()["requests"]
        except (requests.RequestException, ValueError):
            reqs = None
        if reqs is not None:
            running = [r for r in reqs if r["state"] == "RUNNING" and r["quanta"] > 0]
            with self.lock:
                self.max_sched = max(self.max_sched, len(running))
                for r in running:
                    self.admissions_seen.setdefault((r["user"], r["server"]), set()).add(r["id"])
        out = docker("ps", "--filter", f"name=^/{self.hub.prefix}", "--filter", "status=running",
                     "--format", '{{.ID}}\t{{.Label "' + L.USER + '"}}\t{{.Label "' + L.SERVER + '"}}')
        if out.returncode == 0:
            rows = [line.split("\t") for line in out.stdout.splitlines() if line.strip()]
            with self.lock:
                self.max_docker = max(self.max_docker, len(rows))
                for cid, user, server in rows:
                    self.containers_seen.setdefault((user, server), set()).add(cid)
        self.samples += 1

    def sampler(self):
        while not self.done.is_set():
            self.sample()
            time.sleep(0.2)

    def prober(self):
        """A steady reader, like a dashboard: its answer times are part of p99."""
        i = 0
        while not self.done.is_set():
            self.api("GET", f"/users/{self.users[i % len(self.users)]}")
            i += 1
            time.sleep(0.25)

    def run(self) -> dict:
        for u in self.users:
            r, _ = self.api("POST", f"/users/{u}", record=False, json={})
            assert r.status_code in (201, 409), r.text
        threads = [threading.Thread(target=self.sampler, daemon=True), threading.Thread(target=self.prober, daemon=True)]
        for t in threads:
            t.start()
        t0 = time.time()
        starters = ThreadPoolExecutor(max_workers=self.n)
        for key in self.keys:
            starters.submit(self.start_one, key)
        stoppers = ThreadPoolExecutor(max_workers=16)
        deadline = t0 + self.timeout
        last_note = 0.0
        try:
            while time.time() < deadline:
                r, _ = self.api("GET", "/users")
                models = {u["name"]: u for u in r.json() if u["name"] in self.users}
                for key in self.keys:
                    user, server = key
                    s = models.get(user, {}).get("servers", {}).get(server)
                    if key in self.ready_at or key in self.failed:
                        continue
                    if s and s.get("ready"):
                        self.ready_at[key] = time.time() - t0
                        self.stop_sent.add(key)
                        stoppers.submit(self.api, "DELETE", f"/users/{user}/servers/{server}")
                    elif s is None and self.start_codes and key in self.started_keys():
                        # Gone without having been ready: its spawn failed.
                        self.failed[key] = self.failure_message(user, server)
                active = sum(1 for u in models.values() for s in u.get("servers", {}).values())
                if len(self.ready_at) + len(self.failed) == self.n and active == 0:
                    break
                if time.time() - last_note > 10:
                    last_note = time.time()
                    self.log(f"[load] t={time.time() - t0:5.0f}s served={len(self.ready_at)} failed={len(self.failed)} "
                             f"active={active} max_sched={self.max_sched} max_docker={self.max_docker}")
                time.sleep(0.3)
        finally:
            starters.shutdown(wait=True)
            stoppers.shutdown(wait=True)
            self.done.set()
            for t in threads:
                t.join(5)
        duration = time.time() - t0
        self.sample()
        leftover_requests = len(self.hub.requests())
        leftover_containers = len([c for c in self.hub.containers() if c["State"]["Running"]])
        duplicates = sorted({f"{u}/{s}" for (u, s), ids in self.containers_seen.items() if len(ids) > 1} |
                            {f"{u}/{s}" for (u, s), ids in self.admissions_seen.items() if len(ids) > 1})
        served = len(self.ready_at)
        return {
            "sessions": self.n,
            "capacity": self.capacity,
            "users": len(self.users),
            "served": served,
            "lost": self.n - served,
            "failed": len(self.failed),
            "duplicates": len(duplicates),
            "duplicate_sessions": duplicates[:10],
            "max_concurrent": max(self.max_sched, self.max_docker),
            "max_concurrent_scheduler": self.max_sched,
            "max_concurrent_containers": self.max_docker,
            "samples": self.samples,
            "p50_ms": round(percentile(self.api_ms, 50), 1),
            "p99_ms": round(percentile(self.api_ms, 99), 1),
            "max_ms": round(max(self.api_ms), 1),
            "api_calls": len(self.api_ms),
            "stop_call_p50_ms": round(percentile(self.stop_ms, 50), 1) if self.stop_ms else None,
            "stop_call_p99_ms": round(percentile(self.stop_ms, 99), 1) if self.stop_ms else None,
            "start_call_p50_ms": round(percentile(self.start_ms, 50), 1),
            "start_call_p99_ms": round(percentile(self.start_ms, 99), 1),
            "start_codes": self.start_codes,
            "duration_s": round(duration, 1),
            "sessions_per_min": round(served / duration * 60, 1) if duration else None,
            "leftover_requests": leftover_requests,
            "leftover_containers": leftover_containers,
            "failures": dict(list({f"{u}/{s}": m for (u, s), m in self.failed.items()}.items())[:5]),
            "targets": {"served": self.n, "lost": 0, "duplicates": 0, "max_concurrent_at_most": self.capacity},
        }

    def started_keys(self):
        # A server only counts as gone-without-ready once its POST has answered.
        return set(self.keys) if sum(self.start_codes.values()) == self.n else set()

    def failure_message(self, user, server) -> str:
        try:
            r, _ = self.api("GET", f"/users/{user}/servers/{server}/progress", record=False,
                            headers={"Accept": "text/event-stream"})
            return r.text[-300:]
        except requests.RequestException as e:
            return str(e)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--capacity", type=int, default=10, help="sessions that fit at once")
    ap.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    ap.add_argument("--quick", action="store_true", help="8 sessions on capacity 4 (for the test suite)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line (progress goes to stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the hub's work folder")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.capacity, args.timeout = 8, 4, min(args.timeout, 600)
    # Sessions of 1 fGPU, two per simulated GPU (2 fGPU each); an odd capacity uses whole GPUs.
    if args.capacity % 2 == 0:
        fgpu, gpus = "1", args.capacity // 2
    else:
        fgpu, gpus = "2", args.capacity
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    work = Path(tempfile.mkdtemp(prefix="bai-load-"))
    hub = Hub(work, nodes=[{"name": "local", "docker_url": "", "gpus": gpus, "gpu_memory": "8GiB"}])
    try:
        hub.start(timeout=120)
        result = Load(hub, args.sessions, args.capacity, fgpu, args.timeout, log).run()
        result["fgpu_per_session"] = fgpu
        result["simulated_gpus"] = gpus
    finally:
        hub.stop()
        hub.cleanup()
        if not args.keep:
            shutil.copy(hub.log_path, ROOT / "test-artifacts" / "load-bench-hub.log") \
                if (ROOT / "test-artifacts").is_dir() and hub.log_path.exists() else None
            shutil.rmtree(work, ignore_errors=True)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

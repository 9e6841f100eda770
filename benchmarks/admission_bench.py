#!/usr/bin/env python3
"""Admission latency of the running bai-scheduler service with a real database.

Starts the service (its real HTTP API, SQLite or --db-url), fills the capacity,
queues more requests, then repeatedly releases a running session and measures
the time from sending the release to the waiting spawner's long-poll returning
with the next request admitted.  Prints one JSON object as its last line:
p50_ms, p99_ms (target: p99 under 50 ms).

    .venv/bin/python benchmarks/admission_bench.py --releases 300 --json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
c = get_config()
c.BaiScheduler.db_url = {db!r}
c.BaiScheduler.fgpu_per_gpu = 2
c.BaiScheduler.fgpu_step = "0.5"
c.BaiScheduler.nodes = [{{"name": "bench", "docker_url": "", "gpus": {gpus}, "gpu_memory": "8GiB"}}]
"""


async def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bai-bench-"))
    port = free_port()
    token = secrets.token_hex(16)
    db = args.db_url or f"sqlite:///{tmp / 'bench.sqlite'}"
    (tmp / "config.py").write_text(CONFIG.format(db=db, gpus=args.gpus))
    env = dict(os.environ, JUPYTERHUB_API_TOKEN=token, JUPYTERHUB_SERVICE_URL=f"http://127.0.0.1:{port}",
               JUPYTERHUB_SERVICE_PREFIX="/services/bai-scheduler/",
               JUPYTERHUB_API_URL="http://127.0.0.1:9/hub/api", JUPYTERHUB_CLIENT_ID="service-bai-scheduler",
               JUPYTERHUB_OAUTH_CALLBACK_URL="/services/bai-scheduler/oauth_callback",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "bai_scheduler.app", f"--config={tmp / 'config.py'}"],
                            env=env, cwd=tmp, stdout=open(tmp / "service.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/services/bai-scheduler/api"
    AsyncHTTPClient.configure(None, max_clients=64)
    http = AsyncHTTPClient()
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}

    async def call(method, path, body=None, timeout=30):
        r = await http.fetch(base + path, method=method, headers=headers, request_timeout=timeout,
                             body=None if body is None else json.dumps(body), allow_nonstandard_methods=True,
                             raise_error=False)
        if r.code >= 400:
            raise RuntimeError(f"{method} {path}: {r.code} {r.body[:200]!r}")
        return json.loads(r.body) if r.body else {}

    try:
        for _ in range(100):
            try:
                await call("GET", "/health")
                break
            except (OSError, RuntimeError):
                await asyncio.sleep(0.1)
        capacity = args.gpus * 2  # 1-fGPU sessions per GPU
        running = []
        pending = []
        n = 0

        async def submit():
            nonlocal n
            n += 1
            name = f"s{n}"
            st = await call("PUT", f"/requests/bench/{name}",
                            {"quanta": 2, "cpu_millis": 0, "memory_bytes": 0, "image": "img", "user_options": {}})
            (running if st["state"] == "RUNNING" else pending).append((name, st))

        for _ in range(capacity + args.queue):
            await submit()
        assert len(running) == capacity and len(pending) == args.queue, (len(running), len(pending))
        latencies = []
        for _ in range(args.releases):
            head, head_status = pending.pop(0)
            attempt = head_status["id"]
            status = await call("GET", f"/attempts/{attempt}/wait?epoch={head_status['epoch'] - 1}&timeout=0")
            waiter = asyncio.ensure_future(call("GET", f"/attempts/{attempt}/wait?epoch={status['epoch']}&timeout=10"))
            await asyncio.sleep(0.002)  # the long-poll is open on the service
            _, victim = running.pop(0)
            t0 = time.perf_counter()
            await call("DELETE", f"/attempts/{victim['id']}")
            status = await waiter
            latencies.append((time.perf_counter() - t0) * 1000)
            if status["state"] != "RUNNING":
                raise RuntimeError(f"head not admitted after release: {status}")
            running.append((head, status))
            await submit()  # keep the queue as long as it was
        latencies.sort()
        return {
            "releases": len(latencies),
            "db": "postgresql" if db.startswith("postgresql") else "sqlite",
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 2),
            "max_ms": round(latencies[-1], 2),
            "target_p99_ms": 50,
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--releases", type=int, default=300)
    ap.add_argument("--queue", type=int, default=20)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--db-url", default="")
    ap.add_argument("--quick", action="store_true", help="a short run for the test suite")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.releases, args.queue = 30, 5
    result = asyncio.run(run(args))
    if not args.json:
        for k, v in result.items():
            print(f"{k:>14}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

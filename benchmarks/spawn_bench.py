#!/usr/bin/env python3
"""Spawn speed: BaiSpawner against plain DockerSpawner, same image, alternating.

Starts two real hubs side by side (JupyterHub + configurable-http-proxy + the
bai-scheduler service, as the tests do): one with BaiSpawner (the deployment's
hub_config), one with ``spawner_class = "docker"`` and the same DockerSpawner
settings (image, host_ip, remove, name template, home volume, command, CPU and
memory limits). Capacity is free, so BaiSpawner's extra work is the catalog
check, registering with the scheduler, the admission and the GPU spec.

Each run times POST /hub/api/users/<u>/server until the server is ready (the
POST's own answer when it is 201, else the first poll that sees it ready), then
stops it and waits until it is gone. The two spawners alternate; one warm-up
start each is not counted. Prints one JSON object last:

  bai_median_s, dockerspawner_median_s, ratio (= bai / docker; target ≤ 1.10)

    .venv/bin/python benchmarks/spawn_bench.py --json            # 5 runs each
    .venv/bin/python benchmarks/spawn_bench.py --quick --json    # 2 runs each
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import KERNEL_IMAGE  # noqa: E402
from helpers.hub import Hub  # noqa: E402

IMAGE = KERNEL_IMAGE  # follows BAI_IMAGE_PREFIX, as bai-images names it
CPU, MEMORY_GIB = "0.5", "1"
BAI_OPTIONS = {"image": IMAGE, "fgpu": "1", "cpu": CPU, "memory": MEMORY_GIB}
USER = "spawnbench"


def docker_hub(work: Path) -> Hub:
    """A hub whose spawner is plain DockerSpawner, configured like BaiSpawner's defaults."""
    hub = Hub(work)
    p = hub.prefix
    hub.env["BAI_TEST_EXTRA"] = json.dumps({
        "JupyterHub": {"spawner_class": "docker"},
        "DockerSpawner": {
            "image": IMAGE,
            "host_ip": "127.0.0.1",
            "remove": True,
            "pull_policy": "never",
            "name_template": p + "{username}--{servername}",
            "volumes": {p + "home-{username}": "/home/jovyan"},
            "notebook_dir": "/home/jovyan",
            "cmd": ["jupyterhub-singleuser"],
            "cpu_limit": float(CPU),
            "mem_limit": f"{MEMORY_GIB}G",
            "http_timeout": 120,
            "start_timeout": 120,
        },
    })
    return hub


def time_start(hub: Hub, options: dict | None, poll: float = 0.05, labels: dict | None = None) -> float:
    t0 = time.perf_counter()
    r = hub.api("POST", f"/users/{USER}/server", json=options or {})
    if r.status_code == 201:
        took = time.perf_counter() - t0
    elif r.status_code == 202:
        while True:
            s = hub.servers(USER).get("")
            if s and s.get("ready"):
                took = time.perf_counter() - t0
                break
            if not s or not s.get("pending"):
                raise RuntimeError(f"spawn failed: {hub.api('GET', f'/users/{USER}/server/progress').text[-400:]}\n"
                                   f"{hub.tail(30)}")
            if time.perf_counter() - t0 > 180:
                raise RuntimeError("spawn took over 180 s")
            time.sleep(poll)
    else:
        raise RuntimeError(f"start answered {r.status_code}: {r.text[:300]}")
    if labels is not None:  # which spawner made it (checked once, after timing)
        labels.update(hub.containers()[0]["Config"]["Labels"] or {})
    assert hub.stop_server(USER).status_code in (202, 204)
    hub.wait_gone(USER)
    hub.wait_for(lambda: not hub.containers(), 60, 0.2, what="container removed")
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed starts per spawner")
    ap.add_argument("--quick", action="store_true", help="2 runs each (for the test suite)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line (progress goes to stderr)")
    args = ap.parse_args()
    if args.quick:
        args.runs = 2
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    work = Path(tempfile.mkdtemp(prefix="bai-spawn-bench-"))
    bai = Hub(work / "bai")
    plain = docker_hub(work / "docker")
    hubs = {"bai": (bai, BAI_OPTIONS), "dockerspawner": (plain, None)}
    times: dict[str, list[float]] = {"bai": [], "dockerspawner": []}
    try:
        for name, (hub, _) in hubs.items():
            hub.start(timeout=120)
            hub.add_user(USER)
        for name, (hub, opts) in hubs.items():  # warm-up: first volume, first container
            lab: dict = {}
            log(f"[spawn] warm-up {name}: {time_start(hub, opts, labels=lab):.2f}s")
            made_by_bai = "org.bai-hub.request-id" in lab
            assert made_by_bai == (name == "bai"), f"{name} hub: the container was not made by the expected spawner"
        for i in range(args.runs):
            order = ["bai", "dockerspawner"] if i % 2 == 0 else ["dockerspawner", "bai"]
            for name in order:
                hub, opts = hubs[name]
                t = time_start(hub, opts)
                times[name].append(t)
                log(f"[spawn] run {i + 1} {name}: {t:.2f}s")
    finally:
        for hub, _ in hubs.values():
            hub.stop()
            hub.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    b, d = statistics.median(times["bai"]), statistics.median(times["dockerspawner"])
    result = {
        "runs": args.runs,
        "image": IMAGE,
        "bai_median_s": round(b, 3),
        "dockerspawner_median_s": round(d, 3),
        "ratio": round(b / d, 3),
        "target_ratio": 1.10,
        "bai_s": [round(t, 3) for t in times["bai"]],
        "dockerspawner_s": [round(t, 3) for t in times["dockerspawner"]],
        "bai_options": BAI_OPTIONS,
    }
    if not args.json:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

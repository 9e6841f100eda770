#!/usr/bin/env python3
"""Chaos on the real stack: sessions launched and stopped through a real hub (JupyterHub,
configurable-http-proxy, the bai-scheduler service, BaiSpawner) while containers are killed,
paused and removed, the service and the hub are restarted, and the node's dockerd is stopped
for a few seconds.  Then the invariants are checked against the engine.

The node is a second dockerd of this benchmark's own (``bai-test-chaos``, bridge 172.30.79.0/24,
tests/helpers/engine.py ``ExtraEngine``) with 2 simulated GPUs of 2 fGPU: the machine's main
engine, where others' containers live, is never stopped.  Sessions ask for 1 fGPU, so at most
four run and the rest queue.

Actions (seeded, ``--seed``; each kind at least once): launch, stop, kill a container, pause one (unpaused an action or
two later, like a snapshot), remove one, SIGKILL the service (the hub restarts it), restart the
hub, stop the node's dockerd for a few seconds.  Launches and stops run in the background, so
they interleave with the rest.  (JupyterHub itself answers 500 to a launch whose spawn is stopped
or whose container dies while the hub still holds the POST: counted in ``launch_answers``.)  After every action the scheduler's view is sampled: no device
may hold more quanta than it has (counting STOPPING attempts, which keep their shares).

At the end: everything unpaused, the engine up, spawns settled.  Then
  * ``double_allocated``: devices over-committed, in any sample or on the engine at the end;
  * ``leaked_shares``: attempts holding a share with no container on the engine, and running
    containers with no attempt holding their share, once settled;
  * ``lost``: sessions queued at the end that are never admitted once the running ones are
    stopped, and servers the hub still starts that the scheduler does not know;
  * after every server is stopped, shares still held or containers left count as leaked.
The last line is one JSON object:
  {"actions": ..., "launched": ..., "lost": 0, "double_allocated": 0, "leaked_shares": 0, ...}

    .venv/bin/python benchmarks/chaos_bench.py --json            # 60 actions
    .venv/bin/python benchmarks/chaos_bench.py --quick --json    # 24 actions (the suite runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bai_scheduler.contract import labels  # noqa: E402
from helpers import KERNEL_IMAGE  # noqa: E402
from helpers.engine import ExtraEngine  # noqa: E402
from helpers.hub import Hub  # noqa: E402

ENGINE_NAME, ENGINE_OCTET = "bai-test-chaos", 79  # an octet no test uses (node2: 77, regnode: 78)
ONE = {"image": KERNEL_IMAGE, "fgpu": "1", "cpu": "0.25", "memory": "0.5"}
USERS = ("chaosa", "chaosb")
SERVERS = "abcde"
ACTIONS = {  # action: weight
    "launch": 6, "stop": 3, "kill": 2, "pause": 1, "remove": 1,
    "restart_service": 1, "restart_hub": 1, "stop_engine": 1,
}


def log(*a):
    print(f"[chaos {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


class Chaos:
    def __init__(self, hub: Hub, engine: ExtraEngine, rng: random.Random):
        self.hub, self.engine, self.rng = hub, engine, rng
        self.pool = ThreadPoolExecutor(4)
        self.pending = []  # background launches and stops
        self.paused: list[tuple[str, int]] = []  # (container id, actions left before unpausing)
        self.counts = Counter()
        self.launch_codes = Counter()
        self.over_samples: list[dict] = []

    # -- observing ------------------------------------------------------------------

    def containers(self, running_only=False) -> list[dict]:
        out = [c for c in self.hub.containers(self.engine.url) if labels.REQUEST_ID in c["Config"]["Labels"]]
        return [c for c in out if c["State"]["Running"]] if running_only else out

    def views(self):
        """(capacity, {user/server: status}) from the scheduler, or None while it is away."""
        try:
            cap = self.hub.service("GET", "api/capacity")
            if cap.status_code != 200:
                return None
            return cap.json(), self.hub.requests()
        except (requests.RequestException, ValueError, KeyError):
            return None

    def active(self) -> dict:
        """The hub's active servers of our users: {(user, server): model}."""
        out = {}
        for u in USERS:
            try:
                for s, m in self.hub.servers(u).items():
                    out[(u, s)] = m
            except (requests.RequestException, ValueError):
                pass
        return out

    @staticmethod
    def over_committed(cap, reqs) -> dict:
        """Devices whose share-holding attempts (RUNNING or STOPPING) hold more than they have."""
        capacity = {d["uuid"]: d["quanta"] for n in cap["nodes"] for d in n["devices"]}
        used = defaultdict(int)
        for r in reqs.values():
            if r["state"] in ("RUNNING", "STOPPING") and r.get("placement"):
                for s in r["placement"]["shares"]:
                    used[s["device"]] += s["quanta"]
        over = {d: q - capacity.get(d, 0) for d, q in used.items() if q > capacity.get(d, 0)}
        over.update({d: q for d, q in (cap.get("overcommitted") or {}).items() if q})
        return over

    def sample(self):
        v = self.views()
        if v is not None:
            over = self.over_committed(*v)
            if over:
                log("over-committed:", over)
                self.over_samples.append(over)

    # -- acting ---------------------------------------------------------------------

    def background(self, fn, *args):
        self.pending.append(self.pool.submit(fn, *args))

    def launch(self):
        busy = set(self.active())
        free = [(u, s) for u in USERS for s in SERVERS if (u, s) not in busy]
        if not free:
            return self.stop()
        u, s = self.rng.choice(free)

        def go():
            try:
                r = self.hub.start_server(u, s, ONE)
                self.launch_codes[r.status_code] += 1
                if r.status_code >= 400:
                    log(f"launch {u}/{s}: {r.status_code} {r.text[:200]}")
            except requests.RequestException as e:
                self.launch_codes[type(e).__name__] += 1
        self.background(go)
        return f"{u}/{s}"

    def stop(self):
        busy = list(self.active())
        if not busy:
            return None
        u, s = self.rng.choice(busy)

        def go():
            try:
                self.hub.stop_server(u, s)
            except requests.RequestException:
                pass
        self.background(go)
        return f"{u}/{s}"

    def _container(self, running=True):
        cs = [c for c in self.containers(running_only=running)
              if not c["State"].get("Paused") and c["Id"] not in {p for p, _ in self.paused}]
        return self.rng.choice(cs) if cs else None

    def kill(self):
        c = self._container()
        if c:
            self.engine.docker("kill", c["Id"])
            return c["Name"]

    def pause(self):
        c = self._container()
        if c:
            self.engine.docker("pause", c["Id"])
            self.paused.append((c["Id"], self.rng.randint(1, 2)))
            return c["Name"]

    def remove(self):
        c = self._container(running=False)
        if c:
            self.engine.docker("rm", "-f", c["Id"])
            return c["Name"]

    def restart_service(self):
        pids = self.hub.service_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        # The hub restarts its managed service; what comes next meets the new one.
        wait(lambda: self.hub.service_pids() and self.hub.service("GET", "api/health").status_code == 200,
             120, "the service back")
        return pids

    def restart_hub(self):
        self.hub.stop()
        self.hub.start(timeout=180)

    def stop_engine(self):
        self.unpause_all()
        self.engine.stop()
        time.sleep(self.rng.uniform(2, 6))
        self.engine.start()

    def unpause(self, due_only=True):
        keep = []
        for cid, left in self.paused:
            if due_only and left > 0:
                keep.append((cid, left - 1))
            else:
                self.engine.docker("unpause", cid)
        self.paused = keep

    def unpause_all(self):
        self.unpause(due_only=False)

    def plan(self, n: int) -> list[str]:
        """``n`` actions, weighted at random, with every kind at least once (in random places)."""
        kinds = list(ACTIONS)
        out = kinds + self.rng.choices(kinds, weights=list(ACTIONS.values()), k=max(0, n - len(kinds)))
        self.rng.shuffle(out)
        return out

    def act(self, what: str):
        self.unpause()
        about = getattr(self, what)()
        self.counts[what] += 1
        log(what, about or "")
        time.sleep(self.rng.uniform(0.2, 2.5))
        self.sample()

    def finish_background(self):
        for f in self.pending:
            f.result()
        self.pending = []


def wait(predicate, timeout, what, interval=1.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if predicate():
                return True
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(interval)
    log("gave up waiting:", what)
    return False


def settled(chaos: Chaos):
    """Every active server is ready or queued; no attempt is STOPPING; the hub's and the
    scheduler's views agree."""
    v = chaos.views()
    if v is None:
        return False
    _, reqs = v
    if any(r["state"] == "STOPPING" for r in reqs.values()):
        return False
    for (u, s), m in chaos.active().items():
        r = reqs.get(f"{u}/{s}")
        if m.get("pending") == "stop" or (m.get("pending") and not (r and r["state"] == "PENDING")):
            return False
    return True


def end_check(chaos: Chaos) -> dict:
    """Invariants against the engine, counted (not asserted)."""
    cap, reqs = chaos.views()
    over = chaos.over_committed(cap, reqs)
    # The engine's own view: quanta by device from the running containers' labels.
    capacity = {d["uuid"]: d["quanta"] for n in cap["nodes"] for d in n["devices"]}
    on_engine = defaultdict(int)
    running = chaos.containers(running_only=True)
    for c in running:
        lab = c["Config"]["Labels"]
        devs = [d for d in lab.get(labels.DEVICES, "").split(",") if d]
        quanta = [int(q) for q in lab.get(labels.QUANTA, "").split(",") if q]
        for d, q in zip(devs, quanta):
            on_engine[d] += q
    over.update({d: q - capacity.get(d, 0) for d, q in on_engine.items() if q > capacity.get(d, 0)})
    holding = {r["id"]: k for k, r in reqs.items() if r["state"] in ("RUNNING", "STOPPING")}
    container_ids = {c["Config"]["Labels"][labels.REQUEST_ID] for c in running}
    leaked = [k for i, k in holding.items() if i not in container_ids]
    leaked += [c["Name"] for c in running if c["Config"]["Labels"][labels.REQUEST_ID] not in holding]
    active = chaos.active()
    unknown = [f"{u}/{s}" for (u, s), m in active.items() if m.get("pending") and f"{u}/{s}" not in reqs]
    return {"over": over, "leaked": leaked, "unknown": unknown,
            "queued": sorted(k for k, r in reqs.items() if r["state"] == "PENDING")}


def drain(chaos: Chaos, queued: list[str], timeout: float) -> tuple[list[str], list[str]]:
    """Stop what runs so that every queued session is admitted and starts; then stop all.
    Returns (lost, left): queued sessions never admitted, shares or containers left at the end."""
    hub = chaos.hub
    waiting, lost = set(queued), []
    end = time.time() + timeout
    while waiting and time.time() < end:
        for (u, s), m in chaos.active().items():
            if m.get("ready"):
                waiting.discard(f"{u}/{s}")
                hub.stop_server(u, s)
        reqs = hub.requests()
        for k in list(waiting):
            if k not in reqs:  # cancelled by nobody, yet gone: lost
                lost.append(k)
                waiting.discard(k)
        time.sleep(2)
    lost += sorted(waiting)
    for (u, s) in chaos.active():
        hub.stop_server(u, s)
    wait(lambda: not chaos.active() and not hub.requests() and not chaos.containers(), 180, "all stopped")
    left = sorted(hub.requests()) + [c["Name"] for c in chaos.containers()]
    return lost, left


def run(actions: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    engine = ExtraEngine(ENGINE_NAME, ENGINE_OCTET).start()
    hub = None
    t0 = time.time()
    try:
        engine.copy_image(KERNEL_IMAGE)
        hub = Hub(work, nodes=[{"name": "chaos", "docker_url": engine.url, "gpus": 2, "gpu_memory": "8GiB"}],
                  extra={"BaiScheduler": {"reconcile_interval": 10.0, "admission_grace": 120.0,
                                          "orphan_grace": 30.0}})
        hub.start(timeout=180)
        for u in USERS:
            hub.add_user(u)
        chaos = Chaos(hub, engine, rng)
        for what in chaos.plan(actions):
            chaos.act(what)
        chaos.unpause_all()
        chaos.finish_background()
        log("chaos over; settling")
        ok = wait(lambda: settled(chaos), 300, "settled", 2)
        # Containers the service still reconciles (an exited one being removed): one more settle.
        time.sleep(5)
        ok = wait(lambda: settled(chaos), 120, "settled again", 2) and ok
        found = end_check(chaos)
        log("end state:", found)
        lost, left = drain(chaos, found["queued"], 420)
        over = chaos.over_samples + ([found["over"]] if found["over"] else [])
        return {
            "actions": actions,
            "action_counts": dict(chaos.counts),
            "launched": sum(n for c, n in chaos.launch_codes.items() if c in (201, 202)),
            "launch_answers": {str(c): n for c, n in chaos.launch_codes.items()},
            "lost": len(lost) + len(found["unknown"]),
            "double_allocated": len({d for o in over for d in o}),
            "leaked_shares": len(found["leaked"]) + len(left),
            "settled": ok,
            "details": {"lost": lost + found["unknown"], "leaked": found["leaked"] + left,
                        "over_committed": over},
            "seed": seed,
            "seconds": round(time.time() - t0, 1),
        }
    finally:
        if hub is not None:
            hub.stop()
            hub.cleanup()
        engine.destroy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--actions", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="24 actions (the test suite runs this)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    args = ap.parse_args(argv)
    actions = 24 if args.quick else args.actions
    with tempfile.TemporaryDirectory(prefix="bai-chaos-") as tmp:
        res = run(actions, args.seed, Path(tmp))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:18} {v}")
    return res


if __name__ == "__main__":
    main()

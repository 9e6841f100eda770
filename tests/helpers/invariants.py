"""The invariants every fault test ends with."""
from __future__ import annotations

from collections import defaultdict

from bai_scheduler.contract import labels


def check_invariants(hub, expect_queued=(), settle_s: float = 30, engines=("",)):
    """No GPU share held twice, none leaked, no queued session lost.

    - Σ quanta per device ≤ the device's capacity (from the scheduler's capacity view);
    - every running session container belongs to exactly one RUNNING request
      with the same request id and the same devices/quanta;
    - every RUNNING request has a running container (after ``settle_s`` for starts);
    - every key in ``expect_queued`` is still known to the scheduler.
    """
    def observe():
        cap = hub.service("GET", "api/capacity").json()
        reqs = hub.requests()
        running_containers = [c for url in engines for c in hub.containers(url) if c["State"]["Running"]]
        return cap, reqs, running_containers

    def problems():
        cap, reqs, containers = observe()
        out = []
        capacity = {d["uuid"]: d["quanta"] for n in cap["nodes"] for d in n["devices"]}
        used = defaultdict(int)
        for r in reqs.values():
            if r["state"] == "RUNNING":
                for s in r["placement"]["shares"]:
                    used[s["device"]] += s["quanta"]
        for dev, q in used.items():
            if q > capacity.get(dev, 0):
                out.append(f"device {dev} over-allocated: {q} > {capacity.get(dev)}")
        by_key = {}
        for c in containers:
            lab = c["Config"]["Labels"]
            key = f"{lab[labels.USER]}/{lab.get(labels.SERVER, '')}"
            if key in by_key:
                out.append(f"two running containers for {key}")
            by_key[key] = lab
            r = reqs.get(key)
            if r is None or r["state"] != "RUNNING":
                out.append(f"container for {key} runs without an admitted request")
                continue
            if r["id"] != lab[labels.REQUEST_ID]:
                out.append(f"{key}: container request id {lab[labels.REQUEST_ID]} != scheduler {r['id']}")
            shares = ",".join(s["device"] for s in r["placement"]["shares"])
            if shares != lab.get(labels.DEVICES, ""):
                out.append(f"{key}: devices {lab.get(labels.DEVICES)} != scheduler {shares}")
        for key, r in reqs.items():
            if r["state"] == "RUNNING" and key not in by_key:
                out.append(f"{key} holds a share but has no running container")
        for key in expect_queued:
            if key not in reqs:
                out.append(f"queued {key} was lost")
        return out

    seen = []

    def holds():
        seen[:] = problems()
        return not seen

    try:
        hub.wait_for(holds, settle_s, 1, what="invariants")
    except AssertionError:
        raise AssertionError("invariants broken:\n" + "\n".join(seen)) from None

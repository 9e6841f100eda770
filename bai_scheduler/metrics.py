"""Prometheus text for the scheduler: queue length, fGPU in use, over-commits, admission latency."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Summary, generate_latest


def render(service) -> bytes:
    reg = CollectorRegistry()
    Gauge("bai_queue_length", "Requests waiting in the queue", registry=reg).set(len(service.pending()))
    Gauge("bai_sessions_running", "Requests holding capacity", registry=reg).set(len(service.running()))
    holding = service.holding()
    Gauge("bai_sessions_stopping", "Sessions whose container is being removed (they keep their share)",
          registry=reg).set(sum(1 for r in holding if r.state == "STOPPING"))
    total = sum(d.quanta for n in service.nodes for d in n.devices)
    used = sum(r.placement.quanta for r in holding if r.placement)
    Gauge("bai_fgpu_capacity_quanta", "fGPU quanta on all nodes", registry=reg).set(total)
    Gauge("bai_fgpu_in_use_quanta", "fGPU quanta held by admitted sessions", registry=reg).set(used)
    over = Gauge("bai_fgpu_overcommitted_quanta",
                 "Quanta the engines run beyond a device's capacity (should be 0)", ["device"], registry=reg)
    over_total = service.overcommitted()
    for device, quanta in over_total.items():
        over.labels(device=device).set(quanta)
    Gauge("bai_overcommitted_devices", "Devices running more than they hold", registry=reg).set(len(over_total))
    lat = Summary("bai_admission_latency_seconds", "Release accepted to next admission", registry=reg)
    for v in service.admission_latencies[-1000:]:
        lat.observe(v)
    return generate_latest(reg)

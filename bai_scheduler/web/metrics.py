"""Prometheus ``{prefix}metrics``: queue length, fGPU in use, over-commits, admission latency.

Like the hub's own ``/hub/metrics``: a token with the ``read:metrics`` scope (or an admin's
login) unless ``c.BaiScheduler.authenticate_prometheus`` is False.
"""
from __future__ import annotations

from jupyterhub.services.auth import check_scopes
from prometheus_client import CollectorRegistry, Gauge, Summary, generate_latest
from tornado import web

from .base import APIHandler


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


class MetricsHandler(APIHandler):
    def get(self):
        if self.bai.authenticate_prometheus:
            who = self.identity()
            if not (who["internal"] or check_scopes({"read:metrics"}, who["scopes"])
                    or (who["admin"] and not who["by_token"])):
                raise web.HTTPError(403, "Metrics need a token with the read:metrics scope "
                                         "(c.BaiScheduler.authenticate_prometheus).")
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish(render(self.service))


default_handlers = [(r"metrics", MetricsHandler)]

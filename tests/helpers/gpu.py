"""GPU nodes as the scheduler reads them from config, with real GPUs declared by UUID (there is
no GPU here: nothing runs on them; the readiness checks say what is missing)."""
from __future__ import annotations

from bai_scheduler.core.model import GpuBackend, Node
from bai_scheduler.core.nodes import NoGpuError, nodes_from_config
from bai_scheduler.core.units import FgpuUnits

UNITS = FgpuUnits(2, "0.5")
A100 = "GPU-5d1c2b3a-0011-2233-4455-66778899aa00"
H100 = "GPU-5d1c2b3a-0011-2233-4455-66778899aa01"


def no_local_gpu(units):
    raise NoGpuError("tests read no GPU from this machine")


def config_nodes(spec: list[dict], defaults: GpuBackend = GpuBackend()) -> list[Node]:
    """``c.BaiScheduler.nodes`` as the scheduler builds them (gpus="auto" finds no GPU)."""
    return nodes_from_config(spec, UNITS, defaults, {}, detect=no_local_gpu)


def gpu_node(backend: str = "hami", gpus: list[dict] | None = None, **extra) -> Node:
    """Node "g1" with real GPUs declared by UUID (an A100 and an H100 unless ``gpus`` says)."""
    gpus = gpus if gpus is not None else [{"uuid": A100, "index": 0, "memory": "40GiB"},
                                          {"uuid": H100, "index": 1, "memory": "80GiB"}]
    (node,) = config_nodes([{"name": "g1", "gpus": gpus, "gpu_backend": backend, **extra}])
    return node

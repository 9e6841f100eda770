"""Turn a granted GPU placement into the container's spec, per enforcement backend.

Pure functions: given the placement (as the scheduler service returns it) they
return device requests, environment, binds and labels.  Nothing here talks to
Docker, so each backend is tested against literal expected specs.

Backends:
  hami   HAMi-core's libvgpu.so preloaded; CUDA_DEVICE_MEMORY_LIMIT_<i> and
         CUDA_DEVICE_SM_LIMIT from the share, so nvidia-smi inside shows only
         the share's memory.
  mps    CUDA MPS: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE and
         CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, with the MPS pipe directory shared.
  mig    the MIG device's UUID passed as the device; sizes come from the profile.
  whole  whole devices by UUID, nothing shared.
On a simulated node the environment and labels are the same, but no device is
requested and no library is mounted (there is nothing to request).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bai_scheduler.core.units import FgpuUnits

from bai_scheduler.contract import labels

BACKENDS = ("hami", "mps", "mig", "whole")
MIB = 1024**2


class PlacementMismatch(ValueError):
    """The placement cannot be enforced by the chosen backend."""


@dataclass
class GpuSpec:
    device_requests: list = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    binds: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    ipc_mode: str | None = None


def gpu_spec(
    backend: str,
    placement: dict,
    units: FgpuUnits,
    *,
    hami_library: str = "/usr/local/vgpu/libvgpu.so",
    mps_pipe_directory: str = "/tmp/nvidia-mps",
) -> GpuSpec:
    if backend not in BACKENDS:
        raise ValueError(f"unknown GPU backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    shares = placement.get("shares", [])
    simulated = bool(placement.get("simulated"))
    quanta_per_gpu = units.quanta_per_gpu
    total = sum(s["quanta"] for s in shares)
    spec = GpuSpec()
    spec.labels = {
        labels.NODE: placement["node"],
        labels.DEVICES: ",".join(s["device"] for s in shares),
        labels.QUANTA: ",".join(str(s["quanta"]) for s in shares),
        labels.FGPU: units.to_fgpu(total),
    }
    env = spec.environment
    env["BAI_FGPU"] = units.to_fgpu(total)
    env["BAI_GPU_BACKEND"] = backend
    if not shares:
        # CPU-only: hide every GPU even where the runtime would expose them.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
        env["CUDA_VISIBLE_DEVICES"] = ""
        return spec
    uuids = [s["device"] for s in shares]
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(uuids)
    env["BAI_GPU_MEMORY_BYTES"] = ",".join(str(units.memory_bytes(s["quanta"], s["memory_bytes"])) for s in shares)
    if simulated:
        env["BAI_GPU_SIMULATED"] = "1"

    if backend == "whole" or backend == "mig":
        partial = [s for s in shares if s["quanta"] != s.get("capacity", quanta_per_gpu)]
        if partial:
            raise PlacementMismatch(
                f"backend {backend!r} gives whole devices only, but the placement has a "
                f"partial share of {partial[0]['device']}; ask in whole GPUs or use hami/mps"
            )
        if backend == "mig" and not all(s.get("mig_profile") for s in shares):
            raise PlacementMismatch("backend 'mig' needs MIG devices; this node reports none")
    elif backend == "hami":
        for i, s in enumerate(shares):
            mib = units.memory_bytes(s["quanta"], s["memory_bytes"]) // MIB
            env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{mib}m"
        # HAMi-core applies one SM limit to every device it sees: the smallest
        # share bounds them all, which is exact for the usual single-device case.
        env["CUDA_DEVICE_SM_LIMIT"] = str(min(units.sm_percent(s["quanta"]) for s in shares))
        if not simulated:
            env["LD_PRELOAD"] = hami_library
            spec.binds[hami_library] = {"bind": hami_library, "mode": "ro"}
    elif backend == "mps":
        env["CUDA_MPS_PIPE_DIRECTORY"] = mps_pipe_directory
        # MPS takes one thread percentage per client; the largest share's percent
        # is exact for a single device and never starves a multi-device session.
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(units.sm_percent(s["quanta"]) for s in shares))
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
            f"{i}={units.memory_bytes(s['quanta'], s['memory_bytes']) // MIB}M" for i, s in enumerate(shares)
        )
        if not simulated:
            spec.binds[mps_pipe_directory] = {"bind": mps_pipe_directory, "mode": "rw"}
            spec.ipc_mode = "host"

    if not simulated:
        spec.device_requests = [
            {"Driver": "nvidia", "DeviceIDs": uuids, "Capabilities": [["gpu", "compute", "utility"]]}
        ]
    return spec

"""Turn a granted GPU placement into the GPU part of the container's spec, per backend.

Pure functions: given the placement (as the scheduler service returns it, with the node's
``gpu`` settings) they return device requests, environment, mounts, tmpfs and labels.
Nothing here talks to Docker, so each backend is tested against literal expected specs;
``container.py`` joins this with the rest of the container.

Device order: inside the container CUDA and NVML number the visible GPUs by PCI bus (with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which this sets), i.e. by host index, whatever order the
placement lists them in.  Every per-device limit below is therefore keyed by the share's
position in host-index order.

Backends:
  hami   HAMi-core's libvgpu.so preloaded; per device CUDA_DEVICE_MEMORY_LIMIT_<i> and
         CUDA_DEVICE_SM_LIMIT_<i>.  The node's lock folder (HAMi-core serialises its host-PID
         detection there; without it the SM limiter never starts) is mounted at
         /tmp/vgpulock, and the shared-region cache lives on a tmpfs of this container only.
  mps    CUDA MPS: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE and CUDA_MPS_PINNED_DEVICE_MEM_LIMIT.
         The daemon's pipe folder and its shm folder (as /dev/shm) are mounted; nothing else
         of the host's IPC.  Both limits hold per client *process*.
  mig    one MIG instance, passed by its UUID; sizes come from the profile.
  whole  whole devices by UUID, nothing shared.
Every host path is a ``Mounts`` entry of type bind: Docker refuses to create the container
when the source is missing (the legacy ``Binds`` would create an empty folder and the session
would run without its limit).  On a simulated node the environment and labels are the same,
but no device is requested and nothing is mounted (there is nothing to request).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bai_scheduler.contract import labels
from bai_scheduler.core.units import FgpuUnits

BACKENDS = ("hami", "mps", "mig", "whole")
MIB = 1024**2
HAMI_LOCK_TARGET = "/tmp/vgpulock"  # fixed in HAMi-core: /tmp/vgpulock/lock
HAMI_CACHE_DIR = "/run/bai-vgpu"


class PlacementMismatch(ValueError):
    """The placement cannot be enforced by the node's backend."""


@dataclass
class GpuSpec:
    device_requests: list = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    mounts: list = field(default_factory=list)  # Docker API Mount objects
    tmpfs: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)


def bind(source: str, target: str, read_only: bool) -> dict:
    """A Docker API ``Mounts`` entry of type bind (fails loudly if ``source`` is missing)."""
    return {"Type": "bind", "Source": source, "Target": target, "ReadOnly": read_only}


def gpu_spec(placement: dict, units: FgpuUnits) -> GpuSpec:
    """The GPU part of a session container: ``placement`` as the service returns it."""
    settings = placement.get("gpu") or {}
    backend = settings.get("backend")
    shares = placement.get("shares", [])
    simulated = bool(placement.get("simulated"))
    total = sum(s["quanta"] for s in shares)
    spec = GpuSpec()
    # Labels keep the placement's own order: the service compares them with its record.
    spec.labels = {
        labels.NODE: placement["node"],
        labels.DEVICES: ",".join(s["device"] for s in shares),
        labels.QUANTA: ",".join(str(s["quanta"]) for s in shares),
        labels.FGPU: units.to_fgpu(total),
    }
    env = spec.environment
    env["BAI_FGPU"] = units.to_fgpu(total)
    if not shares:
        # CPU-only: hide every GPU even where the runtime would expose them.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
        env["CUDA_VISIBLE_DEVICES"] = ""
        return spec
    if backend not in BACKENDS:
        raise PlacementMismatch(
            f"node {placement['node']!r} states no known GPU backend ({backend!r}); the scheduler must "
            f"send one of {', '.join(BACKENDS)}"
        )
    env["BAI_GPU_BACKEND"] = backend
    ordered = sorted(shares, key=lambda s: (s["index"], s["device"]))
    uuids = [s["device"] for s in ordered]
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(uuids)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["BAI_GPU_MEMORY_BYTES"] = ",".join(str(units.memory_bytes(s["quanta"], s["memory_bytes"])) for s in ordered)
    if simulated:
        env["BAI_GPU_SIMULATED"] = "1"
    partial = [s for s in ordered if s["quanta"] < s["capacity"]]

    if backend in ("whole", "mig"):
        if partial:
            raise PlacementMismatch(
                f"backend {backend!r} gives whole devices only, but the placement has a "
                f"partial share of {partial[0]['device']}; ask in whole GPUs or use hami/mps"
            )
        if backend == "mig" and len(ordered) > 1:
            raise PlacementMismatch(
                "backend 'mig' gives one MIG instance per session (CUDA enumerates one per process), "
                f"but the placement has {len(ordered)}"
            )
        if backend == "mig" and not simulated and not all(s.get("mig_profile") for s in ordered):
            raise PlacementMismatch("backend 'mig' needs MIG devices; this node reports none")
    elif backend == "hami":
        for i, s in enumerate(ordered):
            env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{units.memory_bytes(s['quanta'], s['memory_bytes']) // MIB}m"
            env[f"CUDA_DEVICE_SM_LIMIT_{i}"] = str(min(100, units.sm_percent(s["quanta"])))
        env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = f"{HAMI_CACHE_DIR}/cudevshr.cache"
        if not simulated:
            library = settings["hami_library"]
            env["LD_PRELOAD"] = library
            spec.mounts += [bind(library, library, True), bind(settings["hami_lock_dir"], HAMI_LOCK_TARGET, False)]
            spec.tmpfs[HAMI_CACHE_DIR] = "mode=1777"
    elif backend == "mps":
        if partial and len(ordered) > 1:
            raise PlacementMismatch(
                "backend 'mps' takes one SM percentage per process for every device, so a fraction "
                "next to whole GPUs cannot be enforced; ask for whole GPUs above one GPU"
            )
        pipe = settings["mps_pipe_directory"]
        env["CUDA_MPS_PIPE_DIRECTORY"] = pipe
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(min(100, units.sm_percent(ordered[0]["quanta"])))
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
            f"{i}={units.memory_bytes(s['quanta'], s['memory_bytes']) // MIB}M" for i, s in enumerate(ordered)
        )
        if not simulated:
            # The MPS server talks to its clients through the pipe folder and POSIX shared
            # memory in the daemon's /dev/shm: share exactly those, not the host's IPC namespace.
            spec.mounts += [bind(pipe, pipe, False), bind(settings["mps_shm_directory"], "/dev/shm", False)]

    if not simulated:
        spec.device_requests = [
            {"Driver": "nvidia", "DeviceIDs": uuids, "Capabilities": [["gpu", "compute", "utility"]]}
        ]
    return spec

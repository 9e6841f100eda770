"""Plain data shared by the scheduler core, the service and the spawner.

Nothing here does I/O.  Amounts: fGPU in integer quanta (see ``units``),
CPU in millicores, memory in bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Device:
    """One schedulable GPU (a physical GPU, or one MIG instance)."""

    uuid: str
    index: int
    name: str
    memory_bytes: int
    sm_count: int
    quanta: int  # capacity in fGPU quanta
    mig_parent: str | None = None  # physical GPU uuid when this is a MIG instance
    mig_profile: str | None = None


GPU_BACKENDS = ("hami", "mps", "mig", "whole")


@dataclass(frozen=True)
class GpuBackend:
    """How a node enforces GPU shares, and where the pieces of that backend are on the node.

    ``name``: "hami" (HAMi-core's libvgpu.so preloaded), "mps" (a CUDA MPS control daemon),
    "mig" (one MIG instance per session) or "whole" (whole GPUs only).
    """

    name: str = "hami"
    hami_library: str = "/usr/local/vgpu/libvgpu.so"
    hami_lock_dir: str = "/tmp/vgpulock"
    mps_pipe_directory: str = "/run/nvidia-mps/pipe"
    mps_shm_directory: str = "/run/nvidia-mps/shm"

    @property
    def fractions(self) -> bool:
        """Whether a device may be shared (a share smaller than the device)."""
        return self.name in ("hami", "mps")

    @property
    def mixed(self) -> bool:
        """Whether one session may hold whole devices plus a fraction of another.

        MPS takes one SM percentage per client process, for every device it uses, so a
        fraction next to a whole GPU cannot be enforced per device; HAMi-core can.
        """
        return self.name == "hami"

    @property
    def multi_device(self) -> bool:
        """Whether one session may span several devices (CUDA sees one MIG instance per process)."""
        return self.name != "mig"

    def to_json(self) -> dict:
        """What the spawner needs to build a container on this node (see bai_spawner.gpu)."""
        return {"backend": self.name, "hami_library": self.hami_library, "hami_lock_dir": self.hami_lock_dir,
                "mps_pipe_directory": self.mps_pipe_directory, "mps_shm_directory": self.mps_shm_directory}


DEFAULT_POOL = "default"


@dataclass(frozen=True)
class Node:
    """A Docker engine and the GPUs behind it."""

    name: str
    docker_url: str  # "" means the local engine from the environment
    devices: tuple[Device, ...] = ()
    cpu_millis: int = 0  # 0: not limited by the scheduler
    memory_bytes: int = 0  # 0: not limited by the scheduler
    simulated: bool = False
    tls: dict = field(default_factory=dict, hash=False, compare=False)
    gpu: GpuBackend = GpuBackend()
    pool: str = DEFAULT_POOL  # node pool: groups may be limited to some pools (core.quotas)


@dataclass(frozen=True)
class RequestKey:
    user: str
    server: str  # "" for the default server

    def __str__(self):
        return f"{self.user}/{self.server}" if self.server else self.user


@dataclass(frozen=True)
class Request:
    key: RequestKey
    quanta: int
    cpu_millis: int = 0
    memory_bytes: int = 0
    image: str = ""
    seq: int = 0  # submission order, assigned by the scheduler
    group: str = ""  # the JupyterHub group whose quota it counts against ("" = none)
    pools: tuple[str, ...] = ()  # node pools it may go to, sorted ("" tuple = any node)


@dataclass(frozen=True)
class Share:
    device_uuid: str
    quanta: int


@dataclass(frozen=True)
class Placement:
    node: str
    shares: tuple[Share, ...]
    cpu_millis: int = 0
    memory_bytes: int = 0

    @property
    def quanta(self) -> int:
        return sum(s.quanta for s in self.shares)


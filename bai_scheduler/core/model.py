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


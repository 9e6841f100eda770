"""Nodes and their devices as declared in config: sizes, CPU, simulated GPUs.  Pure: no I/O.

The real GPUs of a machine are read by ``bai_scheduler.inventory`` (NVML); both
end as the same ``Node``/``Device`` values, which is all placement ever sees.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from .model import Device, Node
from .units import FgpuUnits


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value) -> int:
    """A size as bytes: an int, or a string like "8GiB", "16 GiB", "512MiB", "1.5G", "1024".

    Binary suffixes (KiB, MiB, GiB, TiB; also Ki/Mi/Gi/Ti) are powers of 1024, decimal ones
    (KB, MB, GB, TB; also K/M/G/T) powers of 1000.  Fractions round down to whole bytes.
    Raises ValueError for negatives, non-numbers and unknown suffixes.
    """
    if isinstance(value, bool):
        raise ValueError(f"size must be a number of bytes or a string like '8GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size cannot be negative: {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"size must be a finite non-negative number, not {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"size must be a number of bytes or a string like '8GiB', not {value!r}")
    m = _BYTES_RE.match(value)
    if not m:
        raise ValueError(f"cannot read size {value[:40]!r}: expected e.g. '8GiB', '512MiB' or bytes")
    number, suffix = m.groups()
    factor = _UNITS.get(suffix.lower())
    if factor is None:
        raise ValueError(
            f"unknown size unit {suffix!r} in {value[:40]!r}: use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
        )
    try:
        return int(Decimal(number) * factor)
    except InvalidOperation:  # pragma: no cover - the regex already checked
        raise ValueError(f"cannot read size {value[:40]!r}") from None


def _parse_cpu_millis(value, where: str) -> int:
    """CPU cores (int, float or decimal string, e.g. 4, "0.5") as millicores; 0 = unlimited."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: cpu must be a number of cores, not {value!r}")
    try:
        cores = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{where}: cpu must be a number of cores, not {str(value)[:40]!r}") from None
    if not cores.is_finite() or cores < 0:
        raise ValueError(f"{where}: cpu must be a finite number of cores >= 0, not {value!r}")
    return int(cores * 1000)


_NODE_KEYS = {"name", "docker_url", "gpus", "gpu_memory", "gpu_name", "sm_count", "cpu", "memory", "tls"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def simulated_nodes(spec, units: FgpuUnits) -> list[Node]:
    """Nodes from a simulated inventory declared in config.

    ``spec`` is a list of dicts, each e.g.::

        {"name": "local", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB",
         "gpu_name": "Simulated GPU", "sm_count": 108, "cpu": 0, "memory": 0}

    ``cpu`` is in cores (0: not limited), ``memory`` and ``gpu_memory`` are bytes or strings
    like "16 GiB" (memory 0: not limited).  Devices get stable fake UUIDs
    ``GPU-sim-<node>-<index>`` and ``units.quanta_per_gpu`` quanta each.
    """
    if isinstance(spec, dict):
        raise ValueError("simulated inventory must be a list of node dicts, not a single dict")
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"simulated inventory must be a list of node dicts, not {type(spec).__name__}")
    nodes: list[Node] = []
    seen: set[str] = set()
    for i, entry in enumerate(spec):
        where = f"simulated node #{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a dict, not {type(entry).__name__}")
        unknown = set(entry) - _NODE_KEYS
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                f"allowed: {', '.join(sorted(_NODE_KEYS))}"
            )
        name = entry.get("name", "local" if len(spec) == 1 else None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"{where}: 'name' must be 1-63 letters, digits, '.', '_' or '-' (got {name!r})"
            )
        where = f"simulated node {name!r}"
        if name in seen:
            raise ValueError(f"{where}: duplicate node name")
        seen.add(name)
        docker_url = entry.get("docker_url", "")
        if not isinstance(docker_url, str):
            raise ValueError(f"{where}: docker_url must be a string ('' for the local engine)")
        gpus = entry.get("gpus", 0)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"{where}: gpus must be a whole number >= 0 (got {gpus!r})")
        try:
            gpu_memory = parse_bytes(entry.get("gpu_memory", 0))
        except ValueError as e:
            raise ValueError(f"{where}: gpu_memory: {e}") from None
        if gpus and gpu_memory <= 0:
            raise ValueError(f"{where}: gpu_memory must be given (e.g. '8GiB') when gpus > 0")
        gpu_name = entry.get("gpu_name", "Simulated GPU")
        if not isinstance(gpu_name, str):
            raise ValueError(f"{where}: gpu_name must be a string")
        sm_count = entry.get("sm_count", 0)
        if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 0:
            raise ValueError(f"{where}: sm_count must be a whole number >= 0 (got {sm_count!r})")
        cpu_millis = _parse_cpu_millis(entry.get("cpu", 0), where)
        try:
            memory = parse_bytes(entry.get("memory", 0))
        except ValueError as e:
            raise ValueError(f"{where}: memory: {e}") from None
        tls = entry.get("tls") or {}
        if not isinstance(tls, dict):
            raise ValueError(f"{where}: tls must be a dict")
        devices = tuple(
            Device(
                uuid=f"GPU-sim-{name}-{d}",
                index=d,
                name=gpu_name,
                memory_bytes=gpu_memory,
                sm_count=sm_count,
                quanta=units.quanta_per_gpu,
            )
            for d in range(gpus)
        )
        nodes.append(
            Node(
                name=name,
                docker_url=docker_url,
                devices=devices,
                cpu_millis=cpu_millis,
                memory_bytes=memory,
                simulated=True,
                tls=dict(tls),
            )
        )
    return nodes

"""Nodes and their devices as declared in config: sizes, CPU, GPU backend, simulated or
declared GPUs.  Pure: no I/O.

The real GPUs of a machine are read by ``bai_scheduler.inventory`` (NVML), which
``nodes_from_config`` is handed as ``detect``; both end as the same ``Node``/``Device``
values, which is all placement ever sees.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from .model import DEFAULT_POOL, GPU_BACKENDS, Device, GpuBackend, Node
from .units import FgpuUnits, format_bytes


class NoGpuError(RuntimeError):
    """NVML is unavailable or reports no GPU on this machine."""


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


_GPU_KEYS = {"gpu_backend", "hami_library", "hami_lock_dir", "mps_pipe_directory", "mps_shm_directory"}
_NODE_KEYS = {"name", "docker_url", "gpus", "gpu_memory", "gpu_name", "sm_count", "cpu", "memory", "tls",
              "pool"} | _GPU_KEYS
_DEVICE_KEYS = {"uuid", "index", "memory", "name", "sm_count", "mig_parent", "mig_profile"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def gpu_backend(entry: dict, defaults: GpuBackend, where: str) -> GpuBackend:
    """A node's GPU backend: ``defaults`` with the node's own ``gpu_backend``/path keys over it."""
    values = {}
    name = entry.get("gpu_backend", defaults.name)
    if not isinstance(name, str) or name.strip().lower() not in GPU_BACKENDS:
        raise ValueError(f"{where}: gpu_backend {name!r} is unknown; choose one of {', '.join(GPU_BACKENDS)}")
    values["name"] = name.strip().lower()
    for key in sorted(_GPU_KEYS - {"gpu_backend"}):
        path = entry.get(key, getattr(defaults, key))
        if not isinstance(path, str) or not path.startswith("/") or "\x00" in path or ":" in path:
            raise ValueError(f"{where}: {key} must be an absolute path on the node without ':' (got {path!r})")
        values[key] = path
    return GpuBackend(**values)


def check_keys(entry, allowed: frozenset | set, where: str) -> None:
    """ValueError unless ``entry`` is a dict whose keys are all in ``allowed`` (config entries)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a dict, not {type(entry).__name__}")
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def _base(entry, i: int, count: int, seen: set, units: FgpuUnits, defaults: GpuBackend) -> tuple[str, dict]:
    """Checks every node form shares; returns (where, the Node fields other than devices)."""
    where = f"node #{i}"
    check_keys(entry, _NODE_KEYS, where)
    name = entry.get("name", "local" if count == 1 else None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{where}: 'name' must be 1-63 letters, digits, '.', '_' or '-' (got {name!r})")
    where = f"node {name!r}"
    if name in seen:
        raise ValueError(f"{where}: duplicate node name")
    seen.add(name)
    docker_url = entry.get("docker_url", "")
    if not isinstance(docker_url, str):
        raise ValueError(f"{where}: docker_url must be a string ('' for the local engine)")
    cpu_millis = _parse_cpu_millis(entry.get("cpu", 0), where)
    try:
        memory = parse_bytes(entry.get("memory", 0))
    except ValueError as e:
        raise ValueError(f"{where}: memory: {e}") from None
    tls = entry.get("tls") or {}
    if not isinstance(tls, dict):
        raise ValueError(f"{where}: tls must be a dict")
    pool = entry.get("pool", DEFAULT_POOL)
    if not isinstance(pool, str) or not _NAME_RE.match(pool):
        raise ValueError(f"{where}: 'pool' must be 1-63 letters, digits, '.', '_' or '-' (got {pool!r})")
    return where, dict(name=name, docker_url=docker_url, cpu_millis=cpu_millis, memory_bytes=memory,
                       tls=dict(tls), gpu=gpu_backend(entry, defaults, where), pool=pool)


def _whole(entry: dict, key: str, where: str, default=0) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {key} must be a whole number >= 0 (got {value!r})")
    return value


def _simulated_devices(entry: dict, name: str, where: str, units: FgpuUnits) -> tuple[Device, ...]:
    gpus = _whole(entry, "gpus", where)
    try:
        gpu_memory = parse_bytes(entry.get("gpu_memory", 0))
    except ValueError as e:
        raise ValueError(f"{where}: gpu_memory: {e}") from None
    if gpus and gpu_memory <= 0:
        raise ValueError(f"{where}: gpu_memory must be given (e.g. '8GiB') when gpus > 0")
    gpu_name = entry.get("gpu_name", "Simulated GPU")
    if not isinstance(gpu_name, str):
        raise ValueError(f"{where}: gpu_name must be a string")
    sm_count = _whole(entry, "sm_count", where)
    return tuple(
        Device(uuid=f"GPU-sim-{name}-{d}", index=d, name=gpu_name, memory_bytes=gpu_memory,
               sm_count=sm_count, quanta=units.quanta_per_gpu)
        for d in range(gpus)
    )


def _declared_devices(gpus: list, where: str, units: FgpuUnits, gpu: GpuBackend) -> tuple[Device, ...]:
    """Real GPUs an admin lists for a node NVML cannot read here (e.g. a remote engine)."""
    devices = []
    uuids: set[str] = set()
    indexes: set[int] = set()
    for j, d in enumerate(gpus):
        at = f"{where}: gpus[{j}]"
        if not isinstance(d, dict):
            raise ValueError(f"{at} must be a dict with uuid, index and memory")
        check_keys(d, _DEVICE_KEYS, at)
        uuid = d.get("uuid")
        if not isinstance(uuid, str) or not re.fullmatch(r"(GPU|MIG)-[A-Za-z0-9/-]{1,120}", uuid):
            raise ValueError(f"{at}: uuid must be the device's UUID as nvidia-smi -L shows it "
                             f"(GPU-… or MIG-…), got {uuid!r}")
        if uuid in uuids:
            raise ValueError(f"{at}: duplicate uuid {uuid}")
        uuids.add(uuid)
        index = _whole(d, "index", at, default=None)
        profile = d.get("mig_profile")
        if profile is not None and not isinstance(profile, str):
            raise ValueError(f"{at}: mig_profile must be a string like '3g.40gb'")
        if profile is None:  # MIG instances share their GPU's index
            if index in indexes:
                raise ValueError(f"{at}: duplicate index {index}")
            indexes.add(index)
        try:
            memory = parse_bytes(d.get("memory", 0))
        except ValueError as e:
            raise ValueError(f"{at}: memory: {e}") from None
        if memory <= 0:
            raise ValueError(f"{at}: memory must be given, e.g. '80GiB'")
        label = d.get("name", "GPU")
        if not isinstance(label, str):
            raise ValueError(f"{at}: name must be a string")
        devices.append(Device(uuid=uuid, index=index, name=label, memory_bytes=memory,
                              sm_count=_whole(d, "sm_count", at), quanta=units.quanta_per_gpu,
                              mig_parent=d.get("mig_parent"), mig_profile=profile))
    check_backend(devices, gpu, where)
    return tuple(devices)


def check_backend(devices, gpu: GpuBackend, where: str) -> None:
    """Refuse a real node whose devices its backend cannot use."""
    migs = [d for d in devices if d.mig_profile]
    if gpu.name == "mig" and len(migs) != len(devices):
        raise ValueError(f"{where}: gpu_backend 'mig' gives MIG instances only, but some GPUs are not MIG "
                         "instances; enable MIG and create instances (docs/install.md), or choose another backend")
    if gpu.name != "mig" and migs:
        raise ValueError(f"{where}: the GPUs are MIG instances; set gpu_backend to 'mig' for this node")


def simulated_nodes(spec, units: FgpuUnits, gpu_defaults: GpuBackend = GpuBackend()) -> list[Node]:
    """Nodes from a simulated inventory declared in config.

    ``spec`` is a list of dicts, each e.g.::

        {"name": "local", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB",
         "gpu_name": "Simulated GPU", "sm_count": 108, "cpu": 0, "memory": 0}

    ``cpu`` is in cores (0: not limited), ``memory`` and ``gpu_memory`` are bytes or strings
    like "16 GiB" (memory 0: not limited).  Devices get stable fake UUIDs
    ``GPU-sim-<node>-<index>`` and ``units.quanta_per_gpu`` quanta each.  ``gpu_backend`` and
    the backend's paths (see ``GpuBackend``) default to ``gpu_defaults``.
    """
    if isinstance(spec, dict):
        raise ValueError("simulated inventory must be a list of node dicts, not a single dict")
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"simulated inventory must be a list of node dicts, not {type(spec).__name__}")
    nodes: list[Node] = []
    seen: set[str] = set()
    for i, entry in enumerate(spec):
        where, fields = _base(entry, i, len(spec), seen, units, gpu_defaults)
        devices = _simulated_devices(entry, fields["name"], where, units)
        nodes.append(Node(devices=devices, simulated=True, **fields))
    return nodes


def with_engine_resources(entry, engine_resources, log=None):
    """``entry`` with ``cpu``/``memory`` "auto" replaced by what its Docker engine reports.

    ``engine_resources(entry)``: (CPU millicores, memory bytes) of the engine (its NCPU and
    MemTotal), or None when the engine cannot be read; then "auto" is 0 (not limited)."""
    if not isinstance(entry, dict) or "auto" not in (entry.get("cpu"), entry.get("memory")):
        return entry
    name = entry.get("name", "local")
    found = engine_resources(entry) if engine_resources is not None else None
    cpu_millis, memory_bytes = found or (0, 0)
    out = dict(entry)
    if out.get("cpu") == "auto":
        out["cpu"] = str(Decimal(cpu_millis) / 1000)
    if out.get("memory") == "auto":
        out["memory"] = memory_bytes
    if log and found:
        log.info("Node %s: its engine has %g CPUs and %s of memory", name, cpu_millis / 1000,
                 format_bytes(memory_bytes))
    elif log:
        log.warning("Node %s: its engine's CPUs and memory could not be read; its 'auto' CPU and memory "
                    "are not limited", name)
    return out


def nodes_from_config(spec, units: FgpuUnits, gpu_defaults: GpuBackend, simulated_gpus: dict,
                      detect, log=None, engine_resources=None) -> list[Node]:
    """The scheduler's nodes from ``c.BaiScheduler.nodes``.

    Each entry's ``gpus`` is "auto" (real GPUs read by ``detect(units)``, i.e.
    ``inventory.nvml_devices``; ``simulated_gpus`` when it raises ``NoGpuError``), a whole
    number (that many simulated GPUs), or a list of real GPUs declared by UUID (for engines
    NVML cannot read from here)::

        {"name": "gpu2", "docker_url": "tcp://gpu2:2376", "gpu_backend": "hami",
         "gpus": [{"uuid": "GPU-5d1c…", "index": 0, "memory": "80GiB", "name": "H100", "sm_count": 132}]}

    Real nodes are checked for their backend before any GPU share is placed there
    (``bai_scheduler.readiness``); simulated ones need nothing.  ``log``: a ``logging.Logger``
    told which inventory each node got.  A ``cpu`` or ``memory`` of "auto" is the node's engine's
    own (``with_engine_resources``).
    """
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"nodes must be a list of node dicts, not {type(spec).__name__}")
    nodes: list[Node] = []
    seen: set[str] = set()
    for i, entry in enumerate(spec):
        entry = with_engine_resources(entry, engine_resources, log)
        where, fields = _base(entry, i, len(spec), seen, units, gpu_defaults)
        gpus = entry.get("gpus", "auto")
        if gpus == "auto":
            try:
                devices = detect(units)
            except NoGpuError as e:
                fallback = {**simulated_gpus, **entry, "gpus": simulated_gpus.get("gpus", 1)}
                node = Node(devices=_simulated_devices(fallback, fields["name"], where, units), simulated=True,
                            **fields)
                if log:
                    log.warning("Node %s: no GPU found (%s); using a SIMULATED inventory of %d GPU(s)",
                                node.name, e, len(node.devices))
            else:
                check_backend(devices, fields["gpu"], where)
                node = Node(devices=tuple(devices), simulated=False, **fields)
                if log:
                    log.info("Node %s: %d real GPU(s) from NVML, backend %s", node.name, len(devices),
                             node.gpu.name)
        elif isinstance(gpus, list):
            node = Node(devices=_declared_devices(gpus, where, units, fields["gpu"]), simulated=False, **fields)
        else:
            node = Node(devices=_simulated_devices(entry, fields["name"], where, units), simulated=True, **fields)
            if log:
                log.warning("Node %s: SIMULATED inventory of %d GPU(s)", node.name, len(node.devices))
        nodes.append(node)
    return nodes

"""A session's container, built as plain data (kubespawner's ``make_pod``, for Docker).

``make_container`` takes everything a session container is made of (the validated options,
the granted placement's GPU part from ``gpu.gpu_spec``, the hardening settings, the admin's
own ``volumes``/``mounts``/``extra_*`` already evaluated) and returns the keyword arguments of
docker-py's ``create_container`` and ``create_host_config``.  Nothing here talks to Docker, so
tests compare the result with literal dicts.

How the admin's extras meet ours (dockerspawner replaces; this merges where replacing would
lose something or undo a limit):
  * ``binds`` from ``volumes``/``read_only_volumes`` and from ``extra_host_config`` are all kept,
    and the package index's read-only ones (``PackageIndex``) join them; a target used twice is refused.
  * ``mounts`` from the ``mounts`` option, from ``extra_host_config`` and the GPU backend's are
    all kept; a GPU mount's target that an admin's bind or mount also uses is refused.
  * ``cap_add``, ``cap_drop``, ``security_opt`` lists are joined.  ``tmpfs`` dicts are merged.
  * the environment: the package index's, the hub's, then ``extra_create_kwargs['environment']``, then the GPU
    backend's (a limit cannot be overridden by config); labels likewise end with ours.
  * ``image``, ``name`` and ``device_requests`` are ours only: the image that runs is the one
    validated, and GPUs are exactly the granted ones.
  * anything else in ``extra_host_config``/``extra_create_kwargs`` wins, as in dockerspawner.
"""
from __future__ import annotations

from dataclasses import dataclass

from docker.types import DeviceRequest
from docker.utils import convert_volume_binds

from bai_scheduler.contract import labels
from bai_scheduler.contract.options import SessionOptions

from . import pipconf
from .gpu import GpuSpec

CPU_PERIOD_US = 100_000
JOINED_LISTS = ("cap_add", "cap_drop", "security_opt")
OURS_ONLY = ("device_requests",)


class ContainerSpecError(ValueError):
    """The configuration cannot make this container; the message says what to change."""


@dataclass(frozen=True)
class Hardening:
    """Limits every session gets (BaiSpawner's pids_limit, cap_drop, cap_add, ... options)."""

    pids_limit: int = 4096
    cap_drop: tuple = ("ALL",)
    cap_add: tuple = ()
    no_new_privileges: bool = True
    init: bool = True

    def host_config(self) -> dict:
        out = {"cap_drop": list(self.cap_drop), "cap_add": list(self.cap_add), "init": self.init}
        if self.pids_limit:
            out["pids_limit"] = self.pids_limit
        if self.no_new_privileges:
            out["security_opt"] = ["no-new-privileges:true"]
        return out


@dataclass(frozen=True)
class PackageIndex:
    """The site's package index for ``pip install`` in a session (BaiSpawner's ``pip_config`` and
    ``ca_bundle``, see ``pipconf``): host files and folders mounted read-only, and the environment
    that points pip and the HTTPS clients at the CA bundle.  The admin's own environment wins."""

    pip_config: str = ""  # host path of the sessions' pip.conf
    ca_bundle: str = ""  # host path of a PEM bundle
    local_paths: tuple = ()  # folders and files the pip.conf names, mounted at the same paths

    def binds(self) -> list[str]:
        out = [f"{path}:{path}:ro" for path in self.local_paths]
        if self.pip_config:
            out.append(f"{self.pip_config}:{pipconf.PIP_CONFIG_TARGET}:ro")
        if self.ca_bundle:
            out.append(f"{self.ca_bundle}:{pipconf.CA_BUNDLE_TARGET}:ro")
        return out

    def environment(self) -> dict:
        return {name: pipconf.CA_BUNDLE_TARGET for name in pipconf.CA_ENV} if self.ca_bundle else {}


@dataclass(frozen=True)
class Session:
    """Who and what a container is: its labels and limits come from here."""

    user: str
    server: str
    request_id: str
    hub_id: str
    options: SessionOptions


def _join(first: list, second: list) -> list:
    return list(first) + [x for x in second if x not in first]


def _binds(*sources) -> list[str]:
    """Docker's "source:target:mode" binds from dict or list forms, in order, without repeats."""
    out: list[str] = []
    for binds in sources:
        if binds:
            out = _join(out, convert_volume_binds(binds))
    return out


def _merge(dest: dict, src: dict) -> dict:
    """``src`` over ``dest``, recursing into dicts (dockerspawner's rule for its extras)."""
    for key, value in src.items():
        if isinstance(dest.get(key), dict) and isinstance(value, dict):
            dest[key] = _merge(dict(dest[key]), value)
        else:
            dest[key] = value
    return dest


def _env(value) -> dict:
    """An environment given as a dict or as Docker's ["KEY=value", ...]."""
    if isinstance(value, dict):
        return dict(value)
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in value or ())


def _targets(binds: list[str], mounts: list) -> dict[str, str]:
    found = {b.split(":")[1]: b for b in binds if b.count(":") >= 1}
    for m in mounts:
        found[m.get("Target") or m.get("target")] = f"mount {m.get('Source') or m.get('source')}"
    return found


def make_container(
    *,
    name: str,
    image: str,
    command: list,
    environment: dict,
    port: int,
    session: Session,
    gpu: GpuSpec,
    hardening: Hardening,
    network_name: str,
    remove: bool = True,
    host_ip: str | None = "127.0.0.1",
    volume_binds: dict | None = None,
    mounts: list | None = None,
    links: dict | None = None,
    extra_create_kwargs: dict | None = None,
    extra_host_config: dict | None = None,
    package_index: PackageIndex = PackageIndex(),
) -> tuple[dict, dict]:
    """(``create_container`` kwargs without ``host_config``, ``create_host_config`` kwargs)."""
    extra_create = dict(extra_create_kwargs or {})
    extra_host = dict(extra_host_config or {})
    owned = [k for k in OURS_ONLY if k in extra_host]
    if owned:
        raise ContainerSpecError(
            f"extra_host_config sets {', '.join(owned)}, which BaiSpawner sets from the granted GPUs; "
            "remove it (GPU nodes and backends are configured in c.BaiScheduler.nodes)"
        )
    opts = session.options

    binds = _binds(volume_binds, extra_host.pop("binds", None))
    admin_mounts = list(mounts or []) + list(extra_host.pop("mounts", None) or [])
    taken = _targets(binds, admin_mounts)
    for b in package_index.binds():
        target = b.split(":")[1]
        if target in taken:
            raise ContainerSpecError(
                f"{target} is needed for the sessions' package index ({b.split(':')[0]}), but the configuration "
                f"also mounts {taken[target]} there; mount it elsewhere, or leave BaiSpawner.pip_config/ca_bundle empty"
            )
    binds += package_index.binds()
    taken = _targets(binds, admin_mounts)
    for m in gpu.mounts:
        if m["Target"] in taken:
            raise ContainerSpecError(
                f"{m['Target']} is needed by the GPU backend ({m['Source']}), but the configuration also "
                f"mounts {taken[m['Target']]} there; mount it elsewhere"
            )

    env = dict(package_index.environment())
    env.update(environment)
    env.update(_env(extra_create.pop("environment", None)))
    env.update(gpu.environment)
    env["BAI_SESSION"] = f"{session.user}/{session.server}" if session.server else session.user

    container_labels = dict(extra_create.pop("labels", None) or {})
    container_labels.update(gpu.labels)
    container_labels.update({
        labels.USER: session.user,
        labels.SERVER: session.server,
        labels.REQUEST_ID: session.request_id,
        labels.HUB: session.hub_id,
        labels.IMAGE: image,
        labels.CPU_MILLIS: str(opts.cpu_millis),
        labels.MEMORY_BYTES: str(opts.memory_bytes),
        **({labels.GROUP: opts.group} if opts.group else {}),
    })
    for key in ("image", "name"):
        extra_create.pop(key, None)

    create = {
        "image": image,
        "name": name,
        "command": list(command),
        "environment": env,
        "labels": container_labels,
        # Data volumes only: the package index's files are configuration, and a target listed here
        # becomes a VOLUME of a snapshot made by docker commit (a bare run of it then fails with
        # "cannot mount volume over existing file" at the CA bundle's mount point).
        "volumes": sorted(b.split(":")[1] for b in binds if b not in package_index.binds()),
        "ports": {f"{port}/tcp": None},
    }
    _merge(create, extra_create)

    host = {"auto_remove": remove, "binds": binds, "links": dict(links or {}), **hardening.host_config()}
    if opts.memory_bytes:
        host["mem_limit"] = opts.memory_bytes
    if opts.cpu_millis:
        period = extra_host.get("cpu_period", CPU_PERIOD_US)
        host["cpu_period"] = period
        host["cpu_quota"] = opts.cpu_millis * period // 1000
    if host_ip is not None:
        host["port_bindings"] = {port: (host_ip,)}
    for key in JOINED_LISTS:
        if key in extra_host:
            host[key] = _join(host.get(key, []), extra_host.pop(key) or [])
    if gpu.tmpfs or "tmpfs" in extra_host:
        host["tmpfs"] = {**(extra_host.pop("tmpfs", None) or {}), **gpu.tmpfs}
    _merge(host, extra_host)
    host.setdefault("network_mode", network_name)
    all_mounts = admin_mounts + gpu.mounts
    if all_mounts:
        host["mounts"] = all_mounts
    if gpu.device_requests:
        host["device_requests"] = [
            DeviceRequest(driver=r["Driver"], device_ids=r["DeviceIDs"], capabilities=r["Capabilities"])
            for r in gpu.device_requests
        ]
    return create, host

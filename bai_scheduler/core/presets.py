"""Resource presets and the team settings they must agree with, checked at start-up.  Pure: no I/O.

A preset is a named session shape an admin offers first in the spawn form and in
``POST api/launch``, in the shape users of KubeSpawner's ``profile_list`` know::

    c.BaiScheduler.presets = [
        {"display_name": "Small GPU", "slug": "small", "description": "0.5 fGPU for notebooks",
         "default": True, "fgpu": "0.5", "cpu": "2", "memory": "4GiB"},
        {"display_name": "Training", "slug": "train", "fgpu": "2", "cpu": "4", "memory": "16GiB",
         "image": "bai/pytorch:2.13.0", "pool": "a100"},
    ]

``check_teams`` refuses, with a message naming the entry, what could never run: a preset
naming an unknown pool or image, a group allowed a pool that has no nodes, a group whose quota
is smaller than every preset it could use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from .model import Request, RequestKey
from .nodes import check_keys, parse_bytes
from .quotas import GroupPolicy, never_reason
from .units import FgpuError, FgpuUnits, NumberError, parse_number

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_KEYS = {"display_name", "slug", "description", "default", "fgpu", "cpu", "memory", "image", "pool"}


@dataclass(frozen=True)
class Preset:
    slug: str
    display_name: str
    description: str
    quanta: int
    cpu_millis: int
    memory_bytes: int
    image: str = ""  # "" = the user picks
    pool: str = ""  # "" = any pool the user's group may use
    default: bool = False

    def request(self, group: str = "") -> Request:
        """A request of this shape (for checks against quotas and nodes)."""
        pools = (self.pool,) if self.pool else ()
        return Request(RequestKey("", ""), self.quanta, self.cpu_millis, self.memory_bytes, self.image,
                       group=group, pools=pools)

    def to_json(self) -> dict:
        return {"slug": self.slug, "display_name": self.display_name, "description": self.description,
                "quanta": self.quanta, "cpu_millis": self.cpu_millis,
                "memory_bytes": self.memory_bytes, "image": self.image, "pool": self.pool,
                "default": self.default}

    @classmethod
    def from_json(cls, data: dict) -> "Preset":
        return cls(data["slug"], data["display_name"], data["description"], int(data["quanta"]),
                   int(data["cpu_millis"]), int(data["memory_bytes"]), data.get("image", ""),
                   data.get("pool", ""), bool(data.get("default")))


def presets_from_config(entries, units: FgpuUnits) -> tuple[Preset, ...]:
    """``c.BaiScheduler.presets`` as ``Preset`` values; ValueError naming the entry that is wrong."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError("presets must be a list of dicts")
    out, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"preset #{i}"
        check_keys(entry, _KEYS, where)
        name = entry.get("display_name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: display_name must be a non-empty string")
        slug = entry.get("slug") or re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-")
        if not isinstance(slug, str) or not _SLUG.match(slug):
            raise ValueError(f"{where} ({name!r}): slug must be lower-case letters, digits, '-' or '_' (got {slug!r})")
        where = f"preset {slug!r}"
        if slug in seen:
            raise ValueError(f"{where}: two presets have this slug")
        seen.add(slug)
        try:
            quanta = units.to_quanta(entry.get("fgpu", "0"))
        except FgpuError as e:
            raise ValueError(f"{where}: fgpu: {e}") from None
        try:
            cpu = parse_number(entry.get("cpu", "1"))
        except NumberError as e:
            raise ValueError(f"{where}: cpu: {e}") from None
        if cpu <= 0:
            raise ValueError(f"{where}: cpu must be more than 0 cores")
        try:
            memory = parse_bytes(entry.get("memory", "2GiB"))
        except ValueError as e:
            raise ValueError(f"{where}: memory: {e}") from None
        if memory <= 0:
            raise ValueError(f"{where}: memory must be more than 0")
        for key in ("description", "image", "pool"):
            if not isinstance(entry.get(key, ""), str):
                raise ValueError(f"{where}: {key} must be a string")
        out.append(Preset(slug, name.strip(), entry.get("description", ""), quanta, int(cpu * Decimal(1000)),
                          memory, entry.get("image", "").strip(), entry.get("pool", "").strip(),
                          bool(entry.get("default", False))))
    if sum(p.default for p in out) > 1:
        raise ValueError("presets: only one preset may be the default")
    return tuple(out)


def usable(preset: Preset, policy: GroupPolicy | None) -> bool:
    """Whether a member of a group with ``policy`` may launch ``preset`` (its pool allowed)."""
    return not preset.pool or policy is None or not policy.pools or preset.pool in policy.pools


def check_teams(presets: tuple[Preset, ...], groups: dict[str, GroupPolicy], pools: dict[str, list[str]],
                units: FgpuUnits, images: set[str] | None = None, can_ever_fit=None) -> list[str]:
    """What is wrong with presets and groups together, one message each (empty: all well).

    ``pools``: pool -> its nodes; ``images``: the images that exist (None: not known, not
    checked); ``can_ever_fit``: ``Capacity.can_ever_fit`` (a preset no node could ever run)."""
    problems = []
    for p in presets:
        if p.pool and p.pool not in pools:
            problems.append(f"preset {p.slug!r} names pool {p.pool!r}, which no node has "
                            f"(pools: {', '.join(sorted(pools)) or 'none'})")
        elif can_ever_fit is not None:
            reason = can_ever_fit(p.request())
            if reason:
                problems.append(f"preset {p.slug!r} could never start: it {reason}")
        if p.image and images is not None and p.image not in images:
            problems.append(f"preset {p.slug!r} names image {p.image!r}, which is not in the catalog "
                            "(build it with bai-images, or fix the name)")
    for name, policy in groups.items():
        for pool in policy.pools:
            if pool not in pools:
                problems.append(f"group {name!r} may use pool {pool!r}, which has no nodes "
                                f"(pools: {', '.join(sorted(pools)) or 'none'})")
        mine = [p for p in presets if usable(p, policy)]
        if presets and not mine:
            problems.append(f"group {name!r} may use none of the presets (their pools are not its pools)")
        elif mine and all(never_reason(name, policy.quota, p.request(name), units) for p in mine):
            smallest = min(mine, key=lambda p: (p.quanta, p.cpu_millis, p.memory_bytes))
            problems.append(f"group {name!r}'s quota is smaller than every preset: preset {smallest.slug!r} "
                            f"{never_reason(name, policy.quota, smallest.request(name), units)}")
    return problems

"""Teams: what each JupyterHub group may use, and where.  Pure: no I/O.

A request names the group it counts against (``Request.group``).  A group's ``Quota`` bounds
what its members hold together (running sessions, fGPU quanta, CPU millicores, memory bytes)
and how many of its requests may wait; 0 means no limit.  The queue checks quotas beside the
per-user limits (``AdmissionQueue``): a request its group's quota holds back waits without
blocking anyone else, and its wait reason names the limit, e.g. "team-vision uses 8 of 8 fGPU".

``GroupPolicy`` adds the node pools a group may use (``Request.pools``; empty: every pool) and
the longest its sessions may run (seconds; 0: no limit).
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import Request
from .units import FgpuUnits, format_bytes


@dataclass(frozen=True)
class Quota:
    max_running: int = 0
    max_pending: int = 0
    max_quanta: int = 0
    max_cpu_millis: int = 0
    max_memory_bytes: int = 0

    @property
    def holds(self) -> bool:
        """Whether it limits what runs (``max_pending`` only limits what waits)."""
        return bool(self.max_running or self.max_quanta or self.max_cpu_millis or self.max_memory_bytes)


@dataclass(frozen=True)
class GroupPolicy:
    quota: Quota = Quota()
    pools: tuple[str, ...] = ()  # sorted; empty: every pool
    lifetime_s: int = 0  # 0: sessions of this group run as long as the default lifetime allows


@dataclass
class Usage:
    """What one user or group holds (running sessions and their amounts) and has waiting."""

    running: int = 0
    quanta: int = 0
    cpu: int = 0
    mem: int = 0
    pending: int = 0

    def add(self, r: Request, sign: int = 1):
        self.running += sign
        self.quanta += sign * r.quanta
        self.cpu += sign * r.cpu_millis
        self.mem += sign * r.memory_bytes


def _cores(millis: int) -> str:
    return f"{millis / 1000:g}"


def held_reason(group: str, quota: Quota, used: Usage, req: Request, units: FgpuUnits) -> str | None:
    """Why ``group``'s quota keeps ``req`` waiting now (it holds ``used``), or None."""
    if quota.max_running and used.running >= quota.max_running:
        n = quota.max_running
        return f"{group} runs {used.running} of {n} session{'s' if n != 1 else ''}"
    asks = ""
    if quota.max_quanta and used.quanta + req.quanta > quota.max_quanta:
        if used.quanta < quota.max_quanta:
            asks = f"; this session asks for {units.to_fgpu(req.quanta)}"
        return f"{group} uses {units.to_fgpu(used.quanta)} of {units.to_fgpu(quota.max_quanta)} fGPU{asks}"
    if quota.max_cpu_millis and used.cpu + req.cpu_millis > quota.max_cpu_millis:
        if used.cpu < quota.max_cpu_millis:
            asks = f"; this session asks for {_cores(req.cpu_millis)}"
        return f"{group} uses {_cores(used.cpu)} of {_cores(quota.max_cpu_millis)} CPU{asks}"
    if quota.max_memory_bytes and used.mem + req.memory_bytes > quota.max_memory_bytes:
        if used.mem < quota.max_memory_bytes:
            asks = f"; this session asks for {format_bytes(req.memory_bytes)}"
        return (f"{group} uses {format_bytes(used.mem)} of {format_bytes(quota.max_memory_bytes)} "
                f"memory{asks}")
    return None


def never_reason(group: str, quota: Quota, req: Request, units: FgpuUnits) -> str | None:
    """Why ``req`` alone is more than ``group``'s quota (so it could never start), or None."""
    if quota.max_quanta and req.quanta > quota.max_quanta:
        return f"asks for {units.to_fgpu(req.quanta)} fGPU but {group}'s quota is {units.to_fgpu(quota.max_quanta)} fGPU"
    if quota.max_cpu_millis and req.cpu_millis > quota.max_cpu_millis:
        return f"asks for {_cores(req.cpu_millis)} CPU but {group}'s quota is {_cores(quota.max_cpu_millis)} CPU"
    if quota.max_memory_bytes and req.memory_bytes > quota.max_memory_bytes:
        return (f"asks for {format_bytes(req.memory_bytes)} memory but {group}'s quota is "
                f"{format_bytes(quota.max_memory_bytes)}")
    return None


def pending_reason(group: str, quota: Quota, used: Usage) -> str | None:
    """Why ``group`` may not queue another request now (its waiting requests), or None."""
    if quota.max_pending and used.pending >= quota.max_pending:
        n = quota.max_pending
        return f"{group} already has {used.pending} of {n} waiting session{'s' if n != 1 else ''}"
    return None


def pick_group(user_groups: list[str], policies: dict[str, GroupPolicy], chosen: str = "") -> str:
    """The group a user's session counts against: ``chosen`` if the user is in it, else the
    first of the user's groups that has a policy ("" if none has).  ValueError for a group the
    user is not in or that has no policy."""
    known = [g for g in user_groups if g in policies]
    if chosen:
        if chosen not in known:
            mine = ", ".join(known) or "none"
            raise ValueError(f"You are not in a group named {chosen!r} that has a quota (yours: {mine}).")
        return chosen
    return known[0] if known else ""


def resolve(user_groups: list[str], policies: dict[str, GroupPolicy], all_pools, chosen_group: str = "",
            chosen_pool: str = "", ungrouped: bool = True) -> tuple[str, tuple[str, ...]]:
    """(group, pools) a user's session counts against and may go to, or ValueError saying why not.

    ``chosen_group``: the form's choice ("" = the first of the user's groups that has a policy);
    ``chosen_pool``: one pool ("" = every pool the group may use); ``ungrouped``: whether a user in
    no group with a policy may start sessions (counted against no group, any pool)."""
    group = pick_group(user_groups, policies, chosen_group)
    if not group and policies and not ungrouped:
        raise ValueError("You are in no group that may start sessions here "
                         f"({', '.join(sorted(policies))}); ask an admin to add you to one.")
    allowed = tuple(sorted(policies[group].pools)) if group and policies[group].pools else ()
    if not chosen_pool:
        return group, allowed
    if chosen_pool not in all_pools:
        raise ValueError(f"There is no node pool {chosen_pool!r} (pools: {', '.join(sorted(all_pools))}).")
    if allowed and chosen_pool not in allowed:
        raise ValueError(f"{group or 'You'} may not use pool {chosen_pool!r}; allowed: {', '.join(allowed)}.")
    return group, (chosen_pool,)


def note_pools(user_groups: list[str], policies: dict[str, GroupPolicy], all_pools, chosen_group: str = "",
               chosen_pool: str = "", ungrouped: bool = True) -> tuple[tuple[str, ...], str]:
    """(pools, refusal) of the session the spawn form's note is about: the pools ``resolve`` lets a
    launch with the form's group and pool go to, and what that launch would be told instead ("" if
    nothing).  A ``chosen_group`` that is not one of ``user_groups`` counts as none chosen (the
    user's default group), so a stale or hand-made choice never widens the pools."""
    if chosen_group not in user_groups:
        chosen_group = ""
    try:
        return resolve(user_groups, policies, all_pools, chosen_group, chosen_pool, ungrouped)[1], ""
    except ValueError as e:
        return (), str(e)

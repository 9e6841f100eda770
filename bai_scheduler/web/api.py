"""The REST API under ``{prefix}api/``: capacity, the catalog, requests, the spawner's attempts, launches.

The spawner's calls (register, wait, release, stop-failed) need the service's own token
(``is_internal``); users and admins read through hub API tokens or the hub's
OAuth cookie.  Calls about one spawn attempt live under ``api/attempts/<id>``, apart
from the servers' paths, so that no server name can collide with them.
"""
from __future__ import annotations

import asyncio
import json
import math
import re

from tornado import web

from ..contract.catalog import visible_to
from ..contract.options import LAUNCHED, FormError, Limits, parse_options
from ..contract.registry import RegistryError
from ..core.forecast import capacity_note, kept_for_queue, never_fits, sessions_that_fit, trial_capacity
from ..core.quotas import note_pools, resolve
from ..hubapi import HubAPI, HubAPIError
from ..service import Refused
from .base import APIHandler, ReadOnlyGetMixin, in_background, log

NAME = r"([^/]+)"
ATTEMPT = r"([0-9a-f]{32})"


# Where a node's Docker engine is and its TLS files: for admins (and the hub's spawner) only.
ENGINE_KEYS = ("docker_url", "tls")


def without_engines(obj: dict) -> dict:
    """A copy of a node (``usage`` entry) or a placement without the engine's address."""
    return {k: v for k, v in obj.items() if k not in ENGINE_KEYS}


def public_status(status: dict, who: dict) -> dict:
    """``Service.status()`` as the caller may see it: users see node names and device use only."""
    if who["admin"] or "placement" not in status:
        return status
    return {**status, "placement": without_engines(status["placement"])}


def capacity_model(service, limits: Limits, readiness: dict, admin: bool, quanta: int | None = None,
                   count: int = 1, team: tuple[tuple[str, ...], str] = ((), "")) -> dict:
    """What GET api/capacity answers: nodes (with their GPU backend and whether it is ready; for
    admins why, and when it was checked, and each node's engine address), devices, use, queue
    length, the form's limits, and the form's live note for ``count`` sessions of ``quanta``
    (default: the form's first choice). ``readiness``: {node name: ``readiness.Readiness``};
    ``team``: ``note_team``'s (pools, refusal) of the session the note is about."""
    units = service.units
    if quanta is None:
        quanta = min(1, limits.max_quanta)
    usage = service.capacity()
    nodes = [{
        "name": node.name,
        "docker_url": node.docker_url,
        "simulated": node.simulated,
        **readiness[node.name].to_json(admin),
        "devices": [
            {"uuid": d.uuid, "index": d.index, "name": d.name, "memory_bytes": d.memory_bytes,
             "sm_count": d.sm_count, "quanta": d.quanta, "mig_profile": d.mig_profile}
            for d in node.devices
        ],
        "cpu_millis": node.cpu_millis,
        "memory_bytes": node.memory_bytes,
    } for node in service.nodes]
    if not admin:
        nodes, usage = [without_engines(n) for n in nodes], [without_engines(n) for n in usage]
    trial = trial_capacity(service.nodes, units, (r.placement for r in service.holding()),
                           span=service.span, strategy=service.strategy)
    queue_length = len(service.pending())
    pools, refused = team
    never = never_fits(trial, quanta, pools)
    queue = service.queue
    kept = kept_for_queue(trial, queue.pending(), queue.pin, queue.policy)
    level, text = capacity_note(usage, units, quanta, count, sessions_that_fit(trial, quanta, count, kept, pools),
                                queue_length, never, kept=bool(kept), pools=pools)
    if refused:
        level, text = "warning", f"This session would be refused: {refused}"
    return {
        "fgpu_per_gpu": units.fgpu_per_gpu,
        "fgpu_step": str(units.fgpu_step),
        "quanta_per_gpu": units.quanta_per_gpu,
        "span": service.span,
        "nodes": nodes,
        "usage": usage,
        **teams_model(service, usage, admin),
        "overcommitted": service.overcommitted(),
        "queue_length": queue_length,
        "simulated": any(n.simulated for n in service.nodes),
        "limits": limits.to_json(),
        "note": {"quanta": quanta, "count": count, "level": level, "text": text},
    }


def teams_model(service, usage: list[dict], admin: bool) -> dict:
    """Pools (their nodes and free fGPU), the groups' policies, and for admins each group's use."""
    units = service.units
    pools: dict[str, dict] = {}
    for node in usage:
        p = pools.setdefault(node.get("pool", "default"), {"nodes": [], "capacity_quanta": 0, "free_quanta": 0})
        p["nodes"].append(node["name"])
        p["capacity_quanta"] += node["capacity_quanta"]
        p["free_quanta"] += max(0, node["capacity_quanta"] - node["used_quanta"])
    for p in pools.values():
        p["capacity_fgpu"], p["free_fgpu"] = units.to_fgpu(p["capacity_quanta"]), units.to_fgpu(p["free_quanta"])
    out = {
        "pools": pools,
        "groups": {name: {"pools": list(g.pools), "lifetime_s": g.lifetime_s or service.default_lifetime,
                          "quota": {"running": g.quota.max_running, "pending": g.quota.max_pending,
                                    "fgpu": units.to_fgpu(g.quota.max_quanta), "cpu_millis": g.quota.max_cpu_millis,
                                    "memory_bytes": g.quota.max_memory_bytes}}
                   for name, g in service.groups.items()},
        "default_lifetime_s": service.default_lifetime,
    }
    if admin:
        out["group_usage"] = service.group_usage()
    return out


async def user_groups(hub: HubAPI, user: str) -> list[str]:
    """The user's JupyterHub groups, in the hub's order (web.HTTPError if the hub cannot say)."""
    try:
        model = await hub.get_user(user)
    except (HubAPIError, OSError) as e:
        raise web.HTTPError(503, f"Cannot read {user}'s groups from the hub ({e}); try again.") from None
    return list((model or {}).get("groups") or [])


async def team_of(service, hub: HubAPI, user: str, options: dict, ungrouped: bool) -> tuple[str, tuple[str, ...]]:
    """(group, pools) of a session from its options' group and pool (web.HTTPError 400 if not allowed)."""
    group, pool = options.get("group") or "", options.get("pool") or ""
    if not isinstance(group, str) or not isinstance(pool, str):
        raise web.HTTPError(400, "group and pool must be names.")
    if not service.groups and not pool:
        return "", ()
    groups = await user_groups(hub, user) if service.groups else []
    pools = {n.pool for n in service.nodes}
    try:
        return resolve(groups, service.groups, pools, group, pool, ungrouped)
    except ValueError as e:
        raise web.HTTPError(400, str(e)) from None


def note_team(service, groups: list[str], group: str, pool: str, ungrouped: bool) -> tuple[tuple[str, ...], str]:
    """``quotas.note_pools`` on this service's groups and pools: (pools, refusal) for the form's note."""
    return note_pools(groups, service.groups, {n.pool for n in service.nodes}, group, pool, ungrouped)


class HealthHandler(APIHandler):
    """Open to anyone (load balancers, start-up checks): ok or not, nothing more."""

    def get(self):
        ok = self.service.degraded is None
        self.write_json({"ok": ok}, 200 if ok else 503)


class CapacityHandler(ReadOnlyGetMixin, APIHandler):
    """GET api/capacity (also ``capacity.json``, which the spawn form's script on the hub's
    page polls with ``?quanta=Q&count=N&group=G&pool=P`` for its live note: a user's note counts
    only the nodes of the pools that group and pool allow, ``quotas.note_pools``)."""

    def _whole(self, name: str, lo: int, hi: int) -> int | None:
        raw = self.get_argument(name, None)
        if raw is None:
            return None
        if not re.fullmatch(r"[0-9]{1,6}", raw) or not lo <= int(raw) <= hi:
            raise web.HTTPError(400, f"{name} must be a whole number from {lo} to {hi}.")
        return int(raw)

    def _name(self, name: str) -> str:
        raw = self.get_argument(name, "")
        if len(raw) > 63 or any(c.isspace() for c in raw):
            raise web.HTTPError(400, f"{name} must be a name.")
        return raw

    async def get(self):
        who = self.identity()
        limits: Limits = self.settings["limits"]
        quanta = self._whole("quanta", 0, limits.max_quanta)
        count = self._whole("count", 1, limits.max_sessions) or 1
        group, pool = self._name("group"), self._name("pool")
        team = ((), "")
        if who["name"] and who["kind"] == "user" and (self.service.groups or pool):
            # The note is about the caller's own session: only the nodes it could be placed on.
            # (A service, an admin's tool for instance, has no groups of its own: it sees all.)
            groups = await user_groups(self.hub, who["name"]) if self.service.groups else []
            team = note_team(self.service, groups, group, pool, self.bai.allow_ungrouped)
        self.set_header("Cache-Control", "no-store")
        self.write_json(capacity_model(self.service, limits, self.settings["readiness"], who["admin"], quanta, count,
                                       team))


class CapacityForFormsHandler(CapacityHandler):
    """GET capacity.json: what the session form's script asks, also from the hub's spawn page,
    where the browser may not have this service's login cookie yet. Then it is sent through the
    hub's OAuth (this service needs no consent) and comes back here logged in; the script's fetch
    follows those redirects, so the live note works before the sessions page was ever opened."""

    async def get(self):
        if not self.current_user and not self.is_internal():
            self.redirect(self.get_login_url())
            return
        await super().get()


class CatalogHandler(APIHandler):
    """GET api/catalog: the images the caller may launch, read from the registry (cached for
    ``c.BaiRegistry.catalog_ttl``): kernel images and the caller's own private images; admins and
    the hub's spawner (which checks each spawn's image against it) get every image."""

    async def get(self):
        who = self.identity()
        try:
            images = await self.settings["catalog"].get()
        except RegistryError as e:
            raise web.HTTPError(503, e.message) from None
        if not who["internal"]:
            images = visible_to(images, who["name"], who["admin"])
        self.set_header("Cache-Control", "no-store")
        self.write_json({"images": [c.to_json() for c in images], "registry": self.settings["registry"].host})


class RequestsHandler(APIHandler):
    def get(self):
        who = self.identity()
        out = [public_status(s, who) for s in self.service.statuses(
            r for r in self.service.records.values() if who["admin"] or r.key.user == who["name"])]
        out.sort(key=lambda s: (s["state"] != "RUNNING", s["state"] == "STOPPING", s.get("position") or 0,
                                s["submitted_at"]))
        self.write_json({"requests": out, "epoch": self.service.epoch})


class RequestHandler(APIHandler):
    FIELDS = {"quanta", "cpu_millis", "memory_bytes", "image", "user_options"}

    def get(self, user, server):
        who = self.identity()
        self.check_owner(who, user)
        rec = self.service.get(self.key(user, server))
        if rec is None:
            raise web.HTTPError(404, "No such request.")
        self.write_json(public_status(self.service.status(rec), who))

    async def put(self, user, server):
        """The spawner registers a new spawn attempt of the server it starts."""
        if not self.is_internal():
            raise web.HTTPError(403, "Only the hub's spawner registers requests; start servers through the hub.")
        body = self.json_body(self.FIELDS)
        nums = {}
        for field in ("quanta", "cpu_millis", "memory_bytes"):
            v = body.get(field, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 2**53:
                raise web.HTTPError(400, f"{field} must be a non-negative integer.")
            nums[field] = v
        image = body.get("image", "")
        options = body.get("user_options", {})
        if not isinstance(image, str) or not isinstance(options, dict):
            raise web.HTTPError(400, "image must be a string and user_options an object.")
        group, pools = await team_of(self.service, self.hub, user, options, self.bai.allow_ungrouped)
        try:
            rec = await self.service.submit(self.key(user, server), image=image, user_options=options,
                                            group=group, pools=pools, **nums)
        except Refused as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.write_json(self.service.status(rec), 201)

    async def delete(self, user, server):
        """A user (or admin) stops a session, through the hub so its view stays true."""
        who = self.identity()
        key = self.key(user, server)
        if who["internal"]:
            raise web.HTTPError(400, "The spawner releases an attempt with DELETE api/attempts/<id>.")
        self.check_owner(who, user)
        rec = self.service.get(key)
        if rec is None:
            raise web.HTTPError(404, "No such request.")
        self.check_may(who, "delete", user, server)
        try:
            await self.hub.stop_server(user, server)
            hub_stops_it = True
        except (HubAPIError, OSError) as e:
            log.info("Hub stop of %s: %s; stopping it here", key, e)
            hub_stops_it = False
        await stop_session(self.service, rec, hub_stops_it)
        self.write_json({"released": rec.state == "PENDING", "stopping": rec.state != "PENDING"})


async def stop_session(service, rec, hub_stops_it: bool) -> None:
    """After asking the hub to stop a server: a queued request, or an admission no spawner has,
    is stopped here; a started one only when the hub could not (its spawner then removes the
    container and releases the share; otherwise the service removes it, then frees the share)."""
    if rec.state == "PENDING" or not rec.delivered or not hub_stops_it:
        await service.stop(rec.key)


class AttemptHandler(APIHandler):
    """The spawner's calls about one spawn attempt."""

    def attempt(self, attempt_id: str):
        if not self.is_internal():
            raise web.HTTPError(403, "Only the hub's spawner uses spawn attempts.")
        return self.service.attempt(attempt_id)

    async def delete(self, attempt_id):
        """This attempt's container is gone, or was never made: its share can go."""
        self.attempt(attempt_id)
        freed = await self.service.release(attempt_id)
        self.write_json({"released": True, "admitted": [str(r.key) for r in freed]})


class StopFailedHandler(AttemptHandler):
    async def post(self, attempt_id):
        """The spawner could not stop this attempt's container: the share stays held and the
        service removes the container itself (retrying)."""
        if self.attempt(attempt_id) is None:
            raise web.HTTPError(404, "No such attempt.")
        body = self.json_body({"message"})
        message = body.get("message", "")
        if not isinstance(message, str):
            raise web.HTTPError(400, "message must be a string.")
        try:
            rec = await self.service.stopping(attempt_id, message or "the spawner could not stop it")
        except Refused as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.write_json(self.service.status(rec), 202)


class WaitHandler(AttemptHandler):
    async def get(self, attempt_id):
        self.attempt(attempt_id)
        try:
            epoch = int(self.get_argument("epoch", "-1"))
            timeout = float(self.get_argument("timeout", str(self.bai.wait_timeout)))
        except ValueError:
            raise web.HTTPError(400, "epoch and timeout must be numbers.") from None
        if not math.isfinite(timeout):
            # NaN would hold the long-poll open for ever (every comparison is False).
            raise web.HTTPError(400, "timeout must be a finite number of seconds.")
        timeout = min(max(timeout, 0.0), 300.0)
        try:
            rec = await self.service.wait(attempt_id, epoch, timeout)
        except asyncio.CancelledError:
            # The service is stopping (a hub restart): the request stays queued in the database.
            # A 503 (tornado would answer 500) tells the spawner to wait for the service, not give up.
            if not self._finished:
                self.set_status(503)
                self.finish(json.dumps({"status": 503, "message": "The scheduler is restarting; "
                                        "the request stays queued."}))
            raise
        if rec is None:
            self.write_json({"id": attempt_id, "state": "GONE", "epoch": self.service.epoch,
                             "reason": self.service.gone_reason(attempt_id) or "The request was cancelled."})
            return
        await self.service.mark_delivered(rec)
        self.write_json(self.service.status(rec))


class ServerRemovalHandler(APIHandler):
    """DELETE api/servers/<user>/<server>: the spawner of a session launched in a group, on its
    stop: the service removes that named server from the hub once the hub has it stopped."""

    async def delete(self, user, server):
        if not self.is_internal():
            raise web.HTTPError(403, "Only the hub's spawner asks for this.")
        key = self.key(user, server)
        if not key.server:
            raise web.HTTPError(400, "The default server is never removed.")
        in_background(self._remove(key.user, key.server))
        self.write_json({"removing": f"{key.user}/{key.server}"}, 202)

    async def _remove(self, user: str, server: str):
        try:
            if await self.hub.remove_server_when_stopped(user, server):
                log.info("Removed %s/%s (launched in a group) from the hub's server list", user, server)
        except (HubAPIError, OSError) as e:
            log.warning("Could not remove %s/%s from the hub's server list: %s", user, server, e)


class LaunchHandler(APIHandler):
    """Start several sessions of one shape at once (named servers through the hub)."""

    async def post(self):
        who = self.identity()
        body = self.json_body({"count", "options", "user", "prefix"})
        user = body.get("user") or who["name"]
        if not isinstance(user, str) or not user:
            raise web.HTTPError(400, "Say which user launches.")
        if not who["admin"] and user != who["name"]:
            raise web.HTTPError(403, 'Only admins may launch sessions for another user; leave out "user" '
                                     "to launch your own.")
        self.check_may(who, "start", user)
        count = body.get("count", 1)
        most = self.settings["limits"].max_sessions
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= most:
            raise web.HTTPError(400, f"count must be a whole number from 1 to {most}.")
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise web.HTTPError(400, "options must be an object.")
        prefix = body.get("prefix", "session")
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", prefix):
            raise web.HTTPError(400, "prefix must be lower-case letters, digits and '-' (at most 31).")
        names = await launch_sessions(self.hub, user, prefix, count, self.one_session(options))
        self.write_json({"launched": names}, 202)

    def one_session(self, options: dict) -> dict:
        """The options each launched session gets, checked as the spawn form checks them.

        The launch's size is its ``count`` alone: a ``sessions`` field here would make
        every launched server launch more (count x sessions, past the limit). Without
        an image the hub's spawner gives each session its default one, as for any spawn.
        """
        named = bool(options.get("image") or options.get("image_name"))
        try:
            opts = parse_options(options if named else {**options, "image": "default"}, self.service.units,
                                 self.settings["limits"])
        except FormError as e:
            raise web.HTTPError(400, str(e)) from None
        if opts.sessions != 1:
            raise web.HTTPError(400, "Say how many sessions with count; options.sessions may only be 1.")
        one = opts.to_user_options()
        if not named:
            del one["image"]
        return one


async def launch_sessions(hub: HubAPI, user: str, prefix: str, count: int, options: dict) -> list[str]:
    """Start ``count`` named servers ``{prefix}-N`` (free numbers) of one shape, all at once, so
    that they are queued together and every row shows up together.  Their ``user_options`` say
    they were launched in a group: each is removed from the hub's list once it stops."""
    try:
        model = await hub.get_user(user)
    except HubAPIError as e:
        raise web.HTTPError(404 if e.code == 404 else 502, f"Hub: {e}") from None
    taken = set((model or {}).get("servers", {}))
    names, i = [], 1
    while len(names) < count:
        name = f"{prefix}-{i}"
        i += 1
        if name not in taken:
            names.append(name)
    options = {**options, LAUNCHED: True}
    results = await asyncio.gather(*(hub.start_server(user, name, options) for name in names),
                                   return_exceptions=True)
    refused = [(name, r) for name, r in zip(names, results) if isinstance(r, BaseException)]
    if refused:
        for _, r in refused:
            if not isinstance(r, HubAPIError):
                raise r
        started = [name for name, r in zip(names, results) if not isinstance(r, BaseException)]
        worst = max(r.code for _, r in refused)
        raise web.HTTPError(400 if worst < 500 else 502,
                            f"Started {', '.join(started) or 'none'}; the hub refused "
                            + "; ".join(f"{name}: {r.message}" for name, r in refused))
    return names


default_handlers = [
    (r"api/health", HealthHandler),
    (r"api/capacity", CapacityHandler),
    (r"capacity\.json", CapacityForFormsHandler),
    (r"api/catalog", CatalogHandler),
    (r"api/requests", RequestsHandler),
    (rf"api/attempts/{ATTEMPT}", AttemptHandler),
    (rf"api/attempts/{ATTEMPT}/wait", WaitHandler),
    (rf"api/attempts/{ATTEMPT}/stop-failed", StopFailedHandler),
    (rf"api/requests/{NAME}/?([^/]*)", RequestHandler),
    (r"api/launch", LaunchHandler),
    (rf"api/servers/{NAME}/{NAME}", ServerRemovalHandler),
]

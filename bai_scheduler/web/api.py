"""The REST API under ``{prefix}api/``: capacity, the catalog, requests, the spawner's long-poll, launches.

The spawner's calls (register, wait, release) need the service's own token
(``is_internal``); users and admins read through hub API tokens or the hub's
OAuth cookie.
"""
from __future__ import annotations

import math
import re

from tornado import web

from ..contract.catalog import visible_to
from ..contract.options import FormError, Limits, parse_options
from ..contract.registry import RegistryError
from ..core.forecast import capacity_note, never_fits, sessions_that_fit, trial_capacity
from ..hubapi import HubAPI, HubAPIError
from ..service import Refused
from .base import APIHandler, ReadOnlyGetMixin, log

NAME = r"([^/]+)"


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
                   count: int = 1) -> dict:
    """What GET api/capacity answers: nodes (with their GPU backend and whether it is ready; for
    admins why, and when it was checked, and each node's engine address), devices, use, queue
    length, the form's limits, and the form's live note for ``count`` sessions of ``quanta``
    (default: the form's first choice). ``readiness``: {node name: ``readiness.Readiness``}."""
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
    trial = trial_capacity(service.nodes, units, (r.placement for r in service.running() if r.placement),
                           span=service.span, strategy=service.strategy)
    queue_length = len(service.pending())
    never = never_fits(trial, quanta)
    level, text = capacity_note(usage, units, quanta, count, sessions_that_fit(trial, quanta, count), queue_length,
                                never)
    return {
        "fgpu_per_gpu": units.fgpu_per_gpu,
        "fgpu_step": str(units.fgpu_step),
        "quanta_per_gpu": units.quanta_per_gpu,
        "span": service.span,
        "nodes": nodes,
        "usage": usage,
        "queue_length": queue_length,
        "simulated": any(n.simulated for n in service.nodes),
        "limits": limits.to_json(),
        "note": {"quanta": quanta, "count": count, "level": level, "text": text},
    }


class HealthHandler(APIHandler):
    """Open to anyone (load balancers, start-up checks): ok or not, nothing more."""

    def get(self):
        ok = self.service.degraded is None
        self.write_json({"ok": ok}, 200 if ok else 503)


class CapacityHandler(ReadOnlyGetMixin, APIHandler):
    """GET api/capacity (also ``capacity.json``, which the spawn form's script on the hub's
    page polls with ``?quanta=Q&count=N`` for its live note)."""

    def _whole(self, name: str, lo: int, hi: int) -> int | None:
        raw = self.get_argument(name, None)
        if raw is None:
            return None
        if not re.fullmatch(r"[0-9]{1,6}", raw) or not lo <= int(raw) <= hi:
            raise web.HTTPError(400, f"{name} must be a whole number from {lo} to {hi}.")
        return int(raw)

    def get(self):
        who = self.identity()
        limits: Limits = self.settings["limits"]
        quanta = self._whole("quanta", 0, limits.max_quanta)
        count = self._whole("count", 1, limits.max_sessions) or 1
        self.set_header("Cache-Control", "no-store")
        self.write_json(capacity_model(self.service, limits, self.settings["readiness"], who["admin"], quanta, count))


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
        out = [
            public_status(self.service.status(r), who) for r in self.service.records.values()
            if who["admin"] or r.key.user == who["name"]
        ]
        out.sort(key=lambda s: (s["state"] != "RUNNING", s.get("position") or 0, s["submitted_at"]))
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
        """The spawner registers (or re-attaches to) the request of the server it starts."""
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
        try:
            rec = await self.service.submit(
                self.key(user, server), image=image, user_options=options, reattach=True, **nums
            )
        except Refused as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.write_json(self.service.status(rec), 201)

    async def delete(self, user, server):
        who = self.identity()
        key = self.key(user, server)
        if who["internal"]:
            request_id = self.get_argument("request_id", None, strip=False)
            if request_id is not None and not request_id.strip():
                raise web.HTTPError(400, "request_id is empty.")
            freed = await self.service.release(key, request_id)
            self.write_json({"released": True, "admitted": [str(r.key) for r in freed]})
            return
        self.check_owner(who, user)
        rec = self.service.get(key)
        if rec is None:
            raise web.HTTPError(404, "No such request.")
        self.check_may(who, "delete", user, server)
        # Go through the hub so its view of the server stays true; the spawner's
        # stop() then releases. A request the hub no longer tracks is released here.
        try:
            await self.hub.stop_server(user, server)
        except (HubAPIError, OSError) as e:
            log.info("Hub stop of %s: %s; releasing directly", key, e)
        await self.service.release(key, rec.id)
        self.write_json({"released": True})


class WaitHandler(APIHandler):
    async def get(self, user, server):
        if not self.is_internal():
            raise web.HTTPError(403, "Only the hub's spawner waits on requests.")
        key = self.key(user, server)
        try:
            epoch = int(self.get_argument("epoch", "-1"))
            timeout = float(self.get_argument("timeout", str(self.bai.wait_timeout)))
        except ValueError:
            raise web.HTTPError(400, "epoch and timeout must be numbers.") from None
        if not math.isfinite(timeout):
            # NaN would hold the long-poll open for ever (every comparison is False).
            raise web.HTTPError(400, "timeout must be a finite number of seconds.")
        timeout = min(max(timeout, 0.0), 300.0)
        rec = await self.service.wait(key, epoch, timeout)
        if rec is None:
            self.write_json({"state": "GONE", "epoch": self.service.epoch,
                             "reason": "The request was cancelled."})
            return
        self.write_json(self.service.status(rec))


class LaunchHandler(APIHandler):
    """Start several sessions of one shape at once (named servers through the hub)."""

    async def post(self):
        who = self.identity()
        body = self.json_body({"count", "options", "user", "prefix"})
        user = body.get("user") or who["name"]
        if not isinstance(user, str) or not user:
            raise web.HTTPError(400, "Say which user launches.")
        self.check_owner(who, user)
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
    try:
        model = await hub.get_user(user)
    except HubAPIError as e:
        raise web.HTTPError(404 if e.code == 404 else 502, f"Hub: {e}") from None
    taken = set((model or {}).get("servers", {}))
    names, i = [], 1
    while len(names) < count:
        name = f"{prefix}-{i}"
        i += 1
        if name in taken:
            continue
        try:
            await hub.start_server(user, name, options)
        except HubAPIError as e:
            raise web.HTTPError(400 if e.code < 500 else 502,
                                f"Started {names or 'none'}; {name} refused: {e}") from None
        names.append(name)
    return names


default_handlers = [
    (r"api/health", HealthHandler),
    (r"api/capacity", CapacityHandler),
    (r"capacity\.json", CapacityHandler),
    (r"api/catalog", CatalogHandler),
    (r"api/requests", RequestsHandler),
    (rf"api/requests/{NAME}/?([^/]*)/wait", WaitHandler),
    (rf"api/requests/{NAME}/?([^/]*)", RequestHandler),
    (r"api/launch", LaunchHandler),
]

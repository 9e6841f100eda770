"""The bai-scheduler JupyterHub service: REST API, engine watchers, pages.

Run by the hub as a managed service (see hub_config/jupyterhub_config.py),
reading the same config file as the hub; its own options live under
``c.BaiScheduler``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import signal
import sys
from urllib.parse import urlparse

from tornado import httpserver, web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated

from . import engines, inventory
from .hubapi import HubAPI, HubAPIError
from .model import Node, RequestKey
from .queue import QueuePolicy, UserLimits
from .service import Refused, SchedulerService
from .store import Store, StoreUnavailable
from .units import FgpuUnits

MAX_BODY = 64 * 1024
NAME_RE = re.compile(r"^[^/\x00-\x1f]{1,255}$")


class BaiScheduler(Application):
    name = "bai-scheduler"
    description = "Queue, capacity and placement for BAI Hub sessions"

    config_file = Unicode(
        "", config=True,
        help="Config file to load (the hub's jupyterhub_config.py; only c.BaiScheduler is used).",
    )
    aliases = {"config": "BaiScheduler.config_file", "db-url": "BaiScheduler.db_url"}

    hub_id = Unicode(
        "bai", config=True,
        help="This deployment's name on its session containers (label org.bai-hub.hub); the service "
        "reconciles and watches only containers with it. Must equal c.BaiSpawner.hub_id.",
    )
    db_url = Unicode(
        "sqlite:///bai_scheduler.sqlite", config=True,
        help="SQLAlchemy URL of the queue and allocation database, e.g. "
        "postgresql://bai:secret@db/bai. SQLite is fine for one machine.",
    )
    fgpu_per_gpu = Integer(
        2, config=True,
        help="How many fGPU one physical GPU is. 2 means 1 fGPU = half a GPU's memory and SMs.",
    )
    fgpu_step = Unicode(
        "0.5", config=True,
        help="Smallest fGPU amount a user may ask for, and the step of every request "
        "(one step = one quantum). Must divide fgpu_per_gpu exactly.",
    )
    nodes = List(
        Dict(), config=True,
        help="""Worker nodes, one Docker engine each. Keys: name, docker_url ("" = local engine
        from DOCKER_HOST or the default socket; "tcp://host:2376" with tls {client_cert, ca_cert}),
        gpus ("auto": real GPUs read with nvidia-ml-py on the local engine, else the simulated
        inventory; an int: that many simulated GPUs), gpu_memory (e.g. "8GiB"), gpu_name, sm_count,
        cpu (millicores the scheduler may hand out, 0 = unlimited), memory (bytes or "64GiB").""",
    )

    @default("nodes")
    def _default_nodes(self):
        return [{"name": "local", "docker_url": "", "gpus": "auto"}]

    simulated_gpus = Dict(
        {"gpus": 1, "gpu_memory": "8GiB", "gpu_name": "Simulated GPU (8 GiB)", "sm_count": 108},
        config=True,
        help="Inventory used for a node with gpus='auto' when NVML finds no GPU (this mirrors "
        "the seed's demo: one 8 GiB GPU). The hub and pages then say GPUs are simulated.",
    )
    queue_order = Unicode("fifo", config=True, help="Queue order: 'fifo' or 'drf' (dominant resource fairness across users).")
    queue_head = Unicode(
        "backfill", config=True,
        help="What a head that does not fit does: 'strict' (everyone waits), 'skip' (skip it after "
        "skip_after passes) or 'backfill' (smaller requests start when they cannot delay the head).",
    )
    skip_after = Integer(3, config=True, help="Passes a head may block before 'skip' lets others past.")
    span = Unicode(
        "whole-then-fraction", config=True,
        help="Requests above one GPU: 'whole-then-fraction' (whole devices, then a fraction on one "
        "more device of the same node) or 'whole-only' (above one GPU only whole multiples).",
    )
    strategy = Unicode(
        "concentrate", config=True,
        help="Placement: 'concentrate' (best fit; keeps whole GPUs free) or 'spread' (emptiest first).",
    )
    max_running_per_user = Integer(0, config=True, help="Running sessions a user may have (0 = no limit).")
    max_pending_per_user = Integer(0, config=True, help="Queued sessions a user may have (0 = no limit).")
    max_fgpu_per_user = Unicode("0", config=True, help="fGPU a user may hold at once, e.g. '2' (0 = no limit).")
    max_cpu_per_user = Float(0, config=True, help="CPUs a user may hold at once (0 = no limit).")
    max_memory_per_user = Unicode("0", config=True, help="Memory a user may hold at once, e.g. '32GiB' (0 = no limit).")
    wait_timeout = Float(30, config=True, help="Seconds a spawner's long-poll for its request is held open.")
    db_timeout = Float(
        5, config=True,
        help="Seconds the database may take to connect, or to run one statement (including waiting "
        "for another writer's lock), before a change fails with 'database unavailable'.",
    )
    admission_grace = Float(
        300, config=True,
        help="Seconds after an admission during which its container may still be being made: a "
        "reconcile that finds no container frees the share only after this (or at once when no "
        "spawner ever got the admission). Keep it above c.BaiSpawner.container_start_timeout.",
    )
    orphan_grace = Float(
        120, config=True,
        help="Seconds a session container may run while the hub does not know its server (e.g. the "
        "hub restarted while the container was starting, so it never saved that spawn). After that "
        "the service removes the container and frees its share.",
    )
    max_launch = Integer(8, config=True, help="Most sessions a user may launch in one action.")

    # -- snapshots (bai_scheduler/snapshots.py) --
    private_image_repo = Unicode(
        "bai-private", config=True,
        help="Repository prefix of private images made from sessions: <repo>/<user>:<tag>. "
        "Lower-case Docker repository path, e.g. 'bai-private' or 'registry.local/bai-private'.",
    )
    max_private_images_per_user = Integer(
        5, config=True, help="Private images (snapshots) one user may own at once (0 = no limit).",
    )
    snapshot_pause = Bool(
        True, config=True,
        help="Freeze the session's processes while `docker commit` runs (Docker's default). The "
        "image is then a consistent copy; the session resumes unchanged afterwards. False: no "
        "freeze, but a file being written during the commit may be captured half-written.",
    )

    @validate("fgpu_step")
    def _check_step(self, proposal):
        FgpuUnits(self.fgpu_per_gpu, proposal.value)
        return proposal.value

    @validate("queue_order")
    def _check_order(self, proposal):
        if proposal.value not in ("fifo", "drf"):
            raise ValueError("queue_order must be 'fifo' or 'drf'")
        return proposal.value

    @validate("queue_head")
    def _check_head(self, proposal):
        if proposal.value not in ("strict", "skip", "backfill"):
            raise ValueError("queue_head must be 'strict', 'skip' or 'backfill'")
        return proposal.value

    # -- assembly ---------------------------------------------------------------

    @property
    def units(self) -> FgpuUnits:
        return FgpuUnits(self.fgpu_per_gpu, self.fgpu_step)

    def build_nodes(self) -> list[Node]:
        nodes = []
        for spec in self.nodes:
            spec = dict(spec)
            gpus = spec.get("gpus", "auto")
            if gpus == "auto":
                try:
                    devices = inventory.nvml_devices(self.units)
                    node = inventory.simulated_nodes([{**spec, "gpus": 0}], self.units)[0]
                    node = Node(node.name, node.docker_url, devices, node.cpu_millis, node.memory_bytes, simulated=False)
                    self.log.info("Node %s: %d real GPU(s) from NVML", node.name, len(devices))
                except inventory.NoGpuError as e:
                    node = inventory.simulated_nodes([{**self.simulated_gpus, **spec, "gpus": self.simulated_gpus.get("gpus", 1)}], self.units)[0]
                    self.log.warning(
                        "Node %s: no GPU found (%s); using a SIMULATED inventory of %d GPU(s)",
                        node.name, e, len(node.devices),
                    )
            else:
                node = inventory.simulated_nodes([spec], self.units)[0]
                self.log.warning("Node %s: SIMULATED inventory of %d GPU(s)", node.name, len(node.devices))
            nodes.append(node)
        return nodes

    def limits(self) -> UserLimits:
        return UserLimits(
            max_running=self.max_running_per_user,
            max_pending=self.max_pending_per_user,
            max_quanta=self.units.to_quanta(self.max_fgpu_per_user),
            max_cpu_millis=int(self.max_cpu_per_user * 1000),
            max_memory_bytes=inventory.parse_bytes(self.max_memory_per_user),
        )

    def initialize(self, argv=None):
        super().initialize(argv)
        if self.config_file:
            self.load_config_file(self.config_file)
        logging.basicConfig(level=logging.INFO, format="[%(levelname).1s %(asctime)s bai-scheduler] %(message)s")
        self.log = logging.getLogger("bai_scheduler")
        self.node_list = self.build_nodes()
        self.store = Store(self.db_url, timeout=self.db_timeout)
        self.engines = engines.DockerEngines(self.node_list, self.hub_id)
        self.service = SchedulerService(
            self.node_list, self.units, self.store,
            policy=QueuePolicy(order=self.queue_order, head=self.queue_head, skip_after=self.skip_after),
            limits=self.limits(), span=self.span, strategy=self.strategy,
            engines=self.engines, admission_grace=self.admission_grace, orphan_grace=self.orphan_grace,
        )
        self._reconciling = asyncio.Lock()
        self.hub = HubAPI()
        self.internal_token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        self.service.on_orphan_admitted = self.start_orphan
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/bai-scheduler/")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.hub_auth = HubOAuth(api_token=self.internal_token, cache_max_age=60)

    async def start_orphan(self, rec, attempts: int = 60):
        """Ask the hub to start a server admitted while nobody waited for it."""
        for _ in range(attempts):
            if self.service.get(rec.key) is not rec or self.service.is_attached(rec):
                return
            try:
                await self.hub.start_server(rec.key.user, rec.key.server, rec.user_options)
                return
            except HubAPIError as e:
                if e.code == 400 and "already" in str(e):
                    return
                self.log.warning("Hub could not start %s yet: %s", rec.key, e)
            except OSError as e:
                self.log.warning("Hub unreachable while starting %s: %s", rec.key, e)
            await asyncio.sleep(5)

    reconcile_interval = Float(
        60, config=True,
        help="Seconds between full reconciles with the engines. Engine events free shares at once; "
        "this only collects what events could not tell (e.g. an admission whose spawn never came).",
    )

    async def reconcile_forever(self):
        while True:
            await asyncio.sleep(self.reconcile_interval)
            await self.reconcile_all()

    async def reconcile_all(self, *_):
        async with self._reconciling:
            since = self.service.begin_listing()
            names = [n.name for n in self.node_list]
            listed = await asyncio.gather(*(self.engines.list(n) for n in names), return_exceptions=True)
            listing = {}
            for name, facts in zip(names, listed):
                if isinstance(facts, BaseException):
                    self.log.error("Cannot list containers on node %s (%s): its sessions are left as they are",
                                   name, facts)
                    facts = None
                listing[name] = facts
            try:
                hub_servers = {RequestKey(u, s) for u, s in await self.hub.active_servers()}
            except (HubAPIError, OSError, KeyError, TypeError) as e:
                self.log.warning("The hub's servers are unknown (%s): no container is removed as unknown to it", e)
                hub_servers = None
            try:
                result = await self.service.reconcile(listing, since, hub_servers)
            except StoreUnavailable as e:
                self.log.error("Reconcile postponed: %s", e)
                return
            if any(result.values()):
                self.log.warning("Reconciled with the engines: %s", {k: v for k, v in result.items() if v})

    async def container_event(self, facts, what: str):
        """An engine event about a session container: "removed" frees its share; "exited" has
        the service remove the container first."""
        try:
            if what == "removed":
                freed = await self.service.container_gone(facts.request_id)
                self.log.info("Container of %s removed; admitted %s", facts.key, [str(r.key) for r in freed])
            else:
                await self.service.container_exited(facts.request_id)
        except StoreUnavailable as e:
            self.log.error("Could not record that the container of %s ended: %s", facts.key, e)

    def make_app(self) -> web.Application:
        from . import pages, snapshots

        p = self.prefix
        name = r"([^/]+)"
        attempt = r"([0-9a-f]{32})"
        handlers = [
            (p + r"api/health", HealthHandler),
            (p + r"api/capacity", CapacityHandler),
            (p + r"api/requests", RequestsHandler),
            # Per attempt, apart from the servers' paths: no server name can collide with them.
            (p + rf"api/attempts/{attempt}", AttemptHandler),
            (p + rf"api/attempts/{attempt}/wait", WaitHandler),
            (p + rf"api/attempts/{attempt}/stop-failed", StopFailedHandler),
            (p + rf"api/requests/{name}/?([^/]*)", RequestHandler),
            (p + r"api/launch", LaunchHandler),
            (p + r"metrics", MetricsHandler),
            (p + r"oauth_callback", HubOAuthCallbackHandler),
        ] + pages.handlers(p) + snapshots.handlers(p)
        return web.Application(
            handlers,
            default_handler_class=NotFoundHandler,
            bai=self,
            hub_auth=self.hub_auth,
            cookie_secret=os.urandom(32),
            template_path=os.path.join(os.path.dirname(__file__), "templates"),
            static_path=os.path.join(os.path.dirname(__file__), "static"),
            static_url_prefix=p + "static/",
            xsrf_cookies=False,
        )

    def start(self):
        asyncio.run(self.serve())

    async def serve(self):
        url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8090"))
        await self.reconcile_all()
        loop = asyncio.get_running_loop()
        self.watchers = [
            engines.EventWatcher(n, loop, self.container_event, self.reconcile_all, self.hub_id) for n in self.node_list
        ]
        for w in self.watchers:
            w.start()
        sweeper = asyncio.ensure_future(self.reconcile_forever())
        server = httpserver.HTTPServer(self.make_app(), max_body_size=MAX_BODY * 16)
        server.listen(url.port or 80, url.hostname or "127.0.0.1")
        self.log.info("bai-scheduler listening on %s%s", url.geturl(), self.prefix)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.log.info("bai-scheduler stopping; queued requests stay in the database")
        server.stop()
        sweeper.cancel()
        for w in self.watchers:
            w.stop()


# -- handlers --------------------------------------------------------------------


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    @property
    def bai(self) -> BaiScheduler:
        return self.settings["bai"]

    @property
    def service(self) -> SchedulerService:
        return self.bai.service

    def is_internal(self) -> bool:
        auth = self.request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        return bool(
            self.bai.internal_token and scheme.lower() in ("token", "bearer")
            and hmac.compare_digest(token, self.bai.internal_token)
        )

    def identity(self) -> dict:
        """The caller: the hub's spawner (internal), a user, or 403."""
        if self.is_internal():
            return {"name": None, "admin": True, "internal": True}
        user = self.current_user
        if not user:
            raise web.HTTPError(403, "Log in through the hub, or send a hub API token.")
        scopes = set(user.get("scopes") or ())
        # Admin users, and services (or tokens) granted server administration.
        admin = bool(user.get("admin")) or bool(scopes & {"admin:servers", "admin:users"})
        return {"name": user["name"], "admin": admin, "internal": False}

    def check_owner(self, who: dict, user: str) -> None:
        if not (who["admin"] or who["name"] == user):
            raise web.HTTPError(404, "No such request.")

    def json_body(self, allowed: set) -> dict:
        if len(self.request.body) > MAX_BODY:
            raise web.HTTPError(413, f"Request body over {MAX_BODY} bytes.")
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPError(400, "Body is not valid JSON.") from None
        except RecursionError:  # e.g. "[[[[…" thousands deep: json.loads gives up
            raise web.HTTPError(400, "Body is nested too deeply.") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "Body must be a JSON object.")
        unknown = set(body) - allowed
        if unknown:
            raise web.HTTPError(400, f"Unknown field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
        return body

    def write_json(self, obj, status: int = 200):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    def write_error(self, status_code, **kwargs):
        message = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if isinstance(exc, StoreUnavailable):
            status_code, message = 503, "The scheduler's database is unavailable; nothing was changed. Try again shortly."
            self.set_status(503)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    def log_exception(self, typ, value, tb):
        if isinstance(value, StoreUnavailable):
            self.bai.log.error("Database unavailable during %s %s", self.request.method, self.request.uri)
            return
        super().log_exception(typ, value, tb)

    @staticmethod
    def key(user: str, server: str) -> RequestKey:
        for part in (user, server):
            if part and not NAME_RE.match(part):
                raise web.HTTPError(400, "Invalid user or server name.")
        return RequestKey(user, server)


class NotFoundHandler(BaseHandler):
    """Any path under the prefix that names nothing: a JSON 404, like the rest of the API."""

    def prepare(self):
        raise web.HTTPError(404, "No such endpoint; see the README's REST API table.")


class HealthHandler(BaseHandler):
    def get(self):
        self.write_json({"ok": self.service.degraded is None, "degraded": self.service.degraded})


class CapacityHandler(BaseHandler):
    def get(self):
        self.identity()
        units = self.bai.units
        nodes = []
        snap = self.service.capacity()
        for node in self.bai.node_list:
            nodes.append({
                "name": node.name,
                "docker_url": node.docker_url,
                "simulated": node.simulated,
                "devices": [
                    {"uuid": d.uuid, "index": d.index, "name": d.name, "memory_bytes": d.memory_bytes,
                     "sm_count": d.sm_count, "quanta": d.quanta, "mig_profile": d.mig_profile}
                    for d in node.devices
                ],
                "cpu_millis": node.cpu_millis,
                "memory_bytes": node.memory_bytes,
            })
        self.write_json({
            "fgpu_per_gpu": units.fgpu_per_gpu,
            "fgpu_step": str(units.fgpu_step),
            "quanta_per_gpu": units.quanta_per_gpu,
            "span": self.bai.span,
            "nodes": nodes,
            "usage": snap,
            "overcommitted": self.service.overcommitted(),
            "queue_length": len(self.service.pending()),
            "simulated": any(n.simulated for n in self.bai.node_list),
        })


class RequestsHandler(BaseHandler):
    def get(self):
        who = self.identity()
        out = [
            self.service.status(r) for r in self.service.records.values()
            if who["admin"] or r.key.user == who["name"]
        ]
        out.sort(key=lambda s: (s["state"] != "RUNNING", s["state"] == "STOPPING", s.get("position") or 0,
                                s["submitted_at"]))
        self.write_json({"requests": out, "epoch": self.service.epoch})


class RequestHandler(BaseHandler):
    FIELDS = {"quanta", "cpu_millis", "memory_bytes", "image", "user_options"}

    def get(self, user, server):
        who = self.identity()
        self.check_owner(who, user)
        rec = self.service.get(self.key(user, server))
        if rec is None:
            raise web.HTTPError(404, "No such request.")
        self.write_json(self.service.status(rec))

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
        try:
            rec = await self.service.submit(self.key(user, server), image=image, user_options=options, **nums)
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
        try:
            await self.bai.hub.stop_server(user, server)
            hub_stops_it = True
        except (HubAPIError, OSError) as e:
            self.bai.log.info("Hub stop of %s: %s; stopping it here", key, e)
            hub_stops_it = False
        await stop_session(self.service, rec, hub_stops_it)
        self.write_json({"released": rec.state == "PENDING", "stopping": rec.state != "PENDING"})


async def stop_session(service: SchedulerService, rec, hub_stops_it: bool) -> None:
    """After asking the hub to stop a server: a queued request, or an admission no spawner has,
    is stopped here; a started one only when the hub could not (its spawner then removes the
    container and releases the share; otherwise the service removes it, then frees the share)."""
    if rec.state == "PENDING" or not rec.delivered or not hub_stops_it:
        await service.stop(rec.key)


class AttemptBase(BaseHandler):
    def attempt(self, attempt_id: str):
        if not self.is_internal():
            raise web.HTTPError(403, "Only the hub's spawner uses spawn attempts.")
        return self.service.attempt(attempt_id)


class AttemptHandler(AttemptBase):
    async def delete(self, attempt_id):
        """The spawner: this attempt's container is gone, or was never made."""
        self.attempt(attempt_id)
        freed = await self.service.release(attempt_id)
        self.write_json({"released": True, "admitted": [str(r.key) for r in freed]})


class StopFailedHandler(AttemptBase):
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


class WaitHandler(AttemptBase):
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
        rec = await self.service.wait(attempt_id, epoch, timeout)
        if rec is None:
            self.write_json({"id": attempt_id, "state": "GONE", "epoch": self.service.epoch,
                             "reason": self.service.gone_reason(attempt_id) or "The request was cancelled."})
            return
        await self.service.mark_delivered(rec)
        self.write_json(self.service.status(rec))


class LaunchHandler(BaseHandler):
    """Start several sessions of one shape at once (named servers through the hub)."""

    async def post(self):
        who = self.identity()
        body = self.json_body({"count", "options", "user", "prefix"})
        user = body.get("user") or who["name"]
        if not isinstance(user, str) or not user:
            raise web.HTTPError(400, "Say which user launches.")
        self.check_owner(who, user)
        count = body.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= self.bai.max_launch:
            raise web.HTTPError(400, f"count must be a whole number from 1 to {self.bai.max_launch}.")
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise web.HTTPError(400, "options must be an object.")
        prefix = body.get("prefix", "session")
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", prefix):
            raise web.HTTPError(400, "prefix must be lower-case letters, digits and '-' (at most 31).")
        names = await launch_sessions(self.bai.hub, user, prefix, count, options)
        self.write_json({"launched": names}, 202)


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


class MetricsHandler(BaseHandler):
    def get(self):
        from .metrics import render

        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish(render(self.service))


def main(argv=None):
    app = BaiScheduler.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])

"""BaiSpawner: DockerSpawner that waits for the scheduler's placement.

The spawner never decides placement.  It turns the form into a request,
registers it with the bai-scheduler service, streams the queue position
through ``progress()``, builds the container from the granted placement
(node, GPU shares, image from the catalog), and releases on stop.
"""
from __future__ import annotations

import asyncio
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal

import docker
import requests
from docker.utils import kwargs_from_env
from dockerspawner import DockerSpawner
from jinja2 import Environment, FileSystemLoader
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default, observe, validate

from bai_scheduler.contract import catalog as catalog_mod
from bai_scheduler.contract.client import SchedulerClient, SchedulerError
from bai_scheduler.contract.form import TEMPLATES as FORM_TEMPLATES
from bai_scheduler.contract.form import form_context
from bai_scheduler.contract.options import FIELDS, FormError, Limits, SessionOptions, parse_options
from bai_scheduler.core.units import GIB, FgpuUnits

from .container import ContainerSpecError, Hardening, Session, make_container
from .gpu import PlacementMismatch, gpu_spec

# The spawn form (kubespawner's way: a Jinja2 template in the package).
TEMPLATES = Environment(loader=FileSystemLoader([os.path.join(os.path.dirname(__file__), "templates"), FORM_TEMPLATES]),
                        autoescape=True)

# What a Docker engine that is down or failing raises through docker-py.
ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.ConnectionError)


def engine_message(e: Exception) -> str:
    """What a user may read of an engine error: the engine's own explanation, or the
    error's kind; never the engine's API URL (docker-py puts it in str(e))."""
    explanation = getattr(e, "explanation", None)
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation).strip()[:300] if explanation else e.__class__.__name__


def engine_down(e: Exception) -> str:
    """What a user reads when the engine does not answer (its kind of error, never its address)."""
    return f"The Docker engine is not reachable ({e.__class__.__name__}); ask an admin to start it."


class StillQueued(web.HTTPError):
    """This spawn gives up waiting, but its request stays queued at the scheduler (the service
    was unreachable: a hub shutdown stops it first). The service asks the hub to start the
    server once it is admitted, so neither the request nor the server may be removed."""


class BaiSpawner(DockerSpawner):
    """Spawn sessions with fractional GPUs, versioned kernel images and a pending queue."""

    scheduler_url = Unicode(
        "http://127.0.0.1:8090", config=True,
        help="Where the hub reaches the bai-scheduler service directly (not through the proxy).",
    )
    scheduler_prefix = Unicode(
        "/services/bai-scheduler/", config=True, help="URL prefix of the bai-scheduler service.",
    )
    scheduler_token = Unicode(
        "", config=True,
        help="The bai-scheduler service's API token (the hub config shares it); the service "
        "accepts request registration only with it.",
    )
    hub_id = Unicode(
        "bai", config=True,
        help="Names this hub deployment on its containers (label org.bai-hub.hub). Must equal "
        "c.BaiScheduler.hub_id; lets several hubs share Docker engines without seeing each other's sessions.",
    )
    pids_limit = Integer(
        4096, config=True,
        help="Most processes and threads one session may run (Docker's --pids-limit), so that a "
        "fork bomb in one session cannot exhaust the node. 0: no limit.",
    )
    cap_drop = List(
        ["ALL"], config=True,
        help="Linux capabilities removed from session containers. Sessions run as the image's "
        "unprivileged user (jovyan) and need none.",
    )
    cap_add = List(
        [], config=True,
        help="Linux capabilities given back after cap_drop, e.g. ['CHOWN', 'SETUID', 'SETGID'] for an "
        "image that starts as root and switches user.",
    )
    no_new_privileges = Bool(
        True, config=True,
        help="Run sessions with no-new-privileges: setuid programs (sudo, su) cannot raise privileges.",
    )
    use_init = Bool(
        True, config=True,
        help="Run an init process (docker --init) as PID 1 of each session: it reaps orphaned "
        "processes and forwards signals, whatever the image's entrypoint.",
    )
    # The form's limits and the GPU backend moved to the scheduler service (it publishes the
    # limits through api/capacity and sends each node's backend with the placement). The old
    # names still work: the service reads them from the same config file
    # (BaiScheduler.initialize); here they only warn.
    _moved_to_scheduler = ("default_cpu", "max_cpu", "default_memory_gib", "max_memory_gib",
                           "max_sessions_per_launch", "gpu_backend", "hami_library", "mps_pipe_directory")
    default_cpu = Unicode(config=True, help="Deprecated: use c.BaiScheduler.default_cpu.")
    max_cpu = Unicode(config=True, help="Deprecated: use c.BaiScheduler.max_cpu.")
    default_memory_gib = Unicode(config=True, help="Deprecated: use c.BaiScheduler.default_memory_gib.")
    max_memory_gib = Unicode(config=True, help="Deprecated: use c.BaiScheduler.max_memory_gib.")
    max_sessions_per_launch = Integer(config=True, help="Deprecated: use c.BaiScheduler.max_sessions_per_launch.")
    gpu_backend = Unicode(
        config=True,
        help="Deprecated: each node's backend is c.BaiScheduler.gpu_backend (or 'gpu_backend' in its "
        "entry of c.BaiScheduler.nodes).",
    )
    hami_library = Unicode(config=True, help="Deprecated: use c.BaiScheduler.hami_library.")
    mps_pipe_directory = Unicode(config=True, help="Deprecated: use c.BaiScheduler.mps_pipe_directory.")
    wait_poll_seconds = Float(30, config=True, help="Long-poll length while a request waits in the queue.")
    container_start_timeout = Integer(
        120, config=True,
        help="Seconds a session may take from admission until its server answers. Time spent queued "
        "does not count: JupyterHub's start_timeout is raised so a queued spawn is never killed.",
    )
    scheduler_outage_timeout = Float(
        180, config=True,
        help="Seconds a queued spawn keeps retrying while the scheduler service is unreachable "
        "(it restarts with the hub, or after a crash); the request itself stays queued either way.",
    )
    docker_threads = Integer(8, config=True, help="Threads for blocking Docker calls (shared by all spawners).")

    @observe(*_moved_to_scheduler)
    def _moved_option(self, change):
        self.log.warning("BaiSpawner.%s is deprecated: the scheduler service owns it now (the form's limits, "
                         "and each node's GPU backend). Set c.BaiScheduler.%s instead (until then the service "
                         "uses this value).", change.name, change.name)

    @validate("pids_limit")
    def _check_pids_limit(self, proposal):
        if proposal.value < 0:
            raise ValueError("pids_limit must be a whole number >= 0 (0: no limit)")
        return proposal.value

    # Queued sessions can wait for hours; the hub must not kill them.
    @default("start_timeout")
    def _default_start_timeout(self):
        return 7 * 24 * 3600

    @default("apply_user_options")
    def _default_apply_user_options(self):
        # Options are validated in start(), against the live catalog and
        # capacity, so the form and the REST API meet the same checks.
        return lambda spawner, user_options: None

    @default("remove")
    def _default_remove(self):
        return True

    @default("host_ip")
    def _default_host_ip(self):
        return "127.0.0.1"

    @default("name_template")
    def _default_name_template(self):
        return "bai-{username}--{servername}"

    @default("volumes")
    def _default_volumes(self):
        return {"bai-home-{username}": "/home/jovyan"}

    @default("notebook_dir")
    def _default_notebook_dir(self):
        return "/home/jovyan"

    @default("cmd")
    def _default_cmd(self):
        return ["jupyterhub-singleuser"]

    @default("pull_policy")
    def _default_pull_policy(self):
        # No registry is assumed: images are built locally (bai-images build).
        return "never"

    request_id = Unicode("")
    node_url = Unicode("")
    _allowed_image = ""
    node_tls = Dict()
    placement = Dict()

    _executor = None
    _clients: dict = {}

    # -- docker plumbing: one client per node, a real thread pool --------------------

    @property
    def executor(self):
        cls = BaiSpawner
        if cls._executor is None:
            cls._executor = ThreadPoolExecutor(self.docker_threads, thread_name_prefix="bai-docker")
        return cls._executor

    @property
    def client(self):
        key = self.node_url
        client = BaiSpawner._clients.get(key)
        if client is None:
            kwargs = {"version": "auto"}
            if key:
                kwargs["base_url"] = key
                if self.node_tls:
                    kwargs["tls"] = docker.tls.TLSConfig(**self.node_tls)
            else:
                kwargs.update(kwargs_from_env())
                kwargs.update(self.client_kwargs)
            client = BaiSpawner._clients[key] = docker.APIClient(**kwargs)
        return client

    @property
    def scheduler(self) -> SchedulerClient:
        return SchedulerClient(self.scheduler_url, self.scheduler_token, self.scheduler_prefix)

    # -- state -------------------------------------------------------------------------

    def get_state(self):
        state = super().get_state()
        for k in ("request_id", "node_url"):
            if getattr(self, k):
                state[k] = getattr(self, k)
        if self.node_tls:
            state["node_tls"] = self.node_tls
        return state

    def load_state(self, state):
        super().load_state(state)
        self.request_id = state.get("request_id", "")
        self.node_url = state.get("node_url", "")
        self.node_tls = state.get("node_tls", {})

    def clear_state(self):
        super().clear_state()
        self.request_id = ""
        self.node_url = ""
        self.node_tls = {}
        self.placement = {}
        self._allowed_image = ""

    # -- the form ----------------------------------------------------------------------

    async def _capacity(self) -> dict:
        return await self.scheduler.capacity()

    @staticmethod
    def _units(cap: dict) -> FgpuUnits:
        return FgpuUnits(cap["fgpu_per_gpu"], Decimal(cap["fgpu_step"]))

    async def _catalog(self):
        # Making a client negotiates the API version over the socket: in the executor too.
        client = await asyncio.wrap_future(self.executor.submit(lambda: self.client))
        return await catalog_mod.load_catalog(client)

    async def get_options_form(self):
        template = TEMPLATES.get_template("options_form.html")
        try:
            cap = await self._capacity()
        except SchedulerError as e:
            return template.render(error=str(e))
        try:
            images = await self._catalog()
        except ENGINE_ERRORS as e:
            return template.render(error=engine_down(e))
        service = self.scheduler_prefix.rstrip("/") + "/"
        return template.render(simulated=cap.get("simulated"), **form_context(
            visible=catalog_mod.visible_to(images, self.user.name, is_admin=False), user=self.user.name,
            capacity=cap, units=self._units(cap), limits=Limits.from_json(cap["limits"]), note=cap["note"],
            capacity_url=service + "capacity.json", static_url=service + "static/",
            user_groups=[g.name for g in self.user.groups],
        ))

    def options_from_form(self, formdata):
        # Parsed in start() with the live units, limits and catalog: this only
        # keeps the raw values, so a hand-crafted POST meets the same checks.
        return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in formdata.items()
                if k in FIELDS}

    async def _resolve(self) -> tuple[SessionOptions, FgpuUnits, catalog_mod.CatalogImage]:
        """The request as validated: options whose ``image`` is the catalog entry's
        reference (whatever named it: the picker, the typed name, an id or an id
        prefix), its units, and that catalog entry."""
        try:
            cap = await self._capacity()
        except SchedulerError as e:
            raise web.HTTPError(503, str(e)) from None
        units = self._units(cap)
        raw = dict(self.user_options or {})
        if not raw.get("image") and not raw.get("image_name"):
            raw["image"] = self.image
        try:
            opts = parse_options(raw, units, Limits.from_json(cap["limits"]))
        except FormError as e:
            raise web.HTTPError(400, str(e)) from None
        try:
            images = await self._catalog()
        except ENGINE_ERRORS as e:
            raise web.HTTPError(503, engine_down(e) + " Nothing was started.") from None
        try:
            image = catalog_mod.resolve_image(images, self.user.name, opts.image, is_admin=False)
        except catalog_mod.ImageNotAllowed as e:
            raise web.HTTPError(400, str(e)) from None
        return replace(opts, image=image.ref), units, image

    async def check_allowed(self, image):
        # DockerSpawner.start() takes user_options["image"] and runs whatever this
        # returns: only the reference _start() validated may pass.
        if not self._allowed_image or image != self._allowed_image:
            raise web.HTTPError(400, "The image to run is not the one that was validated; nothing was started.")
        return image

    # -- lifecycle ----------------------------------------------------------------------

    def _emit(self, progress: int, message: str):
        self._events.append({"progress": progress, "message": message})
        self._events_changed.set()

    async def progress(self):
        seen = 0
        while True:
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if self._spawn_done:
                return
            self._events_changed.clear()
            await self._events_changed.wait()

    async def start(self):
        self._events = []
        self._events_changed = asyncio.Event()
        self._spawn_done = False
        # A record the hub made for this spawn (a new named server, never started or
        # stopped before: no state saved yet).
        fresh = bool(self.name) and self.orm_spawner is not None and self.orm_spawner.state is None
        try:
            return await self._start()
        except (asyncio.CancelledError, StillQueued):
            raise  # a stop, the hub shutting down, or a lost scheduler: the queued request and its server stay
        except Exception:
            if fresh:
                asyncio.ensure_future(self._remove_failed_server())
            raise
        finally:
            self._spawn_done = True
            self._events_changed.set()

    async def _remove_failed_server(self, timeout: float = 60):
        """Remove the named server of a spawn that failed before it ever ran, once the
        hub has finished with the failure (as JupyterHub's own DELETE ... remove=true),
        so that refusals do not pile up against named_server_limit_per_user."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self._spawn_future is not None and self._spawn_future.done() and not self.pending):
            if loop.time() > deadline:
                return
            await asyncio.sleep(0.1)
        user, orm_spawner = self.user, self.orm_spawner
        if user.spawners.get(self.name) is not self or self.active or orm_spawner is None:
            return  # started again meanwhile, or already removed
        self.log.info("Removing %s: its first spawn failed", self._log_name)
        user.spawners.pop(self.name, None)
        user.db.delete(orm_spawner)
        user.db.commit()

    async def _start(self):
        opts, units, image = await self._resolve()
        # From here on the validated reference is the only image there is: in the
        # options DockerSpawner.start() reads, in the hub's record of this server,
        # in the request and on the container.
        self._allowed_image = image.ref
        extra = opts.sessions - 1
        opts = replace(opts, sessions=1)  # this server is one session; the others launch below
        self.user_options = opts.to_user_options()
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = self.user_options
        if extra:
            try:
                await self.scheduler.launch(self.user.name, extra, self.user_options)
            except SchedulerError as e:
                self.log.warning("Could not launch %d more sessions for %s: %s", extra, self.user.name, e)
        self._emit(5, f"Requesting {units.to_fgpu(opts.quanta)} fGPU, {opts.cpu_millis / 1000:g} CPU, "
                      f"{opts.memory_bytes / GIB:g} GiB for {image.display_name}")
        try:
            status = await self.scheduler.register(
                self.user.name, self.name, quanta=opts.quanta, cpu_millis=opts.cpu_millis,
                memory_bytes=opts.memory_bytes, image=image.ref, user_options=self.user_options,
            )
        except SchedulerError as e:
            raise web.HTTPError(e.status if 400 <= e.status < 600 else 500, e.args[0]) from None
        self.request_id = status["id"]
        try:
            status = await self._wait_admitted(status, units)
            return await self._run_container(status, image, opts, units)
        except asyncio.CancelledError:
            # The hub cancels a pending spawn when the user stops it (stop()
            # then releases) or when the hub itself shuts down: the request must
            # then stay queued, so nothing is released here.
            raise
        except Exception:
            # Refused, or the container failed: give the share back at once.
            await self._release()
            raise

    async def _wait_admitted(self, status: dict, units: FgpuUnits) -> dict:
        last = None
        while status["state"] == "PENDING":
            message = status.get("reason") or f"Waiting in queue (position {status.get('position')})"
            if status.get("eta"):
                message += f". Expected start: {status['eta']['text']}"
            if message != last:
                self._emit(10, message)
                last = message
            status = await self._wait_once(status)
            if status.get("state") == "GONE" or (status.get("id") and status["id"] != self.request_id):
                raise web.HTTPError(409, status.get("reason") or "The queued request was cancelled.")
        placement = status["placement"]
        self.placement = placement
        self.node_url = placement.get("docker_url", "")
        self.node_tls = placement.get("tls", {})
        self._emit(50, f"Admitted on node {placement['node']} with {status['fgpu']} fGPU"
                       + (" (simulated GPU)" if placement.get("simulated") and placement["shares"] else ""))
        return status

    async def _wait_once(self, status: dict) -> dict:
        """One long-poll; rides out a scheduler restart instead of failing the spawn."""
        deadline = asyncio.get_running_loop().time() + self.scheduler_outage_timeout
        delay = 0.5
        while True:
            try:
                return await self.scheduler.wait(self.request_id, status["epoch"], self.wait_poll_seconds)
            except SchedulerError as e:
                if e.status not in (502, 503, 599) or asyncio.get_running_loop().time() > deadline:
                    self.request_id = ""  # still queued there: neither this spawn nor stop() releases it
                    raise StillQueued(503, f"Lost the scheduler while queued ({e}). The request stays queued: "
                                           "the session starts by itself once it is admitted.") from None
                self._emit(10, "The scheduler is restarting; your place in the queue is kept")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    async def _run_container(self, status: dict, image, opts: SessionOptions, units: FgpuUnits):
        try:
            spec = gpu_spec(status["placement"], units)
        except PlacementMismatch as e:
            raise web.HTTPError(400, str(e)) from None
        self.image = image.ref
        self._gpu = spec
        self._opts = replace(opts, group=status.get("group", ""))  # the group the service counted it against
        self.mem_limit = opts.memory_bytes or None
        self.cpu_limit = opts.cpu_millis / 1000 if opts.cpu_millis else None
        self._emit(60, f"Starting container from {image.ref} on {status['placement']['node']}")
        try:
            # DockerSpawner reads self.client on the loop; making it blocks (API version
            # negotiation), so the node's client is made in the executor first.
            await asyncio.wrap_future(self.executor.submit(lambda: self.client))
            ip_port = await asyncio.wait_for(super().start(), self.container_start_timeout)
        except (asyncio.TimeoutError, *ENGINE_ERRORS) as e:
            what = (f"did not start the session within {self.container_start_timeout} s"
                    if isinstance(e, asyncio.TimeoutError) else f"failed to start the session: {engine_message(e)}")
            await self._remove_half_made(engine_message(e) if not isinstance(e, asyncio.TimeoutError) else what)
            raise web.HTTPError(503, f"The Docker engine {what}") from None
        self._emit(90, "Container started; waiting for the notebook server")
        return ip_port

    async def _remove_half_made(self, error: str):
        """Remove a container that failed to start.  If that fails too, it may still exist
        (created containers hold their share): the scheduler keeps the share and removes the
        container itself, and this spawn no longer releases it."""
        try:
            await self.docker("remove_container", self.object_name, force=True, v=True)
            return
        except docker.errors.NotFound:
            return
        except Exception as e:  # the engine may be down
            self.log.warning("Could not remove half-made container %s: %s", self.object_name, e)
        try:
            await self.scheduler.stop_failed(self.request_id, error)
            self.request_id = ""  # the scheduler owns the attempt now
        except SchedulerError as e:
            self.log.error("Could not hand %s's half-made container to the scheduler: %s", self._log_name, e)

    async def _extra(self, value) -> dict:
        """An ``extra_*`` option as dockerspawner reads it: a dict, or a callable (maybe async) of the spawner."""
        value = self._eval_if_callable(value)
        if inspect.isawaitable(value):
            value = await value
        return self._render_templates(dict(value or {}))

    async def create_object(self):
        """The container from the pure builder (``container.make_container``), created on the node."""
        try:
            create, host = make_container(
                name=self.container_name, image=self.image, command=await self.get_command(),
                environment=self.get_env(), port=self.port,
                session=Session(self.user.name, self.name, self.request_id, self.hub_id, self._opts),
                gpu=self._gpu,
                hardening=Hardening(self.pids_limit, tuple(self.cap_drop), tuple(self.cap_add),
                                    self.no_new_privileges, self.use_init),
                network_name=self.network_name, remove=self.remove,
                host_ip=None if self.use_internal_ip else self.host_ip,
                volume_binds=self.volume_binds, mounts=self.mount_binds, links=self.links,
                extra_create_kwargs=await self._extra(self.extra_create_kwargs),
                extra_host_config=await self._extra(self.extra_host_config),
            )
        except ContainerSpecError as e:
            raise web.HTTPError(500, f"The session's container cannot be made: {e}") from None
        create["host_config"] = self.client.create_host_config(**host)
        return await self.docker("create_container", **create)

    async def _release(self):
        """This attempt's container is gone (or was never made): its share can go."""
        if not self.request_id:
            return
        try:
            await self.scheduler.release(self.request_id)
        except SchedulerError as e:
            # The engine's events and the service's reconcile free it later.
            self.log.error("Could not release %s's share now: %s", self._log_name, e)

    async def poll(self):
        # A request still queued (no container yet) counts as alive, so that the
        # hub's Stop on a pending spawn calls stop() and the queue entry is removed.
        if not self.object_id and self.request_id:
            return None
        if not self.object_id:
            return 0  # nothing of ours exists (e.g. a spawn refused before any container)
        return await super().poll()

    async def stop(self, now=False):
        request_id = self.request_id
        try:
            if self.object_id:
                await super().stop(now=now)  # docker stop, then remove
        except docker.errors.NotFound:
            pass  # gone already
        except ENGINE_ERRORS as e:
            # The container may still run, so its share stays held: the service shows the
            # engine's message ("stopping failed") and removes the container itself, retrying.
            self.log.error("Could not stop the container of %s: %s", self._log_name, e)
            try:
                message = engine_message(e)
                if message != e.__class__.__name__:
                    message = f"{e.__class__.__name__}: {message}"
                await self.scheduler.stop_failed(request_id, message)
            except SchedulerError as err:
                # The service's reconcile finds the container later: the hub no longer knows it.
                self.log.error("Could not tell the scheduler that %s did not stop: %s", self._log_name, err)
            self.clear_state()
            return
        self.request_id = request_id
        await self._release()
        self.clear_state()

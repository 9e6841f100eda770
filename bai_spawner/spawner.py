"""BaiSpawner: DockerSpawner that waits for the scheduler's placement.

The spawner never decides placement.  It turns the form into a request,
registers it with the bai-scheduler service, streams the queue position
through ``progress()``, builds the container from the granted placement
(node, GPU shares, image from the catalog), and releases on stop.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import docker
import requests
from docker.utils import kwargs_from_env
from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Dict, Float, Integer, Unicode, default, validate

from bai_scheduler.units import GIB, FgpuUnits

from . import catalog as catalog_mod
from . import labels
from .client import SchedulerClient, SchedulerError
from .form import FormError, Limits, SessionOptions, parse_options
from .gpu import BACKENDS, PlacementMismatch, gpu_spec


# What a Docker engine that is down or failing raises through docker-py.
ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.ConnectionError)


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
    gpu_backend = Unicode(
        "hami", config=True,
        help="How a GPU share is enforced in the container: 'hami' (HAMi-core libvgpu.so: memory "
        "and SM limits, nvidia-smi shows the share), 'mps' (CUDA MPS limits), 'mig' (MIG devices) "
        "or 'whole' (whole GPUs only).",
    )
    hami_library = Unicode(
        "/usr/local/vgpu/libvgpu.so", config=True,
        help="Path of HAMi-core's libvgpu.so on each GPU node; mounted read-only and preloaded.",
    )
    mps_pipe_directory = Unicode(
        "/tmp/nvidia-mps", config=True, help="CUDA MPS pipe directory on GPU nodes, shared into containers.",
    )
    default_cpu = Unicode("1", config=True, help="CPU cores the form proposes.")
    max_cpu = Unicode("4", config=True, help="Most CPU cores one session may ask for.")
    default_memory_gib = Unicode("2", config=True, help="Memory (GiB) the form proposes.")
    max_memory_gib = Unicode("16", config=True, help="Most memory (GiB) one session may ask for.")
    max_sessions_per_launch = Integer(4, config=True, help="Most sessions the form launches in one action.")
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

    @validate("gpu_backend")
    def _check_backend(self, proposal):
        if proposal.value not in BACKENDS:
            raise ValueError(f"gpu_backend must be one of {', '.join(BACKENDS)}")
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

    # -- the form ----------------------------------------------------------------------

    async def _capacity(self) -> dict:
        return await self.scheduler.capacity()

    def _limits(self, cap: dict) -> Limits:
        biggest = max((sum(d["quanta"] for d in n["devices"]) for n in cap["nodes"]), default=0)
        return Limits(
            max_quanta=biggest,
            max_cpu=Decimal(self.max_cpu),
            max_memory_gib=Decimal(self.max_memory_gib),
            default_cpu=Decimal(self.default_cpu),
            default_memory_gib=Decimal(self.default_memory_gib),
            max_sessions=self.max_sessions_per_launch,
        )

    @staticmethod
    def _units(cap: dict) -> FgpuUnits:
        return FgpuUnits(cap["fgpu_per_gpu"], Decimal(cap["fgpu_step"]))

    async def _catalog(self):
        # Making a client negotiates the API version over the socket: in the executor too.
        client = await asyncio.wrap_future(self.executor.submit(lambda: self.client))
        return await catalog_mod.load_catalog(client)

    async def get_options_form(self):
        from .formpage import render_form

        try:
            cap = await self._capacity()
        except SchedulerError as e:
            return f'<div class="alert alert-danger">{web.escape.xhtml_escape(str(e))}</div>'
        images = await self._catalog()
        visible = catalog_mod.visible_to(images, self.user.name, is_admin=False)
        return render_form(
            visible=visible, user=self.user.name, capacity=cap, units=self._units(cap),
            limits=self._limits(cap), service_prefix=self.scheduler_prefix,
        )

    def options_from_form(self, formdata):
        # Parsed again in start() with the live units and limits: this only
        # keeps the raw values, so a hand-crafted POST meets the same checks.
        return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in formdata.items()
                if k in ("image", "image_name", "fgpu", "cpu", "memory", "sessions")}

    async def _resolve(self) -> tuple[SessionOptions, FgpuUnits, object]:
        try:
            cap = await self._capacity()
        except SchedulerError as e:
            raise web.HTTPError(503, str(e)) from None
        units = self._units(cap)
        raw = dict(self.user_options or {})
        if not raw.get("image") and not raw.get("image_name"):
            raw["image"] = self.image
        try:
            opts = parse_options(raw, units, self._limits(cap))
        except FormError as e:
            raise web.HTTPError(400, str(e)) from None
        try:
            images = await self._catalog()
        except ENGINE_ERRORS as e:
            raise web.HTTPError(503, f"The Docker engine is not reachable ({e.__class__.__name__}); "
                                     "ask an admin to start it. Nothing was started.") from None
        try:
            image = catalog_mod.resolve_image(images, self.user.name, opts.image, is_admin=False)
        except catalog_mod.ImageNotAllowed as e:
            raise web.HTTPError(400, str(e)) from None
        return opts, units, image

    async def check_allowed(self, image):
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
        try:
            return await self._start()
        finally:
            self._spawn_done = True
            self._events_changed.set()

    async def _start(self):
        opts, units, image = await self._resolve()
        if opts.sessions > 1:
            extra = opts.sessions - 1
            one = SessionOptions(opts.image, opts.quanta, opts.cpu_millis, opts.memory_bytes, 1)
            self.user_options = one.to_user_options()
            try:
                await self.scheduler.launch(self.user.name, extra, self.user_options)
            except SchedulerError as e:
                self.log.warning("Could not launch %d more sessions for %s: %s", extra, self.user.name, e)
        user_options = SessionOptions(opts.image, opts.quanta, opts.cpu_millis, opts.memory_bytes, 1).to_user_options()
        self._emit(5, f"Requesting {units.to_fgpu(opts.quanta)} fGPU, {opts.cpu_millis / 1000:g} CPU, "
                      f"{opts.memory_bytes / GIB:g} GiB for {image.display_name}")
        try:
            status = await self.scheduler.register(
                self.user.name, self.name, quanta=opts.quanta, cpu_millis=opts.cpu_millis,
                memory_bytes=opts.memory_bytes, image=image.ref, user_options=user_options,
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
                    raise web.HTTPError(503, f"Lost the scheduler while queued: {e}") from None
                self._emit(10, "The scheduler is restarting; your place in the queue is kept")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    async def _run_container(self, status: dict, image, opts: SessionOptions, units: FgpuUnits):
        try:
            spec = gpu_spec(self.gpu_backend, status["placement"], units,
                            hami_library=self.hami_library, mps_pipe_directory=self.mps_pipe_directory)
        except PlacementMismatch as e:
            raise web.HTTPError(400, str(e)) from None
        self.image = image.ref
        self._gpu = spec
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
                    if isinstance(e, asyncio.TimeoutError) else f"failed to start the session: {e}")
            await self._remove_half_made(str(e) or what)
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

    async def create_object(self):
        spec = self._gpu
        host = dict(self.extra_host_config or {})
        host.setdefault("binds", {})
        extra = dict(self.extra_create_kwargs or {})
        extra_labels = dict(extra.get("labels", {}))
        extra_labels.update(spec.labels)
        extra_labels.update({
            labels.USER: self.user.name,
            labels.SERVER: self.name,
            labels.REQUEST_ID: self.request_id,
            labels.HUB: self.hub_id,
            labels.IMAGE: self.image,
            labels.CPU_MILLIS: str(int((self.cpu_limit or 0) * 1000)),
            labels.MEMORY_BYTES: str(int(self.mem_limit or 0)),
        })
        extra["labels"] = extra_labels
        if spec.device_requests:
            host["device_requests"] = [docker.types.DeviceRequest(
                driver=r["Driver"], device_ids=r["DeviceIDs"], capabilities=r["Capabilities"])
                for r in spec.device_requests]
        if spec.ipc_mode:
            host["ipc_mode"] = spec.ipc_mode
        saved = (self.extra_host_config, self.extra_create_kwargs)
        self.extra_host_config, self.extra_create_kwargs = host, extra
        try:
            binds = dict(spec.binds)
            if binds:
                self.extra_host_config["binds"] = binds
            return await super().create_object()
        finally:
            self.extra_host_config, self.extra_create_kwargs = saved

    def get_env(self):
        env = super().get_env()
        env.update(getattr(self, "_gpu", None).environment if getattr(self, "_gpu", None) else {})
        env["BAI_SESSION"] = f"{self.user.name}/{self.name}" if self.name else self.user.name
        return env

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
                await self.scheduler.stop_failed(request_id, f"{e.__class__.__name__}: {e}")
            except SchedulerError as err:
                # The service's reconcile finds the container later: the hub no longer knows it.
                self.log.error("Could not tell the scheduler that %s did not stop: %s", self._log_name, err)
            self.clear_state()
            return
        self.request_id = request_id
        await self._release()
        self.clear_state()

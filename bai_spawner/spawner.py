"""BaiSpawner: DockerSpawner that waits for the scheduler's placement.

The spawner never decides placement.  It turns the form into a request,
registers it with the bai-scheduler service, streams the queue position
through ``progress()``, pulls the image onto the granted node when that node
lacks it (``pull.py``; the pull's progress in ``progress()`` too), builds the
container from the placement (node, GPU shares, the image the catalog check
allowed, and nothing else), and releases on stop.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import docker
import requests
from docker.utils import kwargs_from_env
from dockerspawner import DockerSpawner
from jinja2 import Environment, FileSystemLoader
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default, observe, validate

from bai_scheduler.contract import catalog as catalog_mod
from bai_scheduler.contract import labels as L
from bai_scheduler.contract.client import SchedulerClient, SchedulerError
from bai_scheduler.contract.form import TEMPLATES as FORM_TEMPLATES
from bai_scheduler.contract.form import form_context, home_note, volumes_shared
from bai_scheduler.contract.options import FIELDS, LAUNCHED, FormError, Limits, SessionOptions, parse_options
from bai_scheduler.contract.registry import BaiRegistry, RegistryError
from bai_scheduler.contract.transfer import Transfer, format_size
from bai_scheduler.core.units import GIB, FgpuUnits

from . import pipconf
from .container import ContainerSpecError, Hardening, PackageIndex, Session, make_container
from .gpu import PlacementMismatch, gpu_spec
from .pull import PullStopped, engine_message, failure_reason, local_id, pull_blocking

# The spawn form (kubespawner's way: a Jinja2 template in the package).
TEMPLATES = Environment(loader=FileSystemLoader([os.path.join(os.path.dirname(__file__), "templates"), FORM_TEMPLATES]),
                        autoescape=True)

# What a Docker engine that is down or failing raises through docker-py.
ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.ConnectionError)


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
        help="Seconds a session may take from creating its container until its server answers. Time "
        "spent queued does not count (JupyterHub's start_timeout is raised so a queued spawn is never "
        "killed), nor does pulling the image onto the node (c.BaiSpawner.pull_timeout).",
    )
    pull_timeout = Integer(
        1800, config=True,
        help="Seconds pulling a session's image onto the node it was placed on may take, after "
        "admission and before container_start_timeout starts. The share is held meanwhile; a pull "
        "that fails or runs out of time ends the spawn and returns the share.",
    )
    volume_driver = Unicode(
        "local", config=True,
        help="Docker volume driver of the named volumes in c.BaiSpawner.volumes (the per-user home "
        "folder), made on a node the first time a session of that user lands there. 'local' with "
        "volume_driver_options of type nfs gives every node the same home folder (docs/install.md).",
    )
    volume_driver_options = Dict(
        {}, config=True,
        help="Options of volume_driver; {username} is replaced as in volume names. NFS, e.g. "
        "{'type': 'nfs', 'o': 'addr=10.0.0.5,rw,nfsvers=4', 'device': ':/export/home/{username}'}. "
        "Empty: a plain folder on each node.",
    )
    volumes_shared = Bool(
        None, allow_none=True, config=True,
        help="Whether every node sees the same files in these volumes. Default: yes when "
        "volume_driver_options are set or the driver is not 'local'. When not, and there is more than "
        "one node, the spawn form tells users that their files stay on each node.",
    )
    scheduler_outage_timeout = Float(
        180, config=True,
        help="Seconds a queued spawn keeps retrying while the scheduler service is unreachable "
        "(it restarts with the hub, or after a crash); the request itself stays queued either way.",
    )
    docker_threads = Integer(8, config=True, help="Threads for blocking Docker calls (shared by all spawners).")
    browser_url = Unicode(
        "", config=True,
        help="The hub's address as users' browsers reach it, e.g. 'https://hub.example.org/' (its scheme, host, "
        "port and base path). Sessions build the links they print from it: the MLflow tracking URI is "
        "<browser_url>user/<name>/<server>/mlflow, so the run links the MLflow client prints open in the browser. "
        "When its host is a loopback address (the one-machine demo), each session's server listens on the same "
        "port inside its container, so that the same URL reaches it from code in the session; otherwise sessions "
        "reach it over the network. Empty: c.JupyterHub.public_url if set, else links name the session's "
        "internal address, which browsers cannot open.",
    )

    @validate("browser_url")
    def _check_browser_url(self, proposal):
        url = proposal.value
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ValueError(f"BaiSpawner.browser_url must be an http(s) URL such as 'https://hub.example.org/', "
                             f"not {url!r}")
        return url if not url or url.endswith("/") else url + "/"

    def _browser_port(self) -> int | None:
        """The browser address's port when its host is a loopback address, else None."""
        parts = urlsplit(self.browser_url)
        host = parts.hostname or ""
        if host in ("localhost", "::1") or host.startswith("127."):
            return parts.port or (443 if parts.scheme == "https" else 80)
        return None

    @default("port")
    def _default_port(self):
        # With the hub's browser address on loopback, the session's server answers on that port in
        # its container too, so links to that address work from code inside (see browser_url).
        return self._browser_port() or 8888

    def get_env(self):
        env = super().get_env()
        if self.browser_url:
            # The server's own URL as browsers reach it (bai_session_apps builds MLflow's links from it).
            env["BAI_PUBLIC_URL"] = urlunsplit(urlsplit(self.browser_url)._replace(path=self.server.base_url))
        return env

    pip_config = Unicode(
        "", config=True,
        help="A pip configuration file for sessions (a pip.conf on the engine's host): mounted read-only at "
        "/etc/pip.conf in every session, so that `pip install X` there uses the site's package index or mirror. "
        "Local folders and files it names (file:// indexes, find-links folders, constraint files) are mounted "
        "read-only at the same paths (a file:// index <root>/simple/ from <root>, where its pages link). scripts/run-hub writes one from the host's own pip configuration "
        "(python -m bai_spawner.pipconf). Empty: the image's own settings (PyPI).",
    )
    ca_bundle = Unicode(
        "", config=True,
        help="A PEM file of the certificate authorities sessions trust for HTTPS (e.g. the public ones plus the "
        "site's proxy CA), on the engine's host: mounted read-only at /etc/bai/ca-certificates.crt, with PIP_CERT, "
        "REQUESTS_CA_BUNDLE, SSL_CERT_FILE and CURL_CA_BUNDLE pointing at it. Empty: the image's own list.",
    )

    @observe(*_moved_to_scheduler)
    def _moved_option(self, change):
        self.log.warning("BaiSpawner.%s is deprecated: the scheduler service owns it now (the form's limits, "
                         "and each node's GPU backend). Set c.BaiScheduler.%s instead (until then the service "
                         "uses this value).", change.name, change.name)

    @validate("pip_config", "ca_bundle")
    def _check_host_file(self, proposal):
        path = proposal.value
        if path and not (os.path.isabs(path) and os.path.isfile(path)):
            raise ValueError(f"BaiSpawner.{proposal.trait.name} must be the absolute path of a file on this host; "
                             f"{path!r} is not one (leave it empty to use the image's own settings)")
        return path

    async def _package_index(self) -> PackageIndex:
        """The sessions' package index now (the pip.conf is read at every start, so edits apply)."""
        paths: list[str] = []
        if self.pip_config:
            try:
                text = await asyncio.to_thread(Path(self.pip_config).read_text)
                paths = pipconf.local_paths(text)
            except (OSError, ValueError) as e:  # configparser errors are ValueErrors
                raise web.HTTPError(500, f"The sessions' pip configuration {self.pip_config} cannot be read ({e}); "
                                         "ask an admin to fix BaiSpawner.pip_config.") from None
        return PackageIndex(self.pip_config, self.ca_bundle, tuple(paths))

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
        # The spawner pulls the validated image itself before DockerSpawner.start (_ensure_image),
        # with progress and outside container_start_timeout; DockerSpawner only checks it is there.
        return "never"

    request_id = Unicode("")
    launched = Bool(False, help="Started in a group (the service chose its name): removed from the hub once stopped.")
    node_url = Unicode("")
    _allowed_image = ""
    _allowed_id = ""
    node_tls = Dict()
    placement = Dict()

    _executor = None
    _clients: dict = {}
    # The form values of each user's last refused spawn, shown again with the error: the hub
    # re-renders the form from the user's default spawner whichever server was asked for, so
    # they are kept by user. Shown once; a spawn the scheduler takes drops them.
    _refused_forms: dict[str, dict] = {}
    _launching = None  # the task launching the form's other sessions (held so it is not collected)

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

    _registry = None

    @property
    def registry(self) -> BaiRegistry:
        """The image registry (``c.BaiRegistry``): where nodes pull from, with what login."""
        if self._registry is None:
            self._registry = BaiRegistry(parent=self)
        return self._registry

    @property
    def volumes_are_shared(self) -> bool:
        return volumes_shared(self.volumes_shared, self.volume_driver, self.volume_driver_options)

    async def _blocking(self, fn, *args):
        """A blocking call (docker-py, a pull) in the spawners' Docker threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- state -------------------------------------------------------------------------

    def get_state(self):
        state = super().get_state()
        for k in ("request_id", "node_url", "launched"):
            if getattr(self, k):
                state[k] = getattr(self, k)
        if self.node_tls:
            state["node_tls"] = self.node_tls
        return state

    def load_state(self, state):
        super().load_state(state)
        self.request_id = state.get("request_id", "")
        self.launched = bool(state.get("launched", False))
        self.node_url = state.get("node_url", "")
        self.node_tls = state.get("node_tls", {})

    def clear_state(self):
        super().clear_state()
        self.request_id = ""
        self.launched = False
        self.node_url = ""
        self.node_tls = {}
        self.placement = {}
        self._allowed_image = ""
        self._allowed_id = ""

    # -- the form ----------------------------------------------------------------------

    async def _capacity(self) -> dict:
        return await self.scheduler.capacity()

    @staticmethod
    def _units(cap: dict) -> FgpuUnits:
        return FgpuUnits(cap["fgpu_per_gpu"], Decimal(cap["fgpu_step"]))

    async def _catalog(self) -> list[catalog_mod.CatalogImage]:
        """Every image, read from the registry by the scheduler service (its short-lived cache)."""
        return [catalog_mod.CatalogImage.from_json(i) for i in (await self.scheduler.catalog())["images"]]

    async def get_options_form(self):
        template = TEMPLATES.get_template("options_form.html")
        try:
            cap = await self._capacity()
            images = await self._catalog()
        except SchedulerError as e:  # the service, or the registry behind it, is down
            return template.render(error=str(e))
        service = self.scheduler_prefix.rstrip("/") + "/"
        return template.render(simulated=cap.get("simulated"), **form_context(
            visible=catalog_mod.visible_to(images, self.user.name, is_admin=False), user=self.user.name,
            capacity=cap, units=self._units(cap), limits=Limits.from_json(cap["limits"]), note=cap["note"],
            capacity_url=service + "capacity.json", static_url=service + "static/",
            values=BaiSpawner._refused_forms.pop(self.user.name, None), admin=bool(self.user.admin),
            home_note=home_note(self.volumes_are_shared, [n["name"] for n in cap.get("nodes", [])]),
            user_groups=[g.name for g in self.user.groups],
        ))

    def options_from_form(self, formdata):
        # Parsed in start() with the live units, limits and catalog: this only
        # keeps the raw values, so a hand-crafted POST meets the same checks.
        values = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in formdata.items()
                  if k in FIELDS}
        BaiSpawner._refused_forms[self.user.name] = {k: v for k, v in values.items() if isinstance(v, str)}
        return values

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
        self.launched = bool(raw.pop(LAUNCHED, False)) and bool(self.name)
        if not raw.get("image") and not raw.get("image_name"):
            raw["image"] = self.image
        try:
            opts = parse_options(raw, units, Limits.from_json(cap["limits"]))
        except FormError as e:
            raise web.HTTPError(400, str(e)) from None
        try:
            images = await self._catalog()
        except SchedulerError as e:
            raise web.HTTPError(503, f"{e} Nothing was started.") from None
        try:
            image = catalog_mod.resolve_image(images, self.user.name, opts.image, is_admin=False)
        except catalog_mod.ImageNotAllowed as e:
            raise web.HTTPError(400, str(e) + (catalog_mod.ADMIN_IMAGES_HINT if self.user.admin else "")) from None
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
        self._allowed_image, self._allowed_id = image.ref, image.id
        extra = opts.sessions - 1
        opts = replace(opts, sessions=1)  # this server is one session; the others launch below
        self.user_options = opts.to_user_options()
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = self.user_options
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
        BaiSpawner._refused_forms.pop(self.user.name, None)  # taken: a later form starts afresh
        if extra:
            # The others start beside this one, not ahead of it in the queue, and the hub's wait
            # for each of them does not hold this spawn.
            self._launching = asyncio.ensure_future(self._launch_more(extra))
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

    async def _launch_more(self, count: int):
        """The form's other sessions of this shape (Sessions > 1), launched in a group."""
        progress = self._events[-1]["progress"] if self._events else 5
        try:
            launched = (await self.scheduler.launch(self.user.name, count, self.user_options))["launched"]
            self._emit(progress, f"Also launched {', '.join(launched)}: see them on the Sessions page")
        except SchedulerError as e:
            self.log.warning("Could not launch %d more sessions for %s: %s", count, self.user.name, e)
            self._emit(progress, f"The {count} other session{'s' if count != 1 else ''} did not start: {e}")

    async def _wait_admitted(self, status: dict, units: FgpuUnits) -> dict:
        last = None
        while status["state"] == "PENDING":
            # The reason says what the request lacks; its place in the queue goes beside it.
            place = f"#{status['position']} in queue" if status.get("position") else "in the queue"
            message = f"{status['reason']} ({place})" if status.get("reason") else f"Waiting {place}"
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
        node = status["placement"]["node"]
        await self._ensure_image(image, node, status)
        self._emit(60, f"Starting container from {image.short_ref} on {node}")
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

    async def _ensure_image(self, image: catalog_mod.CatalogImage, node: str, status: dict) -> None:
        """The node holds exactly the validated image: pulled now when it lacks it, the pull's
        progress shown; the share stays held meanwhile (``_hold_request``). A failing pull says
        which image, which node and why; ``_start`` then returns the share."""
        name = image.short_ref
        try:
            # The node's client is made here, in the executor: making it blocks (API version negotiation).
            have = await self._blocking(lambda: local_id(self.client, image.ref))
        except ENGINE_ERRORS as e:
            raise web.HTTPError(503, f"The Docker engine of node {node} is not reachable ({e.__class__.__name__}); "
                                     "your share was returned. Start the session again.") from None
        if have == image.id:
            return
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        shown = [0.0]

        def show(t: Transfer):
            if time.monotonic() - shown[0] < 1.0 and t.done_bytes < t.total_bytes:
                return
            shown[0] = time.monotonic()
            done = t.done_bytes / t.total_bytes if t.total_bytes else 0.0
            loop.call_soon_threadsafe(self._emit, 50 + int(9 * done), f"Pulling {name} on {node}: {t.describe()}")

        self._emit(50, f"Pulling {name} on {node}: {format_size(image.size)} to download")
        hold = asyncio.ensure_future(self._hold_request(status["epoch"]))
        try:
            auth = self.registry.auth_config()
            pull = loop.run_in_executor(self.executor, pull_blocking, self.client, image.ref, auth, image.layers,
                                        show, stop)
            done, _ = await asyncio.wait({pull, hold}, timeout=self.pull_timeout, return_when=asyncio.FIRST_COMPLETED)
            if pull in done:
                pull.result()
            elif hold in done:
                raise web.HTTPError(409, f"The request was cancelled while {name} was pulled on {node}.")
            else:
                raise web.HTTPError(504, f"Pulling {name} on {node} did not finish within {self.pull_timeout} s "
                                         "(c.BaiSpawner.pull_timeout); your share was returned. Start the session "
                                         "again, or ask an admin to check the registry and the node's network.")
        except (web.HTTPError, asyncio.CancelledError, PullStopped):
            raise
        except RegistryError as e:
            raise web.HTTPError(500, f"Pulling {name} on {node} failed: {e.message} Your share was returned.") from None
        except Exception as e:  # engine errors, the registry's answer, the stream's error event
            self.log.warning("Pull of %s on %s for %s failed: %r", image.ref, node, self._log_name, e)
            raise web.HTTPError(502, f"Pulling {name} on node {node} failed: "
                                     f"{failure_reason(e, self.registry.host)}. Your share was returned.") from None
        finally:
            stop.set()
            hold.cancel()
        try:
            have = await self._blocking(local_id, self.client, image.ref)
        except ENGINE_ERRORS as e:
            raise web.HTTPError(502, f"Pulling {name} on node {node} failed: {failure_reason(e, self.registry.host)}. "
                                     "Your share was returned.") from None
        if have is None:
            raise web.HTTPError(502, f"Pulling {name} on node {node} failed: the pull ended without the image (the "
                                     "node's engine may have restarted); start the session again. Your share was "
                                     "returned.")
        if have != image.id:
            raise web.HTTPError(409, f"{name} changed in the registry since it was chosen (it was rebuilt or "
                                     "replaced); nothing was started and your share was returned. Start the "
                                     "session again to use the new image.")
        self._emit(59, f"Pulled {name} on {node}")

    async def _hold_request(self, epoch: int) -> None:
        """While the image is pulled: a long-poll stays open on the attempt, so the service
        counts the spawn as attached (its reconcile keeps the share). Returns when the attempt
        was released or is being stopped meanwhile (the user stopped it)."""
        while True:
            try:
                status = await self.scheduler.wait(self.request_id, epoch, self.wait_poll_seconds)
            except SchedulerError:
                await asyncio.sleep(1)
                continue
            if status.get("state") in ("GONE", "STOPPING"):
                return
            epoch = status["epoch"]

    async def _ensure_volumes(self) -> None:
        """The named volumes of ``volumes`` exist on the node with ``volume_driver`` and its
        options (made the first time; one made otherwise before is used as it is, with a warning)."""
        options = self._render_templates(dict(self.volume_driver_options))
        for name in self._render_templates(dict(self.volumes)):
            if name.startswith("/"):
                continue  # a host folder, not a volume
            try:
                have = await self.docker("inspect_volume", name)
            except docker.errors.NotFound:
                await self.docker("create_volume", name, driver=self.volume_driver, driver_opts=options or None,
                                  labels={L.USER: self.user.name, L.HUB: self.hub_id})
                continue
            if have.get("Driver") != self.volume_driver or (options and (have.get("Options") or {}) != options):
                self.log.warning("Volume %s on this node was made with driver %s %s, not as configured (%s %s); "
                                 "using it as it is", name, have.get("Driver"), have.get("Options"),
                                 self.volume_driver, options)

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
                package_index=await self._package_index(),
            )
        except ContainerSpecError as e:
            raise web.HTTPError(500, f"The session's container cannot be made: {e}") from None
        create["host_config"] = self.client.create_host_config(**host)
        await self._ensure_volumes()
        made = await self.docker("create_container", **create)
        # The name resolves on the node: the container must have exactly the validated image.
        runs = (await self.docker("inspect_container", made["Id"])).get("Image")
        if self._allowed_id and runs != self._allowed_id:
            await self.docker("remove_container", made["Id"], force=True)
            raise web.HTTPError(409, f"{self.registry.name_of(self.image)} on this node is not the image that was "
                                     "validated (it changed in the registry meanwhile); nothing was started. Start "
                                     "the session again.")
        return made

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
        request_id, launched = self.request_id, self.launched  # DockerSpawner.stop clears the state
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
            if launched:
                await self._remove_when_stopped()
            self.clear_state()
            return
        self.request_id = request_id
        await self._release()
        if launched:
            await self._remove_when_stopped()
        self.clear_state()

    async def _remove_when_stopped(self):
        try:
            await self.scheduler.remove_when_stopped(self.user.name, self.name)
        except SchedulerError as e:  # the server stays listed; the user can delete it on the hub's home page
            self.log.warning("Could not ask for %s to be removed once stopped: %s", self._log_name, e)

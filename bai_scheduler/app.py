"""The bai-scheduler JupyterHub service: its configuration, and the assembly of its parts.

Run by the hub as a managed service (see hub_config/jupyterhub_config.py),
reading the same config file as the hub; its own options live under
``c.BaiScheduler``.  The parts: the pure core (``core/``), the state machine
(``service``, ``store``), the engines (``engines``, ``inventory``), the image registry
(``images``: the catalog, which node holds what), snapshots (``snapshots``, ``snapshot_jobs``)
and the web layer (``web/``), whose handlers reach the parts through ``self.settings``. The
registry's own options are ``c.BaiRegistry`` (``contract/registry.py``), shared with the hub.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from decimal import Decimal, InvalidOperation
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import httpserver, web
from traitlets import Bool, CaselessStrEnum, Dict, Float, Integer, List, Unicode, default, observe, validate
from traitlets.config import Application

from . import engines, images, inventory, readiness
from .contract.form import volumes_shared
from .contract.options import Limits
from .contract.registry import BaiRegistry
from .core.model import GPU_BACKENDS, GpuBackend, Node, RequestKey
from .core.nodes import nodes_from_config, parse_bytes
from .core.placement import SPANS, STRATEGIES, Capacity
from .core.presets import check_teams, presets_from_config
from .core.queue import HEADS, ORDERS, QueuePolicy, UserLimits
from .core.quotas import GroupPolicy, Quota
from .core.units import FgpuUnits
from .hubapi import HubAPI, HubAPIError
from .service import Service
from .snapshot_jobs import JobStore
from .snapshots import Snapshots, validate_repo
from .store import Store, StoreUnavailable
from .web import api, metrics, pages
from .web import snapshots as snapshot_pages
from .web.base import MAX_BODY, STATIC, NotFoundHandler, template_env

# The form's limits and the GPU backend were BaiSpawner options; the service reads the old
# names from the same config file, with a warning (BaiSpawner warns too).
MOVED_FROM_SPAWNER = ("default_cpu", "max_cpu", "default_memory_gib", "max_memory_gib", "max_sessions_per_launch",
                      "gpu_backend", "hami_library", "mps_pipe_directory")


_DURATION = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(value, where: str) -> int:
    """Seconds from 3600, "90m", "8h" or "2d" (0: no limit); ValueError naming ``where``."""
    text = str(value).strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):].strip()
    try:
        seconds = Decimal(number.strip()) * _DURATION[unit]
    except (InvalidOperation, KeyError):
        raise ValueError(f"{where}: {value!r} is not a duration; use seconds or e.g. '90m', '8h', '2d'") from None
    if not seconds.is_finite() or seconds < 0:
        raise ValueError(f"{where}: a duration cannot be negative ({value!r})")
    return int(seconds)


def _positive_decimal(name: str, value) -> str:
    try:
        ok = Decimal(str(value)).is_finite() and Decimal(str(value)) > 0
    except InvalidOperation:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive number, e.g. '4', not {value!r}")
    return str(value)


class BaiScheduler(Application):
    name = "bai-scheduler"
    description = "Queue, capacity and placement for BAI Hub sessions"

    config_file = Unicode(
        "", config=True,
        help="Config file to load (the hub's jupyterhub_config.py; only c.BaiScheduler and c.BaiRegistry are used).",
    )
    aliases = {"config": "BaiScheduler.config_file", "db-url": "BaiScheduler.db_url"}
    flags = {"check-gpus": ({"BaiScheduler": {"check_gpus_only": True}},
                            "Check every GPU node's backend once, print one JSON line per node and exit "
                            "(1 if any is not ready).")}
    check_gpus_only = Bool(False, config=True, help="Set by --check-gpus: check the GPU nodes, print, exit.")

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
        inventory; an int: that many simulated GPUs; a list of real GPUs by UUID, each
        {uuid, index, memory, name, sm_count[, mig_parent, mig_profile]}, for engines NVML cannot
        read from here), gpu_memory (e.g. "8GiB"), gpu_name, sm_count, cpu (cores the scheduler
        may hand out, 0 = unlimited, "auto" = the engine's CPU count), memory (bytes or "64GiB",
        0 = unlimited, "auto" = the engine's total memory), and the node's GPU backend:
        gpu_backend, hami_library, hami_lock_dir, mps_pipe_directory, mps_shm_directory (each
        defaults to the c.BaiScheduler option of that name).""",
    )

    @default("nodes")
    def _default_nodes(self):
        return [{"name": "local", "docker_url": "", "gpus": "auto", "cpu": "auto", "memory": "auto"}]

    simulated_gpus = Dict(
        {"gpus": 1, "gpu_memory": "8GiB", "gpu_name": "Simulated GPU (8 GiB)", "sm_count": 108},
        config=True,
        help="Inventory used for a node with gpus='auto' when NVML finds no GPU (this mirrors "
        "the seed's demo: one 8 GiB GPU). The hub and pages then say GPUs are simulated.",
    )
    gpu_backend = CaselessStrEnum(
        GPU_BACKENDS, default_value=GpuBackend.name, config=True,
        help="""How GPU nodes enforce a share, unless a node says otherwise ('gpu_backend' in its
        entry of c.BaiScheduler.nodes). 'hami': HAMi-core's libvgpu.so (memory and SM limits per
        device, nvidia-smi shows the share; cooperative: a process that unsets LD_PRELOAD escapes
        it). 'mps': a CUDA MPS control daemon (memory and SM limits per client process: a session
        running N CUDA processes gets N shares). 'mig': MIG instances, one per session. 'whole':
        whole GPUs only. A node is checked before any GPU share goes there (docs/install.md).""",
    )
    hami_library = Unicode(
        GpuBackend.hami_library, config=True,
        help="Path of HAMi-core's libvgpu.so on GPU nodes (backend 'hami'); mounted read-only and preloaded.",
    )
    hami_lock_dir = Unicode(
        GpuBackend.hami_lock_dir, config=True,
        help="Folder on GPU nodes that HAMi-core's processes of every session lock in (backend 'hami'); "
        "mounted as /tmp/vgpulock. Without it HAMi-core's SM limiter does not run.",
    )
    mps_pipe_directory = Unicode(
        GpuBackend.mps_pipe_directory, config=True,
        help="CUDA_MPS_PIPE_DIRECTORY of the MPS control daemon on GPU nodes (backend 'mps').",
    )
    mps_shm_directory = Unicode(
        GpuBackend.mps_shm_directory, config=True,
        help="Folder the MPS control daemon uses as /dev/shm on GPU nodes (backend 'mps'); mounted as "
        "/dev/shm in sessions instead of sharing the host's IPC namespace.",
    )
    readiness_interval = Float(
        60, config=True,
        help="Seconds between checks that each real GPU node can enforce its backend. A node that "
        "fails gets no new GPU share (CPU-only sessions still run there) until a check passes.",
    )
    queue_order = CaselessStrEnum(
        ORDERS, "fifo", config=True, help="Queue order: 'fifo' or 'drf' (dominant resource fairness across users).",
    )
    queue_head = CaselessStrEnum(
        HEADS, "backfill", config=True,
        help="What a head that does not fit does: 'strict' (everyone waits), 'skip' (skip it after "
        "skip_after passes) or 'backfill' (smaller requests start when they cannot delay the head).",
    )
    skip_after = Integer(3, config=True, help="Passes a head may block before 'skip' lets others past.")
    span = CaselessStrEnum(
        SPANS, "whole-then-fraction", config=True,
        help="Requests above one GPU: 'whole-then-fraction' (whole devices, then a fraction on one "
        "more device of the same node) or 'whole-only' (above one GPU only whole multiples).",
    )
    strategy = CaselessStrEnum(
        STRATEGIES, "concentrate", config=True,
        help="Placement: 'concentrate' (best fit; keeps whole GPUs free) or 'spread' (emptiest first).",
    )
    max_running_per_user = Integer(0, config=True, help="Running sessions a user may have (0 = no limit).")
    max_pending_per_user = Integer(0, config=True, help="Queued sessions a user may have (0 = no limit).")
    max_fgpu_per_user = Unicode("0", config=True, help="fGPU a user may hold at once, e.g. '2' (0 = no limit).")
    max_cpu_per_user = Float(0, config=True, help="CPUs a user may hold at once (0 = no limit).")
    max_memory_per_user = Unicode("0", config=True, help="Memory a user may hold at once, e.g. '32GiB' (0 = no limit).")
    wait_timeout = Float(30, config=True, help="Seconds a spawner's long-poll for its request is held open.")

    # -- teams and time (groups are the hub's groups; core/quotas.py, core/presets.py, core/eta.py) --
    group_quotas = Dict(
        config=True,
        help="""What each JupyterHub group's members may hold together, checked beside the per-user
        limits: {"team-vision": {"running": 4, "pending": 8, "fgpu": "8", "cpu": 16, "memory": "64GiB"}}
        (each key optional, 0 = no limit). A session counts against one group: the one its user picks
        in the form, by default the first of the user's groups named in group_quotas, group_pools or
        group_lifetimes. A request its group's quota holds waits ("team-vision uses 8 of 8 fGPU")
        without blocking other groups.""",
    )
    group_pools = Dict(
        config=True,
        help="""Node pools each group may use: {"team-vision": ["a100"]}. A node's pool is "pool" in its
        entry of c.BaiScheduler.nodes ("default" if not set). A group not named here may use every pool.""",
    )
    group_lifetimes = Dict(
        config=True,
        help="""Longest a session of each group may run: {"team-vision": "8h"} (seconds, or with m, h, d).
        Groups not named here get session_lifetime.""",
    )
    session_lifetime = Unicode(
        "0", config=True,
        help="Longest any other session may run, e.g. '24h' (0 = no limit). After it the session is "
        "stopped through the hub; from lifetime_notice before, the sessions page and the server's "
        "spawn progress say when. With a lifetime for everyone, the queue ETA can state an upper bound.",
    )
    lifetime_notice = Float(
        600, config=True, help="Seconds before a session's lifetime ends from which its notice is shown.",
    )
    lifetime_check_interval = Float(
        30, config=True, help="Seconds between checks for sessions that reached their lifetime.",
    )
    allow_ungrouped = Bool(
        True, config=True,
        help="Whether users in none of the groups named in group_quotas/group_pools/group_lifetimes may "
        "start sessions (counted against no group quota, in any pool). False: they are told to ask an admin.",
    )
    presets = List(
        Dict(), config=True,
        help="""Resource presets offered first in the spawn form and in POST api/launch (KubeSpawner's
        profile_list shape): [{"display_name": "Small GPU", "slug": "small", "description": "...",
        "default": True, "fgpu": "0.5", "cpu": "2", "memory": "4GiB", "image": "", "pool": ""}]. "image"
        and "pool" are optional. Checked at start-up: an unknown pool or image, a pool with no nodes or a
        group quota smaller than every preset stops the service with a message.""",
    )
    allow_custom_resources = Bool(
        True, config=True,
        help="Whether users may ask for their own fGPU/CPU/memory besides the presets (False: presets only).",
    )
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
    authenticate_prometheus = Bool(
        True, config=True,
        help="Whether {prefix}metrics needs a token with the read:metrics scope (as the hub's own "
        "c.JupyterHub.authenticate_prometheus). The scraper's role also needs "
        "access:services!service=bai-scheduler. False: anyone who reaches the service reads them.",
    )

    # -- one session's limits: the spawn form, the sessions page and api/launch (published in api/capacity) --
    default_cpu = Unicode("1", config=True, help="CPU cores the session form proposes.")
    max_cpu = Unicode("4", config=True, help="Most CPU cores one session may ask for.")
    default_memory_gib = Unicode("2", config=True, help="Memory (GiB) the session form proposes.")
    max_memory_gib = Unicode("16", config=True, help="Most memory (GiB) one session may ask for.")
    max_sessions_per_launch = Integer(
        4, config=True,
        help="Most sessions one launch starts: the form's Sessions field, the sessions page and api/launch's count.",
    )
    max_launch = Integer(config=True, help="Deprecated: use c.BaiScheduler.max_sessions_per_launch.")

    # dockerspawner's way of renaming an option: the old name sets the new one, with a warning.
    _deprecated_aliases = {"max_launch": "max_sessions_per_launch"}

    @observe(*_deprecated_aliases)
    def _deprecated_trait(self, change):
        new = self._deprecated_aliases[change.name]
        if getattr(self, new) != change.new:
            self.log.warning("BaiScheduler.%s is deprecated, use BaiScheduler.%s instead", change.name, new)
            setattr(self, new, change.new)

    @validate("default_cpu", "max_cpu", "default_memory_gib", "max_memory_gib")
    def _check_amount(self, proposal):
        return _positive_decimal(proposal.trait.name, proposal.value)

    @validate("max_sessions_per_launch")
    def _check_sessions(self, proposal):
        if proposal.value < 1:
            raise ValueError("max_sessions_per_launch must be at least 1")
        return proposal.value

    template_paths = List(
        Unicode(), config=True,
        help="Folders with templates for the service's pages, searched after its own and before "
        "JupyterHub's (its pages extend JupyterHub's page.html). Default: c.JupyterHub.template_paths "
        "from the same config file, so the pages wear the hub's brand (hub_config/templates).",
    )

    @default("template_paths")
    def _default_template_paths(self):
        hub = self.config["JupyterHub"] if "JupyterHub" in self.config else {}
        return list(hub.get("template_paths", []))

    # -- snapshots (bai_scheduler/snapshots.py) --
    private_image_repo = Unicode(
        "bai-private", config=True,
        help="Repository prefix of private images made from sessions, in the image registry "
        "(c.BaiRegistry): <repo>/<user>:<tag>, pushed as <registry host>/<repo>/<user>:<tag>. A "
        "lower-case repository path, e.g. 'bai-private' or 'teams/bai-private'.",
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

    @validate("private_image_repo")
    def _check_repo(self, proposal):
        return validate_repo(proposal.value)

    @validate("fgpu_step")
    def _check_step(self, proposal):
        FgpuUnits(self.fgpu_per_gpu, proposal.value)
        return proposal.value

    reconcile_interval = Float(
        60, config=True,
        help="Seconds between full reconciles with the engines. Engine events free shares at once; "
        "this only collects what events could not tell (e.g. an admission whose spawn never came).",
    )

    # -- assembly ---------------------------------------------------------------

    @property
    def units(self) -> FgpuUnits:
        return FgpuUnits(self.fgpu_per_gpu, self.fgpu_step)

    def build_nodes(self) -> list[Node]:
        defaults = GpuBackend(self.gpu_backend, self.hami_library, self.hami_lock_dir,
                              self.mps_pipe_directory, self.mps_shm_directory)
        return nodes_from_config(self.nodes, self.units, defaults, self.simulated_gpus,
                                 detect=inventory.nvml_devices, log=self.log,
                                 engine_resources=engines.engine_resources)

    def user_limits(self) -> UserLimits:
        return UserLimits(
            max_running=self.max_running_per_user,
            max_pending=self.max_pending_per_user,
            max_quanta=self.units.to_quanta(self.max_fgpu_per_user),
            max_cpu_millis=int(self.max_cpu_per_user * 1000),
            max_memory_bytes=parse_bytes(self.max_memory_per_user),
        )

    def group_policies(self) -> dict[str, GroupPolicy]:
        """Every group named in group_quotas, group_pools or group_lifetimes; ValueError naming what is wrong."""
        out = {}
        for name in sorted({*self.group_quotas, *self.group_pools, *self.group_lifetimes}):
            q = self.group_quotas.get(name) or {}
            if not isinstance(q, dict) or set(q) - {"running", "pending", "fgpu", "cpu", "memory"}:
                raise ValueError(f"c.BaiScheduler.group_quotas[{name!r}]: a dict of running, pending, fgpu, "
                                 f"cpu, memory (got {q!r})")
            try:
                quota = Quota(
                    max_running=int(q.get("running", 0)), max_pending=int(q.get("pending", 0)),
                    max_quanta=self.units.to_quanta(q.get("fgpu", 0)),
                    max_cpu_millis=int(Decimal(str(q.get("cpu", 0))) * 1000),
                    max_memory_bytes=parse_bytes(q.get("memory", 0)))
            except (ValueError, InvalidOperation) as e:
                raise ValueError(f"c.BaiScheduler.group_quotas[{name!r}]: {e}") from None
            pools = self.group_pools.get(name, [])
            if not isinstance(pools, (list, tuple)) or not all(isinstance(p, str) for p in pools):
                raise ValueError(f"c.BaiScheduler.group_pools[{name!r}]: a list of pool names (got {pools!r})")
            lifetime = parse_duration(self.group_lifetimes.get(name, 0), f"c.BaiScheduler.group_lifetimes[{name!r}]")
            out[name] = GroupPolicy(quota, tuple(sorted(pools)), lifetime)
        return out

    def check_teams(self, images: set[str] | None) -> None:
        """Refuse to start (ValueError, one line per problem) with presets or groups that could never run."""
        capacity = Capacity(self.node_list, self.units.quanta_per_gpu, span=self.span, units=self.units)
        problems = check_teams(self.form_limits.presets, self.groups, capacity.pools(), self.units, images,
                               capacity.can_ever_fit)
        if problems:
            raise ValueError("Teams configuration: " + "; ".join(problems) + ".")

    def session_limits(self) -> Limits:
        """One session's limits; fGPU up to the largest node's GPUs."""
        limits = Limits(
            max_quanta=max((sum(d.quanta for d in n.devices) for n in self.node_list), default=0),
            max_cpu=Decimal(self.max_cpu),
            max_memory_gib=Decimal(self.max_memory_gib),
            default_cpu=Decimal(self.default_cpu),
            default_memory_gib=Decimal(self.default_memory_gib),
            max_sessions=self.max_sessions_per_launch,
            presets=presets_from_config(self.presets, self.units),
            custom=self.allow_custom_resources,
        )
        if not limits.presets and not limits.custom:
            raise ValueError("BaiScheduler.allow_custom_resources is False but no presets are set: nobody "
                             "could start a session. Set c.BaiScheduler.presets, or allow custom resources.")
        for what in ("cpu", "memory_gib"):
            if getattr(limits, f"default_{what}") > getattr(limits, f"max_{what}"):
                raise ValueError(f"BaiScheduler.default_{what} ({getattr(limits, f'default_{what}')}) is above "
                                 f"BaiScheduler.max_{what} ({getattr(limits, f'max_{what}')}): lower it or raise the limit.")
        return limits

    def home_shared(self) -> bool:
        """Whether every node sees the same home folder, as the spawner's volume options in the same
        config file say (c.BaiSpawner.volume_driver, volume_driver_options, volumes_shared)."""
        spawner = self.config["BaiSpawner"] if "BaiSpawner" in self.config else {}
        return volumes_shared(spawner.get("volumes_shared"), spawner.get("volume_driver", "local"),
                              spawner.get("volume_driver_options", {}))

    def take_moved_spawner_options(self) -> None:
        """Apply the options still set under their old names (c.BaiSpawner.max_cpu, .gpu_backend …)."""
        old = self.config["BaiSpawner"] if "BaiSpawner" in self.config else {}
        mine = self.config["BaiScheduler"] if "BaiScheduler" in self.config else {}
        for name in MOVED_FROM_SPAWNER:
            if name not in old:
                continue
            if name in mine:
                self.log.warning("c.BaiSpawner.%s is deprecated and ignored: c.BaiScheduler.%s is set", name, name)
                continue
            self.log.warning("c.BaiSpawner.%s is deprecated: set c.BaiScheduler.%s instead", name, name)
            setattr(self, name, old[name])

    def initialize(self, argv=None):
        super().initialize(argv)
        logging.basicConfig(level=logging.INFO, format="[%(levelname).1s %(asctime)s bai-scheduler] %(message)s")
        self.log = logging.getLogger("bai_scheduler")
        if self.config_file:
            self.load_config_file(self.config_file)
        self.take_moved_spawner_options()
        self.node_list = self.build_nodes()
        self.readiness = {n.name: readiness.unchecked(n) for n in self.node_list}
        if self.check_gpus_only:
            return  # no database, service or hub needed
        self.form_limits = self.session_limits()
        self.groups = self.group_policies()
        self.default_lifetime = parse_duration(self.session_lifetime, "c.BaiScheduler.session_lifetime")
        self.check_teams(None)  # images: once the catalog is read (serve)
        self.store = Store(self.db_url, timeout=self.db_timeout)
        self.engines = engines.DockerEngines(self.node_list, self.hub_id)
        self.service = Service(
            self.node_list, self.units, self.store,
            policy=QueuePolicy(order=self.queue_order, head=self.queue_head, skip_after=self.skip_after),
            limits=self.user_limits(), span=self.span, strategy=self.strategy,
            engines=self.engines, admission_grace=self.admission_grace, orphan_grace=self.orphan_grace,
            groups=self.groups, default_lifetime=self.default_lifetime,
        )
        self.service.notice_before = self.lifetime_notice
        self._reconciling = asyncio.Lock()
        self._lifetime_stops: dict[str, float] = {}  # attempt id -> when its lifetime stop was asked
        self.hub = HubAPI()
        self.internal_token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        self.service.on_orphan_admitted = self.start_orphan
        self.registry = BaiRegistry(parent=self)
        self.catalog = images.CatalogCache(self.registry, self.private_image_repo)
        self.snapshots = Snapshots(self.node_list, self.service, self.registry, self.catalog,
                                   jobs=JobStore(self.store.engine), repo=self.private_image_repo,
                                   cap=self.max_private_images_per_user, pause=self.snapshot_pause)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/bai-scheduler/")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.hub_auth = HubOAuth(api_token=self.internal_token, cache_max_age=60)

    async def start_orphan(self, rec, attempts: int = 60):
        """Ask the hub to start a server admitted while nobody waited for it."""
        for _ in range(attempts):
            # A spawner that waits now, or got the admission, makes the container itself. (Not
            # is_attached: a spawner seen a moment ago may have died with the hub, and then the
            # reconcile asks for this start while it still counts as attached.)
            if self.service.get(rec.key) is not rec or rec.delivered or self.service.is_waited_on(rec):
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

    node_images_interval = Float(
        30, config=True,
        help="Seconds between readings of which images each node holds; placement prefers a node "
        "that holds a session's image when capacity is otherwise equal (no pull needed).",
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

    async def read_node_images(self) -> None:
        """Which images each node holds (for placement's preference); a node that does not answer
        keeps what was last read."""
        def one(node):
            return images.node_images_blocking(engines.make_client(node))

        results = await asyncio.gather(*(asyncio.to_thread(one, n) for n in self.node_list), return_exceptions=True)
        for node, held in zip(self.node_list, results):
            if isinstance(held, BaseException):
                self.log.warning("Cannot list the images on node %s: %s", node.name, held)
            else:
                self.service.set_node_images(node.name, held)

    async def read_node_images_forever(self):
        while True:
            await asyncio.sleep(self.node_images_interval)
            await self.read_node_images()

    async def check_gpus(self) -> None:
        """Check every real GPU node's backend (in threads); only ready nodes get GPU shares."""
        nodes = [n for n in self.node_list if readiness.needs_check(n)]
        results = await asyncio.gather(*(asyncio.to_thread(self.check_gpu_node, n) for n in nodes))
        became_ready = False
        for node, result in zip(nodes, results):
            before = self.readiness[node.name]
            self.readiness[node.name] = result
            self.service.set_gpu_ready(node.name, result.ready)
            if (before.ready, before.reason) != (result.ready, result.reason):
                if result.ready:
                    self.log.info("Node %s: GPU backend %s ready (%s)", node.name, node.gpu.name, result.reason)
                else:
                    self.log.error("Node %s: GPU backend %s NOT ready, no GPU session goes there: %s",
                                   node.name, node.gpu.name, result.reason)
            became_ready |= result.ready and not before.ready
        if became_ready:
            try:
                await self.service.schedule()
            except StoreUnavailable as e:
                self.log.error("Scheduling after a GPU node became ready postponed: %s", e)

    async def stop_expired(self) -> None:
        """Stop, through the hub, every session past its lifetime (its notice was shown before).
        A stop asked for is asked again only after a minute (the hub may still be stopping it)."""
        now = time.time()
        asked = self._lifetime_stops
        for attempt_id in [i for i, t in asked.items() if now - t > 60 or self.service.attempt(i) is None]:
            del asked[attempt_id]
        for rec in self.service.expired(now):
            if rec.id in asked:
                continue
            asked[rec.id] = now
            self.log.info("Stopping %s: it reached its lifetime", rec.key)
            try:
                await self.hub.stop_server(rec.key.user, rec.key.server)
                hub_stops_it = True
            except (HubAPIError, OSError) as e:
                self.log.warning("Hub stop of %s (lifetime) failed: %s; stopping it here", rec.key, e)
                hub_stops_it = False
            try:
                await api.stop_session(self.service, rec, hub_stops_it)
            except StoreUnavailable as e:
                self.log.error("Could not record the lifetime stop of %s: %s", rec.key, e)

    async def stop_expired_forever(self):
        while True:
            await asyncio.sleep(self.lifetime_check_interval)
            await self.stop_expired()

    async def check_images(self) -> None:
        """Presets naming an image must name one the catalog has (checked once the registry answers)."""
        if not any(p.image for p in self.form_limits.presets):
            return
        try:
            images = await self.catalog.get()
        except Exception as e:  # the registry is down: said at start-up, checked by the form later
            self.log.warning("Could not read the image catalog to check the presets' images: %s", e)
            return
        # Every name the form accepts for an image (resolve_image): the catalog name users see,
        # the registry's reference, each tag.
        self.check_teams({n for i in images for n in (i.ref, i.short_ref, *i.names, *i.tags)})

    def check_gpu_node(self, node: Node) -> readiness.Readiness:
        try:
            client = engines.make_client(node)
        except Exception as e:  # engine down
            return readiness.Readiness(node.name, node.gpu.name, False, f"the node's engine does not answer: {e}")
        return readiness.check_node(node, readiness.EngineProbe(client, f"{self.hub_id}-"))

    async def check_gpus_forever(self):
        while True:
            await asyncio.sleep(self.readiness_interval)
            await self.check_gpus()

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
        """The tornado app: every web module's ``default_handlers`` under the service's prefix,
        and what handlers find in ``self.settings``."""
        routes = [(r"oauth_callback", HubOAuthCallbackHandler)]
        for module in (api, pages, snapshot_pages, metrics):
            routes += module.default_handlers
        return web.Application(
            [(self.prefix + path, handler) for path, handler in routes],
            default_handler_class=NotFoundHandler,
            bai=self,
            service=self.service,
            hub=self.hub,
            prefix=self.prefix,
            limits=self.form_limits,
            readiness=self.readiness,
            internal_token=self.internal_token,
            snapshots=self.snapshots,
            catalog=self.catalog,
            registry=self.registry,
            notices=pages.Notices(),
            hub_auth=self.hub_auth,
            jinja2_env=template_env(self.template_paths),
            cookie_secret=os.urandom(32),
            static_path=STATIC,
            static_url_prefix=self.prefix + "static/",
            xsrf_cookies=False,
        )

    def start(self):
        if self.check_gpus_only:
            sys.exit(self.print_gpu_checks())
        asyncio.run(self.serve())

    def print_gpu_checks(self) -> int:
        results = [self.check_gpu_node(n) if readiness.needs_check(n) else self.readiness[n.name]
                   for n in self.node_list]
        for r in results:
            print(json.dumps({"node": r.node, "backend": r.backend, "ready": r.ready, "reason": r.reason,
                              "simulated": r.simulated}))
        return 0 if all(r.ready for r in results) else 1

    async def serve(self):
        url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8090"))
        await self.check_images()
        await self.check_gpus()
        await self.read_node_images()
        await self.reconcile_all()
        recovering = asyncio.ensure_future(self.snapshots.recover())
        loop = asyncio.get_running_loop()
        self.watchers = [
            engines.EventWatcher(n, loop, self.container_event, self.reconcile_all, self.hub_id) for n in self.node_list
        ]
        for w in self.watchers:
            w.start()
        sweeper = asyncio.ensure_future(self.reconcile_forever())
        gpu_checks = asyncio.ensure_future(self.check_gpus_forever())
        image_reads = asyncio.ensure_future(self.read_node_images_forever())
        lifetimes = asyncio.ensure_future(self.stop_expired_forever())
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
        gpu_checks.cancel()
        image_reads.cancel()
        recovering.cancel()
        lifetimes.cancel()
        for w in self.watchers:
            w.stop()
        self.service.close()


def main(argv=None):
    app = BaiScheduler.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])

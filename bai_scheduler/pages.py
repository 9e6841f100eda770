"""Browser pages of the scheduler service: the sessions overview.

``/services/bai-scheduler/`` lists the user's sessions (admins: everyone's, plus
the capacity of each node and GPU), joining two views: the scheduler's records
(queue position, why a request waits, node and GPU shares) and the hub's
servers (ready, pending, URL). It refreshes itself (a small script polls
``sessions.json``; without JavaScript a meta refresh), stops sessions through
the hub, and launches N sessions of one shape (validated exactly like the spawn
form, then started as named servers through the hub).

The row building is plain functions (``session_rows``, ``node_rows``,
``summarize``), tested without a hub in tests/test_pages.py.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from decimal import Decimal
from urllib.parse import quote

from tornado import web

from .app import BaseHandler, CapacityHandler, launch_sessions, stop_session
from .hubapi import HubAPIError
from .store import StoreUnavailable
from .units import FgpuUnits, format_bytes

log = logging.getLogger("bai_scheduler")

POLL_SECONDS = 2
LAUNCH_PREFIX = "session"

# Display order and Bootstrap colours of the states a row can be in.
STATES = {
    "RUNNING": ("success", "Running"),
    "STARTING": ("info", "Starting"),
    "PENDING": ("warning", "Pending"),
    "STOPPING": ("secondary", "Stopping"),
}
STATE_ORDER = {s: i for i, s in enumerate(STATES)}


# -- pure helpers ---------------------------------------------------------------------------


def ago(seconds: float | None) -> str:
    """A short human age: "just now", "42 s", "5 min", "3 h", "2 d"."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 5:
        return "just now"
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def _iso_to_epoch(value) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _gpu_text(placement: dict | None, units: FgpuUnits | None) -> str:
    if not placement:
        return ""
    parts = []
    for s in placement.get("shares", []):
        idx = s.get("index")
        name = f"GPU {idx}" if idx is not None else str(s.get("device", ""))[:12]
        if units is not None:
            parts.append(f"{name} × {units.to_fgpu(s.get('quanta', 0))}")
        else:
            parts.append(name)
    return ", ".join(parts)


def session_rows(statuses: list[dict], hub_users: list[dict], *, units: FgpuUnits | None = None,
                 now: float | None = None) -> list[dict]:
    """One row per session, joining the scheduler's records and the hub's servers.

    ``statuses``: ``SchedulerService.status()`` dicts. ``hub_users``: hub user
    models with their ``servers``. A session is RUNNING when the hub says its
    server is ready, STARTING when the scheduler admitted it (or the hub is
    spawning it) but it is not ready yet, PENDING while it waits in the queue
    (with its place and the reason), STOPPING while the hub stops it. Stopped
    servers the scheduler knows nothing about are not listed.
    """
    now = time.time() if now is None else now
    servers = {}
    for u in hub_users or []:
        for name, s in (u.get("servers") or {}).items():
            servers[(u["name"], name)] = s
    records = {(r["user"], r["server"]): r for r in statuses or [] if r["state"] != "STOPPING"}
    # Attempts whose container is being removed: on the server's row when nothing newer runs
    # there, else a row of their own (the server may be starting again meanwhile).
    stopping = {}
    for r in statuses or []:
        if r["state"] == "STOPPING":
            key = (r["user"], r["server"])
            if key not in records and key not in stopping:
                stopping[key] = r
            else:
                stopping[(r["user"], r["server"], r["id"])] = r
    rows = []
    for key in set(servers) | set(records) | set(stopping):
        user, server = key[:2]
        s = servers.get(key) if len(key) == 2 else None
        r = records.get(key) or stopping.get(key)
        pending = (s or {}).get("pending")
        if (r and r["state"] == "STOPPING") or (s and pending == "stop"):
            state = "STOPPING"
        elif s and s.get("ready"):
            state = "RUNNING"
        elif r and r["state"] == "PENDING":
            state = "PENDING"
        elif r and r["state"] == "RUNNING":
            state = "STARTING"
        elif s and pending:
            state = "STARTING"
        else:
            continue
        opts = (s or {}).get("user_options") or {}
        image = (r or {}).get("image") or opts.get("image") or ""
        if r is not None:
            fgpu = r.get("fgpu", "")
            cpu_millis, memory = r.get("cpu_millis", 0), r.get("memory_bytes", 0)
        else:
            q = opts.get("quanta")
            fgpu = units.to_fgpu(q) if (units is not None and isinstance(q, int)) else str(opts.get("fgpu", ""))
            cpu_millis, memory = opts.get("cpu_millis", 0) or 0, opts.get("memory_bytes", 0) or 0
        placement = (r or {}).get("placement")
        if state == "RUNNING":
            since = _iso_to_epoch((s or {}).get("started")) or (r or {}).get("admitted_at")
        elif state == "STARTING":
            since = (r or {}).get("admitted_at") or _iso_to_epoch((s or {}).get("started"))
        else:
            since = (r or {}).get("submitted_at")
        if state == "PENDING":
            detail = r.get("reason") or "Waiting in the queue"
        elif state == "STARTING":
            detail = (f"Admitted on {placement['node']}; starting the container" if placement
                      else "Asking the scheduler for a place")
        elif state == "STOPPING" and (r or {}).get("stop_error"):
            detail = (f"Stopping failed: {r['stop_error']}. Its share stays held while the scheduler "
                      "keeps trying to remove the container.")
        elif state == "STOPPING":
            detail = "Stopping; its share is freed when the container is gone"
        else:
            detail = ""
        color, label = STATES[state]
        rows.append({
            "user": user,
            "server": server,
            "name": server or "default",
            "state": state,
            "label": label,
            "color": color,
            "position": (r or {}).get("position") if state == "PENDING" else None,
            "detail": detail,
            "image": image,
            "fgpu": str(fgpu) if fgpu not in (None, "") else "0",
            "gpus": _gpu_text(placement, units),
            "node": (placement or {}).get("node", ""),
            "simulated": bool((placement or {}).get("simulated")),
            "cpu": f"{cpu_millis / 1000:g}" if cpu_millis else "",
            "memory": format_bytes(memory) if memory else "",
            "since": ago(now - since) if since else "",
            "url": (s or {}).get("url") if state == "RUNNING" else None,
            "can_stop": state != "STOPPING",
            "known_to_hub": s is not None,
            "request_id": (r or {}).get("id"),
        })
    rows.sort(key=lambda x: (STATE_ORDER[x["state"]], x["position"] or 0, x["user"], x["server"]))
    return rows


def summarize(rows: list[dict], nodes: list[dict] | None = None) -> dict:
    """Counts for the header: sessions per state and fGPU held by the listed sessions."""
    out = {state: 0 for state in STATES}
    for r in rows:
        out[r["state"]] += 1
    held = sum(Decimal(r["fgpu"] or "0") for r in rows if r["state"] in ("RUNNING", "STARTING"))
    out["total"] = len(rows)
    out["fgpu_held"] = format(held.normalize(), "f") if held else "0"
    return out


def node_rows(snapshot: list[dict], units: FgpuUnits, live: dict | None = None) -> list[dict]:
    """Per node and GPU: used/total as fGPU, memory, CPU, and live NVML stats where given.

    ``snapshot``: ``Capacity.snapshot()``; ``live``: {device uuid: {"memory_used",
    "memory_total", "utilization"}} for real GPUs.
    """
    live = live or {}
    out = []
    for n in snapshot:
        devices = []
        for d in n["devices"]:
            cap, used = d["capacity_quanta"], d["used_quanta"]
            share_mem = d["memory_bytes"] * used // cap if cap else 0
            stats = live.get(d["uuid"])
            devices.append({
                "label": f"GPU {d['index']}" + (f" · {d['mig_profile']}" if d.get("mig_profile") else ""),
                "name": d["name"],
                "used": units.to_fgpu(used),
                "total": units.to_fgpu(cap),
                "free": units.to_fgpu(max(0, cap - used)),
                "percent": min(100, round(100 * used / cap)) if cap else 0,
                "overcommitted": units.to_fgpu(d.get("overcommitted_quanta", 0)) if d.get("overcommitted_quanta") else "",
                "memory_total": format_bytes(d["memory_bytes"]),
                "memory_granted": format_bytes(share_mem),
                "live": None if stats is None else {
                    "memory": f"{format_bytes(stats['memory_used'])} of {format_bytes(stats['memory_total'])}",
                    "memory_percent": round(100 * stats["memory_used"] / stats["memory_total"]) if stats["memory_total"] else 0,
                    "utilization": stats["utilization"],
                },
            })
        cpu_total, mem_total = n.get("cpu_millis_total", 0), n.get("memory_bytes_total", 0)
        out.append({
            "name": n["name"],
            "simulated": n.get("simulated", False),
            "used": units.to_fgpu(n["used_quanta"]),
            "total": units.to_fgpu(n["capacity_quanta"]),
            "percent": round(100 * n["used_quanta"] / n["capacity_quanta"]) if n["capacity_quanta"] else 0,
            "cpu": (f"{n.get('cpu_millis_used', 0) / 1000:g} of {cpu_total / 1000:g} CPU" if cpu_total
                    else f"{n.get('cpu_millis_used', 0) / 1000:g} CPU"),
            "memory": (f"{format_bytes(n.get('memory_bytes_used', 0))} of {format_bytes(mem_total)}" if mem_total
                       else format_bytes(n.get("memory_bytes_used", 0))),
            "limited": bool(cpu_total or mem_total),
            "devices": devices,
        })
    return out


# -- live GPU stats (real GPUs only) -----------------------------------------------------------

_live_cache: dict = {"at": 0.0, "data": {}}


def live_gpu_stats(nodes) -> dict:
    """Memory in use and utilization of the local real GPUs, from nvidia-ml-py.

    Empty when every node is simulated, NVML is missing, or on any NVML error.
    Cached for a second so a page poll does not hammer the driver.
    """
    uuids = [d.uuid for n in nodes if not n.simulated and not n.docker_url for d in n.devices]
    if not uuids:
        return {}
    if time.monotonic() - _live_cache["at"] < 1.0:
        return _live_cache["data"]
    out = {}
    try:
        import pynvml as nv

        nv.nvmlInit()
        for uuid in uuids:
            try:
                h = nv.nvmlDeviceGetHandleByUUID(uuid)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:  # MIG instances have no utilization counter
                    util = None
                out[uuid] = {"memory_used": int(mem.used), "memory_total": int(mem.total), "utilization": util}
            except Exception:
                continue
    except Exception as e:
        log.debug("NVML live stats unavailable: %s", e)
    _live_cache.update(at=time.monotonic(), data=out)
    return out


# -- form support: the spawner's limits and the image catalog -----------------------------------

_catalog_cache: dict = {"at": 0.0, "images": None}


def spawner_setting(bai, name: str):
    """A BaiSpawner option as configured in the shared config file (else its default)."""
    from bai_spawner.spawner import BaiSpawner

    cfg = bai.config["BaiSpawner"] if "BaiSpawner" in bai.config else {}
    if name in cfg:
        return cfg[name]
    return BaiSpawner.class_traits()[name].default_value


def form_limits(bai, capacity: dict):
    from bai_spawner.form import Limits

    biggest = max((sum(d["quanta"] for d in n["devices"]) for n in capacity["nodes"]), default=0)
    return Limits(
        max_quanta=biggest,
        max_cpu=Decimal(str(spawner_setting(bai, "max_cpu"))),
        max_memory_gib=Decimal(str(spawner_setting(bai, "max_memory_gib"))),
        default_cpu=Decimal(str(spawner_setting(bai, "default_cpu"))),
        default_memory_gib=Decimal(str(spawner_setting(bai, "default_memory_gib"))),
        max_sessions=max(1, min(int(spawner_setting(bai, "max_sessions_per_launch")), bai.max_launch)),
    )


def capacity_model(bai) -> dict:
    """What GET api/capacity answers (the form renders from it)."""
    units = bai.units
    return {
        "fgpu_per_gpu": units.fgpu_per_gpu,
        "fgpu_step": str(units.fgpu_step),
        "quanta_per_gpu": units.quanta_per_gpu,
        "nodes": [{
            "name": n.name, "simulated": n.simulated,
            "devices": [{"uuid": d.uuid, "index": d.index, "name": d.name, "memory_bytes": d.memory_bytes,
                         "sm_count": d.sm_count, "quanta": d.quanta} for d in n.devices],
        } for n in bai.node_list],
        "usage": bai.service.capacity(),
        "queue_length": len(bai.service.pending()),
        "simulated": any(n.simulated for n in bai.node_list),
    }


async def load_catalog(bai, max_age: float = 15.0):
    """The image catalog from the first node's engine (the hub's spawner reads the same)."""
    from bai_spawner import catalog as catalog_mod

    if _catalog_cache["images"] is not None and time.monotonic() - _catalog_cache["at"] < max_age:
        return _catalog_cache["images"]
    if not bai.node_list:
        return []
    # Making a client negotiates the API version over the socket: in a thread, like the listing.
    client = await asyncio.to_thread(bai.engines.client, bai.node_list[0].name)
    images = await catalog_mod.load_catalog(client)
    _catalog_cache.update(at=time.monotonic(), images=images)
    return images


# Short messages shown to a user on their next page view (after a POST redirect,
# or a background launch that the hub refused).
_notices: dict[str, list[tuple[float, str, str]]] = {}
NOTICE_SECONDS = 60


def add_notice(user: str, level: str, text: str) -> None:
    items = _notices.setdefault(user, [])
    items.append((time.time(), level, text))
    del items[:-6]


def notices_for(user: str) -> list[dict]:
    now = time.time()
    items = [n for n in _notices.get(user, []) if now - n[0] < NOTICE_SECONDS]
    _notices[user] = items
    return [{"level": lvl, "text": text} for _, lvl, text in items]


# -- handlers --------------------------------------------------------------------------------------


class PageHandler(BaseHandler):
    """A page of the service: HTML errors, hub links, and the shared page data."""

    json_errors = False

    @property
    def hub_base(self) -> str:
        base = os.environ.get("JUPYTERHUB_BASE_URL", "/")
        return base if base.endswith("/") else base + "/"

    def write_error(self, status_code, **kwargs):
        if self.json_errors:
            return super().write_error(status_code, **kwargs)
        message = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if isinstance(exc, StoreUnavailable):
            status_code = 503
            self.set_status(503)
            message = "The scheduler's database is unavailable; nothing was changed. Try again shortly."
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        try:
            who = self.identity() if self.current_user else None
        except Exception:
            who = None
        self.finish(self.render_string("error.html", status=status_code, message=message,
                                       active="", **self.chrome(who)))

    def chrome(self, who: dict | None) -> dict:
        """Values every page template uses (navigation bar)."""
        return {
            "hub": self.hub_base + "hub/",
            "prefix": self.bai.prefix,
            "who": who,
            "simulated": any(n.simulated for n in self.bai.node_list),
        }

    async def hub_users(self, who: dict) -> list[dict]:
        hub = self.bai.hub
        try:
            if who["admin"]:
                users = await hub.request("GET", "/users?state=active&limit=200") or []
                if isinstance(users, dict):  # paginated answer
                    users = users.get("items", [])
                return users
            model = await hub.get_user(who["name"])
            return [model] if model else []
        except (HubAPIError, OSError) as e:
            log.warning("Sessions page: the hub's view is unavailable (%s)", e)
            return []

    async def page_data(self, who: dict) -> dict:
        units = self.bai.units
        statuses = [self.service.status(r) for r in self.service.records.values()
                    if who["admin"] or r.key.user == who["name"]]
        users = await self.hub_users(who)
        if not who["admin"]:
            users = [u for u in users if u.get("name") == who["name"]]
        rows = session_rows(statuses, users, units=units)
        nodes = []
        if who["admin"]:
            live = await asyncio.to_thread(live_gpu_stats, self.bai.node_list)  # NVML calls block
            nodes = node_rows(self.service.capacity(), units, live)
        return {"rows": rows, "summary": summarize(rows), "nodes": nodes, "notices": notices_for(who["name"])}

    def fragments(self, who: dict, data: dict) -> dict:
        ctx = dict(self.chrome(who), **data)
        return {
            "sessions_html": self.render_string("_sessions.html", **ctx).decode(),
            "summary_html": self.render_string("_summary.html", **ctx).decode(),
            "capacity_html": self.render_string("_capacity.html", **ctx).decode() if who["admin"] else "",
            "notices_html": self.render_string("_notices.html", **ctx).decode(),
        }

    async def render_page(self, who: dict, values: dict | None = None, error: str | None = None):
        from bai_spawner import catalog as catalog_mod
        from bai_spawner.formpage import render_form

        data = await self.page_data(who)
        cap = capacity_model(self.bai)
        try:
            images = catalog_mod.visible_to(await load_catalog(self.bai), who["name"], is_admin=False)
            form_html = render_form(visible=images, user=who["name"], capacity=cap, units=self.bai.units,
                                    limits=form_limits(self.bai, cap), service_prefix=self.bai.prefix,
                                    values=values, simulated_note=False)
        except Exception as e:  # Docker down: the rest of the page still works
            log.warning("Sessions page: cannot build the launch form: %s", e)
            form_html = ('<div class="alert alert-danger">The image catalog is unavailable '
                         f"(the Docker engine did not answer: {web.escape.xhtml_escape(type(e).__name__)}).</div>")
        self.render("sessions.html", form_html=form_html, error=error, poll=POLL_SECONDS, active="sessions",
                    **self.fragments(who, data), **data, **self.chrome(who))


class SessionsPage(PageHandler):
    @web.authenticated
    async def get(self):
        await self.render_page(self.identity())


class SessionsJSON(PageHandler):
    """What the page's script polls: the rendered fragments plus the raw rows."""

    json_errors = True

    def check_xsrf_cookie(self):
        # Read-only GET (the page's own fetch): nothing changes, and the answer
        # cannot be read cross-origin (no CORS headers).
        if self.request.method in ("GET", "HEAD"):
            return
        return super().check_xsrf_cookie()

    async def get(self):
        who = self.identity()
        data = await self.page_data(who)
        self.set_header("Cache-Control", "no-store")
        self.write_json({**self.fragments(who, data), "rows": data["rows"], "summary": data["summary"],
                         "epoch": self.service.epoch, "at": time.time()})


class CapacityJSON(CapacityHandler):
    """GET api/capacity for the spawn form's script on the hub's page.

    That page cannot read this service's xsrf cookie, so a read-only GET is
    accepted on the login cookie alone.
    """

    def check_xsrf_cookie(self):
        if self.request.method in ("GET", "HEAD"):
            return
        return super().check_xsrf_cookie()

    def get(self):
        self.set_header("Cache-Control", "no-store")
        return super().get()


class StopHandler(PageHandler):
    async def post(self):
        who = self.identity()
        user = self.get_body_argument("user", "")
        server = self.get_body_argument("server", "")
        if not user:
            raise web.HTTPError(400, "Say which session to stop.")
        self.check_owner(who, user)
        key = self.key(user, server)
        rec = self.service.get(key)
        label = f"{server or 'default'}" + (f" of {user}" if user != who["name"] else "")
        stopped_in_hub = False
        try:
            await self.bai.hub.stop_server(user, server)
            stopped_in_hub = True
        except HubAPIError as e:
            if e.code != 404 and rec is None:
                raise web.HTTPError(400, f"The hub refused to stop {label}: {e}") from None
        except OSError as e:
            log.warning("Hub unreachable while stopping %s: %s", key, e)
        if rec is not None:
            await stop_session(self.service, rec, stopped_in_hub)
        if not stopped_in_hub and rec is None:
            raise web.HTTPError(404, f"There is no session {label}.")
        add_notice(who["name"], "info", f"Stopping {label}.")
        self.redirect(self.bai.prefix, status=303)


class NewSessionsHandler(PageHandler):
    """Launch N sessions of one shape: validate like the spawn form, then start named servers."""

    FIELDS = ("image", "image_name", "fgpu", "cpu", "memory", "sessions")

    async def post(self):
        from bai_spawner import catalog as catalog_mod
        from bai_spawner.form import FormError, SessionOptions, parse_options

        who = self.identity()
        if who["internal"] or not who["name"]:
            raise web.HTTPError(400, "Log in as a user to launch sessions.")
        raw = {k: self.get_body_argument(k) for k in self.request.body_arguments if k != "_xsrf"}
        values = {k: v for k, v in raw.items() if k in self.FIELDS}
        cap = capacity_model(self.bai)
        try:
            opts = parse_options(raw, self.bai.units, form_limits(self.bai, cap))
            try:
                images = await load_catalog(self.bai, max_age=0)
            except Exception as e:
                raise web.HTTPError(503, f"The image catalog is unavailable ({type(e).__name__}); try again shortly.") from None
            image = catalog_mod.resolve_image(images, who["name"], opts.image, is_admin=False)
        except (FormError, catalog_mod.ImageNotAllowed) as e:
            self.set_status(400)
            await self.render_page(who, values=values, error=str(e))
            return
        one = SessionOptions(image.ref, opts.quanta, opts.cpu_millis, opts.memory_bytes, 1).to_user_options()
        n = opts.sessions
        add_notice(who["name"], "info",
                   f"Launching {n} session{'s' if n != 1 else ''} of {image.display_name} with "
                   f"{self.bai.units.to_fgpu(opts.quanta)} fGPU each.")
        asyncio.ensure_future(self._launch(who["name"], n, one))
        self.redirect(self.bai.prefix, status=303)

    async def _launch(self, user: str, count: int, options: dict):
        try:
            names = await launch_sessions(self.bai.hub, user, LAUNCH_PREFIX, count, options)
            log.info("Launched %s for %s", names, user)
        except web.HTTPError as e:
            add_notice(user, "danger", e.log_message or str(e))
        except Exception as e:  # the hub is down or answered nonsense
            log.exception("Launch for %s failed", user)
            add_notice(user, "danger", f"Launching failed: {e}")


def handlers(prefix: str) -> list:
    return [
        (prefix + "?", SessionsPage),
        (prefix + "sessions", SessionsPage),
        (prefix + "sessions.json", SessionsJSON),
        (prefix + "capacity.json", CapacityJSON),
        (prefix + "sessions/stop", StopHandler),
        (prefix + "sessions/new", NewSessionsHandler),
    ]


__all__ = ["handlers", "session_rows", "node_rows", "summarize", "ago", "quote"]

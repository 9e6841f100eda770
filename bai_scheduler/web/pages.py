"""Browser pages of the scheduler service: the sessions overview.

``{prefix}`` lists the user's sessions (admins: everyone's, plus the capacity of
each node and GPU), joining two views: the scheduler's records (queue position,
why a request waits, node and GPU shares) and the hub's servers (ready, pending,
URL). It refreshes itself (static/sessions.js polls ``sessions.json``; without
JavaScript a meta refresh), stops sessions through the hub, and launches N
sessions of one shape (validated exactly like the spawn form, then started as
named servers through the hub).

The row building is plain functions (``session_rows``, ``node_rows``,
``summarize``), tested without a hub in tests/test_pages.py.
"""
from __future__ import annotations

import asyncio
import datetime
import time
from dataclasses import dataclass, replace
from decimal import Decimal

from tornado import web

from .. import inventory
from ..contract import catalog as catalog_mod
from ..contract.form import chosen_shape, form_context, home_note
from ..contract.options import FIELDS, FormError, parse_options
from ..contract.registry import RegistryError
from ..core.units import FgpuUnits, format_bytes
from ..hubapi import HubAPIError
from .api import capacity_model, launch_sessions, note_team, stop_session, user_groups
from .base import APIHandler, BaseHandler, ReadOnlyGetMixin, in_background, log

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
                 now: float | None = None, registry_host: str = "") -> list[dict]:
    """One row per session, joining the scheduler's records and the hub's servers. ``image`` is
    the name users picked (``bai/sklearn:1.6.1``, without ``registry_host``); ``reference`` is what
    the container runs, that very image in the registry (``127.0.0.1:5000/bai/sklearn:1.6.1``).

    ``statuses``: ``Service.status()`` dicts. ``hub_users``: hub user
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
        reference = (r or {}).get("image") or opts.get("image") or ""
        image = reference[len(registry_host) + 1:] if registry_host and reference.startswith(registry_host + "/") \
            else reference
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
        eta = notice = stops_at = ""
        if state == "PENDING":
            detail = r.get("reason") or "Waiting in the queue"
            eta = (r.get("eta") or {}).get("text", "")
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
        if r is not None and r.get("deadline") and state in ("RUNNING", "STARTING"):
            stops_at = time.strftime("%H:%M", time.localtime(r["deadline"]))
            notice = r.get("lifetime_notice") or ""
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
            "reference": reference,
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
            "group": (r or {}).get("group", ""),
            "eta": eta,
            "stops_at": stops_at,
            "lifetime_notice": notice,
        })
    rows.sort(key=lambda x: (STATE_ORDER[x["state"]], x["position"] or 0, x["user"], x["server"]))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Counts for the header: sessions per state and fGPU held by the listed sessions."""
    out = {state: 0 for state in STATES}
    for r in rows:
        out[r["state"]] += 1
    held = sum(Decimal(r["fgpu"] or "0") for r in rows if r["state"] in ("RUNNING", "STARTING"))
    out["total"] = len(rows)
    out["fgpu_held"] = format(held.normalize(), "f") if held else "0"
    return out


def node_rows(usage: list[dict], units: FgpuUnits, live: dict | None = None,
              readiness: dict | None = None) -> list[dict]:
    """Per node and GPU: used/total as fGPU, memory, CPU, live NVML stats where given, and
    whether the node's GPU backend is ready.

    ``usage``: ``Capacity.usage()``; ``live``: {device uuid: {"memory_used",
    "memory_total", "utilization"}} for real GPUs (``inventory.live_stats``); ``readiness``:
    {node: ``readiness.Readiness``}, for the reason a node's GPUs are not ready.
    """
    live = live or {}
    readiness = readiness or {}
    out = []
    for n in usage:
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
            "gpu_backend": n.get("gpu_backend", ""),
            "gpu_ready": n.get("gpu_ready", True),
            "gpu_reason": readiness[n["name"]].reason if n["name"] in readiness else "",
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


@dataclass
class Notice:
    level: str
    text: str
    at: float
    key: str | None = None
    session: tuple[str, str] | None = None


def group_rows(usage: dict, policies: dict) -> list[dict]:
    """Per group with a quota: what it holds against each limit (admin capacity view).
    ``usage``: ``Service.group_usage()``; ``policies``: group -> ``GroupPolicy``."""
    out = []
    for name, u in sorted(usage.items()):
        q = u["quota"]
        limits = []
        if q["running"]:
            limits.append(f"{u['running']} of {q['running']} sessions")
        if q["quanta"]:
            limits.append(f"{u['fgpu']} of {q['fgpu']} fGPU")
        if q["cpu_millis"]:
            limits.append(f"{u['cpu_millis'] / 1000:g} of {q['cpu_millis'] / 1000:g} CPU")
        if q["memory_bytes"]:
            limits.append(f"{format_bytes(u['memory_bytes'])} of {format_bytes(q['memory_bytes'])} memory")
        policy = policies.get(name)
        out.append({"name": name, "limits": limits, "pending": u["pending"],
                    "pools": ", ".join(policy.pools) if policy is not None and policy.pools else "any",
                    "full": bool(q["quanta"] and u["quanta"] >= q["quanta"])
                    or bool(q["running"] and u["running"] >= q["running"])})
    return out


class Notices:
    """Short messages shown to a user on their pages (after a POST redirect, or a background launch
    that the hub refused). In memory. A notice lives a minute; one about a session (``session``:
    its user and server) ends as soon as that session is no longer listed, once it had
    ``SESSION_SECONDS`` to be read. A newer notice with the same ``key`` replaces an older one, so
    repeating an action does not pile up banners."""

    SECONDS = 60
    SESSION_SECONDS = 5
    MOST = 6

    def __init__(self):
        self._items: dict[str, list[Notice]] = {}

    def add(self, user: str, level: str, text: str, *, key: str | None = None,
            session: tuple[str, str] | None = None, now: float | None = None) -> None:
        items = [n for n in self._items.get(user, []) if key is None or n.key != key]
        items.append(Notice(level, text, time.time() if now is None else now, key, session))
        self._items[user] = items[-self.MOST:]

    def for_user(self, user: str, listed: set | None = None, now: float | None = None) -> list[dict]:
        """The notices to show now; ``listed``: the (user, server) of the sessions on the page."""
        now = time.time() if now is None else now

        def alive(n: Notice) -> bool:
            if now - n.at >= self.SECONDS:
                return False
            gone = n.session is not None and listed is not None and n.session not in listed
            return not (gone and now - n.at >= self.SESSION_SECONDS)

        items = [n for n in self._items.get(user, []) if alive(n)]
        if items:
            self._items[user] = items
        else:
            self._items.pop(user, None)
        return [{"level": n.level, "text": n.text} for n in items]


# -- handlers --------------------------------------------------------------------------------------


class PageHandler(BaseHandler):
    """A page of the sessions overview: the shared page data and its fragments."""

    @property
    def notices(self) -> Notices:
        return self.settings["notices"]

    async def hub_users(self, who: dict) -> list[dict]:
        try:
            if who["admin"]:
                users = await self.hub.request("GET", "/users?state=active&limit=200") or []
                if isinstance(users, dict):  # paginated answer
                    users = users.get("items", [])
                return users
            model = await self.hub.get_user(who["name"])
            return [model] if model else []
        except (HubAPIError, OSError) as e:
            log.warning("Sessions page: the hub's view is unavailable (%s)", e)
            return []

    async def page_data(self, who: dict) -> dict:
        units = self.service.units
        statuses = self.service.statuses(r for r in self.service.records.values()
                                         if who["admin"] or r.key.user == who["name"])
        users = await self.hub_users(who)
        if not who["admin"]:
            users = [u for u in users if u.get("name") == who["name"]]
        rows = session_rows(statuses, users, units=units, registry_host=self.settings["registry"].host)
        nodes, groups = [], []
        if who["admin"]:
            live = await asyncio.to_thread(inventory.live_stats, self.service.nodes)  # NVML calls block
            nodes = node_rows(self.service.capacity(), units, live, self.settings["readiness"])
            groups = group_rows(self.service.group_usage(), self.service.groups)
        listed = {(r["user"], r["server"]) for r in rows}
        return {"rows": rows, "summary": summarize(rows), "nodes": nodes, "groups": groups,
                "notices": self.notices.for_user(who["name"], listed)}

    def fragments(self, who: dict, data: dict) -> dict:
        """The parts of the page its script replaces on every poll."""
        def part(name):
            return self.render_template(name, who, **data)

        return {
            "sessions_html": part("_sessions.html"),
            "summary_html": part("_summary.html"),
            "capacity_html": part("_capacity.html") if who["admin"] else "",
            "notices_html": part("_notices.html"),
        }

    async def form(self, who: dict, values: dict | None) -> dict:
        """The launch form's variables, or ``form_error`` when the catalog cannot be read."""
        limits = self.settings["limits"]
        quanta, count = chosen_shape(values, self.service.units, limits)
        try:
            images = catalog_mod.visible_to(await self.settings["catalog"].get(), who["name"], is_admin=False)
        except RegistryError as e:  # the registry is down: the rest of the page still works
            log.warning("Sessions page: cannot build the launch form: %s", e)
            return {"form_error": f"The image catalog is unavailable. {e.message}"}
        groups, team = [], ((), "")
        if who["name"]:
            try:
                groups = await user_groups(self.hub, who["name"]) if self.service.groups else []
                # The note counts the nodes of the session's pools only, as the form's script asks.
                team = note_team(self.service, groups, str((values or {}).get("group") or ""),
                                 str((values or {}).get("pool") or ""), self.bai.allow_ungrouped)
            except web.HTTPError as e:  # the hub is down: the form offers the default group
                log.warning("Sessions page: %s", e.log_message)
        cap = capacity_model(self.service, limits, self.settings["readiness"], who["admin"], quanta, count, team)
        return form_context(visible=images, user=who["name"], capacity=cap, units=self.service.units,
                            limits=limits, note=cap["note"], capacity_url=self.prefix + "capacity.json",
                            static_url=self.settings["static_url_prefix"], values=values, admin=who["admin"],
                            user_groups=groups,
                            home_note=home_note(self.bai.home_shared(), [n.name for n in self.service.nodes]))

    async def render_page(self, who: dict, values: dict | None = None, error: str | None = None):
        data = await self.page_data(who)
        self.finish(self.render_template(
            "sessions.html", who, error=error, poll=POLL_SECONDS, bai_active="sessions",
            **data, **await self.form(who, values)))


class SessionsPage(PageHandler):
    @web.authenticated
    async def get(self):
        await self.render_page(self.identity())


class SessionsJSON(ReadOnlyGetMixin, PageHandler, APIHandler):
    """What the page's script polls: the rendered fragments plus the raw rows (errors as JSON)."""

    async def get(self):
        who = self.identity()
        data = await self.page_data(who)
        self.set_header("Cache-Control", "no-store")
        self.write_json({**self.fragments(who, data), "rows": data["rows"], "summary": data["summary"],
                         "epoch": self.service.epoch, "at": time.time()})


class StopHandler(PageHandler):
    async def post(self):
        who = self.identity()
        user = self.get_body_argument("user", "")
        server = self.get_body_argument("server", "")
        if not user:
            raise web.HTTPError(400, "Say which session to stop.")
        self.check_owner(who, user)
        key = self.key(user, server)
        self.check_may(who, "delete", user, server)
        rec = self.service.get(key)
        label = f"{server or 'default'}" + (f" of {user}" if user != who["name"] else "")
        stopped_in_hub = False
        try:
            await self.hub.stop_server(user, server)
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
        if rec is not None and rec.state == "PENDING":
            text = f"Cancelled {label}: it was still waiting in the queue and will not start."
        else:
            text = f"Stopping {label}; its share is freed when its container is gone."
        self.notices.add(who["name"], "info", text, key=f"stop {user}/{server}", session=(user, server))
        self.redirect(self.prefix, status=303)


class NewSessionsHandler(PageHandler):
    """Launch N sessions of one shape: validate like the spawn form, then start named servers."""

    FIELDS = FIELDS

    async def post(self):
        who = self.identity()
        if who["internal"] or not who["name"]:
            raise web.HTTPError(400, "Log in as a user to launch sessions.")
        self.check_may(who, "start", who["name"])
        raw = {k: self.get_body_argument(k) for k in self.request.body_arguments if k != "_xsrf"}
        values = {k: v for k, v in raw.items() if k in self.FIELDS}
        try:
            opts = parse_options(raw, self.service.units, self.settings["limits"])
            try:
                images = await self.settings["catalog"].get()
            except RegistryError as e:
                raise web.HTTPError(503, f"The image catalog is unavailable. {e.message} Nothing was started.") from None
            image = catalog_mod.resolve_image(images, who["name"], opts.image, is_admin=False)
        except (FormError, catalog_mod.ImageNotAllowed) as e:
            self.set_status(400)
            hint = catalog_mod.ADMIN_IMAGES_HINT if who["admin"] and isinstance(e, catalog_mod.ImageNotAllowed) else ""
            await self.render_page(who, values=values, error=str(e) + hint)
            return
        one = replace(opts, image=image.ref, sessions=1).to_user_options()
        n = opts.sessions
        self.notices.add(who["name"], "info",
                         f"Launching {n} session{'s' if n != 1 else ''} of {image.display_name} with "
                         f"{self.service.units.to_fgpu(opts.quanta)} fGPU each.", key="launch")
        in_background(self._launch(who["name"], n, one))
        self.redirect(self.prefix, status=303)

    async def _launch(self, user: str, count: int, options: dict):
        try:
            names = await launch_sessions(self.hub, user, LAUNCH_PREFIX, count, options)
            log.info("Launched %s for %s", names, user)
        except web.HTTPError as e:
            self.notices.add(user, "danger", e.log_message or str(e))
        except Exception as e:  # the hub is down or answered nonsense
            log.exception("Launch for %s failed", user)
            self.notices.add(user, "danger", f"Launching failed: {e}")


default_handlers = [
    (r"?", SessionsPage),
    (r"sessions", SessionsPage),
    (r"sessions\.json", SessionsJSON),
    (r"sessions/stop", StopHandler),
    (r"sessions/new", NewSessionsHandler),
]

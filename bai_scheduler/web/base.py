"""What every handler of the service shares, in JupyterHub's style.

``BaseHandler`` (pages: Jinja2 templates extending JupyterHub's ``page.html``,
HTML error pages) and ``APIHandler`` (JSON in and out, JSON errors).  Handlers
reach the running service through ``self.settings`` (set by
``BaiScheduler.make_app``), never by importing the app.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PrefixLoader
from jupyterhub._data import DATA_FILES_PATH
from jupyterhub.services.auth import HubOAuthenticated
from markupsafe import Markup
from tornado import web

from ..contract.form import TEMPLATES as FORM_TEMPLATES
from ..core.model import RequestKey
from ..store import StoreUnavailable

log = logging.getLogger("bai_scheduler")

MAX_BODY = 64 * 1024
NAME_RE = re.compile(r"^[^/\x00-\x1f]{1,255}$")
TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
STATIC = os.path.join(os.path.dirname(__file__), "static")
DB_DOWN = "The scheduler's database is unavailable; nothing was changed. Try again shortly."


_BACKGROUND: set = set()


def in_background(coro) -> asyncio.Task:
    """Run ``coro`` past the end of the request; the task is held until it is done (the event
    loop keeps only a weak reference to it)."""
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


def template_env(template_paths=()) -> Environment:
    """The service's Jinja2 environment: its own templates and the session form's, then
    ``template_paths`` (the hub's, e.g. hub_config/templates with the BAI brand's ``page.html``),
    then JupyterHub's own, also reachable as ``templates/…`` as JupyterHub does."""
    hub_templates = os.path.join(DATA_FILES_PATH, "templates")
    loader = ChoiceLoader([
        PrefixLoader({"templates": FileSystemLoader([hub_templates])}, "/"),
        FileSystemLoader([TEMPLATES, FORM_TEMPLATES, *template_paths, hub_templates]),
    ])
    return Environment(loader=loader, autoescape=True)


def page_namespace(*, hub_base: str, prefix: str, who: dict | None, xsrf_token: str, xsrf_form_html: str,
                   static_url, simulated: bool) -> dict:
    """What JupyterHub's ``page.html`` (and the brand's, hub_config/templates) expects, with the
    hub's own URLs, plus this service's: ``bai_scheduler_prefix``, ``bai_static_url``, ``who``."""
    hub = hub_base + "hub/"
    user = None
    if who and who.get("name"):
        user = {"name": who["name"], "admin": who["admin"],
                "json_escaped_name": json.dumps(who["name"])[1:-1].replace("<", "\\u003c")}
    return {
        "base_url": hub,
        "prefix": hub_base,
        "static_url": lambda path, include_version=True: f"{hub}static/{path}",
        "logo_url": hub + "home",
        "login_url": hub + "login",
        "logout_url": hub + "logout",
        "user": user,
        "admin_access": bool(user and user["admin"]),
        "parsed_scopes": {"admin-ui"} if user and user["admin"] else set(),
        "services": [],
        "no_spawner_check": True,
        "xsrf_token": xsrf_token,
        "xsrf_form_html": Markup(xsrf_form_html),
        "bai_scheduler_prefix": prefix,
        "bai_static_url": static_url,
        "who": who,
        "simulated": simulated,
    }


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """Authentication (hub tokens, the hub's OAuth cookie, the spawner's internal token),
    JSON helpers, and pages rendered from templates."""

    @property
    def bai(self):
        """The ``BaiScheduler`` app, for its configured values."""
        return self.settings["bai"]

    @property
    def service(self):
        return self.settings["service"]

    @property
    def hub(self):
        return self.settings["hub"]

    @property
    def prefix(self) -> str:
        return self.settings["prefix"]

    # -- who is calling ----------------------------------------------------------------

    def is_internal(self) -> bool:
        auth = self.request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        internal = self.settings["internal_token"]
        return bool(internal and scheme.lower() in ("token", "bearer") and hmac.compare_digest(token, internal))

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

    def require_admin(self) -> dict:
        who = self.identity()
        if not who["admin"]:
            raise web.HTTPError(403, "Only admins may do this.")
        return who

    @staticmethod
    def key(user: str, server: str) -> RequestKey:
        for part in (user, server):
            if part and not NAME_RE.match(part):
                raise web.HTTPError(400, "Invalid user or server name.")
        return RequestKey(user, server)

    # -- JSON ------------------------------------------------------------------------------

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

    # -- pages -----------------------------------------------------------------------------

    @property
    def hub_base(self) -> str:
        """The hub's base URL (``/`` unless the hub runs under a prefix)."""
        base = os.environ.get("JUPYTERHUB_BASE_URL", "/")
        return base if base.endswith("/") else base + "/"

    def template_namespace(self, who: dict | None) -> dict:
        xsrf = self.xsrf_token
        return page_namespace(hub_base=self.hub_base, prefix=self.prefix, who=who,
                              xsrf_token=xsrf.decode() if isinstance(xsrf, bytes) else xsrf,
                              xsrf_form_html=self.xsrf_form_html(), static_url=self.static_url,
                              simulated=any(n.simulated for n in self.service.nodes))

    def render_template(self, name: str, who: dict | None, **ns) -> str:
        env: Environment = self.settings["jinja2_env"]
        return env.get_template(name).render(**{**self.template_namespace(who), **ns})

    def page_identity(self) -> dict | None:
        """The caller for an error page: never raises."""
        try:
            return self.identity() if self.current_user else None
        except Exception:
            return None

    def error(self, status_code: int, kwargs: dict) -> tuple[int, str]:
        """(status, message) to answer an error with: the HTTPError's own message, or a 503
        when the database is down."""
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, StoreUnavailable):
            self.set_status(503)
            return 503, DB_DOWN
        if isinstance(exc, web.HTTPError) and exc.log_message:
            return status_code, exc.log_message % exc.args if exc.args else exc.log_message
        return status_code, self._reason

    def write_error(self, status_code, **kwargs):
        status, message = self.error(status_code, kwargs)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(self.render_template("error.html", self.page_identity(), status=status, message=message,
                                         heading=self.error_heading(status)))

    def error_heading(self, status: int) -> str:
        if status == 404:
            return "Not found"
        if status == 403:
            return "Not allowed"
        return "Something went wrong" if status >= 500 else "That did not work"

    def log_exception(self, typ, value, tb):
        if isinstance(value, StoreUnavailable):
            log.error("Database unavailable during %s %s", self.request.method, self.request.uri)
            return
        super().log_exception(typ, value, tb)


class APIHandler(BaseHandler):
    """A REST endpoint: errors as ``{"status", "message"}``."""

    def write_error(self, status_code, **kwargs):
        status, message = self.error(status_code, kwargs)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status, "message": message}))


class ReadOnlyGetMixin:
    """GETs that pages of the hub (which cannot read this service's xsrf cookie) fetch
    with the login cookie alone: read-only, and never readable cross-origin (no CORS)."""

    def check_xsrf_cookie(self):
        if self.request.method in ("GET", "HEAD"):
            return
        return super().check_xsrf_cookie()


class NotFoundHandler(APIHandler):
    """Any path under the prefix that names nothing: a JSON 404, like the rest of the API."""

    def prepare(self):
        raise web.HTTPError(404, "No such endpoint; see the README's REST API table.")

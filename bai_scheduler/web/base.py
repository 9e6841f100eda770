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
from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from markupsafe import Markup
from tornado import web

from ..contract.form import TEMPLATES as FORM_TEMPLATES
from ..core.model import RequestKey
from ..store import StoreUnavailable

log = logging.getLogger("bai_scheduler")

MAX_BODY = 64 * 1024
NAME_RE = re.compile(r"^[^/\x00-\x1f]{1,255}$")
# What an Authorization header may hold: printable ASCII, no longer than any token JupyterHub makes
# (its own are 32 hex digits; configured service tokens are longer). Anything else is refused
# here, before the hub is asked about it (HubAuth answers 500 when the hub refuses the request).
MAX_AUTH_HEADER = 1024
AUTH_HEADER_RE = re.compile(r"[\x20-\x7e]*")
# A token with either of these acts as an admin here (the hub's admin role has both).
ADMIN_SCOPES = {"admin:servers", "admin:users"}
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

    def prepare(self):
        # The header, and the URL's ?token= (HubAuth reads it on websocket requests).
        auth = self.request.headers.get("Authorization")
        if auth is not None and (len(auth) > MAX_AUTH_HEADER or not AUTH_HEADER_RE.fullmatch(auth)):
            raise web.HTTPError(400, f"The Authorization header must be printable ASCII of at most "
                                     f"{MAX_AUTH_HEADER} characters: 'token <your hub API token>'.")
        url_token = self.get_query_argument("token", None)
        if url_token is not None and (len(url_token) > MAX_AUTH_HEADER or not AUTH_HEADER_RE.fullmatch(url_token)):
            raise web.HTTPError(400, "The token in the URL is not a hub API token.")

    def get_current_user(self):
        try:
            return super().get_current_user()
        except web.HTTPError as e:
            if e.status_code < 500:
                raise
            # HubAuth's own message names the hub's internal API address.
            log.error("Could not check the caller with the hub: %s", e.log_message)
            raise web.HTTPError(503, "The hub did not say who you are (it may be restarting); "
                                     "try again shortly.") from None

    def is_internal(self) -> bool:
        auth = self.request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        internal = self.settings["internal_token"]
        # Bytes: compare_digest refuses str with non-ASCII characters.
        return bool(internal and scheme.lower() in ("token", "bearer")
                    and hmac.compare_digest(token.strip().encode("utf-8", "replace"), internal.encode()))

    def identity(self) -> dict:
        """The caller: the hub's spawner (internal), a user or service, or 403.

        ``by_token``: authenticated by an API token (header), whose own scopes then say what
        it may do; otherwise by the service's login cookie, which only the user's own browser
        holds (the hub's OAuth step takes no token), acting as that user with their rights.
        """
        if self.is_internal():
            return {"name": None, "admin": True, "internal": True, "by_token": True, "scopes": set(),
                    "kind": "service"}
        user = self.current_user
        if not user:
            if self.hub_auth.get_token(self, in_cookie=False):
                # A token the hub knows but without the access scope looks here like an unknown one.
                needed = " or ".join(sorted(self.hub_auth.access_scopes)) or "access:services"
                raise web.HTTPError(403, f"This token is not accepted here: it must be a hub API token with "
                                         f"the scope {needed} (or log in through the hub).")
            raise web.HTTPError(403, "Log in through the hub, or send a hub API token.")
        scopes = set(user.get("scopes") or ())
        by_token = bool(getattr(self, "_token_authenticated", False))
        # A token is an admin's only when it carries admin scopes (an admin's token limited to
        # this service's access is not); a browser login is the user's own.
        admin = bool(check_scopes(ADMIN_SCOPES, scopes)) if by_token else bool(user.get("admin"))
        return {"name": user["name"], "admin": admin, "internal": False, "by_token": by_token, "scopes": scopes,
                "kind": user.get("kind") or "user"}

    def check_owner(self, who: dict, user: str) -> None:
        if not (who["admin"] or who["name"] == user):
            raise web.HTTPError(404, "No such request.")

    def check_may(self, who: dict, action: str, user: str, server: str | None = None) -> None:
        """Refuse (403) unless the caller itself may ``action`` ("start" or "delete") the servers
        of ``user`` (one ``server``, or any): this service acts with its own ``servers`` scope,
        so a token must carry ``<action>:servers`` for that user, as the hub's own API asks."""
        if who["internal"]:
            return
        if not who["by_token"]:
            if who["admin"] or who["name"] == user:
                return
        else:
            target = f"server={user}/{server}" if server is not None else f"user={user}"
            if check_scopes({f"{action}:servers!{target}"}, who["scopes"]):
                return
        verb = "start" if action == "start" else "stop"
        raise web.HTTPError(403, f"This token may not {verb} servers of {user}: it needs the scope "
                                 f"{action}:servers!user={user} (or log in through the hub).")

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

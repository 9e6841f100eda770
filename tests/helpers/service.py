"""A real bai-scheduler service process with a tiny fake hub API in front of its token checks.

``standalone_service`` starts ``python -m bai_scheduler.app`` on a free port with
the given config (its Docker node may point at a closed port, so nothing on the
real engine is read or changed); ``FakeHub`` answers what the service asks the
hub (who owns a token, a user's model) and starts nothing; ``Raw`` sends HTTP
with exact bytes on the wire.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import ARTIFACTS, ROOT
from .hub import free_port

PREFIX = "/services/bai-scheduler/"


def _admin_role() -> list[str]:
    from jupyterhub.roles import get_default_roles

    return next(r["scopes"] for r in get_default_roles() if r["name"] == "admin")


ADMIN_ROLE = _admin_role()


def expanded_scopes(raw: list[str], user: str) -> list[str]:
    """Scopes as the hub expands them for a token of ``user`` (``self`` is that user's own)."""
    from jupyterhub.scopes import _expand_self_scope, expand_scopes

    out = set()
    for scope in raw:
        out |= _expand_self_scope(user) if scope == "self" else expand_scopes({scope})
    return sorted(out)


class FakeHub:
    """Answers what the service asks the hub: who owns a token (GET /hub/api/user),
    a user's model, and server start/stop (always refused: nothing is spawned)."""

    def __init__(self, service_token: str):
        self.service_token = service_token
        self.tokens: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _token(self):
                return self.headers.get("Authorization", "").partition(" ")[2].strip()

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                token = self._token()
                if self.path.rstrip("/") == "/hub/api/user":
                    model = hub.tokens.get(token)
                    return self._send(200, model) if model else self._send(403, {"message": "bad token"})
                if token != hub.service_token:
                    return self._send(403, {"message": "bad token"})
                m = re.fullmatch(r"/hub/api/users/([^/?]+)", self.path)
                names = {m["name"] for m in hub.tokens.values()}
                if m and m.group(1) in names:
                    return self._send(200, {"name": m.group(1), "servers": {}})
                if self.path.startswith("/hub/api/users?"):
                    return self._send(200, [{"name": n, "servers": {}} for n in sorted(names)])
                return self._send(404, {"message": "not found"})

            def do_POST(self):
                hub.calls.append(("POST", self.path))
                self._send(400, {"message": "the fake hub starts nothing"})

            def do_DELETE(self):
                hub.calls.append(("DELETE", self.path))
                self._send(404, {"message": "no such server"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def user(self, name: str, admin: bool = False, scopes: list[str] | None = None) -> str:
        """A token of user ``name``: with the deployment's roles' scopes (user: ``self`` and access
        to this service; admins the hub's admin role too), or only ``scopes`` (a narrower token).
        Its model carries the scopes expanded as the hub's ``GET /hub/api/user`` gives them."""
        if scopes is None:
            scopes = ["self", "access:services!service=bai-scheduler"] + (ADMIN_ROLE if admin else [])
        token = secrets.token_hex(16)
        self.tokens[token] = {"kind": "user", "name": name, "admin": admin, "groups": [],
                              "scopes": expanded_scopes(scopes, name)}
        return token

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Raw:
    """HTTP with exact bytes on the wire: paths are sent as given (no dot-segment
    normalisation, no re-quoting), bodies as given."""

    def __init__(self, port: int):
        self.port = port

    def call(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
             headers: dict | None = None, timeout: float = 15) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"token {token}"
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()



@contextlib.contextmanager
def standalone_service(tmp: Path, config: str, log_name: str = "service.log"):
    """The service with ``config`` (a config file's text) in ``tmp``; yields
    ``(raw, service_token, fake_hub, log_path)``. Its log is copied to test-artifacts/."""
    token = secrets.token_hex(16)
    hub = FakeHub(token)
    port = free_port()
    (tmp / "config.py").write_text(config)
    env = dict(os.environ, JUPYTERHUB_API_TOKEN=token, JUPYTERHUB_SERVICE_URL=f"http://127.0.0.1:{port}",
               JUPYTERHUB_SERVICE_PREFIX=PREFIX, JUPYTERHUB_SERVICE_NAME="bai-scheduler",
               JUPYTERHUB_API_URL=f"http://127.0.0.1:{hub.port}/hub/api",
               JUPYTERHUB_BASE_URL="/", JUPYTERHUB_CLIENT_ID="service-bai-scheduler",
               JUPYTERHUB_OAUTH_CALLBACK_URL=PREFIX + "oauth_callback",
               JUPYTERHUB_HOST="", PYTHONPATH=str(ROOT))
    env.pop("DOCKER_HOST", None)
    log_path = tmp / "service.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "bai_scheduler.app", f"--config={tmp / 'config.py'}"],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    raw = Raw(port)
    try:
        for _ in range(300):
            try:
                if raw.call("GET", PREFIX + "api/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text())
            time.sleep(0.1)
        yield raw, token, hub, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        hub.close()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / log_name)

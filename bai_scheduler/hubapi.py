"""The few calls the scheduler service makes to JupyterHub's REST API."""
from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError


class HubAPI:
    def __init__(self, url: str | None = None, token: str | None = None):
        self.url = (url or os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")).rstrip("/")
        self.token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")

    async def request(self, method: str, path: str, body=None, ok=(200, 201, 202, 204)):
        headers = {"Authorization": f"token {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            resp = await AsyncHTTPClient().fetch(
                self.url + path, method=method, headers=headers, body=data,
                allow_nonstandard_methods=True, request_timeout=30,
            )
        except HTTPClientError as e:
            if e.code in ok:
                return None
            text = e.response.body.decode("utf8", "replace") if e.response is not None else str(e)
            raise HubAPIError(e.code, text) from None
        return json.loads(resp.body) if resp.body else None

    @staticmethod
    def server_path(user: str, server: str) -> str:
        if server:
            return f"/users/{quote(user, safe='')}/servers/{quote(server, safe='')}"
        return f"/users/{quote(user, safe='')}/server"

    async def start_server(self, user: str, server: str, options: dict):
        return await self.request("POST", self.server_path(user, server), body=options or {})

    async def stop_server(self, user: str, server: str):
        return await self.request("DELETE", self.server_path(user, server))

    async def get_user(self, user: str):
        return await self.request("GET", f"/users/{quote(user, safe='')}")

    async def remove_server_when_stopped(self, user: str, server: str, timeout: float = 300,
                                         interval: float = 1.0) -> bool:
        """Remove a named server from the hub (its ``remove`` on delete) once it has stopped;
        False, and nothing removed, if it is being started again or is still stopping at ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            model = await self.get_user(user) or {}
            active = (model.get("servers") or {}).get(server)
            if active and active.get("pending") != "stop":
                return False  # running or starting again: the user wants it
            if not active:
                await self.request("DELETE", self.server_path(user, server), body={"remove": True}, ok=(204, 202, 404))
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(interval)

    async def active_servers(self, page: int = 200) -> set[tuple[str, str]]:
        """(user, server name) of every server the hub runs or is starting or stopping."""
        out, offset = set(), 0
        while True:
            users = await self.request("GET", f"/users?state=active&offset={offset}&limit={page}") or []
            if isinstance(users, dict):  # a paginated answer
                users = users.get("items", [])
            for u in users:
                out.update((u["name"], name) for name in (u.get("servers") or {}))
            if len(users) < page:
                return out
            offset += page


class HubAPIError(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(f"hub API answered {code}: {text[:300]}")
        self.code = code
        # What a user may read: the hub's own message from its JSON error body, else the text.
        try:
            message = json.loads(text).get("message")
        except (ValueError, AttributeError):
            message = None
        self.message = (message if isinstance(message, str) and message else text)[:300]

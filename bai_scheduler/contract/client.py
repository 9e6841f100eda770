"""The spawner's side of the scheduler service API (async, tornado HTTP client)."""
from __future__ import annotations

import json
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError


class SchedulerError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SchedulerClient:
    def __init__(self, url: str, token: str, prefix: str = "/services/bai-scheduler/"):
        self.base = url.rstrip("/") + "/" + prefix.strip("/") + "/api"
        self.token = token

    def _path(self, user: str, server: str) -> str:
        path = f"/requests/{quote(user, safe='')}"
        return path + (f"/{quote(server, safe='')}" if server else "")

    async def _call(self, method: str, path: str, body=None, timeout: float = 30):
        headers = {"Authorization": f"token {self.token}", "Content-Type": "application/json"}
        try:
            resp = await AsyncHTTPClient().fetch(
                self.base + path, method=method, headers=headers,
                body=None if body is None else json.dumps(body),
                allow_nonstandard_methods=True, request_timeout=timeout,
            )
        except HTTPClientError as e:
            message = str(e)
            if e.response is not None and e.response.body:
                try:
                    message = json.loads(e.response.body).get("message", message)
                except ValueError:
                    pass
            raise SchedulerError(e.code, message) from None
        except OSError as e:
            raise SchedulerError(503, f"The BAI scheduler service is unreachable ({e}).") from None
        return json.loads(resp.body) if resp.body else {}

    async def register(self, user, server, *, quanta, cpu_millis, memory_bytes, image, user_options):
        return await self._call("PUT", self._path(user, server), {
            "quanta": quanta, "cpu_millis": cpu_millis, "memory_bytes": memory_bytes,
            "image": image, "user_options": user_options,
        })

    async def wait(self, request_id: str, epoch: int, timeout: float = 30):
        """Long-poll until spawn attempt ``request_id`` changes (its state "GONE" if it went)."""
        q = urlencode({"epoch": epoch, "timeout": timeout})
        return await self._call("GET", f"/attempts/{quote(request_id, safe='')}/wait?{q}", timeout=timeout + 15)

    async def release(self, request_id: str):
        """The attempt's container is gone, or was never made: its share can go."""
        return await self._call("DELETE", f"/attempts/{quote(request_id, safe='')}")

    async def stop_failed(self, request_id: str, message: str):
        """The attempt's container could not be stopped: the service keeps its share and
        removes it itself."""
        return await self._call("POST", f"/attempts/{quote(request_id, safe='')}/stop-failed",
                                {"message": message})

    async def remove_when_stopped(self, user: str, server: str):
        """Ask the service to remove this named server from the hub once it has stopped."""
        return await self._call("DELETE", f"/servers/{quote(user, safe='')}/{quote(server, safe='')}")

    async def capacity(self):
        return await self._call("GET", "/capacity")

    async def catalog(self) -> dict:
        """``{"images": [CatalogImage as JSON], "registry": host}``: every image, from the registry."""
        return await self._call("GET", "/catalog")

    async def launch(self, user: str, count: int, options: dict):
        return await self._call("POST", "/launch", {"user": user, "count": count, "options": options})

"""The package's own pages in a session (folder ``open/``), at ``<server>/bai-session-apps/<name>``.

Behind the single-user server's login like the rest of the server. A plain authenticated
handler, not jupyter_server's file handler: that one refuses requests without a Referer (its
guard for /files/), and a launcher tab or a typed address has none.
"""
from __future__ import annotations

import os

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

from . import config

OPEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class OpenPageHandler(JupyterHandler):
    @web.authenticated
    def get(self, name: str):
        kind = TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(OPEN, name)
        if kind is None or "/" in name or not os.path.isfile(path):
            raise web.HTTPError(404)
        with open(path, "rb") as f:
            body = f.read()
        self.set_header("Content-Type", kind)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


def add_pages(serverapp) -> None:
    route = url_path_join(serverapp.base_url, config.OPEN_PATH, "([^/]+)")
    serverapp.web_app.add_handlers(".*$", [(route, OpenPageHandler)])

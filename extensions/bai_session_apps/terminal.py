"""Full-window terminal served behind jupyter-server-proxy.

A small tornado app: ``/`` is a page with xterm.js (vendored under
``static/vendor/xterm``), ``/websocket`` is a terminado ``TermSocket`` on a
login shell. Every page load gets its own shell (closed with the tab).

The proxy strips its prefix (``absolute_url: False``), so the app lives at
``/`` and the page uses relative URLs only. It listens on 127.0.0.1; the
proxy has already authenticated the request and checked the websocket's
Origin, so the app itself does neither.

Wire protocol (terminado's): JSON text frames ``[type, ...]``; client sends
``["stdin", data]`` and ``["set_size", rows, cols]``, server sends
``["setup", {}]``, ``["stdout", data]`` and ``["disconnect", 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal

from tornado import web

from terminado import TermSocket, UniqueTermManager

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<title>Terminal</title>
<link rel="icon" href="static/terminal.svg" type="image/svg+xml">
<link rel="stylesheet" href="static/vendor/xterm/xterm.css">
<style>
html, body { margin: 0; height: 100%; background: #1e1e1e; }
#term { position: absolute; inset: 4px; }
#status { position: fixed; right: 8px; bottom: 6px; font: 12px sans-serif; color: #ccc; }
</style></head>
<body><div id="term"></div><div id="status"></div>
<script src="static/vendor/xterm/xterm.js"></script>
<script src="static/vendor/xterm/addon-fit.js"></script>
<script src="static/terminal.js"></script>
</body></html>
"""


class PageHandler(web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(PAGE)


class Socket(TermSocket):
    def check_origin(self, origin):
        # Only reachable on 127.0.0.1 through the authenticating proxy, which
        # did the Origin check against the public host.
        return True


def shell_command(environ: dict) -> list[str]:
    """``$SHELL`` if it runs here, else bash (sh only where there is no bash),
    as a login shell: the image's ``/etc/profile.d`` puts its kernel
    environment first on PATH, as in notebooks."""
    shell = environ.get("SHELL") or ""
    if not shell or not shutil.which(shell):
        shell = shutil.which("bash") or "/bin/sh"
    return [shell, "-l"]


def shell_env(shell: str) -> dict:
    """What every terminal's shell gets on top of the server's environment
    (``$SHELL`` names the shell it runs, whatever the server had)."""
    return {"TERM": "xterm-256color", "COLORTERM": "truecolor", "SHELL": shell}


def make_app(environ: dict | None = None) -> web.Application:
    environ = dict(os.environ if environ is None else environ)
    command = shell_command(environ)
    manager = UniqueTermManager(
        shell_command=command,
        extra_env=shell_env(command[0]),
        max_terminals=int(environ.get("BAI_TERMINAL_MAX", "20")),
    )
    # start shells in the home directory (the persistent volume)
    manager.term_settings["cwd"] = environ.get("HOME") or os.path.expanduser("~")
    app = web.Application(
        [
            (r"/", PageHandler),
            (r"/websocket", Socket, {"term_manager": manager}),
            (r"/static/(.*)", web.StaticFileHandler, {"path": STATIC}),
        ],
    )
    app.term_manager = manager
    return app


async def serve(port: int) -> None:
    app = make_app()
    server = app.listen(port, address="127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def _watch_parent():  # exit with the Jupyter server
        while os.getppid() == parent:
            await asyncio.sleep(1)
        stop.set()

    watcher = asyncio.ensure_future(_watch_parent())
    logging.getLogger("bai-terminal").info("terminal on 127.0.0.1:%s", port)
    await stop.wait()
    watcher.cancel()
    server.stop()
    await app.term_manager.shutdown()


def main(argv=None):
    p = argparse.ArgumentParser(description="full-window terminal for jupyter-server-proxy")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--base-url", default="/", help="accepted for symmetry; URLs are relative")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bai-terminal] %(message)s")
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()

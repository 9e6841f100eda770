"""Talking to a running session through the hub, as a browser does: a
kernel (a notebook cell) and terminals (the websockets the pages open).

``session`` is anything with ``url`` (``<hub>/user/<name>/<server>/``),
``token`` and ``user``.
"""
from __future__ import annotations

import json
import re
import time
import uuid

import requests


def run_in_kernel(session, code: str, timeout=120) -> str:
    """Run code in a real kernel of the session (as a notebook cell would) and
    return its stdout; the kernel inherits the server's environment."""
    import websocket

    r = requests.post(session.url + "api/kernels", json={"name": "python3"},
                      headers={"Authorization": f"token {session.token}"}, timeout=60)
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    ws_url = session.url.replace("http://", "ws://") + f"api/kernels/{kid}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {session.token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": session.user,
                       "session": uuid.uuid4().hex, "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        out, error, deadline = [], None, time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                error = "\n".join(msg["content"]["traceback"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        else:
            raise AssertionError(f"kernel did not finish in {timeout}s: {''.join(out)[-2000:]}")
    finally:
        ws.close()
        requests.delete(session.url + f"api/kernels/{kid}", headers={"Authorization": f"token {session.token}"},
                        timeout=30)
    assert error is None, re.sub(r"\x1b\[[0-9;]*m", "", error)[-3000:]
    return "".join(out)


def _run_on_terminal(ws_url: str, token: str, command: str, timeout: float) -> str:
    import websocket

    marker = uuid.uuid4().hex[:8]
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=timeout)
    try:
        ws.send(json.dumps(["set_size", 40, 500]))  # wide: a long command line is not wrapped
        # the marker appears computed only once the shell has run the line, not in its echo
        ws.send(json.dumps(["stdin", f"{command}; echo end-{marker}-$((6*7))\r"]))
        out, deadline = "", time.time() + timeout
        while time.time() < deadline and f"end-{marker}-42" not in out:
            msg = json.loads(ws.recv())
            if msg[0] == "stdout":
                out += msg[1]
    finally:
        ws.close()
    assert f"end-{marker}-42" in out, f"the terminal did not finish in {timeout}s:\n{out[-3000:]}"
    # what the command printed: between the echo of the typed line and the marker, without the
    # terminal's control sequences (colours, bracketed paste, window title)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", out)
    # (the line may be echoed twice: by the tty before the shell is ready, then by readline)
    return plain.split(f"end-{marker}-42", 1)[0].rsplit(f"end-{marker}-$((6*7))", 1)[-1]


def run_in_lab_terminal(session, command: str, timeout=120) -> str:
    """Run ``command`` in a new JupyterLab terminal (jupyter-server's
    ``api/terminals``) and return what it printed."""
    auth = {"Authorization": f"token {session.token}"}
    r = requests.post(session.url + "api/terminals", headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    name = r.json()["name"]
    try:
        ws_url = session.url.replace("http://", "ws://") + f"terminals/websocket/{name}"
        return _run_on_terminal(ws_url, session.token, command, timeout)
    finally:
        requests.delete(session.url + f"api/terminals/{name}", headers=auth, timeout=30)


def run_in_web_terminal(session, command: str, timeout=120) -> str:
    """Run ``command`` in the full-window terminal app (``.../terminal/``)."""
    ws_url = session.url.replace("http://", "ws://") + "terminal/websocket"
    return _run_on_terminal(ws_url, session.token, command, timeout)

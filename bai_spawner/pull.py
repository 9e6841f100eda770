"""Pulling a session's image onto the node it was placed on.

``pull_blocking`` runs in one of the spawner's Docker threads: it pulls the reference from the
registry through the node's engine (with the registry's credentials, so nodes need no login of
their own) and reports each change as a ``Transfer`` (``bai_scheduler.contract.transfer``).
``failure_reason`` turns whatever stopped a pull into what the user reads (pure): which image, which
node, why, and what to do.
"""
from __future__ import annotations

import threading
from typing import Callable

import docker
import requests
import urllib3

from bai_scheduler.contract.registry import split_name
from bai_scheduler.contract.transfer import Transfer, TransferFailed


class PullStopped(Exception):
    """The spawn no longer wants the image (stopped, or out of time)."""


def local_id(client, ref: str) -> str | None:
    """The id of the image the node holds under ``ref``, or None."""
    try:
        return client.inspect_image(ref).get("Id")
    except docker.errors.NotFound:
        return None


def pull_blocking(client, ref: str, auth_config: dict | None, layers, on_progress: Callable[[Transfer], None],
                  stop: threading.Event) -> None:
    """Pull ``ref`` (``layers``: (digest, bytes) from the registry's manifest, for the total).
    ``PullStopped`` when ``stop`` is set; ``TransferFailed`` or a docker-py error when it fails."""
    repo, tag = split_name(ref)
    progress = Transfer(layers)
    for event in client.pull(repo, tag, stream=True, decode=True, auth_config=auth_config):
        if stop.is_set():
            raise PullStopped()
        if progress.feed(event):
            on_progress(progress)


def engine_message(e: Exception) -> str:
    """What a user may read of an engine error: the engine's own explanation, or the
    error's kind; never the engine's API URL (docker-py puts it in str(e))."""
    explanation = getattr(e, "explanation", None)
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    if isinstance(e, TransferFailed):
        explanation = str(e)
    return str(explanation).strip()[:300] if explanation else e.__class__.__name__


def failure_reason(e: Exception, registry_host: str) -> str:
    """Why a pull failed and what to do, for the user (never an engine's address)."""
    answered = isinstance(e, (docker.errors.APIError, TransferFailed))  # APIError is a requests error too
    if not answered and isinstance(e, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError,
                                       docker.errors.DockerException)):
        return (f"the node's Docker engine stopped answering ({e.__class__.__name__}); start the session again, "
                "and tell an admin if it happens again")
    said = engine_message(e)
    low = said.lower()
    if isinstance(e, docker.errors.NotFound) or "manifest unknown" in low or "not found" in low:
        return ("the registry has no such image any more (it was deleted or replaced); pick another image in "
                "the form")
    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        return (f"the registry at {registry_host} refused the node's login ({said}); ask an admin to check "
                "c.BaiRegistry.username and password_file")
    if "connection refused" in low or "no such host" in low or "dial tcp" in low or "i/o timeout" in low:
        return (f"the node cannot reach the image registry at {registry_host} ({said}); ask an admin to "
                "start the registry or check c.BaiRegistry.url, then start the session again")
    if "http response to https client" in low or "certificate" in low or "x509" in low:
        return (f"the node does not trust the registry at {registry_host} ({said}); an admin must add it to "
                "the node's Docker configuration (docs/install.md, Image registry)")
    if isinstance(e, TransferFailed):
        return f"the node's engine said: {said}; start the session again"
    return f"{said}; start the session again"

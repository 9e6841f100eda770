"""Docker engines as scheduler nodes: clients, session containers, events.

Blocking docker-py calls live here and are only ever called from threads
(``asyncio.to_thread`` or the event-watcher thread), never on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import docker
from docker.utils import kwargs_from_env

from .contract import catalog, labels

from .core.model import Node, RequestKey, Share
from .service import ContainerFacts

log = logging.getLogger("bai_scheduler")

# Engine events after which a session container no longer holds its share.
GONE_EVENTS = {"die", "destroy", "stop"}


def make_client(node: Node, timeout: int = 30) -> docker.APIClient:
    kwargs = {"version": "auto", "timeout": timeout}
    if node.docker_url:
        kwargs["base_url"] = node.docker_url
        if node.tls:
            kwargs["tls"] = docker.tls.TLSConfig(**node.tls)
    else:
        kwargs.update(kwargs_from_env())
    return docker.APIClient(**kwargs)


def facts_from_labels(node: str, container_id: str, lab: dict, running: bool) -> ContainerFacts | None:
    """Read a session container's allocation back from its labels (None if not ours)."""
    user = lab.get(labels.USER)
    request_id = lab.get(labels.REQUEST_ID)
    if not user or not request_id:
        return None
    devices = [d for d in lab.get(labels.DEVICES, "").split(",") if d]
    quanta = [int(q) for q in lab.get(labels.QUANTA, "").split(",") if q]
    if len(devices) != len(quanta):
        log.warning("Container %s has mismatched device labels; ignoring its GPU share", container_id[:12])
        devices, quanta = [], []
    return ContainerFacts(
        request_id=request_id,
        key=RequestKey(user, lab.get(labels.SERVER, "")),
        node=lab.get(labels.NODE, node),
        shares=tuple(Share(d, q) for d, q in zip(devices, quanta)),
        cpu_millis=int(lab.get(labels.CPU_MILLIS, "0") or 0),
        memory_bytes=int(lab.get(labels.MEMORY_BYTES, "0") or 0),
        image=lab.get(labels.IMAGE, ""),
        running=running,
    )


def session_containers(client: docker.APIClient, node: str, hub_id: str) -> list[ContainerFacts]:
    out = []
    for c in client.containers(all=True, filters={"label": [labels.REQUEST_ID, f"{labels.HUB}={hub_id}"]}):
        facts = facts_from_labels(node, c["Id"], c.get("Labels") or {}, c.get("State") == "running")
        if facts is not None:
            out.append(facts)
    return out


class EventWatcher:
    """Follows one engine's container events in a thread and hands them to the loop.

    Reconnects when the engine goes away; each reconnect triggers a full
    reconcile (events missed while disconnected are recovered from state).
    """

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop, on_gone, on_reconnect, hub_id: str):
        self.node = node
        self.hub_id = hub_id
        self.loop = loop
        self.on_gone = on_gone  # coroutine fn(ContainerFacts)
        self.on_reconnect = on_reconnect  # coroutine fn(node_name)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"events-{node.name}", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        first = True
        while not self._stop.is_set():
            try:
                client = make_client(self.node, timeout=None)
                stream = client.events(decode=True, filters={"type": "container", "label": [labels.REQUEST_ID, f"{labels.HUB}={self.hub_id}"]})
                if not first:
                    asyncio.run_coroutine_threadsafe(self.on_reconnect(self.node.name), self.loop)
                first = False
                for ev in stream:
                    if self._stop.is_set():
                        return
                    if ev.get("status") in GONE_EVENTS or ev.get("Action") in GONE_EVENTS:
                        attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                        facts = facts_from_labels(self.node.name, ev.get("id", ""), attrs, False)
                        if facts is not None:
                            asyncio.run_coroutine_threadsafe(self.on_gone(facts), self.loop)
            except Exception as e:  # engine down or restarting
                log.warning("Lost events from node %s (%s); retrying", self.node.name, e)
                first = False
            self._stop.wait(1.0)


class CatalogCache:
    """The image catalog of the first node's engine (the hub's spawner reads the same), kept
    for a while so that page views do not list the engine's images every time."""

    def __init__(self, node: Node | None):
        self.node = node
        self._at = 0.0
        self._images: list | None = None

    async def get(self, max_age: float = 15.0) -> list:
        if self._images is not None and time.monotonic() - self._at < max_age:
            return self._images
        if self.node is None:
            return []
        # make_client negotiates the API version over the socket: off the loop too.
        client = await asyncio.to_thread(make_client, self.node, 10)
        images = await catalog.load_catalog(client)
        self._images, self._at = images, time.monotonic()
        return images

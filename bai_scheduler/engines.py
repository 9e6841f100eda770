"""Docker engines as scheduler nodes: clients, session containers, events.

Blocking docker-py calls live here and are only ever called from threads
(``asyncio.to_thread``, ``DockerEngines`` or the event-watcher thread), never on
the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading

import docker
from docker.utils import kwargs_from_env

from .contract import labels

from .core.model import Node, RequestKey, Share
from .service import ContainerFacts

log = logging.getLogger("bai_scheduler")

# Engine events that end a session container: removed, or exited (then this service removes
# it before its share is freed).  "pause", "restart" and the like keep the share.
REMOVED_EVENTS = {"destroy"}
EXITED_EVENTS = {"die", "stop"}


def make_client(node: Node, timeout: int = 30) -> docker.APIClient:
    return _client(node.docker_url, node.tls, timeout)


def _client(docker_url: str, tls: dict, timeout: int) -> docker.APIClient:
    kwargs = {"version": "auto", "timeout": timeout}
    if docker_url:
        kwargs["base_url"] = docker_url
        if tls:
            kwargs["tls"] = docker.tls.TLSConfig(**tls)
    else:
        kwargs.update(kwargs_from_env())
    return docker.APIClient(**kwargs)


def engine_resources(entry: dict) -> tuple[int, int] | None:
    """(CPU millicores, memory bytes) the Docker engine of node ``entry`` reports (NCPU,
    MemTotal), or None if it cannot be read (a node's "auto" cpu/memory; at start only)."""
    try:
        client = _client(entry.get("docker_url") or "", entry.get("tls") or {}, 10)
        try:
            info = client.info()
        finally:
            client.close()
        return int(info["NCPU"]) * 1000, int(info["MemTotal"])
    except (docker.errors.DockerException, OSError, KeyError, TypeError, ValueError) as e:
        log.warning("Node %s: engine info unreadable: %s", entry.get("name", "local"), e)
        return None


def facts_from_labels(node: str, container_id: str, lab: dict, state: str) -> ContainerFacts | None:
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
        state=state,
        group=lab.get(labels.GROUP, ""),
    )


def session_containers(client: docker.APIClient, node: str, hub_id: str) -> list[ContainerFacts]:
    out = []
    for c in client.containers(all=True, filters={"label": [labels.REQUEST_ID, f"{labels.HUB}={hub_id}"]}):
        facts = facts_from_labels(node, c["Id"], c.get("Labels") or {}, c.get("State") or "")
        if facts is not None:
            out.append(facts)
    return out


def remove_attempt(client: docker.APIClient, request_id: str, hub_id: str) -> int:
    """Force-remove every container of one spawn attempt; returns how many there were."""
    ids = [c["Id"] for c in client.containers(
        all=True, filters={"label": [f"{labels.REQUEST_ID}={request_id}", f"{labels.HUB}={hub_id}"]})]
    for cid in ids:
        try:
            client.remove_container(cid, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409 or "already in progress" not in str(e):
                raise
    return len(ids)


class DockerEngines:
    """The service's blocking Docker calls, each in a worker thread; one client per node."""

    def __init__(self, nodes, hub_id: str, timeout: int = 30):
        self.nodes = {n.name: n for n in nodes}
        self.hub_id = hub_id
        self.timeout = timeout
        self._clients: dict[str, docker.APIClient] = {}
        self._client_lock = threading.Lock()

    def client(self, name: str) -> docker.APIClient:
        """Blocking (the API version is negotiated over the socket): call it in a thread."""
        with self._client_lock:
            client = self._clients.get(name)
            if client is None:
                client = self._clients[name] = make_client(self.nodes[name], self.timeout)
            return client

    async def list(self, name: str) -> list[ContainerFacts]:
        return await asyncio.to_thread(lambda: session_containers(self.client(name), name, self.hub_id))

    async def remove(self, node: str, request_id: str) -> int:
        return await asyncio.to_thread(lambda: remove_attempt(self.client(node), request_id, self.hub_id))


class EventWatcher:
    """Follows one engine's container events in a thread and hands them to the loop.

    Reconnects when the engine goes away; each reconnect triggers a full
    reconcile (events missed while disconnected are recovered from state).
    """

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop, on_event, on_reconnect, hub_id: str):
        self.node = node
        self.hub_id = hub_id
        self.loop = loop
        self.on_event = on_event  # coroutine fn(ContainerFacts, "removed" | "exited")
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
                    action = ev.get("Action") or ev.get("status")
                    what = "removed" if action in REMOVED_EVENTS else "exited" if action in EXITED_EVENTS else None
                    if what:
                        attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                        facts = facts_from_labels(self.node.name, ev.get("id", ""), attrs, action)
                        if facts is not None:
                            asyncio.run_coroutine_threadsafe(self.on_event(facts, what), self.loop)
            except Exception as e:  # engine down or restarting
                log.warning("Lost events from node %s (%s); retrying", self.node.name, e)
                first = False
            self._stop.wait(1.0)


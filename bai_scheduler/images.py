"""The registry as the service sees it: the catalog, and which node holds which image.

* ``CatalogCache``: the catalog read from the registry (its catalog and tags API, each image's
  labels from its config blob), reused for ``c.BaiRegistry.catalog_ttl`` seconds; one read at a
  time however many pages ask. Private images count only in their owner's namespace
  (``<private_image_repo>/<owner>``): an image labelled as alice's elsewhere is nobody's.
* ``node_images_blocking``: the image references one node's engine holds, which placement
  prefers when capacity is otherwise equal (``Capacity.set_node_images``).

Registry calls block (``requests``): they run in worker threads, never on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time

from .contract import labels as L
from .contract.catalog import CatalogImage, catalog_from_registry
from .contract.registry import BaiRegistry, split_name
from .snapshots import private_repository

log = logging.getLogger("bai_scheduler")


def in_owners_namespace(image: CatalogImage, private_repo: str) -> bool:
    """A kernel image, or a private image whose every name is in its owner's own repository."""
    if not image.is_private:
        return True
    own = private_repository(private_repo, image.owner or "")
    return all(split_name(n)[0] == own for n in image.names)


class CatalogCache:
    def __init__(self, registry: BaiRegistry, private_repo: str):
        self.registry = registry
        self.private_repo = private_repo
        self.client = registry.client()
        self._images: list[CatalogImage] | None = None
        self._at = 0.0
        self._loading: asyncio.Future | None = None
        self._warned: set[str] = set()  # images already reported as outside their owner's namespace

    def invalidate(self) -> None:
        """Read the registry again on the next ``get`` (after a snapshot or a deletion here); a
        read already under way may have missed the change, so it is not waited for."""
        self._images = None
        self._loading = None

    async def get(self, max_age: float | None = None) -> list[CatalogImage]:
        """The catalog, at most ``max_age`` seconds old (default ``c.BaiRegistry.catalog_ttl``).
        Raises ``RegistryError`` when the registry cannot be read."""
        max_age = self.registry.catalog_ttl if max_age is None else max_age
        if self._images is not None and time.monotonic() - self._at <= max_age:
            return self._images
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        loading = self._loading
        try:
            return await asyncio.shield(loading)
        finally:
            if self._loading is loading and loading.done():
                self._loading = None

    async def _load(self) -> list[CatalogImage]:
        started = time.monotonic()
        mine = asyncio.current_task()
        found = await asyncio.to_thread(self.client.images)
        catalog = catalog_from_registry(found, self.registry.host)
        kept = [c for c in catalog if in_owners_namespace(c, self.private_repo)]
        for c in catalog:
            if c not in kept and c.id not in self._warned:
                self._warned.add(c.id)
                log.warning("Catalog: %s is labelled private to %s but is not in %s; nobody may launch it",
                            c.short_ref, c.owner, private_repository(self.private_repo, c.owner or ""))
        if self._loading is mine:  # not invalidated meanwhile: this is the freshest read
            self._images, self._at = kept, started
        return kept


def node_images_blocking(client) -> frozenset[str]:
    """Every reference the node's engine has an image under (tags, e.g. 127.0.0.1:5000/bai/x:1)."""
    return frozenset(t for i in client.images(filters={"label": L.KIND}) for t in i.get("RepoTags") or ()
                     if t != "<none>:<none>")

"""The service's catalog cache over the registry (its client stands in: reads are counted and can
be held): one read however many ask, a short TTL, a change made here shows at once, and private
images count only in their owner's namespace."""
import asyncio
import threading

import pytest

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.registry import BaiRegistry, RegistryError, RegistryImage
from bai_scheduler.images import CatalogCache

KERNEL = {L.KIND: L.KIND_KERNEL, L.FRAMEWORK: "x", L.VERSION: "1"}


def private(owner):
    return {L.KIND: L.KIND_PRIVATE, L.OWNER: owner, L.FRAMEWORK: "x", L.VERSION: "1"}


class Client:
    def __init__(self):
        self.images_ = [RegistryImage("bai/x", "1", "sha256:m1", "sha256:" + "1" * 64, (), KERNEL)]
        self.reads = 0
        self.gate = threading.Event()
        self.gate.set()
        self.down = False

    def images(self):
        self.reads += 1
        self.gate.wait(5)
        if self.down:
            raise RegistryError("The image registry at http://127.0.0.1:5000 does not answer (ConnectionError).", 503)
        return list(self.images_)


def cache(ttl=15):
    c = CatalogCache(BaiRegistry(url="http://127.0.0.1:5000", catalog_ttl=ttl), "bai-private")
    c.client = Client()
    return c


async def test_one_read_for_many_and_reuse_within_the_ttl():
    c = cache()
    c.client.gate.clear()
    waiting = [asyncio.ensure_future(c.get()) for _ in range(5)]
    await asyncio.sleep(0.05)
    c.client.gate.set()
    results = await asyncio.gather(*waiting)
    assert c.client.reads == 1 and all(r == results[0] for r in results)
    assert [i.short_ref for i in results[0]] == ["bai/x:1"] and results[0][0].ref == "127.0.0.1:5000/bai/x:1"
    await c.get()
    assert c.client.reads == 1
    await c.get(max_age=0)
    assert c.client.reads == 2


async def test_a_change_made_here_shows_at_once_even_during_a_read():
    c = cache()
    await c.get()
    c.client.gate.clear()
    before = asyncio.ensure_future(c.get(max_age=0))  # a read under way when the snapshot finishes
    await asyncio.sleep(0.05)
    c.client.images_.append(RegistryImage("bai-private/ann", "v1", "sha256:m2", "sha256:" + "2" * 64, (),
                                          private("ann")))
    c.invalidate()
    c.client.gate.set()
    await before
    assert "bai-private/ann:v1" in [i.short_ref for i in await c.get()]


async def test_private_images_count_only_in_their_owners_namespace(caplog):
    c = cache()
    c.client.images_ += [
        RegistryImage("bai-private/ann", "v1", "sha256:m2", "sha256:" + "2" * 64, (), private("ann")),
        RegistryImage("bai-private/bob", "trojan", "sha256:m3", "sha256:" + "3" * 64, (), private("ann")),
        RegistryImage("bai/x", "looks-private", "sha256:m4", "sha256:" + "4" * 64, (), private("ann")),
        RegistryImage("bai-private/Ann.Lee", "v1", "sha256:m5", "sha256:" + "5" * 64, (), private("Ann.Lee")),
    ]
    shown = [(i.short_ref, i.owner) for i in await c.get()]
    assert shown == [("bai/x:1", None), ("bai-private/ann:v1", "ann")]
    assert caplog.text.count("is labelled private to ann but is not in bai-private/ann") == 2
    await c.get(max_age=0)
    assert caplog.text.count("is labelled private to ann but is not in") == 2  # said once per image


async def test_a_registry_that_is_down_is_an_error_for_every_caller():
    c = cache()
    c.client.down = True
    with pytest.raises(RegistryError, match="does not answer"):
        await c.get()
    c.client.down = False
    assert len(await c.get()) == 1

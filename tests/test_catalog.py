"""Catalog logic as plain functions over image dicts and the registry's images (no Docker, no registry)."""

import hashlib
import json

import pytest

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.catalog import (CatalogImage, ImageNotAllowed, build_catalog, catalog_from_registry,
                                            group_by_framework, resolve_image, version_key, visible_to)
from bai_scheduler.contract.registry import RegistryImage


def kernel(ref, framework, version, display=None, python="3.11", id_=None, created=1_700_000_000):
    return {
        "Id": id_ or "sha256:" + hashlib.sha256(ref.encode()).hexdigest(),
        "RepoTags": [ref],
        "Labels": {L.KIND: L.KIND_KERNEL, L.NAME: ref.split("/")[-1].split(":")[0],
                   L.FRAMEWORK: framework, L.VERSION: version,
                   L.DISPLAY_NAME: display or f"{framework} {version}", L.PYTHON: python,
                   L.RECIPE_HASH: "abc"},
        "Size": 2 * 2**30, "Created": created,
    }


def private(ref, owner, source="bai/sklearn:1.6.1", framework="scikit-learn", version="1.6.1"):
    d = kernel(ref, framework, version, display=f"{owner}'s snapshot")
    d["Labels"].update({L.KIND: L.KIND_PRIVATE, L.OWNER: owner, L.SOURCE_IMAGE: source,
                        L.CREATED: "2025-01-02T03:04:05+00:00"})
    return d


IMAGES = [
    kernel("bai/sklearn:1.5.2", "scikit-learn", "1.5.2"),
    kernel("bai/sklearn:1.6.1", "scikit-learn", "1.6.1"),
    kernel("bai/sklearn:1.10.0", "scikit-learn", "1.10.0"),
    kernel("bai/pytorch:2.5.1", "pytorch", "2.5.1"),
    private("bai-private/alice:snap1", "alice"),
    private("bai-private/bob:snap1", "bob"),
    {"Id": "sha256:" + "1" * 64, "RepoTags": ["debian:bookworm"], "Labels": None, "Size": 1, "Created": 1},
    {"Id": "sha256:" + "2" * 64, "RepoTags": ["bai/base:bookworm"], "Size": 1, "Created": 1,
     "Labels": {L.KIND: "base", L.NAME: "base", L.FRAMEWORK: "debian", L.VERSION: "bookworm"}},
    {"Id": "sha256:" + "3" * 64, "RepoTags": ["orphan:x"], "Size": 1, "Created": 1,
     "Labels": {L.KIND: L.KIND_PRIVATE}},  # private without owner: nobody may launch it
]


def test_build_catalog_keeps_only_labelled_kernel_and_private():
    cat = build_catalog(IMAGES)
    assert {c.ref for c in cat} == {"bai/sklearn:1.5.2", "bai/sklearn:1.6.1", "bai/sklearn:1.10.0",
                                    "bai/pytorch:2.5.1", "bai-private/alice:snap1", "bai-private/bob:snap1"}
    sk = next(c for c in cat if c.ref == "bai/sklearn:1.6.1")
    assert isinstance(sk, CatalogImage)
    assert (sk.framework, sk.version, sk.display_name, sk.python, sk.kind, sk.owner) == \
        ("scikit-learn", "1.6.1", "scikit-learn 1.6.1", "3.11", "kernel", None)
    assert sk.size == 2 * 2**30 and sk.created.startswith("2023-11-14T")
    al = next(c for c in cat if c.owner == "alice")
    assert al.is_private and al.source_image == "bai/sklearn:1.6.1" and al.created.startswith("2025-01-02")
    # kernel images first, newest version first within a framework
    assert [c.ref for c in cat][:4] == ["bai/pytorch:2.5.1", "bai/sklearn:1.10.0",
                                        "bai/sklearn:1.6.1", "bai/sklearn:1.5.2"]


def test_build_catalog_accepts_sdk_attrs_and_skips_untagged():
    attrs = {"Id": "sha256:" + "4" * 64, "RepoTags": ["bai/numpy:2.0"], "Size": 5,
             "Created": "2025-01-01T00:00:00Z",
             "Config": {"Labels": {L.KIND: L.KIND_KERNEL, L.FRAMEWORK: "numpy", L.VERSION: "2.0"}}}
    (c,) = build_catalog([attrs])
    assert c.ref == "bai/numpy:2.0" and c.display_name == "numpy 2.0" and c.created == "2025-01-01T00:00:00Z"
    # a rebuild moved the tag on; the old image (still used by a container) is not offered
    assert build_catalog([dict(attrs, RepoTags=["<none>:<none>"])]) == []
    assert build_catalog([dict(attrs, RepoTags=None)]) == []


def test_group_by_framework_newest_first():
    groups = group_by_framework(build_catalog(IMAGES))
    assert list(groups) == ["pytorch", "scikit-learn"]
    assert [c.version for c in groups["scikit-learn"] if c.kind == "kernel"] == ["1.10.0", "1.6.1", "1.5.2"]


@pytest.mark.parametrize("older,newer", [
    ("1.9", "1.10"), ("1.6.1", "1.10.0"), ("2.0.0rc1", "2.0.0"), ("1.15.5", "2.18.0"),
    ("bookworm", "trixie"), ("1.2-x", "1.10-x"),
])
def test_version_key_orders_properly(older, newer):
    assert version_key(older) < version_key(newer)


def test_visible_to():
    cat = build_catalog(IMAGES)
    alice = {c.ref for c in visible_to(cat, "alice")}
    assert "bai-private/alice:snap1" in alice and "bai-private/bob:snap1" not in alice
    assert "bai/sklearn:1.6.1" in alice
    assert {c.ref for c in visible_to(cat, "carol")} == {c.ref for c in cat if c.kind == "kernel"}
    assert len(visible_to(cat, "admin", is_admin=True)) == len(cat)


def test_resolve_image_accepts_catalog_refs():
    cat = build_catalog(IMAGES)
    assert resolve_image(cat, "alice", "bai/sklearn:1.6.1").version == "1.6.1"
    assert resolve_image(cat, "alice", " bai/sklearn:1.5.2 ").version == "1.5.2"
    assert resolve_image(cat, "alice", "bai-private/alice:snap1").owner == "alice"
    assert resolve_image(cat, "bob", "bai-private/alice:snap1", is_admin=True).owner == "alice"
    sk = resolve_image(cat, "alice", "bai/sklearn:1.6.1")
    assert resolve_image(cat, "alice", sk.id).ref == sk.ref
    assert resolve_image(cat, "alice", sk.id[:19]).ref == sk.ref


def test_resolve_image_with_and_without_latest():
    cat = build_catalog([kernel("bai/numpy:latest", "numpy", "2.0"), kernel("docs/img:1", "x", "1")])
    assert resolve_image(cat, "u", "bai/numpy").ref == "bai/numpy:latest"
    assert resolve_image(cat, "u", "bai/numpy:latest").ref == "bai/numpy:latest"
    assert resolve_image(cat, "u", "docker.io/bai/numpy").ref == "bai/numpy:latest"
    with pytest.raises(ImageNotAllowed):
        resolve_image(cat, "u", "bai/numpy:2.0")


def test_resolve_image_refusals_do_not_leak():
    cat = build_catalog(IMAGES)
    msgs = {}
    for ref in ("bai-private/bob:snap1", "bai-private/nobody:snap1", "debian:bookworm",
                "bai/base:bookworm", "orphan:x"):
        with pytest.raises(ImageNotAllowed) as e:
            resolve_image(cat, "alice", ref)
        msgs[ref] = e.value.message.replace(repr(ref), "REF")
    assert len(set(msgs.values())) == 1, msgs
    msg = next(iter(msgs.values()))
    assert "not in the catalog" in msg and "Pick one" in msg
    with pytest.raises(ImageNotAllowed, match="No image chosen"):
        resolve_image(cat, "alice", "")
    # too short or ambiguous id prefixes are not accepted
    with pytest.raises(ImageNotAllowed):
        resolve_image(cat, "alice", "sha256:")
    twins = build_catalog([kernel("a/x:1", "x", "1", id_="sha256:" + "ab" * 32),
                           kernel("a/y:1", "y", "1", id_="sha256:" + "ab" * 31 + "cd")])
    with pytest.raises(ImageNotAllowed):
        resolve_image(twins, "alice", "sha256:" + "ab" * 6)
    assert resolve_image(twins, "alice", "sha256:" + "ab" * 32).ref == "a/x:1"


HOST = "127.0.0.1:5000"


def in_registry(repo, tag, config, labels, layers=(("sha256:" + "a" * 64, 100), ("sha256:" + "b" * 64, 50))):
    return RegistryImage(repo, tag, "sha256:" + hashlib.sha256(f"{repo}:{tag}".encode()).hexdigest(), config,
                         tuple(layers), labels, "2026-01-02T03:04:05.123456789Z")


REGISTRY = [
    in_registry("bai/sklearn", "1.6.1", "sha256:" + "1" * 64, IMAGES[1]["Labels"]),
    in_registry("bai/sklearn", "1.5.2", "sha256:" + "2" * 64, IMAGES[0]["Labels"]),
    # the same image under a second name is one catalog entry
    in_registry("bai/sklearn", "stable", "sha256:" + "1" * 64, IMAGES[1]["Labels"]),
    in_registry("bai-private/alice", "snap1", "sha256:" + "3" * 64, IMAGES[4]["Labels"]),
    in_registry("bai/base", "bookworm", "sha256:" + "4" * 64, IMAGES[7]["Labels"]),
    in_registry("library/debian", "bookworm", "sha256:" + "5" * 64, {}),
]


def test_the_catalog_from_the_registry_runs_full_references_and_shows_names_without_the_host():
    cat = catalog_from_registry(REGISTRY, HOST)
    assert [(c.ref, c.short_ref) for c in cat] == [
        (f"{HOST}/bai/sklearn:1.6.1", "bai/sklearn:1.6.1"),
        (f"{HOST}/bai/sklearn:1.5.2", "bai/sklearn:1.5.2"),
        (f"{HOST}/bai-private/alice:snap1", "bai-private/alice:snap1"),
    ]
    sk = cat[0]
    assert sk.tags == (f"{HOST}/bai/sklearn:1.6.1", f"{HOST}/bai/sklearn:stable")
    assert sk.names == ("bai/sklearn:1.6.1", "bai/sklearn:stable")
    assert sk.id == "sha256:" + "1" * 64 and sk.size == 150 and len(sk.layers) == 2
    assert sk.created == "2026-01-02T03:04:05.123456789Z"
    # what users type, the full reference, a second tag and the id all name the same entry
    for typed in ("bai/sklearn:1.6.1", f"{HOST}/bai/sklearn:1.6.1", "bai/sklearn:stable", sk.id, sk.id[:19]):
        assert resolve_image(cat, "carol", typed) == sk, typed
    assert resolve_image(cat, "alice", "bai-private/alice:snap1").owner == "alice"
    for typed in ("bai-private/alice:snap1", f"{HOST}/bai-private/alice:snap1", cat[2].id):
        with pytest.raises(ImageNotAllowed, match="not in the catalog"):
            resolve_image(cat, "bob", typed)


def test_a_catalog_entry_travels_as_json():
    for c in catalog_from_registry(REGISTRY, HOST):
        again = CatalogImage.from_json(json.loads(json.dumps(c.to_json())))
        assert again == c and isinstance(again.layers[0], tuple)

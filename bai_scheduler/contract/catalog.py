"""The image catalog: kernel and private images, read from their labels.

The catalog comes from the image registry (``registry.py``): every tag there, and each image's
labels from its config blob. ``catalog_from_registry`` turns those into ``CatalogImage``s; the
pure functions below work on image attribute dicts as the Docker engine also gives them (keys
``Id``, ``RepoTags``, ``Labels`` (``Config.Labels`` in the SDK's ``attrs``), ``Size``,
``Created``). Only tagged images labelled ``org.bai-hub.kind`` = ``kernel`` (built from a recipe)
or ``private`` (a user's snapshot, which also needs an owner) are part of the catalog; everything
else is ignored.

An entry's ``ref`` is the reference nodes pull and containers run
(``127.0.0.1:5000/bai/sklearn:1.6.1``); ``short_ref`` is the name users see and type
(``bai/sklearn:1.6.1``); ``id`` is the image id (its config's digest) that the pulled image must
have. ``resolve_image`` accepts either name, the id, or an id prefix.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any, Iterable, Mapping

from packaging.version import InvalidVersion, Version

from . import labels as L
from .registry import RegistryImage


class ImageNotAllowed(Exception):
    """The requested image is not one this user may launch. ``message`` is
    safe to show to the user."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclasses.dataclass(frozen=True)
class CatalogImage:
    ref: str                 # "127.0.0.1:5000/bai/sklearn:1.6.1" (first tag; untagged images are not listed)
    framework: str
    version: str
    display_name: str
    python: str
    kind: str                # "kernel" | "private"
    owner: str | None = None          # private images only
    source_image: str | None = None   # private images only
    created: str = ""        # ISO time: snapshot time (private) or image creation
    size: int = 0            # bytes
    id: str = ""
    tags: tuple[str, ...] = ()
    name: str = ""           # recipe name (kernel images)
    short_ref: str = ""      # "bai/sklearn:1.6.1": ``ref`` without the registry's host, what users see
    names: tuple[str, ...] = ()          # every tag without the registry's host
    layers: tuple[tuple[str, int], ...] = ()   # (digest, bytes) a pull downloads

    def __post_init__(self):
        if not self.short_ref:  # an image named without a registry: its name is its reference
            object.__setattr__(self, "short_ref", self.ref)

    @property
    def is_private(self) -> bool:
        return self.kind == L.KIND_PRIVATE

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CatalogImage":
        fields = {f.name for f in dataclasses.fields(cls)}
        out = {k: v for k, v in data.items() if k in fields}
        for k in ("tags", "names"):
            out[k] = tuple(out.get(k) or ())
        out["layers"] = tuple((str(d), int(n)) for d, n in out.get("layers") or ())
        return cls(**out)


def _labels(image: Mapping[str, Any]) -> dict[str, str]:
    lab = image.get("Labels")
    if lab is None:
        lab = (image.get("Config") or {}).get("Labels")
    return dict(lab or {})


def _tags(image: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(t for t in (image.get("RepoTags") or []) if t and t != "<none>:<none>")


def _created(image: Mapping[str, Any], lab: Mapping[str, str]) -> str:
    if lab.get(L.CREATED):
        return lab[L.CREATED]
    c = image.get("Created")
    if isinstance(c, (int, float)):
        return datetime.datetime.fromtimestamp(c, datetime.timezone.utc).isoformat(timespec="seconds")
    return str(c or "")


def _short(ref: str, host: str) -> str:
    return ref[len(host) + 1:] if host and ref.startswith(host + "/") else ref


def to_catalog_image(image: Mapping[str, Any], host: str = "") -> CatalogImage | None:
    """One image dict → ``CatalogImage``, or None when it is not a catalog image. ``host``: the
    registry's, which the names users see leave out."""
    lab = _labels(image)
    kind = lab.get(L.KIND)
    if kind not in (L.KIND_KERNEL, L.KIND_PRIVATE):
        return None
    if kind == L.KIND_PRIVATE and not lab.get(L.OWNER):
        return None  # a private image nobody owns must not be launchable by anyone
    tags = _tags(image)
    if not tags:
        return None  # superseded by a rebuild (its tag moved on) or never tagged
    image_id = image.get("Id") or image.get("id") or ""
    framework = lab.get(L.FRAMEWORK, "")
    version = lab.get(L.VERSION, "")
    display = lab.get(L.DISPLAY_NAME) or (f"{framework} {version}".strip() if framework else "") \
        or tags[0]
    return CatalogImage(
        ref=tags[0],
        framework=framework,
        version=version,
        display_name=display,
        python=lab.get(L.PYTHON, ""),
        kind=kind,
        owner=lab.get(L.OWNER) or None,
        source_image=lab.get(L.SOURCE_IMAGE) or None,
        created=_created(image, lab),
        size=int(image.get("Size") or 0),
        id=image_id,
        tags=tags,
        name=lab.get(L.NAME, ""),
        short_ref=_short(tags[0], host),
        names=tuple(_short(t, host) for t in tags),
        layers=tuple(image.get("Layers") or ()),
    )


def build_catalog(images: Iterable[Mapping[str, Any]], host: str = "") -> list[CatalogImage]:
    """Kernel and private images, one entry per image (first tag as ref),
    ordered by framework, newest version first, then private ones by time."""
    out = [c for c in (to_catalog_image(i, host) for i in images) if c is not None]
    out.sort(key=lambda c: (c.is_private, c.framework.lower(), _neg_version(c.version),
                            c.created, c.ref))
    return out


def catalog_from_registry(images: Iterable[RegistryImage], host: str) -> list[CatalogImage]:
    """The catalog of what the registry at ``host`` holds: one entry per image (the tags that
    name the same config, in any repository, are one image), as ``build_catalog`` orders them."""
    by_config: dict[str, dict] = {}
    for i in images:
        entry = by_config.setdefault(i.config, {"Id": i.config, "RepoTags": [], "Labels": i.labels, "Size": i.size,
                                                "Created": i.created, "Layers": i.layers})
        entry["RepoTags"].append(f"{host}/{i.repository}:{i.tag}")
    for entry in by_config.values():
        entry["RepoTags"].sort()
    return build_catalog(by_config.values(), host)


def version_key(version: str):
    """Sortable key for version strings: PEP 440 where possible, else numeric parts."""
    try:
        return (1, Version(version), ())
    except InvalidVersion:
        parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                      for p in re.split(r"[.\-_+]", version) if p)
        return (0, Version("0"), parts)


class _Neg:
    __slots__ = ("k",)

    def __init__(self, k):
        self.k = k

    def __lt__(self, other):
        return other.k < self.k

    def __eq__(self, other):
        return self.k == other.k


def _neg_version(version: str) -> _Neg:
    return _Neg(version_key(version))


def group_by_framework(catalog: Iterable[CatalogImage]) -> dict[str, list[CatalogImage]]:
    """``{framework: [images, newest version first]}``; frameworks in name order."""
    groups: dict[str, list[CatalogImage]] = {}
    for c in catalog:
        groups.setdefault(c.framework, []).append(c)
    return {fw: sorted(items, key=lambda c: (_neg_version(c.version), c.is_private, c.ref))
            for fw, items in sorted(groups.items(), key=lambda kv: kv[0].lower())}


def visible_to(catalog: Iterable[CatalogImage], user: str, is_admin: bool = False) -> list[CatalogImage]:
    """Kernel images plus the user's own private images; admins see all."""
    return [c for c in catalog
            if is_admin or c.kind == L.KIND_KERNEL or (c.is_private and c.owner == user)]


def _normalize_ref(ref: str) -> str:
    ref = ref.strip()
    for p in ("docker.io/library/", "docker.io/"):
        if ref.startswith(p):
            ref = ref[len(p):]
    if ref.startswith("sha256:") or "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        ref += ":latest"
    return ref


def _matches(c: CatalogImage, ref: str) -> bool:
    return ref in c.tags or ref in c.names or ref == c.ref or (bool(c.id) and ref == c.id)


def _id_prefix_match(c: CatalogImage, ref: str) -> bool:
    return bool(c.id) and ref.startswith("sha256:") and len(ref) >= 19 and c.id.startswith(ref)


# Said to admins after ``ImageNotAllowed``'s message: only they can add kernel images.
ADMIN_IMAGES_HINT = (" As an admin you can add kernel images: `bai-images build NAME` on the hub's host builds "
                     "the recipe hub_config/images/NAME.toml.")


def resolve_image(catalog: Iterable[CatalogImage], user: str, requested_ref: str,
                  is_admin: bool = False) -> CatalogImage:
    """The catalog entry for ``requested_ref`` if ``user`` may launch it.

    Accepts names with or without ``:latest`` and full image ids. Raises
    ``ImageNotAllowed`` otherwise, with the same message whether the image does
    not exist, is not a catalog image, or is another user's private image."""
    requested = (requested_ref or "").strip()
    if not requested:
        raise ImageNotAllowed("No image chosen: pick one of the images offered in the form.")
    candidates = [requested, _normalize_ref(requested)]
    visible = visible_to(catalog, user, is_admin)
    for c in visible:
        if any(_matches(c, r) for r in candidates):
            return c
    by_prefix = {c.id: c for c in visible if _id_prefix_match(c, requested)}
    if len(by_prefix) == 1:
        return next(iter(by_prefix.values()))
    raise ImageNotAllowed(
        f"Image {requested!r} is not in the catalog of images you may launch. Pick one from the list "
        f"(your own snapshots are under “My private images”), or ask an admin for the framework "
        f"or version you need."
    )

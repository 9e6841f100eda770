"""Session snapshots: turn a running session into a private image its owner can launch on any node.

The workflow: a user prepares a session (``pip install X`` into the image's kernel environment
``/opt/bai/kernel``), asks an admin, and the admin snapshots it from the panel
(``{prefix}admin/snapshots``) or the REST API. The container is committed (``docker commit``) on
the node it runs on, tagged ``<registry>/<private_image_repo>/<user>:<tag>`` and pushed to the
image registry; the job is "done" only when the push is complete, and from then on any node pulls
it on demand. The image is labelled ``kind=private`` with its ``owner``, so the catalog
(``bai_scheduler.contract.catalog``, read from the registry) offers it to that user only and
refuses it to everyone else, whether chosen in the form, typed by name or asked for through the
REST API; and only in its owner's namespace (``bai_scheduler.images``).

What is NOT captured: the user's home folder ``/home/jovyan``.  It is a Docker
volume mounted into every session of that user, not part of the container's
filesystem; it stays the user's and is mounted again into sessions of the new
image.  Packages installed with ``pip install --user`` land there too, so they
are not in the image: install with a plain ``pip install``.

Layout of this module:

* pure functions (naming, tag validation, labels, the commit config, the cap)
  with plain-function tests in ``tests/test_snapshot_logic.py``;
* the Docker calls of one snapshot (commit, push, and taking back what a failed one made), run
  in worker threads;
* ``Snapshots``: the jobs (queued → committing → pushing → done | failed), kept in the
  scheduler's database (``snapshot_jobs``): a restart of the service shows every job's final
  state, and a job it interrupted is marked failed after its half-made image is removed.

The REST API and the admin page are in ``bai_scheduler/web/snapshots.py``. Deleting a private
image deletes its manifest in the registry (and the copies on the nodes); the registry frees the
space at its next garbage collection (docs/install.md).

Pausing: a commit freezes the session's processes (``docker commit``'s default,
``BaiScheduler.snapshot_pause``) so the image is a consistent copy of the
filesystem: a ``pip install`` running at that moment is captured either before
or after each file write, never with a file half-written.  The container stays
running (only frozen for the seconds or minutes the commit takes) and resumes
exactly where it was; its kernels, terminals and open connections survive.
"""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import re
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import docker

from . import engines
from .contract import labels as L
from .contract.catalog import CatalogImage
from .contract.registry import RegistryError, split_name
from .contract.transfer import Transfer, TransferFailed
from .core.model import Node, RequestKey
from .snapshot_jobs import Job, JobStore, JobStoreUnavailable

log = logging.getLogger("bai_scheduler")


# -- pure logic ---------------------------------------------------------------------------


class SnapshotError(Exception):
    """A snapshot that cannot be made (or an image that cannot be deleted).
    ``message`` is safe to show; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


MAX_TAG = 128
_TAG_CHARS = re.compile(r"[A-Za-z0-9_.-]")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?::[0-9]+)?(?:/{_COMPONENT})*$")
# User names used unchanged as the repository component: lower-case letters and
# digits with single '.', '_' or '-' between them (never two in a row).
_SIMPLE_USER = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
MAX_USER_COMPONENT = 64
MAX_REPOSITORY = 255


def validate_tag(tag: Any) -> str:
    """``tag`` if it is a valid Docker tag, else ``SnapshotError`` (400) saying why.

    Docker's rule: 1 to 128 characters from ``[A-Za-z0-9_.-]``, not starting
    with ``.`` or ``-``."""
    if not isinstance(tag, str) or not tag:
        raise SnapshotError("Give the new image a tag, e.g. 'v1' or 'with-xgboost'.")
    if len(tag) > MAX_TAG:
        raise SnapshotError(f"The tag is {len(tag)} characters long; Docker allows at most {MAX_TAG}.")
    if tag[0] in ".-":
        raise SnapshotError(f"The tag {tag!r} starts with {tag[0]!r}; a Docker tag must start with a "
                            "letter, a digit or '_'.")
    bad = sorted({ch for ch in tag if not _TAG_CHARS.fullmatch(ch)})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad[:10])
        raise SnapshotError(f"The tag {tag!r} contains {shown}: a Docker tag may only use letters, digits, "
                            "'_', '.' and '-'.")
    return tag


def validate_repo(repo: str) -> str:
    """The configured private repository prefix, or ``ValueError``."""
    if not isinstance(repo, str) or not _REPO_RE.match(repo) or len(repo) > 120:
        raise ValueError(
            f"private_image_repo {repo!r} is not a Docker repository name: use lower-case letters, "
            "digits and single '.', '_' or '-' between them, parts separated by '/' (e.g. 'bai-private')."
        )
    return repo


def user_component(user: str) -> str:
    """The user's name as one repository path component (lower-case, Docker-safe).

    Simple names (lower-case letters and digits with single ``.``, ``_`` or
    ``-`` between them, at most 64 characters, which is what the hub's
    authenticators normally produce) are used as they are. Anything else
    becomes a readable slug plus ``--`` plus 10 hex digits of the name's
    SHA-256, e.g. ``Jane.Doe@X`` → ``jane-doe-x--<hash>``.

    Collisions: a simple name never contains ``--``, so it can never equal an
    escaped one; two escaped names collide only if their hashes do (40 bits).
    Even then nobody gains access: who may launch an image is decided by its
    ``owner`` label, never by its name, so a collision can at worst make a
    snapshot name "taken" (409) and the admin picks another tag.
    """
    if not isinstance(user, str) or not user:
        raise SnapshotError("Say whose session to snapshot (user).")
    if _SIMPLE_USER.match(user) and len(user) <= MAX_USER_COMPONENT:
        return user
    slug = re.sub(r"[^a-z0-9]+", "-", user.lower()).strip("-")[:40].strip("-") or "user"
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{slug}--{digest}"


def private_repository(repo: str, user: str) -> str:
    """The one repository where ``user``'s private images live: ``bai-private/alice``."""
    return f"{validate_repo(repo)}/{user_component(user)}"


def private_image_name(repo: str, user: str, tag: str) -> str:
    """``<repo>/<user component>:<tag>``, e.g. ``bai-private/alice:v1`` (the name users see; nodes
    pull it from the registry as ``<registry host>/bai-private/alice:v1``)."""
    name = private_repository(repo, user)
    if len(name) > MAX_REPOSITORY:
        raise SnapshotError("The image name would be longer than Docker allows; use a shorter private_image_repo.")
    return f"{name}:{validate_tag(tag)}"


def session_name(user: str, server: str) -> str:
    return f"{user}/{server}" if server else user


_PRIVATE_DISPLAY = " (private, from "


def private_display_name(tag: str, source_labels: Mapping[str, str], source_image: str) -> str:
    """What the spawn form shows: ``"<tag> (private, from scikit-learn 1.6)"``.

    A snapshot of a snapshot names the original kernel image, not a chain."""
    base = source_labels.get(L.DISPLAY_NAME) or ""
    if source_labels.get(L.KIND) == L.KIND_PRIVATE and _PRIVATE_DISPLAY in base and base.endswith(")"):
        base = base.split(_PRIVATE_DISPLAY, 1)[1][:-1]
    if not base:
        fw, ver = source_labels.get(L.FRAMEWORK, ""), source_labels.get(L.VERSION, "")
        base = f"{fw} {ver}".strip() or source_image
    return f"{tag}{_PRIVATE_DISPLAY}{base})"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def snapshot_labels(
    source_labels: Mapping[str, str],
    *,
    owner: str,
    source_image: str,
    session: str,
    tag: str,
    created: str | None = None,
    job: str = "",
) -> dict[str, str]:
    """The labels that make the new image a private catalog image of ``owner``.

    Framework, version and Python are carried over from the source image so
    the form groups the snapshot with its origin; the display name says
    it is private and what it came from. ``job``: the snapshot job that made it, by
    which a restart finds what an interrupted job left on its node."""
    out = {
        L.KIND: L.KIND_PRIVATE,
        L.OWNER: owner,
        L.SOURCE_IMAGE: source_image,
        L.SOURCE_SESSION: session,
        L.CREATED: created or now_iso(),
        L.DISPLAY_NAME: private_display_name(tag, source_labels, source_image),
    }
    for key in (L.FRAMEWORK, L.VERSION, L.PYTHON):
        if source_labels.get(key):
            out[key] = source_labels[key]
    if job:
        out[L.SNAPSHOT_JOB] = job
    return out


# Labels of the source kernel image that describe the recipe build, which the
# snapshot is not: blanked so no tool mistakes it for the recipe's image.
_RECIPE_ONLY = (L.NAME, L.RECIPE_HASH)
# The parts of the image config taken from the source image, never from the
# session's container (whose command, working dir etc. are the spawner's).
_FROM_IMAGE = ("Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "StopSignal",
               "Healthcheck", "Shell", "OnBuild")


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def commit_config(image_config: Mapping[str, Any] | None, container_config: Mapping[str, Any] | None,
                  new_labels: Mapping[str, str]) -> dict:
    """The ``conf`` for ``docker commit`` so the image config is the source
    image's, plus ``new_labels``, and nothing of the session's.

    Docker merges the container's config into the committed one for every key
    the given config lacks, and cannot delete a label or variable. So every
    label and environment variable the container has beyond its image (the
    spawner's ``org.bai-hub.user``/``request-id``/GPU labels, the session's
    ``JUPYTERHUB_API_TOKEN`` and GPU limits) is set to the empty string:
    no token or allocation of the old session lives on in the image, and the
    spawner sets all of them afresh for every new session."""
    image_config = dict(image_config or {})
    container_config = dict(container_config or {})
    image_labels = dict(image_config.get("Labels") or {})
    labels = {k: "" for k in (container_config.get("Labels") or {})}
    labels.update(image_labels)
    for k in _RECIPE_ONLY:
        if k in labels:
            labels[k] = ""
    labels.update(new_labels)
    image_env = list(image_config.get("Env") or [])
    have = {_env_key(e) for e in image_env}
    env = image_env + [f"{k}=" for k in dict.fromkeys(_env_key(e) for e in container_config.get("Env") or [])
                       if k not in have]
    conf: dict[str, Any] = {"Labels": labels, "Env": env}
    for key in _FROM_IMAGE:
        if image_config.get(key) is not None:
            conf[key] = image_config[key]
    return conf


def check_cap(user: str, owned: int, in_progress: int, cap: int) -> None:
    """Refuse (409) a snapshot that would give ``user`` more than ``cap`` private images."""
    if cap and owned + in_progress >= cap:
        making = f" and {in_progress} being made" if in_progress else ""
        raise SnapshotError(
            f"{user} already has {owned} private image(s){making}; the limit is {cap} "
            "(BaiScheduler.max_private_images_per_user). Delete one of them first.", 409)


def image_view(image: CatalogImage) -> dict:
    """One private image of the catalog as the API shows it (``ref``: the name users see)."""
    return {
        "ref": image.short_ref, "reference": image.ref, "tags": list(image.names), "id": image.id,
        "owner": image.owner, "source_image": image.source_image, "created": image.created, "size": image.size,
        "display_name": image.display_name, "framework": image.framework, "version": image.version,
        "python": image.python,
    }


# -- the Docker side of one snapshot (blocking: worker threads only) ------------------------------


def find_session_container(client, request_id: str, user: str, server: str) -> dict | None:
    """The running container of the session with scheduler admission ``request_id``."""
    for c in client.containers(filters={"label": f"{L.REQUEST_ID}={request_id}"}):
        lab = c.get("Labels") or {}
        if lab.get(L.USER) == user and lab.get(L.SERVER, "") == server and c.get("State") == "running":
            return c
    return None


def remove_quietly(client, image_id: str) -> None:
    """Remove an image we just made (used on failure paths)."""
    try:
        client.remove_image(image_id, force=True)
    except docker.errors.NotFound:
        pass
    except Exception as e:  # the engine may be gone; report, do not mask the first error
        log.error("Could not remove the temporary snapshot image %s: %s", image_id[:19], e)


def commit_blocking(
    client,
    container_id: str,
    ref: str,
    make_labels: Callable[[Mapping[str, str], str], dict],
    *,
    pause: bool = True,
    message: str = "",
    author: str = "",
    on_committed: Callable[[str], None] | None = None,
) -> dict:
    """Commit the container to a temporary untagged image, then tag it ``ref`` on the node.

    ``make_labels(source_image_labels, source_image_ref)`` gives the new labels;
    ``on_committed(image_id)`` is told the new image's id before it is tagged. Any failure after
    the commit removes the temporary image; the container is never stopped or changed (at most
    frozen during the commit when ``pause``). Whether ``ref`` is taken is the registry's to say
    (``Snapshots.submit``): a tag of that name on the node is a leftover and moves.
    Returns ``{"id", "size", "source_image"}``."""
    try:
        info = client.inspect_container(container_id)
    except docker.errors.NotFound:
        raise SnapshotError("The session's container is gone; nothing was made.", 409) from None
    if not (info.get("State") or {}).get("Running"):
        raise SnapshotError("The session's container is not running any more; nothing was made.", 409)
    container_config = info.get("Config") or {}
    container_labels = container_config.get("Labels") or {}
    source_image = container_labels.get(L.IMAGE) or container_config.get("Image") or info.get("Image", "")
    try:
        image_config = client.inspect_image(info["Image"]).get("Config") or {}
    except docker.errors.NotFound:
        image_config = {}
    new_labels = make_labels(image_config.get("Labels") or {}, source_image)
    conf = commit_config(image_config, container_config, new_labels)
    result = client.commit(container_id, conf=conf, pause=pause, message=message or None,
                           author=author or None)
    temp_id = result["Id"] if isinstance(result, dict) else str(result)
    try:
        if on_committed:
            on_committed(temp_id)
        repo, tag = split_name(ref)
        client.tag(temp_id, repo, tag, force=True)
        made = client.inspect_image(ref)
        if made.get("Id") != temp_id:
            raise SnapshotError(f"Tagging {ref} failed (the engine reports another image under that name).", 500)
    except BaseException:
        remove_quietly(client, temp_id)
        raise
    return {"id": temp_id, "size": int(made.get("Size") or 0), "source_image": source_image}


def push_blocking(client, ref: str, auth_config: dict | None, on_progress: Callable[[Transfer], None]) -> None:
    """Push ``ref`` from the node to the registry, telling ``on_progress`` as layers go.
    ``TransferFailed`` with the engine's reason when the push stops."""
    repo, tag = split_name(ref)
    progress = Transfer()
    for event in client.push(repo, tag, stream=True, decode=True, auth_config=auth_config):
        if progress.feed(event):
            on_progress(progress)


def discard_blocking(client, ref: str, image_id: str = "", job: str = "") -> bool:
    """Take back what a snapshot made on a node: the tag ``ref`` where it names ``image_id``, and
    the image itself; with ``job``, also any image that job committed (labelled with it) that no
    tag names. True when something was removed."""
    removed = False
    if image_id:
        try:
            if client.inspect_image(ref).get("Id") == image_id:
                client.remove_image(ref)
                removed = True
        except docker.errors.NotFound:
            pass
    ids = {image_id} if image_id else set()
    if job:
        ids |= {i["Id"] for i in client.images(all=True, filters={"label": f"{L.SNAPSHOT_JOB}={job}"})}
    for i in ids:
        try:
            if not [t for t in client.inspect_image(i).get("RepoTags") or [] if t != "<none>:<none>"]:
                client.remove_image(i)
                removed = True
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:  # a container still uses it; it stays, untagged
            log.warning("Snapshots: could not remove image %s: %s", i[:19], e.explanation or e)
    return removed


def remove_copy_blocking(client, ref: str) -> bool:
    """Remove a node's copy of a deleted private image (the tag; the image once no tag is left).
    False when the node has none; a copy a container still uses stays."""
    try:
        client.remove_image(ref)
        return True
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as e:
        log.warning("Snapshots: the copy of %s stays on a node: %s", ref, e.explanation or e)
        return False


# -- jobs ------------------------------------------------------------------------------------------


class Snapshots:
    """Snapshot jobs, and the private images in the registry.

    ``registry``: ``c.BaiRegistry``; ``catalog``: the service's ``CatalogCache`` (its ``client``
    deletes); ``jobs``: where jobs are kept (``JobStore``; None keeps them in memory only)."""

    def __init__(self, nodes: Iterable[Node], service, registry, catalog, *, jobs: JobStore | None = None,
                 repo: str = "bai-private", cap: int = 5, pause: bool = True,
                 client_factory: Callable[..., Any] | None = None, concurrency: int = 2,
                 commit_timeout: int = 3600, keep: int = 100):
        self.nodes = {n.name: n for n in nodes}
        self.service = service
        self.registry = registry
        self.catalog = catalog
        self.store = jobs
        self.repo = validate_repo(repo)
        self.cap = cap
        self.pause = pause
        self.client_factory = client_factory or engines.make_client
        self.commit_timeout = commit_timeout
        self.keep = keep
        self.jobs: dict[str, Job] = {j.id: j for j in (jobs.load() if jobs else [])}
        self._interrupted = self._mark_interrupted()
        self._reserved: dict[str, str] = {}  # ref → user, while a POST is being checked
        self._concurrency = concurrency
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

    def _client(self, node: Node, timeout: int = 60):
        return self.client_factory(node, timeout=timeout)

    def _save(self, job: Job) -> None:
        if self.store is None:
            return
        try:
            self.store.save(job)
        except JobStoreUnavailable as e:  # the job goes on; a restart would not know of this step
            log.error("Snapshot %s: could not record state %s: %s", job.id, job.state, e)

    # -- images ------------------------------------------------------------------------------------

    def _mine(self, image: CatalogImage) -> bool:
        return image.is_private and image.short_ref.startswith(self.repo + "/")

    async def images(self, owner: str | None = None, fresh: bool = False) -> tuple[list[dict], list[str]]:
        """This deployment's private images in the registry (``owner``: only theirs), and what
        could not be read."""
        try:
            found = await self.catalog.get(max_age=0 if fresh else None)
        except RegistryError as e:
            return [], [e.message]
        out = [image_view(c) for c in found if self._mine(c) and (owner is None or c.owner == owner)]
        out.sort(key=lambda v: (v["owner"] or "", v["created"], v["ref"]))
        return out, []

    def _in_use(self, image: CatalogImage) -> list[str]:
        """Sessions (running or queued) of this image."""
        return sorted(str(rec.key) for rec in self.service.records.values()
                      if rec.request.image in (image.ref, *image.tags) or rec.request.image == image.id)

    async def delete_image(self, ref: str) -> dict:
        """Delete a private image: its manifest in the registry, then the nodes' copies."""
        ref = (ref or "").strip()
        if not ref:
            raise SnapshotError("Say which image to delete.")
        name = self.registry.name_of(ref)
        if any(j.active and name == j.ref for j in self.jobs.values()) or name in self._reserved:
            raise SnapshotError(f"{name} is being made right now; wait until its snapshot is done.", 409)
        try:
            found = await self.catalog.get(max_age=0)
        except RegistryError as e:
            raise SnapshotError(e.message + " Nothing was deleted.", 503) from None
        image = next((c for c in found if name in c.names or ref == c.id), None)
        if image is None:
            raise SnapshotError(f"No image {name} in the registry.", 404)
        if not image.is_private:
            raise SnapshotError(f"{name} is not a private image ({image.kind}); only snapshots made from sessions are "
                                "deleted here. Kernel images are managed with bai-images.", 400)
        if not self._mine(image):
            raise SnapshotError(f"{name} is not in this hub's private repository {self.repo}/; nothing was deleted.",
                                400)
        users = self._in_use(image)
        if users:
            raise SnapshotError(f"{name} is still used by {', '.join(users)}; stop those sessions first.", 409)
        repo, tag = split_name(name)

        def forget():
            digest = self.catalog.client.digest(repo, tag)
            return digest is not None and self.catalog.client.delete(repo, digest)

        try:
            gone = await asyncio.to_thread(forget)
        except RegistryError as e:
            raise SnapshotError(e.message + " Nothing was deleted.", 503 if e.status == 503 else 502) from None
        finally:
            self.catalog.invalidate()
        if not gone:
            raise SnapshotError(f"No image {name} in the registry.", 404)
        reference = self.registry.reference(name)
        results = await asyncio.gather(*(asyncio.to_thread(lambda n=n: remove_copy_blocking(self._client(n), reference))
                                         for n in self.nodes.values()), return_exceptions=True)
        nodes = [n for n, removed in zip(self.nodes, results) if removed is True]
        log.info("Snapshots: deleted private image %s from the registry (copies removed on %s)", name,
                 ", ".join(nodes) or "no node")
        return {"deleted": name, "nodes": nodes}

    # -- jobs --------------------------------------------------------------------------------------

    def sessions(self) -> list[dict]:
        """Running sessions the panel may snapshot."""
        now = time.time()
        out = []
        for rec in self.service.running():
            admitted = rec.admitted_at or rec.submitted_at
            out.append({
                "user": rec.key.user, "server": rec.key.server,
                "session": session_name(rec.key.user, rec.key.server),
                "image": self.registry.name_of(rec.request.image), "node": rec.placement.node if rec.placement else "",
                "fgpu": str(self.service.units.to_fgpu(rec.request.quanta)),
                "started_at": admitted, "age_s": max(0, int(now - admitted)) if admitted else None,
            })
        out.sort(key=lambda s: (s["user"], s["server"]))
        return out

    def active_for(self, user: str) -> int:
        return sum(1 for j in self.jobs.values() if j.active and j.user == user) + \
            sum(1 for u in self._reserved.values() if u == user)

    async def submit(self, user: Any, server: Any, tag: Any, requested_by: str = "") -> Job:
        """Check everything, then start the commit in the background. Raises
        ``SnapshotError`` (nothing started) when any check fails."""
        if not isinstance(user, str) or not user:
            raise SnapshotError("Say whose session to snapshot (user).")
        if not isinstance(server, str):
            raise SnapshotError("server must be a string ('' for the default server).")
        tag = validate_tag(tag)
        session = session_name(user, server)
        rec = self.service.get(RequestKey(user, server))
        if rec is None:
            raise SnapshotError(f"{session} has no session: only a running session can be snapshotted.", 404)
        if rec.state != "RUNNING" or rec.placement is None:
            raise SnapshotError(f"{session} is {rec.state.lower()}, not running: only a running session "
                                "can be snapshotted.", 400)
        node = self.nodes.get(rec.placement.node)
        if node is None:
            raise SnapshotError(f"{session} runs on node {rec.placement.node!r}, which is not configured.", 400)
        ref = private_image_name(self.repo, user, tag)
        if ref in self._reserved or any(j.active and j.ref == ref for j in self.jobs.values()):
            raise SnapshotError(f"{ref} is being made already.", 409)
        self._reserved[ref] = user
        try:
            try:
                container = await asyncio.to_thread(
                    lambda: find_session_container(self._client(node), rec.id, user, server))
            except docker.errors.DockerException as e:
                raise SnapshotError(f"The Docker engine of node {node.name} does not answer ({e.__class__.__name__}); "
                                    "nothing was made.", 503) from None
            if container is None:
                raise SnapshotError(f"The container of {session} is not running (it may be starting or "
                                    "stopping); nothing was made.", 400)
            images, errors = await self.images(fresh=True)
            if errors:
                raise SnapshotError("Cannot check the registry's images: " + "; ".join(errors), 503)
            for v in images:
                if ref in v["tags"]:
                    raise SnapshotError(f"{ref} exists already (made {v['created']}). "
                                        "Pick another tag, or delete that image first.", 409)
            owned = sum(1 for v in images if v["owner"] == user)
            others_in_progress = self.active_for(user) - 1  # minus this request's own reservation
            check_cap(user, owned, others_in_progress, self.cap)
            job = Job(id=uuid.uuid4().hex[:12], user=user, server=server, tag=tag, ref=ref,
                      reference=self.registry.reference(ref), node=node.name, container=container["Id"],
                      requested_by=requested_by,
                      source_image=self.registry.name_of((container.get("Labels") or {}).get(L.IMAGE)
                                                         or rec.request.image))
            try:
                if self.store is not None:
                    self.store.save(job)
            except JobStoreUnavailable as e:
                raise SnapshotError(f"The scheduler's database is unavailable ({e}); nothing was made.", 503) from None
            self.jobs[job.id] = job
        finally:
            self._reserved.pop(ref, None)
        self._prune()
        task = asyncio.ensure_future(self._run(job, node))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("Snapshot %s: %s → %s on node %s (by %s)", job.id, session, job.reference, node.name, requested_by)
        return job

    def _prune(self) -> None:
        done = [j for j in sorted(self.jobs.values(), key=lambda j: j.created_at) if not j.active]
        old = [j.id for j in done[:max(0, len(done) - self.keep)]]
        for i in old:
            del self.jobs[i]
        if self.store is not None:
            try:
                self.store.forget(old)
            except JobStoreUnavailable as e:
                log.warning("Snapshots: could not forget old jobs: %s", e)

    def _state(self, job: Job, state: str, reason: str = "") -> None:
        job.state, job.reason = state, reason
        if state in ("done", "failed"):
            job.finished_at = time.time()
            job.progress = ""
        self._save(job)

    async def _run(self, job: Job, node: Node) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._concurrency)
        loop = asyncio.get_running_loop()
        async with self._sem:
            job.started_at = time.time()
            self._state(job, "committing")
            session = session_name(job.user, job.server)

            def labels_for(source_labels, source_image):
                return snapshot_labels(source_labels, owner=job.user, source_image=self.registry.name_of(source_image),
                                       session=session, tag=job.tag, job=job.id)

            def committed(image_id):
                job.image_id = image_id
                loop.call_soon_threadsafe(self._save, job)

            def show(progress: Transfer):
                job.progress = progress.describe_push()

            client = None
            try:
                client = await asyncio.to_thread(self._client, node, self.commit_timeout)
                result = await asyncio.to_thread(
                    commit_blocking, client, job.container, job.reference, labels_for, pause=self.pause,
                    message=f"BAI Hub snapshot of {session}", on_committed=committed,
                    author=f"{job.requested_by or 'admin'} via bai-scheduler")
                job.image_id, job.size = result["id"], result["size"]
                job.source_image = self.registry.name_of(result["source_image"]) or job.source_image
                self._state(job, "pushing")
                await asyncio.to_thread(push_blocking, client, job.reference, self.registry.auth_config(), show)
                pushed = await asyncio.to_thread(self.catalog.client.image, *split_name(job.ref))
                if pushed is None or pushed.config != job.image_id:
                    raise TransferFailed("the registry does not list the image after the push")
            except SnapshotError as e:
                self._state(job, "failed", e.message)
            except (TransferFailed, RegistryError) as e:
                why = e.message if isinstance(e, RegistryError) else str(e)
                self._state(job, "failed", f"Pushing {job.ref} to the registry failed: {why}."
                                           + await self._take_back(job, client))
            except docker.errors.APIError as e:
                self._state(job, "failed", f"The Docker engine of node {node.name} refused: {e.explanation or e}."
                                           + await self._take_back(job, client))
            except Exception as e:  # engine unreachable, timeouts …
                self._state(job, "failed", f"The snapshot failed ({e.__class__.__name__}: {e})."
                                           + await self._take_back(job, client))
            else:
                self.catalog.invalidate()
                self._state(job, "done")
            (log.info if job.state == "done" else log.warning)(
                "Snapshot %s %s: %s%s", job.id, job.state, job.reference, f" ({job.reason})" if job.reason else "")

    async def _take_back(self, job: Job, client) -> str:
        """Remove what ``job`` made on its node (its tag and image), so no name is left half-made;
        what the failure's reason adds."""
        try:
            if client is None:
                client = await asyncio.to_thread(self._client, self.nodes[job.node])
            await asyncio.to_thread(discard_blocking, client, job.reference, job.image_id, job.id)
            return " Nothing was kept."
        except Exception as e:  # the engine is gone
            log.error("Snapshot %s: could not remove what it made on %s: %s", job.id, job.node, e)
            return (f" What it had made on {job.node} could not be removed ({e.__class__.__name__}); remove the "
                    f"images labelled {L.SNAPSHOT_JOB}={job.id} there.")

    def _mark_interrupted(self) -> list[Job]:
        """At start: every job still queued, committing or pushing was cut short by a restart.
        Each is failed at once, so every job shows its final state; ``recover`` then removes what
        they made."""
        cut = [j for j in self.jobs.values() if j.active]
        for job in cut:
            self._state(job, "failed", f"The scheduler service restarted while this snapshot was {job.state}. "
                                       "Snapshot the session again.")
            log.warning("Snapshot %s (%s) was interrupted by a restart", job.id, job.ref)
        return cut

    async def recover(self) -> None:
        """Remove what the jobs a restart interrupted had made: on their node, and in the registry
        an image the push had finished (it is the job's own: its config is the job's commit)."""
        for job in self._interrupted:
            try:
                pushed = await asyncio.to_thread(self.catalog.client.image, *split_name(job.ref))
                if pushed is not None and job.image_id and pushed.config == job.image_id:
                    await asyncio.to_thread(self.catalog.client.delete, pushed.repository, pushed.digest)
                    self.catalog.invalidate()
                registry = ""
            except RegistryError as e:
                registry = f" The registry could not be checked for a pushed copy ({e.message})"
            self._state(job, "failed", job.reason + await self._take_back(job, None) + registry)
        self._interrupted = []

    async def wait_idle(self) -> None:
        """Until every running job has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

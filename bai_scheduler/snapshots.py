"""Session snapshots: turn a running session into a private image its owner can launch.

The workflow: a user prepares a session (``pip install X`` into the image's
kernel environment ``/opt/bai/kernel``), asks an admin, and the admin snapshots it from
the panel (``{prefix}admin/snapshots``) or the REST API.  The result is a
``docker commit`` of the session's container on the node it runs on, named
``<private_image_repo>/<user>:<tag>`` and labelled ``kind=private`` with its
``owner``, so the catalog (``bai_scheduler.contract.catalog``) offers it to that user only
and refuses it to everyone else, whether chosen in the form, typed by name or
asked for through the REST API.

What is NOT captured: the user's home folder ``/home/jovyan``.  It is a Docker
volume mounted into every session of that user, not part of the container's
filesystem; it stays the user's and is mounted again into sessions of the new
image.  Packages installed with ``pip install --user`` land there too, so they
are not in the image: install with a plain ``pip install``.

Layout of this module:

* pure functions (naming, tag validation, labels, the commit config, the cap)
  with plain-function tests in ``tests/test_snapshot_logic.py``;
* ``commit_blocking``: the Docker calls of one snapshot, run in a worker thread;
* ``Snapshots``: the jobs (queued → committing → done | failed) kept in memory.

The REST API and the admin page are in ``bai_scheduler/web/snapshots.py``.

Pausing: a commit freezes the session's processes (``docker commit``'s default,
``BaiScheduler.snapshot_pause``) so the image is a consistent copy of the
filesystem: a ``pip install`` running at that moment is captured either before
or after each file write, never with a file half-written.  The container stays
running (only frozen for the seconds or minutes the commit takes) and resumes
exactly where it was; its kernels, terminals and open connections survive.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import logging
import re
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import docker

from . import engines
from .contract import catalog
from .contract import labels as L
from .core.model import Node, RequestKey

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


def private_image_name(repo: str, user: str, tag: str) -> str:
    """``<repo>/<user component>:<tag>``, e.g. ``bai-private/alice:v1``."""
    name = f"{validate_repo(repo)}/{user_component(user)}"
    if len(name) > MAX_REPOSITORY:
        raise SnapshotError("The image name would be longer than Docker allows; use a shorter private_image_repo.")
    return f"{name}:{validate_tag(tag)}"


def split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` → ``(repo, tag)`` (a ``:`` in a registry port is not a tag)."""
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


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
) -> dict[str, str]:
    """The labels that make the new image a private catalog image of ``owner``.

    Framework, version and Python are carried over from the source image so
    the form groups the snapshot with its origin; the display name says
    it is private and what it came from."""
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


def image_view(image: Mapping[str, Any], node: str) -> dict | None:
    """One private image (docker ``images()`` dict) as the API shows it."""
    c = catalog.to_catalog_image(image)
    if c is None or not c.is_private:
        return None
    lab = catalog._labels(image)
    return {
        "ref": c.ref, "tags": list(c.tags), "id": c.id, "owner": c.owner,
        "source_image": c.source_image, "source_session": lab.get(L.SOURCE_SESSION) or None,
        "created": c.created, "size": c.size, "display_name": c.display_name,
        "framework": c.framework, "version": c.version, "python": c.python, "nodes": [node],
    }


def merge_image_views(per_node: Iterable[dict]) -> list[dict]:
    """The same image found on several nodes → one entry listing the nodes."""
    by_id: dict[str, dict] = {}
    for v in per_node:
        have = by_id.get(v["id"])
        if have is None:
            by_id[v["id"]] = dict(v, nodes=list(v["nodes"]))
        else:
            have["nodes"] += [n for n in v["nodes"] if n not in have["nodes"]]
            have["tags"] += [t for t in v["tags"] if t not in have["tags"]]
    return sorted(by_id.values(), key=lambda v: (v["owner"] or "", v["created"], v["ref"]))


# -- the Docker side of one snapshot (blocking: worker threads only) ------------------------------


def find_session_container(client, request_id: str, user: str, server: str) -> dict | None:
    """The running container of the session with scheduler admission ``request_id``."""
    for c in client.containers(filters={"label": f"{L.REQUEST_ID}={request_id}"}):
        lab = c.get("Labels") or {}
        if lab.get(L.USER) == user and lab.get(L.SERVER, "") == server and c.get("State") == "running":
            return c
    return None


def image_exists(client, ref: str) -> bool:
    try:
        client.inspect_image(ref)
        return True
    except docker.errors.NotFound:  # ImageNotFound included
        return False


def remove_quietly(client, image_id: str) -> None:
    """Remove an untagged image we just made (used on failure paths)."""
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
    on_committing: Callable[[], None] | None = None,
) -> dict:
    """Commit the container to a temporary untagged image, then tag it ``ref``.

    ``make_labels(source_image_labels, source_image_ref)`` gives the new
    labels. Any failure after the commit removes the temporary image, so no
    half-made image ever carries the final name; the container is never
    stopped or changed (at most frozen during the commit when ``pause``).
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
    if on_committing:
        on_committing()
    result = client.commit(container_id, conf=conf, pause=pause, message=message or None,
                           author=author or None)
    temp_id = result["Id"] if isinstance(result, dict) else str(result)
    try:
        if image_exists(client, ref):
            raise SnapshotError(f"{ref} was made by someone else while this commit ran; "
                                "nothing was tagged. Pick another tag.", 409)
        repo, tag = split_ref(ref)
        client.tag(temp_id, repo, tag)
        made = client.inspect_image(ref)
        if made.get("Id") != temp_id:
            raise SnapshotError(f"Tagging {ref} failed (the engine reports another image under that name).", 500)
    except BaseException:
        remove_quietly(client, temp_id)
        raise
    return {"id": temp_id, "size": int(made.get("Size") or 0), "source_image": source_image}


def list_private_blocking(client) -> list[dict]:
    return client.images(filters={"label": f"{L.KIND}={L.KIND_PRIVATE}"})


def delete_blocking(client, ref: str) -> bool:
    """Delete private image ``ref`` on one engine; False when it is not there.

    Refuses (400) images that are not private snapshots, and (409) one that a
    container (a running session) still uses."""
    try:
        info = client.inspect_image(ref)
    except docker.errors.NotFound:
        return False
    lab = (info.get("Config") or {}).get("Labels") or {}
    if lab.get(L.KIND) != L.KIND_PRIVATE:
        kind = lab.get(L.KIND) or "not a BAI image"
        raise SnapshotError(f"{ref} is not a private image ({kind}); only snapshots made from sessions are "
                            "deleted here. Kernel images are managed with bai-images.", 400)
    users = [c for c in client.containers(all=True, filters={"ancestor": info["Id"]})]
    if users:
        who = sorted({session_name((c.get("Labels") or {}).get(L.USER, "?"), (c.get("Labels") or {}).get(L.SERVER, ""))
                      if (c.get("Labels") or {}).get(L.USER) else (c.get("Names") or ["?"])[0].lstrip("/")
                      for c in users})
        raise SnapshotError(f"{ref} is still used by {', '.join(who)}; stop those sessions first.", 409)
    try:
        client.remove_image(ref)
    except docker.errors.APIError as e:
        if e.status_code == 409:
            raise SnapshotError(f"The engine will not delete {ref}: {e.explanation}", 409) from None
        raise
    return True


# -- jobs ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    id: str
    user: str
    server: str
    tag: str
    ref: str
    node: str
    container: str
    requested_by: str
    state: str = "queued"           # queued → committing → done | failed
    reason: str = ""
    image_id: str = ""
    size: int = 0
    source_image: str = ""
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "committing")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["session"] = session_name(self.user, self.server)
        out["container"] = self.container[:12]
        return out


class Snapshots:
    """Snapshot jobs and private images across the scheduler's nodes.

    Jobs live in memory (the last ``keep`` finished ones are kept): a job is
    a short-lived action whose result, the image, lives on the engine."""

    def __init__(self, nodes: Iterable[Node], service, *, repo: str = "bai-private", cap: int = 5,
                 pause: bool = True, client_factory: Callable[..., Any] | None = None,
                 concurrency: int = 2, commit_timeout: int = 3600, keep: int = 100):
        self.nodes = {n.name: n for n in nodes}
        self.service = service
        self.repo = validate_repo(repo)
        self.cap = cap
        self.pause = pause
        self.client_factory = client_factory or engines.make_client
        self.commit_timeout = commit_timeout
        self.keep = keep
        self.jobs: dict[str, Job] = {}
        self._reserved: dict[str, str] = {}  # ref → user, while a POST is being checked
        self._concurrency = concurrency
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

    def _client(self, node: Node, timeout: int = 60):
        return self.client_factory(node, timeout=timeout)

    # -- images ------------------------------------------------------------------------------------

    async def images(self, owner: str | None = None) -> tuple[list[dict], list[str]]:
        """Private images on all nodes (``owner``: only theirs), and per-node errors."""

        def one(node: Node):
            return [v for v in (image_view(i, node.name) for i in list_private_blocking(self._client(node)))
                    if v is not None]

        results = await asyncio.gather(*(asyncio.to_thread(one, n) for n in self.nodes.values()),
                                       return_exceptions=True)
        views, errors = [], []
        for node, res in zip(self.nodes.values(), results):
            if isinstance(res, BaseException):
                errors.append(f"Node {node.name}: cannot list images ({res.__class__.__name__}: {res})")
                log.warning("Snapshots: cannot list images on node %s: %s", node.name, res)
            else:
                views += res
        # Only this deployment's repository: another hub sharing the engine has its own.
        out = [v for v in merge_image_views(views) if v["ref"].startswith(self.repo + "/")]
        if owner is not None:
            out = [v for v in out if v["owner"] == owner]
        return out, errors

    async def delete_image(self, ref: str) -> dict:
        ref = (ref or "").strip()
        if not ref:
            raise SnapshotError("Say which image to delete.")
        if any(j.active and ref in (j.ref, j.image_id) for j in self.jobs.values()) or ref in self._reserved:
            raise SnapshotError(f"{ref} is being made right now; wait until its snapshot is done.", 409)
        deleted = []
        for node in self.nodes.values():
            try:
                gone = await asyncio.to_thread(lambda n=node: delete_blocking(self._client(n), ref))
            except docker.errors.APIError as e:
                if e.status_code == 400:
                    raise SnapshotError(f"{ref!r} is not a valid image name.", 400) from None
                raise SnapshotError(f"The Docker engine of node {node.name} refused: {e.explanation or e}", 502) from None
            except (docker.errors.DockerException, OSError) as e:
                raise SnapshotError(f"The Docker engine of node {node.name} does not answer ({e.__class__.__name__}); "
                                    f"nothing was deleted there.", 503) from None
            if gone:
                deleted.append(node.name)
        if not deleted:
            raise SnapshotError(f"No image {ref} on any node.", 404)
        log.info("Snapshots: deleted private image %s on %s", ref, ", ".join(deleted))
        return {"deleted": ref, "nodes": deleted}

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
                "image": rec.request.image, "node": rec.placement.node if rec.placement else "",
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
            images, errors = await self.images()
            if errors:
                raise SnapshotError("Cannot check existing images: " + "; ".join(errors), 503)
            for v in images:
                if ref in v["tags"]:
                    raise SnapshotError(f"{ref} exists already (made {v['created']} from {v['source_session'] or '?'}). "
                                        "Pick another tag, or delete that image first.", 409)
            owned = sum(1 for v in images if v["owner"] == user)
            others_in_progress = self.active_for(user) - 1  # minus this request's own reservation
            check_cap(user, owned, others_in_progress, self.cap)
            job = Job(id=uuid.uuid4().hex[:12], user=user, server=server, tag=tag, ref=ref, node=node.name,
                      container=container["Id"], requested_by=requested_by,
                      source_image=(container.get("Labels") or {}).get(L.IMAGE) or rec.request.image)
            self.jobs[job.id] = job
        finally:
            self._reserved.pop(ref, None)
        self._prune()
        task = asyncio.ensure_future(self._run(job, node))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("Snapshot %s: %s → %s on node %s (by %s)", job.id, session, ref, node.name, requested_by)
        return job

    def _prune(self) -> None:
        done = [j for j in self.jobs.values() if not j.active]
        for j in done[:max(0, len(done) - self.keep)]:
            del self.jobs[j.id]

    async def _run(self, job: Job, node: Node) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._concurrency)
        async with self._sem:
            job.state = "committing"
            job.started_at = time.time()
            session = session_name(job.user, job.server)

            def labels_for(source_labels, source_image):
                return snapshot_labels(source_labels, owner=job.user, source_image=source_image,
                                       session=session, tag=job.tag)

            def work():
                client = self._client(node, timeout=self.commit_timeout)
                return commit_blocking(
                    client, job.container, job.ref, labels_for, pause=self.pause,
                    message=f"BAI Hub snapshot of {session}",
                    author=f"{job.requested_by or 'admin'} via bai-scheduler",
                )

            try:
                result = await asyncio.to_thread(work)
            except SnapshotError as e:
                job.state, job.reason = "failed", e.message
            except docker.errors.APIError as e:
                job.state = "failed"
                job.reason = f"The Docker engine refused the commit: {e.explanation or e}. Nothing was tagged."
            except Exception as e:  # engine unreachable, timeouts …
                job.state = "failed"
                job.reason = f"The commit failed ({e.__class__.__name__}: {e}). Nothing was tagged."
            else:
                job.state = "done"
                job.image_id, job.size = result["id"], result["size"]
                job.source_image = result["source_image"] or job.source_image
            job.finished_at = time.time()
            (log.info if job.state == "done" else log.warning)(
                "Snapshot %s %s: %s%s", job.id, job.state, job.ref, f" ({job.reason})" if job.reason else "")

    async def wait_idle(self) -> None:
        """Until every running job has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

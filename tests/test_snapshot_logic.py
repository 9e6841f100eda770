"""Snapshot logic without Docker: naming, tags, labels, the commit config, the
cap, and the job runner against a fake engine and registry (including failures mid-commit,
mid-push, and a restart in the middle of a job, with the jobs in a real SQLite database)."""
import asyncio
import re
import threading
import time

import docker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from bai_scheduler import snapshots as S
from bai_scheduler.core.model import Node, Placement, Request, RequestKey
from bai_scheduler.store import Record
from bai_scheduler.core.units import FgpuUnits
from bai_scheduler.contract import catalog
from bai_scheduler.contract import labels as L
from bai_scheduler.contract.registry import RegistryError, RegistryImage, split_name
from bai_scheduler.snapshot_jobs import JobStore

# Docker's reference grammar for one path component and for a tag.
COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# -- tags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["v1", "1", "_x", "with-xgboost", "A.b_c-D", "x" * 128])
def test_valid_tags_pass_unchanged(tag):
    assert S.validate_tag(tag) == tag


@pytest.mark.parametrize("tag, says", [
    ("", "give the new image a tag"),
    (None, "give the new image a tag"),
    (3, "give the new image a tag"),
    ("x" * 129, "at most 128"),
    (".hidden", "starts with '.'"),
    ("-rf", "starts with '-'"),
    ("has space", "' '"),
    ("a/b", "'/'"),
    ("a:b", "':'"),
    ("naïve", "'ï'"),
    ("<script>", "'<'"),
])
def test_invalid_tags_are_refused_with_a_clear_message(tag, says):
    with pytest.raises(S.SnapshotError) as e:
        S.validate_tag(tag)
    assert e.value.status == 400
    assert says.lower() in e.value.message.lower()


@settings(max_examples=300)
@given(st.text(min_size=0, max_size=140))
def test_a_tag_is_accepted_exactly_when_docker_would(tag):
    ok = bool(TAG.match(tag)) and "\n" not in tag
    try:
        S.validate_tag(tag)
        accepted = True
    except S.SnapshotError:
        accepted = False
    assert accepted == ok


# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "bob2", "jane.doe", "a-b", "x_y", "u" * 64])
def test_simple_user_names_are_used_as_they_are(user):
    assert S.user_component(user) == user


@pytest.mark.parametrize("user", ["Alice", "jane@example.org", "a--b", "-lead", "trail-", "ü", "a b",
                                  "a__b", "u" * 65, "日本"])
def test_other_user_names_are_escaped_into_a_valid_component(user):
    comp = S.user_component(user)
    assert COMPONENT.match(comp), comp
    assert "--" in comp and comp != user
    assert comp == S.user_component(user)  # stable


def test_escaped_names_stay_readable():
    assert S.user_component("Jane.Doe@X").startswith("jane-doe-x--")


@settings(max_examples=400)
@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_user_components_are_valid_and_distinct_names_never_collide(a, b):
    ca, cb = S.user_component(a), S.user_component(b)
    assert COMPONENT.match(ca) and len(ca) <= 64 + 12
    if a != b:
        assert ca != cb


def test_private_image_name_scheme_and_configurable_repo():
    assert S.private_image_name("bai-private", "alice", "v1") == "bai-private/alice:v1"
    assert S.private_image_name("bai-test-ab12cd-private", "bob", "x") == "bai-test-ab12cd-private/bob:x"
    assert S.private_image_name("registry.local:5000/bai-private", "c", "t") == "registry.local:5000/bai-private/c:t"
    with pytest.raises(S.SnapshotError):
        S.private_image_name("bai-private", "alice", "bad tag")


@pytest.mark.parametrize("repo", ["", "Bai-Private", "bai-private/", "/x", "a//b", "bai private", "a:b/c:d"])
def test_invalid_repo_prefix_is_a_config_error(repo):
    with pytest.raises(ValueError):
        S.validate_repo(repo)


def test_split_name():
    assert split_name("bai-private/alice:v1") == ("bai-private/alice", "v1")
    assert split_name("host:5000/bai-private/alice:v1") == ("host:5000/bai-private/alice", "v1")
    assert split_name("host:5000/x") == ("host:5000/x", "latest")


# -- labels and the commit config ---------------------------------------------------------------------


KERNEL_LABELS = {
    L.KIND: L.KIND_KERNEL, L.NAME: "sklearn-1.6", L.FRAMEWORK: "scikit-learn", L.VERSION: "1.6.1",
    L.DISPLAY_NAME: "scikit-learn 1.6", L.PYTHON: "3.11", L.RECIPE_HASH: "abc123",
}


def test_snapshot_labels_make_a_private_image_the_catalog_understands():
    lab = S.snapshot_labels(KERNEL_LABELS, owner="alice", source_image="bai/sklearn:1.6.1",
                            session="alice/work", tag="v1", created="2025-01-02T03:04:05+00:00")
    assert lab == {
        L.KIND: L.KIND_PRIVATE, L.OWNER: "alice", L.SOURCE_IMAGE: "bai/sklearn:1.6.1",
        L.SOURCE_SESSION: "alice/work", L.CREATED: "2025-01-02T03:04:05+00:00",
        L.DISPLAY_NAME: "v1 (private, from scikit-learn 1.6)",
        L.FRAMEWORK: "scikit-learn", L.VERSION: "1.6.1", L.PYTHON: "3.11",
    }
    image = {"Id": "sha256:" + "1" * 64, "RepoTags": ["bai-private/alice:v1"], "Labels": lab, "Size": 10}
    cat = catalog.build_catalog([image])
    assert [c.ref for c in catalog.visible_to(cat, "alice")] == ["bai-private/alice:v1"]
    assert catalog.visible_to(cat, "bob") == []
    with pytest.raises(catalog.ImageNotAllowed):
        catalog.resolve_image(cat, "bob", "bai-private/alice:v1")
    assert catalog.resolve_image(cat, "alice", "bai-private/alice:v1").owner == "alice"


def test_created_defaults_to_now_in_iso_utc():
    lab = S.snapshot_labels({}, owner="a", source_image="img", session="a", tag="t")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", lab[L.CREATED])
    assert lab[L.DISPLAY_NAME] == "t (private, from img)"


def test_snapshot_of_a_snapshot_names_the_original_image_not_a_chain():
    first = S.snapshot_labels(KERNEL_LABELS, owner="a", source_image="bai/sklearn:1.6.1", session="a", tag="v1")
    second = S.snapshot_labels(first, owner="a", source_image="bai-private/a:v1", session="a/x", tag="v2")
    assert second[L.DISPLAY_NAME] == "v2 (private, from scikit-learn 1.6)"
    assert second[L.SOURCE_IMAGE] == "bai-private/a:v1"
    assert second[L.FRAMEWORK] == "scikit-learn"


def test_commit_config_keeps_the_image_config_and_blanks_everything_of_the_session():
    image_cfg = {
        "Labels": dict(KERNEL_LABELS, **{"org.opencontainers.image.title": "x"}),
        "Env": ["PATH=/opt/bai/kernel/bin:/usr/bin:/opt/bai/server/bin", "LANG=C.UTF-8"],
        "Cmd": ["jupyterhub-singleuser"], "Entrypoint": ["tini", "--"], "WorkingDir": "/home/jovyan",
        "User": "1000:100",
    }
    container_cfg = {
        "Labels": dict(KERNEL_LABELS, **{L.USER: "alice", L.SERVER: "w", L.REQUEST_ID: "r1", L.DEVICES: "GPU-1",
                                         "org.opencontainers.image.title": "x"}),
        "Env": ["PATH=/bin", "JUPYTERHUB_API_TOKEN=secret", "CUDA_DEVICE_MEMORY_LIMIT_0=4096m", "LANG=C.UTF-8"],
        "Cmd": ["jupyterhub-singleuser", "--port=8888"], "WorkingDir": "/somewhere", "User": "root",
    }
    new = S.snapshot_labels(KERNEL_LABELS, owner="alice", source_image="bai/sklearn:1.6.1", session="alice/w", tag="v1")
    conf = S.commit_config(image_cfg, container_cfg, new)
    lab = conf["Labels"]
    for k in (L.USER, L.SERVER, L.REQUEST_ID, L.DEVICES, L.NAME, L.RECIPE_HASH):
        assert lab[k] == "", k
    assert lab["org.opencontainers.image.title"] == "x"
    for k, v in new.items():
        assert lab[k] == v
    assert conf["Env"] == ["PATH=/opt/bai/kernel/bin:/usr/bin:/opt/bai/server/bin", "LANG=C.UTF-8", "JUPYTERHUB_API_TOKEN=",
                           "CUDA_DEVICE_MEMORY_LIMIT_0="]
    assert not any("secret" in e for e in conf["Env"])
    assert conf["Cmd"] == ["jupyterhub-singleuser"] and conf["Entrypoint"] == ["tini", "--"]
    assert conf["WorkingDir"] == "/home/jovyan" and conf["User"] == "1000:100"


def test_commit_config_without_image_config():
    conf = S.commit_config(None, {"Labels": {"a": "1"}, "Env": ["X=1"]}, {L.KIND: L.KIND_PRIVATE})
    assert conf == {"Labels": {"a": "", L.KIND: L.KIND_PRIVATE}, "Env": ["X="]}


# -- the cap ------------------------------------------------------------------------------------------


def test_cap():
    S.check_cap("a", 4, 0, 5)
    S.check_cap("a", 100, 100, 0)  # 0 = no limit
    with pytest.raises(S.SnapshotError) as e:
        S.check_cap("a", 5, 0, 5)
    assert e.value.status == 409 and "limit is 5" in e.value.message and "Delete one" in e.value.message
    with pytest.raises(S.SnapshotError) as e:
        S.check_cap("a", 3, 2, 5)
    assert "2 being made" in e.value.message


# -- image views ----------------------------------------------------------------------------------------


def test_image_view_shows_the_name_users_see():
    lab = S.snapshot_labels(KERNEL_LABELS, owner="alice", source_image="bai/sklearn:1.6.1", session="alice/w",
                            tag="t", created="2025-01-01T00:00:00+00:00")
    (image,) = catalog.catalog_from_registry([RegistryImage("p/alice", "t", "sha256:m", "sha256:a",
                                                            (("sha256:l", 2**30),), lab)], "reg:5000")
    view = S.image_view(image)
    assert (view["ref"], view["reference"], view["tags"]) == ("p/alice:t", "reg:5000/p/alice:t", ["p/alice:t"])
    assert view["source_image"] == "bai/sklearn:1.6.1" and view["size"] == 2**30 and view["owner"] == "alice"


# -- a fake engine and registry ----------------------------------------------------------------------------


class FakeRegistry:
    """Just enough of the registry for the manager: its configuration (names), the service's
    catalog cache over it, and its client; it holds what FakeEngine pushes."""

    host = "reg:5000"

    def __init__(self):
        self.images = {}  # "repo:tag" -> (config digest, labels)
        self.down = False
        self.deleted = []
        self.client = self

    # c.BaiRegistry
    def reference(self, name):
        return name if name.startswith(self.host + "/") else f"{self.host}/{name}"

    def name_of(self, ref):
        return ref[len(self.host) + 1:] if ref.startswith(self.host + "/") else ref

    def auth_config(self):
        return None

    # the catalog cache
    async def get(self, max_age=None):
        if self.down:
            raise RegistryError("The image registry at http://reg:5000 does not answer (ConnectionError).", 503)
        return catalog.catalog_from_registry([self.image(*split_name(n)) for n in self.images], self.host)

    def invalidate(self):
        pass

    # the client
    def image(self, repo, tag):
        if self.down:
            raise RegistryError("The image registry at http://reg:5000 does not answer (ConnectionError).", 503)
        found = self.images.get(f"{repo}:{tag}")
        if found is None:
            return None
        return RegistryImage(repo, tag, "sha256:m-" + found[0][7:], found[0], (("sha256:l", 100),), found[1])

    def digest(self, repo, tag):
        found = self.image(repo, tag)
        return found.digest if found else None

    def delete(self, repo, digest):
        gone = [n for n in self.images if split_name(n)[0] == repo and "sha256:m-" + self.images[n][0][7:] == digest]
        for n in gone:
            del self.images[n]
            self.deleted.append(n)
        return bool(gone)


class FakeEngine:
    """Just enough of docker.APIClient for snapshots.py, with failure switches."""

    def __init__(self, registry=None):
        self.registry = registry
        self.images_by_id = {}
        self.tags = {}  # ref → id
        self.containers_ = {}
        self.fail_commit = None
        self.fail_tag = None
        self.fail_push = None
        self.push_gate = None  # a threading.Event the push waits for
        self.commit_delay = 0.0
        self.calls = []
        self.paused_commits = []
        n = KERNEL_LABELS
        self.add_image("sha256:kernel", "reg:5000/bai/sklearn:1.6.1", {"Labels": n, "Env": ["PATH=/p"], "Cmd": ["c"]})

    def add_image(self, id_, tag, config, size=100):
        self.images_by_id[id_] = {"Id": id_, "Config": config, "Size": size, "Created": 0}
        if tag:
            self.tags[tag] = id_

    def add_session(self, cid, user, server, request_id, running=True):
        self.containers_[cid] = {
            "Id": cid, "Image": "sha256:kernel", "State": {"Running": running},
            "Config": {"Image": "reg:5000/bai/sklearn:1.6.1", "Labels": dict(KERNEL_LABELS, **{
                L.USER: user, L.SERVER: server, L.REQUEST_ID: request_id, L.IMAGE: "reg:5000/bai/sklearn:1.6.1"}),
                "Env": ["PATH=/p", "JUPYTERHUB_API_TOKEN=tok"]},
        }

    # docker API
    def containers(self, all=False, filters=None):
        out = []
        want = (filters or {}).get("label")
        for c in self.containers_.values():
            if not all and not c["State"]["Running"]:
                continue
            lab = c["Config"]["Labels"]
            if want:
                k, _, v = want.partition("=")
                if lab.get(k) != v:
                    continue
            out.append({"Id": c["Id"], "Labels": lab, "State": "running" if c["State"]["Running"] else "exited",
                        "Names": ["/" + c["Id"]]})
        return out

    def inspect_container(self, cid):
        if cid not in self.containers_:
            raise docker.errors.NotFound("no container")
        return self.containers_[cid]

    def _resolve(self, ref):
        if ref in self.images_by_id:
            return ref
        if ref in self.tags:
            return self.tags[ref]
        raise docker.errors.ImageNotFound(f"no image {ref}")

    def inspect_image(self, ref):
        img = self.images_by_id[self._resolve(ref)]
        return dict(img, RepoTags=[t for t, i in self.tags.items() if i == img["Id"]])

    def commit(self, container, conf=None, pause=True, message=None, author=None, **kw):
        self.calls.append("commit")
        self.paused_commits.append(pause)
        if self.commit_delay:
            time.sleep(self.commit_delay)
        if self.fail_commit:
            raise self.fail_commit
        new_id = f"sha256:new{len(self.images_by_id)}"
        self.add_image(new_id, None, conf, size=12345)
        return {"Id": new_id}

    def tag(self, image, repository, tag=None, force=False):
        self.calls.append("tag")
        if self.fail_tag:
            raise self.fail_tag
        self.tags[f"{repository}:{tag}"] = image
        return True

    def push(self, repository, tag=None, stream=False, decode=False, auth_config=None):
        self.calls.append("push")
        yield {"status": f"The push refers to repository [{repository}]"}
        yield {"status": "Preparing", "progressDetail": {}, "id": "1f4cb1793d6c"}
        if self.push_gate is not None:
            self.push_gate.wait(10)
        if self.fail_push:
            yield {"errorDetail": {"message": self.fail_push}, "error": self.fail_push}
            return
        yield {"status": "Pushing", "progressDetail": {"current": 50, "total": 100}, "id": "1f4cb1793d6c"}
        yield {"status": "Pushed", "progressDetail": {}, "id": "1f4cb1793d6c"}
        image = self.images_by_id[self.tags[f"{repository}:{tag}"]]
        self.registry.images[self.registry.name_of(f"{repository}:{tag}")] = (image["Id"], image["Config"]["Labels"])

    def remove_image(self, image, force=False, noprune=False):
        self.calls.append(f"remove {image}")
        id_ = self._resolve(image)
        if image in self.tags:
            del self.tags[image]
            if id_ in self.tags.values():
                return
        else:
            for t in [t for t, i in self.tags.items() if i == id_]:
                del self.tags[t]
        del self.images_by_id[id_]

    def images(self, all=False, filters=None):
        want = (filters or {}).get("label", "")
        k, _, v = want.partition("=")
        out = []
        for img in self.images_by_id.values():
            lab = (img["Config"] or {}).get("Labels") or {}
            if lab.get(k) == v:
                out.append({"Id": img["Id"], "RepoTags": [t for t, i in self.tags.items() if i == img["Id"]]
                            or ["<none>:<none>"], "Labels": lab, "Size": img["Size"], "Created": 0})
        return out


def labels_for(source, image):
    return S.snapshot_labels(source, owner="alice", source_image=image, session="alice/w", tag="v1", job="j1")


def test_commit_blocking_tags_only_after_a_successful_commit():
    eng = FakeEngine()
    eng.add_session("c1", "alice", "w", "r1")
    told = []
    out = S.commit_blocking(eng, "c1", "reg:5000/p/alice:v1", labels_for, pause=True, on_committed=told.append)
    assert eng.calls == ["commit", "tag"] and told == [out["id"]]
    assert eng.tags["reg:5000/p/alice:v1"] == out["id"] and out["size"] == 12345
    assert out["source_image"] == "reg:5000/bai/sklearn:1.6.1"
    lab = eng.images_by_id[out["id"]]["Config"]["Labels"]
    assert lab[L.OWNER] == "alice" and lab[L.USER] == "" and lab[L.REQUEST_ID] == "" and lab[L.SNAPSHOT_JOB] == "j1"
    assert "JUPYTERHUB_API_TOKEN=" in eng.images_by_id[out["id"]]["Config"]["Env"]
    assert eng.paused_commits == [True]


def test_engine_failing_mid_commit_leaves_no_image_and_no_name():
    eng = FakeEngine()
    eng.add_session("c1", "alice", "w", "r1")
    eng.fail_commit = docker.errors.APIError("boom", explanation="no space left on device")
    before = dict(eng.images_by_id)
    with pytest.raises(docker.errors.APIError):
        S.commit_blocking(eng, "c1", "p/alice:v1", labels_for)
    assert "p/alice:v1" not in eng.tags and eng.images_by_id == before
    assert eng.containers_["c1"]["State"]["Running"]


def test_failing_tag_removes_the_temporary_image():
    eng = FakeEngine()
    eng.add_session("c1", "alice", "w", "r1")
    eng.fail_tag = docker.errors.APIError("tag failed")
    with pytest.raises(docker.errors.APIError):
        S.commit_blocking(eng, "c1", "p/alice:v1", labels_for)
    assert "p/alice:v1" not in eng.tags
    assert list(eng.images_by_id) == ["sha256:kernel"]
    assert eng.calls[-1].startswith("remove sha256:new")


def test_a_leftover_tag_of_the_name_on_the_node_moves_to_the_new_image():
    """Whether a name is taken is the registry's to say; on the node it is what a failed job left."""
    eng = FakeEngine()
    eng.add_session("c1", "alice", "w", "r1")
    eng.add_image("sha256:leftover", "p/alice:v1", {"Labels": {}})
    out = S.commit_blocking(eng, "c1", "p/alice:v1", labels_for)
    assert eng.tags["p/alice:v1"] == out["id"]


def test_container_not_running_is_not_committed():
    eng = FakeEngine()
    eng.add_session("c1", "alice", "w", "r1", running=False)
    with pytest.raises(S.SnapshotError):
        S.commit_blocking(eng, "c1", "p/alice:v1", labels_for)
    with pytest.raises(S.SnapshotError):
        S.commit_blocking(eng, "nope", "p/alice:v1", labels_for)
    assert "commit" not in eng.calls


def test_discard_takes_back_the_name_and_the_images_of_one_job_only():
    eng = FakeEngine()
    eng.add_image("sha256:mine", "reg:5000/p/alice:v1", {"Labels": {L.SNAPSHOT_JOB: "j1"}})
    eng.add_image("sha256:untagged", None, {"Labels": {L.SNAPSHOT_JOB: "j1"}})
    eng.add_image("sha256:other", "reg:5000/p/alice:v2", {"Labels": {L.SNAPSHOT_JOB: "j2"}})
    assert S.discard_blocking(eng, "reg:5000/p/alice:v1", "sha256:mine", "j1")
    assert set(eng.images_by_id) == {"sha256:kernel", "sha256:other"}
    # a name that now names another image is not touched
    assert not S.discard_blocking(eng, "reg:5000/p/alice:v2", "sha256:mine", "j1")
    assert eng.tags["reg:5000/p/alice:v2"] == "sha256:other"


# -- the job manager over a fake service, engine and registry --------------------------------------------


class FakeService:
    def __init__(self):
        self.records = {}
        self.units = FgpuUnits(2, "0.5")

    def add(self, user, server, state="RUNNING", node="n1", rid="r1", image="reg:5000/bai/sklearn:1.6.1"):
        key = RequestKey(user, server)
        placement = Placement(node, ()) if state == "RUNNING" else None
        self.records[key] = Record(id=rid, request=Request(key, 0, image=image), state=state,
                                   placement=placement, admitted_at=time.time() - 75)

    def get(self, key):
        return self.records.get(key)

    def running(self):
        return [r for r in self.records.values() if r.state == "RUNNING"]


def make(cap=5, store=None, **kw):
    reg = FakeRegistry()
    eng, svc = FakeEngine(reg), FakeService()
    mgr = S.Snapshots([Node("n1", "")], svc, reg, reg, jobs=store, repo="bai-test-private", cap=cap,
                      client_factory=lambda node, timeout=60: eng, **kw)
    return eng, svc, mgr


async def test_job_goes_queued_committing_pushing_done():
    eng, svc, mgr = make()
    svc.add("alice", "w")
    eng.add_session("c1", "alice", "w", "r1")
    eng.commit_delay = 0.3
    job = await mgr.submit("alice", "w", "v1", requested_by="root")
    assert job.state in ("queued", "committing") and job.ref == "bai-test-private/alice:v1"
    assert job.reference == "reg:5000/bai-test-private/alice:v1" and job.source_image == "bai/sklearn:1.6.1"
    await asyncio.sleep(0.1)
    assert mgr.jobs[job.id].state == "committing"
    await mgr.wait_idle()
    assert job.state == "done" and job.image_id and job.size == 12345 and job.reason == "", job.reason
    assert eng.calls == ["commit", "tag", "push"]
    assert mgr.registry.images["bai-test-private/alice:v1"][0] == job.image_id
    assert job.to_json()["session"] == "alice/w"
    images, errors = await mgr.images()
    assert [i["ref"] for i in images] == ["bai-test-private/alice:v1"] and not errors
    assert images[0]["source_image"] == "bai/sklearn:1.6.1"
    assert (await mgr.images(owner="bob"))[0] == []
    sess = mgr.sessions()
    assert sess[0]["session"] == "alice/w" and 70 <= sess[0]["age_s"] <= 90
    assert sess[0]["image"] == "bai/sklearn:1.6.1"


async def test_the_job_is_pushing_until_the_push_is_complete():
    eng, svc, mgr = make()
    svc.add("alice", "w")
    eng.add_session("c1", "alice", "w", "r1")
    eng.push_gate = threading.Event()
    job = await mgr.submit("alice", "w", "v1")
    for _ in range(100):
        if job.state == "pushing":
            break
        await asyncio.sleep(0.02)
    assert job.state == "pushing" and job.to_json()["progress"] == "0 of 1 layers"
    assert (await mgr.images())[0] == []  # not in the catalog until the push is complete
    eng.push_gate.set()
    await mgr.wait_idle()
    assert job.state == "done" and job.progress == ""


async def test_refusals_start_nothing():
    eng, svc, mgr = make(cap=1)
    svc.add("alice", "w")
    svc.add("alice", "q", state="PENDING", rid="r2")
    eng.add_session("c1", "alice", "w", "r1")

    async def refused(user, server, tag, status, says):
        with pytest.raises(S.SnapshotError) as e:
            await mgr.submit(user, server, tag)
        assert e.value.status == status, e.value.message
        assert says.lower() in e.value.message.lower(), e.value.message

    await refused("alice", "w", "bad tag", 400, "may only use")
    await refused("alice", "nope", "v1", 404, "no session")
    await refused("alice", "q", "v1", 400, "pending, not running")
    await refused("", "w", "v1", 400, "user")
    eng.containers_["c1"]["State"]["Running"] = False
    await refused("alice", "w", "v1", 400, "not running")
    eng.containers_["c1"]["State"]["Running"] = True
    mgr.registry.down = True
    await refused("alice", "w", "v1", 503, "does not answer")
    mgr.registry.down = False
    assert "commit" not in eng.calls and not mgr.jobs

    await mgr.submit("alice", "w", "v1")
    await refused("alice", "w", "v1", 409, "being made already")
    await mgr.wait_idle()
    await refused("alice", "w", "v1", 409, "exists already")
    await refused("alice", "w", "v2", 409, "limit is 1")
    assert eng.calls.count("commit") == 1


async def test_failure_mid_commit_is_reported_and_leaves_nothing():
    eng, svc, mgr = make()
    svc.add("alice", "w")
    eng.add_session("c1", "alice", "w", "r1")
    eng.fail_tag = docker.errors.APIError("x", explanation="engine went away")
    job = await mgr.submit("alice", "w", "v1")
    await mgr.wait_idle()
    assert job.state == "failed" and "engine went away" in job.reason and "Nothing was kept" in job.reason
    assert (await mgr.images())[0] == []
    assert eng.containers_["c1"]["State"]["Running"]
    # The same name can be tried again afterwards.
    eng.fail_tag = None
    job2 = await mgr.submit("alice", "w", "v1")
    await mgr.wait_idle()
    assert job2.state == "done"


async def test_a_failed_push_takes_back_the_name_and_the_image():
    eng, svc, mgr = make()
    svc.add("alice", "w")
    eng.add_session("c1", "alice", "w", "r1")
    eng.fail_push = "Get http://reg:5000/v2/: dial tcp: connection refused"
    job = await mgr.submit("alice", "w", "v1")
    await mgr.wait_idle()
    assert job.state == "failed" and "connection refused" in job.reason and "Nothing was kept" in job.reason
    assert set(eng.images_by_id) == {"sha256:kernel"} and "reg:5000/bai-test-private/alice:v1" not in eng.tags
    assert mgr.registry.images == {}


async def test_jobs_outlive_a_restart_and_an_interrupted_one_leaves_nothing(tmp_path):
    store = JobStore(create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}"))
    eng, svc, mgr = make(store=store)
    svc.add("alice", "w")
    eng.add_session("c1", "alice", "w", "r1")
    done = await mgr.submit("alice", "w", "v1", requested_by="root")
    await mgr.wait_idle()
    eng.push_gate = threading.Event()
    cut = await mgr.submit("alice", "w", "v2")
    for _ in range(100):
        if cut.state == "pushing":
            break
        await asyncio.sleep(0.02)
    assert cut.state == "pushing" and eng.tags.get("reg:5000/bai-test-private/alice:v2")
    # The service restarts here: a new manager on the same database, the same engine and registry.
    again = S.Snapshots([Node("n1", "")], svc, mgr.registry, mgr.registry, jobs=JobStore(store.engine),
                        repo="bai-test-private", client_factory=lambda node, timeout=60: eng)
    assert again.jobs[done.id].state == "done" and again.jobs[done.id].requested_by == "root"
    interrupted = again.jobs[cut.id]
    assert interrupted.state == "failed" and "restarted while this snapshot was pushing" in interrupted.reason
    await again.recover()
    assert "Nothing was kept" in again.jobs[cut.id].reason
    assert "reg:5000/bai-test-private/alice:v2" not in eng.tags
    assert cut.image_id not in eng.images_by_id and done.image_id in eng.images_by_id
    assert JobStore(store.engine).load()[1].state == "failed"
    eng.push_gate.set()  # the old manager's thread ends; its push no longer matters
    await mgr.wait_idle()


async def test_engine_down_is_503():
    eng, svc, _ = make()
    svc.add("alice", "w")

    def down(node, timeout=60):
        raise docker.errors.DockerException("connection refused")

    reg = FakeRegistry()
    mgr = S.Snapshots([Node("n1", "")], svc, reg, reg, repo="p", client_factory=down)
    with pytest.raises(S.SnapshotError) as e:
        await mgr.submit("alice", "w", "v1")
    assert e.value.status == 503


async def test_delete_via_manager():
    eng, svc, mgr = make()
    with pytest.raises(S.SnapshotError) as e:
        await mgr.delete_image("bai-test-private/alice:zzz")
    assert e.value.status == 404
    mgr.registry.images["bai/sklearn:1.6.1"] = ("sha256:kernel", KERNEL_LABELS)
    with pytest.raises(S.SnapshotError) as e:
        await mgr.delete_image("bai/sklearn:1.6.1")
    assert e.value.status == 400 and "not a private image" in e.value.message
    svc.add("alice", "w")
    eng.add_session("c1", "alice", "w", "r1")
    await mgr.submit("alice", "w", "v1")
    await mgr.wait_idle()
    # in use by a session (running or queued): refused
    svc.add("alice", "x", state="PENDING", rid="r9", image="reg:5000/bai-test-private/alice:v1")
    with pytest.raises(S.SnapshotError) as e:
        await mgr.delete_image("bai-test-private/alice:v1")
    assert e.value.status == 409 and "alice/x" in e.value.message
    del svc.records[RequestKey("alice", "x")]
    mgr.registry.down = True
    with pytest.raises(S.SnapshotError) as e:
        await mgr.delete_image("bai-test-private/alice:v1")
    assert e.value.status == 503 and "Nothing was deleted" in e.value.message
    mgr.registry.down = False
    assert await mgr.delete_image("reg:5000/bai-test-private/alice:v1") == {"deleted": "bai-test-private/alice:v1",
                                                                           "nodes": ["n1"]}
    assert mgr.registry.deleted == ["bai-test-private/alice:v1"] and (await mgr.images())[0] == []


async def test_commits_run_in_threads_the_loop_stays_responsive_and_extra_jobs_queue():
    eng, svc, mgr = make(concurrency=1)
    for server, rid in (("a", "r1"), ("b", "r2")):
        svc.add("alice", server, rid=rid)
        eng.add_session(f"c-{server}", "alice", server, rid)
    eng.commit_delay = 0.4
    first = await mgr.submit("alice", "a", "v1")
    second = await mgr.submit("alice", "b", "v2")
    await asyncio.sleep(0.05)
    assert (first.state, second.state) == ("committing", "queued")
    # The event loop keeps serving while the blocking commit runs.
    worst = 0.0
    while first.active:
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.2, worst
    await mgr.wait_idle()
    assert (first.state, second.state) == ("done", "done")
    assert second.started_at >= first.finished_at

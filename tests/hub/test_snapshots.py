"""Snapshots end to end through a real hub, proxy, scheduler service and Docker engine.

The seed's workflow: a user installs a package system-wide in a running session,
an admin snapshots it into a private image (committed on the node, pushed to the
image registry), the owner launches a new session from it and finds the package;
nobody else can see or launch it. Plus the bad inputs, the REST API's permissions,
jobs that outlive a restart of the service (and one a restart interrupts), and a
browser test of the admin panel.

All of it runs on a hub of its own whose private repository is
``bai-test-<hex>-private`` so the images it makes (on the engine and in the
registry) are removed afterwards.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time

import pytest
import requests

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.registry import split_name
from bai_spawner.images.layout import KERNEL_ENV
from helpers import ARTIFACTS, KERNEL_IMAGE
from helpers.hub import ROOT, docker, running_hub
from helpers.images import make_wheel
from helpers.registry import SHARED, reference

pytestmark = [pytest.mark.docker, pytest.mark.hub]

CPU_ONLY = {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"}
PKG = "baisnaptest"
PKG_VALUE = "installed-before-the-snapshot"
CAP = 3
ADMIN = "snapadmin"


# -- helpers ----------------------------------------------------------------------------------------


def run_in(container_id, *cmd, user=None) -> str:
    args = ["exec"] + (["-u", user] if user else []) + [container_id, *cmd]
    out = docker(*args)
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout.strip()


def wait_job(hub, token, job_id, timeout=300) -> dict:
    def done():
        r = hub.service("GET", f"api/snapshots/{job_id}", token=token)
        assert r.status_code == 200, r.text
        job = r.json()["job"]
        return job if job["state"] in ("done", "failed") else None

    return hub.wait_for(done, timeout, 1.0, what=f"snapshot job {job_id}")


def image_labels(name) -> dict | None:
    """The labels of the node's copy of private image ``name`` (bai-test-…-private/alice:v1)."""
    out = docker("image", "inspect", reference(name))
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)[0]["Config"]["Labels"] or {}


def in_registry(name):
    """The registry's image ``name`` (a RegistryImage), or None."""
    return SHARED.client().image(*split_name(name))


def wait_failed_spawn(hub, user, server, timeout=60) -> str:
    hub.wait_for(lambda: not hub.servers(user).get(server, {}).get("pending"), timeout, what="spawn to end")
    return hub.api("GET", f"/users/{user}/servers/{server}/progress").text


def stop(hub, user, server):
    if server in hub.servers(user):
        hub.stop_server(user, server)
        hub.wait_gone(user, server)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snap_hub(tmp_path_factory, kernel_images):
    prefix = f"bai-test-{secrets.token_hex(3)}-"
    repo = f"{prefix}private"
    # The test service may not grant admin rights: the panel's admin is made one by config.
    with running_hub(tmp_path_factory.mktemp("snaphub"), "jupyterhub-snapshots.log", prefix=prefix,
                     extra={"BaiScheduler": {"private_image_repo": repo, "max_private_images_per_user": CAP},
                            "Authenticator": {"admin_users": [ADMIN]}}) as h:
        h.repo = repo  # what it makes in Docker and the registry is removed with the hub's prefix
        yield h


@pytest.fixture(scope="module")
def people(snap_hub):
    """An admin, the owner of the session, and another user (with API tokens)."""
    out = {}
    for role in ("admin", "alice", "bob"):
        name = f"snap{role}"
        out[role] = (name, snap_hub.add_user(name))
    assert snap_hub.api("GET", f"/users/{ADMIN}").json()["admin"] is True
    return out


@pytest.fixture(scope="module")
def prepared(snap_hub, people, tmp_path_factory):
    """alice's running session "work" with a package installed system-wide and a
    file in her home folder (which a snapshot must not capture)."""
    hub = snap_hub
    alice, _ = people["alice"]
    r = hub.start_server(alice, "work", CPU_ONLY)
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(alice, "work")
    c = hub.session_container(alice, "work")
    wheel = make_wheel(tmp_path_factory.mktemp("wheel"), PKG, "0.1", init=f"VALUE = {PKG_VALUE!r}\n")
    assert docker("cp", str(wheel), f"{c['Id']}:/tmp/{wheel.name}").returncode == 0
    # As the notebook user, like `pip install` in a terminal of the session: the
    # kernel environment is jovyan's, so the package lands in the image layer.
    run_in(c["Id"], "python", "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
           f"/tmp/{wheel.name}", user="jovyan")
    assert run_in(c["Id"], "python", "-c", f"import {PKG}; print({PKG}.__file__)").startswith(f"{KERNEL_ENV}/")
    run_in(c["Id"], "sh", "-c", "echo only-in-home > /home/jovyan/home-marker.txt")
    yield c
    stop(hub, alice, "work")


@pytest.fixture(scope="module")
def snapshot(snap_hub, people, prepared):
    """The admin snapshots alice's session through the REST API."""
    hub = snap_hub
    admin, admin_token = people["admin"]
    alice, _ = people["alice"]
    t0 = time.time()
    r = hub.service("POST", "api/snapshots", token=admin_token, json={"user": alice, "server": "work", "tag": "v1"})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert job["state"] in ("queued", "committing")
    assert r.headers["Location"].endswith(f"api/snapshots/{job['id']}")
    # The service answers while the commit runs (it runs in a thread).
    assert hub.service("GET", "api/health").status_code == 200
    job = wait_job(hub, admin_token, job["id"])
    assert job["state"] == "done", job
    # "done" once the push is complete: the registry has it, with the node's image id.
    assert in_registry(job["ref"]).config == job["image_id"]
    assert job["reference"] == reference(job["ref"])
    job["elapsed"] = time.time() - t0
    return job


# -- the workflow --------------------------------------------------------------------------------------


def test_snapshot_is_a_private_image_of_the_owner_with_the_package(snap_hub, people, prepared, snapshot):
    hub = snap_hub
    alice, alice_token = people["alice"]
    ref = f"{hub.repo}/{alice}:v1"
    assert snapshot["ref"] == ref
    assert snapshot["source_image"] == KERNEL_IMAGE
    # The session was not disturbed: still running, not paused, still answering through the proxy.
    state = json.loads(docker("inspect", prepared["Id"]).stdout)[0]["State"]
    assert state["Running"] and not state["Paused"]
    r = requests.get(f"{hub.url}/user/{alice}/work/api/status", headers={"Authorization": f"token {alice_token}"},
                     timeout=30)
    assert r.status_code == 200, r.text
    lab = image_labels(ref)
    assert lab[L.KIND] == L.KIND_PRIVATE and lab[L.OWNER] == alice
    assert lab[L.SOURCE_IMAGE] == KERNEL_IMAGE and lab[L.SOURCE_SESSION] == f"{alice}/work"
    assert lab[L.FRAMEWORK] == "scikit-learn" and lab[L.VERSION] == "1.6.1"
    assert lab[L.DISPLAY_NAME] == "v1 (private, from scikit-learn 1.6)"
    assert lab[L.CREATED].endswith("+00:00")
    # Nothing of the old session lives on in the image's config.
    assert lab.get(L.REQUEST_ID, "") == "" and lab.get(L.USER, "") == "" and lab.get(L.RECIPE_HASH, "") == ""
    cfg = json.loads(docker("image", "inspect", reference(ref)).stdout)[0]["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env.get("JUPYTERHUB_API_TOKEN", "") == ""
    assert cfg["Cmd"] == ["jupyterhub-singleuser"] and cfg["User"] == "jovyan"
    # The home folder is a volume: not in the image (run it bare, without the volume).
    probe = docker("run", "--rm", "--name", f"{hub.prefix}probe", "--entrypoint", "sh", reference(ref), "-c",
                   f"python -c 'import {PKG}; print({PKG}.VALUE)'; ls /home/jovyan/home-marker.txt 2>&1 || true")
    assert probe.returncode == 0, probe.stderr
    assert PKG_VALUE in probe.stdout and "No such file" in probe.stdout


def test_owner_launches_the_private_image_and_finds_the_package(snap_hub, people, snapshot):
    hub = snap_hub
    alice, alice_token = people["alice"]
    ref = snapshot["ref"]
    # Through the hub's REST API with the owner's own token, typing the image's name.
    r = hub.start_server(alice, "fromsnap", {**CPU_ONLY, "image": ref}, token=alice_token)
    assert r.status_code in (201, 202), r.text
    try:
        hub.wait_ready(alice, "fromsnap")
        c = hub.session_container(alice, "fromsnap")
        assert c["Config"]["Image"] == reference(ref) and c["Image"] == snapshot["image_id"]
        assert run_in(c["Id"], "python", "-c", f"import {PKG}; print({PKG}.VALUE)") == PKG_VALUE
        assert run_in(c["Id"], "python", "-c", "import sklearn; print(sklearn.__version__)") == "1.6.1"
        # The home volume is mounted again, so the user's files are there as always.
        assert run_in(c["Id"], "cat", "/home/jovyan/home-marker.txt") == "only-in-home"
        env = dict(e.split("=", 1) for e in c["Config"]["Env"])
        assert env["JUPYTERHUB_API_TOKEN"]  # the spawner's fresh token, not a blank from the image
        r = requests.get(f"{hub.url}/user/{alice}/fromsnap/api/status",
                         headers={"Authorization": f"token {alice_token}"}, timeout=30)
        assert r.status_code == 200
    finally:
        stop(hub, alice, "fromsnap")


@pytest.mark.parametrize("how", ["image", "image_name", "id"])
def test_another_user_is_refused_the_private_image(snap_hub, people, snapshot, how):
    hub = snap_hub
    bob, bob_token = people["bob"]
    value = snapshot["image_id"] if how == "id" else snapshot["ref"]
    key = "image_name" if how == "image_name" else "image"
    server = f"steal{how.replace('_', '')}"
    r = hub.start_server(bob, server, {**CPU_ONLY, key: value}, token=bob_token)
    text = r.text if r.status_code == 400 else wait_failed_spawn(hub, bob, server)
    assert r.status_code in (400, 201, 202)
    assert "not in the catalog of images you may launch" in text, text
    assert hub.session_container(bob, server) is None
    assert f"{bob}/{server}" not in hub.requests(token=people["admin"][1])


def test_private_image_is_in_the_owners_catalog_only(snap_hub, people, snapshot):
    hub = snap_hub
    alice, alice_token = people["alice"]
    bob, bob_token = people["bob"]
    admin, admin_token = people["admin"]
    ref = snapshot["ref"]

    def catalog_of(token):
        r = hub.service("GET", "api/catalog", token=token)
        assert r.status_code == 200, r.text
        return [i["short_ref"] for i in r.json()["images"]]

    assert ref in catalog_of(alice_token) and KERNEL_IMAGE in catalog_of(alice_token)
    assert ref not in catalog_of(bob_token) and KERNEL_IMAGE in catalog_of(bob_token)
    assert ref in catalog_of(admin_token)
    mine = hub.service("GET", "api/images?mine=1", token=alice_token)
    assert mine.status_code == 200 and [i["ref"] for i in mine.json()["images"]] == [ref]
    image = mine.json()["images"][0]
    assert image["owner"] == alice and image["source_image"] == KERNEL_IMAGE and image["size"] > 0
    assert hub.service("GET", "api/images?mine=1", token=bob_token).json()["images"] == []
    # Without mine=1 a user still sees only their own; an admin sees all.
    assert hub.service("GET", "api/images", token=bob_token).json()["images"] == []
    assert ref in [i["ref"] for i in hub.service("GET", "api/images", token=admin_token).json()["images"]]
    listing = hub.service("GET", "api/snapshots", token=admin_token).json()
    assert ref in [i["ref"] for i in listing["images"]]
    assert snapshot["id"] in [j["id"] for j in listing["jobs"]]


# -- permissions and bad input --------------------------------------------------------------------------


def test_non_admins_get_403_from_the_snapshot_api(snap_hub, people, prepared):
    hub = snap_hub
    alice, alice_token = people["alice"]
    _, bob_token = people["bob"]
    body = {"user": alice, "server": "work", "tag": "mine"}
    for token in (alice_token, bob_token):  # the owner herself; another user
        assert hub.service("POST", "api/snapshots", token=token, json=body).status_code == 403
        assert hub.service("GET", "api/snapshots", token=token).status_code == 403
        assert hub.service("DELETE", f"api/images/{KERNEL_IMAGE}", token=token).status_code == 403
    assert hub.service("POST", "api/snapshots", token="not-a-token", json=body).status_code == 403
    assert image_labels(f"{hub.repo}/{alice}:mine") is None


@pytest.mark.parametrize("body, status, says", [
    ({"server": "work", "tag": "has space"}, 400, "may only use"),
    ({"server": "work", "tag": "-x"}, 400, "starts with"),
    ({"server": "work", "tag": "x" * 129}, 400, "at most 128"),
    ({"server": "work"}, 400, "give the new image a tag"),
    ({"server": "work", "tag": "v9", "force": True}, 400, "unknown field"),
    ({"server": "nosuch", "tag": "v9"}, 404, "no session"),
])
def test_bad_snapshot_requests_are_refused_clearly(snap_hub, people, prepared, body, status, says):
    hub = snap_hub
    alice, _ = people["alice"]
    _, admin_token = people["admin"]
    r = hub.service("POST", "api/snapshots", token=admin_token, json={"user": alice, **body})
    assert r.status_code == status, r.text
    assert says in r.json()["message"].lower()
    assert image_labels(f"{hub.repo}/{alice}:v9") is None
    assert json.loads(docker("inspect", prepared["Id"]).stdout)[0]["State"]["Running"]


def test_name_taken_is_409(snap_hub, people, snapshot):
    hub = snap_hub
    alice, _ = people["alice"]
    _, admin_token = people["admin"]
    before = in_registry(snapshot["ref"])
    r = hub.service("POST", "api/snapshots", token=admin_token, json={"user": alice, "server": "work", "tag": "v1"})
    assert r.status_code == 409, r.text
    assert "exists already" in r.json()["message"]
    assert in_registry(snapshot["ref"]) == before


def test_snapshot_of_a_queued_session_is_400(snap_hub, people, prepared):
    hub = snap_hub
    bob, bob_token = people["bob"]
    _, admin_token = people["admin"]
    try:
        assert hub.start_server(bob, "big", {**CPU_ONLY, "fgpu": "2"}, token=bob_token).status_code in (201, 202)
        hub.wait_ready(bob, "big")
        assert hub.start_server(bob, "queued", {**CPU_ONLY, "fgpu": "1"}, token=bob_token).status_code in (201, 202)
        hub.wait_for(lambda: hub.requests(token=admin_token).get(f"{bob}/queued", {}).get("state") == "PENDING",
                     30, what="queued")
        r = hub.service("POST", "api/snapshots", token=admin_token, json={"user": bob, "server": "queued", "tag": "q"})
        assert r.status_code == 400, r.text
        assert "pending, not running" in r.json()["message"]
    finally:
        stop(hub, bob, "queued")
        stop(hub, bob, "big")
    r = hub.service("POST", "api/snapshots", token=admin_token, json={"user": bob, "server": "big", "tag": "q"})
    assert r.status_code == 404, r.text
    assert image_labels(f"{hub.repo}/{bob}:q") is None


def test_cap_and_delete(snap_hub, people, prepared, snapshot):
    """Up to CAP private images per user; the admin deletes them; kernel images cannot be deleted here."""
    hub = snap_hub
    alice, alice_token = people["alice"]
    _, admin_token = people["admin"]
    made = []
    try:
        for i in range(CAP - 1):
            r = hub.service("POST", "api/snapshots", token=admin_token,
                            json={"user": alice, "server": "work", "tag": f"extra{i}"})
            assert r.status_code == 202, r.text
            assert wait_job(hub, admin_token, r.json()["job"]["id"])["state"] == "done"
            made.append(r.json()["job"]["ref"])
        r = hub.service("POST", "api/snapshots", token=admin_token,
                        json={"user": alice, "server": "work", "tag": "onetoomany"})
        assert r.status_code == 409, r.text
        assert f"the limit is {CAP}" in r.json()["message"]
        # Kernel images are not deleted through this API.
        r = hub.service("DELETE", f"api/images/{KERNEL_IMAGE}", token=admin_token)
        assert r.status_code == 400 and "not a private image" in r.json()["message"]
        assert image_labels(KERNEL_IMAGE) is not None
        assert hub.service("DELETE", f"api/images/{hub.repo}/{alice}:nosuch", token=admin_token).status_code == 404
        # An image a running session uses cannot be deleted until it stops.
        assert hub.start_server(alice, "user", {**CPU_ONLY, "image": made[0]}, token=alice_token).status_code in (201, 202)
        hub.wait_ready(alice, "user")
        r = hub.service("DELETE", "api/images/" + requests.utils.quote(made[0], safe=""), token=admin_token)
        assert r.status_code == 409 and "stop those sessions" in r.json()["message"], r.text
        stop(hub, alice, "user")
        for ref in made:
            assert in_registry(ref) is not None
            r = hub.service("DELETE", "api/images/" + requests.utils.quote(ref, safe=""), token=admin_token)
            assert r.status_code == 200, r.text
            assert r.json() == {"deleted": ref, "nodes": ["local"]}
            # its manifest is gone from the registry, and the node's copy too
            assert in_registry(ref) is None and image_labels(ref) is None
        made = []
        # Below the cap again.
        mine = hub.service("GET", "api/images?mine=1", token=alice_token).json()["images"]
        assert [i["ref"] for i in mine] == [snapshot["ref"]]
    finally:
        stop(hub, alice, "user")
        for ref in made:
            docker("rmi", "-f", reference(ref))


# -- the admin panel in a browser ------------------------------------------------------------------------




def login(page, hub, name, password):
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url("**/hub/**", timeout=30000)


@pytest.mark.browser
def test_admin_panel_snapshots_a_session_and_deletes_the_image(snap_hub, people, prepared, snapshot, browser):
    from playwright.sync_api import expect

    hub = snap_hub
    admin, _ = people["admin"]
    alice, _ = people["alice"]
    passwords = {admin: secrets.token_urlsafe(12), alice: secrets.token_urlsafe(12)}
    for name, pw in passwords.items():
        hub.set_password(name, pw)
    panel = f"{hub.url}/services/bai-scheduler/admin/snapshots"
    ref = f"{hub.repo}/{alice}:frompanel"
    try:
        # A non-admin gets a 403 page.
        ctx = browser.new_context()
        page = ctx.new_page()
        login(page, hub, alice, passwords[alice])
        resp = page.goto(panel)
        assert resp.status == 403
        expect(page.locator("#error")).to_contain_text("Admins only")
        ctx.close()

        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        login(page, hub, admin, passwords[admin])
        resp = page.goto(panel)
        assert resp.status == 200
        expect(page.locator("#not-captured")).to_contain_text("/home/jovyan")
        expect(page.locator("#not-captured")).to_contain_text("pip install")
        row = page.locator(f'#sessions tr[data-session="{alice}/work"]')
        expect(row).to_contain_text(KERNEL_IMAGE, timeout=20000)
        # A bad tag: refused, with the reason shown.
        row.locator('[data-role="tag"]').fill("bad tag")
        row.locator('[data-role="snapshot"]').click()
        expect(page.locator("#flash")).to_contain_text("may only use", timeout=20000)
        # The real one: progress, then the image in the list.
        row.locator('[data-role="tag"]').fill("frompanel")
        row.locator('[data-role="snapshot"]').click()
        expect(page.locator("#flash")).to_contain_text(ref, timeout=20000)
        job = page.locator("#jobs tbody tr").filter(has_text=ref)
        expect(job).to_have_count(1, timeout=10000)
        expect(job.locator('[data-role="state"]')).to_contain_text("done", timeout=300000)
        # Issue 14 (4): the banner follows the job to its end instead of saying "started" for ever.
        expect(page.locator("#flash")).to_contain_text(f"Snapshot of {alice}/work finished: {ref}", timeout=20000)
        image = page.locator(f'#images tr[data-image="{ref}"]')
        expect(image).to_contain_text(alice, timeout=20000)
        expect(image).to_contain_text(KERNEL_IMAGE)
        expect(image).to_contain_text("GiB")
        expect(page.locator(f'#images tr[data-image="{snapshot["ref"]}"]')).to_have_count(1)
        assert image_labels(ref)[L.OWNER] == alice
        page.wait_for_timeout(300)
        shot = page.screenshot(full_page=True)
        (ARTIFACTS / "admin-snapshots.png").write_bytes(shot)
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "admin-snapshots.png").write_bytes(shot)
        # Delete from the panel (confirming the dialog).
        page.once("dialog", lambda d: d.accept())
        image.locator('[data-role="delete"]').click()
        expect(page.locator("#flash")).to_contain_text(f"Deleted {ref}", timeout=30000)
        expect(page.locator(f'#images tr[data-image="{ref}"]')).to_have_count(0, timeout=20000)
        assert image_labels(ref) is None
        ctx.close()
    finally:
        docker("rmi", "-f", reference(ref))


# -- jobs across a restart of the service ----------------------------------------------------------------


def test_jobs_outlive_a_restart_and_a_job_cut_short_leaves_nothing(snap_hub, people, snapshot):
    """The service is killed while a snapshot of a session with 300 MB of new files is being
    committed or pushed; after the restart every job shows its final state, the one cut short is
    failed with that reason, and neither the node nor the registry keeps anything of it."""
    hub = snap_hub
    bob, bob_token = people["bob"]
    _, admin_token = people["admin"]
    assert hub.start_server(bob, "bigsnap", CPU_ONLY, token=bob_token).status_code in (201, 202)
    try:
        hub.wait_ready(bob, "bigsnap")
        c = hub.session_container(bob, "bigsnap")
        run_in(c["Id"], "dd", "if=/dev/urandom", f"of={KERNEL_ENV}/big.bin", "bs=1M", "count=300", user="jovyan")
        r = hub.service("POST", "api/snapshots", token=admin_token, json={"user": bob, "server": "bigsnap", "tag": "cut"})
        assert r.status_code == 202, r.text
        job_id, name = r.json()["job"]["id"], r.json()["job"]["ref"]

        def at_work():
            state = hub.service("GET", f"api/snapshots/{job_id}", token=admin_token).json()["job"]["state"]
            assert state not in ("done", "failed"), state
            return state if state in ("committing", "pushing") else None

        was = hub.wait_for(at_work, 60, 0.1, what="the snapshot to start")
        for pid in hub.service_pids():
            os.kill(pid, signal.SIGKILL)
        hub.stop()
        hub.start()
        jobs = {j["id"]: j for j in hub.service("GET", "api/snapshots", token=admin_token).json()["jobs"]}
        assert jobs[snapshot["id"]]["state"] == "done" and jobs[snapshot["id"]]["ref"] == snapshot["ref"]
        cut = jobs[job_id]
        assert cut["state"] == "failed", cut
        assert was in ("committing", "pushing")
        assert re.search("The scheduler service restarted while this snapshot was (committing|pushing)", cut["reason"])
        # What it had made is removed in the background, then the reason says so.
        cut = hub.wait_for(lambda: (lambda j: j if "Nothing was kept" in j["reason"] else None)(
            hub.service("GET", f"api/snapshots/{job_id}", token=admin_token).json()["job"]), 120, 1.0,
            what="the interrupted job's clean-up")
        assert image_labels(name) is None and in_registry(name) is None
        leftovers = docker("images", "-aq", "--filter", f"label={L.SNAPSHOT_JOB}={job_id}").stdout.split()
        assert leftovers == [], leftovers
        # The session was not harmed, and it can be snapshotted again under the same name.
        assert json.loads(docker("inspect", c["Id"]).stdout)[0]["State"]["Running"]
    finally:
        stop(hub, bob, "bigsnap")

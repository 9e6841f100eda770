"""One cluster, one image store: two Docker engines as two nodes, the suite's registry (Debian's
docker-registry from scripts/setup.sh), a real hub and Debian's chromium.

node2 is a second dockerd of this module's own (``bai-test-regnode``, 172.30.78.0/24) that starts
with no image at all: every image a session there runs is pulled on demand from the registry.
Each node has one simulated GPU (2 fGPU), so a 2-fGPU session fills a node and the next one goes
to the other; that is how a session is sent to node2.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from pathlib import Path

import pytest
import requests

from bai_scheduler.contract import labels as L
from bai_spawner.images.layout import KERNEL_ENV
from helpers import ARTIFACTS, KERNEL_IMAGE, OLD_IMAGE, ROOT
from helpers.engine import ExtraEngine
from helpers.hub import docker, running_hub
from helpers.images import commit_image, image_id, make_wheel, wait_listed
from helpers.registry import SHARED, delete_from, reference

pytestmark = [pytest.mark.docker, pytest.mark.hub, pytest.mark.slow]

FULL = {"fgpu": "2", "cpu": "0.5", "memory": "1"}  # one whole node
TF_IMAGE = KERNEL_IMAGE.replace("sklearn:1.6.1", "tensorflow:2.21.0")
PASSWORD = "registry-Test-pw-1618"
ADMIN = "regadmin"


def stray_processes(root: str) -> list[int]:
    """Processes of an extra engine that outlive its dockerd (containerd and its shims) after a kill."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if root in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def node2(kernel_images):
    engine = ExtraEngine("bai-test-regnode", 78).start()
    try:
        yield engine
    finally:
        engine.destroy()
        for pid in stray_processes(engine.exec_root):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def hub2(tmp_path_factory, node2):
    prefix = f"bai-test-{secrets.token_hex(3)}-"
    nodes = [{"name": "local", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB"},
             {"name": "node2", "docker_url": node2.url, "gpus": 1, "gpu_memory": "8GiB"}]
    with running_hub(tmp_path_factory.mktemp("reghub"), "jupyterhub-registry-nodes.log", prefix=prefix, nodes=nodes,
                     extra={"Authenticator": {"admin_users": [ADMIN]}}) as h:
        h.repo = f"{prefix}private"
        yield h


def node2_containers(node2, hub):
    ids = node2.docker("ps", "-aq", "--filter", f"name=^/{hub.prefix}").stdout.split()
    return json.loads(node2.docker("inspect", *ids).stdout) if ids else []


def placement_node(hub, user, server):
    return hub.requests()[f"{user}/{server}"]["placement"]["node"]


def used_on(hub, node):
    usage = hub.service("GET", "api/capacity").json()["usage"]
    return next(n["used_quanta"] for n in usage if n["name"] == node)


def stop(hub, user, server):
    if server in hub.servers(user):
        hub.stop_server(user, server)
        hub.wait_gone(user, server, timeout=90)


def failed_spawn_message(hub, user, server, timeout=300) -> str:
    """The message a failed spawn leaves (what the spawn page shows)."""
    hub.wait_for(lambda: not hub.servers(user).get(server, {}).get("pending"), timeout, 1.0, what="the spawn to end")
    assert not hub.servers(user).get(server, {}).get("ready")
    return hub.api("GET", f"/users/{user}/servers/{server}/progress").text


def follow_progress(hub, user, server, pattern, timeout=300, then=None, until=None) -> list[str]:
    """The spawn's progress messages as the spawn page receives them, until one matches ``pattern``;
    with ``then``, that is called at the match and the messages are followed on until one matches
    ``until`` (a failed first spawn of a named server removes the server, and its progress with it:
    the spawn page's live stream is where its last message is read)."""
    messages, matched = [], False
    deadline = time.time() + timeout
    with requests.get(f"{hub.url}/hub/api/users/{user}/servers/{server}/progress", stream=True, timeout=timeout,
                      headers={"Authorization": f"token {hub.admin_token}"}) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                messages.append(json.loads(line[5:]).get("message", ""))
                if not matched and re.search(pattern, messages[-1]):
                    matched = True
                    if then is None:
                        return messages
                    then()
                elif matched and re.search(until, messages[-1]):
                    return messages
            if time.time() > deadline:
                break
    raise AssertionError(f"no progress message matched {until if matched else pattern!r}: {messages}")


def login(page, hub, name):
    hub.set_password(name, PASSWORD)
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", PASSWORD)
    with page.expect_navigation():
        page.click("#login_submit")


@pytest.mark.browser
def test_a_session_placed_on_node2_pulls_its_image_and_runs_the_chosen_version(hub2, node2, browser):
    hub = hub2
    user = "regpull"
    hub.add_user(user)
    assert node2.docker("images", "-q").stdout.split() == []  # node2 holds nothing yet
    assert hub.start_server(user, "fill", {**FULL, "image": KERNEL_IMAGE}).status_code in (201, 202)
    hub.wait_ready(user, "fill", timeout=180)
    assert placement_node(hub, user, "fill") == "local"  # the node that holds the image, both being empty
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    try:
        login(page, hub, user)
        page.goto(f"{hub.url}/hub/spawn/{user}/old")
        page.select_option("#bai-image", OLD_IMAGE)  # the older version, by the name users see
        page.select_option("#bai-fgpu", "2")
        page.fill("#bai-cpu", "0.5")
        page.fill("#bai-memory", "1")
        page.click("#spawn_form button[type=submit]")
        page.wait_for_url("**/spawn-pending/**", timeout=60000)
        # The spawn page shows the pull as it goes: "Pulling bai/sklearn:1.5.2 on node2: 123.4 of 662.0 MB".
        pulling = re.compile(rf"Pulling {re.escape(OLD_IMAGE)} on node2: [\d.]+ [kMG]?B of [\d.]+ [MG]B")
        page.wait_for_function("re => new RegExp(re).test(document.body.textContent)", arg=pulling.pattern,
                               timeout=120000)
        shot = page.screenshot(full_page=True)
        for folder in (ARTIFACTS, ROOT / "docs" / "screenshots"):
            (folder / "spawn-pulling.png").write_bytes(shot)
        page.wait_for_url(f"**/user/{user}/old/**", timeout=300000)
    finally:
        ctx.close()
    assert placement_node(hub, user, "old") == "node2"
    (c,) = [c for c in node2_containers(node2, hub) if c["Config"]["Labels"][L.SERVER] == "old"]
    assert c["Config"]["Image"] == reference(OLD_IMAGE) and c["Image"] == image_id(OLD_IMAGE)
    out = node2.docker("exec", c["Id"], f"{KERNEL_ENV}/bin/python", "-c", "import sklearn; print(sklearn.__version__)")
    assert out.stdout.strip() == "1.5.2", out.stderr
    stop(hub, user, "old")
    stop(hub, user, "fill")


def test_a_private_image_made_on_node1_is_launched_by_its_owner_on_node2_and_by_nobody_else(hub2, node2, tmp_path):
    hub = hub2
    alice, bob, admin = "regalice", "regbob", ADMIN
    tokens = {u: hub.add_user(u) for u in (alice, bob, admin)}
    try:
        assert hub.start_server(alice, "work", {"fgpu": "0", "cpu": "0.5", "memory": "1"}).status_code in (201, 202)
        hub.wait_ready(alice, "work", timeout=180)
        assert placement_node(hub, alice, "work") == "local"
        c = hub.session_container(alice, "work")
        wheel = make_wheel(tmp_path, "bairegpkg", "0.1", init="VALUE = 'made-on-node1'\n")
        assert docker("cp", str(wheel), f"{c['Id']}:/tmp/{wheel.name}").returncode == 0
        out = docker("exec", "-u", "jovyan", c["Id"], "python", "-m", "pip", "install", "--no-index", "--no-deps",
                     f"/tmp/{wheel.name}")
        assert out.returncode == 0, out.stderr
        r = hub.service("POST", "api/snapshots", token=tokens[admin], json={"user": alice, "server": "work", "tag": "v1"})
        assert r.status_code == 202, r.text
        job_id, name = r.json()["job"]["id"], r.json()["job"]["ref"]
        job = hub.wait_for(lambda: (lambda j: j if j["state"] in ("done", "failed") else None)(
            hub.service("GET", f"api/snapshots/{job_id}", token=tokens[admin]).json()["job"]), 300, 1.0,
            what="the snapshot")
        assert job["state"] == "done", job
        assert name == f"{hub.repo}/{alice}:v1"

        # Local is full; alice's session from her private image can only go to node2, which pulls it.
        assert hub.start_server(bob, "fill", {**FULL, "image": KERNEL_IMAGE}).status_code in (201, 202)
        hub.wait_ready(bob, "fill", timeout=180)
        assert placement_node(hub, bob, "fill") == "local"
        assert hub.start_server(alice, "fromsnap", {**FULL, "image_name": name}, token=tokens[alice]).status_code \
            in (201, 202)
        messages = follow_progress(hub, alice, "fromsnap", rf"Pulling {re.escape(name)} on node2: ")
        assert any(m.startswith("Requesting 2 fGPU") for m in messages) and "Admitted on node node2" in " ".join(messages)
        hub.wait_ready(alice, "fromsnap", timeout=300)
        assert placement_node(hub, alice, "fromsnap") == "node2"
        (made,) = [c for c in node2_containers(node2, hub) if c["Config"]["Labels"][L.SERVER] == "fromsnap"]
        assert made["Config"]["Image"] == reference(name) and made["Image"] == job["image_id"]
        out = node2.docker("exec", made["Id"], "python", "-c", "import bairegpkg; print(bairegpkg.VALUE)")
        assert out.stdout.strip() == "made-on-node1", out.stderr

        # bob sees it nowhere and launches it by no name: the form, a typed name, the REST API.
        s = hub.login(bob, PASSWORD)
        form = s.get(f"{hub.url}/hub/spawn/{bob}/steal", timeout=60).text
        assert 'id="bai-image"' in form and name not in form
        catalog = hub.service("GET", "api/catalog", token=tokens[bob]).json()["images"]
        assert name not in [i["short_ref"] for i in catalog] and KERNEL_IMAGE in [i["short_ref"] for i in catalog]
        for server, body in (("steal1", {"image_name": name}), ("steal2", {"image": reference(name)}),
                             ("steal3", {"image": job["image_id"]})):
            r = hub.start_server(bob, server, {**FULL, "fgpu": "0", **body}, token=tokens[bob])
            text = r.text if r.status_code == 400 else failed_spawn_message(hub, bob, server)
            assert "not in the catalog of images you may launch" in text, text
            assert f"{bob}/{server}" not in hub.requests()
    finally:
        for user, server in ((alice, "fromsnap"), (bob, "fill"), (alice, "work")):
            stop(hub, user, server)


def test_a_private_image_outside_its_owners_namespace_is_nobodys(hub2):
    hub = hub2
    carol, dave = "regcarol", "regdave"
    tokens = {u: hub.add_user(u) for u in (carol, dave)}
    # Labelled as carol's, but in dave's namespace of the private repository.
    name = f"{hub.repo}/{dave}:trojan"
    commit_image(hub, KERNEL_IMAGE, name, f"{L.KIND}={L.KIND_PRIVATE}", f"{L.OWNER}={carol}", pushed=True)
    try:
        # The catalog is read again (its cache is short), and leaves the image out, with a warning.
        hub.wait_for(lambda: hub.service("GET", "api/catalog").ok and
                     f"{name} is labelled private to {carol} but is not in" in hub.tail(2000), 60, 1.0,
                     what="the catalog's warning")
        for user in (carol, dave):
            shown = [i["short_ref"] for i in hub.service("GET", "api/catalog", token=tokens[user]).json()["images"]]
            assert name not in shown
            r = hub.start_server(user, "t", {"image_name": name, "fgpu": "0", "cpu": "0.5", "memory": "1"},
                                 token=tokens[user])
            text = r.text if r.status_code == 400 else failed_spawn_message(hub, user, "t")
            assert "not in the catalog of images you may launch" in text, text
    finally:
        delete_from(SHARED, name)
        docker("rmi", "-f", name, reference(name))


def test_a_pull_that_fails_says_why_and_returns_the_share(hub2, node2):
    """A queued session's image is deleted from the registry before its turn comes: on node2 the
    pull fails, the spawn page says so, and node2's share is free again."""
    hub = hub2
    erin = "regerin"
    hub.add_user(erin)
    name = f"{hub.prefix}gone/sklearn:1"
    commit_image(hub, KERNEL_IMAGE, name, f'{L.DISPLAY_NAME}="soon gone"', pushed=True)
    try:
        wait_listed(hub, name)
        for server in ("fill1", "fill2"):
            assert hub.start_server(erin, server, {**FULL, "image": KERNEL_IMAGE}).status_code in (201, 202)
        hub.wait_ready(erin, "fill1", timeout=180)
        hub.wait_ready(erin, "fill2", timeout=300)
        assert {placement_node(hub, erin, s) for s in ("fill1", "fill2")} == {"local", "node2"}
        on_node2 = next(s for s in ("fill1", "fill2") if placement_node(hub, erin, s) == "node2")
        assert hub.start_server(erin, "late", {**FULL, "image_name": name}).status_code in (201, 202)
        hub.wait_for(lambda: hub.requests().get(f"{erin}/late", {}).get("state") == "PENDING", 60, what="queued")

        def delete_then_free_node2():
            assert delete_from(SHARED, name)
            stop(hub, erin, on_node2)

        message = follow_progress(hub, erin, "late", "in queue", then=delete_then_free_node2, until="failed")[-1]
        assert (f"Pulling {name} on node node2 failed: the registry has no such image any more (it was deleted or "
                "replaced); pick another image in the form. Your share was returned.") in message, message
        assert f"{erin}/late" not in hub.requests()
        hub.wait_for(lambda: used_on(hub, "node2") == 0, 60, what="node2's share to be free")
        assert not [c for c in node2_containers(node2, hub) if c["Config"]["Labels"][L.SERVER] == "late"]
    finally:
        for server in ("late", "fill1", "fill2"):
            stop(hub, erin, server)
        docker("rmi", "-f", name, reference(name))


def test_a_node_that_stops_answering_during_a_pull(hub2, node2):
    """node2's engine dies while it pulls a session's image: the spawn says which image, which node
    and why; the share is returned. (Last in this module: node2 stays down.)"""
    hub = hub2
    fay = "regfay"
    hub.add_user(fay)
    try:
        assert hub.start_server(fay, "fill", {**FULL, "image": KERNEL_IMAGE}).status_code in (201, 202)
        hub.wait_ready(fay, "fill", timeout=180)
        assert placement_node(hub, fay, "fill") == "local"
        assert hub.start_server(fay, "tf", {**FULL, "image": TF_IMAGE}).status_code in (201, 202)
        message = follow_progress(hub, fay, "tf", rf"Pulling {re.escape(TF_IMAGE)} on node2: [\d.]+ [kMG]?B of ",
                                  then=node2.proc.kill, until="failed")[-1]
        assert re.search(rf"Pulling {re.escape(TF_IMAGE)} on node node2 failed: the node's Docker engine stopped "
                         r"answering \(\w+\); start the session again.*Your share was returned\.", message), message
        assert f"{fay}/tf" not in hub.requests()
        hub.wait_for(lambda: used_on(hub, "node2") == 0, 60, what="node2's share to be free")
    finally:
        stop(hub, fay, "tf")
        stop(hub, fay, "fill")


def test_a_registry_that_is_down_says_what_to_do_and_starts_nothing(fresh_hub):
    hub = fresh_hub(extra={"BaiRegistry": {"url": "http://127.0.0.1:9"}}).start()
    token = hub.add_user("regnobody")
    s = hub.login("regnobody", PASSWORD)
    form = s.get(f"{hub.url}/hub/spawn/regnobody/x", timeout=60).text
    says = ("The image registry at http://127.0.0.1:9 does not answer (ConnectionError); start it (scripts/setup.sh "
            "starts the local one) or check c.BaiRegistry.url.")
    assert says in form.replace("&#39;", "'")
    r = hub.start_server("regnobody", "x", {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"},
                         token=token)
    text = r.text if r.status_code >= 400 else failed_spawn_message(hub, "regnobody", "x")
    assert says in text and "Nothing was started." in text, text
    assert hub.requests() == {} and hub.session_container("regnobody", "x") is None

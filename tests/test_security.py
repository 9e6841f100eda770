"""Isolation between users, admin-only surfaces, container hardening and the
service token's scopes: a real hub, proxy, scheduler service and Docker engine.
"""
from __future__ import annotations

import json
import secrets

import pytest
import requests

from bai_spawner import catalog
from bai_spawner import labels as L
from conftest import KERNEL_IMAGE
from hubtools import docker

pytestmark = [pytest.mark.docker, pytest.mark.hub]

GPU = {"image": KERNEL_IMAGE, "fgpu": "1", "cpu": "0.5", "memory": "1"}
CPU_ONLY = {**GPU, "fgpu": "0"}


def env_of(c) -> dict:
    return dict(e.split("=", 1) for e in c["Config"]["Env"] or [])


def get(url, token, **kw):
    return requests.get(url, headers={"Authorization": f"token {token}"}, allow_redirects=False, timeout=30, **kw)


@pytest.fixture
def two_sessions(hub, users):
    """alice with 1 fGPU, bob CPU-only, both running."""
    alice, atok = users("alice")
    bob, btok = users("bob")
    assert hub.start_server(alice, "s", GPU).status_code in (201, 202)
    assert hub.start_server(bob, "s", CPU_ONLY).status_code in (201, 202)
    hub.wait_ready(alice, "s")
    hub.wait_ready(bob, "s")
    return (alice, atok), (bob, btok)


def test_a_user_cannot_see_stop_snapshot_or_reach_another_users_session(hub, two_sessions):
    (alice, atok), (bob, btok) = two_sessions
    # See: the request list holds only one's own; another's request is "not found".
    mine = hub.service("GET", "api/requests", token=atok).json()["requests"]
    assert {(r["user"], r["server"]) for r in mine} == {(alice, "s")}
    assert hub.service("GET", f"api/requests/{bob}/s", token=atok).status_code == 404
    bob_attempt = hub.requests()[f"{bob}/s"]["id"]
    assert hub.service("GET", f"api/attempts/{bob_attempt}/wait?epoch=-1&timeout=0", token=atok).status_code == 403
    assert hub.service("DELETE", f"api/attempts/{bob_attempt}", token=atok).status_code == 403
    rows = hub.service("GET", "sessions.json", token=atok).json()["rows"]
    assert bob not in json.dumps(rows)
    # Stop: not through the scheduler, its page form, nor the hub.
    r = hub.service("DELETE", f"api/requests/{bob}/s", token=atok)
    assert r.status_code in (403, 404), r.text
    r = hub.service("POST", "sessions/stop", token=atok, data={"user": bob, "server": "s"}, allow_redirects=False)
    assert r.status_code in (403, 404), r.text
    r = hub.api("DELETE", f"/users/{bob}/servers/s", token=atok)
    assert r.status_code in (403, 404), r.text
    r = hub.api("POST", f"/users/{bob}/servers/other", token=atok, json=CPU_ONLY)
    assert r.status_code in (403, 404), r.text
    # Launch in another's name, or register a request directly (only the hub's spawner may).
    r = hub.service("POST", "api/launch", token=atok, json={"user": bob, "count": 1, "options": CPU_ONLY})
    assert r.status_code in (403, 404), r.text
    r = hub.service("PUT", f"api/requests/{alice}/direct", token=atok, json={"quanta": 0})
    assert r.status_code == 403, r.text
    r = hub.service("PUT", f"api/requests/{bob}/s", token=atok, json={"quanta": 0})
    assert r.status_code == 403, r.text
    # Snapshot: admins only, and so certainly not another's session.
    for body in ({"user": bob, "server": "s", "tag": "stolen"}, {"user": alice, "server": "s", "tag": "mine"}):
        r = hub.service("POST", "api/snapshots", token=atok, json=body)
        assert r.status_code == 403, r.text
    # Reach: bob's server (and the apps it proxies) refuse alice's token.
    for path in ("api/status", "api/contents", "proxy/5000/", "mlflow/", "terminals/1"):
        r = get(f"{hub.url}/user/{bob}/s/{path}", atok)
        assert r.status_code in (302, 403, 404), (path, r.status_code, r.text[:200])
        assert r.status_code != 302 or "/hub/" in r.headers.get("Location", ""), r.headers
    assert get(f"{hub.url}/user/{bob}/s/api/status", btok).status_code == 200  # the owner gets in
    # Nothing of bob's changed.
    assert hub.requests()[f"{bob}/s"]["state"] == "RUNNING"
    assert hub.servers(bob)["s"]["ready"]
    assert hub.session_container(bob, "s")["State"]["Running"]


def test_session_containers_are_unprivileged_and_see_only_their_own_gpu_share(hub, two_sessions):
    (alice, _), (bob, _) = two_sessions
    reqs = hub.requests()
    for user, gpu in ((alice, True), (bob, False)):
        c = hub.session_container(user, "s")
        host = c["HostConfig"]
        assert docker("exec", c["Id"], "id", "-u").stdout.strip() == "1000"
        assert docker("exec", c["Id"], "sh", "-c", "sudo -n true").returncode != 0  # no way up to root
        assert not host["Privileged"]
        assert not host.get("CapAdd"), host.get("CapAdd")
        assert host.get("NetworkMode") != "host" and host.get("PidMode") != "host"
        assert host.get("IpcMode") != "host"  # hami backend: no host IPC
        assert not host.get("Devices"), host.get("Devices")
        mounts = json.dumps(c.get("Mounts") or []) + json.dumps(host.get("Binds") or [])
        assert "docker.sock" not in mounts and "/var/run" not in mounts, mounts
        env = env_of(c)
        assert "DOCKER_HOST" not in env
        lab = c["Config"]["Labels"]
        placement = reqs[f"{user}/s"]["placement"]
        own = [s["device"] for s in placement["shares"]]
        if gpu:
            assert own, placement
            assert env["NVIDIA_VISIBLE_DEVICES"] == lab[L.DEVICES] == ",".join(own)
        else:
            assert own == []
            assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and env.get("CUDA_VISIBLE_DEVICES") == ""
        for req in host.get("DeviceRequests") or []:  # none on a simulated node; own devices on a real one
            assert set(req.get("DeviceIDs") or []) <= set(own), req
            assert req.get("Count") in (None, 0), req  # never "all GPUs" (-1)
    # The only file a session shares with another user's is nothing at all: separate home volumes.
    homes = {user: {m["Name"] for m in hub.session_container(user, "s")["Mounts"] if m["Type"] == "volume"}
             for user in (alice, bob)}
    assert homes[alice] and homes[bob] and not homes[alice] & homes[bob]


def test_non_admins_cannot_reach_admin_apis_or_pages(hub, users):
    name, tok = users("plain")
    for method, path in [("GET", "api/snapshots"), ("POST", "api/snapshots"), ("GET", "admin/snapshots"),
                         ("DELETE", "api/images/bai%2Fsklearn:1.6.1"), ("GET", "api/snapshots/00aa")]:
        r = hub.service(method, path, token=tok, json={} if method == "POST" else None, allow_redirects=False)
        assert r.status_code == 403, (method, path, r.status_code, r.text[:200])
    r = get(f"{hub.url}/hub/admin", tok)  # a page: a token in the header is no login
    assert r.status_code == 403 or r.status_code == 302 and "/hub/login" in r.headers["Location"], r.status_code
    # Logged in with a browser cookie: the hub's admin page and the service's snapshot panel say 403.
    from test_fuzz_api import login

    browser = login(hub, name, "plain-user-" + secrets.token_hex(6))
    assert browser.get(f"{hub.url}/hub/admin", timeout=30).status_code == 403
    r = browser.get(f"{hub.url}/services/bai-scheduler/admin/snapshots", timeout=60)  # OAuth dance, then 403
    assert r.status_code == 403 and "admin" in r.text.lower(), (r.status_code, r.url, r.text[:300])
    r = browser.get(f"{hub.url}/services/bai-scheduler/sessions", timeout=60)
    assert r.status_code == 200 and name in r.text  # the same login does reach the user's own page
    for method, path in [("GET", "/users"), ("POST", "/users/someone-new"), ("GET", "/proxy"),
                         ("POST", "/users/someone-new/tokens"), ("DELETE", "/users/admin"), ("GET", "/services")]:
        r = hub.api(method, path, token=tok)
        assert r.status_code in (403, 404), (method, path, r.status_code)
    # The capacity view a user gets has no other users' sessions in it.
    cap = hub.service("GET", "api/capacity", token=tok).json()
    assert "requests" not in cap


def test_the_scheduler_service_token_has_only_the_scopes_it_needs(hub, users):
    name, _ = users("victim")
    token = (hub.workdir / "var" / "scheduler-token").read_text().strip()
    me = hub.api("GET", "/user", token=token)
    assert me.status_code == 200, me.text
    model = me.json()
    assert model["kind"] == "service" and model["name"] == "bai-scheduler"
    # What it does: list users and their servers, start queued ones, stop on request. Exactly that.
    assert set(model["scopes"]) == SERVICE_SCOPES, str(sorted(model["scopes"]))
    # What it cannot do.
    for method, path, body in [
        ("POST", "/users/bai-sched-made-this", {}),
        ("POST", f"/users/{name}/tokens", {"note": "x"}),
        ("DELETE", f"/users/{name}", None),
        ("PATCH", f"/users/{name}", {"admin": True}),
        ("GET", "/proxy", None),
        ("POST", "/shutdown", None),
        ("POST", "/groups/x", None),
    ]:
        r = hub.api(method, path, token=token, json=body)
        assert r.status_code in (403, 404), (method, path, r.status_code, r.text[:200])
    assert hub.api("GET", f"/users/{name}", token=token).status_code == 200  # it reads users
    # ...and it cannot reach into users' sessions (no access:servers).
    assert "access:servers" not in json.dumps(model["scopes"])


# The service's role (list:users, read:users, read:servers, servers) as JupyterHub expands it.
SERVICE_SCOPES = {
    "list:users", "read:users", "read:users:name", "read:users:groups", "read:users:activity",
    "read:servers", "servers", "start:servers", "delete:servers",
}


def test_a_user_cannot_use_another_users_private_image(hub, users):
    owner, otok = users("owner")
    thief, ttok = users("thief")
    ref = f"{hub.prefix}private/{owner}:sec"
    tmp = f"{hub.prefix}mkpriv"
    assert docker("create", "--name", tmp, KERNEL_IMAGE, "true").returncode == 0
    try:
        out = docker("commit", "--change", f"LABEL {L.KIND}={L.KIND_PRIVATE}", "--change", f"LABEL {L.OWNER}={owner}",
                     "--change", f"LABEL {L.DISPLAY_NAME}=sec-private", tmp, ref)
        assert out.returncode == 0, out.stderr
    finally:
        docker("rm", "-f", tmp)
    image_id = json.loads(docker("image", "inspect", ref).stdout)[0]["Id"]
    try:
        # The owner sees it; the thief does not.
        assert ref in json.dumps(hub.service("GET", "api/images?mine=1", token=otok).json()["images"])
        assert ref not in json.dumps(hub.service("GET", "api/images", token=ttok).json())
        # The spawn form's catalog logic agrees.
        images = catalog.build_catalog(json.loads(docker("image", "inspect", ref, KERNEL_IMAGE).stdout))
        assert catalog.resolve_image(images, owner, ref).ref == ref
        for r_ in (ref, image_id, image_id[:19], ref.split(":")[0] + ":latest"):
            with pytest.raises(catalog.ImageNotAllowed):
                catalog.resolve_image(images, thief, r_)
        # Through the hub: by name, by id and by id prefix, refused before anything is made.
        for i, wanted in enumerate((ref, image_id, image_id[:19])):
            server = f"p{i}"
            r = hub.start_server(thief, server, {**CPU_ONLY, "image": wanted})
            if r.status_code in (201, 202):
                hub.wait_for(lambda: not hub.servers(thief).get(server, {}).get("pending"), 60, what="refusal")
                assert not hub.servers(thief).get(server, {}).get("ready")
                text = hub.api("GET", f"/users/{thief}/servers/{server}/progress").text
            else:
                assert r.status_code == 400, r.text
                text = r.text
            assert "not in the catalog" in text, text[:300]
            assert hub.session_container(thief, server) is None
            assert f"{thief}/{server}" not in hub.requests()
    finally:
        docker("rmi", "-f", ref)

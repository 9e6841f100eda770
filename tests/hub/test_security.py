"""Isolation between users, admin-only surfaces, container hardening and the
service token's scopes: a real hub, proxy, scheduler service and Docker engine.
"""
from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
from pathlib import Path

import pytest
import requests

from bai_scheduler.contract import catalog
from bai_scheduler.contract import labels as L
from helpers import KERNEL_IMAGE
from helpers.fuzz import ACCESS
from helpers.hub import docker
from helpers.images import commit_image, wait_listed
from helpers.registry import SHARED, delete_from, reference
from helpers.service import Raw, expanded_scopes

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
    browser = hub.login(name, "plain-user-" + secrets.token_hex(6))
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
    # In the registry, as a snapshot puts it: the catalog lists it, and only its owner may launch it.
    image_id = commit_image(hub, KERNEL_IMAGE, ref, f"{L.KIND}={L.KIND_PRIVATE}", f"{L.OWNER}={owner}",
                            f"{L.DISPLAY_NAME}=sec-private", pushed=True)
    try:
        wait_listed(hub, ref)
        # The owner sees it; the thief does not.
        assert ref in json.dumps(hub.service("GET", "api/images?mine=1", token=otok).json()["images"])
        assert ref not in json.dumps(hub.service("GET", "api/images", token=ttok).json())
        # The spawn form's catalog logic agrees, on the catalog the spawner gets (every image).
        images = [catalog.CatalogImage.from_json(i) for i in hub.service("GET", "api/catalog").json()["images"]]
        allowed = catalog.resolve_image(images, owner, ref)
        assert (allowed.short_ref, allowed.ref, allowed.id) == (ref, reference(ref), image_id)
        for r_ in (ref, reference(ref), image_id, image_id[:19], ref.split(":")[0] + ":latest"):
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
        delete_from(SHARED, ref)
        docker("rmi", "-f", ref, reference(ref))


# -- the hub's internal API, engine addresses, metrics, tokens of narrower scope, bad headers ----------

def listening_addresses(port: int) -> set[str]:
    """The addresses this machine listens on at TCP ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(path).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            out.add(socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return out


def test_the_hubs_internal_api_listens_only_where_containers_reach_it(hub):
    bridge = json.loads(docker("network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}").stdout)
    subnets = [ipaddress.ip_network(n["Subnet"]) for n in bridge]
    bound = listening_addresses(int(hub.env["BAI_HUB_API_PORT"]))
    assert len(bound) == 1 and any(ipaddress.ip_address(a) in net for a in bound for net in subnets), (bound, subnets)
    # The public side stays on loopback; the sessions (tests/hub/test_hub_sessions.py) reach the API.
    assert listening_addresses(hub.port) == {"127.0.0.1"}


def test_users_see_no_engine_address_and_metrics_need_their_scope(hub, two_sessions):
    (alice, atok), _ = two_sessions
    for path in ("api/capacity", "capacity.json?quanta=1", "api/requests", f"api/requests/{alice}/s", "sessions.json"):
        text = hub.service("GET", path, token=atok).text
        assert not re.search(r'"docker_url"|"tls"', text), (path, text[:300])
    admin_view = hub.service("GET", "api/capacity").json()
    assert "docker_url" in admin_view["nodes"][0] and "docker_url" in admin_view["usage"][0]
    # Health: open, and only ok or not.
    r = requests.get(f"{hub.url}/services/bai-scheduler/api/health", timeout=30)
    assert (r.status_code, r.json()) == (200, {"ok": True})
    # Metrics: a token with read:metrics (the test admin's role has it), as the hub's own /hub/metrics.
    assert requests.get(f"{hub.url}/services/bai-scheduler/metrics", timeout=30).status_code == 403
    assert hub.service("GET", "metrics", token=atok).status_code == 403
    assert "bai_fgpu_in_use_quanta 2.0" in hub.service("GET", "metrics").text
    assert requests.get(f"{hub.url}/hub/metrics", timeout=30).status_code == 403


def scoped_token(hub, user: str, scopes: list[str]) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"note": "narrow", "expires_in": 3600, "scopes": scopes})
    assert r.status_code == 201, r.text
    identify = {f"read:users:{f}!user={user}" for f in ("name", "groups")}
    assert set(r.json()["scopes"]) <= set(expanded_scopes(scopes, user)) | identify, r.json()["scopes"]
    return r.json()["token"]


def test_a_token_limited_to_the_service_cannot_start_or_stop_through_it(hub, users):
    name, _ = users("limited")
    assert hub.start_server(name, "s", CPU_ONLY).status_code in (201, 202)
    hub.wait_ready(name, "s")
    access_only = scoped_token(hub, name, [ACCESS])
    read_only = scoped_token(hub, name, [ACCESS, f"read:servers!user={name}"])
    for token in (access_only, read_only):
        assert hub.service("GET", "api/requests", token=token).json()["requests"]  # it may look
        r = hub.service("DELETE", f"api/requests/{name}/s", token=token)
        assert r.status_code == 403 and "delete:servers" in r.json()["message"], r.text
        r = hub.service("POST", "sessions/stop", token=token, data={"user": name, "server": "s"}, allow_redirects=False)
        assert r.status_code == 403, r.text
        r = hub.service("POST", "api/launch", token=token, json={"count": 2, "options": CPU_ONLY})
        assert r.status_code == 403 and "start:servers" in r.json()["message"], r.text
        r = hub.service("POST", "sessions/new", token=token, data={**CPU_ONLY, "sessions": "1"}, allow_redirects=False)
        assert r.status_code == 403, r.text
        # The hub's own API says the same to such a token.
        assert hub.api("DELETE", f"/users/{name}/servers/s", token=token).status_code == 403
    assert set(hub.servers(name)) == {"s"} and hub.servers(name)["s"]["ready"]
    assert f"{name}/s" in hub.requests()
    # The user's own browser login stops it through the sessions page.
    browser = hub.login(name, "limited-user-" + secrets.token_hex(6))
    page = browser.get(f"{hub.url}/services/bai-scheduler/sessions", timeout=60)
    assert page.status_code == 200, page.text[:300]
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = browser.post(f"{hub.url}/services/bai-scheduler/sessions/stop", data={"_xsrf": xsrf, "user": name, "server": "s"},
                     allow_redirects=False, timeout=60)
    assert r.status_code == 303, (r.status_code, r.text[:300])
    hub.wait_gone(name, "s")
    assert f"{name}/s" not in hub.requests()


def test_a_token_with_the_users_server_scope_starts_and_stops_through_the_service(hub, users):
    name, _ = users("scoped")
    token = scoped_token(hub, name, [ACCESS, f"servers!user={name}"])
    r = hub.service("POST", "api/launch", token=token, json={"count": 1, "options": CPU_ONLY})
    assert r.status_code == 202, r.text
    server = r.json()["launched"][0]
    hub.wait_ready(name, server)
    assert hub.service("DELETE", f"api/requests/{name}/{server}", token=token).status_code == 200
    hub.wait_gone(name, server)


BAD_AUTH = ["token \xe9t\xe9", "Bearer \xff\xfe", "token " + "a" * 2000, "token " + "a" * 20000, "Basic dXNlcjpwYXNz",
            "token", "Bearer", "token \x7f", "\xe9"]


def test_every_bad_authorization_header_is_a_4xx_through_the_proxy(hub, users):
    name, _ = users("headers")
    paths = [("GET", "/hub/api/user"), ("GET", "/hub/api/users"), ("POST", f"/hub/api/users/{name}/servers/x"),
             ("DELETE", f"/hub/api/users/{name}/servers/x"), ("GET", "/hub/metrics"),
             ("GET", "/services/bai-scheduler/api/capacity"), ("GET", "/services/bai-scheduler/api/requests"),
             ("POST", "/services/bai-scheduler/api/launch"), ("DELETE", f"/services/bai-scheduler/api/requests/{name}/x"),
             ("GET", "/services/bai-scheduler/metrics"), ("GET", "/services/bai-scheduler/sessions.json"),
             ("GET", f"/user/{name}/x/api/status")]
    for header in BAD_AUTH:
        for method, path in paths:
            r = requests.request(method, hub.url + path, headers={"Authorization": header.encode("latin-1")},
                                 json={} if method == "POST" else None, allow_redirects=False, timeout=60)
            # A page that is not the API may send the browser to the hub (to log in, or to start it).
            page = path.startswith("/user/")
            assert 400 <= r.status_code < 500 or (page and r.status_code == 302 and "/hub/" in r.headers["Location"]), \
                (method, path, header[:30], r.status_code, r.text[:300])
    assert not hub.servers(name)


def test_a_malformed_path_is_a_400_not_the_proxys_500(hub, users):
    """configurable-http-proxy decodes every path to route it; a path that is not valid
    percent-encoding is the client's mistake (hub_config/proxy.mjs)."""
    name, token = users("badpath")
    for method, path in [("POST", f"/hub/api/users/{name}/servers/%ff"), ("DELETE", f"/hub/api/users/{name}/servers/%"),
                         ("GET", "/hub/api/users/%E0%A4%A"), ("GET", "/services/bai-scheduler/api/requests/%ff/x"),
                         ("GET", f"/user/{name}/%c3/lab"), ("GET", "/%")]:
        code, _, out = Raw(hub.port).call(method, path, token=token)  # the path as written, not re-quoted
        assert code == 400, (method, path, code, out[:200])
    # Valid escapes still reach the hub and the service.
    assert hub.api("GET", f"/users/{name}", token=token).status_code == 200
    assert hub.service("GET", f"api/requests/{name}/%C3%A9", token=token).status_code == 404


# -- sign-up and approval (NativeAuthenticator, hub_config/auth.py) -----------------------------------

def hub_form_post(hub, path: str, data: dict, session: requests.Session | None = None) -> requests.Response:
    """POST a hub form as a browser does: with the _xsrf cookie and field of a first GET."""
    s = session or requests.Session()
    r = s.get(f"{hub.url}{path}", timeout=30)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
    return s.post(f"{hub.url}{path}", data={**data, "_xsrf": xsrf.group(1) if xsrf else s.cookies.get("_xsrf")},
                  allow_redirects=False, timeout=30)


def sign_up(hub, name: str, password: str) -> requests.Response:
    return hub_form_post(hub, "/hub/signup", {"username": name, "signup_password": password,
                                               "signup_password_confirmation": password})


def can_log_in(hub, name: str, password: str) -> bool:
    return hub_form_post(hub, "/hub/login", {"username": name, "password": password}).status_code == 302


def test_sign_up_names_are_plain_names_never_markup(hub):
    password = "Sign-up-" + secrets.token_hex(8)
    for name in ("x\ttabindex=1\tautofocus\tonfocus=alert(1)", "y\x0cstyle=x", 'q"onclick="alert(1)', "a<b>",
                 "two words", "-dash", "equal=sign", "x" * 65):
        assert sign_up(hub, name, password).status_code == 200
        assert hub.api("GET", f"/users/{requests.utils.quote(name, safe='')}").status_code == 404, name
        assert hub.api("POST", f"/users/{requests.utils.quote(name.lower(), safe='')}").status_code == 400, name
    admin = hub.login("admin", "Admin-" + secrets.token_hex(8))
    page = admin.get(f"{hub.url}/hub/authorize", timeout=30)
    assert page.status_code == 200
    assert not re.search(r"onfocus|onclick|style=x|<b>|tabindex=1", page.text), page.text[:2000]
    assert sign_up(hub, "plain.name-1", password).status_code == 200
    assert 'id="plain.name-1"' in admin.get(f"{hub.url}/hub/authorize", timeout=30).text


def test_approving_or_discarding_a_sign_up_needs_the_admins_post_not_a_link(hub):
    eve, mallory, password = "csrfeve", "csrfmallory", "Eve-pass-" + secrets.token_hex(8)
    for name in (eve, mallory):
        assert sign_up(hub, name, password).status_code == 200
    assert not can_log_in(hub, eve, password)  # waits for an admin
    admin = hub.login("admin", "Admin-" + secrets.token_hex(8))
    # A link, or a redirect from another site (through the hub's own login too), is a GET: nothing happens.
    for path in (f"/hub/authorize/{eve}", f"/hub/login?next=%2Fhub%2Fauthorize%2F{eve}",
                 f"/hub/discard/{mallory}", f"/hub/login?next=%2Fhub%2Fdiscard%2F{mallory}"):
        assert admin.get(f"{hub.url}{path}", timeout=30).status_code == 200, path
    assert not can_log_in(hub, eve, password)
    assert f'id="{mallory}"' in admin.get(f"{hub.url}/hub/authorize", timeout=30).text
    # A post without the admin's xsrf token is refused, and so is one from a user who is no admin.
    for path in (f"/hub/authorize/{eve}", f"/hub/discard/{mallory}"):
        # (the login helper sends the xsrf header on every request: leave it out here)
        assert admin.post(f"{hub.url}{path}", headers={"X-XSRFToken": None}, allow_redirects=False,
                          timeout=30).status_code == 403, path
    plain = hub.login("csrfplain", "Plain-" + secrets.token_hex(8))
    assert hub_form_post(hub, f"/hub/authorize/{eve}", {}, session=plain).status_code == 403
    assert not can_log_in(hub, eve, password)
    # The authorization page's buttons post with the token.
    page = admin.get(f"{hub.url}/hub/authorize", timeout=30).text
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page).group(1)
    assert f'action="/hub/authorize/{eve}"' in page and f'action="/hub/discard/{mallory}"' in page
    r = admin.post(f"{hub.url}/hub/authorize/{eve}", data={"_xsrf": xsrf}, allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text[:300]
    assert can_log_in(hub, eve, password)
    r = admin.post(f"{hub.url}/hub/discard/{mallory}", data={"_xsrf": xsrf}, allow_redirects=False, timeout=30)
    assert r.status_code == 302
    assert f'id="{mallory}"' not in admin.get(f"{hub.url}/hub/authorize", timeout=30).text


def test_after_each_password_change_only_the_new_password_logs_in(hub):
    """The test helper changes a password the way a user does, so the hub sees each change. (It once
    wrote the database behind the hub's back: the hub kept the rows its authorization page had read,
    and the admin's login of the next test failed now and then with its new password.)"""
    name = hub.env.get("BAI_ADMIN_USER", "admin")  # an admin by the hub's config
    passwords = ["Changed-" + secrets.token_hex(8) for _ in range(6)]
    for old, new in zip([None, *passwords], passwords):
        admin = hub.login(name, new)
        assert admin.get(f"{hub.url}/hub/authorize", timeout=30).status_code == 200
        if old:
            assert not can_log_in(hub, name, old)

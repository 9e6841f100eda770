"""What a caller of the scheduler service may see and do, against a standalone service process
(tests/helpers/service.py: a fake hub answers its token checks and starts or stops nothing).

* Engine addresses (``docker_url``, TLS files) are for admins and the hub's spawner only.
* ``metrics`` needs ``read:metrics`` unless ``authenticate_prometheus`` is off; ``api/health`` is
  open and says ok or not, nothing more.
* The service starts and stops servers for a caller only with the caller's own right to: a token's
  ``start:servers`` / ``delete:servers`` for that user, or the user's own browser login.
* Every bad ``Authorization`` header is a 4xx.

The same service surfaces are fuzzed in tests/test_fuzz_api.py; the real hub's side is in
tests/hub/test_security.py.
"""
from __future__ import annotations

import json
import re
from urllib.parse import urlencode

import pytest

from helpers.fuzz import ACCESS
from helpers.hub import free_port
from helpers.service import PREFIX, standalone_service

TLS_DIR = "/etc/bai-sec-test-tls"
CONFIG = """
c = get_config()
c.BaiScheduler.db_url = {db!r}
c.BaiScheduler.nodes = [{{"name": "gpu-a", "docker_url": "tcp://127.0.0.1:{dead}", "gpus": 1, "gpu_memory": "8GiB",
                          "tls": {{"ca_cert": "{tls}/ca.pem", "client_cert": ["{tls}/cert.pem", "{tls}/key.pem"]}}}}]
c.BaiScheduler.private_image_repo = "bai-test-sec-private"
c.BaiScheduler.authenticate_prometheus = {auth}
"""


def start(tmp, auth=True):
    config = CONFIG.format(db=f"sqlite:///{tmp / 'sec.sqlite'}", dead=free_port(), tls=TLS_DIR, auth=auth)
    return standalone_service(tmp, config, f"security-service-{'auth' if auth else 'open'}.log")


class Caller:
    """The service with alice's running session and tokens of several kinds."""

    def __init__(self, raw, token, hub):
        self.raw, self.internal, self.hub = raw, token, hub
        self.tokens = {
            "alice": hub.user("alice"),
            "alice-access-only": hub.user("alice", scopes=[ACCESS]),
            "alice-servers": hub.user("alice", scopes=[ACCESS, "servers!user=alice"]),
            "alice-start-only": hub.user("alice", scopes=[ACCESS, "start:servers!user=alice"]),
            "alice-other-server": hub.user("alice", scopes=[ACCESS, "servers!server=alice/other"]),
            "alice-read": hub.user("alice", scopes=[ACCESS, "read:servers!user=alice"]),
            "alice-metrics": hub.user("alice", scopes=[ACCESS, "read:metrics"]),
            "bob": hub.user("bob"),
            "boss": hub.user("boss", admin=True),
            "boss-access-only": hub.user("boss", admin=True, scopes=[ACCESS]),
            "internal": token,
        }

    def call(self, method, path, who=None, body=None, headers=None):
        token = self.tokens[who] if who else None
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return self.raw.call(method, PREFIX + path, body=body, token=token, headers=headers)

    def register(self, user, server, quanta=2):
        code, _, out = self.call("PUT", f"api/requests/{user}/{server}", "internal",
                                 {"quanta": quanta, "image": "bai/sklearn:1.6.1", "user_options": {}})
        assert code == 201, out
        return json.loads(out)

    def requests(self) -> dict:
        code, _, out = self.call("GET", "api/requests", "internal")
        assert code == 200, out
        return {f"{r['user']}/{r['server']}": r["id"] for r in json.loads(out)["requests"]}

    def states(self) -> dict:
        code, _, out = self.call("GET", "api/requests", "internal")
        assert code == 200, out
        return {f"{r['user']}/{r['server']}": r["state"] for r in json.loads(out)["requests"]}

    def hub_changes(self) -> list:
        """What the service asked the hub to start or stop."""
        return [c for c in self.hub.calls if c[0] in ("POST", "DELETE")]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    with start(tmp_path_factory.mktemp("security-service")) as (raw, token, hub, _):
        s = Caller(raw, token, hub)
        s.seed = s.register("alice", "a")
        yield s


def engine_leaks(body: bytes) -> list[str]:
    text = body.decode("utf-8", "replace")
    return re.findall(r"tcp://127\.0\.0\.1:\d+|" + re.escape(TLS_DIR) + r"[^\"']*|docker_url|\"tls\"", text)


USER_VIEWS = ["api/capacity", "capacity.json?quanta=1&count=2", "api/requests", "api/requests/alice/a",
              "sessions.json", "sessions", "", "api/images", "api/images?mine=1", "no-such-page"]


@pytest.mark.parametrize("who", ["alice", "alice-access-only", "bob", "boss-access-only"])
def test_users_see_no_engine_address(svc, who):
    assert svc.seed["placement"]["node"] == "gpu-a"
    for path in USER_VIEWS:
        code, _, out = svc.call("GET", path, who)
        assert code < 500 or path.startswith("api/images"), (path, code, out[:300])
        assert not engine_leaks(out), (who, path, engine_leaks(out))
    code, _, out = svc.call("GET", "api/capacity", who)
    cap = json.loads(out)
    assert [n["name"] for n in cap["nodes"]] == ["gpu-a"] and cap["usage"][0]["used_quanta"] == 2
    if who.startswith("alice"):
        code, _, out = svc.call("GET", "api/requests/alice/a", who)
        assert json.loads(out)["placement"]["node"] == "gpu-a"  # the node's name, its devices and use


def test_admins_and_the_spawner_see_engine_addresses(svc):
    cap = json.loads(svc.call("GET", "api/capacity", "boss")[2])
    assert cap["nodes"][0]["docker_url"].startswith("tcp://127.0.0.1:")
    assert cap["usage"][0]["docker_url"] == cap["nodes"][0]["docker_url"]
    status = json.loads(svc.call("GET", "api/requests/alice/a", "boss")[2])
    assert status["placement"]["tls"]["ca_cert"] == f"{TLS_DIR}/ca.pem"
    # The spawner builds the container on the granted node from its registration's answer.
    assert svc.seed["placement"]["docker_url"] == cap["nodes"][0]["docker_url"]
    assert svc.seed["placement"]["tls"]["client_cert"] == [f"{TLS_DIR}/cert.pem", f"{TLS_DIR}/key.pem"]


def test_health_says_only_ok(svc):
    for who in (None, "alice", "boss"):
        code, _, out = svc.call("GET", "api/health", who)
        assert (code, json.loads(out)) == (200, {"ok": True})


def test_metrics_need_the_read_metrics_scope(svc):
    for who in (None, "alice", "alice-access-only", "boss-access-only"):
        code, _, out = svc.call("GET", "metrics", who)
        assert code == 403, (who, code, out[:200])
        assert b"bai_queue_length" not in out
        assert re.search("read:metrics" if who else "Log in", json.loads(out)["message"]), out
    for who in ("alice-metrics", "boss", "internal"):
        code, headers, out = svc.call("GET", "metrics", who)
        assert code == 200 and b"bai_fgpu_in_use_quanta 2.0" in out, (who, code, out[:200])


def test_metrics_are_open_when_authentication_is_off(tmp_path):
    with start(tmp_path, auth=False) as (raw, _, _, _):
        code, _, out = raw.call("GET", PREFIX + "metrics")
        assert code == 200 and b"bai_queue_length 0.0" in out


# -- acting for a user: the caller's own scopes, not the service's ---------------------------------

def test_a_token_without_server_scopes_cannot_stop_or_start_through_the_service(svc):
    before, calls = svc.requests(), len(svc.hub_changes())
    for who in ("alice-access-only", "alice-read", "alice-start-only", "alice-other-server", "boss-access-only"):
        for method, path, body in [
            ("DELETE", "api/requests/alice/a", None),
            ("POST", "sessions/stop", urlencode({"user": "alice", "server": "a"}).encode()),
        ]:
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if method == "POST" else None
            code, _, out = svc.call(method, path, who, body, headers=headers)
            if who == "boss-access-only":  # not an admin with this token: alice's session is not his
                assert code == 404, (who, method, path, code, out[:300])
            else:
                assert code == 403 and b"delete:servers" in out, (who, method, path, code, out[:300])
    for who in ("alice-access-only", "alice-read", "alice-other-server", "boss-access-only"):
        code, _, out = svc.call("POST", "api/launch", who, {"count": 1, "user": "alice"})
        assert code == 403, (who, code, out[:300])
        if who == "boss-access-only":  # not an admin with this token: alice's sessions are not his
            assert b"Only admins may launch sessions for another user" in out, out[:300]
        code, _, out = svc.call("POST", "api/launch", who, {"count": 1})
        assert code == 403 and b"start:servers" in out, (who, code, out[:300])
        code, _, out = svc.call("POST", "sessions/new", who, urlencode({"fgpu": "0", "cpu": "1", "memory": "1"}).encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert code == 403 and b"start:servers" in out, (who, code, out[:300])
    assert svc.requests() == before
    assert len(svc.hub_changes()) == calls, svc.hub_changes()[calls:]


def test_a_hub_token_without_the_access_scope_is_told_which_scope_it_lacks(svc):
    """Review finding 5: such a token was told to 'send a hub API token', which it is."""
    token = svc.hub.user("alice", scopes=["servers!user=alice"])
    for method, path in [("GET", "api/requests"), ("POST", "api/launch")]:
        code, _, out = svc.call(method, path, body={"count": 1} if method == "POST" else None,
                                headers={"Authorization": f"token {token}"})
        assert code == 403 and b"access:services" in out, (method, path, code, out[:300])
    code, _, out = svc.call("GET", "api/requests")  # no token at all
    assert code == 403 and b"Log in through the hub, or send a hub API token." in out, out[:300]


def test_an_admins_token_limited_to_the_service_is_not_an_admin_here(svc):
    for method, path in [("GET", "api/snapshots"), ("GET", "admin/snapshots"), ("DELETE", "api/images/x%2Fy:1")]:
        code, _, out = svc.call(method, path, "boss-access-only")
        assert code == 403, (method, path, code, out[:200])
    code, _, out = svc.call("GET", "api/requests", "boss-access-only")
    assert json.loads(out)["requests"] == []  # boss has no sessions of his own
    code, _, out = svc.call("GET", "api/requests/alice/a", "boss-access-only")
    assert code == 404
    # boss's full token is an admin's.
    assert len(json.loads(svc.call("GET", "api/requests", "boss")[2])["requests"]) == 1


def test_a_token_with_the_users_server_scopes_acts_for_that_user_only(svc):
    svc.register("alice", "b", quanta=0)
    calls = len(svc.hub_changes())
    # start:servers is enough to ask for a launch (the fake hub refuses to start anything).
    for who in ("alice-servers", "alice-start-only", "alice"):
        code, _, out = svc.call("POST", "api/launch", who, {"count": 1})
        assert code == 400 and b"the fake hub starts nothing" in out, (who, code, out[:300])
        # the hub's own message, not its JSON body nested in ours (review finding 5)
        assert json.loads(out)["message"] == "Started none; the hub refused session-1: the fake hub starts nothing"
    assert [c[0] for c in svc.hub_changes()[calls:]] == ["POST"] * 3
    # ...and not for bob, whose requests alice's tokens cannot even see.
    code, _, out = svc.call("POST", "api/launch", "alice-servers", {"count": 1, "user": "bob"})
    assert code == 403 and b"Only admins may launch sessions for another user" in out, out[:300]
    code, _, out = svc.call("DELETE", "api/requests/alice/b", "alice-servers")
    assert code == 200, out
    # The fake hub does not know the server, so the service stops it itself: its share is held
    # (STOPPING) until the container is known gone, which this test's dead engine never says.
    states = svc.states()
    assert states["alice/b"] == "STOPPING" and states["alice/a"] == "RUNNING", states


# -- bad Authorization headers ---------------------------------------------------------------------

BAD_HEADERS = [
    "token \xe9t\xe9", "token \xff" * 3, "Bearer caf\xe9", "\xe9", "token " + "a" * 2000, "token " + "a" * 60000,
    "Basic dXNlcjpwYXNz", "token", "token ", "Bearer", "Digest x", " token abc", "token a b c", "tokenabc",
    "token \x7f", "token \x01", "TOKEN 0", "bearer " + "f" * 32, "",
]


@pytest.mark.parametrize("path", ["api/capacity", "api/requests", "api/requests/alice/a", "metrics", "sessions",
                                  "sessions.json", "api/snapshots", "api/images", "admin/snapshots", "api/launch",
                                  "oauth_callback?code=x&state=y", "api/health"])
def test_every_bad_authorization_header_is_a_4xx(svc, path):
    for header in BAD_HEADERS:
        for method in ("GET", "POST", "DELETE"):
            try:
                code, got, out = svc.call(method, path, headers={"Authorization": header.encode("latin-1")},
                                          body=b"{}" if method == "POST" else None)
            except ConnectionResetError:
                # A server that refuses a 60 KB header may close before the client finished
                # writing it; the client then sees a reset instead of the 4xx. Refused either way.
                assert len(header) > 8192, (method, path, header[:40])
                continue
            assert code < 500, (method, path, header[:40], code, out[:300])
            if code == 302:  # a page, and no token that could be one: off to the hub to log in
                assert "/hub/api/oauth2/authorize" in got["Location"] and header.isascii(), (method, path, header[:40])
            elif path != "api/health" or method != "GET":
                assert 400 <= code < 500, (method, path, header[:40], code, out[:300])
    # The internal token in odd wrappings is not the internal token.
    for header in ("token " + svc.internal + "\xe9", "token \xe9" + svc.internal, "Basic " + svc.internal):
        code, _, out = svc.call("PUT", "api/requests/alice/zz", headers={"Authorization": header.encode("latin-1")},
                                body=b'{"quanta": 0}')
        assert 400 <= code < 500, (header[:12], code, out[:200])
    assert "alice/zz" not in svc.requests()


@pytest.mark.parametrize("token", ["a%0Ab", "%E4%B8%AD", "caf%C3%A9", "a" * 5000, "%ff", "x%00y"])
def test_a_bad_token_in_the_url_is_a_4xx(svc, token):
    # HubAuth reads ?token= on websocket requests; it is checked like the header.
    for path in ("api/capacity", "sessions", "metrics"):
        code, got, out = svc.call("GET", f"{path}?token={token}", headers={"Sec-Fetch-Mode": "websocket"})
        # (tornado turns control characters in arguments into blanks: "x y" is then just no token,
        # and the page sends the browser to log in)
        assert 400 <= code < 500 or code == 302 and "oauth2/authorize" in got["Location"], (path, token[:20], code)
        assert b"127.0.0.1" not in out


def test_a_hub_that_does_not_answer_is_a_503_without_its_address(tmp_path):
    with start(tmp_path) as (raw, _, hub, _):
        token = hub.user("alice")
        hub.close()
        code, _, out = raw.call("GET", PREFIX + "api/capacity", token=token)
        assert code == 503 and "try again" in json.loads(out)["message"], (code, out)
        assert b"127.0.0.1" not in out and b"/hub/api" not in out

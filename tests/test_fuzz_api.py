"""Bad input, fuzzed: every REST endpoint of the scheduler service.

A standalone ``bai_scheduler.app`` process (tests/helpers/service.py): its Docker
node points at a closed port on 127.0.0.1, so nothing on the real engine is read
or changed and no container event can move the state under the test; a tiny fake
hub API answers the service's token checks for the user tokens.  The hub's spawn
API and HTML form are fuzzed through a real hub in tests/hub/test_fuzz_hub.py.

Each answer must be a 4xx with a JSON ``message`` (or a 2xx where the input is
valid), never a 5xx, and the scheduler's state (GET api/requests and
api/capacity) must be unchanged afterwards. The number of cases tried is
printed and written to ``test-artifacts/fuzz-counts.json``.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import secrets
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.fuzz import (ACCESS, COUNTS, NARROW_SCOPES, any_json, bad_auth_headers, json_bytes,  # noqa: F401
                          json_values, malformed, names, narrow_scopes, path_part, print_counts)
from helpers.hub import free_port
from helpers.service import PREFIX, FakeHub, Raw, standalone_service

# -- the standalone service --------------------------------------------------------------------------

SERVICE_CONFIG = """
c = get_config()
c.BaiScheduler.db_url = {db!r}
c.BaiScheduler.fgpu_per_gpu = 2
c.BaiScheduler.fgpu_step = "0.5"
c.BaiScheduler.nodes = [{{"name": "fz", "docker_url": "tcp://127.0.0.1:{dead}", "gpus": 2, "gpu_memory": "8GiB"}}]
c.BaiScheduler.private_image_repo = "bai-test-fuzz-private"
c.BaiScheduler.wait_timeout = 1
"""


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-service")
    config = SERVICE_CONFIG.format(db=f"sqlite:///{tmp / 'fz.sqlite'}", dead=free_port())
    with standalone_service(tmp, config, "fuzz-service.log") as (raw, token, hub, log_path):
        s = Service(raw, token, hub, log_path)
        s.seed()
        yield s


class Service:
    # 2 simulated GPUs of 4 quanta (2 fGPU, steps of 0.5), all held; two more queued.
    SEED = [("alice", "a", 4), ("bob", "b", 4), ("bob", "c", 4), ("carol", "", 2)]

    def __init__(self, raw: Raw, token: str, hub: FakeHub, log_path: Path):
        self.raw, self.token, self.hub, self.log_path = raw, token, hub, log_path
        self.tokens = {
            "internal": token,
            "alice": hub.user("alice"),
            "boss": hub.user("boss", admin=True),
            "nobody": "not-a-token-" + secrets.token_hex(4),
            None: None,
        }
        # Tokens narrower than their owner: none may stop anything, only "alice-start-only" may launch.
        for who, (user, scopes) in NARROW.items():
            self.tokens[who] = hub.user(user, admin=user == "boss", scopes=scopes)
        self.ids: dict[str, str] = {}

    def seed(self):
        for user, server, q in self.SEED:
            path = PREFIX + f"api/requests/{user}" + (f"/{server}" if server else "")
            code, _, body = self.raw.call("PUT", path, json.dumps(
                {"quanta": q, "image": "bai/sklearn:1.6.1", "user_options": {}}).encode(), token=self.token)
            assert code == 201, body
            self.ids[f"{user}/{server}"] = json.loads(body)["id"]
        states = {k: r["state"] for k, r in self.state()["requests"].items()}
        assert states == {"alice/a": "RUNNING", "bob/b": "RUNNING", "bob/c": "PENDING", "carol/": "PENDING"}

    def state(self) -> dict:
        code, _, body = self.raw.call("GET", PREFIX + "api/requests", token=self.token)
        assert code == 200, body
        # The epoch counts wake-ups and the ETA is recomputed from the clock: neither is state a
        # request could change.
        reqs = {f"{r['user']}/{r['server']}": {k: v for k, v in r.items() if k not in ("epoch", "eta")}
                for r in json.loads(body)["requests"]}
        code, _, body = self.raw.call("GET", PREFIX + "api/capacity", token=self.token)
        assert code == 200, body
        cap = json.loads(body)
        return {"requests": reqs, "usage": cap["usage"], "queue_length": cap["queue_length"]}

    def log_tail(self, n=30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def assert_clean(code: int, headers: dict, body: bytes, what: str, log=""):
    """A 2xx, or a 4xx with a JSON message; never a 500. A 503 is allowed only
    with a message that names the missing dependency (the fuzzed service's Docker
    node is a closed port on purpose)."""
    if code in (502, 503):
        msg = json.loads(body).get("message", "")
        assert re.search(r"docker|engine|unavailable|unreachable", msg, re.I), f"{what} -> {code}: {msg}"
        COUNTS["of-which-503-engine-down"] += 1
        return
    assert code < 500, f"{what} -> {code}: {body[:500]!r}\n{log}"
    if code >= 400:
        ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
        assert "json" in ctype, f"{what} -> {code} not JSON ({ctype}): {body[:300]!r}"
        msg = json.loads(body)
        assert isinstance(msg.get("message"), str) and msg["message"], f"{what} -> {code}: no message: {body[:300]!r}"


request_fields = ["quanta", "cpu_millis", "memory_bytes", "image", "user_options"]


@st.composite
def put_bodies(draw):
    kind = draw(st.sampled_from(["malformed", "scalar", "fields", "fields", "fields", "valid"]))
    if kind == "malformed":
        return draw(malformed), False
    if kind == "scalar":
        return json_bytes(draw(any_json.filter(lambda v: not isinstance(v, dict)))), False
    body = {}
    for f in draw(st.lists(st.sampled_from(request_fields), unique=True)):
        body[f] = draw(json_values)
    if kind == "valid":
        body = {"quanta": draw(st.integers(0, 6)), "cpu_millis": draw(st.integers(0, 2**53)),
                "memory_bytes": draw(st.integers(0, 2**53)), "image": draw(st.text(max_size=50)),
                "user_options": draw(st.dictionaries(st.text(max_size=8), any_json, max_size=3))}
        for f in draw(st.lists(st.sampled_from(request_fields), unique=True, max_size=2)):
            del body[f]
    if draw(st.booleans()) and kind != "valid":
        body[draw(st.text(max_size=20).filter(lambda k: k not in request_fields))] = draw(any_json)
    return json_bytes(body), put_valid(body)


def put_valid(body) -> bool:
    if not isinstance(body, dict) or set(body) - set(request_fields):
        return False
    for f in ("quanta", "cpu_millis", "memory_bytes"):
        v = body.get(f, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2**53:
            return False
    return isinstance(body.get("image", ""), str) and isinstance(body.get("user_options", {}), dict)


# Attempt ids that are nobody's (well-formed or not: the route takes 32 hex digits only).
attempt_ids = st.one_of(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
                        st.sampled_from(["0", "null", "%00", "a" * 500, "A" * 32, "../" + "0" * 29]))

NARROW = {
    **{f"alice-{kind}": ("alice", narrow_scopes(kind, "alice")) for kind in NARROW_SCOPES},
    "boss-access-only": ("boss", [ACCESS]),  # an admin's token limited to the service
    "boss-servers": ("boss", [ACCESS, "admin:servers"]),
}

BOGUS = ("api/", "api/requests/", "api/requests//x", "api/launch/x", "../../hub/api", "api/requests/a/b/c/d",
         "api/%2e%2e/capacity")
TOKENS = ["internal", "alice", "boss", "nobody", None]


# -- the standalone fuzz -----------------------------------------------------------------------------

FUZZ = settings(max_examples=int(os.environ.get("BAI_FUZZ_EXAMPLES", "400")), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@st.composite
def service_calls(draw):
    """One request: (method, path, body, token-name, whether a 2xx is allowed)."""
    endpoint = draw(st.sampled_from([
        "capacity", "requests", "request-get", "request-put", "request-delete", "attempt-delete", "stop-failed",
        "wait", "launch", "metrics",
        "health", "snapshots-get", "snapshots-post", "snapshot-job", "images-get", "image-delete",
        "admin-page", "sessions-json", "capacity-json", "bogus",
    ]))
    who = draw(st.sampled_from(TOKENS))
    method = draw(st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    user, server = draw(names), draw(st.one_of(st.just(""), names))
    rpath = f"api/requests/{path_part(user)}" + (f"/{path_part(server)}" if server else "")
    query = ""
    if draw(st.booleans()):
        query = "?" + "&".join(f"{quote(draw(st.text(max_size=10)))}={quote(draw(st.text(max_size=10)))}"
                               for _ in range(draw(st.integers(1, 3))))
    body = None
    if endpoint == "capacity":
        path = "api/capacity"
    elif endpoint == "requests":
        path = "api/requests"
    elif endpoint == "metrics":
        path = "metrics"
    elif endpoint == "health":
        path = "api/health"
    elif endpoint == "bogus":
        path = draw(st.sampled_from(BOGUS + ("static/../app.py",
                                     "static/%2e%2e/%2e%2e/app.py")))
    elif endpoint == "request-get":
        method, path = "GET", rpath
    elif endpoint == "request-put":
        method, path = "PUT", rpath
        body, valid = draw(put_bodies())
        return method, path, body, who, valid and who == "internal", (user, server)
    elif endpoint == "request-delete":
        method, path = "DELETE", rpath
    elif endpoint == "attempt-delete":
        # Releasing a real attempt is valid (and changes state): these ids are nobody's, and a
        # stale release must change nothing.
        method, path = "DELETE", "api/attempts/" + draw(attempt_ids)
    elif endpoint == "stop-failed":
        method, path = "POST", "api/attempts/" + draw(attempt_ids) + "/stop-failed"
        body = draw(st.one_of(malformed, json_values.map(lambda v: json_bytes({"message": v}))))
    elif endpoint == "wait":
        method, path = "GET", "api/attempts/" + draw(attempt_ids) + "/wait"
        epoch = draw(st.one_of(st.sampled_from(["-1", "0", "1.5", "abc", "", "nan", "1e3", "9" * 5000, "0x10", " 3 "]),
                               st.integers(-(2**64), 5).map(str)))
        timeout = draw(st.one_of(st.sampled_from(["nan", "NaN", "-nan", "-1", "-inf", "abc", "", "0", "0.2", "1e-9",
                                                  "1_0", "0x1", "  0.1  ", "+0.3"]),
                                 st.floats(-1e9, 0.5, allow_nan=False).map(repr)))
        query = f"?epoch={quote(epoch)}&timeout={quote(timeout)}"
    elif endpoint == "launch":
        method, path = "POST", "api/launch"
        if draw(st.booleans()):
            body = draw(malformed)
        else:
            b = {}
            for f in draw(st.lists(st.sampled_from(["count", "options", "user", "prefix", "extra"]), unique=True)):
                b[f] = draw(st.one_of(json_values, st.sampled_from(["alice", "session", "x" * 40, 1, 8, 9, 0])))
            body = json_bytes(b)
    elif endpoint == "snapshots-get":
        method, path = "GET", "api/snapshots"
    elif endpoint == "snapshots-post":
        method, path = "POST", "api/snapshots"
        b = {}
        for f in draw(st.lists(st.sampled_from(["user", "server", "tag", "extra"]), unique=True)):
            b[f] = draw(st.one_of(json_values, st.sampled_from(["alice", "a", "bob", "", "v1", "-x", ".x", "x" * 200])))
        body = draw(st.one_of(st.just(json_bytes(b)), malformed))
    elif endpoint == "snapshot-job":
        path = "api/snapshots/" + draw(st.text(alphabet="0123456789abcdef", min_size=1, max_size=64))
    elif endpoint == "images-get":
        method, path = "GET", "api/images"
        query = draw(st.sampled_from(["", "?mine=1", "?mine=0", "?mine=%00", "?mine=" + "1" * 100]))
    elif endpoint == "image-delete":
        method, path = "DELETE", "api/images/" + path_part(draw(st.one_of(
            names, st.sampled_from(["bai/sklearn:1.6.1", "bai-test-fuzz-private/alice:v1", "sha256:", "sha256:0"]))))
    elif endpoint == "admin-page":
        method, path = "GET", "admin/snapshots"
    elif endpoint == "sessions-json":
        method, path = "GET", "sessions.json"
    else:
        method, path = "GET", "capacity.json"
    if method in ("POST", "PUT", "PATCH") and body is None:
        body = draw(st.one_of(malformed, json_values.map(json_bytes)))
    return method, path + query, body, who, True, None


def content_type(headers):
    return {k.lower(): v for k, v in headers.items()}.get("content-type", "")


@FUZZ
@given(call=service_calls())
def test_fuzz_standalone_service(svc, call):
    method, path, body, who, may_succeed, key = call
    COUNTS["service"] += 1
    before = svc.state()
    token = svc.tokens[who]
    what = f"{method} {path[:200]} as {who} body={body[:200] if body else body!r}"
    # A valid registration under a seeded key would (rightly) replace it, and a
    # user (or admin) may stop their own: those go to a fresh key.
    if (key is not None and may_succeed) or (method == "DELETE" and who in ("alice", "boss")
                                             and path.startswith("api/requests/")):
        path = path.replace("api/requests/", "api/requests/zz-", 1)
    try:
        code, headers, out = svc.raw.call(method, PREFIX + path, body=body, token=token)
    except (http.client.HTTPException, ConnectionError) as e:
        # Tornado drops a connection only for malformed HTTP (not what we send) or oversize bodies.
        assert body is not None and len(body) > 64 * 1024 * 16, f"{what}: {e!r}"
        return
    if method == "HEAD" or not path.startswith("api/") or path.split("?")[0] in BOGUS:
        # Pages answer in HTML, unrouted paths with tornado's plain 404.
        assert code < 500, f"{what} -> {code}: {out[:300]!r}\n{svc.log_tail()}"
        if "static/" in path:
            assert code != 200, f"{what}: served a file outside static/"
    elif code == 404 and out.startswith(b"<html><title>404: Not Found"):
        # No route matched (e.g. extra path segments): tornado's own plain 404.
        COUNTS["of-which-unrouted-404"] += 1
    else:
        assert_clean(code, headers, out, what, svc.log_tail())
    if 200 <= code < 300 and method in ("PUT", "POST", "DELETE"):
        assert may_succeed, f"{what} accepted ({code}): {out[:300]!r}"
        if method == "PUT":
            rec = json.loads(out)
            c2, _, o2 = svc.raw.call("DELETE", PREFIX + f"api/attempts/{rec['id']}", token=svc.token)
            assert c2 == 200, o2
    if method == "PUT" and code >= 400 or method != "PUT":
        after = svc.state()
        assert after == before, f"{what} -> {code} changed the state:\n{before}\n{after}"
    else:
        assert svc.state() == before


def test_fuzz_standalone_service_edge_cases(svc):
    """Hand-picked cases the generator may not hit every run."""
    cases = [
        ("PUT", "api/requests/alice/a", b'{"quanta": NaN}', "internal"),
        ("PUT", "api/requests/alice/a", b'{"quanta": 1e400}', "internal"),
        ("PUT", "api/requests/alice/a", b'{"quanta": 2, "surprise": 1}', "internal"),
        ("PUT", "api/requests/alice/a", b'{"quanta": 2}', "alice"),
        ("PUT", "api/requests/alice/a", b'{"quanta": 2}', "boss"),
        ("PUT", "api/requests/alice/a", b'{"quanta": 2}', None),
        ("PUT", "api/requests/alice/a", b"x" * (64 * 1024 + 1), "internal"),
        ("PUT", "api/requests/zz/big", b'{"quanta": 9007199254740993}', "internal"),
        ("PUT", "api/requests/alice/a", b"[" * 5000 + b"]" * 5000, "internal"),
        ("PUT", "api/requests/alice/a", b'{"user_options": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001, "internal"),
        ("POST", "api/launch", b"[" * 5000 + b"]" * 5000, "alice"),
        ("POST", "api/snapshots", b"[" * 5000 + b"]" * 5000, "internal"),
        ("PUT", "api/requests/zz/neg", b'{"quanta": -1}', "internal"),
        ("PUT", "api/requests/%2e%2e/%2e%2e", b'{"quanta": NaN}', "internal"),
        ("PUT", "api/requests/a%2Fb/x", b'{"quanta": 0}', "internal"),
        ("PUT", "api/requests/%ff/x", b'{"quanta": 0}', "internal"),
        ("PUT", "api/requests/%00/x", b'{"quanta": 0}', "internal"),
        ("PUT", "api/requests/" + "a" * 256 + "/x", b'{"quanta": 0}', "internal"),
        ("DELETE", "api/requests/bob/b", None, "alice"),
        ("DELETE", "api/requests/bob/b?request_id=stale", None, "internal"),
        ("DELETE", "api/attempts/" + "0" * 32, None, "internal"),
        ("DELETE", "api/attempts/" + "0" * 32, None, "alice"),
        ("POST", "api/attempts/" + "0" * 32 + "/stop-failed", b'{"message": "x"}', "internal"),
        ("POST", "api/attempts/" + "0" * 32 + "/stop-failed", b'{"message": 1}', "internal"),
        ("DELETE", "api/requests/carol", None, "alice"),
        ("DELETE", "api/requests/bob/c", None, None),
        ("DELETE", "api/requests/bob/c", None, "nobody"),
        ("GET", "api/requests/bob/b", None, "alice"),
        ("GET", "api/attempts/{bob/b}/wait?epoch=-1&timeout=0", None, "alice"),
        ("GET", "api/attempts/{bob/b}/wait?epoch=99999999&timeout=nan", None, "internal"),
        ("GET", "api/attempts/{bob/b}/wait?epoch=99999999&timeout=-inf", None, "internal"),
        ("GET", "api/attempts/{bob/b}/wait?epoch=nan&timeout=0", None, "internal"),
        ("GET", "api/attempts/{bob/b}/wait?epoch=0&timeout=0", None, None),
        ("DELETE", "api/attempts/{bob/b}", None, "alice"),
        ("DELETE", "api/attempts/{bob/b}", None, "boss"),
        ("POST", "api/attempts/{bob/b}/stop-failed", b'{"message": "x"}', "alice"),
        ("POST", "api/attempts/{carol/}/stop-failed", b'{"message": "x"}', "internal"),
        ("POST", "api/attempts/{bob/b}/stop-failed", b'{"message": 1}', "internal"),
        ("PUT", "api/attempts/{bob/b}", b"{}", "internal"),
        ("POST", "api/launch", b'{"user": "bob", "count": 1}', "alice"),
        ("POST", "api/launch", b'{"count": 1e308}', "alice"),
        ("POST", "api/launch", b'{"count": 1, "prefix": "../x"}', "alice"),
        ("POST", "api/launch", b'{"count": 1, "user": "nobody-here"}', "internal"),
        ("POST", "api/launch", b'{"count": 1, "user": "alice"}', "internal"),
        ("POST", "api/snapshots", b'{"user": "alice", "server": "a", "tag": "v1"}', "alice"),
        ("POST", "api/snapshots", b'{"user": "alice", "server": "a", "tag": "../v1"}', "internal"),
        ("POST", "api/snapshots", b'{"user": "alice", "server": "a", "tag": "v1"}', "internal"),
        ("POST", "api/snapshots", b'{"user": "bob", "server": "c", "tag": "v1"}', "internal"),
        ("GET", "api/snapshots", None, "alice"),
        ("GET", "api/images?mine=1", None, "internal"),
        ("GET", "api/images", None, "alice"),
        ("DELETE", "api/images/bai%2Fsklearn:1.6.1", None, "alice"),
        ("DELETE", "api/images/bai-test-fuzz-private%2Falice:v1", None, "internal"),
        ("DELETE", "api/images/%2e%2e", None, "internal"),
        ("GET", "api/snapshots/00ff", None, "internal"),
    ]
    for method, path, body, who in cases:
        for seeded, attempt_id in svc.ids.items():
            path = path.replace("{" + seeded + "}", attempt_id)
        COUNTS["service-edge"] += 1
        before = svc.state()
        code, headers, out = svc.raw.call(method, PREFIX + path, body=body, token=svc.tokens[who])
        what = f"{method} {path[:80]} as {who}"
        assert_clean(code, headers, out, what, svc.log_tail())
        if (who != "internal" and method != "GET") or method == "PUT":
            assert code >= 400, f"{what} -> {code}: {out[:200]!r}"
        assert svc.state() == before, what


def test_users_see_only_their_own_requests_on_the_service(svc):
    code, _, out = svc.raw.call("GET", PREFIX + "api/requests", token=svc.tokens["alice"])
    assert code == 200
    assert {(r["user"], r["server"]) for r in json.loads(out)["requests"]} == {("alice", "a")}
    code, _, out = svc.raw.call("GET", PREFIX + "api/requests", token=svc.tokens["boss"])
    assert len(json.loads(out)["requests"]) == 4
    for who in ("nobody", None):
        code, headers, out = svc.raw.call("GET", PREFIX + "api/requests", token=svc.tokens[who])
        assert code == 403


@st.composite
def callers(draw):
    """Who calls: a token narrower than its owner, or an Authorization header that is no token."""
    if draw(st.booleans()):
        return draw(st.sampled_from(sorted(NARROW))), None
    header = draw(st.one_of(bad_auth_headers, st.sampled_from(["internal", "alice"]).map(lambda w: ("wrapped", w))))
    return None, header


def read_as_tornado(query_value: str) -> str:
    """A query argument as tornado's get_argument gives it to HubAuth: control characters made
    blanks, then stripped."""
    return re.sub(r"[\x00-\x08\x0e-\x1f]", " ", unquote(query_value)).strip()


@FUZZ
@given(call=service_calls(), caller=callers(), junk=st.sampled_from(["\xe9", " x", "\x00", "a" * 1100, "\xff" * 3]),
       url_token=st.one_of(st.none(), st.text(max_size=30).map(quote), st.sampled_from(["a%0Ab", "%ff", "x" * 2000])))
def test_fuzz_service_callers(svc, call, caller, junk, url_token):
    """Every endpoint, called with narrower tokens and with bad Authorization headers (or a bad
    ?token= on a websocket request): never a 5xx, never a change of state, and the hub is asked to
    start or stop only for a token that may."""
    method, path, body, _, _, _ = call
    who, header = caller
    extra = {}
    if url_token is not None:
        path += ("&" if "?" in path else "?") + "token=" + url_token
        extra["Sec-Fetch-Mode"] = "websocket"
    if who == "boss-servers" and method == "DELETE" and path.startswith("api/requests/"):
        path = path.replace("api/requests/", "api/requests/zz-", 1)  # it may stop anyone's: a fresh key
    if isinstance(header, tuple):  # a real token wrapped in junk is no token
        header = f"token {svc.tokens[header[1]]}{junk}"
    COUNTS["service-callers"] += 1
    before, calls = svc.state(), len(svc.hub.calls)
    headers = {**extra, **({"Authorization": header.encode("latin-1")} if header is not None else {})}
    what = f"{method} {path[:120]} as {who or repr(header[:40])} body={body[:100] if body else body!r}"
    try:
        code, got, out = svc.raw.call(method, PREFIX + path, body=body, token=svc.tokens.get(who), headers=headers)
    except (http.client.HTTPException, ConnectionError) as e:
        assert body is not None and len(body) > 64 * 1024 * 16, f"{what}: {e!r}"
        return
    assert code < 500 or code in (502, 503), f"{what} -> {code}: {out[:300]!r}\n{svc.log_tail()}"
    if code in (502, 503) and path.startswith("api/") and method != "HEAD":
        assert_clean(code, got, out, what, svc.log_tail())
    if (header is not None or url_token and read_as_tornado(url_token)) and code < 400:
        # No token: only what anyone may read, or a page sending the browser to log in. (An empty
        # ?token=, or one of blanks only, is no token: the caller's header then authenticates, as in
        # HubAuth.)
        assert (path.startswith("api/health") or method in ("OPTIONS", "HEAD") and code == 405
                or code == 302 and "/hub/api/oauth2/authorize" in got.get("Location", "")), f"{what} -> {code}"
    if code >= 400 and path.startswith("api/") and method != "HEAD" and out and not out.startswith(b"<html>"):
        # (tornado itself answers an empty 400 to a header with control characters)
        assert "json" in content_type(got), f"{what} -> {code} not JSON"
    assert svc.state() == before, f"{what} -> {code} changed the state"
    asked = [c for c in svc.hub.calls[calls:] if c[0] in ("POST", "DELETE")]
    assert all(who == "boss-servers" or c[0] == "POST" and who == "alice-start-only" and "/users/alice/" in c[1]
               for c in asked), (what, asked)

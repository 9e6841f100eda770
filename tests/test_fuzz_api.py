"""Bad input, fuzzed: every REST endpoint of the scheduler service, the hub's spawn
API and the HTML spawn form.

Two targets:

* a standalone ``bai_scheduler.app`` process (fast): its Docker node points at a
  closed port on 127.0.0.1, so nothing on the real engine is read or changed and
  no container event can move the state under the test; a tiny fake hub API
  answers the service's token checks for the user tokens;
* the suite's real hub (slow, fewer cases): ``POST /hub/api/users/{u}/servers/{s}``
  with fuzzed ``user_options`` and ``POST /hub/spawn/{u}/{s}`` with fuzzed form
  fields, each refused with a message, leaving no container, request or share.

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
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
PREFIX = "/services/bai-scheduler/"
NAME_RE = re.compile(r"^[^/\x00-\x1f]{1,255}$")

COUNTS: Counter = Counter()


def record_counts():
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "fuzz-counts.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    old.update(COUNTS)
    old["total"] = sum(v for k, v in old.items() if k != "total" and not k.startswith("of-which"))
    path.write_text(json.dumps(old, indent=1, sort_keys=True))
    return old


@pytest.fixture(scope="module", autouse=True)
def print_counts(request):
    yield
    if COUNTS:
        counts = record_counts()
        tried = sum(v for k, v in COUNTS.items() if not k.startswith("of-which"))
        line = (f"[fuzz] cases tried: {tried} {dict(sorted(COUNTS.items()))} "
                f"(all runs recorded in test-artifacts/fuzz-counts.json: {counts['total']})")
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print("\n" + line, flush=True)
        else:
            print(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a fake hub API: identifies user tokens, starts nothing ---------------------------------------


class FakeHub:
    """Answers what the service asks the hub: who owns a token (GET /hub/api/user),
    a user's model, and server start/stop (always refused: nothing is spawned)."""

    def __init__(self, service_token: str):
        self.service_token = service_token
        self.tokens: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _token(self):
                return self.headers.get("Authorization", "").partition(" ")[2].strip()

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                token = self._token()
                if self.path.rstrip("/") == "/hub/api/user":
                    model = hub.tokens.get(token)
                    return self._send(200, model) if model else self._send(403, {"message": "bad token"})
                if token != hub.service_token:
                    return self._send(403, {"message": "bad token"})
                m = re.fullmatch(r"/hub/api/users/([^/?]+)", self.path)
                names = {m["name"] for m in hub.tokens.values()}
                if m and m.group(1) in names:
                    return self._send(200, {"name": m.group(1), "servers": {}})
                if self.path.startswith("/hub/api/users?"):
                    return self._send(200, [{"name": n, "servers": {}} for n in sorted(names)])
                return self._send(404, {"message": "not found"})

            def do_POST(self):
                hub.calls.append(("POST", self.path))
                self._send(400, {"message": "the fake hub starts nothing"})

            def do_DELETE(self):
                hub.calls.append(("DELETE", self.path))
                self._send(404, {"message": "no such server"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def user(self, name: str, admin: bool = False) -> str:
        token = secrets.token_hex(16)
        self.tokens[token] = {
            "kind": "user", "name": name, "admin": admin, "groups": [],
            "scopes": ["access:services!service=bai-scheduler", "self"] + (["admin:users", "admin:servers"] if admin else []),
        }
        return token

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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


class Raw:
    """HTTP with exact bytes on the wire: paths are sent as given (no dot-segment
    normalisation, no re-quoting), bodies as given."""

    def __init__(self, port: int):
        self.port = port

    def call(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
             headers: dict | None = None, timeout: float = 15) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"token {token}"
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-service")
    token = secrets.token_hex(16)
    hub = FakeHub(token)
    port = free_port()
    (tmp / "config.py").write_text(SERVICE_CONFIG.format(db=f"sqlite:///{tmp / 'fz.sqlite'}", dead=free_port()))
    env = dict(os.environ, JUPYTERHUB_API_TOKEN=token, JUPYTERHUB_SERVICE_URL=f"http://127.0.0.1:{port}",
               JUPYTERHUB_SERVICE_PREFIX=PREFIX, JUPYTERHUB_SERVICE_NAME="bai-scheduler",
               JUPYTERHUB_API_URL=f"http://127.0.0.1:{hub.port}/hub/api",
               JUPYTERHUB_BASE_URL="/", JUPYTERHUB_CLIENT_ID="service-bai-scheduler",
               JUPYTERHUB_OAUTH_CALLBACK_URL=PREFIX + "oauth_callback",
               JUPYTERHUB_HOST="", PYTHONPATH=str(ROOT))
    env.pop("DOCKER_HOST", None)
    log = open(tmp / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "bai_scheduler.app", f"--config={tmp / 'config.py'}"],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    raw = Raw(port)
    try:
        for _ in range(200):
            try:
                if raw.call("GET", PREFIX + "api/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError((tmp / "service.log").read_text())
            time.sleep(0.1)
        s = Service(raw, token, hub, tmp / "service.log")
        s.seed()
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        hub.close()
        log.close()
        import shutil

        shutil.copy(tmp / "service.log", ARTIFACTS / "fuzz-service.log")


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
        reqs = {f"{r['user']}/{r['server']}": {k: v for k, v in r.items() if k != "epoch"}
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


# -- strategies ------------------------------------------------------------------------------------

SPECIAL_NAMES = ["..", ".", "../x", "%2e%2e", "%2e%2e%2fetc", "a%2Fb", "%00", "%ff", "%c3%a9", "x%20y",
                 "~", "-", "_", "a" * 255, "a" * 256, "b" * 2000, "%E2%80%AE", "con", "null", "%0a", "a;b",
                 "a?b=1", "a#b", "\u00e9", "\u4e2d\u6587", "\U0001f600", "alice", "bob", "carol"]

names = st.one_of(
    st.sampled_from(SPECIAL_NAMES),
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=300),
)


def path_part(name: str) -> str:
    """A name as it goes in the URL: our special ones literally (they may hold
    %-escapes and dot segments on purpose), others %-encoded."""
    if name in SPECIAL_NAMES and name.isascii():
        return name.replace(" ", "%20").replace("#", "%23").replace("?", "%3F")
    return quote(name, safe="")


def decoded(name: str) -> str:
    from urllib.parse import unquote

    return unquote(path_part(name), errors="replace")


bad_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=-1), st.integers(min_value=2**53 + 1, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.just(float("nan")), st.just(1.5), st.just(True),
    st.just(None), st.text(max_size=10), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
any_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
json_values = st.one_of(any_json, bad_numbers)


def json_bytes(obj) -> bytes:
    """JSON as Python writes it, NaN/Infinity included (JSON-invalid on purpose)."""
    return json.dumps(obj, allow_nan=True).encode()


malformed = st.sampled_from([
    b"{", b"}", b"[", b"nul", b"{'a': 1}", b'{"quanta": }', b'{"quanta": NaN}', b'{"quanta": Infinity}',
    b'{"quanta": -Infinity}', b"\xff\xfe\x00", b'{"a":1,}', b"1e999999", b'"\xed\xa0\x80"',
    b'{"quanta": 1' + b"0" * 5000 + b"}", b"[" * 5000 + b"]" * 5000, b"{" + b'"a":{' * 3000 + b"}" * 3001,
    b" " * 70000, b'{"quanta": 2, "quanta": "x"}', b"\x00", b"", b"null", b"true", b"[]", b"0", b'"str"',
])

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

BOGUS = ("api/", "api/requests/", "api/requests//x", "api/launch/x", "../../hub/api", "api/requests/a/b/c/d",
         "api/%2e%2e/capacity")
TOKENS = ["internal", "alice", "boss", "nobody", None]


# -- the standalone fuzz -----------------------------------------------------------------------------

FUZZ = settings(max_examples=int(os.environ.get("BAI_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
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


# -- the hub's spawn paths (real hub, proxy, service, engine) -------------------------------------

KERNEL_IMAGE = "bai/sklearn:1.6.1"
GOOD = {"image": KERNEL_IMAGE, "fgpu": "1", "cpu": "0.5", "memory": "1"}

# Values that are wrong for sure (the shared hub has 1 GPU = 2 fGPU, CPU ≤ 4, memory ≤ 16 GiB).
POISON = {
    # (an empty or missing image means the default one: not a poison)
    "image": ["debian:bookworm", "bai-private/someoneelse:x", "../../etc/passwd", "bai/sklearn",
              "BAI/SKLEARN:1.6.1", "x" * 300, "bai/sklearn:1.6.1\nx", "\u00e9t\u00e9", "%2e%2e/x", 1, ["a", "b"], {"a": 1},
              "sha256:", "bai/sklearn:1.6.1@sha256:00"],
    "fgpu": ["-1", "0.3", "NaN", "nan", "inf", "-inf", "1e9", "9", "2.5", "abc", "", None, True, [], {}, "0x1",
             "1e-1", "1/2", "\u0661\u0662", "1" * 400, -0.5, 1e308, float("nan")],
    "cpu": ["0", "-1", "1e9", "NaN", "5", "0.05", "abc", "", None, [], {}, True, "Infinity", 1e400],
    "memory": ["0", "0.1", "17", "1e400", "NaN", "-0", "-1", "abc", None, [], "16.0001", "sNaN"],
    "sessions": [0, -1, 99, "1.5", "two", None, True, 1.0, "5", "1e0", " ", [1, 2]],
}
# Unknown fields, and "quanta" (only valid with the rest of an already-parsed request).
EXTRA_FIELDS = ["surprise", "quanta", "__proto__", "../x", "\u00e9", "constructor", "x" * 300]


@st.composite
def bad_user_options(draw):
    """Options with at least one value that must be refused (so no case may spawn)."""
    opts = dict(GOOD)
    fields = draw(st.lists(st.sampled_from(sorted(POISON) + ["extra", "image_name"]), min_size=1, max_size=3,
                           unique=True))
    for f in fields:
        if f == "extra":
            opts[draw(st.sampled_from(EXTRA_FIELDS))] = draw(
                st.one_of(st.sampled_from([-1, "2", 2**80, None, 1.5, "x", {"a": 1}]), any_json))
        elif f == "image_name":  # the typed name wins over the picked one
            opts[f] = draw(st.sampled_from([v for v in POISON["image"] if v]))
        else:
            opts[f] = draw(st.sampled_from(POISON[f]))
    return opts


def used_quanta(hub):
    """What the scheduler holds: per node and device, quanta, CPU and memory in use."""
    return hub.service("GET", "api/capacity").json()["usage"]


def containers_of(hub, user):
    from bai_spawner import labels

    return [c for c in hub.containers() if c["Config"]["Labels"].get(labels.USER) == user]


def assert_nothing_left(hub, user, server, base_quanta, what):
    assert not containers_of(hub, user), f"{what}: a container was made"
    assert f"{user}/{server}" not in hub.requests(), f"{what}: a request was left in the scheduler"
    assert used_quanta(hub) == base_quanta, f"{what}: a share is held"


def wait_spawn_ended(hub, user, server, what):
    hub.wait_for(lambda: not hub.servers(user).get(server, {}).get("pending"), 60, 0.3, what=f"{what}: spawn to end")
    assert not hub.servers(user).get(server, {}).get("ready"), f"{what}: an invalid spawn started"
    r = hub.api("GET", f"/users/{user}/servers/{server}/progress", timeout=30)
    return r.text


HUB_FUZZ = settings(max_examples=int(os.environ.get("BAI_HUB_FUZZ_EXAMPLES", "30")), deadline=None,
                    database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.docker
@pytest.mark.hub
def test_fuzz_hub_spawn_api(hub):
    """POST /hub/api/users/{u}/servers/{s} with fuzzed user_options (admin token)."""
    user, server = "fuzzspawn", "fz"
    hub.add_user(user)
    base = used_quanta(hub)

    def one(body: bytes, what: str):
        COUNTS["hub-spawn-api"] += 1
        r = hub.api("POST", f"/users/{user}/servers/{server}", data=body,
                    headers={"Content-Type": "application/json"})
        assert r.status_code != 500 and r.status_code < 600, f"{what} -> {r.status_code}: {r.text[:300]}"
        if r.status_code in (201, 202):
            text = wait_spawn_ended(hub, user, server, what)
            assert re.search(r"must|not|unknown|invalid|choose|one value|number|field|image", text, re.I), \
                f"{what}: failed without a message: {text[:300]}"
        else:
            assert 400 <= r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:300]}"
            assert r.json().get("message"), f"{what} -> {r.status_code} without a message: {r.text[:300]}"
        assert_nothing_left(hub, user, server, base, what)
        hub.api("DELETE", f"/users/{user}/servers/{server}", json={"remove": True})

    @HUB_FUZZ
    @given(opts=bad_user_options(), wrap=st.booleans())
    def fuzz(opts, wrap):
        body = json_bytes({"user_options": opts} if wrap else opts)
        one(body, f"options {body[:200]!r}")

    try:
        fuzz()
    finally:
        hub.api("DELETE", f"/users/{user}/servers/{server}", json={"remove": True})
    for body in [b"{", b"[1, 2]", b'"x"', b"NaN", b'{"user_options": [1]}', b'{"user_options": "x"}',
                 b'{"display_name": 1}', b'{"fgpu": NaN, "image": "bai/sklearn:1.6.1"}',
                 b"[" * 3000 + b"]" * 3000, json_bytes({"user_options": {**GOOD, "fgpu": "1" * 5000}})]:
        one(body, f"body {body[:80]!r}")


def login(hub, name: str, password: str) -> requests.Session:
    """A browser-like session logged in through the hub's login form."""
    from hub_config.bootstrap_admin import ensure_account

    ensure_account(f"sqlite:///{hub.workdir}/var/jupyterhub.sqlite", name, password)
    s = requests.Session()
    r = s.get(f"{hub.url}/hub/login", timeout=30)
    assert r.status_code == 200, r.text[:300]
    xsrf = s.cookies.get("_xsrf")
    r = s.post(f"{hub.url}/hub/login", data={"username": name, "password": password, "_xsrf": xsrf},
               allow_redirects=False, timeout=30)
    assert r.status_code == 302, f"login failed: {r.status_code} {r.text[:300]}"
    return s


def form_xsrf(s: requests.Session, hub, path: str) -> str:
    r = s.get(f"{hub.url}{path}", timeout=60)
    assert r.status_code == 200, r.text[:300]
    m = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
    return m.group(1) if m else s.cookies.get("_xsrf")


def form_value(v):
    """How a browser (or a hand-made POST) sends a value: strings, and repeated fields for lists."""
    if isinstance(v, list):
        return [str(x) for x in v] or [""]
    if isinstance(v, dict):
        return json.dumps(v)
    return "" if v is None else str(v)


@pytest.mark.docker
@pytest.mark.hub
def test_fuzz_hub_spawn_form(hub):
    """POST /hub/spawn/{u}/{s} (the HTML form) with fuzzed fields, logged in with a cookie."""
    user, server = "fuzzform", "fz"
    hub.add_user(user)
    s = login(hub, user, "fuzz-form-" + secrets.token_hex(8))
    path = f"/hub/spawn/{user}/{server}"
    xsrf = form_xsrf(s, hub, path)
    base = used_quanta(hub)

    @HUB_FUZZ
    @given(opts=bad_user_options(), junk=st.dictionaries(st.sampled_from(EXTRA_FIELDS), st.text(max_size=20), max_size=2))
    def fuzz(opts, junk):
        COUNTS["hub-spawn-form"] += 1
        # The form only knows these fields; extra ones are ignored by options_from_form.
        fields = {k: form_value(v) for k, v in opts.items() if k in ("image", "image_name", "fgpu", "cpu", "memory", "sessions")}
        fields.update({k: v for k, v in junk.items() if k not in fields})
        poisoned = any(k in fields for k in ("image", "image_name", "fgpu", "cpu", "memory", "sessions")
                       if opts.get(k, GOOD.get(k)) != GOOD.get(k, 1 if k == "sessions" else None))
        if not poisoned:  # only unknown fields, which the form ignores: make it bad for sure
            fields["fgpu"] = "-1"
        what = f"form {fields!r}"[:300]
        r = s.post(f"{hub.url}{path}", data={**fields, "_xsrf": xsrf}, allow_redirects=False, timeout=60)
        assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:500]}"
        if r.status_code in (302, 303):
            assert "spawn-pending" in r.headers.get("Location", ""), r.headers
            text = wait_spawn_ended(hub, user, server, what)
        else:
            assert 400 <= r.status_code < 500, f"{what} -> {r.status_code}"
            text = r.text
        assert re.search(r"must|not|unknown|invalid|choose|one value|number|image", text, re.I), \
            f"{what}: refused without a message: {text[:500]}"
        assert_nothing_left(hub, user, server, base, what)

    try:
        fuzz()
    finally:
        hub.api("DELETE", f"/users/{user}/servers/{server}", json={"remove": True})

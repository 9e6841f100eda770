"""What the fuzz tests share: hypothesis strategies for hostile values, and the count of cases tried
(printed at the end of a module and kept in test-artifacts/fuzz-counts.json)."""
from __future__ import annotations

import json
from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import strategies as st

from . import ARTIFACTS

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
    """Prints the cases a module tried (autouse where a test module imports it)."""
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


# Names that are also path segments of the hub's and the service's routes.
ROUTE_NAMES = ["wait", "stop", "new", "progress", "server", "servers", "api", "capacity", "capacity.json", "requests",
               "launch", "metrics", "health", "sessions", "sessions.json", "snapshots", "images", "admin", "static",
               "oauth_callback", "spawn", "spawn-pending", "tokens", "user", "hub", "default", "lab", "proxy", "mlflow"]
SPECIAL_NAMES = ["..", ".", "../x", "%2e%2e", "%2e%2e%2fetc", "a%2Fb", "%00", "%ff", "%c3%a9", "x%20y",
                 "~", "-", "_", "a" * 255, "a" * 256, "b" * 2000, "%E2%80%AE", "con", "null", "%0a", "a;b",
                 "a?b=1", "a#b", "\u00e9", "\u4e2d\u6587", "\U0001f600", "alice", "bob", "carol", *ROUTE_NAMES]

names = st.one_of(
    st.sampled_from(SPECIAL_NAMES),
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=300),
)


# Authorization headers that are no token: non-ASCII (sent as Latin-1 bytes, as a browser or a
# careless client may), oversized, control characters, other schemes, empty.
bad_auth_headers = st.one_of(
    st.text(st.characters(min_codepoint=0x80, max_codepoint=0xFF), min_size=1, max_size=40).map(lambda t: "token " + t),
    st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=80),
    st.integers(1025, 60_000).map(lambda n: "token " + "a" * n),
    st.sampled_from(["", "token", "token ", "Bearer", "Basic dXNlcjpwYXNz", "Digest a=b", "tokenabc", "token a b",
                     "token \x7f", "token \x01\x02", "token\ttab", "Negotiate YII=", "bearer " + "0" * 32]),
)


ACCESS = "access:services!service=bai-scheduler"
# A user's tokens narrower than the user: none may stop the user's servers, only "start-only" may
# start them; "no-access" fails the hub's check for the service itself.
NARROW_SCOPES = {
    "access-only": [ACCESS],
    "read-only": [ACCESS, "read:servers!user={user}"],
    "start-only": [ACCESS, "start:servers!user={user}"],
    "other-server": [ACCESS, "servers!server={user}/zz-other"],
    "no-access": ["servers!user={user}"],
    "metrics": [ACCESS, "read:metrics"],
}


def narrow_scopes(kind: str, user: str) -> list[str]:
    return [scope.format(user=user) for scope in NARROW_SCOPES[kind]]


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


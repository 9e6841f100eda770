"""Bad input, fuzzed, through the suite's real hub (slow, fewer cases):
``POST /hub/api/users/{u}/servers/{s}`` with fuzzed ``user_options`` and
``POST /hub/spawn/{u}/{s}`` with fuzzed form fields, each refused with a message,
leaving no container, request or share; the hub's and the service's endpoints called
through the proxy with tokens of narrower scope and bad Authorization headers, on
server names that are also route segments, leaving another user's session alone.
The service's own endpoints are fuzzed in tests/test_fuzz_api.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import KERNEL_IMAGE, OLD_IMAGE
from helpers.images import commit_image, image_id, wait_listed
from helpers.registry import SHARED, delete_from, reference
from helpers.hub import docker
from helpers.fuzz import (ACCESS, COUNTS, NARROW_SCOPES, ROUTE_NAMES, SPECIAL_NAMES, any_json,  # noqa: F401
                          bad_auth_headers, json_bytes, narrow_scopes, path_part, print_counts)

pytestmark = [pytest.mark.docker, pytest.mark.hub]

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
    from bai_scheduler.contract import labels

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


def form_value(v):
    """How a browser (or a hand-made POST) sends a value: strings, and repeated fields for lists."""
    if isinstance(v, list):
        return [str(x) for x in v] or [""]
    if isinstance(v, dict):
        return json.dumps(v)
    return "" if v is None else str(v)


def test_fuzz_hub_spawn_form(hub):
    """POST /hub/spawn/{u}/{s} (the HTML form) with fuzzed fields, logged in with a cookie."""
    user, server = "fuzzform", "fz"
    hub.add_user(user)
    s = hub.login(user, "fuzz-form-" + secrets.token_hex(8))
    path = f"/hub/spawn/{user}/{server}"
    xsrf = hub.form_xsrf(s, path)
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


# The callers' tokens: (owner, scopes); "own" is the caller's full token (a user holds no
# read:metrics to give one).
CALLER_TOKENS = {
    **{kind: ("caller", kind) for kind in NARROW_SCOPES if kind != "metrics"},
    "own": ("caller", None),
    "admin-access-only": ("admin", [ACCESS]),
}
# Options the spawner refuses for sure: nothing a fuzzed call starts may run.
REFUSED = {**GOOD, "fgpu": "-1"}


@st.composite
def hub_calls(draw, caller: str, victim: str):
    """(method, path, body) on the hub's API or the service, for the caller's or the victim's servers."""
    user = draw(st.sampled_from([caller, victim, victim, "nobody-" + caller]))
    server = draw(st.one_of(st.sampled_from(["keep", "zz", *ROUTE_NAMES]), st.sampled_from(SPECIAL_NAMES)))
    s, u = path_part(server), path_part(user)
    svc = "/services/bai-scheduler/"
    return draw(st.sampled_from([
        ("GET", "/hub/api/user", None),
        ("GET", f"/hub/api/users/{u}", None),
        ("POST", f"/hub/api/users/{u}/servers/{s}", REFUSED),
        ("DELETE", f"/hub/api/users/{u}/servers/{s}", None),
        ("DELETE", f"/hub/api/users/{u}/server", None),
        ("GET", f"{svc}api/capacity", None),
        ("GET", f"{svc}api/requests", None),
        ("GET", f"{svc}api/requests/{u}/{s}", None),
        ("DELETE", f"{svc}api/requests/{u}/{s}", None),
        ("DELETE", f"{svc}api/requests/{u}", None),
        ("POST", f"{svc}api/launch", {"user": user, "count": 1, "options": REFUSED}),
        ("POST", f"{svc}api/launch", {"count": 1, "options": REFUSED}),
        ("POST", f"{svc}sessions/stop", {"user": user, "server": server}),
        ("POST", f"{svc}api/snapshots", {"user": victim, "server": "keep", "tag": "fuzz"}),
        ("DELETE", f"{svc}api/images/{path_part(KERNEL_IMAGE)}", None),
        ("GET", f"{svc}metrics", None),
        ("GET", f"{svc}sessions.json", None),
        ("GET", f"{svc}api/snapshots", None),
    ]))


def test_fuzz_hub_callers(hub):
    """The hub's and the service's endpoints through the proxy, called with the caller's tokens of
    narrower scope and with Authorization headers that are no token: never a 5xx, and the victim's
    running session stays as it is (its server, its request, its container)."""
    from helpers.service import expanded_scopes

    caller, victim, admin = "fuzzcaller", "fuzzvictim", "admin"  # (the deployment's first admin)
    hub.add_user(caller)
    hub.add_user(victim)
    tokens = {}
    for name, (owner, scopes) in CALLER_TOKENS.items():
        owner = {"caller": caller, "admin": admin}[owner]
        body = {"note": f"fuzz {name}", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = narrow_scopes(scopes, owner) if isinstance(scopes, str) else scopes
        r = hub.api("POST", f"/users/{owner}/tokens", json=body)
        assert r.status_code == 201, r.text
        tokens[name] = r.json()["token"]
    assert hub.start_server(victim, "keep", {**GOOD, "fgpu": "0"}).status_code in (201, 202)
    hub.wait_ready(victim, "keep")
    keep = hub.session_container(victim, "keep")["Id"]
    request = hub.requests()[f"{victim}/keep"]["id"]
    assert f"start:servers!user={caller}" in expanded_scopes(["self"], caller)

    def untouched(what):
        assert hub.servers(victim)["keep"]["ready"], f"{what}: the victim's server"
        assert hub.requests()[f"{victim}/keep"]["id"] == request, f"{what}: the victim's request"

    @settings(HUB_FUZZ, max_examples=5 * HUB_FUZZ.max_examples)
    @given(call=hub_calls(caller, victim), who=st.one_of(st.sampled_from(sorted(tokens)), bad_auth_headers))
    def fuzz(call, who):
        COUNTS["hub-callers"] += 1
        method, path, body = call
        header = f"token {tokens[who]}" if who in tokens else who.lstrip()  # (requests refuses leading blanks)
        what = f"{method} {path[:100]} as {who if who in tokens else repr(who[:30])}"
        headers = {"Authorization": header.encode("latin-1")}
        if path.endswith("sessions/stop"):
            r = requests.post(hub.url + path, data=body, headers=headers, allow_redirects=False, timeout=60)
        else:
            r = requests.request(method, hub.url + path, json=body, headers=headers, allow_redirects=False, timeout=60)
        assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:300]}"
        if who not in tokens and r.status_code < 400:  # no token: a redirect to log in, or health
            assert r.status_code == 302 and "/hub/" in r.headers.get("Location", ""), f"{what} -> {r.status_code}"
        untouched(what)

    try:
        fuzz()
        assert hub.session_container(victim, "keep", running_only=True)["Id"] == keep
        assert not containers_of(hub, caller)
    finally:
        for server in hub.api("GET", f"/users/{caller}?include_stopped_servers=1").json().get("servers", {}):
            hub.api("DELETE", f"/users/{caller}/servers/{server}", json={"remove": True})
        hub.stop_server(victim, "keep")
        hub.wait_gone(victim, "keep")


# -- the image fields: picker, typed name, raw user_options ---------------------------------------------

@pytest.fixture(scope="module")
def image_values(hub):
    """name -> (what a field says, the reference that must then run for user "fuzzimg", or None: refused)."""
    from bai_scheduler.contract import labels as L

    user = "fuzzimg"
    mine, theirs, plain = (f"{hub.prefix}private/{user}:v1", f"{hub.prefix}private/fuzzowner:v1",
                           f"{hub.prefix}plain:1")
    private = (f"{L.KIND}={L.KIND_PRIVATE}", f"{L.DISPLAY_NAME}=fuzz")
    # All three in the registry (as a snapshot or a push puts them there), so only the catalog's
    # rules refuse: another user's private image, and one without the catalog's kind label.
    commit_image(hub, KERNEL_IMAGE, mine, *private, f"{L.OWNER}={user}", pushed=True)
    theirs_id = commit_image(hub, KERNEL_IMAGE, theirs, *private, f"{L.OWNER}=fuzzowner", pushed=True)
    plain_id = commit_image(hub, KERNEL_IMAGE, plain, f"{L.KIND}=", pushed=True)
    wait_listed(hub, mine, theirs)
    try:
        yield user, {
            "catalog": (KERNEL_IMAGE, KERNEL_IMAGE),
            "old": (OLD_IMAGE, OLD_IMAGE),
            "catalog-by-id": (image_id(OLD_IMAGE), OLD_IMAGE),
            "mine": (mine, mine),
            "theirs": (theirs, None),
            "theirs-id": (theirs_id, None),
            "theirs-id-prefix": (theirs_id[:19], None),
            "theirs-short-id": (theirs_id[7:19], None),
            "not-in-catalog": (plain, None),
            "not-in-catalog-digest-prefix": (plain_id[:15], None),
            "nothing": ("", KERNEL_IMAGE),  # the hub's default image
        }
    finally:
        for name in (mine, theirs, plain):
            delete_from(SHARED, name)
        docker("rmi", "-f", mine, theirs, plain, *map(reference, (mine, theirs, plain)))


IMAGE_VALUES = ["catalog", "old", "catalog-by-id", "mine", "theirs", "theirs-id", "theirs-id-prefix", "theirs-short-id",
                "not-in-catalog", "not-in-catalog-digest-prefix", "nothing"]


def test_fuzz_hub_image_fields(hub, image_values):
    """POST /hub/api/users/{u}/servers/{s} with every kind of value in the picker (``image``) and the
    typed name (``image_name``, which wins): the container runs exactly the validated reference
    (``docker inspect``), or nothing is made. Valid shapes, so allowed values really start."""
    user, values = image_values
    hub.add_user(user)
    shape = {"fgpu": "0", "cpu": "0.5", "memory": "1"}
    n = iter(range(10_000))

    @settings(HUB_FUZZ, max_examples=max(6, HUB_FUZZ.max_examples // 3))
    @given(picker=st.sampled_from(IMAGE_VALUES), typed=st.sampled_from(IMAGE_VALUES))
    @example(picker="theirs", typed="catalog")  # the picker names another's private image
    @example(picker="catalog", typed="theirs-id-prefix")
    @example(picker="theirs-short-id", typed="nothing")
    def fuzz(picker, typed):
        COUNTS["hub-image-fields"] += 1
        server = f"img{next(n)}"
        opts = dict(shape)
        if values[picker][0]:
            opts["image"] = values[picker][0]
        if values[typed][0]:
            opts["image_name"] = values[typed][0]
        expected = values[typed][1] if typed != "nothing" else values[picker][1]
        what = f"picker={picker} typed={typed}"
        r = hub.start_server(user, server, opts)
        try:
            assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:300]}"
            if expected is None:
                if r.status_code in (201, 202):
                    text = wait_spawn_ended(hub, user, server, what)
                else:
                    assert r.status_code == 400, f"{what} -> {r.status_code}: {r.text[:300]}"
                    text = r.json()["message"]
                assert "not in the catalog" in text or "either" in text, f"{what}: {text[:300]}"
                assert_nothing_left(hub, user, server, used_quanta(hub), what)
            else:
                assert r.status_code in (201, 202), f"{what} -> {r.status_code}: {r.text[:300]}"
                c = hub.wait_for(lambda: hub.session_container(user, server, running_only=True), 120,
                                 what=f"{what}: the container")
                assert (c["Config"]["Image"], c["Image"]) == (reference(expected), image_id(expected)), what
        finally:
            hub.stop_server(user, server)
            hub.wait_gone(user, server, timeout=90)
            hub.api("DELETE", f"/users/{user}/servers/{server}", json={"remove": True})

    fuzz()

"""Bad input, fuzzed, through the suite's real hub (slow, fewer cases):
``POST /hub/api/users/{u}/servers/{s}`` with fuzzed ``user_options`` and
``POST /hub/spawn/{u}/{s}`` with fuzzed form fields, each refused with a message,
leaving no container, request or share.  The service's own endpoints are fuzzed
in tests/test_fuzz_api.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import KERNEL_IMAGE
from helpers.fuzz import COUNTS, any_json, json_bytes, print_counts  # noqa: F401

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

"""The image that runs is the image allowed.

A spawn names its image in up to three places: the form's picker (``image``), the
typed name (``image_name``, which wins when given) and, through the REST API, any
raw ``user_options``. Whatever the combination, the container is made from the
one reference that passed the catalog check, or nothing is made. Checked on the
engine (``docker inspect``), in the scheduler's request and the hub's record, and
on the sessions page, through the REST API and in Debian's chromium.

The values: two catalog images (one named by its full id), another user's private
image (by name and by id prefix), an image on the engine that is not in the
catalog (by name, by id and by a short id), and nothing.
"""
from __future__ import annotations

import json

import pytest

from bai_spawner import labels as L
from conftest import KERNEL_IMAGE, OLD_IMAGE
from hubtools import docker

pytestmark = [pytest.mark.docker, pytest.mark.hub]

SHAPE = {"fgpu": "0", "cpu": "0.5", "memory": "1"}
GIB = 1024**3


def image_id(ref: str) -> str:
    out = docker("image", "inspect", "--format", "{{.Id}}", ref)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def commit(hub, source: str, ref: str, *label_changes: str) -> str:
    """An image made from ``source`` with changed labels, under the hub's bai-test- prefix."""
    tmp = f"{hub.prefix}mkimage"
    assert docker("create", "--name", tmp, source, "true").returncode == 0
    try:
        changes = [a for lab in label_changes for a in ("--change", f"LABEL {lab}")]
        out = docker("commit", *changes, tmp, ref)
        assert out.returncode == 0, out.stderr
    finally:
        docker("rm", "-f", tmp)
    return image_id(ref)


@pytest.fixture(scope="module")
def values(hub, kernel_images):
    """name -> (value, the reference that must run or None for a refusal)."""
    owner = "imgchoiceowner"
    private = f"{hub.prefix}private/{owner}:secret"
    private_id = commit(hub, KERNEL_IMAGE, private, f"{L.KIND}={L.KIND_PRIVATE}", f"{L.OWNER}={owner}",
                        f"{L.DISPLAY_NAME}=someone-elses")
    # On the engine, runnable, but no catalog image: its kind label is cleared.
    plain = f"{hub.prefix}plain:1"
    plain_id = commit(hub, KERNEL_IMAGE, plain, f"{L.KIND}=")
    try:
        yield {
            "catalog": (KERNEL_IMAGE, KERNEL_IMAGE),
            "catalog-by-id": (image_id(OLD_IMAGE), OLD_IMAGE),
            "private": (private, None),
            "private-id-prefix": (private_id[:19], None),
            "not-in-catalog": (plain, None),
            "not-in-catalog-id": (plain_id, None),
            "not-in-catalog-short-id": (plain_id[7:19], None),
            "nothing": ("", KERNEL_IMAGE),  # the hub's default image
        }
    finally:
        docker("rmi", "-f", private, plain)


def chosen(values, picker: str, typed: str):
    """The typed name wins; without one the picker; without both the default."""
    return values[typed][1] if typed != "nothing" else values[picker][1]


def options(values, picker: str, typed: str) -> dict:
    out = dict(SHAPE)
    if values[picker][0]:
        out["image"] = values[picker][0]
    if values[typed][0]:
        out["image_name"] = values[typed][0]
    return out


def assert_runs(hub, user, server, ref):
    """The session's container, request and record all name ``ref``, and the container runs it."""
    c = hub.wait_for(lambda: hub.session_container(user, server, running_only=True), 120,
                     what=f"{user}/{server}'s container")
    assert c["Config"]["Image"] == ref, (c["Config"]["Image"], ref)
    assert c["Image"] == image_id(ref)
    assert c["Config"]["Labels"][L.IMAGE] == ref
    assert hub.requests()[f"{user}/{server}"]["image"] == ref
    assert hub.servers(user)[server]["user_options"]["image"] == ref
    assert "image_name" not in hub.servers(user)[server]["user_options"]


def assert_refused(hub, user, server, r):
    if r.status_code in (201, 202):  # refused after the hub's slow-spawn wait: a failed spawn
        hub.wait_for(lambda: not hub.servers(user).get(server, {}).get("pending"), 60, what="the refusal")
        assert not hub.servers(user).get(server, {}).get("ready")
    else:
        assert r.status_code == 400, r.text
        assert "not in the catalog" in r.json()["message"] or "either" in r.json()["message"], r.text
    assert hub.session_container(user, server) is None
    assert f"{user}/{server}" not in hub.requests()
    # ...and the refusal leaves no stopped named server behind.
    hub.wait_for(lambda: server not in hub.servers(user, include_stopped=True), 30,
                 what=f"{user}/{server}'s record to go")


def stop(hub, user, server):
    """Stop the session and delete the named server (a user has at most 16)."""
    hub.stop_server(user, server)
    hub.wait_gone(user, server, timeout=90)
    hub.wait_for(lambda: hub.session_container(user, server) is None, 60, what="the container to go")
    r = hub.api("DELETE", hub.server_path(user, server), json={"remove": True})
    assert r.status_code in (202, 204), r.text


NAMES = ["catalog", "catalog-by-id", "private", "private-id-prefix", "not-in-catalog", "not-in-catalog-id",
         "not-in-catalog-short-id", "nothing"]


@pytest.mark.slow
def test_every_picker_and_typed_name_runs_the_validated_image_or_nothing(hub, users, values):
    name, token = users("combo")
    combos = [(f"c{i}{j}", picker, typed) for i, picker in enumerate(NAMES) for j, typed in enumerate(NAMES)]
    allowed = [c for c in combos if chosen(values, c[1], c[2])]
    assert (len(allowed), len(combos) - len(allowed)) == (19, 45)
    starting = []
    for n, (server, picker, typed) in enumerate(combos):
        body = options(values, picker, typed)
        if n % 2:  # JupyterHub's documented form of the body; the bare form otherwise
            body = {"user_options": body}
        r = hub.start_server(name, server, body, token=token)
        if chosen(values, picker, typed) is None:
            assert_refused(hub, name, server, r)
            continue
        assert r.status_code in (201, 202), (picker, typed, r.text)
        starting.append((server, chosen(values, picker, typed)))
        if len(starting) == 4 or (server, picker, typed) == allowed[-1]:
            # A few sessions at a time (a 2-core machine): check each, then stop them.
            for s, ref in starting:
                assert_runs(hub, name, s, ref)
            for s, _ in starting:
                stop(hub, name, s)
            starting.clear()


def test_raw_user_options_cannot_replace_the_validated_image(hub, users, values):
    """Already-parsed options (what a restart or api/launch sends) name one image, and
    cannot be mixed with the form's fields to sneak in another."""
    name, token = users("raw")
    parsed = {"quanta": 0, "cpu_millis": 500, "memory_bytes": GIB, "sessions": 1}
    cases = [
        ({"image": values["private"][0], "image_name": KERNEL_IMAGE, **parsed}, None),
        ({"image": KERNEL_IMAGE, "image_name": values["private"][0], **parsed}, None),
        ({"image": values["not-in-catalog"][0], **parsed}, None),
        ({"image": values["private-id-prefix"][0], **parsed}, None),
        ({"image": KERNEL_IMAGE, "fgpu": "0", **parsed}, None),
        ({"image": f" {OLD_IMAGE}\n", **parsed}, OLD_IMAGE),
        ({"image": values["catalog-by-id"][0], **parsed}, OLD_IMAGE),
        ({"image": f"  {values['private'][0]}  ", "image_name": f"\t{OLD_IMAGE} ", **SHAPE}, OLD_IMAGE),
    ]
    for i, (body, want) in enumerate(cases):
        server = f"r{i}"
        r = hub.start_server(name, server, body, token=token)
        if want is None:
            assert_refused(hub, name, server, r)
        else:
            assert r.status_code in (201, 202), (body, r.text)
            assert_runs(hub, name, server, want)
            stop(hub, name, server)


@pytest.mark.browser
def test_the_browser_form_runs_the_validated_image_and_the_sessions_page_shows_it(hub, browser, values):
    from test_pages_browser import SESSIONS, login, make_login, shot, stop_all

    name = make_login(hub, "imgchoicebrowser")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    # (picker, typed): the picker set by script where the page offers no such choice,
    # as a hand-crafted form post would.
    cases = [
        ("catalog", "catalog-by-id"),          # typed wins: the older version runs
        ("private", "catalog"),                # an injected picker value is not what runs
        ("catalog", "private"),
        ("not-in-catalog", "nothing"),
        ("catalog", "not-in-catalog-short-id"),
    ]
    try:
        login(page, hub, name)
        for i, (picker, typed) in enumerate(cases):
            server = f"b{i}"
            want = chosen(values, picker, typed)
            page.goto(f"{hub.url}/hub/spawn/{name}/{server}")
            page.wait_for_selector("#bai-image")
            page.eval_on_selector("#bai-image", """(s, v) => {
                if (![...s.options].some(o => o.value === v)) s.add(new Option(v, v));
                s.value = v; }""", values[picker][0])
            page.fill("#bai-image-name", values[typed][0])
            page.select_option("#bai-fgpu", "0")
            page.fill("#bai-cpu", "0.5")
            page.fill("#bai-memory", "1")
            page.click("#spawn_form button[type=submit]")
            if want is None:
                page.wait_for_selector(".spawn-error-msg")
                assert "not in the catalog" in page.inner_text(".spawn-error-msg")
                assert hub.session_container(name, server) is None
                hub.wait_for(lambda: server not in hub.servers(name, include_stopped=True), 30,
                             what="the refused server's record to go")
                continue
            page.wait_for_url(lambda u: "/spawn-pending/" in u or f"/user/{name}/" in u, timeout=60000)
            hub.wait_ready(name, server)
            assert_runs(hub, name, server, want)
            page.goto(f"{hub.url}{SESSIONS}")
            row = page.locator(f"tr.bai-row[data-server='{server}']")
            row.wait_for()
            running = hub.session_container(name, server)["Config"]["Image"]
            assert row.locator(".bai-image").inner_text() == running == want
            shot(page, f"image-choice-{i}")
            stop(hub, name, server)
    finally:
        ctx.close()
        stop_all(hub, name)

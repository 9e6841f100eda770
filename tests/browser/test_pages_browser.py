"""The pages in Debian's chromium (Playwright, system browser): login, spawn form, sessions.

A real hub (see helpers.hub.Hub) with NativeAuthenticator logins, 1 simulated GPU = 2 fGPU.
Screenshots go to test-artifacts/.
"""
import time

import pytest

from helpers import ARTIFACTS, KERNEL_IMAGE, OLD_IMAGE
from helpers.registry import reference
from helpers.images import assert_runs, chosen, choice_images, stop

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]

PASSWORD = "pages-Test-pw-2718"
SESSIONS = "/services/bai-scheduler/"


def make_login(hub, name):
    """A NativeAuthenticator login (approved, with PASSWORD) and the hub user behind it."""
    hub.set_password(name, PASSWORD)
    hub.add_user(name)
    return name


def stop_all(hub, name):
    for server in list(hub.servers(name)):
        hub.stop_server(name, server)
    for server in list(hub.servers(name)):
        hub.wait_gone(name, server, timeout=90)
    for key, r in hub.requests().items():  # queued requests the hub no longer tracks
        if r["user"] == name:
            hub.service("DELETE", f"api/requests/{name}/{r['server']}")


def shot(page, name):
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page, hub, name, password=PASSWORD):
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", password)
    with page.expect_navigation():
        page.click("#login_submit")


def states(page) -> list[str]:
    return page.eval_on_selector_all("tr.bai-row", "rows => rows.map(r => r.dataset.state)")


def wait_states(page, predicate, timeout=180, what="sessions"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = states(page)
        if predicate(last):
            return last
        page.wait_for_timeout(1000)  # the page refreshes itself every 2 s
    raise AssertionError(f"timed out waiting for {what}; rows: {last}")


def test_login_page_is_branded_and_refuses_a_wrong_password(hub, browser):
    name = make_login(hub, "pageslogin")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{hub.url}/hub/login")
    assert "BAI Hub" in page.title()
    assert page.is_visible(".bai-hero h1")
    assert page.is_visible("a[href='/hub/signup']")  # NativeAuthenticator's sign-up stays reachable
    body = page.inner_text("body")
    assert "admin-password" not in body and "Password:" in body
    shot(page, "login")
    login(page, hub, name, "not-the-password-1")
    assert "/hub/login" in page.url
    assert "Invalid username or password." in page.inner_text(".login_error")
    assert page.input_value("#username_input") == name
    shot(page, "login-wrong-password")
    page.close()


def test_form_launch_three_then_stop_one_and_the_queued_one_runs(hub, browser):
    name = make_login(hub, "pagesann")
    admin = make_login(hub, hub.env.get("BAI_ADMIN_USER", "admin"))  # c.Authenticator.admin_users
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    try:
        hub.wait_capacity_free()
        login(page, hub, name)
        assert page.url.endswith("/hub/home"), page.url
        assert page.is_visible("#bai-nav-sessions") and not page.is_visible("#bai-nav-snapshots")

        # The sessions page: OAuth into the service, nothing running yet.
        page.click("#bai-nav-sessions")
        page.wait_for_selector("#bai-session-list")
        assert page.url.rstrip("/").endswith(SESSIONS.rstrip("/"))
        assert "No sessions yet" in page.inner_text("#bai-session-list")
        assert "simulated" in page.inner_text(".bai-simulated").lower()

        # A bad value typed into the spawn form: the hub shows the spawner's reason, nothing starts.
        page.goto(f"{hub.url}/hub/spawn/{name}/bad")
        page.fill("#bai-image-name", "debian:bookworm")
        page.click("#spawn_form button[type=submit]")
        page.wait_for_selector(".spawn-error-msg")
        error = page.inner_text(".spawn-error-msg")
        assert "not in the catalog" in error and "HTTP 400" not in error
        shot(page, "form-bad-image")
        assert not hub.requests() or all(r["user"] != name for r in hub.requests().values())

        # The spawn form: images grouped by framework, fGPU meanings, live note.
        page.goto(f"{hub.url}/hub/spawn/{name}/main")
        groups = page.eval_on_selector_all("#bai-image optgroup", "gs => gs.map(g => g.label)")
        assert "scikit-learn" in groups
        versions = page.eval_on_selector_all("#bai-image optgroup[label='scikit-learn'] option",
                                             "os => os.map(o => o.value)")
        assert versions.index(KERNEL_IMAGE) < versions.index(OLD_IMAGE)  # newest first
        assert "0.5 fGPU = 2 GiB GPU memory, 25% of SMs" in page.inner_text("#bai-fgpu")
        page.select_option("#bai-image", KERNEL_IMAGE)
        page.select_option("#bai-fgpu", "1")
        page.fill("#bai-cpu", "0.5")
        page.fill("#bai-memory", "1")
        page.fill("#bai-sessions", "3")
        page.wait_for_function("document.getElementById('bai-live-text').textContent.includes('2 of 3')")
        assert "Live" in page.inner_text("#bai-live-when")  # the note came from the scheduler
        shot(page, "form")
        page.click("#spawn_form button[type=submit]")
        page.wait_for_url(lambda u: "/spawn-pending/" in u or "/user/" in u, timeout=60000)

        # Sessions page: two RUNNING, one PENDING with its place in the queue and why.
        page.goto(f"{hub.url}{SESSIONS}")
        wait_states(page, lambda s: sorted(s) == ["PENDING", "RUNNING", "RUNNING"], what="2 RUNNING + 1 PENDING")
        pending = page.locator("tr.bai-row[data-state=PENDING]")
        assert "#1 in queue" in pending.inner_text()
        # What it lacks, not its place again (issue 14)
        assert pending.locator(".bai-detail").inner_text() == "Needs 1 fGPU; GPU 0 is fully in use"
        running = page.locator("tr.bai-row[data-state=RUNNING]")
        assert running.count() == 2
        href = running.first.locator("a.bai-open").get_attribute("href")
        assert href.startswith(f"/user/{name}/"), href
        assert page.inner_text("[data-stat=running]") == "2" and page.inner_text("[data-stat=fgpu]") == "2"
        shot(page, "sessions")

        # The admin sees everyone's sessions and the GPU's capacity.
        admin_page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        login(admin_page, hub, admin)
        assert admin_page.is_visible("#bai-nav-snapshots")
        admin_page.goto(f"{hub.url}{SESSIONS}")
        admin_page.wait_for_selector("#bai-capacity .bai-gpu")
        assert "2 of 2 fGPU" in admin_page.inner_text("#bai-capacity")
        assert name in admin_page.inner_text("#bai-session-list")
        shot(admin_page, "sessions-admin")
        admin_page.context.close()

        # Stop one running session: the queued one is admitted and becomes RUNNING.
        stopped = running.first.get_attribute("data-server")
        queued = pending.get_attribute("data-server")
        page.once("dialog", lambda d: d.accept())  # Stop asks first
        with page.expect_navigation():
            running.first.locator("button.bai-stop").click()
        wait_states(page, lambda s: s == ["RUNNING", "RUNNING"], what="the queued session to run")
        servers = page.eval_on_selector_all("tr.bai-row", "rows => rows.map(r => r.dataset.server)")
        assert stopped not in servers and queued in servers
        shot(page, "sessions-after-stop")
    finally:
        ctx.close()
        stop_all(hub, name)


def test_sessions_page_refuses_bad_values_and_handcrafted_posts(hub, browser):
    name = make_login(hub, "pagesbob")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    try:
        login(page, hub, name)
        page.goto(f"{hub.url}{SESSIONS}")
        page.wait_for_selector("#bai-new-form")
        # Bypass the browser's own checks, as a hand-crafted post would.
        page.eval_on_selector("#bai-new-form", "f => f.noValidate = true")
        page.fill("#bai-cpu", "99")
        with page.expect_navigation():
            page.click("#bai-launch")
        assert "CPU must be a number from 0.1 to 4 cores" in page.inner_text(".bai-form-error")
        assert page.input_value("#bai-cpu") == "99"  # the values are kept to fix
        page.eval_on_selector("#bai-new-form", "f => f.noValidate = true")
        page.fill("#bai-cpu", "1")
        page.fill("#bai-image-name", "bai-private/someoneelse:x")
        with page.expect_navigation():
            page.click("#bai-launch")
        assert "not in the catalog" in page.inner_text(".bai-form-error")
        shot(page, "sessions-bad-value")
        # A post without the page's xsrf token is not taken as the user's.
        r = page.request.post(f"{hub.url}{SESSIONS}sessions/new", form={"fgpu": "0.5", "sessions": "1"})
        assert r.status == 403
        # Stopping someone else's session is refused.
        page.goto(f"{hub.url}{SESSIONS}")
        token = page.eval_on_selector("input[name=_xsrf]", "i => i.value")
        r = page.request.post(f"{hub.url}{SESSIONS}sessions/stop",
                              form={"_xsrf": token, "user": "pagesann", "server": "main"})
        assert r.status == 404
        time.sleep(1)
        assert not [r for r in hub.requests().values() if r["user"] == name]
        assert not hub.servers(name)
    finally:
        ctx.close()
        stop_all(hub, name)


def test_the_form_runs_the_validated_image_and_the_sessions_page_shows_it(hub, browser):
    """The picker, the typed name, or a picker value the page never offered (set by
    script, as a hand-made post would): the image that runs is the one allowed."""
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
    with choice_images(hub) as values:
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
                # The name picked, and (its title) the registry's reference of that image, which runs.
                cell = row.locator(".bai-image")
                assert running == reference(want) and cell.inner_text() == want
                assert cell.get_attribute("title") == f"Runs {running}"
                shot(page, f"image-choice-{i}")
                stop(hub, name, server)
        finally:
            ctx.close()
            stop_all(hub, name)

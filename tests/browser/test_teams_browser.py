"""Presets, team and pool in the spawn form, and the queue ETA and lifetime notice on the sessions
page, in Debian's chromium on the teams hub of helpers.teams.  Screenshots: test-artifacts/
form-presets.png and sessions-eta.png (copied to docs/screenshots/ for the README)."""
import pytest

from helpers import KERNEL_IMAGE
from helpers.teams import teams_hub as make_teams_hub

from test_pages_browser import PASSWORD, SESSIONS, login, shot

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]


@pytest.fixture(scope="module")
def teams_hub(tmp_path_factory, kernel_images):
    hub = make_teams_hub(tmp_path_factory.mktemp("teams-browser"))
    try:
        hub.start()
        hub.set_password("nia", PASSWORD)
        yield hub
    finally:
        hub.stop()
        hub.cleanup()


def test_form_offers_presets_and_pools_and_the_sessions_page_shows_the_eta(teams_hub, browser):
    hub = teams_hub
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = ctx.new_page()
    try:
        login(page, hub, "nia")
        page.goto(f"{hub.url}/hub/spawn/nia/first")
        presets = page.eval_on_selector_all("input[name=preset]", "xs => xs.map(x => [x.value, x.checked])")
        assert presets == [["half", True], ["fast-full", False], ["", False]]  # the default preset first
        assert page.eval_on_selector_all("#bai-group option", "os => os.map(o => o.value)") == ["team-nlp"]
        pools = page.inner_text("#bai-pool")
        assert "cheap: 2 of 2 fGPU free (1 node)" in pools and "fast:" not in pools  # its pool only
        # The live note counts team-nlp's pool only (it said "Free now: 4 of 4 fGPU", both pools).
        page.wait_for_function("document.getElementById('bai-live-when').textContent.startsWith('Live')",
                               timeout=60000)
        note = page.inner_text("#bai-live-text")
        assert note.startswith("Free now in pool cheap: 2 of 2 fGPU.") and "would start at once" in note, note
        shot(page, "form-presets")

        # Custom: the whole of pool cheap; then a preset that has to wait for it.
        page.check("#bai-preset-custom")
        page.select_option("#bai-fgpu", "2")
        page.fill("#bai-cpu", "0.5")
        page.fill("#bai-memory", "1")
        page.click("#spawn_form button[type=submit]")
        page.wait_for_url(lambda u: "/spawn-pending/" in u or "/user/" in u, timeout=60000)
        hub.wait_ready("nia", "first", timeout=180)
        # Pool cheap is full, pool fast free: a session of team-nlp would wait, and the note says so.
        page.goto(f"{hub.url}/hub/spawn/nia/third")
        page.wait_for_function("document.getElementById('bai-live-text').textContent.includes('in pool cheap')",
                               timeout=60000)
        note = page.inner_text("#bai-live-text")
        assert note.startswith("Free now in pool cheap: 0 of 2 fGPU.") and "would wait in the queue" in note, note
        r = hub.start_server("nia", "second", {"image": KERNEL_IMAGE, "preset": "half"})
        assert r.status_code in (201, 202), r.text
        hub.wait_for(lambda: (q := hub.requests().get("nia/second")) and q["state"] == "PENDING", 60,
                     what="nia/second queued")

        page.goto(f"{hub.url}{SESSIONS}")
        page.wait_for_selector(".bai-eta")
        assert "Expected start: at the latest" in page.inner_text(".bai-eta")
        assert "reaches its lifetime for team-nlp" in page.inner_text(".bai-lifetime-notice")
        shot(page, "sessions-eta")
    finally:
        ctx.close()
        for server in ("first", "second"):
            hub.stop_server("nia", server)
        for server in ("first", "second"):
            hub.wait_gone("nia", server, timeout=90)

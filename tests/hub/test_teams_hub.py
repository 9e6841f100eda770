"""Teams and time through a real hub, scheduler service and Docker engine (issue 18), on the
teams hub of helpers.teams: pools, presets, group quota, lifetimes, the queue ETA."""
import json
import time

import pytest
import requests

from helpers import KERNEL_IMAGE
from helpers.teams import NLP_LIFETIME, teams_hub as make_teams_hub

pytestmark = [pytest.mark.docker, pytest.mark.hub]


@pytest.fixture(scope="module")
def teams_hub(tmp_path_factory, kernel_images):
    hub = make_teams_hub(tmp_path_factory.mktemp("teams-hub"))
    try:
        hub.start()
        for user in ("vic", "nia"):
            hub.add_user(user)
        yield hub
    finally:
        hub.stop()
        hub.cleanup()


def start(hub, user, server, **options):
    r = hub.start_server(user, server, {"image": KERNEL_IMAGE, **options})
    assert r.status_code in (201, 202), r.text


def progress_messages(hub, user, server, until: str, timeout: float = 60) -> list[str]:
    """The spawn progress events of a server until one contains ``until``."""
    seen = []
    with requests.get(f"{hub.url}/hub/api/users/{user}/servers/{server}/progress", stream=True, timeout=timeout,
                      headers={"Authorization": f"token {hub.admin_token}"}) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                seen.append(json.loads(line[5:]).get("message", ""))
                if until in seen[-1]:
                    break
    return seen


def test_pools_presets_lifetime_eta_and_quota(teams_hub):
    hub = teams_hub
    cap = hub.service("GET", "api/capacity").json()
    assert [p["slug"] for p in cap["limits"]["presets"]] == ["half", "fast-full"]
    assert cap["pools"]["fast"]["nodes"] == ["fast"] and cap["groups"]["team-nlp"]["lifetime_s"] == NLP_LIFETIME

    # team-nlp fills its pool (cheap) with a session that lives 45 s; the next one waits for it.
    start(hub, "nia", "x", fgpu="2", cpu="0.5", memory="1")  # the whole of pool cheap
    hub.wait_ready("nia", "x")
    x = hub.requests()["nia/x"]
    assert (x["group"], x["placement"]["node"]) == ("team-nlp", "cheap")  # its pool, not the free fast node
    assert x["deadline"] == pytest.approx(x["admitted_at"] + NLP_LIFETIME)
    start(hub, "nia", "y", preset="half")
    y = hub.wait_for(lambda: (r := hub.requests().get("nia/y")) and r["state"] == "PENDING" and r, 60,
                     what="nia/y queued")
    # The oldest waiting request, no quota on it, every session with a lifetime: an upper bound.
    assert y["eta"]["basis"] == "lifetime", y
    assert y["eta"]["latest"] <= x["deadline"] + 3600 + 1
    assert "at the latest" in y["eta"]["text"]
    assert any("Expected start: at the latest" in m for m in progress_messages(hub, "nia", "y", "Expected start"))
    page = hub.service("GET", "sessions.json").json()
    rows = {(r["user"], r["server"]): r for r in page["rows"]}
    assert rows[("nia", "y")]["eta"].startswith("at the latest")
    assert "Expected start: at the latest" in page["sessions_html"]
    assert "reaches its lifetime for team-nlp and is stopped at" in rows[("nia", "x")]["lifetime_notice"]
    assert "bai-lifetime-notice" in page["sessions_html"]

    # team-vision: the default preset in its pool; its quota of 1 fGPU holds the third half.
    start(hub, "vic", "a", preset="half")
    start(hub, "vic", "b", preset="half")
    hub.wait_ready("vic", "a")
    hub.wait_ready("vic", "b")
    views = hub.requests()
    assert {views[f"vic/{s}"]["placement"]["node"] for s in "ab"} == {"fast"}
    assert views["vic/a"]["fgpu"] == "0.5" and views["vic/a"]["cpu_millis"] == 500
    start(hub, "vic", "c", preset="half")
    c = hub.wait_for(lambda: (r := hub.requests().get("vic/c")) and r["state"] == "PENDING" and r, 60,
                     what="vic/c held by the quota")
    assert c["reason"] == "Waiting: team-vision uses 1 of 1 fGPU"
    usage = hub.service("GET", "api/capacity").json()["group_usage"]["team-vision"]
    assert (usage["fgpu"], usage["pending"]) == ("1", 1)
    assert "1 of 1 fGPU" in hub.service("GET", "sessions.json").json()["capacity_html"]

    # nia/x reaches its lifetime: the service stops it through the hub; nia/y then starts.
    left = x["deadline"] - time.time()
    hub.wait_for(lambda: "x" not in hub.servers("nia") or not hub.servers("nia")["x"].get("ready"),
                 max(left, 0) + 60, what="nia/x stopped at its lifetime")
    assert time.time() >= x["deadline"] - 1
    hub.wait_ready("nia", "y", timeout=120)
    assert hub.requests()["nia/y"]["placement"]["node"] == "cheap"
    assert "reached its lifetime" in hub.tail(400)

    for user, servers in (("vic", "abc"), ("nia", "y")):
        for s in servers:
            hub.stop_server(user, s)
    for user, servers in (("vic", "abc"), ("nia", "y")):
        for s in servers:
            hub.wait_gone(user, s)

"""One request must not stall everyone, multiply itself, or use up a user's servers.

Numbers like ``1e999999`` once cost seconds of CPU on the hub's event loop (and
``1e1000000`` raised an uncaught ``decimal.Overflow``): every entry point that takes
a number must refuse them with a 400 at once, while an unrelated request to the same
process is answered meanwhile. The figures are printed; the assertions leave room
for a loaded machine and still fail by far on a stall of seconds.
"""
from __future__ import annotations

import html
import json
import re
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bai_scheduler.contract import labels as L
from helpers import KERNEL_IMAGE
from helpers.registry import reference
from helpers.hub import docker
from helpers.images import assert_refused

pytestmark = [pytest.mark.docker, pytest.mark.hub]

CPU_ONLY = {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"}
SERVICE = "/services/bai-scheduler/"

HUGE = ["1e300000", "1e999999", "1e1000000", "-1e1000000", "1e-1000000", "9" * 5000, "0." + "0" * 5000 + "1",
        "1" + "0" * 4000]
# field -> hostile values (JSON numbers too, where the entry point takes JSON).
HOSTILE = {
    "fgpu": HUGE + [1e308, 10**4000],
    "cpu": ["1e1000000", "1e999999", "9" * 5000],
    "memory": ["1e1000000", "-1e999999", "9" * 5000],
    "sessions": ["1e999999", "9" * 5000, 10**4000],
}


def as_form(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def error_text(r: requests.Response) -> str:
    """The message of a refusal: JSON's, or the error block of an HTML form page."""
    if r.headers.get("Content-Type", "").startswith("application/json"):
        return r.json()["message"]
    m = re.search(r'class="[^"]*(?:spawn-error-msg|bai-form-error)[^"]*"[^>]*>(.*?)</div>', r.text, re.S)
    assert m, r.text[:500]
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))


def timed(call) -> tuple[requests.Response, float]:
    t0 = time.perf_counter()
    r = call()
    return r, time.perf_counter() - t0


def meanwhile(bad, unrelated) -> tuple[requests.Response, float]:
    """Send ``bad``; while it is in flight, time ``unrelated`` (same process)."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(bad)
        time.sleep(0.05)
        r, seconds = timed(unrelated)
        assert r.status_code == 200, r.text[:200]
        return future.result(timeout=300), seconds


def test_hostile_numbers_are_refused_at_every_entry_point_while_others_are_served(hub, users):
    name, token = users("hostile")
    password = "hostile-pw-" + secrets.token_hex(6)
    browser = hub.login(name, password)  # a cookie login, for the two HTML forms
    hub_xsrf = hub.form_xsrf(browser, f"/hub/spawn/{name}")  # (the default server's form: no record made)
    page_xsrf = hub.form_xsrf(browser, SERVICE + "sessions")

    def hub_unrelated():
        return hub.api("GET", "/")

    def service_unrelated():
        return hub.service("GET", "api/health")

    n = iter(range(10**6))
    entry_points = {
        "hub REST spawn": (hub_unrelated, lambda opts: hub.api(
            "POST", f"/users/{name}/servers/h{next(n)}", token=token, data=json.dumps(opts),
            headers={"Content-Type": "application/json"})),
        "hub spawn form": (hub_unrelated, lambda opts: browser.post(
            f"{hub.url}/hub/spawn/{name}/f{next(n)}", data={**{k: as_form(v) for k, v in opts.items()},
                                                           "_xsrf": hub_xsrf},
            allow_redirects=False, timeout=300)),
        "sessions page form": (service_unrelated, lambda opts: browser.post(
            f"{hub.url}{SERVICE}sessions/new", data={**{k: as_form(v) for k, v in opts.items()},
                                                     "_xsrf": page_xsrf},
            allow_redirects=False, timeout=300)),
        "scheduler api/launch": (service_unrelated, lambda opts: hub.service(
            "POST", "api/launch", token=token, data=json.dumps({"count": 1, "options": opts}),
            headers={"Content-Type": "application/json"})),
    }
    latencies, slowest = [], []
    for where, (unrelated, send) in entry_points.items():
        for field, value in [(field, v) for field, vs in HOSTILE.items() for v in vs]:
            r, seconds = meanwhile(lambda: send({**CPU_ONLY, field: value}), unrelated)
            what = f"{where}: {field}={str(value)[:20]}…"
            assert r.status_code == 400, f"{what} -> {r.status_code}: {r.text[:300]}"
            assert field in error_text(r).lower(), f"{what}: {r.text[:300]}"
            latencies.append(seconds)
            slowest.append((seconds, what))
    for count in ("1e999999", 10**4000, 1e308, -1):
        r, seconds = meanwhile(lambda: hub.service("POST", "api/launch", token=token,
                                                   data=json.dumps({"count": count, "options": CPU_ONLY}),
                                                   headers={"Content-Type": "application/json"}),
                               service_unrelated)
        assert r.status_code == 400 and "count" in r.json()["message"], r.text
        latencies.append(seconds)
        slowest.append((seconds, f"api/launch: count={str(count)[:20]}"))

    median, worst = statistics.median(latencies), max(slowest)
    print(f"\n[hostile] {len(latencies)} hostile requests; unrelated request meanwhile: "
          f"median {median * 1000:.1f} ms, max {worst[0] * 1000:.1f} ms ({worst[1]})")
    assert median < 0.1, sorted(slowest)[-5:]
    assert worst[0] < 1.0, sorted(slowest)[-5:]
    # Nothing was started, queued or left behind.
    assert not [c for c in hub.containers() if c["Config"]["Labels"].get(L.USER) == name]
    assert not [k for k in hub.requests() if k.startswith(f"{name}/")]
    hub.wait_for(lambda: set(hub.servers(name, include_stopped=True)) <= {""}, 30, what="no named servers left")


def test_a_launch_is_one_count_with_one_limit(hub, users):
    name, token = users("launchcount")
    # A sessions field inside the options would make every launched server launch more.
    r = hub.service("POST", "api/launch", token=token, json={"count": 1, "options": {**CPU_ONLY, "sessions": 4}})
    assert r.status_code == 400 and "count" in r.json()["message"], r.text
    r = hub.service("POST", "api/launch", token=token, json={"count": 9, "options": CPU_ONLY})
    assert r.status_code == 400, r.text  # past max_launch (8)
    assert not hub.servers(name)
    # The spawn form's sessions field: this server and two more, and no more than that.
    r = hub.start_server(name, "trio", {**CPU_ONLY, "sessions": "3"}, token=token)
    assert r.status_code in (201, 202), r.text
    hub.wait_for(lambda: len(hub.servers(name)) >= 3, 60, what="three sessions")
    for server in list(hub.servers(name)):
        hub.wait_ready(name, server)
    assert sorted(hub.servers(name)) == ["session-1", "session-2", "trio"]
    for server, s in hub.servers(name).items():
        assert s["user_options"] == {"image": reference(KERNEL_IMAGE), "quanta": 0, "cpu_millis": 500,
                                     "memory_bytes": 1024**3, "sessions": 1}, (server, s["user_options"])


def test_refused_spawns_leave_no_named_servers_behind(hub, users):
    name, token = users("refusals")
    password = "refusals-pw-" + secrets.token_hex(6)
    browser = hub.login(name, password)
    bad = {**CPU_ONLY, "image": "debian:bookworm"}
    for i in range(20):  # more than named_server_limit_per_user (16)
        assert_refused(hub, name, f"no{i}", hub.start_server(name, f"no{i}", bad, token=token))
    for i in range(3):  # the hub's HTML form: the form page itself makes the record
        path = f"/hub/spawn/{name}/form{i}"
        xsrf = hub.form_xsrf(browser, path)
        r = browser.post(f"{hub.url}{path}", data={**bad, "_xsrf": xsrf}, allow_redirects=False, timeout=60)
        if r.status_code in (302, 303):  # refused after the hub's slow-spawn wait (a loaded machine)
            hub.wait_for(lambda: not hub.servers(name).get(f"form{i}", {}).get("pending"), 60, what="the refusal")
        else:
            assert r.status_code == 400 and "not in the catalog" in r.text, r.text[:300]
    hub.wait_for(lambda: set(hub.servers(name, include_stopped=True)) <= {""}, 30,
                 what="the refused servers' records to go")
    r = hub.start_server(name, "good", CPU_ONLY, token=token)
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(name, "good")


def test_an_engine_error_reaches_the_user_without_the_engines_address(fresh_hub):
    # Every container fails to start: it asks for CPUs this machine does not have.
    hub = fresh_hub(extra={"BaiSpawner": {"extra_host_config": {"cpuset_cpus": "4095"}}}).start()
    name = "engineerr"
    token = hub.add_user(name)
    r = hub.start_server(name, "x", CPU_ONLY, token=token)
    if r.status_code in (201, 202):
        hub.wait_for(lambda: not hub.servers(name).get("x", {}).get("pending"), 120, what="the spawn to fail")
        text = hub.api("GET", f"/users/{name}/servers/x/progress").text
    else:
        text = r.text
    assert "Docker engine failed to start the session" in text, text[:500]
    assert "cpu" in text.lower(), text[:500]  # the engine's own explanation
    for address in ("http+docker", "docker.sock", "/v1.", "localhost", "unix://"):
        assert address not in text, (address, text[:500])
    assert not docker("ps", "-aq", "--filter", f"name=^/{hub.prefix}").stdout.split()

"""Restarts and crashes lose nothing: real hub, service and Docker engine."""
import os
import signal

import pytest
import requests

from helpers import KERNEL_IMAGE
from helpers.engine import start_main_engine, stop_main_engine
from helpers.invariants import check_invariants

pytestmark = [pytest.mark.docker, pytest.mark.hub, pytest.mark.slow]

ONE = {"image": KERNEL_IMAGE, "fgpu": "1", "cpu": "0.5", "memory": "1"}


def reachable(hub, user, server, token):
    r = requests.get(f"{hub.url}/user/{user}/{server}/api/status", headers={"Authorization": f"token {token}"},
                     timeout=10)
    return r.status_code == 200


@pytest.mark.parametrize("stop", ["process_group", "hub_only"])
def test_hub_restart_keeps_running_and_queued_sessions(fresh_hub, stop):
    hub = fresh_hub().start()
    token = hub.add_user("rita")
    hub.fill("rita", ONE)
    if stop == "hub_only":
        # As scripts/run-hub's Ctrl-C does: SIGTERM to the hub alone, which stops its
        # managed service first and then cancels the queued spawn.
        hub.proc.send_signal(signal.SIGTERM)
        hub.proc.wait(60)
    hub.stop()
    assert "its first spawn failed" not in hub.tail(400)
    # While the hub is down the sessions keep running.
    assert len([c for c in hub.containers() if c["State"]["Running"]]) == 2
    hub.start()
    assert reachable(hub, "rita", "a", token) and reachable(hub, "rita", "b", token)
    assert hub.requests()["rita/c"]["state"] == "PENDING"
    assert "c" in hub.servers("rita", include_stopped=True)  # the hub still has the queued server
    check_invariants(hub, expect_queued=["rita/c"])
    hub.stop_server("rita", "a")
    # Nobody waits for c any more (its spawn died with the hub): the service
    # asks the hub to start it when it is admitted.
    hub.wait_ready("rita", "c", timeout=120)
    assert reachable(hub, "rita", "c", token)
    check_invariants(hub)


def test_scheduler_sigkill_mid_admission_loses_nothing(fresh_hub):
    hub = fresh_hub().start()
    hub.add_user("sam")
    hub.fill("sam", ONE)
    pids = hub.service_pids()
    assert pids
    # Kill it right as a release lands, so admission and the crash race.
    hub.stop_server("sam", "a")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # The hub restarts its managed service; the service reconciles with the engine.
    hub.wait_for(lambda: hub.service_pids() and hub.service("GET", "api/health").status_code == 200,
                 90, 1, what="scheduler back")
    hub.wait_ready("sam", "c", timeout=150)
    check_invariants(hub)


def test_docker_engine_restart_fails_cleanly_and_recovers(fresh_hub):
    """Engine down: a spawn fails with a clear message (or waits), nothing is half-made or leaked."""
    hub = fresh_hub().start()
    hub.add_user("eve")
    hub.start_server("eve", "a", ONE)
    hub.wait_ready("eve", "a")
    stop_main_engine()
    try:
        r = hub.start_server("eve", "b", ONE)
        if r.status_code in (201, 202):
            hub.wait_for(lambda: not hub.servers("eve").get("b", {}).get("pending"), 60, what="spawn to end")
            assert not hub.servers("eve").get("b", {}).get("ready")
        else:
            assert r.status_code >= 400 and "docker" in r.text.lower(), r.text
    finally:
        start_main_engine()
    # The engine stopped every container; their shares come back and b leaves no request behind.
    hub.wait_for(lambda: not any(r["state"] == "RUNNING" for r in hub.requests().values()), 90, 1,
                 what="shares returned")
    assert "eve/b" not in hub.requests()
    check_invariants(hub)


def test_idle_session_is_culled_and_its_share_goes_to_the_queue(fresh_hub):
    hub = fresh_hub()
    # Idle longer than filling takes (three spawns, 8 s each on a loaded machine): a culled before
    # fill() saw it ready made the test wait for a server that was gone.
    hub.env.update(BAI_IDLE_TIMEOUT="45", BAI_IDLE_CULL_EVERY="5")
    hub.start()
    hub.add_user("ivy")
    hub.fill("ivy", ONE)
    # Nobody uses a or b: the culler stops them after 45 s idle, and c starts.
    hub.wait_ready("ivy", "c", timeout=240)
    assert "ivy/a" not in hub.requests() or "ivy/b" not in hub.requests()
    check_invariants(hub)


def test_scheduler_database_outage_fails_spawns_cleanly_and_recovers(fresh_hub):
    from helpers.postgres import Postgres

    pg = Postgres().start()
    try:
        hub = fresh_hub()
        hub.env["BAI_SCHEDULER_DB_URL"] = pg.create_db("bai_sched")
        hub.start()
        hub.add_user("dana")
        hub.start_server("dana", "a", ONE)
        hub.wait_ready("dana", "a")
        pg.stop()
        pg.wait_down()
        r = hub.start_server("dana", "b", ONE)
        assert r.status_code == 503 and "database" in r.json()["message"].lower(), r.text
        assert not hub.servers("dana").get("b", {}).get("ready")
        pg.start()
        # Recovered: the running session kept its share, new spawns work again.
        assert hub.requests()["dana/a"]["state"] == "RUNNING"
        assert hub.start_server("dana", "b", ONE).status_code in (201, 202)
        hub.wait_ready("dana", "b")
        check_invariants(hub)
    finally:
        pg.destroy()

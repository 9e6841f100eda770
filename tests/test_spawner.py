"""BaiSpawner in-process, without a hub or an engine: state, poll, the deprecated option names.
Its start, progress and stop against a real engine and service: tests/engine/test_spawner_inprocess.py."""
import asyncio
import logging

import pytest

from helpers.spawner import make_spawner


def test_state_round_trip_and_clear():
    sp = make_spawner()
    sp.request_id, sp.node_url, sp.node_tls = "r1", "tcp://node2:2376", {"ca_cert": "/ca.pem"}
    state = sp.get_state()
    assert state["request_id"] == "r1" and state["node_url"] == "tcp://node2:2376"
    assert state["node_tls"] == {"ca_cert": "/ca.pem"}
    sp.clear_state()
    assert (sp.request_id, sp.node_url, sp.node_tls, sp.placement) == ("", "", {}, {})
    assert not {"request_id", "node_url", "node_tls"} & set(sp.get_state())
    again = make_spawner()
    again.load_state(state)
    assert (again.request_id, again.node_url, again.node_tls) == ("r1", "tcp://node2:2376", {"ca_cert": "/ca.pem"})


def test_poll_counts_a_queued_request_as_alive_and_nothing_as_stopped():
    sp = make_spawner()
    sp.request_id = "queued-1"  # registered, no container yet: the hub's Stop must reach stop()
    assert asyncio.run(sp.poll()) is None
    sp.request_id = ""
    assert asyncio.run(sp.poll()) == 0


def test_progress_streams_events_until_the_spawn_ends():
    sp = make_spawner()

    async def run():
        sp._events, sp._events_changed, sp._spawn_done = [], asyncio.Event(), False
        seen = []

        async def consume():
            async for ev in sp.progress():
                seen.append(ev["message"])

        task = asyncio.ensure_future(consume())
        sp._emit(10, "Waiting in queue (position 1)")
        await asyncio.sleep(0.01)
        sp._emit(50, "Admitted")
        sp._spawn_done = True
        sp._events_changed.set()
        await asyncio.wait_for(task, 5)
        return seen

    assert asyncio.run(run()) == ["Waiting in queue (position 1)", "Admitted"]


@pytest.mark.parametrize("name", ["max_cpu", "default_cpu", "max_memory_gib", "default_memory_gib",
                                  "gpu_backend", "hami_library", "mps_pipe_directory"])
def test_moved_options_warn_on_the_spawner(name, caplog):
    log = logging.getLogger("traitlets")  # the spawner's log outside a hub
    log.addHandler(caplog.handler)
    try:
        make_spawner(**{name: "3"})
    finally:
        log.removeHandler(caplog.handler)
    assert f"BaiSpawner.{name} is deprecated" in caplog.text and f"c.BaiScheduler.{name}" in caplog.text

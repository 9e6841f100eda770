"""Two Docker engines as two scheduler nodes: placement, events and repair per node."""
import pytest
import requests

from bai_scheduler.contract import labels
from helpers import KERNEL_IMAGE
from helpers.engine import ExtraEngine
from helpers.invariants import check_invariants
from helpers.registry import reference

pytestmark = [pytest.mark.docker, pytest.mark.hub, pytest.mark.slow]

ONE = {"image": KERNEL_IMAGE, "fgpu": "1", "cpu": "0.5", "memory": "1"}


@pytest.fixture(scope="module")
def node2(kernel_images):
    engine = ExtraEngine("bai-test-node2", 77).start()
    try:
        engine.copy_image(reference(KERNEL_IMAGE))  # what sessions run: no pull here (tests/hub/test_registry_nodes.py)
        yield engine
    finally:
        engine.destroy()


def session_containers(engine_docker, prefix):
    ids = engine_docker("ps", "-q", "--filter", f"name=^/{prefix}").stdout.split()
    return ids


def test_sessions_spread_over_two_engines_and_each_engine_is_watched(fresh_hub, node2):
    hub = fresh_hub(nodes=[
        {"name": "local", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB"},
        {"name": "node2", "docker_url": node2.url, "gpus": 1, "gpu_memory": "8GiB"},
    ], extra={"BaiScheduler": {"reconcile_interval": 3600.0}}).start()  # shares come back through events only
    token = hub.add_user("nina")
    for s in "abcd":
        r = hub.start_server("nina", s, ONE)
        assert r.status_code in (201, 202), (r.status_code, r.text, hub.tail(120))
    for s in "abcd":
        hub.wait_ready("nina", s, timeout=150)
    reqs = hub.requests()
    # Two GPUs of 2 fGPU each: four 1-fGPU sessions fill both nodes exactly.
    nodes = sorted(reqs[f"nina/{s}"]["placement"]["node"] for s in "abcd")
    assert nodes == ["local", "local", "node2", "node2"]
    on_node2 = [s for s in "abcd" if reqs[f"nina/{s}"]["placement"]["node"] == "node2"]
    ids = session_containers(node2.docker, hub.prefix)
    assert len(ids) == 2
    inspect = node2.docker("inspect", "--format", "{{index .Config.Labels \"%s\"}}" % labels.NODE, ids[0])
    assert inspect.stdout.strip() == "node2"
    # The session on the second engine answers through the hub's proxy.
    r = requests.get(f"{hub.url}/user/nina/{on_node2[0]}/api/status", headers={"Authorization": f"token {token}"})
    assert r.status_code == 200
    # A fifth session queues; killing a container on node2 frees its share
    # through that engine's events, and the queued one starts there.
    hub.start_server("nina", "e", ONE)
    hub.wait_for(lambda: hub.requests().get("nina/e", {}).get("state") == "PENDING", 30, what="e queued")
    node2.docker("kill", ids[0])
    # Through node2's events: the reconcile runs only at start here.
    hub.wait_for(lambda: hub.requests().get("nina/e", {}).get("state") == "RUNNING", 30, 0.1,
                 what="node2's share returned")
    assert hub.requests()["nina/e"]["placement"]["node"] == "node2"
    hub.wait_ready("nina", "e", timeout=150)
    # Engine-side state wins after a scheduler restart on both nodes.
    hub.stop()
    hub.start()
    check_invariants(hub, engines=("", node2.url))
    for s in list(hub.servers("nina")):
        hub.stop_server("nina", s)
    hub.wait_for(lambda: not session_containers(node2.docker, hub.prefix), 60, what="node2 cleaned")

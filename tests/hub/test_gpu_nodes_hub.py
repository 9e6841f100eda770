"""GPU node readiness through a real hub, scheduler service and Docker engine.

The node declares one real GPU (by UUID) with the HAMi backend, but HAMi-core's library is
not on it: the scheduler's check finds that through the engine, shows it to admins, and
places no GPU share there, while a CPU-only session on the same node runs.
"""
import pytest

from helpers import KERNEL_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.hub]

GPU_UUID = "GPU-0a1b2c3d-bai0-test-0000-000000000000"


def test_gpu_node_without_hami_library_gets_no_gpu_session(fresh_hub, tmp_path):
    lock = tmp_path / "vgpulock"
    lock.mkdir()
    library = tmp_path / "vgpu" / "libvgpu.so"
    hub = fresh_hub(nodes=[{
        "name": "gpu1", "docker_url": "", "gpu_backend": "hami",
        "hami_library": str(library), "hami_lock_dir": str(lock),
        "gpus": [{"uuid": GPU_UUID, "index": 0, "memory": "8GiB", "name": "Declared GPU"}],
    }]).start()
    user = "gpuwaiter"
    token = hub.add_user(user)

    def node_view(tok):
        return hub.service("GET", "api/capacity", token=tok).json()["nodes"][0]

    admin = hub.wait_for(lambda: (v := node_view(None)).get("gpu_checked_at") and v, 60, what="first GPU check")
    assert admin["gpu_backend"] == "hami" and admin["gpu_ready"] is False
    assert f"{library} does not exist on the node" in admin["gpu_reason"]
    assert admin["simulated"] is False
    mine = node_view(token)
    assert mine["gpu_ready"] is False and "gpu_reason" not in mine  # paths are for admins

    r = hub.start_server(user, "gpu", {"image": KERNEL_IMAGE, "fgpu": "0.5", "cpu": "0.5", "memory": "1"})
    assert r.status_code in (201, 202), r.text
    r = hub.start_server(user, "cpu", {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"})
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(user, "cpu")
    state = hub.requests()[f"{user}/gpu"]
    assert state["state"] == "PENDING", state
    assert "GPUs not ready on gpu1" in state["reason"], state
    assert hub.session_container(user, "gpu") is None  # nothing unenforced was started
    assert hub.session_container(user, "cpu", running_only=True) is not None
    page = hub.service("GET", "sessions.json", token=None).json()
    assert "does not exist on the node" in page["capacity_html"]
    assert "GPUs not ready" in page["capacity_html"]
    # The probes the check ran are gone again.
    assert not [c for c in hub.containers() if "probe" in c["Name"]]
    hub.stop_server(user, "gpu")
    hub.stop_server(user, "cpu")
    hub.wait_gone(user, "cpu")

"""The GPU part of a session container per enforcement backend, against literal expected specs.

Each backend's spec is checked against what the tool itself reads: HAMi-core's
CUDA_DEVICE_*_LIMIT_<i> per device index, CUDA MPS's client variables, one MIG instance per
process, and Docker's own behaviour for a missing bind source (tests/test_gpu_engine.py).
"""
import pytest

from bai_scheduler.core.model import GpuBackend
from bai_scheduler.core.units import FgpuUnits
from bai_spawner.gpu import PlacementMismatch, gpu_spec

UNITS = FgpuUnits(2, "0.5")  # 4 quanta per GPU
GIB = 1024**3
LIB = "/usr/local/vgpu/libvgpu.so"


def placement(*quanta, backend="hami", simulated=False, mig=False, capacity=4, indexes=None, **paths):
    """Shares in the order the scheduler lists them; ``indexes`` are their host indexes."""
    indexes = indexes or range(len(quanta))
    return {
        "node": "n1",
        "simulated": simulated,
        "gpu": {**GpuBackend(backend).to_json(), **paths},
        "shares": [
            {"device": f"GPU-{i}", "quanta": q, "index": i, "memory_bytes": 8 * GIB, "sm_count": 108,
             "capacity": capacity, "mig_profile": "3g.40gb" if mig else None}
            for i, q in zip(indexes, quanta)
        ],
    }


def test_hami_half_fgpu_is_a_quarter_gpu():
    spec = gpu_spec(placement(1), UNITS)
    assert spec.environment == {
        "BAI_FGPU": "0.5",
        "BAI_GPU_BACKEND": "hami",
        "NVIDIA_VISIBLE_DEVICES": "GPU-0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "BAI_GPU_MEMORY_BYTES": str(2 * GIB),
        "CUDA_DEVICE_MEMORY_LIMIT_0": "2048m",
        "CUDA_DEVICE_SM_LIMIT_0": "25",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": "/run/bai-vgpu/cudevshr.cache",
        "LD_PRELOAD": LIB,
    }
    assert spec.device_requests == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-0"], "Capabilities": [["gpu", "compute", "utility"]]}
    ]
    assert spec.labels == {
        "org.bai-hub.node": "n1",
        "org.bai-hub.devices": "GPU-0",
        "org.bai-hub.quanta": "1",
        "org.bai-hub.fgpu": "0.5",
    }


def test_hami_mounts_library_and_lock_folder_and_keeps_its_cache_private():
    """HAMi-core locks /tmp/vgpulock/lock across every container of the node (without it the SM
    limiter never starts); its shared-region cache must belong to this container only."""
    spec = gpu_spec(placement(1, hami_library="/opt/hami/libvgpu.so", hami_lock_dir="/var/lock/vgpu"), UNITS)
    assert spec.mounts == [
        {"Type": "bind", "Source": "/opt/hami/libvgpu.so", "Target": "/opt/hami/libvgpu.so", "ReadOnly": True},
        {"Type": "bind", "Source": "/var/lock/vgpu", "Target": "/tmp/vgpulock", "ReadOnly": False},
    ]
    assert spec.environment["LD_PRELOAD"] == "/opt/hami/libvgpu.so"
    assert spec.tmpfs == {"/run/bai-vgpu": "mode=1777"}
    assert spec.environment["CUDA_DEVICE_MEMORY_SHARED_CACHE"].startswith("/run/bai-vgpu/")


def test_hami_sm_limit_is_per_device():
    """One whole GPU plus half of another: 100 % on the first, 50 % on the second, not 50 % on both."""
    env = gpu_spec(placement(4, 2), UNITS).environment
    assert (env["CUDA_DEVICE_SM_LIMIT_0"], env["CUDA_DEVICE_SM_LIMIT_1"]) == ("100", "50")
    assert (env["CUDA_DEVICE_MEMORY_LIMIT_0"], env["CUDA_DEVICE_MEMORY_LIMIT_1"]) == ("8192m", "4096m")
    assert "CUDA_DEVICE_SM_LIMIT" not in env  # HAMi-core would apply a plain one to unlisted devices


def test_limits_follow_host_device_order_not_placement_order():
    """Placement lists whole GPUs first; inside the container CUDA (PCI_BUS_ID) and NVML number
    devices by host index, so the limits are keyed by host order."""
    p = placement(4, 2, indexes=[3, 1])  # whole GPU-3 first, half of GPU-1 second
    hami = gpu_spec(p, UNITS)
    env = hami.environment
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-1,GPU-3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert (env["CUDA_DEVICE_MEMORY_LIMIT_0"], env["CUDA_DEVICE_SM_LIMIT_0"]) == ("4096m", "50")  # GPU-1
    assert (env["CUDA_DEVICE_MEMORY_LIMIT_1"], env["CUDA_DEVICE_SM_LIMIT_1"]) == ("8192m", "100")  # GPU-3
    assert env["BAI_GPU_MEMORY_BYTES"] == f"{4 * GIB},{8 * GIB}"
    assert hami.device_requests[0]["DeviceIDs"] == ["GPU-1", "GPU-3"]
    # labels keep the scheduler's order: the service compares them with its record
    assert hami.labels["org.bai-hub.devices"] == "GPU-3,GPU-1"
    mps = gpu_spec(placement(4, 4, indexes=[2, 0], backend="mps"), UNITS).environment
    assert mps["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M,1=8192M"
    assert mps["NVIDIA_VISIBLE_DEVICES"] == "GPU-0,GPU-2"


def test_hami_simulated_keeps_env_and_labels_but_requests_and_mounts_nothing():
    spec = gpu_spec(placement(2, simulated=True), UNITS)
    assert spec.device_requests == [] and spec.mounts == [] and spec.tmpfs == {}
    assert "LD_PRELOAD" not in spec.environment
    assert spec.environment["CUDA_DEVICE_MEMORY_LIMIT_0"] == "4096m"
    assert spec.environment["CUDA_DEVICE_SM_LIMIT_0"] == "50"
    assert spec.environment["BAI_GPU_SIMULATED"] == "1"


def test_mps_limits_and_only_what_mps_needs_of_the_host():
    spec = gpu_spec(placement(1, backend="mps", mps_pipe_directory="/run/mps/pipe",
                              mps_shm_directory="/run/mps/shm"), UNITS)
    env = spec.environment
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps/pipe"
    assert spec.mounts == [
        {"Type": "bind", "Source": "/run/mps/pipe", "Target": "/run/mps/pipe", "ReadOnly": False},
        {"Type": "bind", "Source": "/run/mps/shm", "Target": "/dev/shm", "ReadOnly": False},
    ]
    assert not hasattr(spec, "ipc_mode")  # never the host's IPC namespace


def test_mps_refuses_a_fraction_next_to_whole_gpus():
    """MPS takes one thread percentage per process for every device it uses."""
    with pytest.raises(PlacementMismatch, match="one SM percentage per process"):
        gpu_spec(placement(4, 2, backend="mps"), UNITS)
    assert gpu_spec(placement(4, 4, backend="mps"), UNITS).environment["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"


def test_whole_and_mig_refuse_partial_shares():
    assert gpu_spec(placement(4, backend="whole"), UNITS).device_requests[0]["DeviceIDs"] == ["GPU-0"]
    with pytest.raises(PlacementMismatch, match="whole devices only"):
        gpu_spec(placement(2, backend="whole"), UNITS)
    with pytest.raises(PlacementMismatch, match="MIG"):
        gpu_spec(placement(4, backend="mig"), UNITS)
    assert gpu_spec(placement(4, backend="mig", mig=True), UNITS).device_requests[0]["DeviceIDs"] == ["GPU-0"]


def test_mig_refuses_several_instances_in_one_container():
    """CUDA enumerates a single MIG instance per process: a second one would be invisible."""
    with pytest.raises(PlacementMismatch, match="one MIG instance per session"):
        gpu_spec(placement(4, 4, backend="mig", mig=True), UNITS)


def test_cpu_only_session_sees_no_gpu():
    spec = gpu_spec({"node": "n1", "shares": [], "gpu": GpuBackend().to_json()}, UNITS)
    assert spec.device_requests == [] and spec.mounts == []
    assert spec.environment["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert spec.labels["org.bai-hub.devices"] == "" and spec.labels["org.bai-hub.fgpu"] == "0"


def test_a_node_without_a_known_backend_is_refused():
    p = placement(1)
    p["gpu"]["backend"] = "magic"
    with pytest.raises(PlacementMismatch, match="hami, mps, mig, whole"):
        gpu_spec(p, UNITS)
    del p["gpu"]
    with pytest.raises(PlacementMismatch, match="no known GPU backend"):
        gpu_spec(p, UNITS)

"""Container specs per enforcement backend, against literal expected specs."""
import pytest

from bai_scheduler.core.units import FgpuUnits
from bai_spawner.gpu import PlacementMismatch, gpu_spec

UNITS = FgpuUnits(2, "0.5")  # 4 quanta per GPU
GIB = 1024**3


def placement(*quanta, simulated=False, mig=False, capacity=4):
    return {
        "node": "n1",
        "simulated": simulated,
        "shares": [
            {"device": f"GPU-{i}", "quanta": q, "index": i, "memory_bytes": 8 * GIB, "sm_count": 108,
             "capacity": capacity, "mig_profile": "3g.40gb" if mig else None}
            for i, q in enumerate(quanta)
        ],
    }


def test_hami_half_fgpu_is_a_quarter_gpu():
    spec = gpu_spec("hami", placement(1), UNITS)
    assert spec.environment == {
        "BAI_FGPU": "0.5",
        "BAI_GPU_BACKEND": "hami",
        "NVIDIA_VISIBLE_DEVICES": "GPU-0",
        "BAI_GPU_MEMORY_BYTES": str(2 * GIB),
        "CUDA_DEVICE_MEMORY_LIMIT_0": "2048m",
        "CUDA_DEVICE_SM_LIMIT": "25",
        "LD_PRELOAD": "/usr/local/vgpu/libvgpu.so",
    }
    assert spec.device_requests == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-0"], "Capabilities": [["gpu", "compute", "utility"]]}
    ]
    assert spec.binds == {"/usr/local/vgpu/libvgpu.so": {"bind": "/usr/local/vgpu/libvgpu.so", "mode": "ro"}}
    assert spec.labels == {
        "org.bai-hub.node": "n1",
        "org.bai-hub.devices": "GPU-0",
        "org.bai-hub.quanta": "1",
        "org.bai-hub.fgpu": "0.5",
    }


def test_hami_simulated_keeps_env_and_labels_but_requests_no_device():
    spec = gpu_spec("hami", placement(2, simulated=True), UNITS)
    assert spec.device_requests == [] and spec.binds == {}
    assert "LD_PRELOAD" not in spec.environment
    assert spec.environment["CUDA_DEVICE_MEMORY_LIMIT_0"] == "4096m"
    assert spec.environment["CUDA_DEVICE_SM_LIMIT"] == "50"
    assert spec.environment["BAI_GPU_SIMULATED"] == "1"


def test_hami_whole_plus_fraction_spans_two_devices():
    spec = gpu_spec("hami", placement(4, 2), UNITS)
    env = spec.environment
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-0,GPU-1"
    assert (env["CUDA_DEVICE_MEMORY_LIMIT_0"], env["CUDA_DEVICE_MEMORY_LIMIT_1"]) == ("8192m", "4096m")
    assert spec.labels["org.bai-hub.quanta"] == "4,2"
    assert spec.labels["org.bai-hub.fgpu"] == "3"


def test_mps_limits_and_shared_pipe():
    spec = gpu_spec("mps", placement(1), UNITS, mps_pipe_directory="/run/mps")
    assert spec.environment["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert spec.environment["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
    assert spec.environment["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps"
    assert spec.binds == {"/run/mps": {"bind": "/run/mps", "mode": "rw"}}
    assert spec.ipc_mode == "host"


def test_whole_and_mig_refuse_partial_shares():
    assert gpu_spec("whole", placement(4), UNITS).device_requests[0]["DeviceIDs"] == ["GPU-0"]
    with pytest.raises(PlacementMismatch, match="whole devices only"):
        gpu_spec("whole", placement(2), UNITS)
    with pytest.raises(PlacementMismatch, match="MIG"):
        gpu_spec("mig", placement(4), UNITS)
    assert gpu_spec("mig", placement(4, mig=True), UNITS).device_requests[0]["DeviceIDs"] == ["GPU-0"]


def test_cpu_only_session_sees_no_gpu():
    spec = gpu_spec("hami", {"node": "n1", "shares": []}, UNITS)
    assert spec.device_requests == []
    assert spec.environment["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert spec.labels["org.bai-hub.devices"] == "" and spec.labels["org.bai-hub.fgpu"] == "0"


def test_unknown_backend():
    with pytest.raises(ValueError, match="hami, mps, mig, whole"):
        gpu_spec("magic", placement(1), UNITS)

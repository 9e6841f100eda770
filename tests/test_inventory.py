"""Inventory: simulated nodes from config, and NVML read through a fake pynvml."""
import sys
import types
from decimal import Decimal

import pytest

from bai_scheduler import inventory
from bai_scheduler.core.nodes import parse_bytes, simulated_nodes
from bai_scheduler.core.units import FgpuUnits
from bai_scheduler.inventory import NoGpuError, nvml_devices

U = FgpuUnits(fgpu_per_gpu=2, fgpu_step=Decimal("0.5"))
GIB = 1024**3


@pytest.mark.parametrize(
    "text, value",
    [
        ("8GiB", 8 * GIB),
        ("16 GiB", 16 * GIB),
        ("512MiB", 512 * 1024**2),
        ("1.5GiB", 3 * GIB // 2),
        ("2Gi", 2 * GIB),
        ("1GB", 10**9),
        ("1024", 1024),
        ("0", 0),
        (4096, 4096),
        ("1 TiB", 1024**4),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "8 parsecs", "", -5, True, None, float("nan"), "1.2.3GiB"])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_simulated_node_defaults():
    (node,) = simulated_nodes(
        [{"name": "local", "docker_url": "", "gpus": 2, "gpu_memory": "8GiB",
          "gpu_name": "Simulated GPU", "sm_count": 108, "cpu": 0, "memory": 0}],
        U,
    )
    assert node.simulated and node.name == "local" and node.docker_url == ""
    assert [d.uuid for d in node.devices] == ["GPU-sim-local-0", "GPU-sim-local-1"]
    assert [d.index for d in node.devices] == [0, 1]
    assert all(d.quanta == 4 and d.memory_bytes == 8 * GIB and d.sm_count == 108 for d in node.devices)
    assert node.cpu_millis == 0 and node.memory_bytes == 0


def test_simulated_cpu_and_memory():
    nodes = simulated_nodes(
        [
            {"name": "a", "gpus": 1, "gpu_memory": 8 * GIB, "cpu": "0.5", "memory": "16 GiB"},
            {"name": "b", "gpus": 0, "cpu": 4, "memory": "512MiB", "docker_url": "tcp://b:2376"},
        ],
        U,
    )
    assert nodes[0].cpu_millis == 500 and nodes[0].memory_bytes == 16 * GIB
    assert nodes[1].devices == () and nodes[1].cpu_millis == 4000
    assert nodes[1].docker_url == "tcp://b:2376"
    # stable: same spec, same uuids
    again = simulated_nodes([{"name": "a", "gpus": 1, "gpu_memory": "8GiB"}], U)
    assert again[0].devices[0].uuid == nodes[0].devices[0].uuid


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"name": "x"}, "list"),
        ("local", "list"),
        ([1], "must be a dict"),
        ([{"name": "a", "gpus": 1}], "gpu_memory must be given"),
        ([{"name": "a", "gpus": -1, "gpu_memory": "8GiB"}], "gpus"),
        ([{"name": "a", "gpus": 1.5, "gpu_memory": "8GiB"}], "gpus"),
        ([{"name": "a", "gpus": 1, "gpu_memory": "8 bananas"}], "gpu_memory"),
        ([{"name": "a", "gpus": 1, "gpu_memory": "8GiB", "colour": "red"}], "unknown key"),
        ([{"name": "a"}, {"name": "a"}], "duplicate"),
        ([{"name": "bad name!"}], "name"),
        ([{"name": "a", "cpu": "many"}], "cpu"),
        ([{"name": "a", "cpu": -1}], "cpu"),
        ([{"name": "a", "memory": "-3GiB"}], "memory"),
        ([{"name": "a", "sm_count": -3}], "sm_count"),
        ([{"gpus": 0}, {"gpus": 0}], "name"),
    ],
)
def test_simulated_bad_specs(spec, words):
    with pytest.raises(ValueError, match=words):
        simulated_nodes(spec, U)


# ---------------------------------------------------------------- fake NVML
class FakeNVMLError(Exception):
    pass


def fake_pynvml(gpus, init_fails=False, with_attributes=True):
    """gpus: list of dicts: uuid, name, mem, sms, mig (None or list of dicts/None per slot)."""
    nv = types.ModuleType("pynvml")
    nv.NVML_DEVICE_MIG_ENABLE = 1
    nv.NVMLError = FakeNVMLError
    nv.calls = []

    def init():
        nv.calls.append("init")
        if init_fails:
            raise FakeNVMLError("Driver Not Loaded")

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: nv.calls.append("shutdown")
    nv.nvmlDeviceGetCount = lambda: len(gpus)
    nv.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nv.nvmlDeviceGetUUID = lambda h: h["uuid"]
    nv.nvmlDeviceGetName = lambda h: h["name"].encode()  # old bindings return bytes
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["mem"], used=0, free=h["mem"])

    def mig_mode(h):
        if "mig" not in h:
            raise FakeNVMLError("Not Supported")
        return (1 if h["mig"] is not None else 0, 0)

    nv.nvmlDeviceGetMigMode = mig_mode
    nv.nvmlDeviceGetMaxMigDeviceCount = lambda h: len(h["mig"])

    def mig_handle(h, j):
        m = h["mig"][j]
        if m is None:
            raise FakeNVMLError("Not Found")
        return m

    nv.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    whole = [id(g) for g in gpus]
    if with_attributes:
        def attrs(h):
            # Like the real NVML: attributes exist for MIG device handles only.
            if id(h) in whole or h.get("sms") is None:
                raise FakeNVMLError("Not Supported")
            return types.SimpleNamespace(multiprocessorCount=h["sms"], gpuInstanceSliceCount=1,
                                         memorySizeMB=h["mem"] // 1024**2)
        nv.nvmlDeviceGetAttributes = attrs
    return nv


def test_nvml_plain_gpus(monkeypatch):
    nv = fake_pynvml([
        {"uuid": "GPU-aaa", "name": "NVIDIA H100", "mem": 80 * GIB, "sms": None, "mig": None},
        {"uuid": "GPU-bbb", "name": "NVIDIA H100", "mem": 80 * GIB, "sms": 132},
    ])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    # Whole GPUs get their SM count from the CUDA driver: NVML has none for them.
    monkeypatch.setattr(inventory, "cuda_sm_counts", lambda: {"GPU-bbb": 132}, raising=False)
    devs = nvml_devices(U)
    assert [(d.uuid, d.index, d.name, d.memory_bytes, d.sm_count, d.quanta) for d in devs] == [
        ("GPU-aaa", 0, "NVIDIA H100", 80 * GIB, 0, 4),
        ("GPU-bbb", 1, "NVIDIA H100", 80 * GIB, 132, 4),
    ]
    assert all(d.mig_parent is None and d.mig_profile is None for d in devs)
    assert nv.calls == ["init", "shutdown"]


def test_nvml_whole_gpus_get_sm_count_from_cuda(monkeypatch):
    """NVML answers nvmlDeviceGetAttributes for MIG handles only: a whole GPU's SMs come from CUDA."""
    nv = fake_pynvml([
        {"uuid": "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001", "name": "NVIDIA A100", "mem": 40 * GIB,
         "sms": 108, "mig": None},
        {"uuid": "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000002", "name": "NVIDIA H100", "mem": 80 * GIB, "sms": 132},
    ])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(inventory, "cuda_sm_counts", lambda: {
        "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001": 108, "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000002": 132,
    }, raising=False)
    assert [d.sm_count for d in nvml_devices(U)] == [108, 132]


class FakeLibcuda:
    """The few CUDA driver entry points cuda_sm_counts calls, answering through ctypes pointers."""

    def __init__(self, gpus, init_result=0):
        self.gpus = gpus  # [(uuid bytes, sm count)] in CUDA's order
        self.init_result = init_result

    def cuInit(self, flags):
        return self.init_result

    def cuDeviceGetCount(self, count):
        count._obj.value = len(self.gpus)
        return 0

    def cuDeviceGet(self, dev, ordinal):
        dev._obj.value = ordinal
        return 0

    def cuDeviceGetAttribute(self, value, attribute, dev):
        assert attribute == 16  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        value._obj.value = self.gpus[dev.value][1]
        return 0

    def cuDeviceGetUuid_v2(self, raw, dev):
        raw[:] = list(self.gpus[dev.value][0])
        return 0


def test_cuda_sm_counts_by_nvml_style_uuid():
    lib = FakeLibcuda([(bytes.fromhex("5d1c2b3a00112233445566778899aabb"), 132),
                       (bytes(range(16)), 108)])
    assert inventory.cuda_sm_counts(lib) == {
        "GPU-5d1c2b3a-0011-2233-4455-66778899aabb": 132,
        "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f": 108,
    }
    assert inventory.cuda_sm_counts(FakeLibcuda([(bytes(16), 1)], init_result=100)) == {}  # no device


def test_nvml_mig_instances(monkeypatch):
    mig_a = {"uuid": "MIG-1", "name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "mem": 5 * GIB, "sms": 14}
    mig_b = {"uuid": "MIG-2", "name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "mem": 20 * GIB, "sms": 42}
    nv = fake_pynvml([
        {"uuid": "GPU-plain", "name": "NVIDIA A100", "mem": 40 * GIB, "sms": 108, "mig": None},
        {"uuid": "GPU-mig", "name": "NVIDIA A100", "mem": 40 * GIB, "sms": 108,
         "mig": [mig_a, None, mig_b, None]},
    ])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    devs = nvml_devices(U)
    assert [d.uuid for d in devs] == ["GPU-plain", "MIG-1", "MIG-2"]
    m1, m2 = devs[1], devs[2]
    assert (m1.mig_parent, m1.mig_profile, m1.index, m1.memory_bytes, m1.sm_count, m1.quanta) == (
        "GPU-mig", "1g.5gb", 1, 5 * GIB, 14, 4)
    assert m2.mig_profile == "3g.20gb"


def test_nvml_without_attributes_api(monkeypatch):
    nv = fake_pynvml([{"uuid": "GPU-x", "name": "Old GPU", "mem": GIB, "sms": 10}], with_attributes=False)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    (d,) = nvml_devices(U)
    assert d.sm_count == 0


def test_nvml_init_failure(monkeypatch):
    nv = fake_pynvml([], init_fails=True)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    with pytest.raises(NoGpuError, match="NVML could not start"):
        nvml_devices(U)


def test_nvml_no_gpu(monkeypatch):
    nv = fake_pynvml([])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    with pytest.raises(NoGpuError, match="no GPU"):
        nvml_devices(U)
    assert nv.calls == ["init", "shutdown"]


def test_nvml_mig_without_instances(monkeypatch):
    nv = fake_pynvml([{"uuid": "GPU-m", "name": "A100", "mem": GIB, "sms": 1, "mig": [None, None]}])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    with pytest.raises(NoGpuError, match="MIG"):
        nvml_devices(U)


def test_nvml_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with pytest.raises(NoGpuError, match="not installed"):
        nvml_devices(U)

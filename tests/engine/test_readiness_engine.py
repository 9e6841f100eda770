"""GPU node readiness: the probe against the real Docker engine (no GPU here: a HAMi node's
checks stop where the engine cannot give GPUs to containers), why the backend's host paths are
Mounts, and ``bai-scheduler --check-gpus``.  The verdicts themselves: tests/test_readiness.py."""
import json
import os
import subprocess
import sys

import docker
import pytest

from bai_scheduler.core.model import GpuBackend
from bai_scheduler.readiness import EngineProbe, check_node, path_problem
from bai_spawner.gpu import gpu_spec
from helpers.gpu import A100, UNITS
from helpers.gpu import gpu_node as node

pytestmark = pytest.mark.docker


@pytest.fixture
def probe(kernel_images):
    client = docker.APIClient(version="auto")
    yield EngineProbe(client, "bai-test-probe-", timeout=60)
    assert not client.containers(all=True, filters={"name": "bai-test-probe-"}), "probe containers left behind"


def test_engine_probe_sees_what_the_node_has(tmp_path, probe):
    lib, lock = tmp_path / "libvgpu.so", tmp_path / "vgpulock"
    lib.write_bytes(b"\x7fELF")
    lock.mkdir()
    image = probe.kernel_image()
    assert image
    assert path_problem("library", str(lib), probe.stat(image, str(lib)), False) is None
    assert path_problem("lock", str(lock), probe.stat(image, str(lock)), True) is None
    assert probe.stat(image, str(tmp_path / "nothing")) is None
    assert not (tmp_path / "nothing").exists()  # checking made nothing


def test_engine_check_of_a_hami_node_without_its_library(tmp_path, probe):
    lock = tmp_path / "vgpulock"
    lock.mkdir()
    n = node(hami_library=str(tmp_path / "libvgpu.so"), hami_lock_dir=str(lock))
    result = check_node(n, probe)
    assert not result.ready
    assert f"{tmp_path / 'libvgpu.so'} does not exist on the node" in result.reason
    (tmp_path / "libvgpu.so").write_bytes(b"\x7fELF")
    # Library and lock folder are there; this engine has no NVIDIA runtime, so the GPU step fails.
    result = check_node(n, probe)
    assert not result.ready and "cannot give GPUs to containers" in result.reason


def test_docker_binds_hide_a_missing_library_but_mounts_refuse(tmp_path, kernel_images):
    """Why the GPU backend's host paths are Mounts of type bind: for a missing source the legacy
    Binds make an empty folder (LD_PRELOAD then loads nothing and the session runs unlimited);
    a Mounts entry makes the engine refuse the container, naming the path."""
    missing = tmp_path / "vgpu" / "libvgpu.so"
    spec = gpu_spec({"node": "n", "gpu": {**GpuBackend().to_json(), "hami_library": str(missing),
                                          "hami_lock_dir": str(tmp_path)},
                     "shares": [{"device": A100, "quanta": 1, "index": 0, "memory_bytes": 2**33, "capacity": 4}]}, UNITS)
    client = docker.APIClient(version="auto")
    name = f"bai-test-binds-{os.getpid()}"
    with pytest.raises(docker.errors.APIError, match=f"does not exist: {missing}"):
        client.create_container(kernel_images, name=name + "-m", command=["true"],
                                host_config=client.create_host_config(mounts=spec.mounts))
    cid = client.create_container(kernel_images, name=name + "-b", command=["true"],
                                  host_config=client.create_host_config(binds={str(missing): {"bind": "/lib.so"}}))["Id"]
    try:
        client.start(cid)
        client.wait(cid, timeout=60)
        assert missing.is_dir()  # what the old spec's bind did on a node without the library
    finally:
        client.remove_container(cid, force=True)
        subprocess.run(["rm", "-rf", str(tmp_path / "vgpu")], check=False)


def test_admins_check_their_nodes_from_the_command_line(tmp_path, kernel_images):
    config = tmp_path / "config.py"
    config.write_text(
        "c = get_config()\n"
        "c.BaiScheduler.hub_id = 'bai-test-cli'\n"
        f"c.BaiScheduler.nodes = [{{'name': 'g1', 'gpus': [{{'uuid': '{A100}', 'index': 0, 'memory': '40GiB'}}],"
        f" 'hami_library': '{tmp_path}/libvgpu.so'}}, {{'name': 'sim', 'gpus': 1, 'gpu_memory': '8GiB'}}]\n"
    )
    out = subprocess.run([sys.executable, "-m", "bai_scheduler.app", f"--config={config}", "--check-gpus"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["node"], r["ready"]) for r in lines] == [("g1", False), ("sim", True)]
    assert f"{tmp_path}/libvgpu.so does not exist on the node" in lines[0]["reason"]
    assert list(tmp_path.iterdir()) == [config]  # no database or other state made

"""GPU node readiness: pure verdicts on what nvidia-smi and Docker said, the check with a
stand-in probe, and the service acting on the checks.  The probe itself against the real
Docker engine: tests/engine/test_readiness_engine.py."""
import logging

import pytest
from traitlets.config import Config

from bai_scheduler.app import BaiScheduler
from bai_scheduler.core.model import RequestKey
from bai_scheduler.readiness import (
    ProbeError, Readiness, check_node, parse_listing, path_problem, split_sections, unchecked,
)
from bai_scheduler.service import Service
from bai_scheduler.store import Store
from helpers.gpu import A100, H100, config_nodes
from helpers.gpu import gpu_node as node

MIG1 = "MIG-0f7a3a4e-1111-5555-9999-aaaaaaaaaaa1"
MIG2 = "MIG-0f7a3a4e-1111-5555-9999-aaaaaaaaaaa2"
FILE = {"name": "libvgpu.so", "size": 1048576, "mode": 0o755, "mtime": "", "linkTarget": ""}
FOLDER = {"name": "vgpulock", "size": 4096, "mode": (1 << 31) | 0o777, "mtime": "", "linkTarget": ""}

QUERY = f"0, {A100}, Disabled\n1, {H100}, [N/A]\n"
LISTING = f"GPU 0: NVIDIA A100-SXM4-40GB (UUID: {A100})\nGPU 1: NVIDIA H100 (UUID: {H100})\n"
MIG_QUERY = f"0, {A100}, Enabled\n"
MIG_LISTING = (f"GPU 0: NVIDIA A100-SXM4-40GB (UUID: {A100})\n"
               f"  MIG 3g.20gb     Device  0: (UUID: {MIG1})\n"
               f"  MIG 3g.20gb     Device  1: (UUID: {MIG2})\n")
MIG_GPUS = [{"uuid": MIG1, "index": 0, "memory": "20GiB", "mig_parent": A100, "mig_profile": "3g.20gb"},
            {"uuid": MIG2, "index": 0, "memory": "20GiB", "mig_parent": A100, "mig_profile": "3g.20gb"}]


class StandInProbe:
    """What a node's engine would answer, without the engine."""

    def __init__(self, stats=None, output="", code=0, image="sha256:img", fail=None):
        self.stats, self.output, self.code, self.image, self.fail = stats or {}, output, code, image, fail
        self.ran = []

    def kernel_image(self):
        return self.image

    def stat(self, image, path):
        return self.stats.get(path)

    def run_with_gpus(self, image, script, mounts, env):
        if self.fail:
            raise ProbeError(self.fail)
        self.ran.append((script, mounts, env))
        return self.code, self.output


def output(query=QUERY, listing=LISTING, mps=None):
    text = f"{query}@@bai-listing\n{listing}"
    if mps is not None:
        text += f"@@bai-mps\n{mps[1]}\n@@bai-exit {mps[0]}\n"
    return text


HAMI_OK = {"/usr/local/vgpu/libvgpu.so": FILE, "/tmp/vgpulock": FOLDER}
MPS_OK = {"/run/nvidia-mps/pipe": FOLDER, "/run/nvidia-mps/shm": FOLDER}


def test_parse_nvidia_smi():
    listing = parse_listing(MIG_QUERY, MIG_LISTING)
    assert listing.gpus == {A100: (0, "Enabled")}
    assert listing.mig_uuids == {MIG1, MIG2}
    query, lst, mps = split_sections(output(mps=(0, "4021")))
    assert query == QUERY and MIG1 not in lst and mps == (0, "4021")


def test_path_verdicts():
    assert path_problem("HAMi-core library", "/x.so", None, False) == "HAMi-core library /x.so does not exist on the node"
    assert "is a folder, not a file" in path_problem("HAMi-core library", "/x.so", FOLDER, False)
    assert path_problem("lock folder", "/l", FILE, True) == "lock folder /l is not a folder"
    assert path_problem("lock folder", "/l", FOLDER, True) is None


def test_hami_node_ready_only_with_library_file_lock_folder_and_its_gpus():
    n = node()
    ok = check_node(n, StandInProbe(HAMI_OK, output()), now=5)
    assert (ok.ready, ok.reason, ok.checked_at) == (True, "hami: 2 GPU(s) checked", 5)
    missing = check_node(n, StandInProbe({"/tmp/vgpulock": FOLDER}, output()))
    assert not missing.ready and "/usr/local/vgpu/libvgpu.so does not exist" in missing.reason
    folder = check_node(n, StandInProbe({**HAMI_OK, "/usr/local/vgpu/libvgpu.so": FOLDER}, output()))
    assert not folder.ready and "is a folder" in folder.reason
    no_lock = check_node(n, StandInProbe({"/usr/local/vgpu/libvgpu.so": FILE}, output()))
    assert not no_lock.ready and "lock folder" in no_lock.reason and "/tmp/vgpulock" in no_lock.reason


def test_configured_gpus_must_be_on_the_node():
    n = node()
    gone = check_node(n, StandInProbe(HAMI_OK, output(query=f"0, {A100}, Disabled\n")))
    assert not gone.ready and f"GPU 1 ({H100}) is not on this node" in gone.reason
    moved = check_node(n, StandInProbe(HAMI_OK, output(query=f"1, {A100}, Disabled\n0, {H100}, Disabled\n")))
    assert "has index 1 on the node, not 0" in moved.reason
    mig_on = check_node(n, StandInProbe(HAMI_OK, output(query=f"0, {A100}, Enabled\n1, {H100}, Disabled\n")))
    assert "MIG mode on" in mig_on.reason
    no_driver = check_node(n, StandInProbe(HAMI_OK, fail="the engine cannot give GPUs to containers"))
    assert not no_driver.ready and "cannot give GPUs" in no_driver.reason
    broken = check_node(n, StandInProbe(HAMI_OK, "NVIDIA-SMI has failed", code=9))
    assert not broken.ready and "exit 9" in broken.reason
    assert not check_node(n, StandInProbe(HAMI_OK, image=None)).ready


def test_mps_node_needs_its_folders_and_a_daemon_that_answers():
    n = node("mps")
    probe = StandInProbe(MPS_OK, output(mps=(0, "")))
    ok = check_node(n, probe)
    assert ok.ready, ok.reason
    script, mounts, env = probe.ran[0]
    assert "echo get_server_list | nvidia-cuda-mps-control" in script
    assert mounts == [("/run/nvidia-mps/pipe", "/run/nvidia-mps/pipe"), ("/run/nvidia-mps/shm", "/dev/shm")]
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps/pipe"}
    silent = check_node(n, StandInProbe(MPS_OK, output(mps=(1, "Cannot find MPS control daemon process"))))
    assert not silent.ready and "does not answer get_server_list in /run/nvidia-mps/pipe" in silent.reason
    assert "Cannot find MPS control daemon" in silent.reason
    no_pipe = check_node(n, StandInProbe({"/run/nvidia-mps/shm": FOLDER}))
    assert not no_pipe.ready and "MPS pipe folder" in no_pipe.reason


def test_mig_node_needs_mig_mode_and_its_instances():
    n = node("mig", MIG_GPUS)
    assert check_node(n, StandInProbe({}, output(MIG_QUERY, MIG_LISTING))).ready
    off = check_node(n, StandInProbe({}, output(f"0, {A100}, Disabled\n", LISTING)))
    assert not off.ready and "MIG mode is off on GPU 0" in off.reason and MIG1 in off.reason
    one_gone = check_node(n, StandInProbe({}, output(MIG_QUERY, MIG_LISTING.replace(MIG2, "MIG-other"))))
    assert not one_gone.ready and f"MIG instance(s) {MIG2}" in one_gone.reason


def test_simulated_and_cpu_only_nodes_are_ready_without_a_check():
    sim = config_nodes([{"name": "s", "gpus": 1, "gpu_memory": "8GiB"}])[0]
    assert check_node(sim, StandInProbe(fail="must not run")).ready
    assert unchecked(sim).simulated and "simulated" in unchecked(sim).reason
    cpu = config_nodes([{"name": "c", "gpus": 0}])[0]
    assert unchecked(cpu).ready
    assert not unchecked(node()).ready  # real GPUs: not ready until checked
    assert unchecked(node()).to_json(admin=False) == {"gpu_backend": "hami", "gpu_ready": False}


@pytest.mark.parametrize("entry, words", [
    ({"gpu_backend": "magic"}, "gpu_backend 'magic' is unknown; choose one of hami, mps, mig, whole"),
    ({"hami_library": "libvgpu.so"}, "hami_library must be an absolute path"),
    ({"gpus": [{"uuid": A100, "index": 0}]}, "memory must be given"),
    ({"gpus": [{"uuid": "0", "index": 0, "memory": "8GiB"}]}, "uuid must be the device's UUID"),
    ({"gpus": [{"uuid": A100, "index": 0, "memory": "8GiB"}, {"uuid": H100, "index": 0, "memory": "8GiB"}]},
     "duplicate index 0"),
    ({"gpus": [{"uuid": A100, "index": 0, "memory": "8GiB"}], "gpu_backend": "mig"}, "MIG instances only"),
    ({"gpus": MIG_GPUS, "gpu_backend": "hami"}, "set gpu_backend to 'mig'"),
])
def test_bad_node_configs_are_refused_at_start_up(entry, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config_nodes([{"name": "g1", **entry}])


# ---------------------------------------------------------------- the service acting on checks
def scheduler_app(tmp_path, **options):
    """The app's parts that act on checks (nodes, readiness, the service), without a server."""
    app = BaiScheduler(config=Config({"BaiScheduler": {
        "nodes": [{"name": "g1", "gpus": [{"uuid": A100, "index": 0, "memory": "40GiB"}]},
                  {"name": "cpu1", "gpus": 0}],
        "db_url": f"sqlite:///{tmp_path / 's.sqlite'}", **options}}))
    app.log = logging.getLogger("bai_scheduler")
    app.node_list = app.build_nodes()
    app.readiness = {n.name: unchecked(n) for n in app.node_list}
    app.service = Service(app.node_list, app.units, Store(app.db_url))
    return app


async def test_gpu_shares_go_only_to_a_node_whose_check_passed(tmp_path):
    app = scheduler_app(tmp_path)
    svc = app.service
    first = await svc.submit(RequestKey("u", "gpu1"), quanta=1)
    assert first.state == "PENDING"  # real GPUs: nothing placed before a check
    assert "GPUs not ready on g1" in svc.status(first)["reason"]
    assert (await svc.submit(RequestKey("u", "cpu"), quanta=0, cpu_millis=500)).state == "RUNNING"

    verdicts = iter([Readiness("g1", "hami", True, "hami: 1 GPU(s) checked"),
                     Readiness("g1", "hami", False, "the MPS daemon went away")])
    app.check_gpu_node = lambda node: next(verdicts)
    await app.check_gpus()  # passes: the queued request is admitted at once
    assert svc.get(RequestKey("u", "gpu1")).state == "RUNNING"
    await app.check_gpus()  # fails again: the running share stays, new ones wait
    assert app.readiness["g1"].reason == "the MPS daemon went away" and not app.readiness["g1"].ready
    assert svc.get(RequestKey("u", "gpu1")).state == "RUNNING"
    assert (await svc.submit(RequestKey("u", "gpu2"), quanta=1)).state == "PENDING"
    svc.reload()  # a rebuilt capacity (restart of the state, reconcile) keeps the node out
    await svc.schedule()
    assert svc.get(RequestKey("u", "gpu2")).state == "PENDING"
    assert [n["gpu_ready"] for n in svc.capacity()] == [False, True]

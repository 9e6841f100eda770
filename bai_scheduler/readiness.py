"""Can a GPU node enforce its backend right now?  No GPU share is placed on a node until it can.

Every node states its backend (``Node.gpu``).  For a node with real GPUs the service runs
``check_node`` at start-up, before placing any GPU share there, and again every
``c.BaiScheduler.readiness_interval`` seconds.  A node that fails keeps running its sessions and
takes CPU-only ones, but gets no new GPU share (``Capacity.set_gpu_ready``); admins see why
on the sessions page and in ``api/capacity``.  Simulated GPUs have nothing to enforce and
are always ready (and keep saying they are simulated).

What is checked, through the node's own Docker engine (so remote nodes are checked where
they are), with one of the node's kernel images:

  every backend  the engine gives GPUs to containers, and ``nvidia-smi`` there lists every
                 configured GPU by UUID at its index
  hami           the library (``hami_library``) is a file, the lock folder (``hami_lock_dir``)
                 a folder
  mps            the pipe and shm folders exist, and the control daemon answers
                 ``get_server_list`` through that pipe folder
  mig            MIG mode is on and every configured MIG instance is listed

The verdicts are pure functions of what a probe saw (tested against literal ``nvidia-smi``
output); ``EngineProbe`` is the only part that talks to Docker and is called from a thread.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import docker

from .contract import labels
from .core.model import Node

DIR_BIT = 1 << 31  # Go's os.ModeDir in Docker's path stat
LISTING, MPS = "@@bai-listing", "@@bai-mps"


@dataclass(frozen=True)
class Readiness:
    node: str
    backend: str
    ready: bool
    reason: str  # why not, or what was checked
    simulated: bool = False
    checked_at: float = 0.0

    def to_json(self, admin: bool) -> dict:
        out = {"gpu_backend": self.backend, "gpu_ready": self.ready}
        if admin:  # reasons name paths and devices on the node
            out.update(gpu_reason=self.reason, gpu_checked_at=self.checked_at)
        return out


def unchecked(node: Node) -> Readiness:
    """The state of a node before its first check."""
    if node.simulated:
        return Readiness(node.name, node.gpu.name, True, "simulated GPUs: nothing to enforce", True)
    if not node.devices:
        return Readiness(node.name, node.gpu.name, True, "no GPUs: CPU-only node")
    return Readiness(node.name, node.gpu.name, False, "not checked yet")


def needs_check(node: Node) -> bool:
    return bool(node.devices) and not node.simulated


# -- pure verdicts ------------------------------------------------------------------------


def path_problem(what: str, path: str, stat: dict | None, folder: bool) -> str | None:
    """What is wrong with ``path`` on the node (``stat``: Docker's path stat, None if absent)."""
    if stat is None:
        return f"{what} {path} does not exist on the node"
    is_dir = bool(int(stat.get("mode", 0)) & DIR_BIT)
    if folder and not is_dir:
        return f"{what} {path} is not a folder"
    if not folder and is_dir:
        return f"{what} {path} is a folder, not a file (Docker makes an empty folder for a missing bind source)"
    return None


def backend_paths(node: Node) -> list[tuple[str, str, bool]]:
    """(what, path on the node, must be a folder) for the node's backend."""
    gpu = node.gpu
    if gpu.name == "hami":
        return [("HAMi-core library (hami_library)", gpu.hami_library, False),
                ("HAMi-core lock folder (hami_lock_dir)", gpu.hami_lock_dir, True)]
    if gpu.name == "mps":
        return [("MPS pipe folder (mps_pipe_directory)", gpu.mps_pipe_directory, True),
                ("MPS shm folder (mps_shm_directory)", gpu.mps_shm_directory, True)]
    return []


@dataclass(frozen=True)
class Listing:
    """What ``nvidia-smi`` shows on the node."""

    gpus: dict  # uuid -> (index, MIG mode as nvidia-smi says it, e.g. "Enabled", "Disabled", "[N/A]")
    mig_uuids: frozenset


_LIST_MIG = re.compile(r"\(UUID:\s*(MIG-[^)\s]+)\)")


def parse_listing(query: str, list_output: str) -> Listing:
    """``query``: ``nvidia-smi --query-gpu=index,uuid,mig.mode.current --format=csv,noheader``;
    ``list_output``: ``nvidia-smi -L``."""
    gpus = {}
    for line in query.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].startswith("GPU-"):
            gpus[parts[1]] = (int(parts[0]), parts[2] if len(parts) > 2 else "")
    return Listing(gpus, frozenset(_LIST_MIG.findall(list_output)))


def device_problems(node: Node, listing: Listing) -> list[str]:
    """Configured GPUs that are not where the node's ``nvidia-smi`` says they are."""
    problems = []
    seen = ", ".join(f"{i}: {u}" for u, (i, _) in sorted(listing.gpus.items(), key=lambda kv: kv[1][0]))
    for d in node.devices:
        if d.mig_profile:
            continue
        found = listing.gpus.get(d.uuid)
        if found is None:
            problems.append(f"GPU {d.index} ({d.uuid}) is not on this node; nvidia-smi lists {seen}")
        elif found[0] != d.index:
            problems.append(f"GPU {d.uuid} has index {found[0]} on the node, not {d.index}; fix its index")
        elif found[1] == "Enabled":
            problems.append(f"GPU {d.index} has MIG mode on; backend {node.gpu.name!r} needs it off")
    if node.gpu.name == "mig":
        for parent in sorted({d.mig_parent for d in node.devices if d.mig_parent}):
            found = listing.gpus.get(parent)
            if found is not None and found[1] != "Enabled":
                problems.append(f"MIG mode is off on GPU {found[0]} ({parent}); enable it (docs/install.md)")
        missing = [d.uuid for d in node.devices if d.mig_profile and d.uuid not in listing.mig_uuids]
        if missing:
            problems.append(f"MIG instance(s) {', '.join(missing)} are not on this node (nvidia-smi -L lists "
                            f"{', '.join(sorted(listing.mig_uuids)) or 'none'}); recreate them or restart "
                            "the scheduler to read the new layout")
    return problems


def mps_problem(node: Node, exit_code: int | None, output: str) -> str | None:
    if exit_code == 0:
        return None
    said = " ".join(output.split())[:200] or "no answer"
    return (f"the MPS control daemon does not answer get_server_list in {node.gpu.mps_pipe_directory} "
            f"({said}); start it (docs/install.md) or fix mps_pipe_directory")


def split_sections(output: str) -> tuple[str, str, tuple[int | None, str]]:
    """The probe script's output: (query, listing, (MPS exit code, MPS output))."""
    query, _, rest = output.partition(LISTING)
    listing, _, mps = rest.partition(MPS)
    code = None
    m = re.search(r"@@bai-exit (\d+)", mps)
    if m:
        code = int(m.group(1))
        mps = mps[:m.start()]
    return query, listing, (code, mps.strip())


def probe_script(node: Node) -> str:
    script = ("nvidia-smi --query-gpu=index,uuid,mig.mode.current --format=csv,noheader; "
              f"echo {LISTING}; nvidia-smi -L")
    if node.gpu.name == "mps":
        script += f"; echo {MPS}; echo get_server_list | nvidia-cuda-mps-control 2>&1; echo @@bai-exit $?"
    return script


# -- the check, over a probe of the node's engine ----------------------------------------------


class ProbeError(Exception):
    """The node's engine could not run a check; the message says what it answered."""


def check_node(node: Node, probe, now: float | None = None) -> Readiness:
    """Run every check of ``node``'s backend through ``probe`` (an ``EngineProbe`` or a stand-in)."""
    now = time.time() if now is None else now

    def verdict(ready: bool, reason: str) -> Readiness:
        return Readiness(node.name, node.gpu.name, ready, reason, False, now)

    if not needs_check(node):
        return unchecked(node)
    try:
        image = probe.kernel_image()
        if image is None:
            return verdict(False, "no kernel image on this node to run the check with; build them there "
                                  "(DOCKER_HOST=… bai-images build)")
        problems = [p for what, path, folder in backend_paths(node)
                    if (p := path_problem(what, path, probe.stat(image, path), folder))]
        if problems:
            return verdict(False, "; ".join(problems))
        mounts = []
        env = {}
        if node.gpu.name == "mps":
            mounts = [(node.gpu.mps_pipe_directory, node.gpu.mps_pipe_directory),
                      (node.gpu.mps_shm_directory, "/dev/shm")]
            env["CUDA_MPS_PIPE_DIRECTORY"] = node.gpu.mps_pipe_directory
        code, output = probe.run_with_gpus(image, probe_script(node), mounts, env)
    except ProbeError as e:
        return verdict(False, str(e))
    query, listing_text, (mps_code, mps_output) = split_sections(output)
    listing = parse_listing(query, listing_text)
    if not listing.gpus:
        return verdict(False, f"nvidia-smi in a GPU container on the node lists no GPU (exit {code}): "
                              f"{' '.join(output.split())[:200]}")
    problems = device_problems(node, listing)
    if node.gpu.name == "mps":
        problem = mps_problem(node, mps_code, mps_output)
        if problem:
            problems.append(problem)
    if problems:
        return verdict(False, "; ".join(problems))
    return verdict(True, f"{node.gpu.name}: {len(node.devices)} GPU(s) checked")


class EngineProbe:
    """The Docker calls a check needs, on one node's engine (blocking: call from a thread)."""

    def __init__(self, client: docker.APIClient, name_prefix: str, timeout: float = 60):
        self.client = client
        self.prefix = name_prefix
        self.timeout = timeout
        self._n = 0

    def _name(self) -> str:
        self._n += 1
        return f"{self.prefix}probe-{int(time.time() * 1000)}-{self._n}"

    def kernel_image(self) -> str | None:
        images = self.client.images(filters={"label": f"{labels.KIND}={labels.KIND_KERNEL}"})
        return images[0]["Id"] if images else None

    def _create(self, image: str, **kw) -> str:
        try:
            return self.client.create_container(image, name=self._name(), labels={labels.PROBE: "1"}, **kw)["Id"]
        except docker.errors.APIError as e:
            raise ProbeError(f"the engine refused the check's container: {e.explanation or e}") from None

    def _remove(self, cid: str) -> None:
        try:
            self.client.remove_container(cid, force=True)
        except docker.errors.APIError:
            pass  # gone already

    def stat(self, image: str, path: str) -> dict | None:
        """Docker's stat of ``path`` on the node, seen through a bind mount; None if it does not exist."""
        mount = {"Type": "bind", "Source": path, "Target": "/bai-probe", "ReadOnly": True}
        try:
            cid = self.client.create_container(
                image, command=["true"], name=self._name(), labels={labels.PROBE: "1"},
                host_config=self.client.create_host_config(mounts=[mount], network_mode="none"))["Id"]
        except docker.errors.APIError as e:
            if "does not exist" in str(e.explanation or e):
                return None
            raise ProbeError(f"the engine refused the check's container: {e.explanation or e}") from None
        try:
            # HEAD of the archive endpoint: the stat header without the content (docker-py
            # only offers a GET that downloads it).
            res = self.client.head(self.client._url("/containers/{0}/archive", cid), params={"path": "/bai-probe"})
            if res.status_code == 404:
                return None
            res.raise_for_status()
            return docker.utils.decode_json_header(res.headers["X-Docker-Container-Path-Stat"])
        except Exception as e:
            raise ProbeError(f"could not stat {path} on the node: {e}") from None
        finally:
            self._remove(cid)

    def run_with_gpus(self, image: str, script: str, mounts, env: dict) -> tuple[int, str]:
        """Run ``script`` with every GPU of the node; (exit code, output)."""
        host = self.client.create_host_config(
            network_mode="none",
            mounts=[{"Type": "bind", "Source": s, "Target": t, "ReadOnly": False} for s, t in mounts],
            device_requests=[docker.types.DeviceRequest(driver="nvidia", count=-1,
                                                        capabilities=[["gpu", "compute", "utility"]])],
        )
        # As root: the MPS control daemon answers clients of its own user (root on the node).
        cid = self._create(image, command=["sh", "-c", script], environment=env, host_config=host, user="0")
        try:
            try:
                self.client.start(cid)
                code = self.client.wait(cid, timeout=self.timeout)["StatusCode"]
            except docker.errors.APIError as e:
                raise ProbeError(f"the engine cannot give GPUs to containers ({e.explanation or e}); install "
                                 "the NVIDIA Container Toolkit (docs/install.md)") from None
            except Exception as e:  # read timeout
                raise ProbeError(f"the GPU check did not finish in {self.timeout:g} s ({e})") from None
            return code, self.client.logs(cid).decode(errors="replace")
        finally:
            self._remove(cid)

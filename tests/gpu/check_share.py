#!/usr/bin/env python3
"""Evidence on a real NVIDIA GPU that a session's share is enforced, by our own backends.

    python tests/gpu/check_share.py [--fgpu 0.5] [--fgpu-per-gpu 2] [--step 0.5]
                                    [--device 0] [--hami-library /path/to/libvgpu.so]

No Docker is needed: every client runs on this machine, in its own process, with the
environment ``bai_spawner.gpu.gpu_spec`` gives a session container (plus CUDA_VISIBLE_DEVICES
selecting the device, which a container gets from the NVIDIA runtime).  Steps:

  inventory  the GPUs as the scheduler reads them (NVML; SM counts from the CUDA driver)
  baseline   no enforcement: allocating 110 % of the share must SUCCEED, so that a refusal
             below can only come from the backend
  mps        a private MPS control daemon (when nvidia-cuda-mps-control is on PATH): 90 % of
             the share succeeds, 110 % fails with out-of-memory, and the daemon lists the
             client while it holds its memory
  hami       with --hami-library: LD_PRELOAD of HAMi-core; mem_get_info() total is about the
             share, 90 % succeeds, 110 % fails with out-of-memory
Each prints one JSON object {"step", "status": "passed" | "failed" | "skipped", …}; a last
"summary" object follows.  Skipped is never a pass.  Exit status: 0 if an enforcement step
passed and none failed, 1 if any step failed, 2 if nothing failed but no enforcement was shown.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from bai_scheduler.core.model import GpuBackend  # noqa: E402
from bai_scheduler.core.units import FgpuUnits  # noqa: E402
from bai_scheduler.inventory import NoGpuError, nvml_devices  # noqa: E402
from bai_spawner.gpu import gpu_spec  # noqa: E402

CLIENT = HERE / "share_client.py"
CLIENT_TIMEOUT = 300
# What a previous backend's environment may have left that must not leak into the next step.
FOREIGN = ("LD_PRELOAD", "CUDA_MPS_", "CUDA_DEVICE_MEMORY_", "CUDA_DEVICE_SM_LIMIT", "CUDA_VISIBLE_DEVICES")


def emit(step: str, status: str, **details) -> dict:
    out = {"step": step, "status": status, **details}
    print(json.dumps(out), flush=True)
    return out


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}


def run_client(env: dict, sizes: list[int], while_holding=None) -> dict:
    """Run share_client.py with ``env``; ``while_holding(pid)`` runs while it holds sizes[0]."""
    proc = subprocess.Popen([sys.executable, str(CLIENT), *map(str, sizes)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(CLIENT_TIMEOUT, proc.kill)
    watchdog.start()
    events, pid = [], None
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a library's own chatter
            events.append(event)
            if event["event"] == "start":
                pid = event["pid"]
            if event["event"] == "holding":
                if while_holding:
                    events.append({"event": "observed", **while_holding(pid)})
                proc.stdin.write("\n")
                proc.stdin.flush()
        proc.wait()
        stderr = proc.stderr.read()
    finally:
        watchdog.cancel()
    out = {"events": events, "exit": proc.returncode}
    if proc.returncode != 0:
        out["error"] = (f"killed after {CLIENT_TIMEOUT} s; " if proc.returncode < 0 else "") + stderr[-1500:]
    return out


def results(run: dict) -> list[str]:
    return [e["result"] for e in run["events"] if e["event"] == "alloc"]


def start_info(run: dict) -> dict:
    return next((e for e in run["events"] if e["event"] == "start"), {})


def mps_control(env: dict, command: str) -> tuple[int, str]:
    out = subprocess.run(["nvidia-cuda-mps-control"], input=command + "\n", env=env, text=True,
                         capture_output=True, timeout=30)
    return out.returncode, (out.stdout + out.stderr).strip()


def step_baseline(env: dict, share: int) -> dict:
    run = run_client(env, [int(share * 1.1)])
    ok = results(run) == ["ok"]
    return emit("baseline", "passed" if ok else "failed", share_bytes=share, allocated=int(share * 1.1),
                results=results(run), device=start_info(run),
                why=None if ok else "110 % of the share must fit without enforcement; is the GPU busy?",
                error=run.get("error"))


def step_mps(base: dict, placement: dict, units: FgpuUnits, share: int, uuid: str, work: Path) -> dict:
    if not shutil.which("nvidia-cuda-mps-control", path=base.get("PATH")):
        return emit("mps", "skipped", why="nvidia-cuda-mps-control is not on PATH")
    pipe, logs = work / "mps-pipe", work / "mps-log"
    pipe.mkdir()
    logs.mkdir()
    daemon_env = dict(base, CUDA_MPS_PIPE_DIRECTORY=str(pipe), CUDA_MPS_LOG_DIRECTORY=str(logs))
    spec = gpu_spec({**placement, "gpu": GpuBackend("mps", mps_pipe_directory=str(pipe)).to_json()}, units)
    started = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=daemon_env, capture_output=True, text=True,
                             timeout=30)
    try:
        answered = (None, "")
        for _ in range(50):
            answered = mps_control(daemon_env, "get_server_list")
            if answered[0] == 0:
                break
            time.sleep(0.2)
        if answered[0] != 0:
            return emit("mps", "failed", why="the private MPS control daemon does not answer",
                        start=started.returncode, said=answered[1][-500:])

        def clients_of_daemon(pid):
            _, servers = mps_control(daemon_env, "get_server_list")
            listed = {}
            for server in servers.split():
                _, clients = mps_control(daemon_env, f"get_client_list {server}")
                listed[server] = clients.split()
            return {"client_pid": pid, "servers": listed,
                    "listed": any(str(pid) in clients for clients in listed.values())}

        env = dict(base, **spec.environment, CUDA_VISIBLE_DEVICES=uuid)
        run = run_client(env, [int(share * 0.9), int(share * 1.1)], clients_of_daemon)
        observed = next((e for e in run["events"] if e["event"] == "observed"), {})
        got = results(run)
        ok = got == ["ok", "oom"] and observed.get("listed") is True
        return emit("mps", "passed" if ok else "failed", environment=spec.environment, results=got,
                    expected=["ok", "oom"], daemon=observed, device=start_info(run), error=run.get("error"))
    finally:
        mps_control(daemon_env, "quit")


def step_hami(base: dict, placement: dict, units: FgpuUnits, share: int, uuid: str, library: str | None,
              work: Path) -> dict:
    if not library:
        return emit("hami", "skipped", why="no --hami-library given")
    if not Path(library).is_file():
        return emit("hami", "failed", why=f"{library} is not a file")
    lock = Path("/tmp/vgpulock")  # HAMi-core's fixed lock folder (a session gets the node's mounted there)
    lock.mkdir(mode=0o777, exist_ok=True)
    spec = gpu_spec({**placement, "gpu": GpuBackend("hami", hami_library=library).to_json()}, units)
    # The cache is on a tmpfs of the session's container; outside one it goes to a private folder.
    env = dict(base, **spec.environment, CUDA_VISIBLE_DEVICES=uuid)
    env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = str(work / "cudevshr.cache")
    run = run_client(env, [int(share * 0.9), int(share * 1.1)])
    got = results(run)
    total = start_info(run).get("total", 0)
    sees_share = abs(total - share) <= share * 0.05
    ok = got == ["ok", "oom"] and sees_share
    return emit("hami", "passed" if ok else "failed", environment=spec.environment, results=got,
                expected=["ok", "oom"], mem_get_info_total=total, share_bytes=share, total_is_share=sees_share,
                error=run.get("error"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fgpu", default="0.5")
    ap.add_argument("--fgpu-per-gpu", type=int, default=2)
    ap.add_argument("--step", default="0.5")
    ap.add_argument("--device", type=int, default=0, help="index of the GPU to test")
    ap.add_argument("--hami-library", help="HAMi-core's libvgpu.so; without it the hami step is skipped")
    args = ap.parse_args(argv)
    units = FgpuUnits(args.fgpu_per_gpu, args.step)
    quanta = units.to_quanta(args.fgpu, units.quanta_per_gpu)
    steps = []
    try:
        devices = nvml_devices(units)
    except NoGpuError as e:
        steps.append(emit("inventory", "failed", why=str(e)))
        return summary(steps)
    whole = [d for d in devices if not d.mig_profile]
    steps.append(emit("inventory", "passed", devices=[
        {"index": d.index, "uuid": d.uuid, "name": d.name, "memory_bytes": d.memory_bytes, "sm_count": d.sm_count,
         "mig_profile": d.mig_profile} for d in devices]))
    dev = next((d for d in whole if d.index == args.device), None)
    if dev is None or quanta == 0:
        steps.append(emit("setup", "failed", why=f"no whole GPU with index {args.device}, or a share of 0"))
        return summary(steps)
    share = units.memory_bytes(quanta, dev.memory_bytes)
    placement = {"node": "local", "simulated": False, "shares": [
        {"device": dev.uuid, "quanta": quanta, "index": dev.index, "memory_bytes": dev.memory_bytes,
         "capacity": dev.quanta, "mig_profile": None}]}
    base = clean_env()
    with tempfile.TemporaryDirectory(prefix="bai-share-") as tmp:
        work = Path(tmp)
        steps.append(step_baseline(dict(base, CUDA_VISIBLE_DEVICES=dev.uuid), share))
        steps.append(step_mps(base, placement, units, share, dev.uuid, work))
        steps.append(step_hami(base, placement, units, share, dev.uuid, args.hami_library, work))
    return summary(steps)


def summary(steps: list[dict]) -> int:
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    enforced = [s["step"] for s in steps if s["step"] in ("mps", "hami") and s["status"] == "passed"]
    code = 1 if failed else 0 if enforced else 2
    emit("summary", "failed" if failed else "passed" if enforced else "skipped", failed=failed,
         enforced_by=enforced, skipped=[s["step"] for s in steps if s["status"] == "skipped"], exit=code)
    return code


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Evidence on a real NVIDIA GPU: the inventory is read with NVML and a share's
memory limit holds.  Not part of the CPU test suite (there is no GPU there).

    python tests/gpu/check_share.py [--fgpu 0.5] [--fgpu-per-gpu 2] [--step 0.5]

1. Reads every device with bai_scheduler.inventory.nvml_devices (nvidia-ml-py).
2. Computes the share with the same code the spawner uses (bai_spawner.gpu.gpu_spec,
   backend "mps"), so the limit tested is the limit a session would get.
3. Enforces it two ways, each in a fresh process:
   - CUDA MPS (when nvidia-cuda-mps-control is on PATH): starts a private MPS
     daemon and runs the client with CUDA_MPS_PINNED_DEVICE_MEM_LIMIT from the spec;
   - PyTorch's caching allocator: torch.cuda.set_per_process_memory_fraction(share).
   In each, an allocation of 90% of the share must succeed and one of 110% must fail.
Prints one JSON object as its last line.  Exit 0 only if every check that ran held.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bai_scheduler.inventory import nvml_devices  # noqa: E402
from bai_scheduler.core.units import FgpuUnits  # noqa: E402
from bai_spawner.gpu import gpu_spec  # noqa: E402

CLIENT = r"""
import json, os, sys
import torch
limit = int(sys.argv[1]); fraction = float(sys.argv[2]); use_fraction = sys.argv[3] == "1"
torch.cuda.init()
if use_fraction:
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
def try_alloc(nbytes):
    try:
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        x.fill_(1); torch.cuda.synchronize(); del x; torch.cuda.empty_cache()
        return True
    except RuntimeError as e:
        return "out of memory" in str(e).lower() or str(e)[:200]
within = try_alloc(int(limit * 0.9))
beyond = try_alloc(int(limit * 1.1))
print(json.dumps({"within_ok": within is True, "beyond_refused": beyond is not True,
                  "beyond_detail": beyond if beyond is not True else None}))
"""


def run_client(env, limit, fraction, use_fraction):
    out = subprocess.run([sys.executable, "-c", CLIENT, str(limit), str(fraction), "1" if use_fraction else "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    line = (out.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        return json.loads(line)
    except ValueError:
        return {"error": (out.stderr or out.stdout)[-500:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fgpu", default="0.5")
    ap.add_argument("--fgpu-per-gpu", type=int, default=2)
    ap.add_argument("--step", default="0.5")
    args = ap.parse_args()
    units = FgpuUnits(args.fgpu_per_gpu, args.step)
    devices = nvml_devices(units)
    inv = [{"index": d.index, "uuid": d.uuid, "name": d.name, "memory_gib": round(d.memory_bytes / 2**30, 2),
            "sm_count": d.sm_count, "mig_profile": d.mig_profile} for d in devices]
    for d in inv:
        print("GPU", d)
    dev = devices[0]
    quanta = units.to_quanta(args.fgpu)
    placement = {"node": "local", "shares": [{"device": dev.uuid, "quanta": quanta, "memory_bytes": dev.memory_bytes,
                                              "capacity": dev.quanta, "index": 0}]}
    spec = gpu_spec("mps", placement, units)
    limit = units.memory_bytes(quanta, dev.memory_bytes)
    fraction = float(units.gpu_fraction(quanta))
    print(f"share: {args.fgpu} fGPU of {dev.name} = {limit / 2**30:.2f} GiB ({fraction:.0%}), env {spec.environment}")
    result = {"devices": inv, "fgpu": args.fgpu, "share_bytes": limit, "fraction": fraction, "checks": {}}
    ok = True

    try:
        import torch  # noqa: F401
    except ImportError:
        result["checks"]["torch"] = "skipped: torch not installed"
        print(json.dumps(result))
        return 1

    base_env = dict(os.environ, CUDA_VISIBLE_DEVICES=dev.uuid)
    r = run_client(base_env, limit, fraction, use_fraction=True)
    result["checks"]["torch_memory_fraction"] = r
    ok &= bool(r.get("within_ok") and r.get("beyond_refused"))

    control = shutil.which("nvidia-cuda-mps-control")
    if control:
        pipe = tempfile.mkdtemp(prefix="bai-mps-")
        mps_env = dict(base_env, CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY=pipe)
        subprocess.run([control, "-d"], env=mps_env, check=False)
        time.sleep(1)
        try:
            client_env = dict(mps_env, **{k: v for k, v in spec.environment.items() if k.startswith("CUDA_MPS")})
            client_env["CUDA_MPS_PIPE_DIRECTORY"] = pipe
            r = run_client(client_env, limit, fraction, use_fraction=False)
            result["checks"]["mps_pinned_mem_limit"] = r
            ok &= bool(r.get("within_ok") and r.get("beyond_refused"))
        finally:
            subprocess.run([control], input="quit\n", text=True, env=mps_env, check=False)
    else:
        result["checks"]["mps_pinned_mem_limit"] = "skipped: nvidia-cuda-mps-control not on PATH"
    result["ok"] = bool(ok)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""tests/gpu/check_share.py's own logic on CPU, with stand-ins for torch, NVML and the MPS
control daemon (tests/gpu/standins): it passes only where the share is really enforced, and
fails, never passes, where it is not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "gpu" / "check_share.py"
STANDINS = HERE / "gpu" / "standins"
GIB = 1024**3


def check(tmp_path, *args, path_has_mps=True, **env):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("BAI_STANDIN_")}
    run_env.update(PYTHONPATH=str(STANDINS), BAI_STANDIN_GPU_BYTES=str(8 * GIB), **env)
    if path_has_mps:
        run_env["PATH"] = f"{STANDINS / 'bin'}:{run_env['PATH']}"
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=run_env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    steps = {}
    for line in out.stdout.splitlines():
        step = json.loads(line)  # every line is one JSON object
        steps[step["step"]] = step
    return out.returncode, steps, out.stderr


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "libvgpu.so"
    lib.write_bytes(b"\x7fELF stand-in")
    return str(lib)


def test_an_enforced_share_passes(tmp_path, library):
    code, steps, err = check(tmp_path, "--hami-library", library)
    assert code == 0, (steps, err)
    assert [s for s in steps] == ["inventory", "baseline", "mps", "hami", "summary"]
    assert all(s["status"] == "passed" for s in steps.values()), steps
    assert steps["inventory"]["devices"][0]["memory_bytes"] == 8 * GIB
    assert steps["baseline"]["results"] == ["ok"] and steps["baseline"]["allocated"] == int(2 * GIB * 1.1)
    mps = steps["mps"]
    assert mps["results"] == ["ok", "oom"] and mps["daemon"]["listed"] is True
    assert mps["environment"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"  # what a session gets
    hami = steps["hami"]
    assert hami["results"] == ["ok", "oom"] and hami["mem_get_info_total"] == 2 * GIB
    assert steps["summary"]["enforced_by"] == ["mps", "hami"]


def test_an_unenforced_share_fails(tmp_path, library):
    """Limits ignored (library not loaded, client outside MPS): 110 % succeeds, so both fail."""
    code, steps, _ = check(tmp_path, "--hami-library", library, BAI_STANDIN_IGNORE_LIMITS="1")
    assert code == 1
    assert steps["baseline"]["status"] == "passed"
    assert steps["mps"]["status"] == "failed" and steps["mps"]["results"] == ["ok", "ok"]
    assert steps["hami"]["status"] == "failed" and steps["hami"]["total_is_share"] is False
    assert steps["summary"]["failed"] == ["mps", "hami"]


def test_a_dead_mps_daemon_fails_and_skipped_steps_are_no_pass(tmp_path):
    code, steps, _ = check(tmp_path, BAI_STANDIN_DAEMON_DEAD="1")
    assert code == 1
    assert steps["mps"]["status"] == "failed" and "does not answer" in steps["mps"]["why"]
    assert steps["hami"]["status"] == "skipped"
    code, steps, _ = check(tmp_path, path_has_mps=False)
    assert code == 2  # nothing failed, but nothing showed enforcement either
    assert steps["mps"]["status"] == steps["hami"]["status"] == "skipped"
    assert steps["summary"]["status"] == "skipped" and steps["summary"]["enforced_by"] == []


def test_a_busy_gpu_fails_the_baseline(tmp_path, library):
    """110 % of a share that does not fit at all is no evidence for a limit."""
    code, steps, _ = check(tmp_path, "--fgpu", "2", "--hami-library", library)
    assert code == 1 and steps["baseline"]["status"] == "failed"

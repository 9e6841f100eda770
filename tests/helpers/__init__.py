"""Test helpers: a real hub, a standalone scheduler service, extra Docker engines, PostgreSQL,
fuzz strategies, kernel images and sessions, and the invariants every fault test checks."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
# The kernel images `bai-images build` makes, under the same prefix (a worktree may build
# its own with BAI_IMAGE_PREFIX=...; the test hub's default image follows it).
IMAGE_PREFIX = os.environ.get("BAI_IMAGE_PREFIX", "bai/")
KERNEL_IMAGE = f"{IMAGE_PREFIX}sklearn:1.6.1"
OLD_IMAGE = f"{IMAGE_PREFIX}sklearn:1.5.2"
# The marker of tests of images not built by default (the second version of each framework).
EXTRA_IMAGES = "extra_images"


def pids_whose_environ(match) -> list[int]:
    """Processes (not this one) whose environment, a list of ``KEY=value`` bytes, ``match`` accepts."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if match(env):
            found.append(int(d.name))
    return found

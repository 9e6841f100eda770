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

"""Test helpers: a real hub, a standalone scheduler service, extra Docker engines, PostgreSQL,
fuzz strategies, and the invariants every fault test checks."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
KERNEL_IMAGE = "bai/sklearn:1.6.1"
OLD_IMAGE = "bai/sklearn:1.5.2"

"""Test helpers: a real hub, extra Docker engines, PostgreSQL, the invariants every fault test checks."""

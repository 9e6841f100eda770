"""A throwaway PostgreSQL server (Debian's postgresql package) for the tests."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from .hub import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run scripts/setup.sh --test (apt-get install postgresql)")
    return found[-1]


class Postgres:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bai-test-pg-")
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self.data = os.path.join(self.dir, "data")

    def _as_pg(self, *cmd, check=True):
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, check=check)

    def start(self):
        if not os.path.exists(self.data):
            self._as_pg(_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres")
        self._as_pg(_bin("pg_ctl"), "-D", self.data, "-w", "-l", os.path.join(self.dir, "log"),
                    "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        return self

    def stop(self):
        self._as_pg(_bin("pg_ctl"), "-D", self.data, "-w", "-m", "fast", "stop", check=False)

    def create_db(self, name: str) -> str:
        self._as_pg(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_down(self, timeout=10):
        end = time.time() + timeout
        while time.time() < end and os.path.exists(os.path.join(self.data, "postmaster.pid")):
            time.sleep(0.1)

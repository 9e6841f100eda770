"""What a build is doing, as events, and the readers of pip's output that
make them (pure: lines in, counts out).

``bai-images build`` prints one line per event::

    [2/3] bai/tensorflow:2.21.0: download: 41 packages, 301.2 MB (tensorflow_cpu-2.21.0-...whl 120.4 of 273.8 MB)
    [2/3] bai/tensorflow:2.21.0: install: kernel environment 812.0 of 1303.5 MB (62%)
"""

from __future__ import annotations

import dataclasses
import re

STEPS = ("up to date", "start", "rootfs", "check", "download", "install", "compile", "kernelspec",
         "commit", "test", "push", "registry", "done")


@dataclasses.dataclass(frozen=True)
class Progress:
    """One thing a build reports: image ``index`` of ``total`` in the build
    order, its ``ref``, the ``step`` and what it has done (``done`` of
    ``size`` ``unit``, where known)."""
    index: int
    total: int
    ref: str
    step: str
    detail: str = ""
    done: int | None = None
    size: int | None = None
    unit: str = ""

    def __str__(self) -> str:
        return f"[{self.index}/{self.total}] {self.ref}: {self.step}" + (f": {self.detail}" if self.detail else "")


def megabytes(n: float) -> str:
    """Decimal MB, as pip prints sizes."""
    return f"{n / 1e6:.1f} MB"


def size_of(text: str) -> int:
    """pip's ``format_size`` back to bytes: ``"8.4 MB"`` -> 8400000."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(bytes|kB|MB|GB)\s*", text)
    if not m:
        return 0
    return round(float(m.group(1)) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])


_COLLECT = re.compile(r"^(Collecting|Processing) (\S+)")
_DOWNLOAD = re.compile(r"^\s*Downloading (\S+) \(([^)]+)\)")
_CACHED = re.compile(r"^\s*Using cached (\S+) \(([^)]+)\)")
_RAW = re.compile(r"^Progress (\d+) of (\d+)$")


class DownloadMeter:
    """Follows ``pip download`` output: packages found so far and bytes
    fetched (``--progress-bar raw`` adds byte counts within a file)."""

    def __init__(self) -> None:
        self.packages = 0
        self.finished_bytes = 0      # files fetched completely
        self.current = ""            # file being fetched
        self.current_size = 0
        self.current_done = 0
        self.raw = False             # pip reports bytes within the current file

    @property
    def fetched(self) -> int:
        return self.finished_bytes + self.current_done

    def feed(self, line: str) -> bool:
        """Take one line; True when the counts changed."""
        line = line.rstrip("\r\n")
        if _COLLECT.match(line):
            self.packages += 1
            return True
        m = _DOWNLOAD.match(line)
        if m:
            if m.group(1) != self.current:     # the same file again is pip retrying it
                self._finish()
            self.current, self.current_size, self.current_done = m.group(1), size_of(m.group(2)), 0
            self.raw = False
            return True
        m = _CACHED.match(line)
        if m:
            self._finish()
            self.finished_bytes += size_of(m.group(2))
            return True
        m = _RAW.match(line.strip())
        if m and self.current:
            self.raw = True
            self.current_done = int(m.group(1))
            self.current_size = int(m.group(2)) or self.current_size
            return True
        return False

    def close(self) -> None:
        """pip has finished: the last file is complete."""
        self._finish()

    def _finish(self) -> None:
        if self.current:
            # without raw progress pip only says a file started: count it whole
            self.finished_bytes += self.current_done if self.raw else self.current_size
        self.current, self.current_size, self.current_done, self.raw = "", 0, 0, False

    def describe(self) -> str:
        text = f"{self.packages} packages, {megabytes(self.fetched)} fetched"
        if self.current and self.current_size > 5e6:
            text += f" ({self.current} {self.current_done / 1e6:.1f} of {megabytes(self.current_size)})"
        return text


# Lines the build scripts print (builder.py): "[bai] step NAME [detail]" and
# "[bai] bytes ENV N" (bytes written into an environment so far).
_STEP = re.compile(r"^\[bai\] step (\S+)(?: (.*))?$")
_BYTES = re.compile(r"^\[bai\] bytes (\S+) (\d+)$")


def script_event(line: str) -> tuple[str, str, int | None] | None:
    """``("step", name+detail, None)`` or ``("bytes", env, n)`` for a build
    script's own lines; None for anything else (pip's output)."""
    m = _STEP.match(line.strip())
    if m:
        return "step", m.group(1) + (f" {m.group(2)}" if m.group(2) else ""), None
    m = _BYTES.match(line.strip())
    if m:
        return "bytes", m.group(1), int(m.group(2))
    return None


def install_detail(env: str, done: int, size: int) -> str:
    if size <= 0:
        return f"{env} environment {megabytes(done)}"
    pct = min(99, int(100 * done / size))
    return f"{env} environment {min(done, size) / 1e6:.1f} of {megabytes(size)} ({pct}%)"

"""How far a ``docker pull`` or ``docker push`` has come, read from the engine's progress stream.

Pure: ``Transfer.feed`` takes the JSON objects the engine streams, one per change. Each layer is
named by ``id`` (12 hex digits) and moves through statuses; while bytes move, ``progressDetail``
says ``current`` of ``total``:

* pull: "Pulling fs layer" / "Waiting" → "Downloading" (compressed bytes) → "Verifying Checksum" /
  "Download complete" → "Extracting" → "Pull complete"; or at once "Already exists". The
  registry's manifest gives every layer's size beforehand (``sizes``), so the total is right from
  the first event and layers already on the node count as done.
* push: "Preparing" / "Waiting" → "Pushing" (uncompressed bytes; the engine may count a little
  past the total) → "Pushed"; or at once "Layer already exists" / "Mounted from <repo>" (no size
  given: they count as layers done).

An event with ``error`` is the engine saying why the transfer failed: ``TransferFailed``.
"""
from __future__ import annotations

from typing import Iterable, Mapping

# Statuses after which a layer's bytes have all arrived (pull) or gone (push).
MOVED = {"Download complete", "Verifying Checksum", "Extracting", "Pull complete", "Already exists",
         "Pushed", "Layer already exists"}
# Statuses after which nothing more happens to a layer.
FINISHED = {"Pull complete", "Already exists", "Pushed", "Layer already exists"}


class TransferFailed(Exception):
    """The engine's own words for why a pull or push stopped."""


def short_id(digest: str) -> str:
    """The engine's name of a layer in its progress stream: ``sha256:485687a0555a…`` → ``485687a0555a``."""
    return digest.split(":", 1)[-1][:12]


def format_size(n: int) -> str:
    """Bytes as the engine's own progress shows them (decimal): 1.2 GB, 45.6 MB, 512 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class Transfer:
    """The sum of one pull's or push's layer events. ``sizes``: {layer digest or id: bytes} known
    beforehand (a pull's manifest)."""

    def __init__(self, sizes: Mapping[str, int] | Iterable[tuple[str, int]] = ()):
        pairs = sizes.items() if isinstance(sizes, Mapping) else sizes
        self.size: dict[str, int] = {short_id(d): int(n) for d, n in pairs}
        self.moved: dict[str, int] = {}
        self.finished: set[str] = set()
        self.state: dict[str, str] = {}

    def feed(self, event: Mapping) -> bool:
        """Take one event; True when the figures changed. ``TransferFailed`` on an error event."""
        if event.get("error") or event.get("errorDetail"):
            detail = event.get("errorDetail") or {}
            raise TransferFailed(str(event.get("error") or detail.get("message") or "unknown error").strip())
        layer, status = event.get("id") or "", event.get("status") or ""
        if not layer or len(layer) != 12 or not status:
            return False  # "Pulling from …", "Digest: …", the push's final line
        before = (self.moved.get(layer), layer in self.finished, self.size.get(layer), self.state.get(layer))
        detail = event.get("progressDetail") or {}
        self.state[layer] = status
        if status.startswith("Mounted from"):
            status = "Layer already exists"
        if status in ("Downloading", "Pushing") and detail.get("total"):
            if not self.size.get(layer):  # the manifest's size wins: the engine's may be another measure
                self.size[layer] = int(detail["total"])
            self.moved[layer] = min(int(detail.get("current") or 0), self.size[layer])
        elif status in MOVED:
            self.moved[layer] = self.size.get(layer, 0)
        else:
            self.size.setdefault(layer, 0)
        if status in FINISHED:
            self.finished.add(layer)
        return before != (self.moved.get(layer), layer in self.finished, self.size.get(layer), self.state[layer])

    @property
    def done_bytes(self) -> int:
        return sum(self.moved.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.size.values())

    @property
    def layers(self) -> int:
        return len(self.size)

    def describe(self) -> str:
        """``1.2 of 3.4 GB``; once every byte is there and layers are still being unpacked,
        ``3.4 of 3.4 GB, unpacking layer 2 of 3``."""
        total, done = self.total_bytes, self.done_bytes
        text = f"{format_size(done)} of {format_size(total)}"
        unpacking = [lay for lay, st in self.state.items() if st == "Extracting"]
        if unpacking and done >= total:
            text += f", unpacking layer {len(self.finished) + 1} of {self.layers}"
        return text

    def describe_push(self) -> str:
        """``2 of 3 layers, 12.8 of 45.6 MB sent`` (the bytes once the engine has said how many)."""
        text = f"{len(self.finished)} of {self.layers} layers"
        return text + (f", {self.describe()} sent" if self.total_bytes else "")

"""fGPU arithmetic in integer quanta.

An admin says how many fGPU one physical GPU is (``fgpu_per_gpu``) and the
smallest step a user may ask for (``fgpu_step``).  One step is one *quantum*;
every amount inside BAI Hub is an ``int`` number of quanta, and decimals only
appear at the edges (forms, labels, pages).  Parsing goes through ``Decimal``
so "0.1" is exactly one tenth, never a binary float.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

# Bounds on any number a user sends, checked on its text before any arithmetic:
# Decimal("1e999999") is cheap to make, but turning it into an int (or dividing
# it) takes seconds on the event loop, and "1e1000000" overflows the context.
MAX_NUMBER_CHARS = 40
MAX_MAGNITUDE = 18  # powers of ten either way: 1e18 and 1e-18 are the extremes
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NOT_FINITE = {"nan", "snan", "inf", "infinity"}


class NumberError(ValueError):
    """A value that is not a plain decimal number of reasonable size.

    ``kind``: "number" (not a number at all), "finite" (NaN or infinity) or
    "range" (too many digits, or too large or too small)."""

    def __init__(self, kind: str):
        super().__init__({"number": "not a number", "finite": "not a finite number",
                          "range": "too long, too large or too small a number"}[kind])
        self.kind = kind


def parse_number(raw) -> Decimal:
    """A user's number (text, int, float or Decimal) as an exact ``Decimal``, or ``NumberError``.

    ASCII digits, an optional sign, point and exponent; at most MAX_NUMBER_CHARS
    characters and a magnitude within 10**±MAX_MAGNITUDE. Every check runs on
    the text, so a hostile value costs no more than a sensible one.
    """
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float, Decimal)):
        raise NumberError("number")
    if isinstance(raw, Decimal):
        text = str(raw)  # the code's own defaults and already-parsed values
    elif isinstance(raw, int):
        if raw.bit_length() > 64:
            raise NumberError("range")
        text = str(raw)
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            raise NumberError("finite")
        text = repr(raw)
    else:
        text = raw.strip()
        if len(text) > MAX_NUMBER_CHARS:
            raise NumberError("range")
    if not _NUMBER.fullmatch(text):
        raise NumberError("finite" if text.lower().lstrip("+-") in _NOT_FINITE else "number")
    value = Decimal(text)
    if not value:
        return Decimal(0)  # "0e999999" too
    if abs(value.adjusted()) > MAX_MAGNITUDE:
        raise NumberError("range")
    return value


def shown(raw, limit: int = 40) -> str:
    """A user's value quoted in a message, cut short (never converted in full)."""
    if isinstance(raw, str):
        return repr(raw[:limit] + ("…" if len(raw) > limit else ""))
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return repr(raw) if isinstance(raw, float) or raw.bit_length() <= 64 else "a huge number"
    return "nothing" if raw is None else type(raw).__name__


class FgpuError(ValueError):
    """A user-supplied fGPU amount that cannot be granted; the message says why."""


@dataclass(frozen=True)
class FgpuUnits:
    fgpu_per_gpu: int = 2
    fgpu_step: Decimal = Decimal("0.5")

    def __post_init__(self):
        step = Decimal(self.fgpu_step)
        object.__setattr__(self, "fgpu_step", step)
        if self.fgpu_per_gpu < 1:
            raise ValueError("fgpu_per_gpu must be a positive integer")
        if not step.is_finite() or step <= 0:
            raise ValueError("fgpu_step must be a positive decimal")
        ratio = Decimal(self.fgpu_per_gpu) / step
        if ratio != ratio.to_integral_value():
            raise ValueError(
                f"fgpu_step {step} must divide fgpu_per_gpu {self.fgpu_per_gpu} exactly"
            )

    @property
    def quanta_per_gpu(self) -> int:
        return int(Decimal(self.fgpu_per_gpu) / self.fgpu_step)

    def to_quanta(self, amount, max_quanta: int | None = None) -> int:
        """Parse a user's fGPU amount ("0.5", 1, "2") into quanta, or raise FgpuError.

        Zero is allowed (a CPU-only session); everything else must be a positive
        whole number of steps, no larger than ``max_quanta`` when given.
        """
        limit = (
            f" (steps of {self.fgpu_step} fGPU"
            + (f", at most {self.to_fgpu(max_quanta)} fGPU" if max_quanta is not None else "")
            + ")"
        )
        try:
            value = parse_number(amount)
        except NumberError as e:
            if e.kind == "finite":
                raise FgpuError(f"fGPU must be a finite number{limit}") from None
            if e.kind == "range":
                raise FgpuError(f"fGPU {shown(amount)} is out of range{limit}") from None
            raise FgpuError(f"fGPU must be a number, not {shown(amount)}{limit}") from None
        if value < 0:
            raise FgpuError(f"fGPU cannot be negative{limit}")
        steps = Fraction(value) / Fraction(self.fgpu_step)
        if steps.denominator != 1:
            raise FgpuError(f"{plain(value)} fGPU is not a whole number of steps{limit}")
        quanta = steps.numerator
        if max_quanta is not None and quanta > max_quanta:
            raise FgpuError(f"{plain(value)} fGPU is more than allowed{limit}")
        return quanta

    def to_fgpu(self, quanta: int) -> str:
        """Quanta shown as a decimal fGPU amount, e.g. 1 -> "0.5"."""
        return plain(self.fgpu_step * quanta)

    def gpu_fraction(self, quanta: int) -> Fraction:
        """Share of one physical GPU that ``quanta`` is (may exceed 1)."""
        return Fraction(quanta, self.quanta_per_gpu)

    def memory_bytes(self, quanta: int, device_memory_bytes: int) -> int:
        """GPU memory of a share of one device, rounded down to whole bytes."""
        return device_memory_bytes * quanta // self.quanta_per_gpu

    def sm_percent(self, quanta: int) -> int:
        """Share of one device's streaming multiprocessors, as a whole percent (at least 1)."""
        return max(1, 100 * quanta // self.quanta_per_gpu)


def plain(value: Decimal) -> str:
    """A decimal in plain notation, without trailing zeros: 1E+9 -> "1000000000", 0.50 -> "0.5"."""
    return format(value.normalize(), "f")


GIB = 1024**3


def format_bytes(n: int) -> str:
    """Bytes shown as GiB with at most one decimal, e.g. 2147483648 -> "2 GiB"."""
    gib = Fraction(n, GIB)
    if gib.denominator == 1:
        return f"{gib.numerator} GiB"
    return f"{float(gib):.1f} GiB"

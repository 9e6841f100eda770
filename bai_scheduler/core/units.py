"""fGPU arithmetic in integer quanta.

An admin says how many fGPU one physical GPU is (``fgpu_per_gpu``) and the
smallest step a user may ask for (``fgpu_step``).  One step is one *quantum*;
every amount inside BAI Hub is an ``int`` number of quanta, and decimals only
appear at the edges (forms, labels, pages).  Parsing goes through ``Decimal``
so "0.1" is exactly one tenth, never a binary float.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction


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
        if isinstance(amount, bool):
            raise FgpuError(f"fGPU must be a number{limit}")
        try:
            value = Decimal(str(amount).strip())
        except (InvalidOperation, ValueError):
            raise FgpuError(f"fGPU must be a number, not {str(amount)[:40]!r}{limit}") from None
        if not value.is_finite():
            raise FgpuError(f"fGPU must be a finite number{limit}")
        if value < 0:
            raise FgpuError(f"fGPU cannot be negative{limit}")
        quanta = value / self.fgpu_step
        if quanta != quanta.to_integral_value():
            raise FgpuError(f"{value.normalize()} fGPU is not a whole number of steps{limit}")
        quanta = int(quanta)
        if max_quanta is not None and quanta > max_quanta:
            raise FgpuError(f"{value.normalize()} fGPU is more than allowed{limit}")
        return quanta

    def to_fgpu(self, quanta: int) -> str:
        """Quanta shown as a decimal fGPU amount, e.g. 1 -> "0.5"."""
        value = (self.fgpu_step * quanta).normalize()
        text = format(value, "f")
        return text

    def gpu_fraction(self, quanta: int) -> Fraction:
        """Share of one physical GPU that ``quanta`` is (may exceed 1)."""
        return Fraction(quanta, self.quanta_per_gpu)

    def memory_bytes(self, quanta: int, device_memory_bytes: int) -> int:
        """GPU memory of a share of one device, rounded down to whole bytes."""
        return device_memory_bytes * quanta // self.quanta_per_gpu

    def sm_percent(self, quanta: int) -> int:
        """Share of one device's streaming multiprocessors, as a whole percent (at least 1)."""
        return max(1, 100 * quanta // self.quanta_per_gpu)


GIB = 1024**3


def format_bytes(n: int) -> str:
    """Bytes shown as GiB with at most one decimal, e.g. 2147483648 -> "2 GiB"."""
    gib = Fraction(n, GIB)
    if gib.denominator == 1:
        return f"{gib.numerator} GiB"
    return f"{float(gib):.1f} GiB"

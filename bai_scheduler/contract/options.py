"""The spawn form's values, parsed and checked as plain functions.

JupyterHub hands ``options_from_form`` a dict of lists of strings; the REST API
hands ``user_options`` whatever JSON the caller sent.  Both end here, so a
hand-crafted POST gets exactly the checks the form does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from decimal import Decimal

from ..core.presets import Preset
from ..core.units import GIB, FgpuError, FgpuUnits, NumberError, parse_number

FIELDS = ("image", "image_name", "fgpu", "cpu", "memory", "sessions", "preset", "group", "pool")
# Choices the service checks against the user's JupyterHub groups (core.quotas.resolve).
TEAM_FIELDS = ("group", "pool")


class FormError(ValueError):
    """A form value that cannot be used; the message tells the user what is allowed."""


@dataclass(frozen=True)
class Limits:
    """What one session may ask for, and what the form proposes.

    Set by the scheduler service's options (``c.BaiScheduler.max_cpu`` …) and
    published in ``api/capacity`` as ``limits``: no defaults here, so there is
    one source for every limit.
    """

    max_quanta: int  # the largest node's fGPU, in quanta
    max_cpu: Decimal
    max_memory_gib: Decimal
    default_cpu: Decimal
    default_memory_gib: Decimal
    max_sessions: int  # sessions one launch may start
    presets: tuple[Preset, ...]  # offered first (c.BaiScheduler.presets)
    custom: bool  # whether values other than a preset's may be asked for

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("presets", "custom")}
        out = {k: v if isinstance(v, int) else str(v) for k, v in out.items()}
        out["presets"] = [p.to_json() for p in self.presets]
        out["custom"] = self.custom
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Limits":
        return cls(
            max_quanta=int(data["max_quanta"]),
            max_cpu=Decimal(data["max_cpu"]),
            max_memory_gib=Decimal(data["max_memory_gib"]),
            default_cpu=Decimal(data["default_cpu"]),
            default_memory_gib=Decimal(data["default_memory_gib"]),
            max_sessions=int(data["max_sessions"]),
            presets=tuple(Preset.from_json(p) for p in data["presets"]),
            custom=bool(data["custom"]),
        )


@dataclass(frozen=True)
class SessionOptions:
    image: str
    quanta: int
    cpu_millis: int
    memory_bytes: int
    sessions: int = 1
    preset: str = ""  # the preset's slug ("" = custom values)
    group: str = ""  # the group it counts against ("" = the user's first)
    pool: str = ""  # the node pool asked for ("" = any the group may use)

    def to_user_options(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != "" or k not in ("preset", *TEAM_FIELDS)}


def _one(value):
    """Form data comes as lists of strings, REST data as JSON values."""
    if isinstance(value, list):
        if len(value) != 1:
            raise FormError("Each field takes one value.")
        return value[0]
    return value


def _decimal(name: str, raw, lo: Decimal, hi: Decimal, unit: str) -> Decimal:
    try:
        value = parse_number(raw)
    except NumberError as e:
        finite = "finite " if e.kind == "finite" else ""
        raise FormError(f"{name} must be a {finite}number from {lo} to {hi}{unit}.") from None
    if value < lo or value > hi:
        raise FormError(f"{name} must be a number from {lo} to {hi}{unit}.")
    return value


def whole_number(name: str, raw, lo: int, hi: int) -> int:
    """A count typed as digits (or sent as a JSON integer), from ``lo`` to ``hi``."""
    text = raw.strip() if isinstance(raw, str) else None
    if isinstance(raw, int) and not isinstance(raw, bool) and lo <= raw <= hi:
        return raw
    if text is not None and len(text) <= 9 and text.isascii() and text.isdigit() and lo <= int(text) <= hi:
        return int(text)
    raise FormError(f"{name} must be a whole number from {lo} to {hi}.")


def parse_options(data: dict, units: FgpuUnits, limits: Limits) -> SessionOptions:
    """Validate form data or REST ``user_options`` into a SessionOptions.

    The image is only checked to be a non-empty name here: whether this user
    may use it is the catalog's question (``catalog.resolve_image``).
    """
    if not isinstance(data, dict):
        raise FormError("Options must be an object of fields.")
    unknown = set(data) - set(FIELDS) - {"quanta", "cpu_millis", "memory_bytes"}
    if unknown:
        raise FormError(f"Unknown field(s): {', '.join(sorted(str(k) for k in unknown))[:200]}.")
    teams = {}
    for name in ("preset", *TEAM_FIELDS):
        value = _one(data.get(name, "")) or ""
        if not isinstance(value, str) or len(value) > 63 or any(c.isspace() for c in value):
            raise FormError(f"{name.capitalize()} must be a name.")
        teams[name] = value.strip()
    preset = None
    if teams["preset"]:
        preset = next((p for p in limits.presets if p.slug == teams["preset"]), None)
        if preset is None:
            offered = ", ".join(p.slug for p in limits.presets) or "none"
            raise FormError(f"There is no preset {teams['preset']!r} (presets: {offered}).")
    elif limits.presets and not limits.custom:
        raise FormError("Choose one of the presets: "
                        f"{', '.join(p.slug for p in limits.presets)} (custom values are not allowed here).")
    if preset is not None:
        # The preset's shape wins over any values posted beside it; its image and pool too.
        data = {k: v for k, v in data.items() if k not in ("fgpu", "cpu", "memory", "quanta", "cpu_millis",
                                                            "memory_bytes")}
        data.update(fgpu=units.to_fgpu(preset.quanta), cpu=str(Decimal(preset.cpu_millis) / 1000),
                    memory=str(Decimal(preset.memory_bytes) / GIB))
        if preset.image:
            data.update(image=preset.image, image_name="")
        if preset.pool:
            teams["pool"] = preset.pool
    if "quanta" in data:  # already-parsed options (a restart, or the launch API)
        mixed = sorted(set(data) & {"image_name", "fgpu", "cpu", "memory"})
        if mixed:
            # Each field has one meaning: a typed image name or an fGPU amount next to
            # the parsed fields would otherwise be ignored, or replace what was checked.
            raise FormError(f"Send either the form's fields or parsed ones (quanta, cpu_millis, "
                            f"memory_bytes), not both: {', '.join(mixed)}.")
        data = {
            "image": data.get("image"),
            "fgpu": units.to_fgpu(_int("quanta", data["quanta"])),
            "cpu": Decimal(_int("cpu_millis", data.get("cpu_millis", 0))) / 1000,
            "memory": Decimal(_int("memory_bytes", data.get("memory_bytes", 0))) / GIB,
            "sessions": data.get("sessions", 1),
        }
    typed = _one(data.get("image_name", "")) or ""
    picked = _one(data.get("image", "")) or ""
    if not isinstance(typed, str) or not isinstance(picked, str):
        raise FormError("The image must be a name.")
    image = (typed or picked).strip()
    if not image:
        raise FormError("Choose an image, or type the name of one you may use.")
    if len(image) > 255 or any(c.isspace() or ord(c) < 32 for c in image):
        raise FormError("That is not a valid image name.")

    if preset is not None:  # an admin's shape: the per-session form limits are not asked
        quanta, cpu, mem = preset.quanta, Decimal(preset.cpu_millis) / 1000, Decimal(preset.memory_bytes) / GIB
    else:
        try:
            quanta = units.to_quanta(_one(data.get("fgpu", "0")), limits.max_quanta)
        except FgpuError as e:
            raise FormError(str(e)) from None
        cpu = _decimal("CPU", _one(data.get("cpu", limits.default_cpu)), Decimal("0.1"), limits.max_cpu, " cores")
        mem = _decimal("Memory", _one(data.get("memory", limits.default_memory_gib)), Decimal("0.25"),
                       limits.max_memory_gib, " GiB")
    n = whole_number("Sessions", _one(data.get("sessions", 1)), 1, limits.max_sessions)
    return SessionOptions(
        image=image,
        quanta=quanta,
        cpu_millis=preset.cpu_millis if preset is not None else int(cpu * 1000),
        memory_bytes=preset.memory_bytes if preset is not None else int(mem * GIB),
        sessions=n,
        **teams,
    )


def _int(name, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2**53:
        raise FormError(f"{name} must be a non-negative integer.")
    return v


def describe_share(quanta: int, units: FgpuUnits, device_memory_bytes: int) -> str:
    """What an amount means, e.g. "0.5 fGPU = 2 GiB GPU memory, 25% of SMs"."""
    from ..core.units import format_bytes

    if quanta == 0:
        return "0 fGPU = CPU only"
    q = units.quanta_per_gpu
    whole, part = divmod(quanta, q)
    pieces = []
    if whole:
        pieces.append(f"{whole} whole GPU{'s' if whole > 1 else ''}")
    if part:
        pieces.append(f"{format_bytes(units.memory_bytes(part, device_memory_bytes))} GPU memory, "
                      f"{units.sm_percent(part)}% of SMs")
    return f"{units.to_fgpu(quanta)} fGPU = " + " + ".join(pieces)

"""The session form's fields: what the hub's spawn page and the sessions page both show.

``form_context`` turns the catalog, the capacity the service publishes
(``api/capacity``: devices, ``limits`` and the live ``note``) and the values of a
refused post into the variables of ``templates/session_form.html`` (this package).
The spawner's template (bai_spawner/templates/options_form.html) and the service's
sessions page include it.  It works as a plain form post; the service's
``static/session-form.js`` refreshes the note from ``capacity.json`` and only shows
it.  The server validates everything again (``options.parse_options`` and the
catalog), whatever is posted.
"""
from __future__ import annotations

import os

from ..core.units import FgpuUnits, format_bytes
from . import catalog as catalog_mod
from .options import FormError, Limits, describe_share, whole_number

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")


def image_groups(visible, selected: str) -> list[dict]:
    """The picker's ``<optgroup>``s: kernel images by framework (newest first), then the
    user's private images; the selected image, else the first one, is marked. Values are the
    names users see (``bai/sklearn:1.6.1``, without the registry's host)."""
    groups = catalog_mod.group_by_framework([i for i in visible if i.kind == "kernel"])
    private = [i for i in visible if i.kind == "private"]
    names = [i.short_ref for imgs in groups.values() for i in imgs] + [i.short_ref for i in private]
    default = selected if selected in names else (names[0] if names else "")
    out = []
    for framework, images in groups.items():
        options = []
        for n, img in enumerate(images):
            label = img.display_name
            if img.version and img.version not in label.split():
                label += f" ({img.version})"
            label += (f" · Python {img.python}" if img.python else "") + (" · newest" if n == 0 and len(images) > 1 else "")
            options.append({"value": img.short_ref, "label": label, "selected": img.short_ref == default})
        out.append({"label": framework or "Other", "options": options})
    if private:
        out.append({"label": "My private images", "options": [{
            "value": img.short_ref,
            "label": img.short_ref + (f" (from {img.source_image})" if img.source_image else "")
            + (f" · {img.created[:10]}" if img.created else ""),
            "selected": img.short_ref == default,
        } for img in private]})
    return out


def _count(values: dict, limits: Limits) -> int:
    try:
        return min(whole_number("Sessions", values.get("sessions") or 1, 1, 10**9 - 1), limits.max_sessions)
    except FormError:
        return 1


def chosen_shape(values: dict | None, units: FgpuUnits, limits: Limits) -> tuple[int, int]:
    """(quanta, sessions) the form shows chosen: the posted values where they parse, else its defaults."""
    values = values or {}
    try:
        quanta = (units.to_quanta(values["fgpu"], limits.max_quanta) if values.get("fgpu") not in (None, "")
                  else min(1, limits.max_quanta))
    except ValueError:
        quanta = min(1, limits.max_quanta)
    return quanta, _count(values, limits)


def per_process_note(capacity: dict) -> str:
    """What users must know about how a share is enforced, from the nodes' GPU backends: on CUDA
    MPS the limits hold per client process, not per session."""
    mps = sorted(n["name"] for n in capacity.get("nodes", [])
                 if n.get("gpu_backend") == "mps" and n.get("devices") and not n.get("simulated"))
    if not mps:
        return ""
    return (f"On {', '.join(mps)} (CUDA MPS) the memory and SM limits of a share hold per process: each kernel "
            "or program that uses the GPU gets the whole share, so two busy kernels use twice your share. "
            "Keep one GPU process per session.")


def gpu_text(devices: list[dict]) -> str:
    """The GPU models a share is part of, e.g. "GPUs here: A100 (80 GiB), T4 (16 GiB)." (a model's
    memory once, also when its name already gives it, as simulated GPUs' names do)."""
    models = []
    for d in sorted(devices, key=lambda d: (-d["memory_bytes"], d["name"])):
        size = format_bytes(d["memory_bytes"])
        model = d["name"] if size in d["name"] else f"{d['name']} ({size})"
        if model not in models:
            models.append(model)
    if len(models) == 1:
        return f"One GPU here is a {models[0]}."
    return f"GPUs here: {', '.join(models)}." if models else ""


def volumes_shared(explicit: bool | None, driver: str, options: dict) -> bool:
    """Whether every node sees the same home folder (c.BaiSpawner.volumes_shared, else: a volume
    driver other than 'local', or driver options such as NFS's)."""
    if explicit is not None:
        return bool(explicit)
    return bool(options) or driver != "local"


def home_note(shared: bool, nodes: list[str], home: str = "/home/jovyan") -> str:
    """Where a user's files live, when the nodes do not share home folders (nothing to say on one
    node, or when they do)."""
    if shared or len(nodes) < 2:
        return ""
    return (f"Your home folder {home} is kept on each node separately ({', '.join(nodes)}): a session sees the "
            "files saved by earlier sessions on its own node only. Keep what matters in the kernel image (a "
            "snapshot), a git repository or MLflow.")


def preset_choices(limits: Limits, units: FgpuUnits, selected: str | None) -> list[dict]:
    """The presets as radio choices, then "Custom" where allowed; ``selected`` (a slug, "" for
    custom, None: not chosen yet) else the default preset, else the first, is checked."""
    if not limits.presets:
        return []
    slugs = [p.slug for p in limits.presets] + ([""] if limits.custom else [])
    if selected not in slugs:
        selected = next((p.slug for p in limits.presets if p.default), limits.presets[0].slug)
    out = []
    for p in limits.presets:
        shape = (f"{units.to_fgpu(p.quanta)} fGPU · {p.cpu_millis / 1000:g} CPU · {format_bytes(p.memory_bytes)}"
                 + (f" · {p.image}" if p.image else "") + (f" · pool {p.pool}" if p.pool else ""))
        out.append({"value": p.slug, "label": p.display_name, "description": p.description, "shape": shape,
                    "checked": p.slug == selected})
    if limits.custom:
        out.append({"value": "", "label": "Custom", "description": "Your own GPU share, CPU and memory (below).",
                    "shape": "", "checked": selected == ""})
    return out


def team_choices(capacity: dict, user_groups, values: dict) -> tuple[list[dict], list[dict]]:
    """(groups, pools) the form offers: the user's groups that have a policy (the first is the
    default), and the pools the chosen group may use, each with its free fGPU."""
    policies = capacity.get("groups") or {}
    mine = [g for g in user_groups or () if g in policies]
    group = values.get("group") if values.get("group") in mine else (mine[0] if mine else "")
    groups = [{"value": g, "label": g, "selected": g == group} for g in mine]
    allowed = (policies.get(group) or {}).get("pools") or sorted(capacity.get("pools") or {})
    pools = []
    for name in allowed:
        p = (capacity.get("pools") or {}).get(name)
        if p is None:
            continue
        pools.append({"value": name, "selected": values.get("pool") == name,
                      "label": f"{name}: {p['free_fgpu']} of {p['capacity_fgpu']} fGPU free "
                               f"({len(p['nodes'])} node{'s' if len(p['nodes']) != 1 else ''})"})
    return groups, pools


def form_context(*, visible, user: str, capacity: dict, units: FgpuUnits, limits: Limits, note: dict,
                 capacity_url: str, static_url: str, values: dict | None = None, admin: bool = False,
                 user_groups=(), home_note: str = "") -> dict:
    """Variables of ``session_form.html``.

    ``capacity``: ``api/capacity``'s answer (its devices); ``note``: ``{"level", "text"}`` for the
    chosen shape; ``capacity_url``: where the script polls the note; ``static_url``: the service's
    static folder (the form's script and style); ``values``: raw values of a refused post, shown again;
    ``admin``: the form is an admin's, who gets the advice only admins can follow.
    ``user_groups``: the user's JupyterHub groups (the form offers those with a policy).
    ``home_note``: where the user's files live (``home_note()``), when that needs saying.
    """
    values = values or {}
    devices = [d for n in capacity.get("nodes", []) for d in n.get("devices", [])]
    device_mem = max((d["memory_bytes"] for d in devices), default=0)
    quanta, _ = chosen_shape(values, units, limits)
    groups, pools = team_choices(capacity, user_groups, values)
    return {
        "presets": preset_choices(limits, units, values.get("preset")),
        "custom": limits.custom,
        "team_groups": groups,
        "pool_choices": pools,
        "pool_any": not any(p["selected"] for p in pools),
        "image_groups": image_groups(visible, str(values.get("image") or "")),
        "user_name": user,
        "typed_image": str(values.get("image_name") or ""),
        "fgpu_choices": [{"value": units.to_fgpu(q), "quanta": q, "label": describe_share(q, units, device_mem),
                          "selected": q == quanta} for q in range(limits.max_quanta + 1)],
        "fgpu_step": str(units.fgpu_step),
        "fgpu_max": units.to_fgpu(limits.max_quanta),
        "fgpu_per_gpu": units.fgpu_per_gpu,
        "gpu_text": gpu_text(devices),
        "per_process_note": per_process_note(capacity),
        "cpu": str(values.get("cpu") or limits.default_cpu),
        "memory": str(values.get("memory") or limits.default_memory_gib),
        "sessions": str(values.get("sessions") or 1),
        "limits": limits,
        "note": note,
        "capacity_url": capacity_url,
        "form_static": static_url,
        "admin": admin,
        "home_note": home_note,
    }

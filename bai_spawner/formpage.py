"""HTML of the spawn options form (rendered inside JupyterHub's spawn page)."""
from __future__ import annotations

from html import escape

from bai_scheduler.units import FgpuUnits

from .form import Limits, describe_share


def render_form(*, visible, user, capacity, units: FgpuUnits, limits: Limits, service_prefix: str) -> str:
    from . import catalog as catalog_mod

    groups = catalog_mod.group_by_framework([i for i in visible if i.kind == "kernel"])
    private = [i for i in visible if i.kind == "private"]
    opts = []
    first = True
    for framework, images in groups.items():
        opts.append(f'<optgroup label="{escape(framework)}">')
        for img in images:
            sel = " selected" if first else ""
            first = False
            py = f" · Python {escape(img.python)}" if img.python else ""
            opts.append(f'<option value="{escape(img.ref)}"{sel}>{escape(img.display_name)}{py}</option>')
        opts.append("</optgroup>")
    if private:
        opts.append('<optgroup label="My private images">')
        for img in private:
            opts.append(f'<option value="{escape(img.ref)}">{escape(img.ref)}</option>')
        opts.append("</optgroup>")
    device_mem = max((d["memory_bytes"] for n in capacity["nodes"] for d in n["devices"]), default=0)
    step = escape(str(units.fgpu_step))
    max_fgpu = escape(units.to_fgpu(limits.max_quanta))
    fgpu_choices = "".join(
        f'<option value="{escape(units.to_fgpu(q))}"{" selected" if q == 0 else ""}>'
        f'{escape(describe_share(q, units, device_mem))}</option>'
        for q in range(0, limits.max_quanta + 1)
    )
    simulated = (
        '<p class="bai-note bai-simulated">GPUs on this hub are <strong>simulated</strong>: '
        "shares are scheduled and labelled, but no real GPU is attached.</p>"
        if capacity.get("simulated") else ""
    )
    return f"""
<div class="bai-form">
  {simulated}
  <div class="form-group mb-3">
    <label for="bai-image" class="form-label">Kernel image</label>
    <select id="bai-image" name="image" class="form-select form-control">{''.join(opts)}</select>
    <label for="bai-image-name" class="form-label mt-2">…or type an image name</label>
    <input id="bai-image-name" name="image_name" class="form-control" placeholder="e.g. bai-private/{escape(user)}:my-env">
  </div>
  <div class="form-group mb-3">
    <label for="bai-fgpu" class="form-label">fGPU (steps of {step}, at most {max_fgpu})</label>
    <select id="bai-fgpu" name="fgpu" class="form-select form-control">{fgpu_choices}</select>
  </div>
  <div class="row">
    <div class="col form-group mb-3">
      <label for="bai-cpu" class="form-label">CPU cores (up to {escape(str(limits.max_cpu))})</label>
      <input id="bai-cpu" name="cpu" type="number" min="0.1" step="0.1" max="{escape(str(limits.max_cpu))}"
             value="{escape(str(limits.default_cpu))}" class="form-control">
    </div>
    <div class="col form-group mb-3">
      <label for="bai-memory" class="form-label">Memory GiB (up to {escape(str(limits.max_memory_gib))})</label>
      <input id="bai-memory" name="memory" type="number" min="0.25" step="0.25" max="{escape(str(limits.max_memory_gib))}"
             value="{escape(str(limits.default_memory_gib))}" class="form-control">
    </div>
    <div class="col form-group mb-3">
      <label for="bai-sessions" class="form-label">Sessions (1–{limits.max_sessions})</label>
      <input id="bai-sessions" name="sessions" type="number" min="1" step="1" max="{limits.max_sessions}" value="1" class="form-control">
    </div>
  </div>
</div>
"""

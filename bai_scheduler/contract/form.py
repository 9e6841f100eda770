"""HTML of the spawn options form.

Rendered inside JupyterHub's spawn page (``BaiSpawner.get_options_form``) and
inside the "New sessions" card of the scheduler's sessions page. It works as a
plain form post; a small script adds a live note of what is free now (from the
scheduler's capacity JSON, with the browser's cookie). The server validates
everything again (``form.parse_options`` and the catalog), whatever is posted.
"""
from __future__ import annotations

import json
from html import escape

from ..core.units import GIB, FgpuUnits, format_bytes

from .options import Limits, describe_share


# -- pure helpers (tested in tests/test_pages.py) --------------------------------------


def free_quanta_by_device(usage: list[dict]) -> list[list[int]]:
    """Per node, the free quanta of each device, from ``Capacity.usage()`` data."""
    return [[max(0, d["capacity_quanta"] - d["used_quanta"]) for d in node.get("devices", [])]
            for node in usage or []]


def _take(free: list[list[int]], quanta: int, per_gpu: int) -> bool:
    """Place one request greedily on ``free`` (mutated); False if it does not fit now."""
    if quanta <= 0:
        return True
    if quanta <= per_gpu:
        best = None
        for ni, devs in enumerate(free):
            for di, f in enumerate(devs):
                if f >= quanta and (best is None or f < free[best[0]][best[1]]):
                    best = (ni, di)
        if best is None:
            return False
        free[best[0]][best[1]] -= quanta
        return True
    whole, part = divmod(quanta, per_gpu)
    for devs in free:
        empty = [i for i, f in enumerate(devs) if f >= per_gpu]
        if len(empty) < whole:
            continue
        rest = [i for i, f in enumerate(devs) if i not in empty[:whole] and f >= part] if part else []
        if part and not rest:
            continue
        for i in empty[:whole]:
            devs[i] -= per_gpu
        if part:
            i = min(rest, key=lambda k: devs[k])
            devs[i] -= part
        return True
    return False


def estimate_start(usage: list[dict], quanta_per_gpu: int, quanta: int, count: int = 1) -> int:
    """How many of ``count`` sessions of ``quanta`` each would find room now.

    A rough, optimistic picture for the form (the scheduler decides): it ignores
    the queue, CPU and memory, and places each session best-fit on a device.
    """
    free = free_quanta_by_device(usage)
    n = 0
    for _ in range(max(0, count)):
        if not _take(free, quanta, quanta_per_gpu):
            break
        n += 1
    return n


def capacity_note(capacity: dict, units: FgpuUnits, quanta: int, count: int = 1) -> tuple[str, str]:
    """(level, text) of the live note: what is free and whether this would start now or queue.

    ``level`` is a Bootstrap contextual class: "success", "warning" or "secondary".
    """
    usage = capacity.get("usage") or []
    total = sum(d["capacity_quanta"] for n in usage for d in n.get("devices", []))
    used = sum(d["used_quanta"] for n in usage for d in n.get("devices", []))
    free = total - used
    frees = [f for node in free_quanta_by_device(usage) for f in node]
    largest = max(frees, default=0)
    queue = int(capacity.get("queue_length") or 0)
    free_text = (f"Free now: {units.to_fgpu(free)} of {units.to_fgpu(total)} fGPU"
                 + (f" (largest piece on one GPU: {units.to_fgpu(largest)})" if len(frees) > 1 else "")
                 + ".")
    waiting = f" {queue} request{'s' if queue != 1 else ''} already waiting." if queue else " Nobody is waiting."
    if quanta and total and quanta > total:
        return "warning", f"{free_text}{waiting} {units.to_fgpu(quanta)} fGPU is more than this hub has."
    fit = estimate_start(usage, units.quanta_per_gpu, quanta, count)
    what = "session" if count == 1 else "sessions"
    if fit >= count:
        verdict = (f"This {what} would start at once." if count == 1
                   else f"All {count} {what} would start at once.")
        level = "success"
        if queue:
            verdict = verdict[:-1] + ", unless the queue policy makes it wait behind them."
            level = "secondary"
    elif fit == 0:
        verdict = (f"This {what} would wait in the queue" if count == 1 else f"These {count} {what} would wait in the queue") \
            + " until enough fGPU is free; it starts by itself."
        level = "warning"
    else:
        verdict = f"{fit} of {count} would start at once; {count - fit} would wait in the queue and start by themselves."
        level = "warning"
    return level, f"{free_text}{waiting} {verdict}"


# -- the form -----------------------------------------------------------------------------


def _image_options(visible, selected: str) -> tuple[str, str]:
    """(<option>s for the picker, ref of the default image)."""
    from . import catalog as catalog_mod

    groups = catalog_mod.group_by_framework([i for i in visible if i.kind == "kernel"])
    private = [i for i in visible if i.kind == "private"]
    refs = [i.ref for imgs in groups.values() for i in imgs] + [i.ref for i in private]
    default = selected if selected in refs else (refs[0] if refs else "")
    out = []
    for framework, images in groups.items():
        out.append(f'<optgroup label="{escape(framework or "Other")}">')
        for n, img in enumerate(images):
            py = f" · Python {img.python}" if img.python else ""
            label = img.display_name
            if img.version and img.version not in label.split():
                label += f" ({img.version})"
            newest = " · newest" if n == 0 and len(images) > 1 else ""
            sel = " selected" if img.ref == default else ""
            out.append(f'<option value="{escape(img.ref)}"{sel}>{escape(label + py + newest)}</option>')
        out.append("</optgroup>")
    if private:
        out.append('<optgroup label="My private images">')
        for img in private:
            when = f" · {img.created[:10]}" if img.created else ""
            src = f" (from {img.source_image})" if img.source_image else ""
            sel = " selected" if img.ref == default else ""
            out.append(f'<option value="{escape(img.ref)}"{sel}>{escape(img.ref + src + when)}</option>')
        out.append("</optgroup>")
    if not refs:
        out.append('<option value="" disabled selected>No kernel images are built yet: ask an admin to run bai-images build</option>')
    return "".join(out), default


def render_form(*, visible, user, capacity, units: FgpuUnits, limits: Limits, service_prefix: str,
                values: dict | None = None, simulated_note: bool = True) -> str:
    """The form's fields (the caller wraps them in a <form> with its submit button).

    ``values``: raw values to fill in again (after a refused post).
    ``simulated_note``: say "GPUs are simulated" (off where the page says it already).
    """
    values = values or {}
    image_opts, _ = _image_options(visible, str(values.get("image") or ""))
    device_mem = max((d["memory_bytes"] for n in capacity.get("nodes", []) for d in n.get("devices", [])), default=0)
    max_q = limits.max_quanta
    try:
        chosen_q = units.to_quanta(values["fgpu"], max_q) if values.get("fgpu") not in (None, "") else min(1, max_q)
    except ValueError:
        chosen_q = min(1, max_q)
    fgpu_choices = "".join(
        f'<option value="{escape(units.to_fgpu(q))}" data-quanta="{q}"{" selected" if q == chosen_q else ""}>'
        f'{escape(describe_share(q, units, device_mem))}</option>'
        for q in range(0, max_q + 1)
    )
    cpu = escape(str(values.get("cpu") or limits.default_cpu))
    mem = escape(str(values.get("memory") or limits.default_memory_gib))
    sessions = escape(str(values.get("sessions") or 1))
    typed = escape(str(values.get("image_name") or ""))
    try:
        count = max(1, min(int(str(values.get("sessions") or 1)), limits.max_sessions))
    except ValueError:
        count = 1
    level, note = capacity_note(capacity, units, chosen_q, count)
    simulated = (
        '<div class="alert alert-warning d-flex gap-2 align-items-start bai-simulated" role="note">'
        '<i class="fa fa-flask mt-1" aria-hidden="true"></i><div><strong>GPUs on this hub are simulated.</strong> '
        "fGPU shares are scheduled, queued and labelled as on real hardware, but no GPU is attached to the sessions."
        "</div></div>"
        if capacity.get("simulated") and simulated_note else ""
    )
    gpu_names = sorted({d["name"] for n in capacity.get("nodes", []) for d in n.get("devices", [])})
    gpu_text = f"One GPU here is a {escape(', '.join(gpu_names))} ({escape(format_bytes(device_mem))})." if gpu_names else ""
    data = {
        "capacityUrl": service_prefix.rstrip("/") + "/capacity.json",
        "quantaPerGpu": units.quanta_per_gpu,
        "fgpuStep": str(units.fgpu_step),
        "capacity": {"usage": capacity.get("usage") or [], "queue_length": capacity.get("queue_length") or 0},
    }
    data_json = json.dumps(data).replace("</", "<\\/")
    step = escape(str(units.fgpu_step))
    return f"""
<div class="bai-form" id="bai-form">
  <style>
    .bai-form .form-label {{ font-weight: 600; margin-bottom: .35rem; }}
    .bai-form .form-text {{ margin-top: .3rem; }}
    .bai-form .bai-section {{ border: 1px solid var(--bs-border-color); border-radius: .75rem; padding: 1rem 1.1rem; margin-bottom: 1rem; background: var(--bs-body-bg); }}
    .bai-form .bai-section-title {{ font-size: .78rem; text-transform: uppercase; letter-spacing: .06em; color: var(--bs-secondary-color); font-weight: 600; margin-bottom: .6rem; }}
    .bai-form .bai-live {{ display: flex; gap: .6rem; align-items: flex-start; margin-bottom: 0; }}
    .bai-form .bai-live small {{ display: block; opacity: .75; }}
  </style>
  {simulated}
  <div class="bai-section">
    <div class="bai-section-title">Kernel image</div>
    <label for="bai-image" class="form-label">Framework and version</label>
    <select id="bai-image" name="image" class="form-select">{image_opts}</select>
    <div class="form-text">Grouped by framework, newest version first. Your saved snapshots are under “My private images”.</div>
    <label for="bai-image-name" class="form-label mt-3">…or type an image name</label>
    <input id="bai-image-name" name="image_name" class="form-control" value="{typed}" maxlength="255"
           pattern="[^\\s]+" autocomplete="off" spellcheck="false" placeholder="e.g. bai-private/{escape(user)}:my-env">
    <div class="form-text">Overrides the picker. Only catalog images and your own private images can be launched.</div>
  </div>
  <div class="bai-section">
    <div class="bai-section-title">Resources</div>
    <label for="bai-fgpu" class="form-label">GPU share</label>
    <select id="bai-fgpu" name="fgpu" class="form-select">{fgpu_choices}</select>
    <div class="form-text">In steps of {step} fGPU, up to {escape(units.to_fgpu(max_q))} fGPU;
      {units.fgpu_per_gpu} fGPU = one whole GPU. {gpu_text}</div>
    <div class="row g-3 mt-1">
      <div class="col-sm-4">
        <label for="bai-cpu" class="form-label">CPU cores</label>
        <input id="bai-cpu" name="cpu" type="number" min="0.1" step="0.1" max="{escape(str(limits.max_cpu))}"
               value="{cpu}" class="form-control" required>
        <div class="form-text">0.1 to {escape(str(limits.max_cpu))}</div>
      </div>
      <div class="col-sm-4">
        <label for="bai-memory" class="form-label">Memory (GiB)</label>
        <input id="bai-memory" name="memory" type="number" min="0.25" step="0.25" max="{escape(str(limits.max_memory_gib))}"
               value="{mem}" class="form-control" required>
        <div class="form-text">0.25 to {escape(str(limits.max_memory_gib))} GiB</div>
      </div>
      <div class="col-sm-4">
        <label for="bai-sessions" class="form-label">Sessions</label>
        <input id="bai-sessions" name="sessions" type="number" min="1" step="1" max="{limits.max_sessions}"
               value="{sessions}" class="form-control" required>
        <div class="form-text">1 to {limits.max_sessions} of this shape</div>
      </div>
    </div>
  </div>
  <div id="bai-live" class="alert alert-{level} bai-live" role="status" aria-live="polite">
    <i class="fa fa-gauge-high mt-1" aria-hidden="true"></i>
    <div><span id="bai-live-text">{escape(note)}</span>
      <small id="bai-live-when">As of when this page was loaded.</small></div>
  </div>
  <script type="application/json" id="bai-form-data">{data_json}</script>
  <script>
  (function () {{
    var data = JSON.parse(document.getElementById("bai-form-data").textContent);
    var fgpu = document.getElementById("bai-fgpu"), sessions = document.getElementById("bai-sessions");
    var box = document.getElementById("bai-live"), text = document.getElementById("bai-live-text"),
        when = document.getElementById("bai-live-when");
    var cap = data.capacity, live = false;
    var STEP = parseFloat(data.fgpuStep), QPG = data.quantaPerGpu;
    function fmt(q) {{ return String(Math.round(q * STEP * 1000) / 1000); }}
    function take(free, q) {{
      if (q <= 0) return true;
      if (q <= QPG) {{
        var best = null;
        free.forEach(function (devs, ni) {{ devs.forEach(function (f, di) {{
          if (f >= q && (best === null || f < free[best[0]][best[1]])) best = [ni, di];
        }}); }});
        if (!best) return false;
        free[best[0]][best[1]] -= q; return true;
      }}
      var whole = Math.floor(q / QPG), part = q % QPG;
      for (var ni = 0; ni < free.length; ni++) {{
        var devs = free[ni], empty = [];
        devs.forEach(function (f, i) {{ if (f >= QPG) empty.push(i); }});
        if (empty.length < whole) continue;
        var used = empty.slice(0, whole), rest = [];
        if (part) devs.forEach(function (f, i) {{ if (used.indexOf(i) < 0 && f >= part) rest.push(i); }});
        if (part && !rest.length) continue;
        used.forEach(function (i) {{ devs[i] -= QPG; }});
        if (part) {{ rest.sort(function (a, b) {{ return devs[a] - devs[b]; }}); devs[rest[0]] -= part; }}
        return true;
      }}
      return false;
    }}
    function render() {{
      var q = parseInt(fgpu.options[fgpu.selectedIndex].getAttribute("data-quanta") || "0", 10);
      var n = parseInt(sessions.value, 10); if (!(n >= 1)) n = 1;
      var usage = cap.usage || [], total = 0, used = 0, frees = [];
      var free = usage.map(function (node) {{ return (node.devices || []).map(function (d) {{
        total += d.capacity_quanta; used += d.used_quanta;
        var f = Math.max(0, d.capacity_quanta - d.used_quanta); frees.push(f); return f; }}); }});
      var queue = cap.queue_length || 0;
      var msg = "Free now: " + fmt(total - used) + " of " + fmt(total) + " fGPU" +
        (frees.length > 1 ? " (largest piece on one GPU: " + fmt(Math.max.apply(null, frees)) + ")" : "") + ".";
      msg += queue ? " " + queue + " request" + (queue === 1 ? "" : "s") + " already waiting." : " Nobody is waiting.";
      var level, fit = 0, what = n === 1 ? "session" : "sessions";
      if (q && total && q > total) {{ level = "warning"; msg += " " + fmt(q) + " fGPU is more than this hub has."; }}
      else {{
        while (fit < n && take(free, q)) fit++;
        if (fit >= n) {{
          var v = n === 1 ? "This session would start at once." : "All " + n + " sessions would start at once.";
          level = "success";
          if (queue) {{ v = v.slice(0, -1) + ", unless the queue policy makes it wait behind them."; level = "secondary"; }}
          msg += " " + v;
        }} else if (fit === 0) {{
          level = "warning";
          msg += " " + (n === 1 ? "This session would" : "These " + n + " sessions would") +
            " wait in the queue until enough fGPU is free; it starts by itself.";
        }} else {{
          level = "warning";
          msg += " " + fit + " of " + n + " would start at once; " + (n - fit) + " would wait in the queue and start by themselves.";
        }}
      }}
      box.className = "alert alert-" + level + " bai-live";
      text.textContent = msg;
    }}
    function refresh() {{
      if (!window.fetch) return;
      fetch(data.capacityUrl, {{credentials: "same-origin", headers: {{"Accept": "application/json"}}}})
        .then(function (r) {{ if (!r.ok) throw new Error(r.status); return r.json(); }})
        .then(function (c) {{
          cap = c; live = true;
          when.textContent = "Live · updated " + new Date().toLocaleTimeString();
          render();
        }})
        .catch(function () {{
          if (!live) when.textContent = "As of when this page was loaded (live updates need the Sessions page opened once).";
        }});
    }}
    fgpu.addEventListener("change", render);
    sessions.addEventListener("input", render);
    render(); refresh(); setInterval(refresh, 5000);
  }})();
  </script>
</div>
"""


__all__ = ["render_form", "capacity_note", "estimate_start", "free_quanta_by_device", "GIB"]

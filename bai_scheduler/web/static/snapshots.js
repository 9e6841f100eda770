// The admin snapshot panel (templates/snapshots.html): fills its tables from the REST API.
"use strict";
(function () {
  const CFG = JSON.parse(document.getElementById("bai-snapshots-config").textContent);
  const API = CFG.prefix + "api/";
  let timer = null;
  const watched = new Map();  // job id -> session, for the banner of a snapshot started here

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("data-") || k === "type" || k === "placeholder" || k === "title" ||
               k === "aria-label" || k === "pattern" || k === "maxlength" || k === "role") e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return e;
  }
  const session = (u, s) => s ? u + "/" + s : u;
  function gib(bytes) { return (bytes / 2 ** 30).toFixed(2) + " GiB"; }
  function age(seconds) {
    if (seconds == null) return "";
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor(seconds % 3600 / 60) + " min";
    return Math.floor(seconds / 86400) + " d";
  }
  function when(iso) {
    if (!iso) return "";
    const d = new Date(typeof iso === "number" ? iso * 1000 : iso);
    return isNaN(d) ? String(iso) : d.toLocaleString();
  }

  async function call(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: { "X-XSRFToken": CFG.xsrf } };
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    const r = await fetch(API + path, opts);
    let data = {};
    try { data = await r.json(); } catch (e) { /* empty body */ }
    if (!r.ok) throw new Error(data.message || (r.status + " " + r.statusText));
    return data;
  }

  function flash(kind, text) {
    const f = document.getElementById("flash");
    f.className = "alert alert-" + kind;
    f.textContent = text;
  }

  function fill(tableId, rows, empty, cols) {
    const tbody = document.querySelector("#" + tableId + " tbody");
    tbody.replaceChildren(...(rows.length ? rows :
      [el("tr", {}, el("td", { colSpan: cols, class: "text-body-secondary" }, empty))]));
  }

  function sessionRow(s) {
    const input = el("input", { type: "text", class: "form-control form-control-sm bai-tag", placeholder: "tag, e.g. v1",
      "aria-label": "Tag for " + s.session, maxlength: "128", "data-role": "tag" });
    const button = el("button", { type: "submit", class: "btn btn-sm btn-primary", "data-role": "snapshot" }, "Snapshot");
    const form = el("form", { class: "d-flex gap-2 justify-content-end" }, input, button);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      button.disabled = true;
      try {
        const res = await call("POST", "snapshots", { user: s.user, server: s.server, tag: input.value.trim() });
        flash("info", "Snapshot of " + s.session + " started: " + res.job.ref + " (the session keeps running)");
        watched.set(res.job.id, s.session);
        input.value = "";
      } catch (e) {
        flash("danger", "Snapshot of " + s.session + " refused: " + e.message);
      } finally {
        button.disabled = false;
        refresh();
      }
    });
    return el("tr", { "data-session": s.session },
      el("td", {}, s.user), el("td", {}, s.server || "(default)"),
      el("td", { class: "bai-mono" }, s.image), el("td", {}, s.node), el("td", {}, s.fgpu),
      el("td", { title: when(s.started_at) }, age(s.age_s)), el("td", {}, form));
  }

  const BADGE = { queued: "secondary", committing: "warning", pushing: "info", done: "success", failed: "danger" };
  const WORKING = ["queued", "committing", "pushing"];
  function jobRow(j) {
    const state = el("td", { "data-role": "state" });
    const badge = el("span", { class: "badge text-bg-" + (BADGE[j.state] || "secondary") }, j.state);
    if (j.state === "committing" || j.state === "pushing") {
      state.append(el("span", { class: "spinner-border spinner-border-sm me-2", role: "status" }));
    }
    state.append(badge);
    if (j.state === "pushing" && j.progress) state.append(el("div", { class: "small", "data-role": "progress" }, j.progress));
    if (j.reason) state.append(el("div", { class: "small text-danger" }, j.reason));
    const t0 = j.started_at || j.created_at;
    const elapsed = Math.round(((j.finished_at || Date.now() / 1000) - t0));
    return el("tr", { "data-job": j.id, "data-state": j.state },
      el("td", {}, j.session), el("td", { class: "bai-mono" }, j.ref), state,
      el("td", {}, j.requested_by),
      el("td", { title: when(j.created_at) }, (j.finished_at ? "took " : "") + age(elapsed)));
  }

  function imageRow(i) {
    const del = el("button", { type: "button", class: "btn btn-sm btn-outline-danger", "data-role": "delete" }, "Delete");
    del.addEventListener("click", async () => {
      if (!window.confirm("Delete " + i.ref + " (owner " + i.owner + ")? Sessions can no longer be started from it.")) return;
      del.disabled = true;
      try {
        await call("DELETE", "images/" + encodeURIComponent(i.ref));
        flash("success", "Deleted " + i.ref);
      } catch (e) {
        flash("danger", "Could not delete " + i.ref + ": " + e.message);
      } finally {
        refresh();
      }
    });
    return el("tr", { "data-image": i.ref },
      el("td", { class: "bai-mono", title: i.id }, i.ref), el("td", {}, i.owner),
      el("td", { class: "bai-mono" }, i.source_image || ""), el("td", {}, i.source_session || ""),
      el("td", { class: "text-end" }, gib(i.size)), el("td", {}, when(i.created)),
      el("td", { class: "text-end" }, del));
  }

  async function refresh() {
    clearTimeout(timer);
    let busy = false;
    try {
      const data = await call("GET", "snapshots");
      // Keep what an admin is typing: only rebuild the sessions table when it changed.
      const sessKey = JSON.stringify(data.sessions.map(s => [s.session, s.image, s.node]));
      const tbody = document.querySelector("#sessions tbody");
      if (tbody.dataset.key !== sessKey || !document.activeElement || document.activeElement.dataset.role !== "tag") {
        fill("sessions", data.sessions.map(sessionRow), "No session is running.", 7);
        tbody.dataset.key = sessKey;
      }
      fill("jobs", data.jobs.map(jobRow), "No snapshot yet.", 5);
      for (const j of data.jobs) {  // the banner of a snapshot started here follows it to its end
        if (!watched.has(j.id) || (j.state !== "done" && j.state !== "failed")) continue;
        if (j.state === "done") {
          flash("success", "Snapshot of " + watched.get(j.id) + " finished: " + j.ref + " (took " +
                age(Math.round(j.finished_at - (j.started_at || j.created_at))) + "); its owner can launch it now.");
        } else {
          flash("danger", "Snapshot of " + watched.get(j.id) + " failed: " + (j.reason || "no reason given"));
        }
        watched.delete(j.id);
      }
      fill("images", data.images.map(imageRow), "No private image yet.", 7);
      const errors = document.getElementById("errors");
      errors.classList.toggle("d-none", !data.errors.length);
      errors.textContent = data.errors.join(" · ");
      busy = data.jobs.some(j => WORKING.includes(j.state));
      document.getElementById("refreshed").textContent =
        "Updated " + new Date().toLocaleTimeString() + (busy ? " · refreshing every 2 s while a snapshot is made" : "");
    } catch (e) {
      flash("danger", "Cannot load: " + e.message);
    }
    timer = setTimeout(refresh, busy ? 2000 : 10000);
  }
  refresh();
})();

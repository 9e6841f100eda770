// The session form's live note (bai_scheduler/contract/templates/session_form.html).
// The service computes the note (api/capacity's "note", with the real placement);
// this only asks for the chosen shape and shows the answer. On the hub's spawn page the
// browser may not have this service's login cookie yet: capacity.json then sends it
// through the hub's OAuth (no prompt), and the fetch follows those redirects back here.
(function () {
  "use strict";
  var form = document.getElementById("bai-form");
  if (!form || !window.fetch) return;
  var fgpu = document.getElementById("bai-fgpu"), sessions = document.getElementById("bai-sessions");
  // The team fields (absent when the hub has no groups and one pool): the note counts only the
  // nodes a session of that group in that pool could be placed on.
  var group = document.getElementById("bai-group"), pool = document.getElementById("bai-pool");
  var box = document.getElementById("bai-live"), text = document.getElementById("bai-live-text"),
      when = document.getElementById("bai-live-when");
  var lastUpdate = "", asked = 0;

  function show(level, message, note) {
    box.className = "alert alert-" + level + " bai-live";
    text.textContent = message;
    when.textContent = note;
  }

  // The count the note is about, or null when the field holds no allowed count: the note
  // then says what is allowed instead of counting past the most one launch may start.
  function count() {
    var raw = sessions.value.trim(), most = parseInt(sessions.max, 10) || 1;
    var n = /^[0-9]+$/.test(raw) ? parseInt(raw, 10) : NaN;
    return n >= 1 && n <= most ? n : null;
  }

  function refresh() {
    var ticket = ++asked, n = count();
    if (n === null) {
      show("warning", "Sessions must be a whole number from 1 to " + (parseInt(sessions.max, 10) || 1) +
           ": that is the most one launch starts.", "");
      return;
    }
    var opt = fgpu.options[fgpu.selectedIndex];
    var quanta = opt ? parseInt(opt.getAttribute("data-quanta") || "0", 10) : 0;
    var query = "?quanta=" + quanta + "&count=" + n +
        (group ? "&group=" + encodeURIComponent(group.value) : "") +
        (pool ? "&pool=" + encodeURIComponent(pool.value) : "");
    fetch(form.getAttribute("data-capacity-url") + query,
          {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (c) {
        if (ticket !== asked) return;  // a newer question is on its way
        lastUpdate = new Date().toLocaleTimeString();
        show(c.note.level, c.note.text, "Live · updated " + lastUpdate);
      })
      .catch(function (e) {
        if (ticket !== asked) return;
        when.textContent = (lastUpdate ? "As of " + lastUpdate : "As of when this page was loaded") +
          ": the scheduler did not answer (" + e.message + "). Reload the page to try again.";
      });
  }

  fgpu.addEventListener("change", refresh);
  sessions.addEventListener("input", refresh);
  [group, pool].forEach(function (field) { if (field) field.addEventListener("change", refresh); });
  refresh();
  setInterval(refresh, 5000);
})();

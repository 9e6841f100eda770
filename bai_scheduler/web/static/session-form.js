// The session form's live note (bai_scheduler/contract/templates/session_form.html).
// The service computes the note (api/capacity's "note", with the real placement);
// this only asks for the chosen shape and shows the answer.
(function () {
  "use strict";
  var form = document.getElementById("bai-form");
  if (!form || !window.fetch) return;
  var fgpu = document.getElementById("bai-fgpu"), sessions = document.getElementById("bai-sessions");
  var box = document.getElementById("bai-live"), text = document.getElementById("bai-live-text"),
      when = document.getElementById("bai-live-when");
  var live = false, asked = 0;

  function shape() {
    var opt = fgpu.options[fgpu.selectedIndex];
    var quanta = opt ? parseInt(opt.getAttribute("data-quanta") || "0", 10) : 0;
    var n = parseInt(sessions.value, 10), most = parseInt(sessions.max, 10) || 1;
    if (!(n >= 1)) n = 1;
    return "quanta=" + quanta + "&count=" + Math.min(n, most);
  }

  function refresh() {
    var ticket = ++asked;
    fetch(form.getAttribute("data-capacity-url") + "?" + shape(),
          {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (c) {
        if (ticket !== asked) return;  // a newer question is on its way
        live = true;
        box.className = "alert alert-" + c.note.level + " bai-live";
        text.textContent = c.note.text;
        when.textContent = "Live · updated " + new Date().toLocaleTimeString();
      })
      .catch(function () {
        if (!live) when.textContent = "As of when this page was loaded (live updates need the Sessions page opened once).";
      });
  }

  fgpu.addEventListener("change", refresh);
  sessions.addEventListener("input", refresh);
  refresh();
  setInterval(refresh, 5000);
})();

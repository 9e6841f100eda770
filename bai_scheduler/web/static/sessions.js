// Sessions page: replace the table, counters and capacity with fresh ones every few seconds.
// Without JavaScript the page reloads itself (<noscript> meta refresh).
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("bai-page").textContent);
  var updated = document.getElementById("bai-updated");
  var busy = false, failures = 0;

  function swap(id, html) {
    var el = document.getElementById(id);
    if (el && typeof html === "string" && el.innerHTML !== html) el.innerHTML = html;
  }

  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(cfg.url, {credentials: "same-origin", cache: "no-store",
                    headers: {"Accept": "application/json", "X-XSRFToken": cfg.xsrf}})
      .then(function (r) {
        if (r.status === 403) { window.location.reload(); throw new Error("logged out"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (d) {
        failures = 0;
        swap("bai-sessions", d.sessions_html);
        swap("bai-summary", d.summary_html);
        swap("bai-capacity", d.capacity_html);
        swap("bai-notices", d.notices_html);
        if (updated) updated.textContent = "Updated " + new Date().toLocaleTimeString() + " · refreshes every " + cfg.poll + " s";
      })
      .catch(function (e) {
        failures += 1;
        if (updated && failures > 1) updated.textContent = "Cannot reach the scheduler (" + e.message + "); retrying…";
      })
      .finally(function () { busy = false; });
  }

  // Stopping asks for confirmation; the form still posts without JavaScript.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.classList && form.classList.contains("bai-stop-form")) {
      var btn = form.querySelector("button");
      if (btn) { btn.disabled = true; btn.textContent = "Stopping…"; }
    }
  });

  setInterval(refresh, cfg.poll * 1000);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
})();

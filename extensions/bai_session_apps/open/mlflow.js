// Open this session's MLflow UI (mlflow.html): wait for it with a word on what happens, then land on
// the runs of the newest run's experiment (mlflow-defaults.js, loaded before, picks the view).
(function () {
  "use strict";
  var MLFLOW = "../mlflow/";  // this page is <server>/bai-session-apps/mlflow.html
  var started = Date.now();
  var elapsed = document.getElementById("elapsed");
  var timer = setInterval(function () {
    elapsed.textContent = Math.round((Date.now() - started) / 1000) + " s elapsed";
  }, 500);

  function fail(message) {
    clearInterval(timer);
    document.getElementById("title").textContent = "The MLflow UI did not open";
    var box = document.getElementById("error");
    box.hidden = false;
    box.textContent = message;
  }

  function api(path, body) {
    return fetch(MLFLOW + "ajax-api/2.0/mlflow/" + path, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)
    }).then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); });
  }

  // Where a logged training run shows: the runs of the experiment that holds the newest run.
  function newestExperiment() {
    return api("experiments/search", {max_results: 1000}).then(function (found) {
      var ids = (found.experiments || []).map(function (x) { return x.experiment_id; });
      if (!ids.length) return null;
      return api("runs/search", {experiment_ids: ids, max_results: 1, order_by: ["attributes.start_time DESC"]})
        .then(function (runs) { return runs.runs && runs.runs.length ? runs.runs[0].info.experiment_id : null; });
    });
  }

  // The proxy holds this request until MLflow answers (or shows why it could not start).
  fetch(MLFLOW, {credentials: "same-origin", cache: "no-store"})
    .then(function (r) {
      if (r.status === 503 && r.headers.get("X-BAI-MLflow-Error")) {
        window.location.replace(MLFLOW);  // the launcher's page with the reason and MLflow's log
        return;
      }
      if (!r.ok) throw new Error("the session answered HTTP " + r.status);
      document.getElementById("status").textContent = "MLflow is up; opening your newest run's experiment…";
      return newestExperiment().catch(function () { return null; }).then(function (id) {
        window.location.replace(MLFLOW + (id === null ? "#/experiments" : "#/experiments/" + encodeURIComponent(id)));
      });
    })
    .catch(function (e) {
      fail("MLflow did not answer (" + e.message + "). Reload this page to try again; if it keeps failing, " +
           "restart your session from the hub's home page.");
    });
})();

// MLflow UI defaults for a session, set only where the user has chosen nothing: the "Model
// training" view (MLflow 3 opens on its GenAI view, which does not list training runs) and its
// LLM assistant closed (it needs an LLM service). MLflow keeps these in its own localStorage
// keys ("<key>_v<version>"). Runs first in MLflow's page (bai_session_apps/mlflow_page.py adds it
// through the proxy, so a run link printed in a notebook gets it too) and in mlflow.html.
(function () {
  "use strict";
  var DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": true,
    "mlflow.assistant.panelOpen_v1": false
  };
  try {
    Object.keys(DEFAULTS).forEach(function (key) {
      if (window.localStorage.getItem(key) === null) window.localStorage.setItem(key, JSON.stringify(DEFAULTS[key]));
    });
  } catch (e) { /* storage off: MLflow uses its own defaults */ }
})();

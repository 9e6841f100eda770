"""MLflow UI and the full-window terminal opened from JupyterLab's launcher, in
Debian's chromium (Playwright, system browser), through a real hub.

A NativeAuthenticator login, a running session (0 fGPU), JupyterLab's
launcher -> "MLflow UI" and "Terminal (full window)" open in new tabs.
Screenshots: test-artifacts/mlflow-in-session.png (also
docs/screenshots/mlflow-in-session.png, shown in the README),
test-artifacts/terminal-in-session.png.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers import ARTIFACTS, KERNEL_IMAGE

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
DOCS_SHOT = ROOT / "docs" / "screenshots" / "mlflow-in-session.png"
PASSWORD = "apps-Test-pw-3141"
OPTIONS = {"image": KERNEL_IMAGE, "fgpu": "0", "cpu": "0.5", "memory": "1"}
SERVER = "lab"


@pytest.fixture(scope="module")
def session(hub):
    """A user with a NativeAuthenticator login and a running session."""
    from hub_config.bootstrap_admin import ensure_account

    name = f"appsbr{uuid.uuid4().hex[:4]}"
    token = hub.add_user(name)
    assert ensure_account(f"sqlite:///{hub.workdir}/var/jupyterhub.sqlite", name, PASSWORD)
    r = hub.start_server(name, SERVER, OPTIONS)
    assert r.status_code in (201, 202), r.text
    try:
        hub.wait_ready(name, SERVER, timeout=120)
        yield name, token
    finally:
        hub.stop_server(name, SERVER)
        hub.wait_gone(name, SERVER, timeout=90)


SEED_RUNS = """
import mlflow
mlflow.set_experiment("iris-logreg")
for lr, acc in ((0.01, 0.913), (0.1, 0.947), (1.0, 0.960)):
    with mlflow.start_run(run_name=f"lr={lr}"):
        mlflow.log_params({"C": lr, "max_iter": 200, "solver": "lbfgs"})
        for step in range(5):
            mlflow.log_metric("val_accuracy", acc - 0.1 / (step + 1), step=step)
        mlflow.log_metric("accuracy", acc)
print("EXPERIMENT=" + mlflow.get_experiment_by_name("iris-logreg").experiment_id)
"""


def log_runs(hub, name, token) -> str:
    """A few runs, as the seed's example logs them (the real MLflow client, through the hub)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"{hub.url}/user/{name}/{SERVER}/mlflow", MLFLOW_TRACKING_TOKEN=token,
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    out = subprocess.run([sys.executable, "-c", SEED_RUNS], env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("EXPERIMENT=")[1].split()[0]


def log_in(page, hub, name):
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("#login_submit")
    assert "/hub/login" not in page.url, page.content()[:2000]


def open_lab_launcher(page, hub, name):
    page.goto(f"{hub.url}/user/{name}/{SERVER}/lab", timeout=90_000)
    # the OAuth round trip ends in JupyterLab; its launcher shows our two apps
    page.wait_for_selector(".jp-Launcher", timeout=90_000)


def open_from_launcher(context, page, title):
    """Click a launcher card that opens a new browser tab; returns that tab.
    (A click while JupyterLab is still settling can go nowhere: try again.)"""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    card = page.locator(".jp-LauncherCard", has_text=title).first
    card.wait_for(timeout=30_000)
    page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=60_000)
    for attempt in range(3):
        try:
            with context.expect_page(timeout=15_000) as new:
                card.click()
            return new.value
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.wait_for_timeout(1000)


def test_mlflow_ui_and_terminal_open_from_the_jupyterlab_launcher(hub, browser, session):
    name, token = session
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    try:
        page = context.new_page()
        log_in(page, hub, name)
        open_lab_launcher(page, hub, name)
        page.screenshot(path=str(ARTIFACTS / "lab-launcher-with-apps.png"))

        # MLflow UI: a new tab at .../mlflow/ (MLflow starts on this first request)
        ml = open_from_launcher(context, page, "MLflow UI")
        ml.wait_for_load_state("domcontentloaded", timeout=120_000)
        assert ml.url.startswith(f"{hub.url}/user/{name}/{SERVER}/mlflow/"), ml.url
        ml.wait_for_function("document.title.includes('MLflow')", timeout=120_000)
        # the React app rendered (its JS and CSS loaded through the proxy)
        ml.get_by_text("Experiments", exact=False).first.wait_for(timeout=60_000)
        # (no "networkidle": the MLflow UI keeps polling its API)
        ml.wait_for_timeout(2500)
        assert "could not start" not in ml.content()
        ml.screenshot(path=str(ARTIFACTS / "mlflow-home-in-session.png"))

        # runs logged through the hub show up in the UI's runs table
        experiment = log_runs(hub, name, token)
        # the classic runs table (MLflow 3 opens experiments in its GenAI view by default)
        toggle = ml.get_by_text("Model training", exact=True)
        if toggle.count():
            toggle.first.click()
        ml.goto(f"{hub.url}/user/{name}/{SERVER}/mlflow/#/experiments/{experiment}/runs", timeout=60_000)
        try:
            for run in ("lr=0.01", "lr=0.1", "lr=1.0"):
                ml.get_by_text(run, exact=True).first.wait_for(timeout=60_000)
        except Exception:
            ml.screenshot(path=str(ARTIFACTS / "mlflow-runs-failure.png"))
            raise
        # side panels, tips and notices, if any, out of the picture
        for close in ("Got it", "Close", "Dismiss"):
            button = ml.get_by_role("button", name=close, exact=True)
            for i in reversed(range(button.count())):
                if button.nth(i).is_visible():
                    button.nth(i).click()
                    ml.wait_for_timeout(300)
        ml.wait_for_timeout(1500)
        assert "could not start" not in ml.content()
        ml.screenshot(path=str(ARTIFACTS / "mlflow-in-session.png"))
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / "mlflow-in-session.png", DOCS_SHOT)

        # Terminal (full window): a new tab, a shell in the container
        term = open_from_launcher(context, page, "Terminal (full window)")
        term.wait_for_load_state("domcontentloaded", timeout=60_000)
        assert term.url.startswith(f"{hub.url}/user/{name}/{SERVER}/terminal/"), term.url
        term.wait_for_selector(".xterm-screen", timeout=60_000)
        # wait for the prompt, then type like a user
        term.wait_for_function("document.querySelector('.xterm-rows') && "
                               "document.querySelector('.xterm-rows').innerText.includes('$')",
                               timeout=30_000)
        term.click(".xterm-screen")
        term.keyboard.type("echo hello-$((6*7)) from $(hostname -s) as $(id -un)\n")
        term.wait_for_function("document.querySelector('.xterm-rows').innerText.includes('hello-42 from')",
                               timeout=30_000)
        text = term.inner_text(".xterm-rows")
        assert "as jovyan" in text, text
        term.screenshot(path=str(ARTIFACTS / "terminal-in-session.png"))
    finally:
        context.close()

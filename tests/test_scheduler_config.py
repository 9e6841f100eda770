"""c.BaiScheduler: one session's limits (one source, old names still work), choices checked when
configured, and what the running service publishes (a real service process, tests/helpers/service.py)."""
from __future__ import annotations

import json
import re

import pytest
from traitlets import TraitError
from traitlets.config import Config

from bai_scheduler.app import BaiScheduler
from bai_scheduler.core.nodes import simulated_nodes
from helpers.hub import free_port
from helpers.service import PREFIX, standalone_service


@pytest.fixture
def warnings(capfd):
    """What the app logs (its logger writes to stderr and does not propagate)."""
    class Err:
        @property
        def text(self):
            return capfd.readouterr().err

    return Err()


def app(**sections) -> BaiScheduler:
    c = Config()
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(c, section), k, v)
    return BaiScheduler(config=c)


def test_the_old_spawner_names_still_set_the_limits_with_a_warning(warnings):
    a = app(BaiSpawner={"max_cpu": "8", "max_sessions_per_launch": 6, "max_memory_gib": "64"},
            BaiScheduler={"max_memory_gib": "32"})
    a.take_moved_spawner_options()
    assert (a.max_cpu, a.max_sessions_per_launch, a.max_memory_gib) == ("8", 6, "32")
    said = warnings.text
    assert "c.BaiSpawner.max_cpu is deprecated: set c.BaiScheduler.max_cpu instead" in said
    assert "c.BaiSpawner.max_memory_gib is deprecated and ignored: c.BaiScheduler.max_memory_gib is set" in said


def test_the_old_spawner_names_of_the_gpu_backend_set_it_for_every_node(warnings):
    node = {"name": "g1", "gpus": [{"uuid": "GPU-5d1c2b3a-0011-2233-4455-66778899aa00", "index": 0, "memory": "40GiB"}]}
    a = app(BaiSpawner={"gpu_backend": "mps", "mps_pipe_directory": "/run/mps"}, BaiScheduler={"nodes": [node]})
    a.take_moved_spawner_options()
    (g1,) = a.build_nodes()
    assert (g1.gpu.name, g1.gpu.mps_pipe_directory) == ("mps", "/run/mps")
    assert "c.BaiSpawner.gpu_backend is deprecated: set c.BaiScheduler.gpu_backend instead" in warnings.text
    set_here = app(BaiSpawner={"gpu_backend": "mps"}, BaiScheduler={"nodes": [node], "gpu_backend": "whole"})
    set_here.take_moved_spawner_options()
    assert set_here.build_nodes()[0].gpu.name == "whole"  # the scheduler's own option wins
    assert "c.BaiSpawner.gpu_backend is deprecated and ignored" in warnings.text


def test_max_launch_is_the_old_name_of_max_sessions_per_launch(warnings):
    a = app(BaiScheduler={"max_launch": 7})
    assert a.max_sessions_per_launch == 7
    assert "BaiScheduler.max_launch is deprecated, use BaiScheduler.max_sessions_per_launch" in warnings.text


def test_limits_have_one_default_each():
    a = app()
    a.node_list = simulated_nodes([{"name": "n", "gpus": 2, "gpu_memory": "8GiB"}], a.units)
    limits = a.session_limits()
    assert (limits.max_quanta, str(limits.max_cpu), str(limits.default_cpu), limits.max_sessions) == (8, "4", "1", 4)
    assert (str(limits.max_memory_gib), str(limits.default_memory_gib)) == ("16", "2")


def test_limits_and_choices_are_checked_at_start_up():
    a = app(BaiScheduler={"default_cpu": "6"})
    a.node_list = []
    with pytest.raises(ValueError, match=r"default_cpu \(6\) is above BaiScheduler.max_cpu \(4\)"):
        a.session_limits()
    for name, value in [("queue_order", "lifo"), ("queue_head", "jump"), ("span", "half"), ("strategy", "random"),
                        ("max_cpu", "-1"), ("max_memory_gib", "lots"), ("max_sessions_per_launch", 0),
                        ("private_image_repo", "Not A Repo"), ("gpu_backend", "cuda-magic")]:
        with pytest.raises((TraitError, ValueError)):
            app(BaiScheduler={name: value})
    assert app(BaiScheduler={"queue_order": "DRF"}).queue_order == "drf"
    assert app(BaiScheduler={"gpu_backend": "MPS"}).gpu_backend == "mps"


SERVICE = """
c = get_config()
c.BaiScheduler.db_url = "sqlite:///{tmp}/sched.sqlite"
c.BaiScheduler.nodes = [{{"name": "n", "docker_url": "tcp://127.0.0.1:{dead}", "gpus": 2, "gpu_memory": "8GiB"}}]
c.BaiRegistry.url = "http://127.0.0.1:{dead}"
c.BaiSpawner.max_cpu = "6"
c.BaiScheduler.max_sessions_per_launch = 3
c.JupyterHub.template_paths = [{templates!r}]
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from helpers import ROOT

    tmp = tmp_path_factory.mktemp("config-service")
    config = SERVICE.format(tmp=tmp, dead=free_port(), templates=str(ROOT / "hub_config" / "templates"))
    with standalone_service(tmp, config, "config-service.log") as (raw, token, hub, log):
        users = {"ann": hub.user("ann"), "boss": hub.user("boss", admin=True), "internal": token}

        def get(path, who="ann"):
            code, headers, body = raw.call("GET", PREFIX + path, token=users.get(who))
            return code, {k.lower(): v for k, v in headers.items()}, body.decode()

        def put(path, body):
            return raw.call("PUT", PREFIX + path, json.dumps(body).encode(), token=token)

        yield get, put, log


def test_api_capacity_publishes_the_limits_and_the_note(service):
    get, put, log = service
    code, _, body = get("api/capacity")
    cap = json.loads(body)
    assert cap["limits"] == {"max_quanta": 8, "max_cpu": "6", "max_memory_gib": "16", "default_cpu": "1",
                             "default_memory_gib": "2", "max_sessions": 3, "presets": [], "custom": True}
    assert cap["note"]["quanta"] == 1 and cap["note"]["count"] == 1 and cap["note"]["level"] == "success"
    assert "c.BaiSpawner.max_cpu is deprecated" in log.read_text()
    code, headers, body = get("capacity.json?quanta=4&count=3")
    assert code == 200 and headers["cache-control"] == "no-store"
    note = json.loads(body)["note"]
    assert note["level"] == "warning" and "2 of 3 would start at once" in note["text"]
    for bad in ("quanta=9", "quanta=-1", "quanta=1.5", "count=0", "count=4", "count=x"):
        code, headers, body = get(f"capacity.json?{bad}")
        assert code == 400 and "json" in headers["content-type"] and "whole number" in json.loads(body)["message"]


def test_capacity_json_sends_a_browser_without_the_services_cookie_through_the_hubs_login(service):
    """Issue 14 (5): the spawn form on the hub's page could not get the live note until the user
    had opened the sessions page once (which logs the browser in to this service)."""
    get, put, log = service
    code, headers, body = get("capacity.json?quanta=2&count=1", who=None)
    assert code == 302, body
    location = headers["location"]
    assert "/hub/api/oauth2/authorize?" in location and "state=" in location
    assert "oauth-state" in headers.get("set-cookie", "")  # where to come back to after the login
    code, headers, body = get("api/capacity", who=None)  # the REST API itself still answers 403 in JSON
    assert code == 403 and "json" in headers["content-type"]


def test_sessions_page_is_a_hub_page_with_the_form_or_what_is_missing(service):
    get, put, log = service
    code, headers, html = get("", "boss")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert 'id="bai-nav-snapshots"' in html and 'class="nav-link active" id="bai-nav-sessions"' in html
    assert "All sessions" in html and 'id="bai-capacity"' in html
    # The registry of this service is a closed port: the page says so instead of the form, and what to do.
    assert re.search(r"The image catalog is unavailable. The image registry at http://127.0.0.1:\d+ does not answer "
                     r"\(ConnectionError\); start it \(scripts/setup.sh starts the local one\)", html)
    code, headers, body = get("api/catalog")
    assert code == 503 and "does not answer" in json.loads(body)["message"]
    code, headers, body = get("sessions.json")
    data = json.loads(body)
    assert code == 200 and "No sessions yet" in data["sessions_html"] and data["capacity_html"] == ""
    code, headers, html = get("admin/snapshots")
    assert code == 403 and "Admins only" in html and headers["content-type"].startswith("text/html")
    code, headers, html = get("admin/snapshots", "boss")
    assert code == 200 and re.search(r'class="nav-link active" id="bai-nav-snapshots"', html)


def shipped_config(tmp_path, monkeypatch) -> Config:
    """hub_config/jupyterhub_config.py as scripts/run-hub loads it (no test overrides)."""
    from traitlets.config.loader import PyFileConfigLoader

    from helpers import ROOT

    monkeypatch.setenv("BAI_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("BAI_EXTRA_CONFIG", raising=False)
    return PyFileConfigLoader("jupyterhub_config.py", str(ROOT / "hub_config")).load_config()


@pytest.mark.docker
def test_the_shipped_config_limits_each_user_and_counts_the_engines_cpu_and_memory(tmp_path, monkeypatch):
    """Finding 1 of the adversarial review: with the defaults run-hub ships, one user could take
    the whole machine (no per-user limits, the local node's CPU and memory unlimited)."""
    import subprocess

    a = BaiScheduler(config=shipped_config(tmp_path, monkeypatch))
    limits = a.user_limits()
    assert 0 < limits.max_running <= 4 and 0 < limits.max_pending <= 4
    (node,) = a.build_nodes()
    ncpu, mem_total = subprocess.run(["docker", "info", "--format", "{{.NCPU}} {{.MemTotal}}"], capture_output=True,
                                     text=True, check=True).stdout.split()
    assert (node.cpu_millis, node.memory_bytes) == (int(ncpu) * 1000, int(mem_total))


def test_auto_cpu_and_memory_of_an_unreadable_engine_are_not_limited(warnings):
    a = app(BaiScheduler={"nodes": [{"name": "far", "docker_url": "tcp://127.0.0.1:1", "gpus": 1,
                                     "gpu_memory": "8GiB", "cpu": "auto", "memory": "auto"}]})
    (node,) = a.build_nodes()
    assert (node.cpu_millis, node.memory_bytes) == (0, 0)
    assert "Node far: its engine's CPUs and memory could not be read" in warnings.text

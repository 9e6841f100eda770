"""Pure helpers behind the pages: sessions rows, capacity rows, the form and its live note."""
import re
from decimal import Decimal
from pathlib import Path

import pytest
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PrefixLoader

from bai_scheduler.pages import ago, node_rows, session_rows, summarize
from bai_scheduler.units import GIB, FgpuUnits
from bai_spawner.catalog import CatalogImage
from bai_spawner.form import Limits
from bai_spawner.formpage import capacity_note, estimate_start, render_form

ROOT = Path(__file__).resolve().parent.parent
U = FgpuUnits(2, Decimal("0.5"))  # 4 quanta per GPU


def status(user, server, state, quanta=2, node="local", position=None, reason=None, **kw):
    s = {"id": f"id-{user}-{server}", "user": user, "server": server, "state": state, "image": "bai/sklearn:1.6.1",
         "quanta": quanta, "fgpu": U.to_fgpu(quanta), "cpu_millis": 500, "memory_bytes": GIB,
         "submitted_at": 1000.0, "admitted_at": 1010.0 if state == "RUNNING" else None}
    if state == "PENDING":
        s.update(position=position, reason=reason)
    else:
        s["placement"] = {"node": node, "simulated": True,
                          "shares": [{"device": "sim-0", "quanta": quanta, "index": 0}]}
    s.update(kw)
    return s


def hub_user(name, **servers):
    return {"name": name, "servers": {k: {"name": k, **v} for k, v in servers.items()}}


def usage(*free_used, cap=4):
    return [{"name": "local", "devices": [
        {"uuid": f"g{i}", "index": i, "name": "Sim", "memory_bytes": 8 * GIB, "capacity_quanta": cap,
         "used_quanta": used, "mig_profile": None} for i, used in enumerate(free_used)],
        "capacity_quanta": cap * len(free_used), "used_quanta": sum(free_used),
        "cpu_millis_total": 0, "cpu_millis_used": 1500, "memory_bytes_total": 0, "memory_bytes_used": 3 * GIB,
        "simulated": True}]


# -- sessions rows ---------------------------------------------------------------------------

def test_rows_join_scheduler_and_hub_states():
    statuses = [
        status("ann", "session-1", "RUNNING"),
        status("ann", "session-2", "RUNNING"),
        status("ann", "session-3", "PENDING", position=1, reason="Waiting for 1 fGPU: 1st in queue"),
    ]
    hub = [hub_user("ann",
                    **{"session-1": {"ready": True, "pending": None, "url": "/user/ann/session-1/",
                                     "started": "2024-01-01T00:00:00Z"},
                       "session-2": {"ready": False, "pending": "spawn", "url": "/user/ann/session-2/"},
                       "session-3": {"ready": False, "pending": "spawn", "url": "/user/ann/session-3/"}})]
    rows = session_rows(statuses, hub, units=U, now=2000.0)
    by = {r["server"]: r for r in rows}
    assert [r["state"] for r in rows] == ["RUNNING", "STARTING", "PENDING"]
    assert by["session-1"]["url"] == "/user/ann/session-1/"
    assert by["session-2"]["url"] is None  # not ready: nothing to open yet
    assert by["session-3"]["position"] == 1
    assert "1st in queue" in by["session-3"]["detail"]
    assert by["session-1"]["node"] == "local" and by["session-1"]["gpus"] == "GPU 0 × 1"
    assert by["session-1"]["fgpu"] == "1" and by["session-1"]["cpu"] == "0.5" and by["session-1"]["memory"] == "1 GiB"
    assert by["session-2"]["detail"].startswith("Admitted on local")
    assert all(r["can_stop"] for r in rows)


def test_rows_hub_only_scheduler_only_and_stopping():
    statuses = [status("bob", "orphan", "PENDING", position=2, reason="Waiting for 2 fGPU: 2nd in queue"),
                status("bob", "going", "RUNNING")]
    hub = [hub_user("bob",
                    fresh={"ready": False, "pending": "spawn", "user_options": {"image": "x:1", "quanta": 3}},
                    going={"ready": False, "pending": "stop"},
                    stopped={"ready": False, "pending": None})]
    rows = session_rows(statuses, hub, units=U, now=2000.0)
    by = {r["server"]: r for r in rows}
    assert set(by) == {"orphan", "going", "fresh"}  # a stopped server the scheduler forgot is not listed
    assert by["orphan"]["state"] == "PENDING" and not by["orphan"]["known_to_hub"]
    assert by["going"]["state"] == "STOPPING" and not by["going"]["can_stop"]
    assert by["fresh"]["state"] == "STARTING" and by["fresh"]["fgpu"] == "1.5" and by["fresh"]["image"] == "x:1"
    assert by["fresh"]["detail"] == "Asking the scheduler for a place"


def test_rows_show_stopping_attempts_with_the_engines_message():
    failed = status("eve", "a", "STOPPING", id="old-attempt", stop_error="APIError: 500 Server Error")
    rows = session_rows([failed], [], units=U, now=2000.0)
    (row,) = rows
    assert row["state"] == "STOPPING" and not row["can_stop"] and row["request_id"] == "old-attempt"
    assert row["detail"].startswith("Stopping failed: APIError: 500 Server Error.") and "share stays held" in row["detail"]
    # The same server started again meanwhile: the old attempt keeps a row of its own.
    rows = session_rows([failed, status("eve", "a", "PENDING", position=1)], [], units=U, now=2000.0)
    assert sorted((r["server"], r["state"]) for r in rows) == [("a", "PENDING"), ("a", "STOPPING")]


def test_rows_sort_running_first_then_queue_position_and_default_server_name():
    statuses = [status("c", "b", "PENDING", position=2), status("c", "a", "PENDING", position=1),
                status("c", "", "RUNNING")]
    rows = session_rows(statuses, [hub_user("c", **{"": {"ready": True, "url": "/user/c/"}})], units=U)
    assert [(r["server"], r["state"]) for r in rows] == [("", "RUNNING"), ("a", "PENDING"), ("b", "PENDING")]
    assert rows[0]["name"] == "default"


def test_summary_counts_and_fgpu_held():
    rows = session_rows([status("d", "1", "RUNNING", quanta=2), status("d", "2", "RUNNING", quanta=1),
                         status("d", "3", "PENDING", position=1)],
                        [hub_user("d", **{"1": {"ready": True}, "2": {"ready": False, "pending": "spawn"}})], units=U)
    s = summarize(rows)
    assert (s["RUNNING"], s["STARTING"], s["PENDING"], s["total"]) == (1, 1, 1, 3)
    assert s["fgpu_held"] == "1.5"
    assert summarize([])["fgpu_held"] == "0"


@pytest.mark.parametrize("seconds, text", [(None, ""), (0, "just now"), (42, "42 s ago"), (300, "5 min ago"),
                                           (7200, "2 h ago"), (3 * 86400, "3 d ago")])
def test_ago(seconds, text):
    assert ago(seconds) == text


# -- capacity rows ---------------------------------------------------------------------------

def test_node_rows_fgpu_memory_and_live_stats():
    snap = usage(3, 0)
    snap[0]["devices"][1]["mig_profile"] = "1g.10gb"
    rows = node_rows(snap, U, live={"g0": {"memory_used": 2 * GIB, "memory_total": 8 * GIB, "utilization": 37}})
    n = rows[0]
    assert (n["used"], n["total"], n["percent"]) == ("1.5", "4", 38)
    g0, g1 = n["devices"]
    assert (g0["used"], g0["total"], g0["free"], g0["percent"]) == ("1.5", "2", "0.5", 75)
    assert g0["memory_granted"] == "6 GiB" and g0["memory_total"] == "8 GiB"
    assert g0["live"] == {"memory": "2 GiB of 8 GiB", "memory_percent": 25, "utilization": 37}
    assert g1["live"] is None and g1["label"] == "GPU 1 · 1g.10gb"
    assert n["cpu"] == "1.5 CPU" and n["memory"] == "3 GiB" and not n["limited"]


def test_node_rows_show_an_overcommit():
    snap = usage(4, 0)
    snap[0]["devices"][0].update(used_quanta=6, overcommitted_quanta=2)
    g0, g1 = node_rows(snap, U)[0]["devices"]
    assert (g0["overcommitted"], g0["free"], g0["percent"]) == ("1", "0", 100)
    assert g1["overcommitted"] == ""


# -- the form's live note ------------------------------------------------------------------------

def test_estimate_start_places_best_fit_and_counts_sessions():
    assert estimate_start(usage(0), 4, 2, 3) == 2     # 2 fGPU cluster, 3 × 1 fGPU: two start
    assert estimate_start(usage(2), 4, 2, 3) == 1
    assert estimate_start(usage(3, 1), 4, 2, 2) == 1   # 0.5 + 1.5 free: one 1-fGPU session fits
    assert estimate_start(usage(0, 0), 4, 6, 1) == 1   # 1.5 GPU across two empty devices
    assert estimate_start(usage(0, 1), 4, 6, 1) == 1   # whole + half on the other
    assert estimate_start(usage(1, 1), 4, 6, 1) == 0   # no whole GPU free
    assert estimate_start(usage(4), 4, 0, 5) == 5      # CPU-only sessions
    assert estimate_start([], 4, 1, 1) == 0


def test_capacity_note_levels():
    cap = {"usage": usage(0), "queue_length": 0}
    level, text = capacity_note(cap, U, 2, 1)
    assert level == "success" and "Free now: 2 of 2 fGPU" in text and "start at once" in text
    level, text = capacity_note(cap, U, 2, 3)
    assert level == "warning" and "2 of 3 would start at once; 1 would wait" in text
    level, text = capacity_note({"usage": usage(4), "queue_length": 2}, U, 1, 1)
    assert level == "warning" and "2 requests already waiting" in text and "wait in the queue" in text
    level, text = capacity_note({"usage": usage(0), "queue_length": 1}, U, 1, 1)
    assert level == "secondary" and "queue policy" in text
    level, text = capacity_note(cap, U, 8, 1)
    assert level == "warning" and "more than this hub has" in text


# -- the form ---------------------------------------------------------------------------------------

def image(ref, framework, version, python="3.11", kind="kernel", owner=None, display=None):
    return CatalogImage(ref=ref, framework=framework, version=version, python=python, kind=kind, owner=owner,
                        display_name=display or f"{framework} {version}", created="2025-01-02T03:04:05")


CAPACITY = {"nodes": [{"name": "local", "simulated": True, "devices": [
    {"uuid": "g0", "index": 0, "name": "Simulated GPU (8 GiB)", "memory_bytes": 8 * GIB, "sm_count": 108, "quanta": 4}]}],
    "usage": usage(0), "queue_length": 0, "simulated": True, "fgpu_per_gpu": 2, "fgpu_step": "0.5", "quanta_per_gpu": 4}
IMAGES = [image("bai/sklearn:1.5.2", "scikit-learn", "1.5.2"), image("bai/sklearn:1.6.1", "scikit-learn", "1.6.1"),
          image("bai/pytorch:2.5", "PyTorch", "2.5", python="3.12"),
          image("bai-private/ann:exp", "scikit-learn", "1.6.1", kind="private", owner="ann")]


def form(**kw):
    from bai_spawner.catalog import build_catalog  # noqa: F401  (same module the spawner uses)

    args = dict(visible=IMAGES, user="ann", capacity=CAPACITY, units=U, limits=Limits(max_quanta=4, max_sessions=4),
                service_prefix="/services/bai-scheduler/")
    args.update(kw)
    return render_form(**args)


def test_form_groups_images_newest_first_with_python_and_private_group():
    html = form()
    groups = re.findall(r'<optgroup label="([^"]+)">', html)
    assert groups == ["PyTorch", "scikit-learn", "My private images"]
    sk = html.index('label="scikit-learn"')
    assert html.index("bai/sklearn:1.6.1", sk) < html.index("bai/sklearn:1.5.2", sk)
    assert "scikit-learn 1.6.1 · Python 3.11 · newest" in html
    shortname = form(visible=[image("bai/sklearn:1.6.1", "scikit-learn", "1.6.1", display="scikit-learn 1.6")])
    assert "scikit-learn 1.6 (1.6.1) · Python 3.11" in shortname
    assert 'value="bai-private/ann:exp"' in html
    assert 'name="image_name"' in html


def test_form_fgpu_steps_mean_memory_and_sms_and_limits():
    html = form()
    opts = re.findall(r'<option value="([^"]+)" data-quanta="(\d+)"[^>]*>([^<]+)</option>', html)
    assert [o[0] for o in opts] == ["0", "0.5", "1", "1.5", "2"]
    assert "0.5 fGPU = 2 GiB GPU memory, 25% of SMs" in html
    assert "2 fGPU = 1 whole GPU" in html
    assert re.search(r'id="bai-cpu" name="cpu" type="number" min="0.1" step="0.1" max="4"', html)
    assert re.search(r'id="bai-sessions" name="sessions" type="number" min="1" step="1" max="4"', html)
    assert "GPUs on this hub are simulated" in html
    assert "/services/bai-scheduler/capacity.json" in html
    assert "This session would start at once" in html  # the no-JS note


def test_form_keeps_posted_values_and_escapes_them():
    html = form(values={"fgpu": "1.5", "cpu": "2", "memory": "3", "sessions": "3", "image_name": '"><script>x</script>'})
    assert re.search(r'<option value="1.5" data-quanta="3" selected>', html)
    assert 'value="&quot;&gt;&lt;script&gt;x&lt;/script&gt;"' in html and "<script>x</script>" not in html
    assert 'value="3" class="form-control"' in html
    no_sim = form(capacity={**CAPACITY, "simulated": False})
    assert "simulated" not in no_sim.split("<script")[0].lower().replace("simulated gpu (8 gib)", "")


def test_form_without_images_says_what_to_do():
    assert "bai-images build" in form(visible=[])
    assert "simulated" not in form(simulated_note=False).split("<script")[0].replace("Simulated GPU (8 GiB)", "")


# -- hub templates: they compile, extend JupyterHub's, keep NativeAuthenticator's features ------------

def jinja_env():
    import jupyterhub
    base = Path(jupyterhub.__file__).resolve().parents[4] / "share" / "jupyterhub" / "templates"
    if not base.exists():
        from jupyterhub.app import JupyterHub
        base = Path(JupyterHub()._template_paths_default()[0])
    here = ROOT / "hub_config" / "templates"
    return Environment(loader=ChoiceLoader([PrefixLoader({"templates": FileSystemLoader([str(base)])}, "/"),
                                            FileSystemLoader([str(here), str(base)])]), autoescape=True)


def render_login(**kw):
    ctx = dict(base_url="/hub/", prefix="/", static_url=lambda p, **k: "/hub/static/" + p, login_url="/hub/login",
               logout_url="/hub/logout", authenticator_login_url="/hub/login?next=", xsrf="tok", user=None,
               services=[], parsed_scopes=set(), next="", username="")
    ctx.update(kw)
    return jinja_env().get_template("native-login.html").render(**ctx)


def test_native_login_is_branded_and_keeps_signup_and_2fa():
    html = render_login(enable_signup=True, two_factor_auth=True, login_error="Invalid username or password.")
    assert "BAI Hub" in html and 'class="bai-logo"' in html
    assert 'href="/hub/signup"' in html and 'name="2fa"' in html
    assert "Invalid username or password." in html
    assert 'name="_xsrf" value="tok"' in html and 'name="password"' in html
    plain = render_login(enable_signup=False, two_factor_auth=False)
    assert "/hub/signup" not in plain and 'name="2fa"' not in plain
    assert "password" not in plain.lower().split("forgot your password")[0].split("<form")[0].replace("password_input", "")


def test_login_page_never_shows_the_admin_password(tmp_path):
    html = render_login(enable_signup=True, two_factor_auth=False)
    assert "admin-password" not in html and "token_urlsafe" not in html


def test_page_nav_has_sessions_and_admin_snapshots():
    class User:
        name = "ann"
        admin = False
        json_escaped_name = "ann"
        spawner = type("Spawner", (), {"options_form": None})()

    env = jinja_env()
    ctx = dict(base_url="/hub/", prefix="/", static_url=lambda p, **k: "/hub/static/" + p, login_url="/hub/login",
               logout_url="/hub/logout", xsrf="tok", services=[], parsed_scopes=set(),
               bai_scheduler_prefix="/services/bai-scheduler/")
    html = env.get_template("page.html").render(user=User(), **ctx)
    assert 'href="/services/bai-scheduler/">Sessions' in html and "Snapshots" not in html
    assert "/hub/change-password" in html and "/hub/authorize" not in html
    User.admin = True
    html = env.get_template("page.html").render(user=User(), **ctx)
    assert 'href="/services/bai-scheduler/admin/snapshots"' in html and "/hub/authorize" in html
    html = env.get_template("page.html").render(user=User(), bai_native_auth=False, **ctx)
    assert "change-password" not in html


def test_service_logo_is_the_hub_logo():
    assert (ROOT / "hub_config/templates/bai-logo.svg").read_bytes() == (ROOT / "bai_scheduler/static/bai-logo.svg").read_bytes()

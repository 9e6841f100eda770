"""Pure helpers behind the pages: sessions rows, capacity rows, the session form, and the templates."""
import dataclasses
import re
from decimal import Decimal
from pathlib import Path

import pytest
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PrefixLoader

from bai_scheduler.contract.catalog import CatalogImage
from bai_scheduler.contract.form import chosen_shape, form_context, home_note, volumes_shared
from bai_scheduler.contract.options import Limits
from bai_scheduler.core.units import GIB, FgpuUnits
from bai_scheduler.web.pages import Notices, ago, node_rows, session_rows, summarize
from bai_spawner.spawner import TEMPLATES as SPAWN_FORM

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


def test_rows_show_images_by_the_names_users_see_and_the_reference_that_runs():
    statuses = [dict(status("e", "s", "RUNNING"), image="127.0.0.1:5000/bai/sklearn:1.6.1")]
    hub = [hub_user("e", s={"ready": True}, t={"ready": False, "pending": "spawn",
                                                "user_options": {"image": "127.0.0.1:5000/bai-private/e:v1"}})]
    rows = {r["server"]: r for r in session_rows(statuses, hub, units=U, registry_host="127.0.0.1:5000")}
    assert (rows["s"]["image"], rows["t"]["image"]) == ("bai/sklearn:1.6.1", "bai-private/e:v1")
    assert (rows["s"]["reference"], rows["t"]["reference"]) == ("127.0.0.1:5000/bai/sklearn:1.6.1",
                                                                "127.0.0.1:5000/bai-private/e:v1")
    # An image of another registry (one configured before) is shown as it is.
    other = session_rows([dict(status("e", "s", "RUNNING"), image="reg.example.com/bai/x:1")], [], units=U,
                         registry_host="127.0.0.1:5000")
    assert other[0]["image"] == other[0]["reference"] == "reg.example.com/bai/x:1"


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
LIMITS = Limits(max_quanta=4, max_cpu=Decimal(4), max_memory_gib=Decimal(16), default_cpu=Decimal(1),
                default_memory_gib=Decimal(2), max_sessions=4, presets=(), custom=True)
NOTE = {"level": "success", "text": "Free now: 2 of 2 fGPU. Nobody is waiting. This session would start at once."}


def form(simulated=True, **kw):
    """The spawn form as BaiSpawner.get_options_form renders it."""
    args = dict(visible=IMAGES, user="ann", capacity=CAPACITY, units=U, limits=LIMITS, note=NOTE,
                capacity_url="/services/bai-scheduler/capacity.json", static_url="/services/bai-scheduler/static/")
    args.update(kw)
    return SPAWN_FORM.get_template("options_form.html").render(simulated=simulated, **form_context(**args))


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
    assert 'name="image_name"' in html and 'placeholder="e.g. bai-private/ann:my-env"' in html
    assert re.search(r'<option value="bai/pytorch:2.5" selected>', html)  # the first image is chosen


def test_form_says_where_files_live_when_nodes_do_not_share_them():
    assert home_note(False, ["local"]) == "" and home_note(True, ["a", "b"]) == ""
    note = home_note(False, ["local", "node2"])
    assert note.startswith("Your home folder /home/jovyan is kept on each node separately (local, node2)")
    html = form(home_note=note)
    assert 'id="bai-home-note"' in html and "kept on each node separately" in html
    assert 'id="bai-home-note"' not in form()
    assert volumes_shared(None, "local", {}) is False and volumes_shared(None, "local", {"type": "nfs"}) is True
    assert volumes_shared(None, "rexray/efs", {}) is True and volumes_shared(False, "local", {"type": "nfs"}) is False


def test_form_fgpu_steps_mean_memory_and_sms_and_limits():
    html = form()
    opts = re.findall(r'<option value="([^"]+)" data-quanta="(\d+)"[^>]*>([^<]+)</option>', html)
    assert [o[0] for o in opts] == ["0", "0.5", "1", "1.5", "2"]
    assert "0.5 fGPU = 2 GiB GPU memory, 25% of SMs" in html
    assert "2 fGPU = 1 whole GPU" in html
    assert re.search(r'id="bai-cpu" name="cpu" type="number" min="0.1" step="0.1" max="4"', html)
    assert re.search(r'id="bai-sessions" name="sessions" type="number" min="1" step="1" max="4"', html)
    assert "GPUs on this hub are simulated" in html
    assert 'data-capacity-url="/services/bai-scheduler/capacity.json"' in html
    assert '<script src="/services/bai-scheduler/static/session-form.js"></script>' in html
    assert NOTE["text"] in html and 'class="alert alert-success bai-live"' in html  # the no-JS note


def test_form_names_each_gpu_model_once_with_its_memory():
    """Issue 14 (5): "One GPU here is a Simulated GPU (8 GiB) (8 GiB)"."""
    assert "One GPU here is a Simulated GPU (8 GiB)." in form()
    assert "(8 GiB) (8 GiB)" not in form()
    a100 = {"uuid": "a", "index": 0, "name": "NVIDIA A100", "memory_bytes": 80 * GIB, "sm_count": 108, "quanta": 4}
    t4 = {"uuid": "t", "index": 1, "name": "Tesla T4", "memory_bytes": 16 * GIB, "sm_count": 40, "quanta": 4}
    two = {**CAPACITY, "nodes": [{"name": "n", "simulated": False, "devices": [t4, a100, {**a100, "uuid": "b"}]}]}
    assert "GPUs here: NVIDIA A100 (80 GiB), Tesla T4 (16 GiB)." in form(capacity=two)


def test_form_keeps_posted_values_and_escapes_them():
    html = form(values={"fgpu": "1.5", "cpu": "2", "memory": "3", "sessions": "3", "image_name": '"><script>x</script>'})
    assert re.search(r'<option value="1.5" data-quanta="3" selected>', html)
    assert 'value="&#34;&gt;&lt;script&gt;x&lt;/script&gt;"' in html and "<script>x</script>" not in html
    assert 'value="3" class="form-control"' in html
    assert "simulated" not in form(simulated=False).lower().replace("simulated gpu (8 gib)", "")


def test_form_chosen_shape_is_what_the_note_is_about():
    assert chosen_shape({}, U, LIMITS) == (1, 1)
    assert chosen_shape({"fgpu": "1.5", "sessions": "3"}, U, LIMITS) == (3, 3)
    assert chosen_shape({"fgpu": "0.3", "sessions": "99"}, U, LIMITS) == (1, 4)  # unparsable: defaults, capped
    assert chosen_shape({}, U, dataclasses.replace(LIMITS, max_quanta=0)) == (0, 1)  # a hub without GPUs


def test_form_says_mps_limits_hold_per_process():
    mps_node = {**CAPACITY["nodes"][0], "name": "gpu7", "simulated": False, "gpu_backend": "mps"}
    html = form(capacity={**CAPACITY, "simulated": False, "nodes": [mps_node]})
    assert "On gpu7 (CUDA MPS) the memory and SM limits of a share hold per process" in html
    assert "per process" not in form()  # simulated or HAMi: nothing to add
    assert "per process" not in form(capacity={**CAPACITY, "nodes": [{**mps_node, "simulated": True}]})


def test_form_without_images_says_what_to_do():
    """Issue 14 (5): advice only admins can follow goes to admins."""
    assert "ask an admin to build them" in form(visible=[]) and "bai-images" not in form(visible=[])
    assert "run bai-images build on the hub's host" in form(visible=[], admin=True)


def test_form_says_when_the_scheduler_is_unreachable():
    html = SPAWN_FORM.get_template("options_form.html").render(error="The BAI scheduler service is unreachable (<x>).")
    assert "unreachable (&lt;x&gt;)" in html and 'id="bai-form"' not in html


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


# -- the service's pages: its templates extend the hub's page.html ------------------------------------

def service_page(name, who, **ns):
    from bai_scheduler.web.base import page_namespace, template_env

    env = template_env([str(ROOT / "hub_config" / "templates")])
    base = page_namespace(hub_base="/", prefix="/services/bai-scheduler/", who=who, xsrf_token="tok",
                          xsrf_form_html='<input type="hidden" name="_xsrf" value="tok">',
                          static_url=lambda p: "/services/bai-scheduler/static/" + p, simulated=True)
    return env.get_template(name).render(**{**base, **ns})


def test_sessions_page_wears_the_hubs_nav_and_brand_with_the_form():
    boss = {"name": "boss", "admin": True, "internal": False}
    form_ns = form_context(visible=IMAGES, user="boss", capacity=CAPACITY, units=U, limits=LIMITS, note=NOTE,
                           capacity_url="/services/bai-scheduler/capacity.json",
                           static_url="/services/bai-scheduler/static/")
    html = service_page("sessions.html", boss, rows=[], summary=summarize([]), nodes=[], notices=[], poll=2,
                        error=None, bai_active="sessions", **form_ns)
    assert 'class="nav-link active" id="bai-nav-sessions"' in html
    assert 'id="bai-nav-snapshots"' in html  # the admin's link, so the form's values did not hide the user
    assert '<span class="me-1">boss</span>' in html and "BAI Hub" in html and "bai-logo" in html
    assert 'href="/services/bai-scheduler/static/bai.css"' in html
    assert 'name="_xsrf" value="tok"' in html and 'id="bai-new-form"' in html and 'id="bai-form"' in html
    assert "No sessions yet" in html and "GPUs on this hub are simulated" in html
    assert html.count('id="bai-live"') == 1


def test_sessions_page_ids_are_unique():
    """Issue 14 (4): the sessions list and the form's Sessions field were both id="bai-sessions",
    so the form's script read the list's element and the live note ignored the Sessions count."""
    ann = {"name": "ann", "admin": False, "internal": False}
    form_ns = form_context(visible=IMAGES, user="ann", capacity=CAPACITY, units=U, limits=LIMITS, note=NOTE,
                           capacity_url="/services/bai-scheduler/capacity.json",
                           static_url="/services/bai-scheduler/static/")
    rows = session_rows([status("ann", "s1", "RUNNING"), status("ann", "s2", "PENDING", position=1, reason="x")],
                        [hub_user("ann", s1={"ready": True, "pending": None, "url": "/user/ann/s1/"})], units=U)
    html = service_page("sessions.html", ann, rows=rows, summary=summarize(rows), nodes=[],
                        notices=[{"level": "info", "text": "Stopping s1."}], poll=2, error="bad", **form_ns)
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert 'id="bai-sessions" name="sessions"' in html  # the form's field keeps the id its script reads


def test_service_error_page_and_snapshot_panel():
    ann = {"name": "ann", "admin": False, "internal": False}
    html = service_page("error.html", ann, status=403, message="Only <admins>.", heading="Admins only")
    assert 'id="error"' in html and "Admins only" in html and "Only &lt;admins&gt;." in html
    assert 'id="bai-nav-snapshots"' not in html
    panel = service_page("snapshots.html", {"name": "boss", "admin": True, "internal": False}, repo="bai-private",
                         cap=5, pause=True, bai_active="snapshots")
    assert 'id="not-captured"' in panel and "/home/jovyan" in panel
    assert '"prefix": "/services/bai-scheduler/"' in panel and "snapshots.js" in panel


def render_spawn(url, **kw):
    class User:
        name = "ann"
        admin = False
        json_escaped_name = "ann"
        spawner = type("Spawner", (), {"options_form": "x"})()

    ctx = dict(base_url="/hub/", prefix="/", static_url=lambda p, **k: "/hub/static/" + p, login_url="/hub/login",
               logout_url="/hub/logout", xsrf="tok", services=[], parsed_scopes=set(), user=User(),
               for_user=User(), spawner_options_form="<i>fields</i>", url=url, error_message="", auth_state=None,
               bai_scheduler_prefix="/services/bai-scheduler/")
    ctx.update(kw)
    return jinja_env().get_template("spawn.html").render(**ctx)


def test_spawn_page_keeps_one_xsrf_in_its_url():
    """Issue 14 (5): each refused post added another "_xsrf=" to the form's URL (1,049 characters
    after four errors)."""
    url = "/hub/spawn/ann/main?next=%2Fhub%2Fhome&_xsrf=old1&_xsrf=old2&_xsrf=new"
    html = render_spawn(url, error_message="HTTP 400: Bad Request (Sessions must be a whole number from 1 to 4.)")
    action = re.search(r'<form enctype="multipart/form-data" id="spawn_form" action="([^"]+)"', html).group(1)
    assert action.replace("&amp;", "&") == "/hub/spawn/ann/main?next=%2Fhub%2Fhome&_xsrf=new"
    assert "<strong>Not started:</strong> Sessions must be a whole number from 1 to 4." in html
    plain = render_spawn("/hub/spawn/ann/main")
    assert 'action="/hub/spawn/ann/main"' in plain


# -- notices -------------------------------------------------------------------------------------

def test_stop_notices_end_with_their_session_and_do_not_pile_up():
    """Issue 14 (4): "Stopping ..." banners piled up (each lived a minute on every view)."""
    n = Notices()
    n.add("ann", "info", "Stopping s1.", key="stop ann/s1", session=("ann", "s1"), now=100)
    n.add("ann", "info", "Stopping s1.", key="stop ann/s1", session=("ann", "s1"), now=101)  # clicked twice
    n.add("ann", "info", "Launching 3 sessions.", key="launch", now=101)
    listed = {("ann", "s1")}
    assert [x["text"] for x in n.for_user("ann", listed, now=102)] == ["Stopping s1.", "Launching 3 sessions."]
    # Gone from the page: its notice goes too (after a few seconds to read it); others stay their minute.
    assert [x["text"] for x in n.for_user("ann", set(), now=103)] == ["Stopping s1.", "Launching 3 sessions."]
    assert [x["text"] for x in n.for_user("ann", set(), now=107)] == ["Launching 3 sessions."]
    assert n.for_user("ann", set(), now=162) == []
    assert n.for_user("bob", set(), now=102) == []


def test_notices_keep_the_newest_few():
    n = Notices()
    for i in range(10):
        n.add("ann", "danger", f"error {i}", now=100 + i)
    assert [x["text"] for x in n.for_user("ann", now=110)] == [f"error {i}" for i in range(4, 10)]


def test_stop_buttons_ask_first_and_a_pending_session_is_cancelled():
    """Issue 14 (4): Stop asked no confirmation; a queued session's button says Cancel."""
    ann = {"name": "ann", "admin": False, "internal": False}
    rows = session_rows([status("ann", "s1", "RUNNING"), status("ann", "s2", "PENDING", position=1, reason="x")],
                        [hub_user("ann", s1={"ready": True, "pending": None, "url": "/user/ann/s1/"})], units=U)
    html = service_page("_sessions.html", ann, rows=rows)
    assert 'data-confirm="Stop s1? Its container is removed: running kernels and anything outside /home/jovyan are lost."' in html
    assert 'data-confirm="Cancel s2? It leaves the queue and will not start.">Cancel</button>' in html


def test_signup_page_shows_the_password_with_a_labelled_button():
    """Issue 14 (7): NativeAuthenticator's show/hide button is an emoji, an empty box where no
    emoji font is installed."""
    class Anyone:
        pass

    ctx = dict(base_url="/hub/", prefix="/", static_url=lambda p, **k: "/hub/static/" + p, login_url="/hub/login",
               logout_url="/hub/logout", xsrf="tok", services=[], parsed_scopes=set(), user=None,
               ask_email=False, two_factor_auth=True, recaptcha_key=None, tos=None)
    html = jinja_env().get_template("signup.html").render(**ctx)
    assert re.search(r'<button id="eye" type="button" class="btn btn-outline-secondary"[^>]*>Show</button>', html)
    assert "👁" not in html and "BAI Hub" in html
    assert 'name="signup_password"' in html and 'name="signup_password_confirmation"' in html and 'name="2fa"' in html
    assert 'name="_xsrf" value="tok"' in html


def test_unauthorize_is_a_bootstrap5_button():
    """Issue 14 (7): "Unauthorize" had Bootstrap 3's btn-default, which the hub's Bootstrap 5 lacks:
    it looked like plain text."""
    class Admin:
        name = "boss"
        admin = True
        json_escaped_name = "boss"
        spawner = type("Spawner", (), {"options_form": None})()

    class Account:
        def __init__(self, name, authorized):
            self.username, self.is_authorized, self.has_2fa, self.email = name, authorized, False, ""

    ctx = dict(base_url="/hub/", prefix="/", static_url=lambda p, **k: "/hub/static/" + p, login_url="/hub/login",
               logout_url="/hub/logout", xsrf="tok", services=[], parsed_scopes=set(), user=Admin(),
               bai_scheduler_prefix="/services/bai-scheduler/", ask_email=False,
               users=[Account("ann", True), Account("bob", False)])
    html = jinja_env().get_template("authorization-area.html").render(**ctx)
    assert '<button type="submit" class="btn btn-outline-secondary">Unauthorize</button>' in html
    assert '<button type="submit" class="btn btn-jupyter">Authorize</button>' in html
    assert "btn-default" not in html

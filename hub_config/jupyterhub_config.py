"""BAI Hub deployment: one file for the hub and the bai-scheduler service.

Every default works for the one-machine demo (SQLite, the local Docker engine,
simulated GPUs when none are found).  Environment variables (all optional):

  BAI_DATA_DIR         state folder (databases, secrets)        default ./var
  BAI_HUB_PORT         public port of the proxy on 127.0.0.1    default 8000
  BAI_HUB_API_PORT     hub's internal API port                  default 8081
  BAI_PROXY_API_PORT   configurable-http-proxy API port         default 8001
  BAI_SCHEDULER_PORT   bai-scheduler service port               default 8090
  BAI_NAME_PREFIX      prefix of containers and volumes         default bai-
  BAI_HUB_DB_URL       hub database URL                         default SQLite in BAI_DATA_DIR
  BAI_SCHEDULER_DB_URL scheduler database URL                   default SQLite in BAI_DATA_DIR
  BAI_REGISTRY_URL     the image registry every node pulls from default http://127.0.0.1:5000
                       (scripts/setup.sh starts that one, data in BAI_DATA_DIR/registry)
  BAI_ADMIN_USER       the first admin's name                   default admin
  BAI_HUB_CONNECT_IP   address containers reach the hub at      default the Docker bridge gateway
                       (the hub's internal API listens there only)
  BAI_IDLE_TIMEOUT     seconds idle before a session is culled  default 3600
  BAI_IDLE_CULL_EVERY  seconds between culler passes            default 60
  BAI_BROWSER_URL      the hub's address in users' browsers     default http://127.0.0.1:BAI_HUB_PORT/
  BAI_SESSION_PIP_CONFIG  pip.conf sessions use (scripts/run-hub writes one from the host's)
  BAI_SESSION_CA_BUNDLE   CA bundle sessions trust for HTTPS (scripts/run-hub: the host pip's cert)
  BAI_EXTRA_CONFIG     another config file loaded last (site overrides, tests)

Production: set the two DB URLs to PostgreSQL, put HTTPS in front (or set
c.JupyterHub.ssl_cert/ssl_key), list GPU nodes in c.BaiScheduler.nodes, and give
the registry TLS and logins (c.BaiRegistry; docs/install.md).
"""
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

c = get_config()  # noqa: F821

here = Path(__file__).resolve().parent
data = Path(os.environ.get("BAI_DATA_DIR", "var")).resolve()
data.mkdir(parents=True, exist_ok=True)
os.chmod(data, 0o700)
env = os.environ.get
prefix = env("BAI_NAME_PREFIX", "bai-")


def secret_file(name: str, nbytes: int = 32) -> str:
    """A secret generated once and kept in the data folder (mode 600)."""
    path = data / name
    if not path.exists():
        path.write_text(secrets.token_hex(nbytes))
        path.chmod(0o600)
    return path.read_text().strip()


def docker_bridge_gateway() -> str:
    """The host's address on Docker's default bridge: its gateway, or (engines that leave the
    gateway out of `network inspect`) the subnet's first address, which Docker gives the host."""
    try:
        out = subprocess.run(
            ["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0:
            for net in json.loads(out.stdout) or []:
                if net.get("Gateway"):
                    return net["Gateway"]
                if net.get("Subnet") and ipaddress.ip_network(net["Subnet"]).version == 4:
                    return str(next(ipaddress.ip_network(net["Subnet"]).hosts()))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    return "172.17.0.1"


hub_port = int(env("BAI_HUB_PORT", "8000"))
scheduler_port = int(env("BAI_SCHEDULER_PORT", "8090"))

# -- hub ------------------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{hub_port}"
# The hub's internal API listens only where the session containers reach it (the Docker
# bridge's gateway by default), not on every interface; the proxy and services use it there too.
c.JupyterHub.hub_connect_ip = env("BAI_HUB_CONNECT_IP") or docker_bridge_gateway()
c.JupyterHub.hub_ip = c.JupyterHub.hub_connect_ip
c.JupyterHub.hub_port = int(env("BAI_HUB_API_PORT", "8081"))
# The proxy scripts/setup.sh installs beside this Python (.venv/bin): found
# without relying on PATH, so the run command works with only system folders there.
# It runs through proxy.mjs, which answers a malformed path with 400 where CHP says 500.
local_proxy = Path(sys.prefix) / "bin" / "configurable-http-proxy"
if local_proxy.exists():
    node = shutil.which("node")
    chp_package = local_proxy.resolve().parent.parent
    c.ConfigurableHTTPProxy.command = ([node, str(here / "proxy.mjs"), str(chp_package)] if node
                                       else [str(local_proxy)])
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('BAI_PROXY_API_PORT', '8001')}"
c.ConfigurableHTTPProxy.auth_token = secret_file("proxy-token")
c.ConfigurableHTTPProxy.pid_file = str(data / "proxy.pid")
c.JupyterHub.db_url = env("BAI_HUB_DB_URL", f"sqlite:///{data / 'jupyterhub.sqlite'}")
c.JupyterHub.cookie_secret_file = str(data / "cookie-secret")
c.JupyterHub.pid_file = str(data / "jupyterhub.pid")
c.JupyterHub.template_paths = [str(here / "templates")]
c.JupyterHub.template_vars = {"bai_scheduler_prefix": "/services/bai-scheduler/"}
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 16
c.JupyterHub.default_url = "/hub/home"
# The scheduler is the admission control: queued spawns wait there, so the
# hub's own throttles must not count them against other users.
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.active_server_limit = 0
# Sessions outlive a hub restart; queued requests live in the scheduler's database.
c.JupyterHub.cleanup_servers = False
# A dead container is noticed by the scheduler at once (engine events); the
# hub's own poll only has to catch up.
c.JupyterHub.last_activity_interval = 60

# -- accounts -------------------------------------------------------------------------
admin_user = env("BAI_ADMIN_USER", "admin")
c.JupyterHub.authenticator_class = "hub_config.auth.BaiNativeAuthenticator"
c.Authenticator.admin_users = {admin_user}
# A name is used in pages, URLs, container and volume names: lower-case letters, digits and . _ @ -
# (a sign-up name with blanks or markup would otherwise reach the admins' pages).
c.Authenticator.username_pattern = r"^[a-z0-9][a-z0-9._@-]{0,63}\Z"
c.Authenticator.allow_all = True  # NativeAuthenticator's approval step decides who gets in
c.NativeAuthenticator.open_signup = False  # new sign-ups wait for an admin's approval
c.NativeAuthenticator.minimum_password_length = 10
c.NativeAuthenticator.check_common_password = True
c.NativeAuthenticator.allowed_failed_logins = 5
c.NativeAuthenticator.seconds_before_next_try = 300
c.NativeAuthenticator.enable_signup = True

# -- sessions -------------------------------------------------------------------------
c.JupyterHub.spawner_class = "bai"
scheduler_token = secret_file("scheduler-token")
c.BaiSpawner.scheduler_url = f"http://127.0.0.1:{scheduler_port}"
c.BaiSpawner.scheduler_token = scheduler_token
# BAI_IMAGE_PREFIX is the prefix `bai-images build` names its images with
c.BaiSpawner.image = env("BAI_DEFAULT_IMAGE", env("BAI_IMAGE_PREFIX", "bai/") + "sklearn:1.6.1")
c.BaiSpawner.hub_id = prefix.rstrip("-") or "bai"
c.BaiSpawner.name_template = prefix + "{username}--{servername}"
c.BaiSpawner.volumes = {prefix + "home-{username}": "/home/jovyan"}
c.BaiSpawner.http_timeout = 120
# Links sessions print (MLflow's run links) name the address users' browsers use.
c.BaiSpawner.browser_url = env("BAI_BROWSER_URL") or f"http://127.0.0.1:{hub_port}/"
# `pip install` in sessions: the site's package index and CA (docs/install.md, "Package index").
c.BaiSpawner.pip_config = env("BAI_SESSION_PIP_CONFIG", "")
c.BaiSpawner.ca_bundle = env("BAI_SESSION_CA_BUNDLE", "")

# -- the image registry (hub and service alike) ------------------------------------------
c.BaiRegistry.url = env("BAI_REGISTRY_URL", "http://127.0.0.1:5000")

# -- the scheduler service --------------------------------------------------------------
c.BaiScheduler.db_url = env("BAI_SCHEDULER_DB_URL", f"sqlite:///{data / 'bai_scheduler.sqlite'}")
c.BaiScheduler.hub_id = prefix.rstrip("-") or "bai"
c.BaiScheduler.fgpu_per_gpu = 2
c.BaiScheduler.fgpu_step = "0.5"
# CPU and memory: what the local engine has (its NCPU and MemTotal), so sessions cannot be
# promised more than the machine holds.
c.BaiScheduler.nodes = [{"name": "local", "docker_url": "", "gpus": "auto", "cpu": "auto", "memory": "auto"}]
# Modest per-user limits, so that one user cannot take the whole machine or the whole queue
# (0 = no limit; raise them for a site with more capacity).
c.BaiScheduler.max_running_per_user = 4
c.BaiScheduler.max_pending_per_user = 4
# How real GPUs enforce a share (per node: "gpu_backend" in its entry); docs/install.md.
c.BaiScheduler.gpu_backend = "hami"

service_env = {k: v for k, v in os.environ.items() if k.startswith(("BAI_", "DOCKER_"))}
service_env["BAI_DATA_DIR"] = str(data)
c.JupyterHub.services = [
    {
        "name": "bai-scheduler",
        "url": f"http://127.0.0.1:{scheduler_port}",
        "api_token": scheduler_token,
        "command": [sys.executable, "-m", "bai_scheduler.app", f"--config={__file__}"],
        "environment": service_env,
        "cwd": str(data),
        "display": True,
        "oauth_no_confirm": True,
    },
    {
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                    f"--timeout={env('BAI_IDLE_TIMEOUT', '3600')}",
                    f"--cull-every={env('BAI_IDLE_CULL_EVERY', '60')}"],
    },
]
c.JupyterHub.load_roles = [
    {
        "name": "user",
        "scopes": ["self", "access:services!service=bai-scheduler"],
    },
    {
        "name": "bai-scheduler",
        "description": "Start queued sessions when admitted; read who is running what.",
        "scopes": ["list:users", "read:users", "read:servers", "servers"],
        "services": ["bai-scheduler"],
    },
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
]

extra = env("BAI_EXTRA_CONFIG")
if extra:
    load_subconfig(extra)  # noqa: F821

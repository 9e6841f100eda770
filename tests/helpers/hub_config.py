"""Loaded last by hub_config/jupyterhub_config.py in tests (BAI_EXTRA_CONFIG)."""
import json
import os

c = get_config()  # noqa: F821

c.JupyterHub.services.append({"name": "test-admin", "api_token": os.environ["BAI_TEST_ADMIN_TOKEN"]})
c.JupyterHub.load_roles.append({
    "name": "test-admin",
    "scopes": ["admin:users", "admin:servers", "tokens", "list:users", "read:users", "users",
               "servers", "access:servers", "access:services", "admin-ui", "read:roles",
               "groups", "read:groups", "read:metrics"],
    "services": ["test-admin"],
})
c.BaiScheduler.nodes = json.loads(os.environ["BAI_TEST_NODES"])
# The deployment's per-user limits are off in tests unless a test sets them (BAI_TEST_EXTRA).
c.BaiScheduler.max_running_per_user = 0
c.BaiScheduler.max_pending_per_user = 0
c.JupyterHub.log_level = "DEBUG" if os.environ.get("BAI_TEST_DEBUG") else "INFO"
c.BaiSpawner.container_start_timeout = 90
# Private images of a test hub carry its bai-test- prefix, so cleanup finds them.
c.BaiScheduler.private_image_repo = os.environ["BAI_NAME_PREFIX"] + "private"
for section, values in json.loads(os.environ.get("BAI_TEST_EXTRA", "{}")).items():
    for k, v in values.items():
        setattr(getattr(c, section), k, v)

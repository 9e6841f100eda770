"""The teams hub of tests/hub/test_teams_hub.py and tests/browser/test_teams_browser.py: two nodes in
two pools ("cheap", "fast"; both on the local engine), JupyterHub groups team-vision (quota 1 fGPU,
pool fast) and team-nlp (pool cheap, sessions live NLP_LIFETIME s), a default lifetime of one hour
(so waiting requests get an upper bound), and two presets."""
from pathlib import Path

from .hub import Hub

NLP_LIFETIME = 45
TEAMS = {
    "group_quotas": {"team-vision": {"fgpu": "1"}},
    "group_pools": {"team-vision": ["fast"], "team-nlp": ["cheap"]},
    "group_lifetimes": {"team-nlp": f"{NLP_LIFETIME}s"},
    "session_lifetime": "1h",
    "lifetime_notice": 3600,  # the notice shows from the start
    "lifetime_check_interval": 2,
    "presets": [
        {"display_name": "Half GPU", "slug": "half", "description": "For notebooks and small models",
         "fgpu": "0.5", "cpu": "0.5", "memory": "1GiB", "default": True},
        {"display_name": "Whole fast GPU", "slug": "fast-full", "description": "Training on the fast pool",
         "fgpu": "1", "cpu": "0.5", "memory": "1GiB", "pool": "fast"},
    ],
}
NODES = [{"name": "cheap", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB", "pool": "cheap"},
         {"name": "fast", "docker_url": "", "gpus": 1, "gpu_memory": "8GiB", "pool": "fast"}]
GROUPS = {"team-vision": {"users": ["vic"]}, "team-nlp": {"users": ["nia"]}}


def teams_hub(workdir: Path) -> Hub:
    """The (not yet started) teams hub; its users vic and nia are made by the hub from GROUPS."""
    return Hub(workdir, nodes=NODES, extra={"BaiScheduler": TEAMS, "JupyterHub": {"load_groups": GROUPS}})

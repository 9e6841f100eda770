"""Where things are inside every kernel image built by ``bai-images``.

The spawner, snapshots and the session apps rely on these paths and names; a
change here changes the builder's scripts and so rebuilds every image.

Two Python environments, resolved apart so that a framework's pins never meet
the server's:

* ``SERVER_ENV``: jupyterhub-singleuser, JupyterLab, jupyter-server-proxy and
  the session apps (``bai-session-apps``). Owned by root, no user site: a
  user's ``pip install`` cannot break the server.
* ``KERNEL_ENV``: the framework, ``ipykernel`` and the MLflow client. Owned by
  the user: plain ``pip install X`` in a session lands here, and a snapshot
  keeps it; ``pip install --user X`` goes to the home volume. Its kernelspec
  (``KERNEL_NAME``, the default kernel) lies in ``JUPYTER_PATH``.

``PATH`` puts the kernel environment first, so ``python`` and ``pip`` in
notebooks (``!pip``) and terminals are the kernel's; the server's commands
come last. Debian's ``/etc/profile`` resets ``PATH`` for login shells (both
terminals start ``bash -l``), so ``PROFILE_SCRIPT`` puts it back.
"""

SERVER_ENV = "/opt/bai/server"
KERNEL_ENV = "/opt/bai/kernel"
MLFLOW_ENV = "/opt/bai/mlflow"       # full MLflow for the UI server, its own environment
MLFLOW_BIN = f"{MLFLOW_ENV}/bin/mlflow"
ENVS_DIR = "/opt/bai"                # a base recipe's ``venvs`` are made here, by name

NB_USER, NB_UID, NB_GID, NB_HOME = "jovyan", 1000, 100, "/home/jovyan"
SHELL = "/bin/bash"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PATH = f"{KERNEL_ENV}/bin:{SYSTEM_PATH}:{SERVER_ENV}/bin"
JUPYTER_PATH = f"{KERNEL_ENV}/share/jupyter"
KERNEL_NAME = "python3"
PROFILE_SCRIPT = "/etc/profile.d/bai-envs.sh"

# Sourced by login shells after /etc/profile has reset PATH.
PROFILE = f"""# BAI Hub: Debian's /etc/profile resets PATH for login shells (terminals run
# bash -l); put back the image's: the kernel environment first, as in notebooks.
case ":$PATH:" in *":{KERNEL_ENV}/bin:"*) ;; *) PATH="{KERNEL_ENV}/bin:$PATH" ;; esac
case ":$PATH:" in *":{SERVER_ENV}/bin:"*) ;; *) PATH="$PATH:{SERVER_ENV}/bin" ;; esac
export PATH
"""

# The image's environment (``docker commit`` changes).
IMAGE_ENV = {
    "PATH": PATH,
    "SHELL": SHELL,
    "JUPYTER_PATH": JUPYTER_PATH,
    "LANG": "C.UTF-8",
    "HOME": NB_HOME,
    "BAI_MLFLOW_BIN": MLFLOW_BIN,
}

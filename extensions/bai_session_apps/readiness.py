"""Notice promptly that MLflow (or the terminal) has started.

jupyter-server-proxy waits for a process with simpervisor's
``SupervisedProcess.ready()``, which polls the port with a delay that doubles
after every attempt and is never capped (0.01 s, 0.02 s, ... 10.24 s,
20.48 s). A process that starts answering at 21 s is noticed at about 41 s;
the user waits twice as long as MLflow needs (seen through the hub: MLflow
up after 21 s, first page after 41 s).

For the processes of this package only, :func:`patch` replaces that wait
with the same loop and the same limits (``ready_timeout``, 5 s per check,
stop when killed) but a delay capped at :data:`MAX_WAIT` seconds. Other
jupyter-server-proxy apps in the session keep the original behaviour, and
if simpervisor changes shape the original is used unchanged.
"""

from __future__ import annotations

import asyncio
import time

#: longest pause between two readiness checks
MAX_WAIT = 0.5
#: jupyter-server-proxy names of the processes that get the capped wait
NAMES = frozenset({"mlflow", "terminal"})

_PATCHED = "_bai_session_apps_capped"


async def capped_ready(proc, max_wait: float = MAX_WAIT) -> bool:
    """simpervisor's ``ready()`` loop with the backoff capped at ``max_wait``."""
    start = time.monotonic()
    wait = 0.01
    while True:
        if time.monotonic() - start > proc.ready_timeout:
            return False
        if proc._killed or not proc.proc:
            return False
        try:
            is_ready = await asyncio.wait_for(proc.ready_func(proc), 5)
        except asyncio.TimeoutError:
            is_ready = False
        if is_ready:
            return True
        remaining = proc.ready_timeout - (time.monotonic() - start)
        await asyncio.sleep(max(0.0, min(wait, remaining)))
        wait = min(2 * wait, max_wait)


def patch(names=NAMES) -> bool:
    """Install the capped wait for ``names``; True if installed (or already)."""
    try:
        from simpervisor import SupervisedProcess
    except ImportError:
        return False
    original = getattr(SupervisedProcess, "ready", None)
    if original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True
    names = frozenset(names)

    async def ready(self):
        if getattr(self, "name", None) in names and all(
            hasattr(self, a) for a in ("ready_timeout", "ready_func", "_killed", "proc")
        ):
            return await capped_ready(self)
        return await original(self)

    ready.__doc__ = original.__doc__
    setattr(ready, _PATCHED, True)
    ready.__wrapped__ = original
    SupervisedProcess.ready = ready
    return True

"""How long the event loop went without running: a heartbeat beside the awaited work."""
from __future__ import annotations

import asyncio
import time


class Heartbeat:
    """``async with Heartbeat(period) as hb: ...`` then ``hb.longest``: the longest gap (seconds)
    between ticks meant to come every ``period`` seconds while the block ran."""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.longest = 0.0
        self._task = None

    async def _beat(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self):
        self._task = asyncio.ensure_future(self._beat())
        await asyncio.sleep(2 * self.period)
        return self

    async def __aexit__(self, *exc):
        try:
            await asyncio.sleep(5 * self.period)  # the heartbeat notes a stall only when it runs again
        finally:
            self._task.cancel()
        return False


async def longest_stall(coro, period: float = 0.01) -> float:
    """Await ``coro`` beside a heartbeat; the longest the loop went without running it."""
    async with Heartbeat(period) as hb:
        await coro
    return hb.longest

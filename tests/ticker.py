"""A 1 ms ticker on the running event loop: how late each tick wakes is the loop's stall."""

from __future__ import annotations

import time

import anyio


class Ticker:
    """Start with ``tg.start_soon(ticker.run)``; set ``done`` to stop it."""

    def __init__(self) -> None:
        self.stalls: list[float] = []
        self.done = False

    async def run(self) -> None:
        last = time.perf_counter()
        while not self.done:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            self.stalls.append(now - last - 0.001)
            last = now

"""The one back-off policy of every retry and reconnect loop: exponential, full jitter, capped, reset.

Attempt n (0-based) waits a uniformly random time in [0, min(cap, base * 2**n)] ("full jitter": when a
server holding thousands of agents dies, their retries spread over the whole window instead of arriving
together). `floor_s` widens the window (never narrows it): a task server tells its agents how long to
spread their reconnects over, and the window is never narrower than that. `reset()` after a success (or a
session that lasted) starts over from `base`.

Why our own and not a retry library: these loops keep state across sessions (reset after a stable link, a
floor the server moves while the loop runs), which the decorator-shaped libraries (tenacity, backoff) do not
model; the policy itself is the few lines below.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Full-jitter exponential back-off. `base_s` > 0 and `cap_s` >= `base_s` (seconds)."""

    __slots__ = ("base_s", "cap_s", "floor_s", "attempt", "_rng")

    def __init__(self, base_s: float, cap_s: float, *, floor_s: float = 0.0, rng: random.Random | None = None):
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"back-off needs 0 < base_s <= cap_s (got {base_s}, {cap_s})")
        self.base_s = base_s
        self.cap_s = cap_s
        self.floor_s = floor_s
        self.attempt = 0
        self._rng = rng or random

    def window(self) -> float:
        """The upper bound of the next wait (seconds)."""
        return max(self.floor_s, min(self.cap_s, self.base_s * (2 ** min(self.attempt, 62))))

    def next(self) -> float:
        """The next wait (seconds), and count the attempt."""
        w = self.window()
        self.attempt += 1
        return self._rng.uniform(0, w)

    async def sleep(self) -> float:
        """Wait the next delay; returns it."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        """Start over from `base_s` (after a success)."""
        self.attempt = 0

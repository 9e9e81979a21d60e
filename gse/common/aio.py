"""Work started in the background and not awaited by its starter.

asyncio keeps only a weak reference to a task: one nobody holds may be collected before it finishes (the
asyncio documentation's own warning for `create_task`). `spawn` keeps it until it is done and logs what
it raised, so that background work (closing a channel, retiring an output, ending a transfer) neither
vanishes nor fails silently.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

log = logging.getLogger("gse.aio")

_RUNNING: set[asyncio.Future] = set()


def spawn(work: Awaitable[Any], what: str = "") -> asyncio.Future:
    """Run `work` (a coroutine or future) in the background, held until done; an exception it raises is
    logged with `what` (a short description) instead of being lost."""
    fut = asyncio.ensure_future(work)
    _RUNNING.add(fut)
    fut.add_done_callback(_done(what))
    return fut


def _done(what: str):
    def done(fut: asyncio.Future) -> None:
        """Let go of the finished task; log its exception (a cancelled one is no failure)."""
        _RUNNING.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("background work failed", extra={"work": what or repr(fut), "error": repr(fut.exception())})
    return done

"""Batched, coalescing writes to dbproxy: every agent session and task result the task server keeps.

Hash updates for the same key are merged while they wait; other operations queue in order. One flush
carries everything waiting as one dbproxy batch, so ten thousand heartbeats or results cost a handful of
round trips. `written()` gives a future that resolves once everything queued so far is stored: results are
acknowledged to agents only then. A flush that fails is merged back and retried.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Histogram

from gse.common import dbclient as db
from gse.common.errors import Unavailable
from gse.common.records import HashWrite

log = logging.getLogger("gse.taskserver.writer")

FLUSHES = Histogram("gse_taskserver_flush_seconds", "Time of one batch flush to dbproxy",
                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
FLUSH_OPS = Counter("gse_taskserver_flush_ops_total", "Operations flushed to dbproxy")
FLUSH_ERRORS = Counter("gse_taskserver_flush_errors_total", "Batch flushes that failed")


class BatchWriter:
    """`lazy` writes (heartbeats: nobody waits for them) do not start a flush of their own: they ride along
    with the next one, or with the writer's tick every `lazy_interval_s`. At 10,000 agents that is a
    few dbproxy batches per second at steady state instead of one every `flush_interval_s`."""

    def __init__(self, client: db.DbClient, flush_interval_s: float = 0.05, max_batch: int = 20_000,
                 lazy_interval_s: float = 0.5):
        self.client = client
        self.flush_interval_s = flush_interval_s
        self.lazy_interval_s = lazy_interval_s
        self.max_batch = max_batch
        self._hashes: dict[str, tuple[dict, int]] = {}     # key -> (fields, ttl_ms)
        self._ops: list = []
        self._waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()

    def put(self, write: HashWrite, lazy: bool = False) -> None:
        """Queue a record write (gse.common.records), merged with what waits for the same key."""
        pending = self._hashes.get(write.key)
        if pending is None:
            self._hashes[write.key] = (dict(write.fields), write.ttl_ms)
        else:
            pending[0].update(write.fields)
        if not lazy:
            self._wake.set()

    def add(self, ops) -> None:
        self._ops.extend(ops)
        self._wake.set()

    def written(self) -> asyncio.Future:
        """A future resolved when everything queued until now is stored."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        return fut

    @property
    def pending(self) -> int:
        return len(self._hashes) + len(self._ops)

    async def run(self) -> None:
        while True:
            if not self._wake.is_set():
                # A tick every lazy_interval_s carries lazy writes (none waits longer than that).
                try:
                    await asyncio.wait_for(self._wake.wait(), self.lazy_interval_s)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(self.flush_interval_s)

    async def flush(self) -> None:
        while self._hashes or self._ops or self._waiters:
            hashes, self._hashes = self._hashes, {}
            extra, self._ops = self._ops, []
            waiters, self._waiters = self._waiters, []
            # Ordered ops first: an item's output (SETRANGE) then never lands in a later chunk than the hash
            # that says the item is finished.
            ops = extra + [HashWrite(k, f, ttl).op() for k, (f, ttl) in hashes.items()]
            t0 = time.perf_counter()
            try:
                for i in range(0, len(ops), self.max_batch):
                    results = await self.client.execute(ops[i:i + self.max_batch])
                    bad = [r.error for r in results if not r.ok]
                    if bad:
                        log.warning("writes refused by dbproxy", extra={"count": len(bad), "first": bad[0]})
                FLUSH_OPS.inc(len(ops))
            except Unavailable as exc:
                FLUSH_ERRORS.inc()
                log.warning("flush failed; will retry", extra={"error": str(exc), "ops": len(ops)})
                for k, (f, ttl) in hashes.items():
                    newer = self._hashes.get(k)
                    self._hashes[k] = ({**f, **newer[0]}, ttl) if newer else (f, ttl)
                self._ops[:0] = extra
                self._waiters[:0] = waiters
                await asyncio.sleep(1.0)
                continue
            finally:
                FLUSHES.observe(time.perf_counter() - t0)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def drain(self, timeout: float = 5.0) -> None:
        """Write everything queued so far (at shutdown, after the flush loop was cancelled)."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (asyncio.TimeoutError, Unavailable):
            log.warning("writer not drained at stop", extra={"pending": self.pending})

"""Batched, coalescing writes to dbproxy: every agent session and task result the task server keeps.

Hash updates for the same key are merged while they wait; other operations queue in order. One flush
carries everything waiting as one dbproxy batch, so ten thousand heartbeats or results cost a handful of
round trips.

"Stored" means stored: `written()` gives a future that resolves only once everything queued before it was
confirmed by dbproxy, op by op (results are acknowledged to agents only then, and an agent keeps a result
until it is acknowledged). An op dbproxy could not apply for a transient reason (a replica unreachable, no
dbproxy answering) is queued again, merged under newer writes of the same hash, and retried with back-off;
an op refused for good (a malformed op, a Redis type error) is dropped, counted and logged, so that one bad op
never holds every acknowledgement back. A flush cancelled half-way (the task server stopping) puts what it
held back in the queue for `drain`. Every op the writer carries must be idempotent (HSET, SET, SETRANGE,
SADD, EXPIRE): a retried op may have been applied once already.

The queue is bounded: above `high_water` pending writes the writer says so (`pressure`), and the agent links
stop being read until it is back under `low_water` (see AgentAccess): agents keep their results meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from gse.common import dbclient as db
from gse.common.backoff import Backoff
from gse.common.errors import Unavailable
from gse.common.records import HashWrite

log = logging.getLogger("gse.taskserver.writer")

FLUSHES = Histogram("gse_taskserver_flush_seconds", "Time of one batch flush to dbproxy",
                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
FLUSH_OPS = Counter("gse_taskserver_flush_ops_total", "Operations flushed to dbproxy")
FLUSH_ERRORS = Counter("gse_taskserver_flush_errors_total", "Batch flushes that failed as a whole")
RETRIED_OPS = Counter("gse_taskserver_write_retried_total", "Ops dbproxy could not apply yet, queued again")
DROPPED_OPS = Counter("gse_taskserver_write_dropped_total", "Ops dbproxy refused for good (dropped)")
PENDING = Gauge("gse_taskserver_write_pending", "Writes waiting for dbproxy")


class BatchWriter:
    """Queues record writes (`put`) and ordered ops (`add`) and flushes them to dbproxy (`client`).

    `lazy` writes (heartbeats: nobody waits for them) do not start a flush of their own: they ride along
    with the next one, or with the writer's tick every `lazy_interval_s`. At 10,000 agents that is a few
    dbproxy batches per second at steady state instead of one every `flush_interval_s`.
    `on_pressure(bool)` is called when the pending count crosses `high_water` (True) and, later, falls
    under `low_water` (False)."""

    def __init__(self, client: db.DbClient, flush_interval_s: float = 0.05, max_batch: int = 20_000,
                 lazy_interval_s: float = 0.5, high_water: int = 200_000, low_water: int = 50_000,
                 on_pressure: Callable[[bool], None] | None = None):
        self.client = client
        self.flush_interval_s = flush_interval_s
        self.lazy_interval_s = lazy_interval_s
        self.max_batch = max_batch
        self.high_water = high_water
        self.low_water = min(low_water, high_water)
        self.on_pressure = on_pressure
        self.pressure = False
        self._hashes: dict[str, tuple[dict, int]] = {}     # key -> (fields, ttl_ms)
        self._ops: list = []
        self._waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._backoff = Backoff(0.05, 5.0)

    # ---- queueing ---------------------------------------------------------------------------------

    def put(self, write: HashWrite, lazy: bool = False) -> None:
        """Queue a record write (gse.common.records), merged with what waits for the same key."""
        pending = self._hashes.get(write.key)
        if pending is None:
            self._hashes[write.key] = (dict(write.fields), write.ttl_ms)
            self._check_pressure()
        else:
            pending[0].update(write.fields)
        if not lazy:
            self._wake.set()

    def add(self, ops) -> None:
        """Queue ordered ops (idempotent ones: see the module doc); they are flushed before the hashes."""
        self._ops.extend(ops)
        self._check_pressure()
        self._wake.set()

    def written(self) -> asyncio.Future:
        """A future resolved once everything queued until now is confirmed stored by dbproxy."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        return fut

    @property
    def pending(self) -> int:
        """Writes queued and not yet sent: hash records plus ordered ops."""
        return len(self._hashes) + len(self._ops)

    def _check_pressure(self) -> None:
        n = self.pending
        if not self.pressure and n > self.high_water:
            self.pressure = True
            log.warning("write queue over its high-water mark; agent links paused", extra={"pending": n})
            if self.on_pressure is not None:
                self.on_pressure(True)
        elif self.pressure and n < self.low_water:
            self.pressure = False
            log.info("write queue drained; agent links resumed", extra={"pending": n})
            if self.on_pressure is not None:
                self.on_pressure(False)

    def _requeue(self, hashes: dict[str, tuple[dict, int]], ops: list, waiters: list) -> None:
        """Put writes back in front of what was queued since (newer hash fields win)."""
        for k, (f, ttl) in hashes.items():
            newer = self._hashes.get(k)
            self._hashes[k] = ({**f, **newer[0]}, ttl) if newer else (f, ttl)
        self._ops[:0] = ops
        self._waiters[:0] = waiters

    # ---- flushing ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush whenever something waits (and at least every `lazy_interval_s`), until cancelled."""
        while True:
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), self.lazy_interval_s)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            if not await self.flush():
                await asyncio.sleep(self._backoff.next())
                self._wake.set()
                continue
            self._backoff.reset()
            await asyncio.sleep(self.flush_interval_s)

    async def flush(self) -> bool:
        """One pass over everything queued. True when all of it was stored (or dropped for good); False when
        something was queued again for a later try."""
        if not (self._hashes or self._ops or self._waiters):
            return True
        hashes, self._hashes = self._hashes, {}
        ops, self._ops = self._ops, []
        waiters, self._waiters = self._waiters, []
        PENDING.set(len(hashes) + len(ops))
        # Ordered ops first: an item's output (SETRANGE) then never lands in a later batch than the hash
        # that says the item is finished.
        keys = list(hashes)
        batch = ops + [HashWrite(k, *hashes[k]).op() for k in keys]
        n_ops = len(ops)
        failed: list[int] = []
        t0 = time.perf_counter()
        sent = 0
        try:
            for i in range(0, len(batch), self.max_batch):
                chunk = batch[i:i + self.max_batch]
                try:
                    results = await self.client.execute(chunk)
                except Unavailable as exc:
                    FLUSH_ERRORS.inc()
                    log.warning("flush failed; will retry", extra={"error": str(exc), "ops": len(batch) - i})
                    failed.extend(range(i, len(batch)))
                    break
                sent = i + len(chunk)
                for j, r in enumerate(results):
                    if r.ok:
                        continue
                    if r.retryable:
                        failed.append(i + j)
                    else:
                        DROPPED_OPS.inc()
                        log.error("write refused by dbproxy; dropped",
                                  extra={"key": chunk[j].key, "error": r.error})
        except BaseException:
            # Cancelled (or worse) mid-flush: what was not confirmed goes back, for `drain` or the next run.
            unconfirmed = set(failed) | set(range(sent, len(batch)))
            self._requeue({keys[n - n_ops]: hashes[keys[n - n_ops]] for n in sorted(unconfirmed) if n >= n_ops},
                          [ops[n] for n in sorted(unconfirmed) if n < n_ops], waiters)
            raise
        finally:
            FLUSHES.observe(time.perf_counter() - t0)
        FLUSH_OPS.inc(len(batch) - len(failed))
        if failed:
            RETRIED_OPS.inc(len(failed))
            self._requeue({keys[n - n_ops]: hashes[keys[n - n_ops]] for n in failed if n >= n_ops},
                          [ops[n] for n in failed if n < n_ops], waiters)
            self._check_pressure()
            return False
        for w in waiters:
            if not w.done():
                w.set_result(None)
        self._check_pressure()
        return True

    async def drain(self, timeout: float = 5.0) -> None:
        """Write everything queued so far (at shutdown, after the flush loop was cancelled), retrying
        transient failures within `timeout` seconds."""
        async def until_empty():
            """Flush again (with back-off) until a flush wrote everything."""
            backoff = Backoff(0.05, 1.0)
            while not await self.flush():
                await asyncio.sleep(backoff.next())
        try:
            await asyncio.wait_for(until_empty(), timeout)
        except asyncio.TimeoutError:
            log.warning("writer not drained at stop", extra={"pending": self.pending})

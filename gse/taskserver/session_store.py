"""Batched writes of agent sessions to dbproxy.

Updates for the same agent are merged while they wait; one flush carries every waiting update as one
dbproxy batch, so ten thousand heartbeats cost a handful of round trips, not ten thousand. A flush that
fails is merged back and retried; the sessions themselves are rebuilt by the agents if all else fails.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Histogram

from gse.common import dbclient as db
from gse.common.agentstate import AGENTS_SET, agent_key, ip_key
from gse.common.errors import Unavailable

log = logging.getLogger("gse.taskserver.store")

FLUSHES = Histogram("gse_taskserver_session_flush_seconds", "Time of one session flush to dbproxy",
                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
FLUSH_ERRORS = Counter("gse_taskserver_session_flush_errors_total", "Session flushes that failed")


class SessionStore:
    def __init__(self, client: db.DbClient, ttl_ms: int, flush_interval_s: float = 0.1, max_batch: int = 20_000):
        self.client = client
        self.ttl_ms = ttl_ms
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._fields: dict[str, dict] = {}       # agent id -> fields waiting to be written
        self._extra: list = []                   # other ops waiting (index set, ip mapping)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def update(self, agent_id: str, fields: dict) -> None:
        pending = self._fields.get(agent_id)
        if pending is None:
            self._fields[agent_id] = dict(fields)
        else:
            pending.update(fields)
        self._idle.clear()
        self._wake.set()

    def add_ops(self, ops) -> None:
        self._extra.extend(ops)
        self._idle.clear()
        self._wake.set()

    def announce(self, agent_id: str, cloud_id: int, ip: str, fields: dict) -> None:
        """A new session: its full record, the ip mapping and the index."""
        self.update(agent_id, fields)
        self.add_ops([db.set_(ip_key(cloud_id, ip), agent_id, self.ttl_ms), db.sadd(AGENTS_SET, [agent_id], self.ttl_ms)])

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(self.flush_interval_s)

    async def flush(self) -> None:
        while self._fields or self._extra:
            batch_fields, self._fields = self._fields, {}
            extra, self._extra = self._extra, []
            ops = [db.hset(agent_key(aid), f, self.ttl_ms) for aid, f in batch_fields.items()] + extra
            t0 = time.perf_counter()
            try:
                for i in range(0, len(ops), self.max_batch):
                    results = await self.client.execute(ops[i:i + self.max_batch])
                    bad = [r.error for r in results if not r.ok]
                    if bad:
                        log.warning("session writes refused", extra={"count": len(bad), "first": bad[0]})
            except Unavailable as exc:
                FLUSH_ERRORS.inc()
                log.warning("session flush failed; will retry", extra={"error": str(exc)})
                for aid, f in batch_fields.items():
                    newer = self._fields.get(aid)
                    self._fields[aid] = {**f, **newer} if newer else f
                self._extra[:0] = extra
                await asyncio.sleep(1.0)
                continue
            finally:
                FLUSHES.observe(time.perf_counter() - t0)
        self._idle.set()

    async def drain(self, timeout: float = 5.0) -> None:
        """Write everything queued so far (at shutdown, after the flush loop was cancelled)."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (asyncio.TimeoutError, Unavailable):
            log.warning("session store not drained at stop")

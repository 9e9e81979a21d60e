"""Routing one batch: its channel's route picks the outputs (and, with filters, the records for each); the
batch is accepted once every output took its part.

Channels without a route are counted and dropped (and acknowledged: the agent must not resend them forever),
with at most one log line per channel per `no_route_log_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from prometheus_client import Counter, Histogram

from .dataop import Figures
from .outputs import OutputError, Outputs
from .route_table import RouteTable

log = logging.getLogger("gse.dataserver.router")

CH_RECORDS = Counter("gse_dataserver_channel_records_total", "Records received per channel", ["channel"])
CH_BYTES = Counter("gse_dataserver_channel_bytes_total", "Record bytes received per channel", ["channel"])
CH_DROPPED = Counter("gse_dataserver_channel_dropped_total", "Records dropped per channel", ["channel", "reason"])
CH_ERRORS = Counter("gse_dataserver_channel_errors_total", "Batches of a channel that an output failed", ["channel"])
_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
CH_DELAY = Histogram("gse_dataserver_channel_delay_seconds",
                     "From the agent reading a batch's first record to this server receiving the batch", ["channel"],
                     buckets=_BUCKETS)
CH_LATENCY = Histogram("gse_dataserver_channel_seconds", "From receiving a batch to every output having taken it",
                       ["channel"], buckets=_BUCKETS)


class _ChannelMetrics:
    __slots__ = ("records", "bytes", "no_route", "errors", "delay", "latency")

    def __init__(self, channel: int):
        c = str(channel)
        self.records, self.bytes = CH_RECORDS.labels(c), CH_BYTES.labels(c)
        self.no_route, self.errors = CH_DROPPED.labels(c, "no_route"), CH_ERRORS.labels(c)
        self.delay, self.latency = CH_DELAY.labels(c), CH_LATENCY.labels(c)


class Router:
    """Routes each agent batch by its channel (DataID) to the sinks of the channel's route; counts records, bytes,
    drops and errors per channel (Prometheus and `figures`). `tap(channel, agent_id, records)` sees the batches of the
    `tapped` channels before routing (the host snapshot cache)."""

    def __init__(self, table: RouteTable, outputs: Outputs, no_route_log_interval_s: float = 60.0,
                 tap: Callable[[int, str, list], None] | None = None, figures: Figures | None = None):
        self.table = table
        self.outputs = outputs
        self.figures = figures or Figures()     # the operating figures (gse/dataserver/dataop.py)
        self.no_route_log_interval_s = no_route_log_interval_s
        self.tap = tap                          # (channel, agent_id, records): side uses (host snapshots)
        self.tapped: set[int] = set()
        self._channels: dict[int, _ChannelMetrics] = {}
        self._no_route_logged: dict[int, float] = {}
        self.records_in = 0
        self.bytes_in = 0
        self.batches_in = 0

    def _metrics(self, channel: int) -> _ChannelMetrics:
        m = self._channels.get(channel)
        if m is None:
            m = self._channels[channel] = _ChannelMetrics(channel)
        return m

    def route(self, channel: int, records: list, agent_id: str, proto_fields: tuple,
              arrival_ms: int = 0) -> asyncio.Future | None:
        """Queue a batch on its outputs; a future for their acceptance, or None when nothing is to wait for."""
        n = len(records)
        size = sum(map(len, records))
        m = self._metrics(channel)
        m.records.inc(n)
        m.bytes.inc(size)
        self.records_in += n
        self.bytes_in += size
        self.batches_in += 1
        delay = max(0.0, time.time() - arrival_ms / 1000) if arrival_ms else None
        if delay is not None:
            m.delay.observe(delay)
        figures = self.figures
        figures.received(channel, n, size, delay)
        if channel in self.tapped and self.tap is not None:
            self.tap(channel, agent_id, records)
        route = self.table.get(channel)
        if route is None:
            m.no_route.inc(n)
            figures.no_route(channel, n)
            now = time.monotonic()
            if now - self._no_route_logged.get(channel, -1e9) >= self.no_route_log_interval_s:
                self._no_route_logged[channel] = now
                log.warning("no route for channel; records dropped",
                            extra={"channel": channel, "agent_id": agent_id, "records": n})
            return None
        # Every output is found before any is given the records: a batch refused because one is missing goes
        # to none of them (its resend then duplicates nothing).
        plan = []
        for entry in route.entries:
            selected = entry.select(records, proto_fields)
            if not selected:
                continue
            sink = self.outputs.get(entry.stream_to_id)
            if sink is None:
                figures.settled(channel, n, size, False, 0.0)
                return _failed(OutputError(f"route of channel {channel} names stream_to {entry.stream_to_id}, "
                                           "which does not exist"), m)
            plan.append((sink, selected, entry))
        futs = []
        for sink, selected, entry in plan:
            t_out = time.perf_counter()
            out = sink.submit(selected, agent_id, entry.target, channel)
            k, b = len(selected), sum(map(len, selected))
            out.add_done_callback(lambda f, label=sink.label, k=k, b=b, t=t_out: figures.output_settled(
                label, k, b, _ok(f), time.perf_counter() - t))
            futs.append(out)
        if not futs:
            return None
        fut = futs[0] if len(futs) == 1 else asyncio.gather(*futs)
        t0 = time.perf_counter()
        fut.add_done_callback(lambda f: _settled(f, m, t0, figures, channel, n, size))
        return fut


def _ok(f: asyncio.Future) -> bool:
    return not f.cancelled() and f.exception() is None


def _settled(f: asyncio.Future, m: _ChannelMetrics, t0: float, figures: Figures, channel: int, n: int,
             size: int) -> None:
    dt = time.perf_counter() - t0
    ok = _ok(f)
    if not ok:
        m.errors.inc()
    else:
        m.latency.observe(dt)
    figures.settled(channel, n, size, ok, dt)


def _failed(exc: Exception, m: _ChannelMetrics) -> asyncio.Future:
    m.errors.inc()
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut

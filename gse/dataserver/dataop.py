"""A data server's operating figures (what the original called DataOp): per DataID (channel) and per output.

Per channel: records and bytes in (received) and out (taken by every output of the route), dropped (no
route, or an output refused the batch: the agent sends it again), latency (from receiving a batch to every
output having taken it) and delay (from the agent reading the batch's first record to this server receiving
it). Per output: records and bytes taken, errors, latency (submit to the output's acknowledgement), and what
waits in its queue now. Plus the agent streams held.

Two views of the same counts: Prometheus metrics (counters and histograms, gse/dataserver/router.py and
outputs.py; `gse data top` reads them from every data server), and every `ops_interval_s` one record on the
reserved channel CHANNEL_DATASERVER_OPS (routable like any data), built by `Figures.record`: totals since
start, the interval's deltas, and latency percentiles of the interval (p50, p90, p99, max, in ms) from a
bounded sample of it.
"""

from __future__ import annotations

import random
import time

from prometheus_client import Counter, Gauge

CH_OUT_RECORDS = Counter("gse_dataserver_channel_out_records_total",
                         "Records of a channel every output of its route took", ["channel"])
CH_OUT_BYTES = Counter("gse_dataserver_channel_out_bytes_total",
                       "Record bytes of a channel every output of its route took", ["channel"])
OUT_QUEUED = Gauge("gse_dataserver_output_queued_records", "Records waiting in an output's queue", ["output"])

SAMPLE = 4096           # latency samples kept per interval and series (reservoir)


class Window:
    """Samples of one interval (a uniform reservoir of SAMPLE) -> percentiles in ms."""
    __slots__ = ("samples", "seen")

    def __init__(self):
        self.samples: list[float] = []
        self.seen = 0

    def add(self, seconds: float) -> None:
        """One latency sample, in seconds (kept in the reservoir with probability SAMPLE / seen)."""
        self.seen += 1
        if len(self.samples) < SAMPLE:
            self.samples.append(seconds)
        else:
            k = random.randrange(self.seen)
            if k < SAMPLE:
                self.samples[k] = seconds

    def take(self) -> dict:
        """{n, p50, p90, p99, max} in ms of the interval, and start a new one."""
        s = sorted(self.samples)
        n = self.seen
        self.samples, self.seen = [], 0
        if not s:
            return {"n": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}

        def q(p: float) -> float:
            return round(1000 * s[min(len(s) - 1, int(p * len(s)))], 3)
        return {"n": n, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(1000 * s[-1], 3)}


class _Series:
    __slots__ = ("counts", "last", "latency", "delay")
    KEYS = ()

    def __init__(self):
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.last = dict(self.counts)
        self.latency = Window()
        self.delay = Window()

    def interval(self) -> dict:
        out = {k: v for k, v in self.counts.items()}
        out.update({f"{k}_interval": v - self.last[k] for k, v in self.counts.items()})
        self.last = dict(self.counts)
        return out


class _Channel(_Series):
    KEYS = ("records_in", "bytes_in", "records_out", "bytes_out", "dropped", "no_route", "errors")


class _Output(_Series):
    KEYS = ("records", "bytes", "errors")


class Figures:
    """The counts behind the operating figures; the router reports into it (gse/dataserver/router.py)."""

    def __init__(self):
        self.channels: dict[int, _Channel] = {}
        self.outputs: dict[str, _Output] = {}
        self.started = time.time()
        self._out_metrics: dict[int, tuple] = {}

    def channel(self, ch: int) -> _Channel:
        """The counts of DataID `ch` (made at first use)."""
        c = self.channels.get(ch)
        if c is None:
            c = self.channels[ch] = _Channel()
        return c

    def output(self, label: str) -> _Output:
        """The counts of the output labelled `label` (made at first use)."""
        o = self.outputs.get(label)
        if o is None:
            o = self.outputs[label] = _Output()
        return o

    def received(self, ch: int, n: int, size: int, delay_s: float | None) -> None:
        """A batch of DataID `ch` arrived: `n` records of `size` bytes; `delay_s` from the agent reading its first
        record to now (None when unknown)."""
        c = self.channel(ch)
        c.counts["records_in"] += n
        c.counts["bytes_in"] += size
        if delay_s is not None:
            c.delay.add(delay_s)

    def no_route(self, ch: int, n: int) -> None:
        """`n` records of DataID `ch` had no route: counted as no_route and dropped."""
        c = self.channel(ch)
        c.counts["no_route"] += n
        c.counts["dropped"] += n

    def settled(self, ch: int, n: int, size: int, ok: bool, seconds: float) -> None:
        """A batch of channel `ch` was taken by every output (ok) or refused by one (its records dropped here,
        sent again by the agent)."""
        c = self.channel(ch)
        if ok:
            c.counts["records_out"] += n
            c.counts["bytes_out"] += size
            c.latency.add(seconds)
            m = self._out_metrics.get(ch)
            if m is None:
                m = self._out_metrics[ch] = (CH_OUT_RECORDS.labels(str(ch)), CH_OUT_BYTES.labels(str(ch)))
            m[0].inc(n)
            m[1].inc(size)
        else:
            c.counts["dropped"] += n
            c.counts["errors"] += 1

    def output_settled(self, label: str, n: int, size: int, ok: bool, seconds: float) -> None:
        """An output took (`ok`) a batch of `n` records, `size` bytes, `seconds` after it was submitted, or failed it
        (one error)."""
        o = self.output(label)
        if ok:
            o.counts["records"] += n
            o.counts["bytes"] += size
            o.latency.add(seconds)
        else:
            o.counts["errors"] += 1

    def record(self, sinks: dict, agents: int, interval_s: float) -> dict:
        """The interval's figures (a JSON object), and start the next interval."""
        channels = {}
        for ch, c in sorted(self.channels.items()):
            channels[str(ch)] = {**c.interval(), "latency_ms": c.latency.take(), "delay_ms": c.delay.take()}
        outputs = {}
        for label, o in sorted(self.outputs.items()):
            outputs[label] = {**o.interval(), "latency_ms": o.latency.take()}
        for sink in sinks.values():
            queued = queued_records(sink)
            OUT_QUEUED.labels(sink.label).set(queued)
            entry = outputs.setdefault(sink.label, {**_Output().interval(), "latency_ms": Window().take()})
            entry["queued_records"] = queued
            entry["last_error"] = getattr(sink, "last_error", "")
        return {"interval_s": interval_s, "agents": agents, "channels": channels, "outputs": outputs}


def queued_records(sink) -> int:
    """Records waiting in an output's queue (outputs that write at once have none)."""
    queue = getattr(sink, "queue", None)
    if not queue:
        return 0
    return sum(len(item.records) for item in list(queue))

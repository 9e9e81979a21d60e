"""Metrics that cost nothing until they are scraped: what the agent (and the modules it shares with the
servers) count with.

prometheus_client costs a process about 10 MB once imported (it brings http.server, wsgiref, threading
helpers, ...); an idle agent on every host should not pay that for metrics nobody may ever read. These
classes take the calls of prometheus_client's Counter, Gauge and Histogram that the code makes
(`labels(...)`, `inc`, `dec`, `set`, `observe`) and keep the values in plain dicts; `install()` (called by
whoever serves /metrics, when it is first scraped) imports prometheus_client and registers one collector that
exposes them, with the same names, help, labels and types. Servers that import prometheus_client anyway get
these metrics on the same /metrics page.
"""

from __future__ import annotations

import bisect
import math
import threading

_METRICS: list["_Metric"] = []
_installed = False
_lock = threading.Lock()

DEFAULT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _Child:
    __slots__ = ("value", "buckets", "sum", "upper")

    def __init__(self, upper: tuple | None = None):
        self.value = 0.0
        self.upper = upper
        self.buckets = [0] * len(upper) if upper else None
        self.sum = 0.0

    def inc(self, amount: float = 1) -> None:
        """Counter or gauge: add `amount`."""
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        """Gauge: subtract `amount`."""
        self.value -= amount

    def set(self, value: float) -> None:
        """Gauge: the value now."""
        self.value = float(value)

    def observe(self, amount: float) -> None:
        """Histogram: count `amount` (seconds, bytes...) in its bucket, its sum and the count (`value`)."""
        self.buckets[bisect.bisect_left(self.upper, amount)] += 1
        self.sum += amount
        self.value += 1


class _Metric:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames=(), buckets=None):
        self.name = name[:-len("_total")] if self.kind == "counter" and name.endswith("_total") else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        upper = tuple(sorted(buckets or DEFAULT_BUCKETS)) if self.kind == "histogram" else None
        if upper is not None and upper[-1] != math.inf:
            upper = upper + (math.inf,)
        self.upper = upper
        self.children: dict[tuple, _Child] = {}
        if not self.labelnames:
            self.children[()] = _Child(upper)
        with _lock:
            _METRICS.append(self)

    def labels(self, *values, **kw) -> _Child:
        """The child for these label values (positional in `labelnames` order, or by name), made on first use;
        ValueError when their number is not the metric's (as prometheus_client's labels())."""
        if kw:
            values = tuple(kw[n] for n in self.labelnames)
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Child(self.upper)
        return child

    # the label-less metric is its own child
    def inc(self, amount: float = 1) -> None:
        """A label-less metric: add `amount` (see _Child.inc)."""
        self.children[()].inc(amount)

    def dec(self, amount: float = 1) -> None:
        """A label-less gauge: subtract `amount`."""
        self.children[()].dec(amount)

    def set(self, value: float) -> None:
        """A label-less gauge: the value now."""
        self.children[()].set(value)

    def observe(self, amount: float) -> None:
        """A label-less histogram: count `amount` in its bucket."""
        self.children[()].observe(amount)


class Counter(_Metric):
    """A counter with prometheus_client's Counter calls (`labels`, `inc`); a name ending in _total is exposed as
    prometheus_client would."""
    kind = "counter"


class Gauge(_Metric):
    """A gauge with prometheus_client's Gauge calls (`labels`, `inc`, `dec`, `set`)."""
    kind = "gauge"


class Histogram(_Metric):
    """A histogram with prometheus_client's Histogram calls (`labels`, `observe`); `buckets` are upper bounds (+Inf
    added), DEFAULT_BUCKETS when not given."""
    kind = "histogram"


def _families(describe: bool = False):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    with _lock:
        metrics = list(_METRICS)
    for m in metrics:
        if m.kind == "counter":
            fam = CounterMetricFamily(m.name, m.documentation, labels=m.labelnames)
        elif m.kind == "gauge":
            fam = GaugeMetricFamily(m.name, m.documentation, labels=m.labelnames)
        else:
            fam = HistogramMetricFamily(m.name, m.documentation, labels=m.labelnames)
        if not describe:
            for key, child in list(m.children.items()):
                if m.kind == "histogram":
                    acc, buckets = 0, []
                    for upper, n in zip(m.upper, child.buckets):
                        acc += n
                        buckets.append(("+Inf" if upper == math.inf else repr(upper), acc))
                    fam.add_metric(list(key), buckets, child.sum)
                else:
                    fam.add_metric(list(key), child.value)
        yield fam


class _Collector:
    def collect(self):
        """prometheus_client's collector call at scrape time: every lazy metric's families with their samples."""
        return _families()

    def describe(self):
        """prometheus_client's registration call: the families without samples (their names and types)."""
        return _families(describe=True)

    @property
    def metrics(self) -> list[_Metric]:
        """The lazy metrics made so far, in the order they were made."""
        return list(_METRICS)


COLLECTOR = _Collector()


def install() -> None:
    """Expose the lazy metrics through prometheus_client's default registry (imports it; once)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    from prometheus_client import REGISTRY
    REGISTRY.register(COLLECTOR)

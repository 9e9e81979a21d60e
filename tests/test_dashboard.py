"""The Grafana dashboard in deploy/grafana/ asks only for what the daemons export: every metric a query names
is one the code registers (with the suffix its type exposes), and every label a query groups by is one of
that metric's labels."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

from gse.common import lazymetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gse-overview.json"
DAEMONS = ("gse.agent.agent", "gse.taskserver.server", "gse.dataserver.server", "gse.dbproxy.server",
           "gse.apiserver.server", "gse.fileserver.server", "gse.procmgr.server", "gse.alarm.server",
           "gse.syncdata.server", "gse.common.service", "gse.common.gctune")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}


def exported() -> dict[str, set[str]]:
    """Every metric name the daemons expose -> its label names."""
    for m in DAEMONS:
        importlib.import_module(m)
    out: dict[str, set[str]] = {}
    for m in lazymetrics.COLLECTOR.metrics:                  # what the agent and shared modules count lazily
        for suffix in SUFFIXES[m.kind]:
            out[m.name + suffix] = set(m.labelnames) | ({"le"} if suffix == "_bucket" else set())
    for collector in list(REGISTRY._collector_to_names):     # (families of labelled metrics carry no sample
        if collector is lazymetrics.COLLECTOR:                 # until used: describe)
            continue
        for fam in collector.describe() if hasattr(collector, "describe") else ():
            labels = set(getattr(collector, "_labelnames", ()))
            for suffix in SUFFIXES.get(fam.type, ("",)):
                out[fam.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_name_only_exported_metrics_and_labels():
    names = exported()
    qs = queries()
    assert len(qs) >= 12
    for expr in qs:
        used = re.findall(r"\b(gse_[a-z0-9_]+)\b", expr)
        assert used, expr
        for name in used:
            assert name in names, f"{name} (in {expr!r}) is not a metric the daemons export"
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert any(label in names[n] for n in used), f"no metric in {expr!r} has label {label!r}"
        for label in re.findall(r"\{(\w+)=", expr):
            assert any(label in names[n] for n in used), f"no metric in {expr!r} has label {label!r}"


def test_dashboard_covers_what_operators_watch():
    text = " ".join(queries())
    for metric in ("gse_taskserver_agents_online", "gse_taskserver_task_dispatched_total",
                   "gse_taskserver_task_result_seconds_bucket", "gse_dataserver_channel_records_total",
                   "gse_dbproxy_batch_seconds_bucket"):
        assert metric in text

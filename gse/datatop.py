"""`gse data top`: the data path's operating figures, live and cluster-wide.

Every data server registered in ZooKeeper (`<root>/dataserver/<node>`, its `metrics` address) is scraped
(`/metrics`, the Prometheus text) twice `interval` seconds apart; the differences give, summed over the
servers, per DataID (channel): records and bytes per second in and out, dropped and failed batches per
second, and the latency percentiles of the interval (from the histogram buckets: receive -> every output
took it); per output: records and bytes per second, errors, records queued now, latency p99; per server:
agent streams and records per second. `--once` prints one round; otherwise it refreshes until Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    """One data server's samples: (metric name, frozen labels) -> value."""
    node: str
    at: float
    values: dict[tuple[str, tuple], float] = field(default_factory=dict)
    error: str = ""


def scrape(node: str, address: str, timeout: float = 5.0) -> Scrape:
    """Read one data server's /metrics at `address` (host:port) and keep its gse_dataserver_* samples, stamped with
    the monotonic time; an unreachable server gives a Scrape whose `error` says why (never raises OSError)."""
    s = Scrape(node, time.monotonic())
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError as exc:
        s.error = str(exc)
        return s
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("gse_dataserver_"):
            continue
        for sample in fam.samples:
            s.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return s


def _sum_by(s: Scrape, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in s.values.items():
        if n == name:
            out[dict(labels).get(label, "")] += v
    return out


def _buckets(s: Scrape, name: str, label: str) -> dict[str, dict[float, float]]:
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (n, labels), v in s.values.items():
        if n == f"{name}_bucket":
            d = dict(labels)
            out[d.get(label, "")][float(d["le"])] += v
    return out


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile (seconds) of a histogram's cumulative buckets (linear within a bucket, as PromQL's
    histogram_quantile); None without observations."""
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / max(c - prev_c, 1e-12))
        prev_b, prev_c = b, c
    return prev_b


def figures(before: list[Scrape], after: list[Scrape]) -> dict:
    """Cluster-wide figures between two rounds of scrapes (same servers, in the same order)."""
    channels: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    outputs: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    servers = []
    ch_lat: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    out_lat: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for a, b in zip(before, after):
        if a.error or b.error:
            servers.append({"node": b.node, "error": b.error or a.error})
            continue
        dt = max(1e-6, b.at - a.at)

        def rate(name, label, into, key):
            x, y = _sum_by(a, name, label), _sum_by(b, name, label)
            for k, v in y.items():
                into[k][key] += max(0.0, v - x.get(k, 0.0)) / dt

        rate("gse_dataserver_channel_records_total", "channel", channels, "in_rps")
        rate("gse_dataserver_channel_bytes_total", "channel", channels, "in_bps")
        rate("gse_dataserver_channel_out_records_total", "channel", channels, "out_rps")
        rate("gse_dataserver_channel_out_bytes_total", "channel", channels, "out_bps")
        rate("gse_dataserver_channel_dropped_total", "channel", channels, "dropped_rps")
        rate("gse_dataserver_channel_errors_total", "channel", channels, "failed_batches_ps")
        rate("gse_dataserver_output_records_total", "output", outputs, "rps")
        rate("gse_dataserver_output_bytes_total", "output", outputs, "bps")
        rate("gse_dataserver_output_errors_total", "output", outputs, "errors_ps")
        for k, v in _sum_by(b, "gse_dataserver_output_queued_records", "output").items():
            outputs[k]["queued"] += v
        for name, into, label in (("gse_dataserver_channel_seconds", ch_lat, "channel"),
                                  ("gse_dataserver_output_seconds", out_lat, "output")):
            x, y = _buckets(a, name, label), _buckets(b, name, label)
            for k, bk in y.items():
                for le, c in bk.items():
                    into[k][le] += c - x.get(k, {}).get(le, 0.0)
        streams = sum(_sum_by(b, "gse_dataserver_agent_streams", "").values())
        rin = sum(max(0.0, v - _sum_by(a, "gse_dataserver_channel_records_total", "channel").get(k, 0.0))
                  for k, v in _sum_by(b, "gse_dataserver_channel_records_total", "channel").items()) / dt
        servers.append({"node": b.node, "agent_streams": int(streams), "in_rps": rin})
    for k, bk in ch_lat.items():
        for q in (0.5, 0.99):
            v = quantile(bk, q)
            channels[k][f"p{int(q * 100)}_ms"] = None if v is None else v * 1000
    for k, bk in out_lat.items():
        v = quantile(bk, 0.99)
        outputs[k]["p99_ms"] = None if v is None else v * 1000
    return {"servers": servers, "channels": {k: dict(v) for k, v in channels.items()},
            "outputs": {k: dict(v) for k, v in outputs.items()}}


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render(fig: dict, interval: float) -> str:
    """The text screen of `figures()`: one table of servers, one per DataID (rates per second, bytes per second,
    latency in ms), one per output; `interval` (seconds) is only named in the heading."""
    lines = [f"gse data top: {len(fig['servers'])} data server(s), rates over {interval:g} s"]
    rows = [["server", "agent streams", "records/s in"]]
    for s in fig["servers"]:
        rows.append([s["node"], s.get("agent_streams", "-") if "error" not in s else f"error: {s['error']}",
                     _fmt(s.get("in_rps"))])
    lines.append(_table(rows))
    rows = [["DataID", "in rec/s", "in B/s", "out rec/s", "out B/s", "dropped/s", "failed/s", "p50 ms", "p99 ms"]]
    for k, c in sorted(fig["channels"].items(), key=lambda kv: -kv[1].get("in_rps", 0.0)):
        rows.append([k, _fmt(c.get("in_rps")), _fmt(c.get("in_bps"), 0), _fmt(c.get("out_rps")),
                     _fmt(c.get("out_bps"), 0), _fmt(c.get("dropped_rps")), _fmt(c.get("failed_batches_ps")),
                     _fmt(c.get("p50_ms"), 2), _fmt(c.get("p99_ms"), 2)])
    lines.append(_table(rows))
    rows = [["output", "rec/s", "B/s", "errors/s", "queued", "p99 ms"]]
    for k, o in sorted(fig["outputs"].items()):
        rows.append([k, _fmt(o.get("rps")), _fmt(o.get("bps"), 0), _fmt(o.get("errors_ps")),
                     _fmt(int(o.get("queued", 0))), _fmt(o.get("p99_ms"), 2)])
    lines.append(_table(rows))
    return "\n\n".join(lines)


def _table(rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def dataservers_from_zookeeper(hosts: str, root: str) -> dict[str, str]:
    """node -> metrics address of every data server registered in ZooKeeper."""
    from kazoo.client import KazooClient
    zk = KazooClient(hosts=hosts, timeout=10)
    zk.start(timeout=15)
    try:
        out = {}
        path = f"{root.rstrip('/')}/dataserver"
        for child in zk.get_children(path) if zk.exists(path) else []:
            data, _ = zk.get(f"{path}/{child}")
            info = json.loads(data or b"{}")
            if info.get("metrics"):
                out[child] = info["metrics"]
        return out
    finally:
        zk.stop()
        zk.close()


def run(servers: dict[str, str], interval: float, once: bool, as_json: bool = False, out=sys.stdout) -> int:
    """Scrape `servers` (node -> metrics host:port) every `interval` seconds and print the figures of each interval to
    `out` (JSON lines with `as_json`; the screen is cleared between rounds on a terminal); one round with `once`.
    Returns 0, or 1 when there is no data server."""
    if not servers:
        print("gse data top: no data server found", file=sys.stderr)
        return 1
    nodes = sorted(servers)
    before = [scrape(n, servers[n]) for n in nodes]
    while True:
        time.sleep(interval)
        after = [scrape(n, servers[n]) for n in nodes]
        fig = figures(before, after)
        if as_json:
            print(json.dumps(fig), file=out, flush=True)
        else:
            text = render(fig, interval)
            if not once and out.isatty():
                text = "\x1b[H\x1b[2J" + text
            print(text, file=out, flush=True)
        if once:
            return 0
        before = after

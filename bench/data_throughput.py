"""Data path throughput benchmark: plugins -> agents -> one data server -> a Redis or a Kafka output.

Starts its own cluster (ZooKeeper, Redis for dbproxy and another as the output, dbproxy, task server, API
server, the tansu Kafka-protocol broker, ONE data server, N agents). For each record size and output:

1. saturation: one plugin process per agent sends records of the given size as fast as its agent reads them
   for --duration seconds; the data server's sustained records/s and MB/s are read from its own /metrics
   counters over the window after a warm-up;
2. paced (unless --no-paced): the same at about half of that rate, for latency that is not queueing.

Each record carries (agent, sequence, send time in us); a consumer process reads the output (Redis LPOP of
the list, or an aiokafka consumer) and computes end-to-end latency (plugin write -> readable at the output)
and counts every record: lost ones and duplicates are reported. CPU seconds per process kind are reported
too: on this machine everything shares two cores.

    python bench/data_throughput.py --agents 4 --duration 10 --sizes 1024 100 --outputs redis kafka
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from gse.cli import api_call  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402

OP = {"operator_name": "bench"}


# ---- plugin and consumer processes ------------------------------------------------------------------

def plugin_main(path: str, agent: int, channel: int, size: int, duration: float, rate: float, start, out) -> None:
    """One collector plugin: records `agent seq t_us padding` on `channel`, as fast as allowed or at `rate`/s."""
    from gse.testing.plugin import ReportClient

    async def run() -> int:
        client = await ReportClient().connect(path)
        out.put(("ready", agent, 0))
        start.wait()
        seq = 0
        chunk = max(1, min(500, (256 * 1024) // size))
        t0 = time.perf_counter()
        end = t0 + duration
        pad = b"x" * size
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if rate > 0:
                due = t0 + seq / rate
                if due > now:
                    await asyncio.sleep(due - now)
            t_us = time.time_ns() // 1000
            recs = []
            for _ in range(chunk):
                head = b"%d %d %d " % (agent, seq, t_us)
                recs.append((channel, head + pad[:size - len(head)]))
                seq += 1
            await client.send_many(recs)
        await client.close()
        return seq

    out.put(("plugin", agent, asyncio.run(run())))


def consumer_main(kind: str, target: dict, n_agents: int, stop, out) -> None:
    """Reads the output until told to stop and drained; reports latencies (ms) and per-agent counts."""
    import array

    try:
        os.nice(-5)             # the instrument: it must keep up, or its own lag is measured as latency
    except OSError:
        pass
    seen = [bytearray(0) for _ in range(n_agents)]
    counts = {"received": 0, "duplicates": 0}
    lat = array.array("f")

    def take(value: bytes, now_us: int) -> None:
        a, s, t, _ = value.split(b" ", 3)
        a, s = int(a), int(s)
        b = seen[a]
        if s >= len(b):
            b.extend(bytes(max(s + 1 - len(b), 65536)))
        if b[s]:
            counts["duplicates"] += 1
        else:
            b[s] = 1
            counts["received"] += 1
        lat.append((now_us - int(t)) / 1000.0)

    idle_since = None
    if kind == "redis":
        import redis
        r = redis.Redis(host=target["host"], port=target["port"])
        r.ping()
        out.put(("ready", -1, 0))
        while True:
            vals = r.lpop(target["key"], 5000)
            now = time.time_ns() // 1000
            if vals:
                idle_since = None
                for v in vals:
                    take(v, now)
                continue
            if stop.is_set():
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 2.0:
                    break
            time.sleep(0.002)
    else:
        from aiokafka import AIOKafkaConsumer

        async def run() -> None:
            nonlocal idle_since
            c = AIOKafkaConsumer(target["topic"], bootstrap_servers=target["bootstrap"],
                                 auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                                 fetch_max_bytes=16 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
                                 fetch_max_wait_ms=20)
            await c.start()
            out.put(("ready", -1, 0))
            try:
                while True:
                    batch = await c.getmany(timeout_ms=200, max_records=20_000)
                    now = time.time_ns() // 1000
                    got = 0
                    for msgs in batch.values():
                        for m in msgs:
                            take(m.value, now)
                        got += len(msgs)
                    if got:
                        idle_since = None
                    elif stop.is_set():
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since > 3.0:
                            break
            finally:
                await c.stop()
        asyncio.run(run())
    per_agent = [sum(b) for b in seen]
    s = sorted(lat)
    pct = (lambda p: round(s[min(len(s) - 1, int(p / 100 * (len(s) - 1)))], 1) if s else None)
    out.put(("consumer", {"received": counts["received"], "duplicates": counts["duplicates"],
                          "per_agent": per_agent, "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": pct(100)}))


# ---- cluster and measurement --------------------------------------------------------------------------

def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def hist_quantile(m0: dict, m1: dict, name: str, channel: str, q: float) -> float | None:
    """A quantile (ms) of a data server histogram over the window, from its bucket counts (upper bounds)."""
    buckets = []
    for k, v in m1.items():
        if k.startswith(f"{name}_bucket{{") and f'channel="{channel}"' in k:
            le = k.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), v - m0.get(k, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    want = q * buckets[-1][1]
    for le, n in buckets:
        if n >= want:
            return round(le * 1000, 1) if le != float("inf") else None
    return None


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for kind, ids in pids.items():
        total = 0.0
        for pid in ids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[kind] = total
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.base = tempfile.mkdtemp(prefix="gse-bench-data-")
        self.c = Cluster(self.base, log_format="text", heartbeat_interval_s=10.0)

    def api(self, path: str, body: dict) -> dict:
        r = api_call(self.c.api_url(), self.c.app_code, self.c.app_secret, path, body, timeout=60)
        if r.get("code") != 0:
            raise RuntimeError(f"{path}: {r}")
        return r["data"]

    def start(self) -> None:
        c = self.c
        c.start_zookeeper()
        c.start_redis()
        self.out_redis = c.start_redis()
        c.redis = c.redis[:1]                      # dbproxy uses the first; the second is the output
        c.start_dbproxy(replicas=1)
        c.start_taskserver(data_view_interval_s=1.0)
        c.start_apiserver()
        self.kafka = c.start_kafka()
        self.ds = c.start_dataserver(load_report_interval_s=2.0)
        procs = [c.start_agent(wait=False) for _ in range(self.args.agents)]
        for p in procs:
            c.wait_healthy(p)
        # An agent opens its data stream with its first batch: each run's warm-up covers that.
        rport = self.out_redis.info["port"]
        self.redis_sid = self.api("/api/v2/data/add_streamto", {"operation": OP, "metadata": {"plat_name": "bench"},
                                  "stream_to": {"name": "redis-out", "report_mode": "redis", "redis": {
                                      "storage_address": [{"ip": "127.0.0.1", "port": rport}]}}})["stream_to_id"]
        kport = self.kafka.info["port"]
        self.kafka_sid = self.api("/api/v2/data/add_streamto", {"operation": OP, "metadata": {"plat_name": "bench"},
                                  "stream_to": {"name": "kafka-out", "report_mode": "kafka", "kafka": {
                                      "storage_address": [{"ip": "127.0.0.1", "port": kport}]}}})["stream_to_id"]

    def run(self, output: str, size: int, rate_total: float = 0.0) -> dict:
        a = self.args
        tag = uuid.uuid4().hex[:8]
        if output == "redis":
            target = {"host": "127.0.0.1", "port": self.out_redis.info["port"], "key": f"bench:{tag}"}
            entry = {"stream_to": {"stream_to_id": self.redis_sid,
                                   "redis": {"channel_name": target["key"], "data_type": "list"}}}
        else:
            target = {"bootstrap": self.c.kafka, "topic": f"bench-{tag}"}
            entry = {"stream_to": {"stream_to_id": self.kafka_sid, "kafka": {"topic_name": target["topic"]}}}
        channel = self.api("/api/v2/data/add_route", {"operation": OP, "metadata": {"plat_name": "bench"},
                                                      "route": [entry]})["channel_id"]
        mport = self.ds.info["metrics_port"]
        wait_for(lambda: channel in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{mport}/healthz", timeout=5).read())["channels"], 10, "the route applied")
        ctx = mp.get_context("spawn")
        start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        consumer = ctx.Process(target=consumer_main, args=(output, target, a.agents, stop, out))
        consumer.start()
        rate = rate_total / a.agents if rate_total else 0.0
        plugins = [ctx.Process(target=plugin_main, args=(
            os.path.join(p.info["run_dir"], "ipc.state.report"), i, channel, size, a.duration, rate, start, out))
            for i, p in enumerate(self.c.agents)]
        for p in plugins:
            p.start()
        for _ in range(len(plugins) + 1):                # every plugin connected, the consumer reading
            assert out.get(timeout=60)[0] == "ready"
        pids = {"dataserver": [self.ds.pid], "agents": [p.pid for p in self.c.agents],
                "plugins": [p.pid for p in plugins], "consumer": [consumer.pid],
                "output": [self.out_redis.pid if output == "redis" else self.kafka.pid]}
        ch = str(channel)
        start.set()
        time.sleep(min(2.0, a.duration / 4))             # warm-up
        m0, c0, t0 = metrics(mport), cpu_seconds(pids), time.monotonic()
        time.sleep(max(0.5, a.duration - min(2.0, a.duration / 4) - 0.5))
        m1, c1, t1 = metrics(mport), cpu_seconds(pids), time.monotonic()
        sent = {}
        for _ in plugins:
            kind, agent, n = out.get(timeout=a.duration + 60)
            sent[agent] = n
        for p in plugins:
            p.join(10)
        stop.set()
        _kind, got = out.get(timeout=300)
        consumer.join(10)
        dt = t1 - t0
        rec_key = f'gse_dataserver_channel_records_total{{channel="{ch}"}}'
        byte_key = f'gse_dataserver_channel_bytes_total{{channel="{ch}"}}'
        records_s = (m1.get(rec_key, 0) - m0.get(rec_key, 0)) / dt
        mb_s = (m1.get(byte_key, 0) - m0.get(byte_key, 0)) / dt / 1e6
        total_sent = sum(sent.values())
        lost = sum(max(0, sent[i] - got["per_agent"][i]) for i in sent)
        return {"output": output, "record_bytes": size, "agents": a.agents, "paced_rate": round(rate_total),
                "records_per_s": round(records_s), "mb_per_s": round(mb_s, 1), "sent": total_sent,
                "received": got["received"], "lost": lost, "duplicates": got["duplicates"],
                "latency_p50_ms": got["p50_ms"], "latency_p99_ms": got["p99_ms"], "latency_max_ms": got["max_ms"],
                # Bucket upper bounds from the data server's own histograms: agent -> data server, and
                # data server -> every output acknowledged.
                "ds_delay_p50_ms_le": hist_quantile(m0, m1, "gse_dataserver_channel_delay_seconds", ch, 0.5),
                "ds_delay_p99_ms_le": hist_quantile(m0, m1, "gse_dataserver_channel_delay_seconds", ch, 0.99),
                "ds_output_p50_ms_le": hist_quantile(m0, m1, "gse_dataserver_channel_seconds", ch, 0.5),
                "ds_output_p99_ms_le": hist_quantile(m0, m1, "gse_dataserver_channel_seconds", ch, 0.99),
                "cpu_share": {k: round((c1[k] - c0[k]) / dt, 2) for k in c0}}

    def stop(self, keep: bool = False) -> None:
        self.c.stop()
        if keep:
            print(f"logs kept in {self.base}/logs", flush=True)
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending per run")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 100])
    p.add_argument("--outputs", nargs="+", default=["redis", "kafka"], choices=["redis", "kafka"])
    p.add_argument("--no-paced", action="store_true", help="skip the paced (latency) runs")
    a = p.parse_args()
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}; everything (ZooKeeper, Redis, Kafka, dbproxy, task server, API, ONE data "
          f"server, {a.agents} agents, {a.agents} plugin processes, the consumer) on these cores", flush=True)
    bench = Bench(a)
    results = []
    ok = False
    try:
        bench.start()
        for size in a.sizes:
            for output in a.outputs:
                r = bench.run(output, size)
                results.append(r)
                print(f"{output:5} {size:5} B  saturation: {r['mb_per_s']:6.1f} MB/s {r['records_per_s']:7} rec/s "
                      f"at the data server; end to end p50 {r['latency_p50_ms']} ms p99 {r['latency_p99_ms']} ms "
                      f"(agent->ds p50<={r['ds_delay_p50_ms_le']}, ds->output p50<={r['ds_output_p50_ms_le']}); "
                      f"lost {r['lost']} dup {r['duplicates']} of {r['sent']}; cpu {r['cpu_share']}", flush=True)
                if not a.no_paced and r["records_per_s"]:
                    q = bench.run(output, size, rate_total=r["records_per_s"] * 0.5)
                    results.append(q)
                    print(f"{output:5} {size:5} B  paced {q['paced_rate']} rec/s: {q['mb_per_s']:6.1f} MB/s; "
                          f"end to end p50 {q['latency_p50_ms']} ms p99 {q['latency_p99_ms']} ms (agent->ds p50<="
                          f"{q['ds_delay_p50_ms_le']}, ds->output p50<={q['ds_output_p50_ms_le']}); lost {q['lost']} "
                          f"dup {q['duplicates']} of {q['sent']}; cpu {q['cpu_share']}", flush=True)
        ok = True
    finally:
        bench.stop(keep=not ok)
    print(json.dumps({"benchmark": "data_throughput", "cores": os.cpu_count(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

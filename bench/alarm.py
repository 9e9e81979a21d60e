"""Agent-lost alarms at scale: N simulated agents, K of them killed at once, every report read from Kafka.

Starts its own cluster (ZooKeeper, two Redis nodes, dbproxy R=2, one task server, the API server, a data
server with the tansu Kafka-protocol broker, two alarm daemons with their production timing: scan every
10 s, lost after 30 s, one report a minute) and N simulated agents (bench/simagents.py: the real protocol
over mutual TLS, certificates of their own) in processes of K agents each. Channel 1000 is routed to a
Kafka topic. Then one simulator process holding K agents is SIGKILLed: its K links drop at once.

Prints and ends with one JSON line:
  all_reported_s        from the kill until every one of the K agents had its first record in Kafka
  first_report_s        p50 / max of the same per agent
  gaps_s                p50 / min / max between consecutive reports of one agent (one a minute)
  duplicates            reports of one agent less than half a minute apart (should be 0)
  wrong_agents          records about agents that were not killed (should be 0)
  leader_cpu_pct        the leader's CPU (percent of one core) at steady state before the kill (scanning N
                        sessions every 10 s) and while reporting the K lost agents

    python bench/alarm.py --agents 10000 --killed 1000 --minutes 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gse.common.address import split_host_port  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
from simagents import agent_id, alive_count, api, prepare, spawn_workers, stop_workers  # noqa: E402

OP = {"operator_name": "bench"}


def healthz(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def route_to_kafka(c: Cluster, topic: str) -> None:
    host, port = split_host_port(c.kafka)
    r = api(c, "/api/v2/data/add_streamto", {"operation": OP, "metadata": {"plat_name": "bkmonitor"},
                                               "stream_to": {"name": "alarms", "report_mode": "kafka",
                                                             "kafka": {"storage_address": [{"ip": host,
                                                                                            "port": int(port)}]}}})
    sid = r["data"]["stream_to_id"]
    r = api(c, "/api/v2/data/add_route", {
        "operation": OP, "metadata": {"plat_name": "bkmonitor", "channel_id": 1000}, "stream_filters": [],
        "route": [{"name": "k", "stream_to": {"stream_to_id": sid, "kafka": {"topic_name": topic}}}]})
    assert r["code"] == 0, r


class Tap(threading.Thread):
    """Reads the topic from its start on a thread of its own; (wall-clock s, agent id) per record."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.seen: list[tuple[float, str, int]] = []
        self.stop_flag = False

    def run(self):
        asyncio.run(self._main())

    async def _main(self):
        from aiokafka import AIOKafkaConsumer
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            while not self.stop_flag:
                batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
                now = time.time()
                for tp in batch:
                    for m in batch[tp]:
                        rec = json.loads(m.value)
                        values = rec["value"]
                        self.seen.append((now, values[0]["extra"]["host"][0]["agent_id"], len(values)))
        finally:
            await consumer.stop()


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description="agent-lost alarms at scale")
    p.add_argument("--agents", type=int, default=10000)
    p.add_argument("--killed", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=3.0, help="how long to watch the reports after the kill")
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--ramp", type=float, default=300.0)
    p.add_argument("--steady", type=float, default=30.0, help="seconds of leader CPU measured before the kill")
    args = p.parse_args()
    n, k = args.agents, args.killed
    assert n % k == 0, "--agents must be a multiple of --killed (one simulator process per --killed agents)"
    workers = n // k
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}, load {os.getloadavg()}; {n} agents in {workers} simulator processes, "
          f"{k} killed at once; everything shares these cores", flush=True)
    base = tempfile.mkdtemp(prefix=f"gse-alarm-{n}-")
    c = Cluster(base, heartbeat_interval_s=args.heartbeat)
    procs = []
    out = {"agents": n, "killed": k}
    tap = None
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        ts = c.start_taskserver(balance={"slack": n}, reconnect_rate=250.0)
        c.start_apiserver(max_hosts_per_call=max(5000, n))
        c.start_kafka()
        c.start_dataserver()
        alarms = [c.start_alarm(), c.start_alarm()]
        topic = f"alarm{uuid.uuid4().hex[:8]}"
        route_to_kafka(c, topic)
        tag = os.urandom(2).hex()
        ids = [agent_id(tag, i) for i in range(n)]
        t0 = time.monotonic()
        idents = prepare(c, n, workers, tag, base, "issued")
        procs = spawn_workers(n, workers, ts.info["address"], str(c.certs_dir), tag, base, args.heartbeat,
                              ramp_rate=args.ramp, identities=idents)
        wait_for(lambda: alive_count(c, ids) == n, 900, f"{n} agents alive", interval=2.0)
        print(f"attach: all {n} alive in {time.monotonic() - t0:.1f} s", flush=True)
        lead = wait_for(lambda: next((a for a in alarms if healthz(a.info["metrics_port"]).get("leader")), None),
                        30, "an alarm leader")
        lp = psutil.Process(lead.pid)
        time.sleep(15)
        c0, w0 = cpu(lp), time.monotonic()
        time.sleep(args.steady)
        out["leader_cpu_pct_steady"] = round(100 * (cpu(lp) - c0) / (time.monotonic() - w0), 2)
        h = healthz(lead.info["metrics_port"])
        print(f"steady: leader {lead.name} {out['leader_cpu_pct_steady']} % of one core, last scan of "
              f"{h.get('scanned')} sessions took {h.get('last_scan_s')} s", flush=True)

        tap = Tap(c.kafka, topic)
        tap.start()
        killed = set(ids[:k])           # worker 0 holds agents 0 .. k-1
        kill_at = time.time()
        c1, w1 = cpu(lp), time.monotonic()
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(30)
        watch_s = 70 + args.minutes * 60
        reported_at = None
        while time.time() - kill_at < watch_s:
            time.sleep(1.0)
            firsts = {a for _t, a, _n in tap.seen if a in killed}
            if reported_at is None and len(firsts) == k:
                reported_at = time.time() - kill_at
                print(f"all {k} reported {reported_at:.1f} s after the kill", flush=True)
        out["leader_cpu_pct_reporting"] = round(100 * (cpu(lp) - c1) / (time.monotonic() - w1), 2)
        tap.stop_flag = True
        tap.join(10)
        per: dict[str, list[float]] = {}
        wrong = 0
        multi = 0
        for t, a, nvalues in tap.seen:
            if nvalues != 1:
                multi += 1
            if a not in killed:
                wrong += 1
                continue
            per.setdefault(a, []).append(t)
        firsts = sorted(ts_[0] - kill_at for ts_ in per.values())
        gaps = [b - a for ts_ in per.values() for a, b in zip(ts_, ts_[1:])]
        out.update({
            "all_reported_s": round(reported_at, 1) if reported_at is not None else None,
            "reported_agents": len(per),
            "first_report_s": {"p50": round(statistics.median(firsts), 1), "max": round(max(firsts), 1)}
            if firsts else None,
            "gaps_s": {"p50": round(statistics.median(gaps), 1), "min": round(min(gaps), 1),
                       "max": round(max(gaps), 1)} if gaps else None,
            "reports_per_agent": {"min": min(map(len, per.values())), "max": max(map(len, per.values()))}
            if per else None,
            "duplicates": sum(1 for g in gaps if g < 30),
            "wrong_agents": wrong,
            "records_with_more_than_one_value": multi,
            "load_after": os.getloadavg(),
        })
        print(f"reports: {out}", flush=True)
    finally:
        if tap is not None:
            tap.stop_flag = True
        stop_workers(procs[1:] if procs else [])
        c.stop()
    print(json.dumps(out))
    ok = out.get("all_reported_s") is not None and out["all_reported_s"] <= 70 and out.get("duplicates") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

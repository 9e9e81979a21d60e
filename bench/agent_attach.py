"""Attach benchmark: N simulated agents attach to one task server.

Starts its own cluster (ZooKeeper, two Redis nodes, dbproxy with R=2, one task server, API server) under a
temporary directory, then simulated agents (real protocol, real mutual TLS, one 127.x.y.z source address
each) spread over several worker processes. Reports, per N:
  attach_s            from starting the workers until the API shows every agent alive
  rss_mb_per_1k       task server RSS per 1,000 agents (total RSS / N * 1000), and the growth over idle
  heartbeat_cpu_pct   task server CPU at steady heartbeat (percent of one core)

    python bench/agent_attach.py --agents 1000 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from gse.cli import api_call  # noqa: E402
from gse.devcluster import Cluster  # noqa: E402

sys.path.insert(0, HERE)
from simagents import agent_id, prepare, spawn_workers, stop_workers  # noqa: E402


def count_alive(cluster: Cluster, ids: list[str]) -> int:
    alive = 0
    for i in range(0, len(ids), 5000):
        r = api_call(cluster.api_url(), cluster.app_code, cluster.app_secret, "/api/v2/cluster/list_agent_state",
                     {"agent_id_list": ids[i:i + 5000]}, timeout=60)
        alive += sum(1 for d in (r.get("data") or []) if d["status_code"] == 2)
    return alive


def cpu_pct(proc: psutil.Process, seconds: float) -> float:
    t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    return 100.0 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def run_one(n: int, workers: int, heartbeat: float, steady: float, timeout: float) -> dict:
    base = tempfile.mkdtemp(prefix=f"gse-attach-{n}-")
    cluster = Cluster(base, heartbeat_interval_s=heartbeat)
    tag = os.urandom(2).hex()
    procs = []
    try:
        cluster.start_zookeeper()
        cluster.start_redis()
        cluster.start_redis()
        cluster.start_dbproxy(replicas=2)
        ts = cluster.start_taskserver()
        cluster.start_apiserver()
        tsp = psutil.Process(ts.pid)
        idle_rss = tsp.memory_info().rss
        ids = [agent_id(tag, i) for i in range(n)]
        idents = prepare(cluster, n, workers, tag, base, "issued")     # each agent its own certificate
        t0 = time.monotonic()
        procs = spawn_workers(n, workers, ts.info["address"], str(cluster.certs_dir), tag, base, heartbeat,
                              identities=idents)
        alive = 0
        while time.monotonic() - t0 < timeout:
            alive = count_alive(cluster, ids)
            if alive == n:
                break
            time.sleep(0.5)
        attach_s = time.monotonic() - t0
        if alive < n:
            print(f"N={n}: only {alive} alive after {timeout}s", file=sys.stderr)
        time.sleep(min(heartbeat * 2, 20))            # let heartbeats settle into their spread
        cpu = cpu_pct(tsp, steady)
        rss = tsp.memory_info().rss
        alive_after = count_alive(cluster, ids)
        return {"agents": n, "workers": workers, "attached": alive, "attach_s": round(attach_s, 2),
                "alive_after_steady": alive_after, "heartbeat_interval_s": heartbeat,
                "heartbeat_cpu_pct": round(cpu, 1), "rss_mb": round(rss / 2**20, 1),
                "rss_mb_per_1k": round(rss / 2**20 / n * 1000, 1),
                "rss_growth_mb_per_1k": round((rss - idle_rss) / 2**20 / n * 1000, 1)}
    finally:
        stop_workers(procs)
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description="N simulated agents attach to one task server")
    p.add_argument("--agents", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--steady", type=float, default=30.0, help="seconds of steady heartbeat to measure CPU over")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"python {platform.python_version()}; workers share the machine with the servers")
    results = []
    for n in args.agents:
        r = run_one(n, args.workers, args.heartbeat, args.steady, args.timeout)
        results.append(r)
        print(f"N={n:>6}: all online in {r['attach_s']:.2f}s, task server {r['rss_mb']} MB RSS "
              f"({r['rss_mb_per_1k']} MB per 1k, +{r['rss_growth_mb_per_1k']} MB per 1k over idle), "
              f"{r['heartbeat_cpu_pct']}% CPU at a {args.heartbeat:g}s heartbeat", flush=True)
    print(json.dumps({"bench": "agent_attach", "results": results}))
    return 0 if all(r["attached"] == r["agents"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

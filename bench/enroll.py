"""Enrollment of N agents: one-time tokens made, every agent enrolls (key made on the host, CSR, signed on
the task server) and attaches with its own certificate.

Starts its own cluster (ZooKeeper, two Redis, dbproxy R=2, K task servers with enrollment on, the API
server), makes N tokens in ZooKeeper (as `gse certs token --count N`), then starts N simulated agents
(bench/simagents.py --identity enroll: exactly the real agent's exchange) at --ramp agents/s. Shared-
certificate mode is off, so an agent alive in the API is one holding a certificate that names its own id.
Prints one JSON line:

  tokens_s       making the N tokens
  enroll_s       from starting the agents until the task servers signed N certificates
                 (gse_taskserver_enrolled_total)
  attach_s       from starting the agents until all N are alive in the API with their own certificates
  enroll_refused Refused codes the agents saw while enrolling (busy: retried), summed over simulators
  taskserver_cpu_s   task servers' CPU over the whole run (enrollment, handshakes, hellos)

    flock /tmp/gse-bench.lock .venv/bin/python bench/enroll.py --agents 10000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gse.cli import api_call  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
from simagents import agent_id, prepare, spawn_workers, stop_workers  # noqa: E402

CHUNK = 5000


def enrolled(servers) -> int:
    n = 0
    for ts in servers:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ts.info['metrics_port']}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("gse_taskserver_enrolled_total "):
                n += int(float(line.split()[1]))
    return n


def alive(c: Cluster, ids: list[str]) -> int:
    n = 0
    for i in range(0, len(ids), CHUNK):
        r = api_call(c.api_url(), c.app_code, c.app_secret, "/api/v2/cluster/list_agent_state",
                     {"agent_id_list": ids[i:i + CHUNK]}, timeout=120)
        n += sum(1 for d in (r.get("data") or []) if d["status_code"] == 2)
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--taskservers", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="simulator processes (default one per 5,000, at least 2)")
    p.add_argument("--ramp", type=float, default=300.0, help="agents started per second")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    n, k = args.agents, args.taskservers
    workers = args.workers or max(2, (n + 4999) // 5000)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {n} agents enrolling on {k} task "
          f"server(s), {workers} simulator processes, started at {args.ramp:.0f}/s", flush=True)
    base = tempfile.mkdtemp(prefix=f"gse-enroll-{n}-")
    c = Cluster(base, heartbeat_interval_s=10.0)
    procs: list = []
    out: dict = {"agents": n, "taskservers": k, "ramp_per_s": args.ramp}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        servers = [c.start_taskserver(balance={"slack": max(50, n // 20)}) for _ in range(k)]
        c.start_apiserver(max_hosts_per_call=max(5000, n))
        tsp = [psutil.Process(t.pid) for t in servers]
        cpu0 = sum(sum(pp.cpu_times()[:2]) for pp in tsp)
        tag = os.urandom(2).hex()
        ids = [agent_id(tag, i) for i in range(n)]
        t0 = time.monotonic()
        idents = prepare(c, n, workers, tag, base, "enroll")
        out["tokens_s"] = round(time.monotonic() - t0, 2)
        print(f"tokens: {n} made in {out['tokens_s']} s", flush=True)
        t0 = time.monotonic()
        procs = spawn_workers(n, workers, ",".join(t.info["address"] for t in servers), str(c.certs_dir), tag,
                              base, ramp_rate=args.ramp, identities=idents)
        wait_for(lambda: enrolled(servers) >= n, args.timeout, f"{n} enrollments", interval=1.0)
        out["enroll_s"] = round(time.monotonic() - t0, 2)
        print(f"enrolled: {n} certificates signed in {out['enroll_s']} s", flush=True)
        wait_for(lambda: alive(c, ids) == n, args.timeout, f"{n} agents alive", interval=1.0)
        out["attach_s"] = round(time.monotonic() - t0, 2)
        print(f"attached: all {n} alive with their own certificates in {out['attach_s']} s", flush=True)
        out["taskserver_cpu_s"] = round(sum(sum(pp.cpu_times()[:2]) for pp in tsp) - cpu0, 1)
        out["enrolled_total"] = enrolled(servers)
    finally:
        stop_workers(procs)
        c.stop()
    refused: dict[str, int] = {}
    for w in range(workers):
        path = os.path.join(base, f"worker-{w}.log")
        last = [line for line in open(path) if line.startswith("{")][-1:] if os.path.exists(path) else []
        for code, count in (json.loads(last[0]).get("refused", {}) if last else {}).items():
            refused[code] = refused.get(code, 0) + count
    out["enroll_refused"] = refused
    out["load_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

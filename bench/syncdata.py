"""Host identity at scale: N hosts in a CMDB, N simulated agents, every identity change pushed to its host.

Starts its own cluster (ZooKeeper, two Redis nodes, dbproxy R=2, one task server, the API server, syncdata
following a CMDB (tests/fakecmdb.py: bk-cmdb's published resource-watch API, in this process), and N
simulated agents (bench/simagents.py: the real protocol over mutual TLS; they answer an identity push as the
agent does, without writing a file). Host i of the CMDB names simulated agent i by bk_agent_id.

  initial_s      from syncdata's start until every host's identity is confirmed (get_host_identity_result
                 says synced for all N: the agent's reported md5 is the wanted one)
  change_s       then every host changes at once in the CMDB (one host_relation event each, N events):
                 from the change until every host is confirmed with its new identity
  syncdata_cpu   syncdata's CPU (seconds, and percent of one core) over the change

    python bench/syncdata.py --agents 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from fakecmdb import FakeCmdb  # noqa: E402

from gse.devcluster import Cluster, wait_for  # noqa: E402
from simagents import (API_CHUNK, agent_id, agent_ip, alive_count, api, prepare, spawn_workers,  # noqa: E402
                       stop_workers)



def results(c: Cluster, ids: list[str]) -> dict[str, dict]:
    out = {}
    for i in range(0, len(ids), API_CHUNK):
        r = api(c, "/api/v2/cluster/get_host_identity_result", {"agent_id_list": ids[i:i + API_CHUNK]})
        for d in r.get("data") or []:
            out[d["bk_agent_id"]] = d
    return out


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description="host identity at scale")
    p.add_argument("--agents", type=int, default=10000)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--ramp", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    n = args.agents
    workers = args.workers or max(2, (n + 4999) // 5000)
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}, load {os.getloadavg()}; {n} hosts and simulated agents in {workers} "
          f"processes; everything shares these cores", flush=True)
    base = tempfile.mkdtemp(prefix=f"gse-syncdata-{n}-")
    c = Cluster(base, heartbeat_interval_s=10.0)
    cmdb = FakeCmdb(hold_s=20.0)
    cmdb.start()
    procs = []
    out = {"hosts": n}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        ts = c.start_taskserver(balance={"slack": n})
        c.start_apiserver(max_hosts_per_call=max(5000, n))
        tag = os.urandom(2).hex()
        ids = [agent_id(tag, i) for i in range(n)]
        for i in range(n):
            cmdb.set_host(i + 1, bk_host_innerip=agent_ip(i), bk_agent_id=ids[i])
            cmdb.add_relation(i + 1, biz=2, set_id=1 + i % 10, module=100 + i % 100)
        idents = prepare(c, n, workers, tag, base, "issued")
        t0 = time.monotonic()
        procs = spawn_workers(n, workers, ts.info["address"], str(c.certs_dir), tag, base, 10.0,
                              ramp_rate=args.ramp, identities=idents)
        wait_for(lambda: alive_count(c, ids) == n, 900, f"{n} agents alive", interval=2.0)
        print(f"attach: all {n} alive in {time.monotonic() - t0:.1f} s", flush=True)

        t0 = time.monotonic()
        sd = c.start_syncdata(cmdb={"url": cmdb.url, "app_code": cmdb.app_code, "app_secret": cmdb.app_secret,
                                    "watch_hold_s": cmdb.hold_s})
        def all_synced():
            r = results(c, ids)
            return r if sum(d["status"] == "synced" for d in r.values()) == n else None
        first = wait_for(all_synced, args.timeout, f"{n} identities confirmed", interval=1.0)
        out["initial_s"] = round(time.monotonic() - t0, 1)
        print(f"initial: all {n} identities on their hosts {out['initial_s']} s after syncdata started", flush=True)

        sp = psutil.Process(sd.pid)
        c0 = cpu(sp)
        t0 = time.monotonic()
        for i in range(n):
            cmdb.add_relation(i + 1, biz=3, set_id=99, module=9000 + i % 7)
        out["change_made_s"] = round(time.monotonic() - t0, 1)

        def all_new():
            r = results(c, ids)
            done = sum(1 for a, d in r.items() if d["status"] == "synced" and d["md5"] != first[a]["md5"])
            return done == n
        wait_for(all_new, args.timeout, f"{n} changed identities confirmed", interval=1.0)
        out["change_s"] = round(time.monotonic() - t0, 1)
        used = cpu(sp) - c0
        out["syncdata_cpu_s"] = round(used, 1)
        out["syncdata_cpu_pct"] = round(100 * used / out["change_s"], 1)
        h = c.healthz(sd)
        out["pushes"] = h.get("pushed")
        out["push_failures"] = h.get("push_failures")
        out["load_after"] = os.getloadavg()
        print(f"change: all {n} hosts have their new identity {out['change_s']} s after the CMDB changed "
              f"(changes made within {out['change_made_s']} s); syncdata {out['syncdata_cpu_s']} CPU-s "
              f"({out['syncdata_cpu_pct']} % of one core), {out['pushes']} pushes", flush=True)
    finally:
        stop_workers(procs)
        c.stop()
        cmdb.stop()
    print(json.dumps(out))
    return 0 if out.get("change_s", 1e9) <= 60 else 1


if __name__ == "__main__":
    sys.exit(main())

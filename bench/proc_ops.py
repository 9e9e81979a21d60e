"""Process management at scale: operate_proc_multi to N agents, get_proc_status_v2 for 2,000 hosts, and
sync_proc_status paging through M registrations.

Starts its own cluster (ZooKeeper, two Redis nodes, dbproxy R=2, one task server, procmgr, the API server) and
N simulated agents (bench/simagents.py: the real agent protocol over real mutual TLS, each from its own
127.x.y.z address; they answer process operations in-process with the supervision protocol's results and
states, without forking or waiting a post-check: the figures are the control plane's). Prints its figures and
ends with one JSON line:

  operate_p50_s / _max_s   operate_proc_multi start (one entry per host, the node manager's shape, full spec)
                           until get_proc_operate_result_v2 shows every target final (polled every --poll s)
  status_p50_s / _max_s    get_proc_status_v2 for --status-hosts hosts (answered from the status cache)
  sync_s                   sync_proc_status paging through --registrations registrations, limit 1000, one page
                           after the other (as a single client would), until a page comes back empty
  sync_concurrent_s        the same pages fetched 10 at a time (the process config manager pages in parallel)

    python bench/proc_ops.py --agents 5000 --status-hosts 2000 --registrations 10000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gse.cli import api_call  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
from simagents import agent_id, prepare, spawn_workers, stop_workers  # noqa: E402

NS = "nodeman"
SPEC = {"identity": {"index_key": "", "proc_name": "bkmonitorbeat", "setup_path": "/usr/local/gse/plugins/bin",
                     "pid_path": "/var/run/gse/bkmonitorbeat.pid", "user": "root"},
        "control": {"start_cmd": "./start.sh bkmonitorbeat", "stop_cmd": "./stop.sh bkmonitorbeat",
                    "restart_cmd": "./restart.sh bkmonitorbeat", "reload_cmd": "./reload.sh bkmonitorbeat",
                    "kill_cmd": "", "version_cmd": "./bkmonitorbeat -v", "health_cmd": ""},
        "resource": {"cpu": 10, "mem": 10},
        "alive_monitor_policy": {"auto_type": 1, "start_check_secs": 5}}


class Api:
    def __init__(self, c: Cluster):
        self.c = c

    def __call__(self, path: str, body: dict, timeout: float = 300) -> dict:
        return api_call(self.c.api_url(), self.c.app_code, self.c.app_secret, path, body, timeout=timeout)

    def alive(self, ids: list[str]) -> int:
        n = 0
        for i in range(0, len(ids), 5000):
            r = self("/api/v2/cluster/list_agent_state", {"agent_id_list": ids[i:i + 5000]})
            n += sum(1 for d in (r.get("data") or []) if d["status_code"] == 2)
        return n


def operate(api: Api, ids: list[str], name: str, poll_s: float) -> tuple[float, int, float, list]:
    """(seconds until every target is final, targets not 0, seconds the submit call took, per poll:
    (seconds since the start, its latency, targets still running))."""
    t0 = time.perf_counter()
    polls = []
    r = api("/api/v2/proc/operate_proc_multi", {"no_request": True, "proc_operate_req": [
        {"meta": {"namespace": NS, "name": name, "labels": {"proc_name": name}}, "op_type": 0,
         "agent_id_list": [a], "nodeman_spec": {"process_status_id": i}, "spec": SPEC} for i, a in enumerate(ids)]})
    assert r["code"] == 0, r
    task_id = r["data"]["task_id"]
    submit = time.perf_counter() - t0
    while True:
        p0 = time.perf_counter()
        res = api("/api/v2/proc/get_proc_operate_result_v2", {"task_id": task_id})
        running = sum(1 for x in (res.get("data") or {}).values() if x["error_code"] == 115) \
            if res["code"] == 0 else len(ids)
        polls.append((round(p0 - t0, 3), round(time.perf_counter() - p0, 3), running))
        if res["code"] == 0 and not running:
            assert len(res["data"]) == len(ids), (len(res["data"]), len(ids))
            return (time.perf_counter() - t0, sum(1 for x in res["data"].values() if x["error_code"] != 0), submit,
                    polls)
        if time.perf_counter() - t0 > 120:
            return time.perf_counter() - t0, len(ids), submit, polls
        time.sleep(poll_s)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description="process management at scale")
    p.add_argument("--agents", type=int, default=5000)
    p.add_argument("--status-hosts", type=int, default=2000)
    p.add_argument("--registrations", type=int, default=10000, help="registrations sync_proc_status pages through "
                   "(made with register_proc_info over the agents, several names per agent)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--poll", type=float, default=0.1, help="seconds between two result polls")
    p.add_argument("--workers", type=int, default=2, help="simulator processes")
    args = p.parse_args()
    n = args.agents
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}; load {os.getloadavg()}; {n} simulated agents in {args.workers} processes, "
          f"one task server, everything on these cores", flush=True)
    base = tempfile.mkdtemp(prefix=f"gse-procops-{n}-")
    c = Cluster(base, heartbeat_interval_s=10.0)
    procs = []
    out = {"agents": n}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        ts = c.start_taskserver(balance={"enabled": False})
        c.start_procmgr()
        c.start_apiserver(max_hosts_per_call=max(5000, n))
        api = Api(c)
        tag = os.urandom(2).hex()
        ids = [agent_id(tag, i) for i in range(n)]
        idents = prepare(c, n, args.workers, tag, base, "issued")     # each agent its own certificate
        t0 = time.monotonic()
        procs = spawn_workers(n, args.workers, ts.info["address"], str(c.certs_dir), tag, base, 10.0, ramp_rate=500,
                              identities=idents)
        wait_for(lambda: api.alive(ids) == n, 600, f"{n} agents alive", interval=1.0)
        print(f"attach: {n} alive in {time.monotonic() - t0:.1f} s", flush=True)

        times, failed = [], 0
        operate(api, ids, "warmup", args.poll)
        submits = []
        for r in range(args.rounds):
            t, bad, submit, polls = operate(api, ids, "bkmonitorbeat", args.poll)
            times.append(t)
            submits.append(submit)
            failed += bad
            print(f"operate_proc_multi start on {n}: round {r + 1}: {t:.3f} s ({bad} not ok; the call took "
                  f"{submit:.3f} s; polls (at, took, running): {polls})", flush=True)
            time.sleep(1.0)
        out.update(operate_p50_s=round(statistics.median(times), 3), operate_max_s=round(max(times), 3),
                   operate_submit_p50_s=round(statistics.median(submits), 3), operate_not_ok=failed)

        hosts = ids[:args.status_hosts]
        stimes = []
        for r in range(args.rounds * 4):
            t1 = time.perf_counter()
            res = api("/api/v2/proc/get_proc_status_v2", {"meta": {"namespace": NS, "name": "bkmonitorbeat",
                                                                   "labels": {"proc_name": "bkmonitorbeat"}},
                                                          "agent_id_list": hosts, "no_request": True})
            stimes.append(time.perf_counter() - t1)
            infos = res["data"]["proc_infos"]
            assert len(infos) == len(hosts) and all(i["status"] == 1 for i in infos), res["message"]
        print(f"get_proc_status_v2 for {len(hosts)} hosts: p50 {statistics.median(stimes):.3f} s, "
              f"max {max(stimes):.3f} s", flush=True)
        out.update(status_hosts=len(hosts), status_p50_s=round(statistics.median(stimes), 3),
                   status_max_s=round(max(stimes), 3))

        ns = f"GSEKIT_BIZ_{tag}"
        per_agent = max(1, -(-args.registrations // n))
        made = 0
        for k in range(per_agent):
            take = ids[:min(n, args.registrations - made)]
            if not take:
                break
            for i in range(0, len(take), 5000):
                r = api("/api/c/compapi/v2/gse/register_proc_info", {
                    "meta": {"namespace": ns, "name": f"app_{k}"}, "agent_id_list": take[i:i + 5000], "spec": SPEC})
                assert r["code"] == 0, r["message"]
            made += len(take)
        print(f"registered {made} processes in namespace {ns}", flush=True)
        time.sleep(6)       # past procmgr's sync cache: the first page reads the index afresh

        def page(start: int) -> dict:
            r = api("/api/v2/proc/sync_proc_status", {"meta": {"namespace": ns},
                                                      "page": {"start": start, "limit": 1000, "return_total": True}})
            assert r["code"] == 0, r["message"]
            return r["data"]

        t1 = time.perf_counter()
        start, seen = 0, 0
        while True:
            d = page(start)
            if not d["proc_infos"]:
                break
            seen += len(d["proc_infos"])
            start += 1000
        out["sync_s"] = round(time.perf_counter() - t1, 3)
        assert seen == made, (seen, made)
        print(f"sync_proc_status: {seen} registrations in pages of 1,000 in {out['sync_s']} s", flush=True)
        time.sleep(6)
        t1 = time.perf_counter()
        first = page(0)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            rest = list(pool.map(page, range(1000, first["count"], 1000)))
        out["sync_concurrent_s"] = round(time.perf_counter() - t1, 3)
        assert len(first["proc_infos"]) + sum(len(d["proc_infos"]) for d in rest) == made
        print(f"sync_proc_status, pages 10 at a time: {out['sync_concurrent_s']} s", flush=True)
        out["load_after"] = os.getloadavg()
    finally:
        stop_workers(procs)
        c.stop()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

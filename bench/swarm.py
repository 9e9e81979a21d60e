"""Agent swarm: N simulated agents on K task servers — attach, heartbeat, broadcast and reconnect storm.

Starts its own cluster (ZooKeeper, two Redis nodes, dbproxy R=2, K task servers, the API server) and N
simulated agents (bench/simagents.py: the real agent protocol over real mutual TLS, each from its own
127.x.y.z address with a certificate of its own naming its bk_agent_id, heartbeating like an agent and
answering tasks in-process, no fork) spread over worker processes (a process may hold ~19,000 files; each
agent uses one). The trust checks are on as in production: roles, the certificate's id against the hello's,
and a revocation list of --revoked entries. Prints its figures and ends with one JSON line:

  agents, taskservers       what ran (identity: how agents got their certificates, --identity)
  attach_s                  from starting the workers until every agent is alive in the API (with
                            --identity enroll: enrolling included)
  heartbeat_cpu_pct         task servers' CPU (sum, percent of one core) at steady heartbeat
  rss_mb_per_1k             task servers' RSS (sum) per 1,000 agents
  broadcast_p50_s / _max_s  async_execute_script to all N until every result is readable, over --rounds
  reconnect_s               (K >= 2) SIGKILL one task server: until all its agents are alive again elsewhere
                            (alive with another parent in list_agent_info); null if not within
                            --reconnect-timeout; also reconnect_99_s, reconnected_at_60s, reconnected_agents
                            of reconnect_moved (a process here holds at most ~19,900 connections: with
                            N=20,000 and K=2 the survivor cannot hold all of them)
  lost_results              results that never arrived (or did not succeed)
  steady_cpu_pct            every component's CPU at steady heartbeat (percent of one core)
  broadcast_cpu_us_per_target
                            CPU per broadcast target by component (task servers, simulators, dbproxy, redis,
                            apiserver, this client's polling), over the counted rounds, steady-state
                            heartbeat CPU subtracted: where the time of a broadcast goes on shared cores

    python bench/swarm.py --agents 10000 --taskservers 1
    python bench/swarm.py --agents 20000 --taskservers 2
"""

from __future__ import annotations

import argparse
import collections
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
from gse.common.address import split_host_port  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
from simagents import agent_id, prepare, spawn_workers, stop_workers  # noqa: E402

CHUNK = 5000


class Api:
    def __init__(self, c: Cluster):
        self.c = c

    def __call__(self, path: str, body: dict, timeout: float = 300) -> dict:
        return api_call(self.c.api_url(), self.c.app_code, self.c.app_secret, path, body, timeout=timeout)

    def parents(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        """bk_agent_id -> (status_code, parent_port)."""
        out = {}
        for i in range(0, len(ids), CHUNK):
            r = self("/api/v2/cluster/list_agent_info", {"agent_id_list": ids[i:i + CHUNK]})
            for d in r.get("data") or []:
                out[d["bk_agent_id"]] = (d.get("status_code", -2), d.get("parent_port", 0))
        return out

    def alive(self, ids: list[str]) -> int:
        n = 0
        for i in range(0, len(ids), CHUNK):
            r = self("/api/v2/cluster/list_agent_state", {"agent_id_list": ids[i:i + CHUNK]})
            n += sum(1 for d in (r.get("data") or []) if d["status_code"] == 2)
        return n


def family(pid: int) -> list[psutil.Process]:
    """A daemon and its children (a task server with workers is a supervisor and its worker processes)."""
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def cpu_groups(c: Cluster, workers: list) -> dict[str, list[psutil.Process]]:
    """Every process of the run by component, this one included (its polling shares the cores too)."""
    groups: dict[str, list[psutil.Process]] = {"client": [psutil.Process()]}
    for proc in c.procs:
        if proc.alive():
            groups.setdefault(proc.kind, []).extend(family(proc.pid))
    groups["simulators"] = [psutil.Process(w.pid) for w in workers]
    return groups


def cpu_snapshot(groups: dict[str, list[psutil.Process]]) -> tuple[float, dict[str, float]]:
    return time.monotonic(), {g: cpu_seconds(ps) for g, ps in groups.items()}


def broadcast(api: Api, ids: list[str], poll_s: float, timeout: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = api("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": a} for a in ids],
        "atomic_tasks": [{"atomic_task_id": 0, "command": "echo swarm", "timeout_seconds": 60}]})
    assert r["code"] == 0, r
    task_id = r["data"]["result"]["task_id"]
    pending = list(ids)
    bad = 0
    why: collections.Counter = collections.Counter()
    while pending:
        if time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, bad + len(pending)
        still = []
        for i in range(0, len(pending), CHUNK):
            part = pending[i:i + CHUNK]
            res = api("/api/v2/task/get_execute_script_result", {"task_id": task_id, "agent_tasks": [
                {"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": 0}]} for a in part]})
            for item in res["data"]["result"]:
                if item["error_code"] == 115:
                    still.append(item["bk_agent_id"])
                elif item["error_code"] != 0 or item["screen"] != "swarm\n":
                    bad += 1
                    why[(item["status"], item["error_code"], item["error_msg"][:80], item["screen"][:20])] += 1
        pending = still
        if pending:
            time.sleep(poll_s)
    if why:
        print(f"  results not as expected (status, error_code, error_msg, screen): {dict(why.most_common(5))}",
              flush=True)
    return time.perf_counter() - t0, bad


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # stop the cluster and the workers (finally)
    p = argparse.ArgumentParser(description="agent swarm on K task servers")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--taskservers", type=int, default=1)
    p.add_argument("--ts-workers", type=int, default=1, help="worker processes per task server (its `workers`: "
                   "they share the agent port; one process may hold ~19,000 agents and use one core)")
    p.add_argument("--workers", type=int, default=0, help="simulator processes (default: one per 5,000 agents, "
                                                          "at least 2)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--steady", type=float, default=20.0)
    p.add_argument("--pause", type=float, default=3.0, help="seconds between broadcast rounds")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between two result polls of the pending "
                   "agents (each poll reads every pending item: finer figures, more load on the servers)")
    p.add_argument("--ramp", type=float, default=300.0, help="agents started per second at the beginning (a "
                   "fleet coming up; TLS handshakes cost ~2 ms of CPU on each side)")
    p.add_argument("--reconnect-rate", type=float, default=250.0,
                   help="task servers' reconnect_rate: agents/s a peer takes after a failure (what this machine "
                        "handles besides the survivor's own agents)")
    p.add_argument("--attach-timeout", type=float, default=600.0)
    p.add_argument("--identity", default="issued", choices=("issued", "enroll", "shared"),
                   help="each agent's certificate: issued for it (default), enrolled with a token, or one shared "
                        "certificate (the cluster switched to shared-certificate mode)")
    p.add_argument("--revoked", type=int, default=1000, help="ids on the revocation list (none of the swarm's)")
    p.add_argument("--no-reconnect", action="store_true")
    p.add_argument("--reconnect-timeout", type=float, default=180.0)
    args = p.parse_args()
    n, k = args.agents, args.taskservers
    workers = args.workers or max(2, (n + 4999) // 5000)
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}; {n} agents in {workers} simulator processes on {k} task server(s) "
          f"of {args.ts_workers} worker process(es); "
          f"everything shares these cores", flush=True)
    base = tempfile.mkdtemp(prefix=f"gse-swarm-{n}-")
    c = Cluster(base, heartbeat_interval_s=args.heartbeat)
    procs = []
    out = {"agents": n, "taskservers": k, "ts_workers": args.ts_workers, "identity": args.identity}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        servers = [c.start_taskserver(balance={"slack": max(50, n // 20)}, reconnect_rate=args.reconnect_rate,
                                      workers=args.ts_workers)
                   for _ in range(k)]
        c.start_apiserver(max_hosts_per_call=max(5000, n))
        api = Api(c)
        tsp = [p for t in servers for p in family(t.pid)]
        tag = os.urandom(2).hex()
        ids = [agent_id(tag, i) for i in range(n)]
        if args.revoked:
            c.zk_put_config("revoked", {"agents": {os.urandom(16).hex(): {} for _ in range(args.revoked)}})
        t0 = time.monotonic()
        idents = prepare(c, n, workers, tag, base, args.identity)
        print(f"identities ({args.identity}) for {n} agents made in {time.monotonic() - t0:.1f} s", flush=True)
        t0 = time.monotonic()
        procs = spawn_workers(n, workers, ",".join(t.info["address"] for t in servers), str(c.certs_dir), tag,
                              base, args.heartbeat, ramp_rate=args.ramp, identities=idents)
        wait_for(lambda: api.alive(ids) == n, args.attach_timeout, f"{n} agents alive", interval=1.0)
        out["attach_s"] = round(time.monotonic() - t0, 2)
        print(f"attach: all {n} alive in {out['attach_s']} s", flush=True)

        time.sleep(min(args.heartbeat * 1.5, 15))
        groups = cpu_groups(c, procs)
        c0, w0 = cpu_seconds(tsp), time.monotonic()
        s0 = cpu_snapshot(groups)
        time.sleep(args.steady)
        out["heartbeat_cpu_pct"] = round(100 * (cpu_seconds(tsp) - c0) / (time.monotonic() - w0), 1)
        s1 = cpu_snapshot(groups)
        steady_rate = {g: (s1[1][g] - s0[1][g]) / (s1[0] - s0[0]) for g in groups}
        out["steady_cpu_pct"] = {g: round(100 * r, 1) for g, r in sorted(steady_rate.items(), key=lambda x: -x[1])}
        print(f"steady: CPU by component (% of one core): {out['steady_cpu_pct']}, "
              f"{sum(steady_rate.values()):.2f} of {os.cpu_count()} cores busy", flush=True)
        rss = sum(pp.memory_info().rss for pp in tsp)
        out["rss_mb_per_1k"] = round(rss / 2**20 / n * 1000, 1)
        print(f"steady: task servers {out['heartbeat_cpu_pct']} % CPU, {rss / 2**20:.0f} MB RSS "
              f"({out['rss_mb_per_1k']} MB per 1,000)", flush=True)

        times, lost = [], 0
        broadcast(api, ids, args.poll, 120)       # warm-up round, not counted
        used = {g: 0.0 for g in groups}
        for r in range(args.rounds):
            b0 = cpu_snapshot(groups)
            t, bad = broadcast(api, ids, args.poll, 120)
            times.append(t)
            lost += bad
            print(f"broadcast round {r + 1}: {t:.2f} s, {bad} results missing or failed", flush=True)
            time.sleep(args.pause)      # CPU is counted until the end of the pause: work deferred past the
            b1 = cpu_snapshot(groups)   # round's end (acknowledgements, say) counts too
            for g in groups:
                used[g] += b1[1][g] - b0[1][g] - steady_rate[g] * (b1[0] - b0[0])
        per_target = {g: round(1e6 * u / (args.rounds * n)) for g, u in sorted(used.items(), key=lambda x: -x[1])}
        out["broadcast_cpu_us_per_target"] = per_target
        print(f"broadcast CPU per target (µs, heartbeat load subtracted): {per_target}, total "
              f"{sum(per_target.values())} µs = {sum(per_target.values()) * n / 1e6:.2f} CPU-s per broadcast "
              f"on {os.cpu_count()} cores", flush=True)
        out["broadcast_p50_s"] = round(statistics.median(times), 3)
        out["broadcast_max_s"] = round(max(times), 3)
        out["lost_results"] = lost

        if k >= 2 and not args.no_reconnect:
            victim = servers[0]
            vport = split_host_port(victim.info["address"])[1]
            moved = [a for a, (_s, port) in api.parents(ids).items() if port == vport]
            t0 = time.monotonic()
            victim.kill()

            moved_set = set(moved)
            out["reconnect_moved"] = len(moved)
            out["reconnect_s"] = out["reconnect_99_s"] = None
            at60 = None
            while time.monotonic() - t0 < args.reconnect_timeout:
                time.sleep(1.0)
                now = api.parents(moved)
                back = sum(1 for a in moved_set if now.get(a, (0, vport))[0] == 2 and now[a][1] != vport)
                el = time.monotonic() - t0
                if at60 is None and el >= 60:
                    at60 = back
                if out["reconnect_99_s"] is None and back >= 0.99 * len(moved):
                    out["reconnect_99_s"] = round(el, 2)
                if back == len(moved):
                    out["reconnect_s"] = round(el, 2)
                    break
            out["reconnected_at_60s"] = at60 if at60 is not None else back
            out["reconnected_agents"] = back
            print(f"reconnect: {back} of the {len(moved)} agents of the killed task server alive elsewhere; "
                  f"99 % after {out['reconnect_99_s']} s, all after {out['reconnect_s']} s "
                  f"(null: not within {args.reconnect_timeout:.0f} s); {out['reconnected_at_60s']} at 60 s",
                  flush=True)
    finally:
        stop_workers(procs)
        c.stop()
    print(json.dumps(out))
    return 0 if out.get("lost_results", 1) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Task fan-out benchmark.

1. One real agent runs `true`: from the API call until the result is readable, p50 and p99 over --runs
   (as root, whose login profile on this machine may do work of its own, and as a fresh user with a plain
   profile).
2. N simulated agents (real protocol and TLS; they answer `echo` in-process instead of forking, so the
   figure is the control plane's): from the API call until every result is readable through
   get_execute_script_result; p50 and max over --rounds.
3. With --real-agents N: N real agent processes; a broadcast of `true` as root against the same as `nobody`,
   interleaved over --real-rounds rounds each: the medians and their ratio (the login environment is the
   difference: root has a login profile, nobody has none).

Starts its own cluster (ZooKeeper, two Redis nodes, dbproxy R=2, one task server, API server).

    python bench/task_fanout.py --runs 200 --agents 1000 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gse.cli import api_call, still_running  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
from simagents import agent_id, prepare, spawn_workers, stop_workers  # noqa: E402

RUN = "/api/v2/task/async_execute_script"
RESULT = "/api/v2/task/get_execute_script_result"


class Api:
    def __init__(self, cluster: Cluster):
        self.c = cluster

    def __call__(self, path: str, body: dict) -> dict:
        return api_call(self.c.api_url(), self.c.app_code, self.c.app_secret, path, body, timeout=120)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def run_once(api: Api, ids: list[str], command: str, user: str = "root", poll_s: float = 0.005,
             timeout: float = 120) -> tuple[float, int]:
    """Seconds from the API call until every result is readable; and how many results were not success."""
    t0 = time.perf_counter()
    r = api(RUN, {"agents": [{"bk_agent_id": a, "user": user} for a in ids],
                  "atomic_tasks": [{"atomic_task_id": 0, "command": command, "timeout_seconds": 60}]})
    assert r["code"] == 0, r
    task_id = r["data"]["result"]["task_id"]
    body = {"task_id": task_id, "agent_tasks": [{"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": 0}]}
                                                for a in ids]}
    while True:
        res = api(RESULT, body)
        if not still_running(res):
            elapsed = time.perf_counter() - t0
            bad = sum(1 for d in res["data"]["result"] if d["error_code"] != 0 or d["status"] != 2)
            return elapsed, bad
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"task {task_id} not finished after {timeout}s")
        time.sleep(poll_s)


def single_agent(runs: int) -> dict:
    base = tempfile.mkdtemp(prefix="gse-fanout1-")
    c = Cluster(base, heartbeat_interval_s=10)
    user = f"gsebench{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True)
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        c.start_taskserver()
        c.start_apiserver()
        agent = c.start_agent()
        api = Api(c)
        aid = agent.info["bk_agent_id"]
        wait_for(lambda: api("/api/v2/cluster/list_agent_state", {"agent_id_list": [aid]})["code"] == 0, 30, "agent")
        out = {}
        for who in ("root", user):
            run_once(api, [aid], "true", who)      # warm-up
            times = [run_once(api, [aid], "true", who)[0] for _ in range(runs)]
            key = "root" if who == "root" else "plain_user"
            out[key] = {"p50_ms": round(statistics.median(times) * 1000, 1),
                        "p99_ms": round(pct(times, 99) * 1000, 1), "runs": runs}
        return out
    finally:
        c.stop()
        subprocess.run(["userdel", "-r", user], check=False, capture_output=True)


def real_agents(n: int, rounds: int, login_env_max_age_s: float | None = None) -> dict:
    base = tempfile.mkdtemp(prefix=f"gse-fanout-real{n}-")
    c = Cluster(base, heartbeat_interval_s=10)
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        c.start_taskserver()
        c.start_apiserver()
        tasks = {} if login_env_max_age_s is None else {"tasks": {"login_env_max_age_s": login_env_max_age_s}}
        procs = [c.start_agent(wait=False, **tasks) for _ in range(n)]
        for p in procs:
            c.wait_healthy(p, timeout=120)
        api = Api(c)
        ids = [p.info["bk_agent_id"] for p in procs]

        def all_alive():
            r = api("/api/v2/cluster/list_agent_state", {"agent_id_list": ids})
            return r["code"] == 0 and sum(1 for d in r["data"] if d["status_code"] == 2) == n
        wait_for(all_alive, 120, f"{n} real agents", interval=0.5)
        times: dict[str, list[float]] = {"root": [], "nobody": []}
        failed = 0
        for who in ("root", "nobody", "root", "nobody"):       # warm-up (the first run of a user captures its env)
            run_once(api, ids, "true", who, poll_s=0.01)
        for _ in range(rounds):
            for who in ("root", "nobody"):
                t, bad = run_once(api, ids, "true", who, poll_s=0.01)
                times[who].append(t)
                failed += bad
        root, nobody = statistics.median(times["root"]), statistics.median(times["nobody"])
        return {"agents": n, "rounds": rounds, "root_p50_s": round(root, 3), "nobody_p50_s": round(nobody, 3),
                "root_max_s": round(max(times["root"]), 3), "nobody_max_s": round(max(times["nobody"]), 3),
                "ratio_root_over_nobody": round(root / nobody, 2), "failed_results": failed}
    finally:
        c.stop()


def many_agents(n: int, rounds: int, workers: int) -> dict:
    base = tempfile.mkdtemp(prefix=f"gse-fanout{n}-")
    c = Cluster(base, heartbeat_interval_s=10)
    tag = os.urandom(2).hex()
    procs = []
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        ts = c.start_taskserver()
        c.start_apiserver()
        api = Api(c)
        ids = [agent_id(tag, i) for i in range(n)]
        procs = spawn_workers(n, workers, ts.info["address"], str(c.certs_dir), tag, base,
                              identities=prepare(c, n, workers, tag, base, "issued"))

        def all_alive():
            r = api("/api/v2/cluster/list_agent_state", {"agent_id_list": ids})
            return r["code"] == 0 and sum(1 for d in r["data"] if d["status_code"] == 2) == n
        wait_for(all_alive, 300, f"{n} simulated agents", interval=0.5)
        time.sleep(2)
        run_once(api, ids, "echo warm", poll_s=0.02)
        times, failed = [], 0
        for _ in range(rounds):
            t, bad = run_once(api, ids, "echo hello", poll_s=0.02)
            times.append(t)
            failed += bad
            time.sleep(0.5)
        return {"agents": n, "rounds": rounds, "p50_s": round(statistics.median(times), 3),
                "max_s": round(max(times), 3), "min_s": round(min(times), 3), "failed_results": failed,
                "all_s": [round(t, 3) for t in times]}
    finally:
        stop_workers(procs)
        c.stop()


def main() -> int:
    p = argparse.ArgumentParser(description="task fan-out latency")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-single", action="store_true")
    p.add_argument("--skip-simulated", action="store_true")
    p.add_argument("--real-agents", type=int, default=0, help="also broadcast to N real agents as root and nobody")
    p.add_argument("--real-rounds", type=int, default=10)
    p.add_argument("--login-env-max-age", type=float, default=None,
                   help="the real agents' tasks.login_env_max_age_s (0: source the profiles for every command)")
    args = p.parse_args()
    load = os.getloadavg()
    print(f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}; every daemon and simulator shares these cores")
    out = {"bench": "task_fanout"}
    if not args.skip_single:
        out["one_agent_true"] = single_agent(args.runs)
        for who, r in out["one_agent_true"].items():
            print(f"one agent, `true` as {who}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms over {r['runs']} runs",
                  flush=True)
    failed = 0
    if args.real_agents:
        r = out["real_agents"] = real_agents(args.real_agents, args.real_rounds, args.login_env_max_age)
        failed += r["failed_results"]
        print(f"{r['agents']} real agents, `true`: as root p50 {r['root_p50_s']} s (max {r['root_max_s']}), as nobody "
              f"p50 {r['nobody_p50_s']} s (max {r['nobody_max_s']}); root / nobody = {r['ratio_root_over_nobody']} "
              f"over {r['rounds']} rounds each; failed results {r['failed_results']}", flush=True)
    if not args.skip_simulated:
        r = out["fanout"] = many_agents(args.agents, args.rounds, args.workers)
        failed += r["failed_results"]
        print(f"{r['agents']} simulated agents (in-process echo): all results readable p50 {r['p50_s']} s, "
              f"max {r['max_s']} s over {r['rounds']} rounds; failed results {r['failed_results']}")
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(json.dumps(out))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

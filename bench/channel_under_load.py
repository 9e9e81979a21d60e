"""Internal gRPC channels under CPU starvation: broadcasts while the machine's load average is near 90.

Reproduces "Holding under load" (docs/benchmarks.md): the API server's channel to dbproxy failing with
`Decryption error: TSI_DATA_CORRUPTED` / `UNKNOWN: Stream removed (Unwrap failed (TSI_DATA_CORRUPTED))`
when ~100 agents were broadcast to on a 2-core machine with a load average near 90.

Starts its own cluster (ZooKeeper, two Redis, dbproxy R=2, one task server, the API server) and N
simulated agents (bench/simagents.py), then for --duration seconds runs --parallel broadcast loops
(async_execute_script to every agent, then get_execute_script_result until all are final) while --hogs
busy processes at the daemons' priority starve every core. Bounded: the hogs stop themselves after the
duration, the script stops everything it started. Prints one JSON line:

  broadcasts_ok, broadcasts_failed   broadcasts whose every result arrived / that failed or timed out
  api_errors                         API answers that were not 0/115, by message (first 100 chars)
  tsi_errors                         log lines naming TSI_DATA_CORRUPTED or "Decryption error", by process
  load_avg                           1-minute load average at the end of the starved period

    flock /tmp/gse-bench.lock .venv/bin/python bench/channel_under_load.py --agents 100 --hogs 90 --duration 180
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gse.cli import api_call  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
import simagents  # noqa: E402

HOG = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--hogs", type=int, default=90, help="busy processes (the load average approaches this)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of starvation and broadcasts")
    p.add_argument("--parallel", type=int, default=4, help="broadcast loops at once")
    p.add_argument("--result-timeout", type=float, default=90.0)
    p.add_argument("--real-agents", action="store_true", help="run --agents real agent processes (each task forks "
                   "a shell on this machine, as in production) instead of simulated agents")
    p.add_argument("--idle", default="", help="comma-separated daemon kinds (apiserver,dbproxy) whose every "
                   "thread runs SCHED_IDLE during the starved period: they get CPU only when no hog wants it")
    args = p.parse_args()

    base = tempfile.mkdtemp(prefix="gse-load-")
    c = Cluster(base, heartbeat_interval_s=10.0)
    workers, hogs = [], []
    out: dict = {"agents": args.agents, "real_agents": args.real_agents, "hogs": args.hogs,
                 "duration_s": args.duration, "parallel": args.parallel,
                 "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        ts = c.start_taskserver()
        c.start_apiserver()
        url, code, secret = c.api_url(), c.app_code, c.app_secret
        if args.real_agents:
            agents = [c.start_agent(wait=False) for _ in range(args.agents)]
            ids = [a.info["bk_agent_id"] for a in agents]
        else:
            ids, workers = simagents.start_for(c, args.agents, [ts.info["address"]], base)
        wait_for(lambda: _alive(url, code, secret, ids) == len(ids), 120, f"{len(ids)} agents alive", interval=0.5)

        hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=args.duration + 5)]) for _ in range(args.hogs)]
        idle = [pr for pr in c.procs if pr.kind in args.idle.split(",")]
        for pr in idle:
            subprocess.run(["chrt", "--idle", "-a", "-p", "0", str(pr.pid)], check=True, capture_output=True)
        stats = {"ok": 0, "failed": 0}
        errors: collections.Counter = collections.Counter()
        lock = threading.Lock()
        end = time.monotonic() + args.duration

        def loop():
            while time.monotonic() < end:
                ok = _broadcast(url, code, secret, ids, args.result_timeout, errors, lock)
                with lock:
                    stats["ok" if ok else "failed"] += 1

        threads = [threading.Thread(target=loop) for _ in range(args.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["load_avg"] = os.getloadavg()[0]
        for pr in idle:
            subprocess.run(["chrt", "--other", "-a", "-p", "0", str(pr.pid)], capture_output=True)
        out["idle"] = [pr.name for pr in idle]
        out["broadcasts_ok"], out["broadcasts_failed"] = stats["ok"], stats["failed"]
        out["api_errors"] = dict(errors.most_common(10))
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()
        simagents.stop_workers(workers)
        c.stop()
    tsi = {}
    for proc in c.procs:
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        n = sum(1 for line in text.splitlines() if "TSI_DATA_CORRUPTED" in line or "Decryption error" in line)
        if n:
            tsi[proc.name] = n
    out["tsi_errors"] = tsi
    out["logs"] = str(c.base / "logs")
    print(json.dumps(out), flush=True)
    return 0 if not tsi and not out.get("broadcasts_failed") else 1


def _alive(url, code, secret, ids) -> int:
    r = api_call(url, code, secret, "/api/v2/cluster/list_agent_state", {"agent_id_list": ids}, timeout=30)
    return sum(1 for d in (r.get("data") or []) if d["status_code"] == 2)


def _broadcast(url, code, secret, ids, timeout, errors, lock) -> bool:
    def call(path, body):
        try:
            r = api_call(url, code, secret, path, body, timeout=60)
        except OSError as exc:
            r = {"code": -1, "message": f"http: {exc}"}
        if r.get("code") not in (0, 1000115):
            with lock:
                errors[str(r.get("message"))[:100]] += 1
        return r

    r = call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": a} for a in ids],
        "atomic_tasks": [{"atomic_task_id": 0, "command": "echo load", "timeout_seconds": 60}]})
    if r.get("code") != 0:
        return False
    task_id = r["data"]["result"]["task_id"]
    pending, t0 = list(ids), time.monotonic()
    while pending and time.monotonic() - t0 < timeout:
        res = call("/api/v2/task/get_execute_script_result", {"task_id": task_id, "agent_tasks": [
            {"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": 0}]} for a in pending]})
        if res.get("code") not in (0, 1000115):
            return False
        pending = [i["bk_agent_id"] for i in res["data"]["result"] if i["error_code"] == 115]
        if pending:
            time.sleep(0.2)
    return not pending


if __name__ == "__main__":
    sys.exit(main())

"""API latency under hostile input: `list_agent_state` for one host while 16 MiB scripts are being submitted.

The goal (issue: input that costs more than linear time) is p99 <= 50 ms for the small call while other callers
submit scripts of 16 MiB each (the issue's shape: `true ` followed by one 16 MiB line, the worst case of the old
backtracking rule check). Phases, each `--seconds` long:

  idle      list_agent_state alone
  loaded    the same, while `--submitters` clients submit 16 MiB scripts back to back (each to the one real
            agent, which writes the script and runs `true`)

Prints p50 / p99 / max of list_agent_state per phase, how many scripts were accepted and how long each
submission took, and the machine's load before and after. Starts its own cluster (ZooKeeper, two Redis nodes,
dbproxy R=2, one task server, the API server, one real agent).

    flock /tmp/gse-bench.lock .venv/bin/python bench/api_latency.py --seconds 20 --submitters 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from gse.devcluster import Cluster, wait_for  # noqa: E402


class Client:
    """One keep-alive HTTP connection to the API server (a real client reuses its connection)."""

    def __init__(self, cluster: Cluster):
        u = urllib.parse.urlsplit(cluster.api_url())
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        self.headers = {"Content-Type": "application/json", "X-Bkapi-Authorization": json.dumps(
            {"bk_app_code": cluster.app_code, "bk_app_secret": cluster.app_secret})}

    def call(self, path: str, raw: bytes) -> dict:
        self.conn.request("POST", path, body=raw, headers=self.headers)
        return json.loads(self.conn.getresponse().read())


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def poll_states(cluster: Cluster, aid: str, seconds: float, stop: threading.Event | None = None) -> list[float]:
    c = Client(cluster)
    raw = json.dumps({"agent_id_list": [aid]}).encode()
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        t0 = time.perf_counter()
        r = c.call("/api/v2/cluster/list_agent_state", raw)
        lat.append(time.perf_counter() - t0)
        assert r["code"] == 0 and r["data"][0]["status_code"] == 2, r
        time.sleep(0.002)
    return lat


def submitter(cluster: Cluster, aid: str, raw: bytes, stop: threading.Event, out: list, errors: list) -> None:
    c = Client(cluster)
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = c.call("/api/v2/task/async_execute_script", raw)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            errors.append(repr(exc))
            c = Client(cluster)
            continue
        if r.get("code") == 0:
            out.append(time.perf_counter() - t0)
        else:
            errors.append(r.get("message", "")[:200])


def summary(lat: list[float]) -> dict:
    return {"calls": len(lat), "p50_ms": round(statistics.median(lat) * 1000, 2),
            "p99_ms": round(pct(lat, 99) * 1000, 2), "max_ms": round(max(lat) * 1000, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description="list_agent_state latency while 16 MiB scripts are submitted")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--submitters", type=int, default=2)
    p.add_argument("--script-mib", type=int, default=16)
    args = p.parse_args()
    load_before = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}; load average before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}", flush=True)
    base = tempfile.mkdtemp(prefix="gse-apilat-")
    c = Cluster(base, heartbeat_interval_s=10)
    out: dict = {"bench": "api_latency", "submitters": args.submitters, "script_mib": args.script_mib,
                 "seconds": args.seconds}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_redis()
        c.start_dbproxy(replicas=2)
        c.start_taskserver()
        c.start_apiserver()
        agent = c.start_agent()
        aid = agent.info["bk_agent_id"]
        wait_for(lambda: Client(c).call("/api/v2/cluster/list_agent_state", json.dumps(
            {"agent_id_list": [aid]}).encode())["code"] == 0, 30, "the agent")
        store = os.path.join(base, "scripts")
        content = "true " + "a" * (args.script_mib * 1024 * 1024 - 6) + "\n"
        raw = json.dumps({"agents": [{"bk_agent_id": aid, "user": "root"}],
                          "scripts": [{"script_name": "big.sh", "script_store_dir": store, "script_content": content}],
                          "atomic_tasks": [{"atomic_task_id": 0, "command": "true", "timeout_seconds": 60}]}).encode()
        poll_states(c, aid, 2.0)                                  # warm-up
        out["idle"] = summary(poll_states(c, aid, args.seconds))
        print(f"idle:   list_agent_state {out['idle']}", flush=True)

        stop = threading.Event()
        took: list[float] = []
        errors: list[str] = []
        threads = [threading.Thread(target=submitter, args=(c, aid, raw, stop, took, errors), daemon=True)
                   for _ in range(args.submitters)]
        for t in threads:
            t.start()
        time.sleep(1.0)                                            # the first bodies are on their way
        lat = poll_states(c, aid, args.seconds)
        stop.set()
        for t in threads:
            t.join(60)
        out["loaded"] = summary(lat)
        out["scripts_accepted"] = len(took)
        out["submit_s"] = {"p50": round(statistics.median(took), 3), "max": round(max(took), 3)} if took else {}
        out["errors"] = errors[:5]
        print(f"loaded: list_agent_state {out['loaded']} while {args.submitters} clients submitted "
              f"{len(took)} scripts of {args.script_mib} MiB (submission p50 {out['submit_s'].get('p50')} s, "
              f"max {out['submit_s'].get('max')} s); errors {len(errors)}", flush=True)
    finally:
        c.stop()
    load_after = os.getloadavg()
    out["load_before"], out["load_after"] = [round(x, 2) for x in load_before], [round(x, 2) for x in load_after]
    print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(json.dumps(out))
    return 0 if out["loaded"]["p99_ms"] <= 50 and not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

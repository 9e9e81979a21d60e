"""The agent's memory on a host: idle, then after a task, a file transfer and 1,000 plugin records.

Starts its own cluster (ZooKeeper, Redis, dbproxy, a task server, a file server, the API server, a data server
with the tansu Kafka-protocol broker and a Kafka route for the records' channel) and two real agents; one of
them is measured (RSS, PSS and USS from /proc, through psutil), the other is the transfer's source.

  idle            attached and heartbeating, `--idle` seconds after it started (nothing else asked of it)
  after_task      `echo hello` run and its result stored
  after_transfer  a file of --transfer-mb received (BitTorrent above 10 KB: libtorrent is loaded then)
  after_records   1,000 records of 100 bytes reported on the plugin socket and acknowledged (the data
                  path's stream and gRPC are loaded then)

    python bench/agent_rss.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from gse.cli import api_call  # noqa: E402
from gse.common.address import split_host_port  # noqa: E402
from gse.devcluster import Cluster, wait_for  # noqa: E402
from gse.testing.plugin import ReportClient  # noqa: E402

OP = {"operator_name": "bench"}


def memory(pid: int) -> dict:
    mi = psutil.Process(pid).memory_full_info()
    return {"rss_mb": round(mi.rss / 2**20, 1), "pss_mb": round(mi.pss / 2**20, 1), "uss_mb": round(mi.uss / 2**20, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description="agent memory")
    p.add_argument("--idle", type=float, default=30.0, help="seconds after the start before the idle figure")
    p.add_argument("--transfer-mb", type=int, default=20)
    p.add_argument("--records", type=int, default=1000)
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}, load {os.getloadavg()}", flush=True)
    c = Cluster(tempfile.mkdtemp(prefix="gse-agent-rss-"), heartbeat_interval_s=10)
    out = {}
    try:
        c.start_zookeeper()
        c.start_redis()
        c.start_dbproxy(replicas=1)
        c.start_taskserver()
        c.start_fileserver()
        c.start_apiserver()
        c.start_kafka()
        c.start_dataserver()
        agent, source = c.start_agent(), c.start_agent()
        aid = agent.info["bk_agent_id"]

        def call(path, body):
            return api_call(c.api_url(), c.app_code, c.app_secret, path, body, timeout=60)

        time.sleep(args.idle)
        out["idle"] = memory(agent.pid)
        print(f"idle: {out['idle']}", flush=True)

        r = call("/api/v2/task/async_execute_script", {"agents": [{"bk_agent_id": aid, "user": "root"}],
                 "atomic_tasks": [{"atomic_task_id": 0, "command": "echo hello", "timeout_seconds": 30}]})
        tid = r["data"]["result"]["task_id"]
        wait_for(lambda: call("/api/v2/task/get_execute_script_result", {"task_id": tid, "agent_tasks": [
            {"bk_agent_id": aid, "atomic_tasks": [{"atomic_task_id": 0}]}]})["data"]["result"][0]["status"] == 2,
            30, "the task's result")
        time.sleep(2)
        out["after_task"] = memory(agent.pid)
        print(f"after a task: {out['after_task']}", flush=True)

        src = c.base / "transfer-src"
        src.mkdir()
        (src / "file.bin").write_bytes(os.urandom(args.transfer_mb * 2**20))
        r = call("/api/v2/task/async_transfer_file", {"auto_mkdir": True, "tasks": [{
            "source": {"file_name": "file.bin", "store_dir": str(src), "agent": {"bk_agent_id": source.info["bk_agent_id"]}},
            "target": {"store_dir": str(c.base / "transfer-dst"), "agents": [{"bk_agent_id": aid}]}}]})
        tid = r["data"]["result"]["task_id"]
        wait_for(lambda: all(i["error_code"] == 0 for i in call("/api/v2/task/get_transfer_file_result", {
            "task_id": tid, "agents": [{"bk_agent_id": aid}]})["data"]["result"]), 120, "the transfer")
        time.sleep(2)
        out["after_transfer"] = memory(agent.pid)
        print(f"after a {args.transfer_mb} MB transfer: {out['after_transfer']}", flush=True)

        host, port = split_host_port(c.kafka)
        r = call("/api/v2/data/add_streamto", {"operation": OP, "metadata": {"plat_name": "bench"}, "stream_to": {
            "name": "k", "report_mode": "kafka", "kafka": {"storage_address": [{"ip": host, "port": int(port)}]}}})
        sid = r["data"]["stream_to_id"]
        r = call("/api/v2/data/add_route", {"operation": OP, "metadata": {"plat_name": "bench"}, "stream_filters": [],
                 "route": [{"name": "k", "stream_to": {"stream_to_id": sid, "kafka": {"topic_name": f"rss{uuid.uuid4().hex[:6]}"}}}]})
        channel = r["data"]["channel_id"]
        time.sleep(1)

        async def report():
            cl = await ReportClient().connect(os.path.join(agent.info["run_dir"], "ipc.state.report"))
            await cl.send_many([(channel, json.dumps({"i": i, "p": "x" * 100}).encode())
                                for i in range(args.records)])
            await cl.close()
        asyncio.run(report())

        wait_for(lambda: "data server stream open" in agent.log_path.read_text(), 30, "the data stream")
        time.sleep(5)
        out["after_records"] = memory(agent.pid)
        print(f"after {args.records} records: {out['after_records']}", flush=True)
        out["load_after"] = os.getloadavg()
    finally:
        c.stop()
    print(json.dumps(out))
    return 0 if out.get("idle", {}).get("rss_mb", 1e9) <= 40 else 1


if __name__ == "__main__":
    sys.exit(main())

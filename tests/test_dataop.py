"""Data servers' operating figures (dataop): per DataID and per output, as records on the reserved channel and
as Prometheus metrics, and `gse data top` reading them live from every data server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import api_for
from test_data_flow import add_route, add_streamto, record, report, to_file, wait_routes

from gse.common.datastate import CHANNEL_DATASERVER_OPS
from gse.dataserver.dataop import Figures, Window
from gse.datatop import quantile
from gse.devcluster import wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def test_figures_count_in_out_dropped_and_take_percentiles():
    f = Figures()
    f.received(7, 10, 1000, 0.002)
    f.settled(7, 10, 1000, True, 0.010)
    f.received(7, 5, 500, None)
    f.settled(7, 5, 500, False, 0.5)
    f.received(8, 3, 30, None)
    f.no_route(8, 3)
    f.output_settled("1:kafka", 10, 1000, True, 0.004)
    rec = f.record({}, agents=2, interval_s=60)
    c7, c8 = rec["channels"]["7"], rec["channels"]["8"]
    assert (c7["records_in"], c7["records_out"], c7["bytes_out"], c7["dropped"], c7["errors"]) == (15, 10, 1000, 5, 1)
    assert c7["latency_ms"]["n"] == 1 and c7["latency_ms"]["p50"] == 10.0 and c7["delay_ms"]["max"] == 2.0
    assert (c8["no_route"], c8["dropped"]) == (3, 3)
    assert rec["outputs"]["1:kafka"]["records"] == 10 and rec["agents"] == 2
    again = f.record({}, agents=0, interval_s=60)["channels"]["7"]
    assert again["records_in"] == 15 and again["records_in_interval"] == 0 and again["latency_ms"]["n"] == 0
    w = Window()
    for i in range(1, 101):
        w.add(i / 1000)
    p = w.take()
    assert (p["p50"], p["p90"], p["p99"], p["max"]) == (51.0, 91.0, 100.0, 100.0)
    assert quantile({0.01: 50, 0.1: 90, float("inf"): 100}, 0.5) == pytest.approx(0.01)
    assert quantile({0.01: 0, float("inf"): 0}, 0.5) is None


async def test_dataop_records_and_gse_data_top(make_cluster, tmp_path):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver(data_view_interval_s=0.5, load_report_interval_s=0.5)
    c.start_apiserver()
    c.start_dataserver(load_report_interval_s=0.5, ops_interval_s=1.0)
    agent = c.start_agent(data={"batch_delay_ms": 5, "respread_interval_s": 1.0, "reconnect_max_s": 1.0})
    api = api_for(c)
    api.wait_alive([agent.info["bk_agent_id"]])
    out = c.base / "data-out" / "dataop"
    sid = add_streamto(api, "file", c, path=str(out))
    channel = add_route(api, [to_file(sid, "records.log")])
    add_route(api, [to_file(sid, "ops.log")], channel_id=CHANNEL_DATASERVER_OPS)
    wait_routes(c, [channel, CHANNEL_DATASERVER_OPS])
    await report(agent, [(channel, record(0, channel, i, 100)) for i in range(500)])

    def ops_with_channel():
        try:
            lines = (out / "ops.log").read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            fig = json.loads(line)
            ch = fig["channels"].get(str(channel))
            if ch and ch["records_out"] >= 500:
                return fig
        return None
    fig = await asyncio.to_thread(wait_for, ops_with_channel, 20, "operating figures naming the channel")
    ch = fig["channels"][str(channel)]
    assert ch["records_in"] >= 500 and ch["bytes_out"] > 0 and ch["dropped"] == 0
    assert fig["agents"] >= 1 and f"{sid}:file" in fig["outputs"]
    assert set(fig["outputs"][f"{sid}:file"]) >= {"records", "bytes", "errors", "queued_records", "latency_ms"}

    # gse data top while records flow: cluster-wide figures per DataID and output.
    async def flow():
        for k in range(20):
            await report(agent, [(channel, record(0, channel, 1000 + k * 100 + i, 100)) for i in range(100)])
            await asyncio.sleep(0.15)
    feeder = asyncio.ensure_future(flow())
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gse.cli", "data", "top", "--zookeeper", c.zookeeper, "--root", c.zk_root,
        "--interval", "1.5", "--once", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    await feeder
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(top["servers"]) == 1 and top["servers"][0]["agent_streams"] >= 1
    row = top["channels"][str(channel)]
    assert row["in_rps"] > 50 and row["out_rps"] > 50 and row["p99_ms"] is not None
    assert top["outputs"][f"{sid}:file"]["rps"] > 50
    table = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gse.cli", "data", "top", "--zookeeper", c.zookeeper, "--root", c.zk_root,
        "--interval", "0.5", "--once"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert table.returncode == 0 and "DataID" in table.stdout and str(channel) in table.stdout

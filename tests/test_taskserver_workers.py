"""A task server run as several worker processes (`workers: 2`) sharing one agent port under a supervisor:
agents spread over the workers, tasks reach them all, a dead worker comes back, the workers die with the
supervisor and stop with it."""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from kazoo.client import KazooClient

from conftest import api_for, start_agents

from gse.common import dbclient as db
from gse.common.address import split_host_port
from gse.common.records import AgentRecord
from gse.common.config import ConfigError, load_config
from gse.common.tls import TLSMaterial
from gse.cli import still_running
from gse.devcluster import free_port, wait_for
from gse.taskserver.server import TaskServerConfig, TaskServerService

RUN = "/api/v2/task/async_execute_script"
RESULT = "/api/v2/task/get_execute_script_result"


# ---- configuration ----------------------------------------------------------------------------------

TLS = ["tls.ca=/x/ca.crt", "tls.cert=/x/s.crt", "tls.key=/x/s.key"]


def config(*overrides: str) -> TaskServerConfig:
    return load_config(TaskServerConfig, None, [*TLS, *overrides])


def test_workers_config_validated():
    assert config().workers == 1
    assert config("workers=64", "metrics.port=9000").workers == 64
    for bad in (["workers=0"], ["workers=65"], ["workers=2", "agent_port=0"]):
        with pytest.raises(ConfigError):
            config(*bad)


def test_worker_overrides_name_and_place_each_worker():
    c = config("workers=3", "host=10.0.0.5", "agent_port=48668", "task_port=48669", "metrics.port=9100")
    assert TaskServerService.group_node_id(c) == "10.0.0.5-48668"
    assert TaskServerService.worker_overrides(c, 2) == {"node_id": "10.0.0.5-48668-w2", "task_port": 48671,
                                                        "metrics.port": 9103}
    c = config("workers=2", "node_id=ts-a", "task_port=0")
    assert TaskServerService.worker_overrides(c, 1) == {"node_id": "ts-a-w1", "task_port": 0, "metrics.port": 0}


# ---- helpers ----------------------------------------------------------------------------------------

def workers(c, ts) -> list[dict]:
    return c.healthz(ts)["workers"]


def sessions(c, ids: list[str]) -> dict[str, AgentRecord]:
    """The session records of the agents (the `node` field says which worker holds each)."""
    d = c.certs_dir
    tls = TLSMaterial.from_dir(d, "server")

    async def read():
        client = db.DbClient(tls, [p.info["address"] for p in c.dbproxies])
        try:
            return await client.execute([AgentRecord.read(a) for a in ids])
        finally:
            await client.close()

    return {a: AgentRecord.decode(r) for a, r in zip(ids, asyncio.run(read()))}


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def run_everywhere(api, ids: list[str], command: str) -> dict[str, dict]:
    r = api.call(RUN, {"agents": [{"bk_agent_id": a, "user": "root"} for a in ids],
                       "atomic_tasks": [{"atomic_task_id": 0, "command": command, "timeout_seconds": 30}]})
    assert r["code"] == 0, r
    task_id = r["data"]["result"]["task_id"]
    body = {"task_id": task_id, "agent_tasks": [{"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": 0}]}
                                                for a in ids]}

    def done():
        r = api.call(RESULT, body)
        return r if not still_running(r) else None

    r = wait_for(done, 60, f"task {task_id} to finish", interval=0.2)
    return {d["bk_agent_id"]: d for d in r["data"]["result"]}


@pytest.fixture
def wc(make_cluster):
    """dbproxy, one task server as two workers, an API server."""
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver(workers=2)
    c.start_apiserver()
    return c


# ---- the cluster ------------------------------------------------------------------------------------

def test_workers_share_the_agent_port_and_split_the_agents(wc):
    ts = wc.taskservers[0]
    api = api_for(wc)
    ws = workers(wc, ts)
    node_ids = {w["node_id"] for w in ws}
    base = wc.healthz(ts)["node_id"]
    assert node_ids == {f"{base}-w0", f"{base}-w1"} and all(w["ok"] and w["alive"] for w in ws)

    agents = start_agents(wc, 12)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)

    def settled():
        """The session records' nodes, once they agree with the loads the workers report."""
        nodes = {a: s.node if s else None for a, s in sessions(wc, ids).items()}
        loads = {w["node_id"]: w.get("health", {}).get("agents") for w in workers(wc, ts)}
        return nodes if loads == {n: list(nodes.values()).count(n) for n in node_ids} else None

    nodes = wait_for(settled, 15, "session records and worker loads to agree", interval=0.2)
    # Each new connection goes to a worker picked by the kernel's hash: with 12 agents both workers hold
    # some but once in 2,048 runs; then reconnect agents (a new hash each) until one lands on the other.
    for p in agents[:8]:
        if set(nodes.values()) == node_ids:
            break
        wc.restart(p)
        nodes = wait_for(settled, 15, "session records and worker loads to agree", interval=0.2)
    assert set(nodes.values()) == node_ids
    infos = api.infos(ids)
    assert {infos[a]["parent_port"] for a in ids} == {split_host_port(ts.info["address"])[1]}

    # A task through the API reaches the agents of both workers (dispatched by the records' node).
    results = run_everywhere(api, ids, "echo from-$((20+22))")
    assert {a: (results[a]["status"], results[a]["screen"]) for a in ids} == {a: (2, "from-42\n") for a in ids}


def test_killed_worker_restarted_and_its_agents_back(wc):
    ts = wc.taskservers[0]
    api = api_for(wc)
    agents = start_agents(wc, 6)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    nodes = {a: s.node for a, s in sessions(wc, ids).items()}
    before = workers(wc, ts)
    victim = max(before, key=lambda w: sum(1 for n in nodes.values() if n == w["node_id"]))
    other = next(w for w in before if w is not victim)
    moved = [a for a in ids if nodes[a] == victim["node_id"]]
    assert moved
    killed_at_ms = int(time.time() * 1000)
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted():
        ws = {w["index"]: w for w in workers(wc, ts)}
        w = ws[victim["index"]]
        return ws if w["pid"] != victim["pid"] and w["ok"] and w["restarts"] == 1 else None

    ws = wait_for(restarted, 30, "the supervisor to restart the killed worker", interval=0.2)
    assert ws[other["index"]]["pid"] == other["pid"] and ws[other["index"]]["restarts"] == 0
    assert gone(victim["pid"]) and ts.alive()

    def back():
        s = sessions(wc, moved)
        return s if all(s[a] is not None and s[a].connect_time > killed_at_ms for a in moved) else None

    wait_for(back, 30, "the killed worker's agents to attach again", interval=0.2)
    api.wait_alive(ids, timeout=10)
    assert "worker exited; restarting it" in ts.log_path.read_text()
    results = run_everywhere(api, moved, "echo back")
    assert {results[a]["screen"] for a in moved} == {"back\n"}


def test_killed_supervisor_takes_its_workers_along(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver(workers=2)
    pids = [w["pid"] for w in workers(c, ts)]
    assert len(pids) == 2 and not any(gone(p) for p in pids)
    ts.kill()                                   # SIGKILL: nothing of the supervisor runs any more
    wait_for(lambda: all(gone(p) for p in pids), 5, f"workers {pids} to die with their supervisor")


def test_sighup_reaches_the_workers_and_sigterm_stops_all(wc):
    ts = wc.taskservers[0]
    api = api_for(wc)
    agents = start_agents(wc, 2)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    pids = [w["pid"] for w in workers(wc, ts)]

    ts.signal(signal.SIGHUP)
    wait_for(lambda: all(f"taskserver-w{i} configuration reloaded" in ts.log_path.read_text() for i in (0, 1)),
             10, "both workers to reload")
    assert ts.alive() and not any(gone(p) for p in pids)

    t0 = time.monotonic()
    ts.signal(signal.SIGTERM)
    assert ts.popen.wait(20) == 0
    assert time.monotonic() - t0 < 15
    assert all(gone(p) for p in pids)
    log = ts.log_path.read_text()
    assert log.count("worker stopped") == 2 and "restarting" not in log
    api.wait_alive(ids, timeout=10, alive=False)


def test_ready_notified_by_the_supervisor_once_every_worker_serves(make_cluster, tmp_path):
    """READY=1 reaches $NOTIFY_SOCKET from the supervisor alone, once both workers are registered."""
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.settimeout(30)
    wc = make_cluster()
    wc.start_dbproxy()
    cfg = {**wc._common(0), "node_id": "notify-test", "host": "127.0.0.1", "agent_port": free_port(),
           "task_port": 0, "workers": 2}
    path = tmp_path / "taskserver.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "gse.taskserver", "--config", str(path)],
                            env={**os.environ, "NOTIFY_SOCKET": sock_path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    client = KazooClient(hosts=wc.zookeeper, timeout=5)
    client.start(10)

    def receive() -> tuple[str, int]:
        msg, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(3 * 4))
        creds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                creds.frombytes(data[:12])
        return msg.decode(), creds[0]

    try:
        msg, sender = receive()
        assert "READY=1" in msg and sender == proc.pid
        nodes = client.get_children(f"{wc.zk_root}/taskserver")
        assert {"notify-test-w0", "notify-test-w1"} <= set(nodes)
        proc.send_signal(signal.SIGTERM)
        msg, sender = receive()
        assert "STOPPING=1" in msg and sender == proc.pid
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        client.stop()
        client.close()
        s.close()

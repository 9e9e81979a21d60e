"""Service lifecycle and discovery: ZooKeeper expiry and restart, SIGTERM, SIGHUP, systemd readiness."""

from __future__ import annotations

import json
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

from gse.common.address import split_host_port
from gse.devcluster import wait_for


@pytest.fixture
def zk(cluster):
    client = KazooClient(hosts=cluster.zookeeper, timeout=5)
    client.start(10)
    yield client
    client.stop()
    client.close()


def _node(cluster, service: str, proc) -> str:
    port = split_host_port(proc.info["address"])[1]
    return f"{cluster.zk_root}/{service}/127.0.0.1-{port}"


def test_registration_nodes_are_ephemeral_with_load(cluster, zk):
    ts = cluster.taskservers[0]
    data, stat = zk.get(_node(cluster, "taskserver", ts))
    info = json.loads(data)
    assert stat.ephemeralOwner != 0
    assert info["agent_address"] == ts.info["address"] and "load" in info
    assert len(zk.get_children(f"{cluster.zk_root}/dbproxy")) == 1
    ts.kill()
    wait_for(lambda: zk.exists(_node(cluster, "taskserver", ts)) is None, 15, "ephemeral node removed")


def test_session_expiry_reregisters(cluster, zk, api):
    """Freeze a task server past its ZooKeeper session timeout: the session expires, the node vanishes;
    on waking the daemon gets a new session and registers again."""
    (agent,) = start_agents(cluster, 1)
    ts = cluster.taskservers[0]
    path = _node(cluster, "taskserver", ts)
    owner = zk.exists(path).ephemeralOwner
    ts.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: zk.exists(path) is None, 20, "session expiry to remove the node")
    finally:
        ts.signal(signal.SIGCONT)
    stat = wait_for(lambda: zk.exists(path), 20, "re-registration")
    assert stat.ephemeralOwner != owner
    assert "session lost" in ts.log_path.read_text()
    api.wait_alive([agent.info["bk_agent_id"]], timeout=30)


def test_zookeeper_restart_keeps_serving(make_cluster):
    c = make_cluster(own_infra=True)
    zk_proc = c.start_zookeeper()
    c.start_redis()
    c.start_dbproxy(replicas=1)
    c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    agents = start_agents(c, 2)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    port = split_host_port(c.zookeeper)[1]
    zk_proc.kill()
    # With ZooKeeper gone, the daemons keep serving what they can: agents stay attached and visible.
    for _ in range(5):
        time.sleep(0.5)
        assert {s["status_code"] for s in api.states(ids).values()} == {2}
    c.procs.remove(zk_proc)
    c.start_zookeeper(port=port)            # same port, data dir kept
    client = KazooClient(hosts=c.zookeeper, timeout=5)
    client.start(15)
    try:
        for service in ("dbproxy", "taskserver", "apiserver"):
            wait_for(lambda: client.get_children(f"{c.zk_root}/{service}"), 30, f"{service} registered again")
    finally:
        client.stop()
        client.close()
    assert {s["status_code"] for s in api.states(ids).values()} == {2}
    assert all(p.alive() for p in c.procs)


def test_sigterm_stops_within_bound_and_marks_agents_offline(cluster, api):
    agents = start_agents(cluster, 2)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    for ts in list(cluster.taskservers):
        t0 = time.monotonic()
        ts.signal(signal.SIGTERM)
        ts.popen.wait(20)
        assert time.monotonic() - t0 < 15
        assert ts.popen.returncode == 0
        assert "stopped" in ts.log_path.read_text()
    api.wait_alive(ids, timeout=10, alive=False)


def test_sighup_reloads(cluster):
    ts = cluster.taskservers[0]
    cfg_path = ts.info["config"]
    cfg = yaml.safe_load(open(cfg_path))
    cfg["log"]["level"] = "debug"
    open(cfg_path, "w").write(yaml.safe_dump(cfg))
    ts.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in ts.log_path.read_text(), 10, "reload")
    cfg["balance"] = {"nonsense": 1}
    open(cfg_path, "w").write(yaml.safe_dump(cfg))
    ts.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in ts.log_path.read_text(), 10, "a bad reload refused")
    assert ts.alive()


def test_ready_notified_only_after_registration(cluster, tmp_path):
    """READY=1 reaches $NOTIFY_SOCKET, and by then the ZooKeeper node exists."""
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(30)
    cfg = yaml.safe_load(open(cluster.dbproxies[0].info["config"]))
    cfg["port"] = 0
    cfg["node_id"] = "notify-test"
    cfg["metrics"]["port"] = 0
    path = tmp_path / "dbproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "gse.dbproxy", "--config", str(path)],
                            env={**os.environ, "NOTIFY_SOCKET": sock_path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = KazooClient(hosts=cluster.zookeeper, timeout=5)
    client.start(10)
    try:
        msg = s.recv(4096).decode()
        assert "READY=1" in msg
        assert client.exists(f"{cluster.zk_root}/dbproxy/notify-test") is not None
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in s.recv(4096).decode()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        client.stop()
        client.close()
        s.close()


def test_sigterm_while_waiting_for_zookeeper_stops_at_once(make_cluster, tmp_path):
    """A daemon still starting (here: no ZooKeeper to reach) stops on SIGTERM without waiting to be ready."""
    from gse.devcluster import free_port

    c = make_cluster()
    cfg = {**c._common(0), "host": "127.0.0.1", "agent_port": 0, "task_port": 0}
    cfg["zookeeper"]["hosts"] = f"127.0.0.1:{free_port()}"          # nothing listens there
    path = tmp_path / "taskserver.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "taskserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gse.taskserver", "--config", str(path)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        # Its first log lines are kazoo's failed attempts to connect: the daemon is inside start().
        wait_for(lambda: log.read_text().strip(), 20, "the daemon to try ZooKeeper", interval=0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        assert "stopped before it was ready" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()

"""A cloud area as a real network (spec section 12): the hosts of area 1 are network namespaces on a bridge of
their own, where the only other machine is their proxy (a namespace with a link up to the servers' bridge and
a link down to the area's). No namespace forwards and the root namespace has no address in the area, so there
is no direct path from an area host to a server: everything they do goes through the proxy. Tasks, files
(BitTorrent and direct: the file crosses the proxy's uplink once, counted in bytes), data and
dispatch_message, through it. Needs root (namespaces); built once for the module (gse/devnet.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from conftest import _new_cluster, api_for, start_callback_server

from gse.common.tls import init_certs
from gse.devcluster import free_port, wait_for
from gse.devnet import SERVER_IP, Topology

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

PY = sys.executable


@pytest.fixture(scope="module")
def area_net(infra, tmp_path_factory):
    """Servers on 198.18.0.1, a source host beside them, proxy 1 and two hosts of area 1 in namespaces."""
    net = Topology("gsetn")
    net.__enter__()
    c = _new_cluster(tmp_path_factory.mktemp("netns"), infra)
    try:
        init_certs(c.certs_dir, sans=[SERVER_IP], force=True, shared_agent=True)
        net.add_area(1)
        proxy_node = net.add_proxy(1)
        hosts = [net.add_host(1) for _ in range(2)]
        source_node = net.add_host(0)
        c.start_dbproxy()
        ts_port = free_port(SERVER_IP)
        c.start_taskserver(host=SERVER_IP, port=ts_port, data_view_interval_s=0.5, area_hosts_interval_s=1.0)
        c.start_fileserver(host=SERVER_IP)
        c.start_dataserver(host=SERVER_IP, load_report_interval_s=0.5)
        c.start_apiserver()
        ts = f"{SERVER_IP}:{ts_port}"
        proxy = c.start_proxy(1, host="0.0.0.0", advertise_host=proxy_node.down_ip, upstream=[ts], netns=proxy_node.ns, register=False,
                              ping={"interval_s": 1.0, "timeout_s": 2.0, "count": 1}, wait=False)
        c.wait_healthy(proxy, timeout=60)
        data = {"batch_delay_ms": 5, "retry_delay_s": 0.3, "reconnect_max_s": 1.0, "ack_timeout_s": 10.0}
        agents = []
        for node in hosts:
            cfg = c.agent_config(len(c.agents) + 1, node.ip, servers=[proxy.info["address"]], cloud_id=1,
                                 bind_ip="", data=data, files={"bt_stall_s": 15.0})
            cfg["tls"]["server_name"] = "gse-server"
            agents.append(c.start_agent(ip=node.ip, config=cfg, netns=node.ns, wait=False))
        cfg = c.agent_config(len(c.agents) + 1, source_node.ip, servers=[ts], bind_ip="", files={"bt_stall_s": 15.0})
        cfg["tls"]["server_name"] = "gse-server"
        source = c.start_agent(ip=source_node.ip, config=cfg, netns=source_node.ns, wait=False)
        for a in agents + [source]:
            c.wait_healthy(a, timeout=60)
        api_for(c).wait_alive([a.info["bk_agent_id"] for a in agents + [source]], timeout=60)
    except BaseException:
        print(c.logs(40))
        c.stop()
        net.close()
        raise
    yield {"c": c, "net": net, "proxy": proxy, "proxy_node": proxy_node, "hosts": hosts, "agents": agents,
           "source": source, "ts_port": ts_port}
    c.stop()
    net.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "area_net" in request.fixturenames:
        print(f"\n===== logs =====\n{request.getfixturevalue('area_net')['c'].logs(40)}")


def test_area_hosts_reach_their_proxy_and_nothing_else(area_net):
    net, proxy_node = area_net["net"], area_net["proxy_node"]
    port = int(area_net["proxy"].info["address"].rsplit(":", 1)[1])
    for h in area_net["hosts"]:
        assert net.reaches(h, proxy_node.down_ip, port)
        assert not net.reaches(h, SERVER_IP, area_net["ts_port"])
    assert net.reaches(proxy_node, SERVER_IP, area_net["ts_port"])


def test_task_through_the_proxy(area_net):
    c = area_net["c"]
    api = api_for(c)
    ids = [a.info["bk_agent_id"] for a in area_net["agents"]]
    names = [f"1:{h.ip}" for h in area_net["hosts"]]
    r = api.call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": n, "user": "root"} for n in names],
        "atomic_tasks": [{"atomic_task_id": 0, "command": "ip -4 -o addr show eth0 | wc -l", "timeout_seconds": 20}]})
    tid = r["data"]["result"]["task_id"]

    def done():
        res = api.call("/api/v2/task/get_execute_script_result", {"task_id": tid, "agent_tasks": [
            {"bk_agent_id": n, "atomic_tasks": [{"atomic_task_id": 0}]} for n in names]})
        items = res["data"]["result"]
        return items if all(i["error_code"] != 115 for i in items) else None
    items = wait_for(done, 30, "the task")
    assert all(i["error_code"] == 0 and i["screen"] == "1\n" for i in items), items
    infos = api.infos(ids)
    assert {i["parent_ip"] for i in infos.values()} == {area_net["proxy_node"].down_ip}


def test_files_cross_the_proxy_s_uplink_once_by_bittorrent_and_direct(area_net, tmp_path):
    c = area_net["c"]
    api = api_for(c)
    from test_files import send, wait_done
    ids = [a.info["bk_agent_id"] for a in area_net["agents"]]
    source = area_net["source"].info["bk_agent_id"]
    src = tmp_path / "src"
    src.mkdir()
    size = 12 * 1024 * 1024
    (src / "big.bin").write_bytes(os.urandom(size))
    (src / "small.txt").write_text("small and direct\n")
    up = area_net["proxy_node"].links["up"]
    before = up.counters()[1]
    dests = {a: tmp_path / f"dst-{i}" for i, a in enumerate(ids)}
    tasks = [{"source": {"file_name": n, "store_dir": str(src), "agent": {"bk_agent_id": source}},
              "target": {"store_dir": str(dests[a]), "agents": [{"bk_agent_id": a}]}}
             for a in ids for n in ("big.bin", "small.txt")]
    tid = send(api, tasks, timeout_seconds=120)
    items = wait_done(api, tid, ids, timeout=120)
    assert all(i["error_code"] == 0 for i in items), items
    assert {i["content"]["type"] for i in items} == {"bt", "direct"}
    for d in dests.values():
        assert (d / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        assert (d / "small.txt").read_text() == "small and direct\n"
    received = up.counters()[1] - before
    # two targets, one crossing: what came in over the uplink is the file once (plus protocol overhead)
    assert size <= received <= 1.1 * size, received / size


async def test_data_and_dispatch_message_through_the_proxy(area_net):
    import redis

    from gse.testing.plugin import MessageClient, ReportClient
    from test_data_flow import add_route, add_streamto, to_redis, wait_routes

    c = area_net["c"]
    api = api_for(c)
    tag = uuid.uuid4().hex[:8]
    ch = add_route(api, [to_redis(add_streamto(api, "redis", c), f"nd{tag}")])
    wait_routes(c, [ch])
    host, port = c.redis[0].rsplit(":", 1)
    rds = redis.Redis(host=host, port=int(port))
    n = 300
    for i, agent in enumerate(area_net["agents"]):
        client = await ReportClient().connect(str(Path(agent.info["run_dir"]) / "ipc.state.report"))
        await client.send_many([(ch, json.dumps({"a": i, "s": s}).encode()) for s in range(n)])
        await client.close()
    await asyncio.to_thread(wait_for, lambda: len(set(rds.lrange(f"nd{tag}", 0, -1))) >= 2 * n, 30,
                            "every record through the proxy")
    rds.close()

    base, posts, runner = await start_callback_server("n")
    url = f"{base}/n"
    try:
        c.zk_put_config("message_slots", {"slotn": {"callback_url": url, "token": "tk"}})
        agent = area_net["agents"][0]
        aid = agent.info["bk_agent_id"]
        plugin = await MessageClient().connect(str(Path(agent.info["run_dir"]) / "ipc.state.message"))
        await plugin.keepalive("netplugin", version="1.0")
        r = await asyncio.to_thread(api.call, "/api/v2/cluster/dispatch_message", {
            "slot_id": "slotn", "token": "tk", "message_id": "m-n", "agent_id_list": [aid], "content": "ping"})
        assert r["code"] == 0 and r["data"]["results"] == [], r
        meta, payload = await plugin.receive(timeout=15)
        assert payload == b"ping"
        await plugin.respond({"name": "netplugin", "transmit_type": "", "topic": "", "message_id": "m-n",
                              "session_id": meta["session_id"]}, b"pong")
        got = await asyncio.wait_for(posts["n"].get(), 20)
        assert got == {"message_id": "m-n", "bk_agent_id": aid, "content": "pong"}
        await plugin.close()
    finally:
        await runner.cleanup()


def test_an_area_host_that_goes_away_is_reported_unreachable_by_the_proxy(area_net):
    """Its link cut, the proxy's pings go unanswered: a type-8 alarm naming it on DataID 1000."""
    import subprocess

    import redis
    from test_data_flow import add_route, add_streamto, to_redis, wait_routes

    c = area_net["c"]
    api = api_for(c)
    tag = uuid.uuid4().hex[:8]
    ch = add_route(api, [to_redis(add_streamto(api, "redis", c), f"na{tag}")], channel_id=1000)
    wait_routes(c, [ch])
    host, port = c.redis[0].rsplit(":", 1)
    rds = redis.Redis(host=host, port=int(port))
    h = area_net["hosts"][1]
    subprocess.run(["ip", "link", "set", h.links["eth"].outer, "down"], check=True)
    try:
        def reported():
            for raw in rds.lrange(f"na{tag}", 0, -1):
                rec = json.loads(raw)
                extra = rec["value"][0]["extra"]
                if extra["type"] == 8 and h.ip in extra["iplist"]:
                    return rec
        rec = wait_for(reported, 40, "a type-8 alarm naming the host")
        assert len(rec["value"]) == 1 and area_net["hosts"][0].ip not in rec["value"][0]["extra"]["iplist"]
    finally:
        subprocess.run(["ip", "link", "set", h.links["eth"].outer, "up"], check=True)
        rds.close()

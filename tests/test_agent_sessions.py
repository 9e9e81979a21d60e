"""Agents attach, heartbeat, go offline, fail over and get balanced: real daemons, real ZooKeeper and Redis."""

from __future__ import annotations

import signal
import time

from conftest import HEARTBEAT_S, FrameInbox, api_for, start_agents

from gse.common.address import split_host_port
from gse.devcluster import wait_for


def test_agents_attach_alive_in_all_four_calls(cluster, api):
    agents = start_agents(cluster, 3)
    ids = [p.info["bk_agent_id"] for p in agents]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    api.wait_alive(ids)

    hosts = [{"ip": p.info["ip"], "bk_cloud_id": 0} for p in agents]
    status = api.call("/api/c/compapi/v2/gse/get_agent_status", {"hosts": hosts})
    assert status["result"] is True and status["code"] == 0
    for p in agents:
        assert status["data"][f"0:{p.info['ip']}"] == {"ip": p.info["ip"], "bk_cloud_id": 0, "bk_agent_alive": 1}

    info = api.call("/api/c/compapi/v2/gse/get_agent_info", {"hosts": hosts})["data"]
    ts_ports = {split_host_port(t.info["address"])[1] for t in cluster.taskservers}
    for p in agents:
        entry = info[f"0:{p.info['ip']}"]
        assert entry["version"] and entry["parent_ip"] == "127.0.0.1" and entry["parent_port"] in ts_ports

    states = api.states(ids)
    assert {s["status_code"] for s in states.values()} == {2}
    assert all(s["run_mode"] == 1 and s["report_time"] > 0 for s in states.values())

    # Both addressing forms work in v2 calls.
    host_form = f"0:{agents[0].info['ip']}"
    infos = api.infos([ids[1], host_form])
    assert infos[host_form]["bk_host_ip"] == agents[0].info["ip"]
    assert infos[ids[1]]["code"] == 0 and infos[ids[1]]["status"] == "running"
    # The host figures ride on the first heartbeat, written lazily (within 0.5 s of its arrival).
    infos = wait_for(lambda: (i := api.infos([ids[1], host_form]))[ids[1]]["cpu_num"] >= 1 and i, 10,
                     "the first heartbeat's host figures")
    assert infos[ids[1]]["cpu_num"] >= 1 and infos[ids[1]]["mem_size"] > 0
    assert infos[ids[1]]["bk_os_type"] == "linux"


def test_agent_identity_survives_restart(cluster, api):
    (agent,) = start_agents(cluster, 1)
    first = agent.info["bk_agent_id"]
    agent = cluster.restart(agent)
    assert cluster.agent_id_of(agent) == first
    api.wait_alive([first])


def test_unknown_agents_omitted_or_not_found(cluster, api):
    (agent,) = start_agents(cluster, 1)
    aid = agent.info["bk_agent_id"]
    api.wait_alive([aid])
    r = api.call("/api/v2/cluster/list_agent_state", {"agent_id_list": [aid, "f" * 32]})
    assert [d["bk_agent_id"] for d in r["data"]] == [aid]
    r = api.call("/api/v2/cluster/list_agent_state", {"agent_id_list": ["e" * 32, "0:10.255.0.1"]})
    assert r["code"] == 1011003 and r["result"] is False and r["data"] == []
    r = api.call("/api/c/compapi/v2/gse/get_agent_status", {"hosts": [{"ip": "10.255.0.1", "bk_cloud_id": 0}]})
    assert r["data"]["0:10.255.0.1"]["bk_agent_alive"] == 0


def test_killed_agent_offline_at_once(cluster, api):
    agents = start_agents(cluster, 2)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    t0 = time.monotonic()
    agents[0].kill()
    api.wait_alive([ids[0]], timeout=5, alive=False)
    # The stream ends with the process: no heartbeat bound is needed to notice.
    assert time.monotonic() - t0 < HEARTBEAT_S * 3
    assert api.states([ids[1]])[ids[1]]["status_code"] == 2


def test_silent_agent_offline_after_missed_heartbeats(cluster, api):
    (agent,) = start_agents(cluster, 1)
    aid = agent.info["bk_agent_id"]
    api.wait_alive([aid])
    agent.signal(signal.SIGSTOP)        # the TCP connection stays open; only the heartbeats stop
    try:
        t0 = time.monotonic()
        api.wait_alive([aid], timeout=HEARTBEAT_S * 3 + 6, alive=False)
        assert time.monotonic() - t0 >= HEARTBEAT_S * 1.5   # not cut before heartbeats were really missed
    finally:
        agent.signal(signal.SIGCONT)
    api.wait_alive([aid], timeout=20)


def test_taskserver_killed_agents_reattach_elsewhere(cluster, api):
    agents = start_agents(cluster, 4)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    before = api.infos(ids)
    victim = cluster.taskservers[0]
    victim_port = split_host_port(victim.info["address"])[1]
    survivor_port = split_host_port(cluster.taskservers[1].info["address"])[1]
    moved = [i for i in ids if before[i]["parent_port"] == victim_port]
    if not moved:  # all landed on the other server: kill that one instead
        victim, victim_port, survivor_port = cluster.taskservers[1], survivor_port, victim_port
        moved = ids
    victim.kill()

    def reattached():
        infos = api.infos(ids)
        return infos if all(infos[i]["status_code"] == 2 and infos[i]["parent_port"] == survivor_port
                            for i in ids) else None

    infos = wait_for(reattached, 30, "agents to reattach to the surviving task server", interval=0.2)
    assert {infos[i]["parent_port"] for i in moved} == {survivor_port}


def test_redirect_to_less_loaded_peer(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    fast = {"balance": {"slack": 1, "ratio": 0.0, "rebalance_interval_s": 1.0}, "load_report_interval_s": 0.5}
    first = c.start_taskserver(**fast)
    c.start_apiserver()
    api = api_for(c)
    # Every agent only knows the first server.
    agents = [c.start_agent(wait=False, servers=[first.info["address"]]) for _ in range(6)]
    for p in agents:
        c.wait_healthy(p)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    second = c.start_taskserver(**fast)
    second_port = split_host_port(second.info["address"])[1]

    def balanced():
        infos = api.infos(ids)
        on_second = sum(1 for i in ids if infos[i]["parent_port"] == second_port and infos[i]["status_code"] == 2)
        return on_second if on_second >= 2 and all(infos[i]["status_code"] == 2 for i in ids) else None

    on_second = wait_for(balanced, 30, "agents shed to the new task server", interval=0.2)
    assert 2 <= on_second <= 4


def test_wrong_ca_agent_refused(cluster, api, tmp_path):
    from gse.common.tls import init_certs

    foreign = init_certs(tmp_path / "foreign", shared_agent=True)
    (good,) = start_agents(cluster, 1)
    cfg = cluster.agent_config(90, "127.0.0.90")
    cfg["tls"] = {"ca": str(cluster.certs_dir / "ca.crt"), "cert": str(foreign / "agent.crt"),
                  "key": str(foreign / "agent.key")}
    bad = cluster.start_agent(index=90, ip="127.0.0.90", wait=False, config=cfg)
    bad_id = cluster.agent_id_of(bad)
    api.wait_alive([good.info["bk_agent_id"]])
    # (waited on, not slept: a loaded machine may take seconds to start the agent)
    wait_for(lambda: "task server stream failed" in bad.log_path.read_text(), 30, "the refused agent's failure")
    assert bad.alive()
    assert bad_id not in api.states([bad_id, good.info["bk_agent_id"]])


def test_wrong_ca_client_refused_at_handshake(cluster, tmp_path):
    import asyncio

    import grpc

    from gse.common.dbclient import DbClient, get
    from gse.common.errors import Unavailable
    from gse.common.tls import TLSMaterial, init_certs

    foreign = init_certs(tmp_path / "foreign")
    ca = (cluster.certs_dir / "ca.crt").read_bytes()
    good = TLSMaterial(ca, (cluster.certs_dir / "api.crt").read_bytes(), (cluster.certs_dir / "api.key").read_bytes())
    bad = TLSMaterial(ca, (foreign / "api.crt").read_bytes(), (foreign / "api.key").read_bytes())
    addr = cluster.dbproxies[0].info["address"]

    async def probe(tls):
        client = DbClient(tls, [addr], timeout_s=3)
        try:
            return await client.execute([get("x")])
        finally:
            await client.close()

    assert len(asyncio.run(probe(good))) == 1
    try:
        asyncio.run(probe(bad))
    except Unavailable as exc:
        assert "UNAVAILABLE" in str(exc) or "DEADLINE" in str(exc)
    else:
        raise AssertionError("a client certificate from another CA was accepted")
    assert grpc  # imported for the status names in the message


def test_reconnect_spread_follows_the_servers_load(make_cluster):
    """Agents are told to spread their reconnects over load / reconnect_rate seconds: at attach (Welcome)
    and again when the load moves it by half or more (Tune), so that a dead server's agents reach its
    peers at a rate the peers can take."""
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver(reconnect_rate=0.5, load_report_interval_s=0.5)
    first = c.start_agent(servers=[ts.info["address"]])

    def spreads(proc) -> list[float]:
        return [float(line.rsplit("spread_s=", 1)[1].split()[0]) for line in proc.log_path.read_text().splitlines()
                if "reconnect spread" in line]

    wait_for(lambda: spreads(first) == [2.0], 15, "the first agent told 2 s (1 agent / 0.5 per s)")
    second = c.start_agent(servers=[ts.info["address"]])
    wait_for(lambda: spreads(second) == [4.0], 15, "the second agent told 4 s at attach")
    wait_for(lambda: spreads(first) == [2.0, 4.0], 15, "the first agent retuned to 4 s")


def test_host_snapshot_rides_on_some_heartbeats_liveness_on_all(make_cluster):
    """With host_snapshot_interval_s = 3 heartbeats, report_time moves at every heartbeat and the host
    snapshot (sent on the first heartbeat, then one in three) stays in the record in between."""
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver(host_snapshot_interval_s=3 * HEARTBEAT_S)
    c.start_apiserver()
    api = api_for(c)
    agent = c.start_agent(servers=[ts.info["address"]])
    aid = agent.info["bk_agent_id"]
    api.wait_alive([aid])
    wait_for(lambda: api.infos([aid])[aid]["cpu_num"] >= 1, 10, "the first heartbeat's host figures")
    seen = set()
    deadline = time.monotonic() + 8 * HEARTBEAT_S
    while time.monotonic() < deadline:
        info = api.infos([aid])[aid]
        assert info["cpu_num"] >= 1 and info["mem_size"] > 0      # never erased by a liveness heartbeat
        seen.add(info["report_time"])
        time.sleep(HEARTBEAT_S / 3)
    assert len(seen) >= 5                                          # liveness at every heartbeat


def test_agent_port_refuses_bad_links_and_keeps_serving(make_cluster):
    """The agent port speaks framelink: a first frame that is not a hello, an invalid bk_agent_id and an
    undecodable frame are answered Refused (or cut) and counted; a link that never says hello is cut after
    hello_timeout_s; none of it disturbs an agent attached meanwhile."""
    import asyncio

    from gse.common import framelink
    from gse.common.tls import TLSMaterial
    from gse.pb import agent_pb2 as pb

    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver(hello_timeout_s=1.0)
    good = c.start_agent(servers=[ts.info["address"]])
    host, port = split_host_port(ts.info["address"])
    certs = c.certs_dir
    tls = TLSMaterial((certs / "ca.crt").read_bytes(), (certs / "agent.crt").read_bytes(),
                      (certs / "agent.key").read_bytes())

    async def attempt(first: bytes | None) -> tuple[list, float]:
        inbox = FrameInbox()
        link = await framelink.dial(framelink.client_context(tls), host, int(port), inbox, server_hostname=host)
        t0 = time.monotonic()
        if first is not None:
            link.write(first)
        await asyncio.wait_for(inbox.lost.wait(), 10)
        return inbox.frames, time.monotonic() - t0

    async def main():
        hb = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1)).SerializeToString()
        frames, _ = await attempt(hb)
        assert [f.WhichOneof("body") for f in frames] == ["refused"]
        assert "hello" in frames[0].refused.reason
        bad_id = pb.AgentFrame(hello=pb.AgentHello(agent_id="bad id\n", ip="127.0.0.9")).SerializeToString()
        frames, _ = await attempt(bad_id)
        assert [f.WhichOneof("body") for f in frames] == ["refused"]
        assert "bk_agent_id" in frames[0].refused.reason
        frames, _ = await attempt(b"\xff\xff\xff")    # not a protobuf message: cut
        assert frames == []
        frames, waited = await attempt(None)          # silent: cut after hello_timeout_s
        assert frames == [] and 0.9 <= waited <= 5.0

    asyncio.run(main())
    import urllib.request
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ts.info['metrics_port']}/metrics", timeout=5).read().decode()
    for reason in ("bad_hello", "bad_agent_id", "bad_frame", "no_hello"):
        assert f'gse_taskserver_agent_refused_total{{reason="{reason}"}} 1.0' in metrics, reason
    assert "gse_taskserver_agent_sessions 1.0" in metrics
    assert good.alive() and "detached" not in good.log_path.read_text()


def test_the_first_server_is_chosen_from_any_form_of_agent_id():
    from gse.agent.agent import first_server
    # A certificate may name an agent 'agent-x' (not hex): the choice must not raise, and must spread.
    for agent_id in ("agentxyzagentxyz", "agent-7", "0123456789abcdef0123456789abcdef", "z" * 64):
        assert first_server(agent_id, 3) == first_server(agent_id, 3) in (0, 1, 2)
    spread = {first_server(f"host-{i}", 4) for i in range(200)}
    assert spread == {0, 1, 2, 3}

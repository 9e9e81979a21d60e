"""Cloud areas through proxies (spec section 12), on loopback: hosts of area N attach through a proxy of area
N; they answer every API like area-0 hosts; what a proxy may claim is checked; proxies fail over, cascade,
and keep their agents when they lose their upstream. Real daemons, real TLS, real ZooKeeper and Redis.
(The network-namespace topology, where area hosts can reach nothing but their proxy, is test_areas_netns.)"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest
from conftest import FrameInbox, api_for

from gse.common import framelink
from gse.common.tls import TLSMaterial
from gse.devcluster import wait_for
from gse.pb import agent_pb2 as pb


def _metrics(proc) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=5).read().decode()


def _run(api, ids: list[str], command: str, timeout_s: int = 30) -> str:
    r = api.call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": i, "user": "root"} for i in ids],
        "atomic_tasks": [{"atomic_task_id": 0, "command": command, "timeout_seconds": timeout_s}]})
    assert r["code"] == 0, r
    return r["data"]["result"]["task_id"]


def _results(api, task_id: str, ids: list[str]) -> dict[str, dict]:
    r = api.call("/api/v2/task/get_execute_script_result", {"task_id": task_id, "agent_tasks": [
        {"bk_agent_id": i, "atomic_tasks": [{"atomic_task_id": 0, "offset": 0, "limit": 65536}]} for i in ids]})
    assert r["code"] == 0, r
    return {x["bk_agent_id"]: x for x in r["data"]["result"]}


def _wait_done(api, task_id: str, ids: list[str], timeout: float = 40.0) -> dict[str, dict]:
    def done():
        res = _results(api, task_id, ids)
        return res if len(res) == len(ids) and all(x["error_code"] != 115 for x in res.values()) else None
    return wait_for(done, timeout, f"task {task_id} final on {ids}", interval=0.2)


def _address(proc) -> tuple[str, int]:
    host, port = proc.info["address"].rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def area_cluster(make_cluster):
    """Two task servers, an API server and one proxy of area 1."""
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_taskserver()
    c.start_apiserver()
    c.start_proxy(1)
    return c


def test_area_hosts_answer_like_area0_hosts_and_show_their_proxy(area_cluster):
    c = area_cluster
    api = api_for(c)
    proxy = c.proxies[0]
    a1 = c.start_agent(cloud_id=1, ip="127.0.0.50")
    pa = c.start_agent(cloud_id=1, run_mode=0)            # the proxy host's own agent, in proxy mode
    a0 = c.start_agent(cloud_id=0, ip="127.0.0.50")        # the same ip in area 0: another host
    ids = [a1.info["bk_agent_id"], pa.info["bk_agent_id"], a0.info["bk_agent_id"]]
    states = api.wait_alive(ids)
    assert states[ids[0]]["bk_cloud_id"] == 1 and states[ids[0]]["run_mode"] == 1
    assert states[ids[1]]["bk_cloud_id"] == 1 and states[ids[1]]["run_mode"] == 0

    host, port = _address(proxy)
    infos = api.infos(ids)
    for i in ids[:2]:
        assert (infos[i]["parent_ip"], infos[i]["parent_port"]) == (host, port), infos[i]
    ts_ports = {int(p.info["address"].rsplit(":", 1)[1]) for p in c.taskservers}
    assert infos[ids[2]]["parent_port"] in ts_ports

    # "N:ip" resolves in area N: the same ip in two areas is two hosts.
    by_host = api.infos(["1:127.0.0.50", "0:127.0.0.50"])
    assert by_host["1:127.0.0.50"]["bk_cloud_id"] == 1 and by_host["0:127.0.0.50"]["bk_cloud_id"] == 0
    v1 = api.call("/api/c/compapi/v2/gse/get_agent_info/", {"hosts": [{"ip": "127.0.0.50", "bk_cloud_id": 1},
                                                                      {"ip": "127.0.0.50", "bk_cloud_id": 0}]})
    assert v1["data"]["1:127.0.0.50"]["parent_port"] == port
    assert v1["data"]["0:127.0.0.50"]["parent_port"] in ts_ports
    status = api.call("/api/c/compapi/v2/gse/get_agent_status", {"hosts": [{"ip": "127.0.0.50", "bk_cloud_id": 1}]})
    assert status["data"]["1:127.0.0.50"]["bk_agent_alive"] == 1

    # A task to hosts of both areas, named both ways; each runs where its name resolves.
    names = ["1:127.0.0.50", ids[1], "0:127.0.0.50"]
    tid = _run(api, names, "echo ok")
    res = _wait_done(api, tid, names)
    assert all(r["error_code"] == 0 and r["screen"] == "ok\n" for r in res.values()), res

    # One broadcast frame per proxy link on the task servers: the relayed agents were dispatched to.
    frames = sum(float(line.split()[-1]) for p in c.taskservers for line in _metrics(p).splitlines()
                 if line.startswith('gse_taskserver_relay_frames_total{direction="down"}'))
    assert frames >= 1


def test_an_agent_of_another_area_is_refused_by_the_proxy_with_a_reason(area_cluster):
    c = area_cluster
    api = api_for(c)
    stray = c.start_agent(cloud_id=2, servers=[c.proxies[0].info["address"]], wait=False)
    log = stray.log_path
    wait_for(lambda: "refused the link" in log.read_text(), 20, "the refusal in the agent's log")
    text = log.read_text()
    assert "is of area 2 but its proxy serves area 1" in text, text[-2000:]
    assert 'gse_proxy_refused_total{code="area"}' in _metrics(c.proxies[0])
    assert api.states([stray.info["bk_agent_id"]]) == {}


def test_the_task_server_checks_what_a_proxy_claims(area_cluster):
    """A proxy certificate names its area; a proxy link claims only agents of its own area (and proxies of
    other areas behind it); an agent certificate cannot open a proxy link."""
    c = area_cluster
    ts = c.taskservers[0].info["address"].rsplit(":", 1)
    ca = (c.certs_dir / "ca.crt").read_bytes()
    name = c.proxy_cert(1)
    proxy_tls = TLSMaterial(ca, (c.certs_dir / f"{name}.crt").read_bytes(), (c.certs_dir / f"{name}.key").read_bytes())
    c.ca.issue_files(c.base, "agent-x", "agent", agent_id="feedfacefeedfacefeedfacefeedface", sync=False)
    agent_tls = TLSMaterial(ca, (c.base / "agent-x.crt").read_bytes(), (c.base / "agent-x.key").read_bytes())

    def hello(area: int) -> bytes:
        return pb.AgentFrame(proxy_hello=pb.ProxyHello(node_id="rogue", area=area, agent_address="127.0.0.1:1")) \
            .SerializeToString()

    async def scenario():
        async def dial(tls):
            inbox = FrameInbox()
            link = await framelink.dial(framelink.client_context(tls), ts[0], int(ts[1]), inbox,
                                        server_hostname="gse-server")
            return link, inbox

        # a proxy certificate of area 1 saying area 2
        link, inbox = await dial(proxy_tls)
        link.write(hello(2))
        await inbox.wait(lambda f: f)
        assert inbox.frames[0].WhichOneof("body") == "refused"
        assert "certificate is for area 1" in inbox.frames[0].refused.reason

        # an agent certificate opening a proxy link
        link, inbox = await dial(agent_tls)
        link.write(hello(1))
        await inbox.wait(lambda f: f)
        assert inbox.frames[0].refused.code == "role", inbox.frames[0]

        # a good proxy link claiming an agent of area 3, and one of its own area naming no proxy it holds
        link, inbox = await dial(proxy_tls)
        link.write(hello(1))
        assert await inbox.wait(lambda f: f and f[0].WhichOneof("body") == "welcome")
        for area, via in ((3, "rogue"), (1, "someone-else")):
            agent = pb.AgentFrame(hello=pb.AgentHello(agent_id=f"a{area}{via[:3]}", cloud_id=area, ip="10.0.0.1"))
            link.write(pb.AgentFrame(relay=pb.Relay(agent_ids=[agent.hello.agent_id], via=via,
                                                    frame=agent.SerializeToString())).SerializeToString())
        assert await inbox.wait(lambda f: sum(len(x.relay_end.agent_ids) for x in f) >= 2)
        refusals = [pb.ServerFrame.FromString(x.relay.frame).refused for x in inbox.frames
                    if x.WhichOneof("body") == "relay"]
        reasons = " | ".join(r.reason for r in refusals)
        assert "is of area 3 but its proxy serves area 1" in reasons, reasons
        assert "proxy someone-else is not attached through this link" in reasons, reasons
        link.close()

    asyncio.run(scenario())
    api = api_for(c)
    assert api.states(["a3rog", "a1som"]) == {}


def test_a_killed_proxy_s_agents_fail_over_to_the_other_proxy_of_the_area_losing_no_result(area_cluster):
    c = area_cluster
    api = api_for(c)
    c.start_proxy(1)
    servers = [p.info["address"] for p in c.proxies]
    agents = [c.start_agent(cloud_id=1, servers=servers, wait=False) for _ in range(3)]
    for a in agents:
        c.wait_healthy(a)
    ids = [a.info["bk_agent_id"] for a in agents]
    api.wait_alive(ids)
    # the proxy holding most of them is killed while the task runs
    held = {p.name: float(next(x for x in _metrics(p).splitlines() if x.startswith("gse_proxy_agents ")).split()[1])
            for p in c.proxies}
    victim, other = sorted(c.proxies, key=lambda p: -held[p.name])
    moved = [i for i, inf in api.infos(ids).items() if inf["parent_port"] == _address(victim)[1]]
    assert len(moved) >= 2, (held, moved)
    tid = _run(api, ids, "sleep 3; echo survived")
    wait_for(lambda: all(r["status"] == 1 for r in _results(api, tid, ids).values()), 15, "the task running")
    victim.signal(signal.SIGKILL)
    res = _wait_done(api, tid, ids, timeout=60)
    assert all(r["error_code"] == 0 and r["screen"] == "survived\n" for r in res.values()), res
    infos = api.infos(ids)
    assert {i["parent_port"] for i in infos.values()} == {_address(other)[1]}
    api.wait_alive(ids)
    # and they take new work through it
    res = _wait_done(api, _run(api, ids, "echo again"), ids)
    assert all(r["screen"] == "again\n" for r in res.values()), res


def test_a_proxy_that_loses_its_upstream_keeps_its_agents_and_they_read_offline_only_after_the_bound(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver()
    c.start_apiserver()
    proxy = c.start_proxy(1, upstream=[ts.info["address"]])
    agents = [c.start_agent(cloud_id=1, wait=False) for _ in range(2)]
    for a in agents:
        c.wait_healthy(a)
    ids = [a.info["bk_agent_id"] for a in agents]
    api = api_for(c)
    api.wait_alive(ids)

    ts.signal(signal.SIGKILL)
    lost_at = time.monotonic()
    # still alive right after (their deadline has not passed), then offline once it has
    assert all(s["status_code"] == 2 for s in api.states(ids).values())
    api.wait_alive(ids, timeout=20, alive=False)
    bound = c.heartbeat_interval_s * c.heartbeat_misses + 1
    assert time.monotonic() - lost_at >= bound - 1.5
    # the agents never left their proxy
    for a in agents:
        assert "detached" not in a.log_path.read_text()
    c.restart(ts)
    api.wait_alive(ids, timeout=30)
    for a in agents:
        assert "detached" not in a.log_path.read_text()
        assert "attached again through our proxy" in a.log_path.read_text()
    res = _wait_done(api, _run(api, ids, "echo back"), ids)
    assert all(r["screen"] == "back\n" for r in res.values()), res
    assert "gse_proxy_upstream_links" in _metrics(proxy)


def test_a_cascaded_area_behind_another_area_s_proxy(area_cluster):
    c = area_cluster
    api = api_for(c)
    p1 = c.proxies[0]
    p2 = c.start_proxy(2, upstream=[p1.info["address"]], register=False)
    a2 = [c.start_agent(cloud_id=2, wait=False) for _ in range(2)]
    a1 = c.start_agent(cloud_id=1)
    for a in a2:
        c.wait_healthy(a)
    ids = [a.info["bk_agent_id"] for a in a2] + [a1.info["bk_agent_id"]]
    api.wait_alive(ids)
    infos = api.infos(ids)
    assert {infos[i]["parent_port"] for i in ids[:2]} == {_address(p2)[1]}
    assert infos[ids[2]]["parent_port"] == _address(p1)[1]
    res = _wait_done(api, _run(api, ids, "echo cascaded"), ids)
    assert all(r["screen"] == "cascaded\n" for r in res.values()), res

    # the area-1 proxy restarts: area 2 comes back through it (its proxy re-attaches, then its agents)
    p1.signal(signal.SIGKILL)
    p1 = c.restart(p1)
    res = _wait_done(api, _run(api, ids, "echo again"), ids, timeout=60)
    assert all(r["screen"] == "again\n" for r in res.values()), res


async def test_data_through_a_proxy_killed_mid_run_loses_nothing(make_cluster, infra):
    """Plugins of area-1 hosts report through the proxy's data relay (spooled there, acknowledged end to
    end); the proxy is SIGKILLed mid-run and comes back: every record arrives (duplicates allowed)."""
    import redis
    from test_data_flow import AGENT_DATA, Tally, add_route, add_streamto, redis_list, record, report, to_redis, \
        wait_routes

    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver(data_view_interval_s=0.5)
    c.start_apiserver()
    c.start_dataserver(load_report_interval_s=0.5, output_retry_s=0.3)
    proxy = c.start_proxy(1, data={"retry_delay_s": 0.3, "ack_timeout_s": 10.0})
    agents = [c.start_agent(cloud_id=1, wait=False, data=AGENT_DATA) for _ in range(2)]
    for a in agents:
        c.wait_healthy(a)
    api = api_for(c)
    api.wait_alive([a.info["bk_agent_id"] for a in agents])
    host, port = c.redis[0].rsplit(":", 1)
    rds = redis.Redis(host=host, port=int(port))
    tag = time.monotonic_ns()
    ch = add_route(api, [to_redis(add_streamto(api, "redis", c), f"px{tag}")])
    wait_routes(c, [ch])
    n = 2000
    senders = [asyncio.ensure_future(report(a, [(ch, record(i, ch, s, 100)) for s in range(n)], chunk=50,
                                            pause=0.02)) for i, a in enumerate(agents)]
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"px{tag}") >= 300, 20, "records flowing through the proxy")
    proxy.signal(signal.SIGKILL)
    proxy.popen.wait(10)
    await asyncio.gather(*senders)
    c.restart(proxy)
    await asyncio.to_thread(wait_for, lambda: len(set(redis_list(rds, f"px{tag}"))) >= 2 * n, 40,
                            "every record after the proxy came back")
    t = Tally(redis_list(rds, f"px{tag}"))
    for i in range(2):
        assert t.missing((i, ch), n) == []
    # the agents streamed to the proxy's data relay, and the data server saw only the proxy's lanes
    relay = c.healthz(proxy)["data"]["address"]
    for a in agents:
        assert f"data server stream open server={relay}" in a.log_path.read_text()
    streams = next(float(x.split()[1]) for x in _metrics(c.dataservers[0]).splitlines()
                   if x.startswith("gse_dataserver_agent_streams "))
    assert 1 <= streams <= 2
    rds.close()


def test_the_proxy_pings_its_area_s_hosts_and_reports_the_unreachable_as_type_8_alarms(make_cluster, infra):
    import json as _json

    import redis
    from test_data_flow import add_route, add_streamto, to_redis, wait_routes

    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver(area_hosts_interval_s=1.0)
    c.start_apiserver()
    c.start_dataserver(load_report_interval_s=0.5)
    c.start_proxy(1, ping={"interval_s": 1.0, "timeout_s": 2.0, "count": 1})
    api = api_for(c)
    tag = time.monotonic_ns()
    ch = add_route(api, [to_redis(add_streamto(api, "redis", c), f"alarm{tag}")], channel_id=1000)
    wait_routes(c, [ch])
    up = c.start_agent(cloud_id=1)
    # a host that attached once from an address nothing answers at (it claims 198.18.250.1, then goes away)
    gone = c.start_agent(cloud_id=1, ip="198.18.250.1", bind_ip="")
    api.wait_alive([up.info["bk_agent_id"], gone.info["bk_agent_id"]])
    gone.stop()
    host, port = c.redis[0].rsplit(":", 1)
    rds = redis.Redis(host=host, port=int(port))

    def alarm():
        for raw in rds.lrange(f"alarm{tag}", 0, -1):
            rec = _json.loads(raw)
            if rec["value"][0]["extra"]["type"] == 8:
                return rec
    rec = wait_for(alarm, 30, "a type-8 alarm record")
    assert len(rec["value"]) == 1
    extra = rec["value"][0]["extra"]
    assert extra["iplist"] == ["198.18.250.1"] and extra["count"] == 1
    assert extra["host"] == [{"bizid": 0, "cloudid": 1, "ip": "198.18.250.1", "agent_id": "1:198.18.250.1"}]
    assert rec["value"][0]["event_type"] == "gse_basic_alarm_type"
    # the reachable host is never reported
    for raw in rds.lrange(f"alarm{tag}", 0, -1):
        assert up.info["ip"] not in _json.loads(raw)["value"][0]["extra"].get("iplist", [])
    assert c.healthz(c.proxies[0])["ping"]["share"] == 2
    rds.close()


def test_files_from_area_0_into_area_1_and_a_cascaded_area_2_through_their_proxies(area_cluster, tmp_path):
    """BitTorrent (large) and direct (small) entries, into area 1 and into area 2 behind it in one transfer:
    each area's hosts are told their own proxy's tracker and relay; every file arrives whole."""
    import hashlib
    import os
    from test_files import md5, send, task, wait_done

    c = area_cluster
    c.start_fileserver()
    api = api_for(c)
    p1 = c.proxies[0]
    p2 = c.start_proxy(2, upstream=[p1.info["address"]], register=False)
    src_agent = c.start_agent(cloud_id=0, files={"bt_stall_s": 10.0})
    a1 = [c.start_agent(cloud_id=1, wait=False, files={"bt_stall_s": 10.0}) for _ in range(2)]
    a2 = [c.start_agent(cloud_id=2, wait=False, files={"bt_stall_s": 10.0}) for _ in range(2)]
    for a in a1 + a2:
        c.wait_healthy(a)
    targets = [a.info["bk_agent_id"] for a in a1 + a2]
    api.wait_alive([src_agent.info["bk_agent_id"], *targets])
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 77))
    (src / "small.txt").write_bytes(b"small and direct\n")
    s = src_agent.info["bk_agent_id"]
    dests = {t: tmp_path / f"d-{i}" for i, t in enumerate(targets)}
    tid = send(api, [task(s, src, "big.bin", [t], dests[t]) for t in targets]
               + [task(s, src, "small.txt", targets, tmp_path / "small")], timeout_seconds=120)
    items = wait_done(api, tid, targets, timeout=120)
    assert all(i["error_code"] == 0 for i in items), items
    assert {i["content"]["type"] for i in items} >= {"bt", "direct"}
    for t, d in dests.items():
        assert md5(d / "big.bin") == md5(src / "big.bin")
    assert (tmp_path / "small" / "small.txt").read_bytes() == b"small and direct\n"
    # both proxies relayed the file and keep it in their cache (named by its info-hash)
    for p in (p1, p2):
        h = c.healthz(p)
        assert h["files"]["cached_bytes"] >= 5 * 1024 * 1024, h
    ih_files = {x.name for p in (p1, p2) for x in (c.base / p.name / "files").iterdir()}
    assert len(ih_files) == 1, ih_files
    del hashlib



def test_area_plan_uploaders_are_the_source_and_the_relays_on_its_way_up():
    """Only the source and the relays it leaves areas through may upload; relays above it take data from
    below; a relay beside the way (a target's area) is no uploader and fetches from above."""
    from gse.common.records import ProxyRecord
    from gse.taskserver.area_files import AreaPlan

    parents = {1: 0, 2: 1, 3: 1}
    relays = {a: ProxyRecord(node_id=f"p{a}", area=a) for a in (1, 2, 3)}
    # source in area 2; targets in areas 0 and 3: the top is 0, the source leaves 2 then 1
    p = AreaPlan(2, 0, {"t0": 0, "t3": 3}, parents, relays, {})
    assert p.uploaders("src") == ["src", "proxy:p2", "proxy:p1"]
    assert [a for a in (1, 2, 3) if p.on_source_way(a)] == [1, 2]
    # targets all in area 3: the top is area 1, whose relay has nothing above it to forward to
    p = AreaPlan(2, 1, {"t3": 3}, parents, relays, {})
    assert p.uploaders("src") == ["src", "proxy:p2"]
    assert [a for a in (1, 2, 3) if p.on_source_way(a)] == [2]
    # a source in area 0 sending into areas: nobody but the source uploads
    assert AreaPlan(0, 0, {"t3": 3}, parents, relays, {}).uploaders("src") == ["src"]


def test_a_source_inside_a_cascaded_area_sends_direct_and_bittorrent_entries_up_through_its_relays(area_cluster,
                                                                                                    tmp_path):
    """A source in area 2 (behind area 1's proxy) sends to hosts of areas 0 and 1: its direct-mode upload goes
    to area 2's proxy, which forwards it to area 1's, which forwards it to the file server (the relays hear of
    the transfer before the source does, and take its data from below; each is an uploader on the source's
    way). A target of area 1 using its own token to upload into its proxy's relay is refused and counted
    there; every target gets the source's bytes."""
    import os

    import grpc
    from test_files import file_service_call, md5, send, target_journal, task, wait_done

    from gse.pb import file_pb2 as fpb

    c = area_cluster
    c.start_fileserver()
    api = api_for(c)
    p1 = c.proxies[0]
    p2 = c.start_proxy(2, upstream=[p1.info["address"]], register=False)
    src_agent = c.start_agent(cloud_id=2, files={"bt_stall_s": 10.0})
    t0 = c.start_agent(cloud_id=0, wait=False, files={"bt_stall_s": 10.0})
    t1 = c.start_agent(cloud_id=1, wait=False, files={"bt_stall_s": 10.0})
    for a in (t0, t1):
        c.wait_healthy(a)
    s, targets = src_agent.info["bk_agent_id"], [t0.info["bk_agent_id"], t1.info["bk_agent_id"]]
    api.wait_alive([s, *targets])
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "small.txt").write_bytes(b"from inside area 2\n")
    (mix / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    tid = send(api, [task(s, tmp_path, "mix", targets, tmp_path / "dst")], download_speed=0.5, timeout_seconds=120)
    ft = wait_for(lambda: target_journal(c, targets[1], tid), 30, "the area-1 target's journal")
    assert ft.fileserver != c.fileservers[0].info["address"]      # its area's proxy relays direct entries
    assert set(ft.tokens) == {targets[1]}
    small = next(e.index for e in ft.entries if e.rel_path.endswith("small.txt"))
    forged = fpb.Chunk(transfer_id=ft.transfer_id, index=small, offset=0, data=b"forged\n", size=7, last=True,
                       token=ft.tokens[targets[1]])
    code, details = file_service_call(c, ft.fileserver, "Upload", [forged])
    assert code == grpc.StatusCode.PERMISSION_DENIED and "source" in details, (code, details)
    assert 'gse_fileserver_refused_total{reason="not_uploader"} 1.0' in _metrics(p1)
    items = wait_done(api, tid, targets, timeout=120)
    assert all(i["error_code"] == 0 for i in items), items
    assert {i["content"]["type"] for i in items} >= {"bt", "direct"}
    assert (tmp_path / "dst" / "mix" / "small.txt").read_bytes() == b"from inside area 2\n"
    assert md5(tmp_path / "dst" / "mix" / "big.bin") == md5(mix / "big.bin")
    # The source's upload went up the chain: area 2's proxy forwarded it to area 1's, which forwarded it on.
    for p in (p2, p1):
        forwarded = [float(line.split()[-1]) for line in _metrics(p).splitlines()
                     if line.startswith("gse_proxy_file_forwarded_bytes_total ")]
        assert forwarded and forwarded[0] >= len(b"from inside area 2\n"), (p.name, forwarded)
def test_a_relayed_data_stream_with_a_cloud_id_that_is_no_number_is_refused_with_a_reason(tmp_path):
    from gse.common.datastate import MD_AGENT_ID, MD_CLOUD_ID
    from gse.common.roles import AGENT, PROXY, Identity
    from gse.proxy.data import DataRelay, ProxyDataConfig
    relay = DataRelay(ProxyDataConfig(), data_dir=str(tmp_path), tls=None, node_id="proxy-1a", area=1,
                      ip="127.0.0.1")
    for peer in (Identity(AGENT, "a1"), Identity(PROXY, area=2)):
        why = relay._refusal(peer, {MD_AGENT_ID: "a1", MD_CLOUD_ID: "one"})
        assert "bk_cloud_id" in why, why
    assert relay._refusal(Identity(AGENT, "a1"), {MD_AGENT_ID: "a1", MD_CLOUD_ID: "1"}) == ""
    assert "area 2" in relay._refusal(Identity(AGENT, "a1"), {MD_AGENT_ID: "a1", MD_CLOUD_ID: "2"})

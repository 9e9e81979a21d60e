"""Data collection end to end: plugins (SDK protocol) -> real agents -> data servers -> real Kafka (tansu),
Redis and files; route changes live; faults (SIGKILL, restarts, a full spool); balancing; dispatch_message;
host snapshots. Every record is counted: lost ones fail the test, duplicates are counted and reported.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import redis
from kazoo.client import KazooClient

from conftest import ApiClient, Baseline, _new_cluster, api_for, start_callback_server

from gse.common.address import split_host_port
from gse.common.datastate import CHANNEL_DATASERVER_OPS
from gse.devcluster import wait_for
from gse.testing.plugin import MessageClient, ReportClient

pytestmark = pytest.mark.timeout(90)

OP = {"operator_name": "tester"}
PLAT = "bkmonitor"

AGENT_DATA = {"batch_delay_ms": 5, "respread_interval_s": 1.0, "snapshot_interval_s": 1.0, "retry_delay_s": 0.3,
              "reconnect_max_s": 1.0, "connect_timeout_s": 3.0, "ack_timeout_s": 10.0}


def start_data_agents(c, n: int, data: dict | None = None, wait: bool = True) -> list:
    procs = [c.start_agent(wait=False, data={**AGENT_DATA, **(data or {})}) for _ in range(n)]
    if wait:
        for p in procs:
            c.wait_healthy(p)
    return procs


@pytest.fixture(scope="module")
def dc(infra, tmp_path_factory):
    """One data cluster: dbproxy, a task server, the API, tansu Kafka, one data server, two agents."""
    c = _new_cluster(tmp_path_factory.mktemp("data"), infra)
    try:
        c.start_dbproxy()
        c.start_taskserver(data_view_interval_s=0.5, load_report_interval_s=0.5)
        c.start_apiserver()
        c.start_kafka()
        c.start_dataserver(load_report_interval_s=0.5, ops_interval_s=1.0, output_retry_s=0.3)
        start_data_agents(c, 2)
        api = api_for(c)
        api.wait_alive([a.info["bk_agent_id"] for a in c.agents])
        wait_for(lambda: all(connected(a) for a in c.agents), 20, "agents on a data server", interval=0.1)
    except BaseException:
        print(c.logs(40))
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "dc" in request.fixturenames:
        print(f"\n===== logs of the data cluster =====\n{request.getfixturevalue('dc').logs(40)}")


@pytest.fixture(autouse=True)
def _isolated(request):
    """Routes, slots and data servers as they were before each test (conftest.Baseline), agents streaming."""
    if "dc" not in request.fixturenames:
        yield
        return
    dc = request.getfixturevalue("dc")
    with Baseline(dc):
        yield
    wait_for(lambda: all(connected(a) for a in dc.agents), 20, "agents on a data server again", interval=0.1)


@pytest.fixture(scope="module")
def dapi(dc) -> ApiClient:
    return api_for(dc)


@pytest.fixture(scope="module")
def rds(infra):
    host, port = split_host_port(infra.redis[0])
    r = redis.Redis(host=host, port=int(port))
    yield r
    r.close()


# ---- helpers ---------------------------------------------------------------------------------------------

def metrics(proc) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def health(proc) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def connected(agent) -> bool:
    return metrics(agent).get("gse_agent_data_connected") == 1.0


def add_streamto(api, mode: str, c, **kw) -> int:
    st = {"name": f"{mode}-{uuid.uuid4().hex[:6]}", "report_mode": mode}
    if mode == "kafka":
        host, port = split_host_port(c.kafka)
        st["kafka"] = {"storage_address": [{"ip": host, "port": int(port)}]}
    elif mode == "redis":
        host, port = split_host_port(c.redis[0])
        st["redis"] = {"storage_address": [{"ip": host, "port": int(port)}]}
    else:
        st["data_log_path"] = kw["path"]
    r = api.call("/api/v2/data/add_streamto", {"operation": OP, "metadata": {"plat_name": PLAT}, "stream_to": st})
    assert r["code"] == 0, r
    return r["data"]["stream_to_id"]


def add_route(api, routes: list[dict], filters=(), channel_id: int = 0) -> int:
    body = {"operation": OP, "metadata": {"plat_name": PLAT, "channel_id": channel_id}, "route": routes,
            "stream_filters": list(filters)}
    r = api.call("/api/v2/data/add_route", body)
    assert r["code"] == 0, r
    return r["data"]["channel_id"]


def wait_routes(c, channels, present: bool = True) -> None:
    """Until every data server applied the routes of `channels` (routes apply live, within milliseconds)."""
    def applied():
        return all(set(channels) <= set(health(d)["channels"]) if present
                   else not set(channels) & set(health(d)["channels"]) for d in c.dataservers if d.alive())
    wait_for(applied, 10, f"routes of {channels} applied", interval=0.05)


def to_kafka(sid, topic, **kw):
    return {"name": f"k-{topic}", "stream_to": {"stream_to_id": sid, "kafka": {"topic_name": topic, **kw}}}


def to_redis(sid, key, data_type="list"):
    return {"name": f"r-{key}", "stream_to": {"stream_to_id": sid, "redis": {"channel_name": key,
                                                                              "data_type": data_type}}}


def to_file(sid, name):
    return {"name": f"f-{name}", "stream_to": {"stream_to_id": sid, "file": {"file_name": name}}}


def record(agent: int, channel: int, seq: int, pad: int = 0) -> bytes:
    return json.dumps({"a": agent, "c": channel, "s": seq, "p": "x" * pad}, separators=(",", ":")).encode()


async def report(agent, records: list[tuple[int, bytes]], chunk: int = 200, pause: float = 0.0) -> None:
    client = await ReportClient().connect(str(Path(agent.info["run_dir"]) / "ipc.state.report"))
    try:
        for i in range(0, len(records), chunk):
            await client.send_many(records[i:i + chunk])
            if pause:
                await asyncio.sleep(pause)
    finally:
        await client.close()


class Tally:
    """Counts records per (agent, channel): lost sequence numbers, duplicates, order of first arrivals."""

    def __init__(self, bodies):
        self.seen: dict[tuple, list[int]] = defaultdict(list)
        for b in bodies:
            d = json.loads(b)
            self.seen[(d["a"], d["c"])].append(d["s"])

    def missing(self, key, n: int) -> list[int]:
        return sorted(set(range(n)) - set(self.seen.get(key, [])))

    def duplicates(self) -> int:
        return sum(len(v) - len(set(v)) for v in self.seen.values())

    def in_order(self, key) -> bool:
        firsts = list(dict.fromkeys(self.seen.get(key, [])))
        return firsts == sorted(firsts)


def redis_list(rds, key: str) -> list[bytes]:
    return rds.lrange(key, 0, -1)


async def kafka_records(bootstrap: str, topic: str, want: int, timeout: float = 20.0) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp in sorted(batch, key=lambda t: t.partition):
                out.extend(m.value for m in batch[tp])
    finally:
        await consumer.stop()
    return out


# ---- tests -----------------------------------------------------------------------------------------------

async def test_plugins_report_to_kafka_redis_and_file_complete_and_in_order(dc, dapi, rds, tmp_path):
    tag = uuid.uuid4().hex[:8]
    out_dir = str(dc.base / "data-out" / tag)
    k, r, f = add_streamto(dapi, "kafka", dc), add_streamto(dapi, "redis", dc), add_streamto(dapi, "file", dc,
                                                                                             path=out_dir)
    topic = f"t{tag}"
    ch_k = add_route(dapi, [to_kafka(k, topic)])
    ch_r = add_route(dapi, [to_redis(r, f"l{tag}")])
    ch_f = add_route(dapi, [to_file(f, "both.log"), to_redis(r, f"s{tag}", "stream")])
    wait_routes(dc, [ch_k, ch_r, ch_f])
    n = 400
    for ai, agent in enumerate(dc.agents):
        recs = [(ch, record(ai, ch, i, 50)) for i in range(n) for ch in (ch_k, ch_r, ch_f)]
        await report(agent, recs)

    wait_for(lambda: rds.llen(f"l{tag}") >= 2 * n and rds.xlen(f"s{tag}") >= 2 * n, 20, "redis records")
    fpath = Path(out_dir) / "both.log"
    wait_for(lambda: fpath.exists() and fpath.read_bytes().count(b"\n") >= 2 * n, 20, "file records")
    from_kafka = await kafka_records(dc.kafka, topic, 2 * n)
    from_stream = [e[1][b"data"] for e in rds.xrange(f"s{tag}")]
    from_file = fpath.read_bytes().splitlines()
    for bodies, ch in ((from_kafka, ch_k), (redis_list(rds, f"l{tag}"), ch_r), (from_file, ch_f),
                       (from_stream, ch_f)):
        t = Tally(bodies)
        for ai in range(2):
            assert t.missing((ai, ch), n) == [], (ch, ai)
            assert t.in_order((ai, ch)), (ch, ai)
        assert t.duplicates() == 0


async def test_filters_and_redis_publish_through_a_real_data_server(dc, dapi, rds):
    tag = uuid.uuid4().hex[:8]
    r = add_streamto(dapi, "redis", dc)
    filters = [{"name": "web", "field_index": 1, "field_data_type": "string", "field_data_value": "web",
                "field_separator": "|", "field_in": "data"}]
    ch = add_route(dapi, [{**to_redis(r, f"f{tag}"), "filter_name_and": ["web"]}, to_redis(r, f"p{tag}", "pubsub")],
                   filters)
    wait_routes(dc, [ch])
    sub = rds.pubsub()
    sub.subscribe(f"p{tag}")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    await report(dc.agents[0], [(ch, f"{i}|{'web' if i % 2 else 'db'}|x".encode()) for i in range(20)])
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"f{tag}") >= 10, 15, "filtered records")
    published = []
    deadline = time.monotonic() + 15
    while len(published) < 20 and time.monotonic() < deadline:
        m = await asyncio.to_thread(sub.get_message, timeout=1)
        if m and m["type"] == "message":
            published.append(m["data"])
    sub.close()
    assert redis_list(rds, f"f{tag}") == [f"{i}|web|x".encode() for i in range(1, 20, 2)]
    assert published == [f"{i}|{'web' if i % 2 else 'db'}|x".encode() for i in range(20)]


async def test_route_changed_while_data_flows_applies_without_restart(dc, dapi, rds):
    tag = uuid.uuid4().hex[:8]
    r = add_streamto(dapi, "redis", dc)
    ch = add_route(dapi, [to_redis(r, f"a{tag}")])
    wait_routes(dc, [ch])
    n = 1500
    sender = asyncio.ensure_future(report(dc.agents[0], [(ch, record(0, ch, i)) for i in range(n)], chunk=50,
                                          pause=0.02))
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"a{tag}") >= 200, 15, "records on the first route")
    r2 = await asyncio.to_thread(dapi.call, "/api/c/compapi/v2/gse/config_update_route", {
        "operation": OP, "condition": {"channel_id": ch, "plat_name": PLAT},
        "specification": {"route": [to_redis(r, f"b{tag}")]}})
    assert r2["code"] == 0, r2
    await sender
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"a{tag}") + rds.llen(f"b{tag}") >= n, 20, "all records")
    first, second = Tally(redis_list(rds, f"a{tag}")), Tally(redis_list(rds, f"b{tag}"))
    a, b = first.seen[(0, ch)], second.seen[(0, ch)]
    assert a and b, "the change took effect while records were flowing"
    assert sorted(a + b) == list(range(n))
    assert max(a) < min(b)                       # the switch happened between two batches, in order


async def test_malformed_and_oversized_frames_close_only_that_connection(dc, dapi, rds):
    import socket as _socket
    import struct
    tag = uuid.uuid4().hex[:8]
    agent = dc.agents[1]
    ch = add_route(dapi, [to_redis(add_streamto(dapi, "redis", dc), f"m{tag}")])
    wait_routes(dc, [ch])
    run = Path(agent.info["run_dir"])
    good = await ReportClient().connect(str(run / "ipc.state.report"))
    await good.send_many([(ch, record(1, ch, i)) for i in range(10)])

    def bad(path: str, frame: bytes) -> bool:
        with _socket.socket(_socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(frame)
            try:
                return s.recv(100) == b""           # closed by the agent
            except ConnectionResetError:
                return True

    report_path, message_path = str(run / "ipc.state.report"), str(run / "ipc.state.message")
    assert bad(report_path, struct.pack(">IIIIII", 0x0BAD, ch, 0, 0, 0, 0))
    assert bad(report_path, struct.pack(">IIIIII", 0x0C01, ch, 0, 11 * 1024 * 1024, 0, 0) + b"x" * 100)
    assert bad(message_path, struct.pack(">IHHQIII", 0xFEEDFACE, 0x9006, 6, 1, 30, 0, 0) + b"{}")
    await good.send_many([(ch, record(1, ch, i)) for i in range(10, 20)])   # the good plugin is unaffected
    await good.close()
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"m{tag}") >= 20, 15, "the good plugin's records")
    assert Tally(redis_list(rds, f"m{tag}")).missing((1, ch), 20) == []

    def counted():
        m = metrics(agent)
        return all(m.get(f'gse_agent_ipc_errors{{reason="{r}",socket="{s}"}}', 0) >= 1
                   for s, r in (("report", "unknown_type"), ("report", "oversize"), ("message", "bad_magic")))
    await asyncio.to_thread(wait_for, counted, 10, "bad frames counted")

    # A channel without a route: counted and dropped at the data server, acknowledged to the agent.
    await report(agent, [(ch + 99_000_000, b"nobody-routes-me")] * 5)
    key = f'gse_dataserver_channel_dropped_total{{channel="{ch + 99_000_000}",reason="no_route"}}'
    await asyncio.to_thread(wait_for, lambda: any(metrics(d).get(key, 0) >= 5 for d in dc.dataservers), 10,
                            "unrouted records counted")


async def test_dispatch_message_round_trip_to_the_slot_callback(dc, dapi):
    base, posts, runner = await start_callback_server("7")
    url = f"{base}/7"
    zk = KazooClient(hosts=dc.zookeeper)
    zk.start(10)
    try:
        path = f"{dc.zk_root}/config/message_slots"
        zk.ensure_path(path)
        zk.set(path, json.dumps({"slot7": {"callback_url": url, "token": "tk"}}).encode())
        agent = dc.agents[0]
        aid = agent.info["bk_agent_id"]
        plugin = await MessageClient().connect(str(Path(agent.info["run_dir"]) / "ipc.state.message"))
        hello = await plugin.keepalive("myplugin", version="1.0")
        assert hello["agent_id"] == aid

        def dispatch(body):
            return dapi.call("/api/v2/cluster/dispatch_message", body, expect_status=None)

        body = {"slot_id": "slot7", "token": "tk", "message_id": "m-1", "agent_id_list": [aid, "f" * 32],
                "content": "ping é"}
        r = await asyncio.to_thread(dispatch, body)
        assert r["code"] == 0, r
        assert [x["bk_agent_id"] for x in r["data"]["results"]] == ["f" * 32]     # failures only
        meta, payload = await plugin.receive(timeout=10)
        assert meta["message_id"] == "m-1" and payload == "ping é".encode()
        await plugin.respond({"name": "myplugin", "transmit_type": "", "topic": "", "message_id": "m-1",
                              "session_id": meta["session_id"]}, "pong é".encode())
        got = await asyncio.wait_for(posts["7"].get(), 15)
        assert got == {"message_id": "m-1", "bk_agent_id": aid, "content": "pong é"}

        r = await asyncio.to_thread(dispatch, {**body, "token": "wrong"})
        assert r["code"] == 1000401
        r = await asyncio.to_thread(dispatch, {**body, "slot_id": "nope"})
        assert r["code"] == 1000400 and "slot_id" in r["message"]
        r = await asyncio.to_thread(dispatch, {**body, "content": 5})
        assert r["code"] == 1000400 and "content" in r["message"]
        await plugin.close()
    finally:
        zk.stop()
        zk.close()
        await runner.cleanup()


async def test_plugin_message_sent_on_its_own_reaches_the_slot_of_its_plugin_name(dc, dapi):
    """Spec section 9, with bk-gse-sdk's exact shapes: SendMessage without a dispatch before it (meta `{name,
    transmit_type: 0, topic: "", message_id, session_id: ""}`) is posted to the callback of the slot registered
    for the plugin's name; the SDK's reply to a dispatch (also session_id "") goes to the dispatching slot."""
    base, posts, runner = await start_callback_server("mon", "other", "disp")
    zk = KazooClient(hosts=dc.zookeeper)
    zk.start(10)
    plugin = None
    try:
        path = f"{dc.zk_root}/config/message_slots"
        zk.ensure_path(path)
        zk.set(path, json.dumps({
            "101": {"callback_url": f"{base}/mon", "token": "t1", "plugin_name": "bkmonitorbeat"},
            "102": {"callback_url": f"{base}/other", "token": "t2", "plugin_name": "bkunifylogbeat"},
            "103": {"callback_url": f"{base}/disp", "token": "t3", "plugin_name": ""}}).encode())
        agent = dc.agents[1]
        aid = agent.info["bk_agent_id"]
        plugin = await MessageClient().connect(str(Path(agent.info["run_dir"]) / "ipc.state.message"))
        await plugin.keepalive("bkmonitorbeat", version="3.1")

        def up(message_id, text):
            return plugin.respond({"name": "bkmonitorbeat", "transmit_type": 0, "topic": "", "message_id": message_id,
                                   "session_id": ""}, text.encode())

        async def posted(which):
            return await asyncio.wait_for(posts[which].get(), 15)

        # The slots document reaches the task server through a ZooKeeper watch: resend until it has.
        for attempt in range(50):
            await up(f"up-{attempt}", "hello é")
            try:
                got = await asyncio.wait_for(posts["mon"].get(), 0.3)
                break
            except asyncio.TimeoutError:
                continue
        else:
            raise AssertionError("the unsolicited message never reached the plugin's slot")
        assert got["bk_agent_id"] == aid and got["content"] == "hello é" and got["message_id"].startswith("up-")
        await up("up-last", "second")
        while (got := await posted("mon"))["message_id"] != "up-last":
            pass
        assert got == {"message_id": "up-last", "bk_agent_id": aid, "content": "second"}

        r = await asyncio.to_thread(dapi.call, "/api/v2/cluster/dispatch_message", {
            "slot_id": "103", "token": "t3", "message_id": "down-1", "agent_id_list": [aid], "content": "q"})
        assert r["code"] == 0, r
        meta, payload = await plugin.receive(timeout=10)
        assert meta["message_id"] == "down-1" and payload == b"q"
        await up("down-1", "answer")             # the SDK replies with the dispatch's message id, session_id ""
        assert await posted("disp") == {"message_id": "down-1", "bk_agent_id": aid, "content": "answer"}
        await asyncio.sleep(0.5)
        assert posts["other"].empty() and posts["disp"].empty()
        while not posts["mon"].empty():
            assert posts["mon"].get_nowait()["message_id"] != "down-1"
    finally:
        if plugin is not None:
            await plugin.close()
        zk.stop()
        zk.close()
        await runner.cleanup()


async def test_host_snapshots_visible_in_list_agent_info(dc, dapi, rds):
    aid = dc.agents[0].info["bk_agent_id"]
    key = f"{dc.key_prefix}gse:snapshot:{aid}"
    await asyncio.to_thread(wait_for, lambda: rds.exists(key), 15, "a host snapshot in Redis")
    assert 0 < rds.pttl(key) <= 60_000
    snap = json.loads(rds.get(key))
    assert snap["bk_agent_id"] == aid and snap["disks"] and snap["net"] and snap["proc_count"] > 0
    assert snap["uptime_s"] > 0 and "load1" in snap["load"]

    def matches():
        s = json.loads(rds.get(key))
        info = dapi.infos([aid])[aid]
        return info if (info["cpu_num"] == s["cpu"]["num"] and info["mem_size"] == s["mem"]["total"]
                        and abs(info["cpu_rate"] - s["cpu"]["rate"]) < 1e-6) else None
    info = await asyncio.to_thread(wait_for, matches, 10, "list_agent_info to show the snapshot")
    assert info["mem_rate"] > 0 and info["status_code"] == 2


async def test_dataserver_operating_figures_on_the_reserved_channel(dc, dapi, rds):
    tag = uuid.uuid4().hex[:8]
    add_route(dapi, [to_redis(add_streamto(dapi, "redis", dc), f"ops{tag}")], channel_id=CHANNEL_DATASERVER_OPS)
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"ops{tag}") >= 1, 15, "operating figures")
    fig = json.loads(rds.lindex(f"ops{tag}", 0))
    assert fig["node_id"] and fig["records_in"] > 0 and "channels" in fig and "outputs" in fig
    m = metrics(dc.dataservers[0])
    assert any(k.startswith("gse_dataserver_output_records_total") and v > 0 for k, v in m.items())
    assert any(k.startswith("gse_dataserver_output_seconds_count") for k in m)


async def test_dataserver_sigkill_mid_stream_loses_nothing(dc, dapi, rds):
    tag = uuid.uuid4().hex[:8]
    ch = add_route(dapi, [to_redis(add_streamto(dapi, "redis", dc), f"k{tag}")])
    wait_routes(dc, [ch])
    n = 2000
    senders = [asyncio.ensure_future(report(a, [(ch, record(i, ch, s, 100)) for s in range(n)], chunk=50,
                                            pause=0.02)) for i, a in enumerate(dc.agents)]
    await asyncio.to_thread(wait_for, lambda: rds.llen(f"k{tag}") >= 300, 15, "records flowing")
    ds = next(d for d in dc.dataservers if d.alive())
    ds.signal(signal.SIGKILL)
    ds.popen.wait(10)
    await asyncio.gather(*senders)
    dc.restart(ds)
    await asyncio.to_thread(wait_for, lambda: len(set(redis_list(rds, f"k{tag}"))) >= 2 * n, 30,
                            "every record after the restart")
    t = Tally(redis_list(rds, f"k{tag}"))
    for i in range(2):
        assert t.missing((i, ch), n) == []
    print(f"\nSIGKILL of the data server mid-stream: {2 * n} records, none lost, {t.duplicates()} duplicates")


async def test_agent_killed_with_records_in_its_spool_sends_them_after_restart(dc, dapi, rds):
    tag = uuid.uuid4().hex[:8]
    ch = add_route(dapi, [to_redis(add_streamto(dapi, "redis", dc), f"s{tag}")])
    wait_routes(dc, [ch])
    live = [d for d in dc.dataservers if d.alive()]
    for d in live:
        d.stop()
    agent = dc.agents[0]
    await asyncio.to_thread(wait_for, lambda: not connected(agent), 15, "the agent without a data server")
    before = metrics(agent).get("gse_agent_ipc_records", 0)
    n = 500
    await report(agent, [(ch, record(0, ch, i, 100)) for i in range(n)])
    await asyncio.to_thread(wait_for, lambda: metrics(agent).get("gse_agent_ipc_records", 0) >= before + n and
                            metrics(agent)["gse_agent_data_spool_unacked_batches"] >= 1, 10, "records spooled")
    await asyncio.sleep(0.05)           # past batch_delay_ms: the last batch is sealed into the spool
    agent.signal(signal.SIGKILL)
    agent.popen.wait(10)
    agent = dc.restart(agent)
    for d in live:
        dc.restart(d)
    await asyncio.to_thread(wait_for, lambda: len(set(redis_list(rds, f"s{tag}"))) >= n, 30, "the spooled records")
    assert Tally(redis_list(rds, f"s{tag}")).missing((0, ch), n) == []


async def test_second_dataserver_takes_load_and_one_leaving_loses_nothing(dc, dapi, rds):
    tag = uuid.uuid4().hex[:8]
    ch = add_route(dapi, [to_redis(add_streamto(dapi, "redis", dc), f"j{tag}")])
    first = next(d for d in dc.dataservers if d.alive())
    second = dc.start_dataserver(load_report_interval_s=0.5, output_retry_s=0.3)
    wait_routes(dc, [ch])
    n = 3000
    senders = [asyncio.ensure_future(report(a, [(ch, record(i, ch, s)) for s in range(n)], chunk=50, pause=0.03))
               for i, a in enumerate(dc.agents)]
    await asyncio.to_thread(wait_for, lambda: health(second)["agents"] >= 1, 20, "the new data server taking load")
    first.stop()                        # leaves: its agents move to the other one
    await asyncio.gather(*senders)
    await asyncio.to_thread(wait_for, lambda: health(second)["agents"] == len(dc.agents), 20, "all agents moved")
    await asyncio.to_thread(wait_for, lambda: len(set(redis_list(rds, f"j{tag}"))) >= 2 * n, 30, "every record")
    t = Tally(redis_list(rds, f"j{tag}"))
    for i in range(2):
        assert t.missing((i, ch), n) == []
    print(f"\ndata server joined and one left: {2 * n} records, none lost, {t.duplicates()} duplicates")


def test_spool_bound_drops_the_oldest_and_counts(make_cluster):
    c = make_cluster()
    agent = c.start_agent(wait=False, servers=["127.0.0.1:9"], data={
        **AGENT_DATA, "spool_max_bytes": 64 * 1024, "spool_segment_bytes": 16 * 1024, "batch_max_bytes": 4096})
    sock = Path(agent.info["run_dir"]) / "ipc.state.report"
    wait_for(sock.exists, 15, "the report socket", proc=agent)
    asyncio.run(report(agent, [(7, record(0, 7, i, 1000)) for i in range(300)]))

    def bounded():
        m = metrics(agent)
        return m if m.get("gse_agent_data_spool_dropped_records", 0) > 0 else None
    m = wait_for(bounded, 15, "records dropped by the full spool")
    assert m["gse_agent_data_spool_bytes"] <= 64 * 1024
    assert m["gse_agent_data_spool_dropped_batches"] > 0 and m["gse_agent_data_spool_unacked_batches"] > 0
    files = list((Path(agent.info["data_dir"]) / "spool").iterdir())
    assert sum(f.stat().st_size for f in files) <= 64 * 1024

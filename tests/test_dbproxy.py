"""dbproxy: sharding, replication, batching, and reads that survive a stopped Redis node."""

from __future__ import annotations

import asyncio

import redis

from conftest import api_for, start_agents

from gse.common import dbclient as db
from gse.common.address import split_host_port
from gse.common.tls import TLSMaterial
from gse.dbproxy.store import Ring


def _client(c) -> db.DbClient:
    d = c.certs_dir
    tls = TLSMaterial.from_dir(d, "server")
    return db.DbClient(tls, [p.info["address"] for p in c.dbproxies])


def test_ring_spreads_keys_and_picks_distinct_replicas():
    ring = Ring(["a:1", "b:2", "c:3"])
    counts = {"a:1": 0, "b:2": 0, "c:3": 0}
    for i in range(3000):
        reps = ring.replicas(f"key{i}", 2)
        assert len(set(reps)) == 2
        counts[reps[0]] += 1
    assert min(counts.values()) > 600          # roughly even: no node takes less than a fifth
    assert ring.replicas("k", 5) == ring.replicas("k", 3)   # R larger than the node count: every node once


def test_batch_sharded_and_replicated(make_cluster):
    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    c.start_redis()
    c.start_redis()
    c.start_dbproxy(replicas=2)

    async def go():
        client = _client(c)
        try:
            ops = [db.hset(f"h{i}", {"a": i, "b": "x"}, ttl_ms=60_000) for i in range(500)]
            ops += [db.set_(f"s{i}", f"v{i}") for i in range(500)]
            res = await client.execute(ops)
            assert all(r.ok for r in res)
            res = await client.execute([db.hgetall(f"h{i}") for i in range(500)] + [db.get("s7"), db.get("nope")])
            assert [db.text_fields(r)["a"] for r in res[:500]] == [str(i) for i in range(500)]
            assert res[500].found and res[500].value == b"v7" and not res[501].found
            res = await client.execute([db.incrby("n", 5), db.incrby("n", 2), db.sadd("set", ["a", "b"]),
                                        db.smembers("set"), db.append("log", "ab"), db.append("log", "cd"),
                                        db.getrange("log", 1, 2), db.hset("", {"a": 1})])
            assert res[1].integer == 7 and sorted(res[3].values) == [b"a", b"b"] and res[6].value == b"bc"
            assert not res[7].ok and "key" in res[7].error
        finally:
            await client.close()

    asyncio.run(go())
    nodes = [redis.Redis(host="127.0.0.1", port=split_host_port(a)[1]) for a in c.redis]
    key = f"{c.key_prefix}h3"
    assert all(n.exists(key) for n in nodes)                 # R=2 over two nodes: on both
    assert all(n.ttl(key) > 0 for n in nodes)


def test_three_nodes_each_key_on_two(make_cluster):
    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    for _ in range(3):
        c.start_redis()
    c.start_dbproxy(replicas=2)

    async def go():
        client = _client(c)
        try:
            res = await client.execute([db.set_(f"k{i}", i) for i in range(300)])
            assert all(r.ok for r in res)
        finally:
            await client.close()

    asyncio.run(go())
    nodes = [redis.Redis(host="127.0.0.1", port=split_host_port(a)[1]) for a in c.redis]
    per_key = [sum(1 for n in nodes if n.exists(f"{c.key_prefix}k{i}")) for i in range(300)]
    assert set(per_key) == {2}
    per_node = [len(n.keys(f"{c.key_prefix}k*")) for n in nodes]
    assert all(150 <= k <= 260 for k in per_node), per_node   # 600 copies spread over three nodes


def test_one_redis_node_stopped_reads_still_answered(make_cluster):
    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    r1 = c.start_redis()
    c.start_redis()
    c.start_dbproxy(replicas=2)
    c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    agents = start_agents(c, 3)
    ids = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(ids)
    r1.kill()
    # Every query right after the loss is answered from the surviving replica.
    for _ in range(20):
        states = api.states(ids)
        assert {states[i]["status_code"] for i in ids} == {2}, [(v["status_code"], v["report_time"], v["parent_port"]) for v in api.infos(ids).values()]
    hosts = [{"ip": p.info["ip"], "bk_cloud_id": 0} for p in agents]
    status = api.call("/api/c/compapi/v2/gse/get_agent_status", {"hosts": hosts})["data"]
    assert {v["bk_agent_alive"] for v in status.values()} == {1}
    # A new agent attaching while the node is down is written to the survivor and readable.
    (late,) = start_agents(c, 1)
    api.wait_alive([late.info["bk_agent_id"]])

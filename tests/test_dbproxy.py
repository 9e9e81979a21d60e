"""dbproxy: sharding, replication, batching, and reads that survive a stopped Redis node."""

from __future__ import annotations

import asyncio
import json

import redis

from conftest import api_for, start_agents

from gse.common import dbclient as db
from gse.common.address import split_host_port
from gse.common.tls import TLSMaterial
from gse.devcluster import wait_for
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


def _execute(c, ops):
    async def go():
        client = _client(c)
        try:
            return await client.execute(ops)
        finally:
            await client.close()
    return asyncio.run(go())


def _redis_port(proc) -> int:
    return proc.info["port"]


def _ops_and_reads(n: int, tag: str):
    """Writes of every kind the daemons use, and the reads that must find them afterwards."""
    writes, reads, want = [], [], []
    for i in range(n):
        writes.append(db.hset(f"{tag}:h{i}", {"a": i, "b": "x"}, ttl_ms=600_000))
        writes.append(db.set_(f"{tag}:s{i}", f"v{i}", ttl_ms=600_000))
        writes.append(db.setrange(f"{tag}:o{i}", 0, f"out{i}"))
        writes.append(db.sadd(f"{tag}:set", [f"m{i}"]))
        reads += [db.hgetall(f"{tag}:h{i}"), db.get(f"{tag}:s{i}"), db.getrange(f"{tag}:o{i}", 0, -1)]
        want += [{"a": str(i), "b": "x"}, f"v{i}", f"out{i}"]
    return writes, reads, want


def _check_reads(results, want, tag: str, n: int, members) -> None:
    got = []
    for r, w in zip(results, want):
        assert r.ok, r.error
        got.append(db.text_fields(r) if isinstance(w, dict) else r.value.decode())
    assert got == want, f"{tag}: {sum(1 for g, w in zip(got, want) if g != w)} of {len(want)} reads differ"
    assert sorted(m.decode() for m in members.values) == sorted(f"m{i}" for i in range(n))


def test_redis_node_restarted_empty_gets_back_what_it_missed(make_cluster):
    """Node A is killed; writes go on (to B, with hints); A comes back empty (no persistence) and is
    repaired (a full copy, then the hints); then B is killed and everything is read from A alone."""
    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    a = c.start_redis()
    b = c.start_redis()
    dp = c.start_dbproxy(replicas=2, probe_interval_s=0.2)
    before, before_reads, before_want = _ops_and_reads(200, "before")
    during, during_reads, during_want = _ops_and_reads(200, "during")

    def write(ops):
        res = _execute(c, ops)
        assert all(r.ok for r in res), [r.error for r in res if not r.ok][:3]

    write(before)
    a.kill()
    wait_for(lambda: '"down"' in json.dumps(c.healthz(dp)["redis"]), 10, "dbproxy to see node A down")
    write(during)
    c.start_redis(port=_redis_port(a), name=a.name)            # back, empty
    wait_for(lambda: set(c.healthz(dp)["redis"].values()) == {"up"}, 30, "node A repaired")
    b.kill()
    wait_for(lambda: '"down"' in json.dumps(c.healthz(dp)["redis"]), 10, "dbproxy to see node B down")
    res = _execute(c, before_reads + during_reads + [db.smembers("before:set"), db.smembers("during:set")])
    n = len(before_reads)
    _check_reads(res[:n], before_want, "before", 200, res[-2])
    _check_reads(res[n:-2], during_want, "during", 200, res[-1])


def test_redis_node_paused_gets_the_hinted_writes(make_cluster):
    """Node A stops answering (SIGSTOP) but keeps its data; writes meanwhile leave hints; A answers again and
    gets exactly the keys it missed, overwriting its stale copies; then B is killed and A serves them all."""
    import signal

    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    a = c.start_redis()
    b = c.start_redis()
    dp = c.start_dbproxy(replicas=2, probe_interval_s=0.2, redis_timeout_s=0.5)
    first, _r, _w = _ops_and_reads(100, "k")
    second = [db.hset(f"k:h{i}", {"a": i + 1000}) for i in range(100)] + \
        [db.set_(f"k:s{i}", f"w{i}", ttl_ms=600_000) for i in range(100)]

    def write(ops):
        res = _execute(c, ops)
        assert all(r.ok for r in res), [r.error for r in res if not r.ok][:3]

    write(first)
    a.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: '"down"' in json.dumps(c.healthz(dp)["redis"]), 10, "dbproxy to see node A down")
        write(second)
    finally:
        a.signal(signal.SIGCONT)
    wait_for(lambda: set(c.healthz(dp)["redis"].values()) == {"up"}, 30, "node A repaired")
    direct = redis.Redis(host="127.0.0.1", port=_redis_port(a))
    assert direct.hget(f"{c.key_prefix}k:h7", "a") == b"1007"       # the stale copy was replaced
    assert not direct.keys(f"{c.key_prefix}__gse:hints:*")            # every hint applied and forgotten
    b.kill()
    wait_for(lambda: '"down"' in json.dumps(c.healthz(dp)["redis"]), 10, "dbproxy to see node B down")
    res = _execute(c, [db.hgetall(f"k:h{i}") for i in range(100)] +
                   [db.get(f"k:s{i}") for i in range(100)])
    assert [db.text_fields(r)["a"] for r in res[:100]] == [str(i + 1000) for i in range(100)]
    assert [r.value.decode() for r in res[100:]] == [f"w{i}" for i in range(100)]


def test_read_falls_back_when_a_replica_lacks_the_key(make_cluster):
    """A key missing on its first replica (deleted behind dbproxy's back) is read from the next one, and the
    first one gets it back (read repair)."""
    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    c.start_redis()
    c.start_redis()
    c.start_dbproxy(replicas=2, probe_interval_s=0.2)
    nodes = {p.info["port"]: redis.Redis(host="127.0.0.1", port=p.info["port"]) for p in c.procs if p.kind == "redis"}
    ring = Ring([f"127.0.0.1:{p}" for p in nodes])
    _execute(c, [db.hset(f"r{i}", {"v": i}) for i in range(50)])
    for i in range(50):             # drop each key from the replica dbproxy reads first
        first = ring.replicas(f"r{i}", 2)[0]
        nodes[split_host_port(first)[1]].delete(f"{c.key_prefix}r{i}")
    res = _execute(c, [db.hgetall(f"r{i}") for i in range(50)])
    assert [db.text_fields(r).get("v") for r in res] == [str(i) for i in range(50)]
    wait_for(lambda: all(n.exists(f"{c.key_prefix}r{i}") for n in nodes.values() for i in range(50)), 10,
             "read repair to restore the keys")


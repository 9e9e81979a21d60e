"""dbproxy's sharded store (gse/dbproxy/store.py) on in-process fake Redis nodes that speak the RESP the
store sends: ring placement with one pipeline per node per batch, the replica a read goes to and its
fallbacks, writes that need one replica and leave hints for the others, a node that fails mid-batch, and a
node that comes back (repaired before it serves). Unit tests, milliseconds each; the same against real
Redis nodes is in test_dbproxy.py."""

from __future__ import annotations

import asyncio
import fnmatch
import pickle

import hiredis
import pytest

from gse.common import dbclient as db
from gse.common.resp import ConnectionLost, RedisReplyError
from gse.dbproxy.store import DOWN, UP, ShardedStore

pytestmark = pytest.mark.timeout(10)

NODES = ["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"]


class FakeRedis:
    """One Redis node in memory: parses the RESP commands of a pipeline and answers them in order (the
    commands the store sends; DUMP/RESTORE carry a pickled value)."""

    def __init__(self):
        self.data: dict[bytes, object] = {}
        self.pipelines = 0          # pipelines answered
        self.down = False

    async def pipeline(self, commands: list[bytes]) -> list:
        if self.down:
            raise ConnectionLost("fake node down")
        self.pipelines += 1
        reader = hiredis.Reader()
        reader.feed(b"".join(commands))
        replies = []
        while (cmd := reader.gets()) is not False:
            try:
                replies.append(self._run(cmd[0].upper(), cmd[1:]))
            except RedisReplyError as exc:
                replies.append(exc)
        assert len(replies) == len(commands)
        return replies

    def _typed(self, key: bytes, kind: type):
        v = self.data.get(key)
        if v is not None and not isinstance(v, kind):
            raise RedisReplyError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return v

    def _run(self, name: bytes, a: list[bytes]):
        d = self.data
        if name == b"PING":
            return b"PONG"
        if name == b"SET":
            d[a[0]] = a[1]
            return b"OK"
        if name == b"GET":
            return self._typed(a[0], bytes)
        if name == b"DEL":
            return int(d.pop(a[0], None) is not None)
        if name in (b"PEXPIRE", b"PTTL"):
            return (1 if a[0] in d else 0) if name == b"PEXPIRE" else (-1 if a[0] in d else -2)
        if name == b"HSET":
            h = self._typed(a[0], dict)
            if h is None:
                h = d[a[0]] = {}
            new = sum(1 for k in a[1::2] if k not in h)
            h.update(zip(a[1::2], a[2::2]))
            return new
        if name == b"HGETALL":
            return [x for kv in (self._typed(a[0], dict) or {}).items() for x in kv]
        if name == b"INCRBY":
            d[a[0]] = str(int(self._typed(a[0], bytes) or b"0") + int(a[1])).encode()
            return int(d[a[0]])
        if name in (b"SADD", b"SREM"):
            s = self._typed(a[0], set)
            if s is None:
                s = d[a[0]] = set()
            before = len(s)
            (s.update if name == b"SADD" else s.difference_update)(a[1:])
            if not s:
                del d[a[0]]
            return abs(len(s) - before)
        if name == b"SRANDMEMBER":
            return sorted(self._typed(a[0], set) or ())[:int(a[1])]
        if name == b"DUMP":
            return None if a[0] not in d else pickle.dumps(d[a[0]])
        if name == b"RESTORE":
            if a[0] in d and b"REPLACE" not in a[3:]:
                raise RedisReplyError("BUSYKEY Target key name already exists.")
            d[a[0]] = pickle.loads(a[2])
            return b"OK"
        if name == b"SCAN":
            pattern = a[a.index(b"MATCH") + 1].decode() if b"MATCH" in a else "*"
            return [b"0", [k for k in d if fnmatch.fnmatchcase(k.decode(), pattern)]]
        raise RedisReplyError(f"ERR unknown command {name!r}")


async def started(replicas: int = 2, prefix: str = "") -> tuple[ShardedStore, dict[str, FakeRedis]]:
    """A store on fresh fake nodes after its first probe (nodes are DOWN until probed, then repaired, then UP)."""
    s = ShardedStore(NODES, replicas=replicas, key_prefix=prefix)
    fakes = {}
    for addr, node in s.nodes.items():
        node.client = fakes[addr] = FakeRedis()
    await s.probe()
    await s.settle(2)
    assert set(s.state().values()) == {UP}
    for f in fakes.values():
        f.pipelines = 0
    return s, fakes


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def user_keys(f: FakeRedis) -> set[bytes]:
    return {k for k in f.data if b"__gse:" not in k}


def test_each_key_lands_on_its_ring_replicas_one_pipeline_per_node():
    async def go():
        s, fakes = await started()
        ops = [db.hset(f"agent:{i}", {"ip": f"10.1.{i // 250}.{i % 250}"}, ttl_ms=60_000) for i in range(600)]
        res = await s.execute(ops)
        assert all(r.ok for r in res)
        assert all(f.pipelines == 1 for f in fakes.values())          # the batch split by node, once each
        for i in range(600):
            key = f"agent:{i}".encode()
            holders = {a for a, f in fakes.items() if key in f.data}
            assert holders == set(s.ring.replicas(f"agent:{i}", 2))
        per_node = [len(user_keys(f)) for f in fakes.values()]
        assert sum(per_node) == 1200 and min(per_node) > 250           # 600 keys x 2 copies, spread

    run(go())


def test_key_prefix_is_applied_on_every_node():
    async def go():
        s, fakes = await started(prefix="t1:")
        await s.execute([db.set_("k", "v"), db.hset("h", {"a": 1})])
        assert set().union(*(user_keys(f) for f in fakes.values())) == {b"t1:k", b"t1:h"}
        assert all(k.startswith(b"t1:") for f in fakes.values() for k in f.data)   # its own markers too

    run(go())


def test_reads_go_to_one_replica_and_fall_back_when_it_fails_mid_batch():
    async def go():
        s, fakes = await started()
        await s.execute([db.hset(f"h{i}", {"n": i}) for i in range(50)])
        for f in fakes.values():
            f.pipelines = 0
        res = await s.execute([db.hgetall(f"h{i}") for i in range(50)])
        assert [db.text_fields(r)["n"] for r in res] == [str(i) for i in range(50)]
        assert sum(f.pipelines for f in fakes.values()) <= 3           # one replica per key, batched per node
        first = s.ring.replicas("h0", 2)[0]
        fakes[first].down = True                                        # fails during the next batch
        res = await s.execute([db.hgetall(f"h{i}") for i in range(50)])
        assert all(r.ok for r in res) and [db.text_fields(r)["n"] for r in res] == [str(i) for i in range(50)]
        assert s.state()[first] == DOWN and s.healthy_count() == 2
        fakes[first].pipelines = 0
        await s.execute([db.hgetall("h0")])
        assert fakes[first].pipelines == 0                              # a node known down is not tried

    run(go())


def test_a_read_that_finds_nothing_on_one_replica_asks_the_next_and_repairs_the_first():
    async def go():
        s, fakes = await started()
        await s.execute([db.set_("k", "v")])
        first, second = s.ring.replicas("k", 2)
        del fakes[first].data[b"k"]                                     # lost on the first replica only
        (r,) = await s.execute([db.get("k")])
        assert r.ok and r.found and r.value == b"v"
        await s.probe()                                                 # read repair rides on the probe
        assert fakes[first].data[b"k"] == b"v"

    run(go())


def test_writes_need_one_replica_up_and_fail_retryable_without_any():
    async def go():
        s, fakes = await started()
        a, b = s.ring.replicas("job", 2)
        fakes[a].down = True
        (r,) = await s.execute([db.incrby("job", 5)])
        assert r.ok and r.integer == 5 and fakes[b].data[b"job"] == b"5"
        fakes[b].down = True
        (r,) = await s.execute([db.incrby("job", 1)])
        assert not r.ok and r.retryable and "unavailable" in r.error
        (r,) = await s.execute([db.incrby("job", 1)])                   # both known down: not even tried
        assert not r.ok and r.retryable and "no replica" in r.error

    run(go())


def test_a_node_that_missed_writes_is_repaired_from_hints_before_it_serves_again():
    async def go():
        s, fakes = await started()
        a, b = s.ring.replicas("k", 2)
        await s.execute([db.set_("k", "old")])
        fakes[a].down = True
        await s.probe()
        assert s.state()[a] == DOWN
        (r,) = await s.execute([db.set_("k", "new")])                  # taken by `b`, which keeps a hint for `a`
        assert r.ok and fakes[a].data[b"k"] == b"old"
        assert b"k" in fakes[b].data[s.hint_key(a)]
        fakes[a].down = False
        await s.probe()
        await s.settle(2)
        assert s.state()[a] == UP
        assert fakes[a].data[b"k"] == b"new"                            # copied before it serves reads
        assert s.hint_key(a) not in fakes[b].data                       # and the hint is spent

    run(go())


def test_an_error_reply_fails_only_its_op_and_bad_ops_touch_no_node():
    async def go():
        s, fakes = await started()
        assert all(r.ok for r in await s.execute([db.set_("str", "x")]))
        for f in fakes.values():
            f.pipelines = 0
        res = await s.execute([db.hgetall("str"), db.get("str")])
        assert not res[0].ok and "WRONGTYPE" in res[0].error and not res[0].retryable
        assert res[1].ok and res[1].value == b"x"
        calls = sum(f.pipelines for f in fakes.values())
        res = await s.execute([db.hset("", {"a": 1}), db.hset("h", {})])
        assert "key" in res[0].error and "fields" in res[1].error
        assert sum(f.pipelines for f in fakes.values()) == calls

    run(go())

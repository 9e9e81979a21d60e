"""The data server's Redis output (gse/dataserver/outputs.py RedisSink) against real redis-server processes:
the three data types, a password, Sentinel's master_name and a failover. In-process sink, no daemons."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis

from gse.dataserver.outputs import OutputError, RedisSink, SinkSettings
from gse.devcluster import Cluster, free_port, wait_for


@pytest.fixture
def rc(tmp_path):
    c = Cluster(tmp_path / "redis")
    yield c
    c.stop()


def _sink(port: int | list[int], settings: SinkSettings | None = None, **redis_doc) -> RedisSink:
    ports = port if isinstance(port, list) else [port]
    doc = {"stream_to": {"report_mode": "redis", "redis": {
        "storage_address": [{"ip": "127.0.0.1", "port": p} for p in ports], **redis_doc}}}
    return RedisSink(7, doc, settings or SinkSettings(redis_timeout_s=2.0, retry_s=0.0))


async def _submit(sink: RedisSink, records: list[bytes], key: str, dtype: str | None) -> None:
    target = {"channel_name": key} | ({"data_type": dtype} if dtype else {})
    await asyncio.wait_for(sink.submit(records, "agent-1", target, 1001), 10)


def test_redis_output_list_stream_and_pubsub_in_order(rc):
    port = rc.start_redis(node=False).info["port"]
    r = redis.Redis(port=port)
    sub = r.pubsub()
    sub.subscribe("ch:pub")
    wait_for(lambda: sub.get_message(timeout=0.1), 5, "subscribed")
    big = [b"%d" % i for i in range(25_000)]                  # more than one RPUSH (10,000 a command)

    async def go():
        sink = _sink(port, SinkSettings(redis_stream_maxlen=100, retry_s=0.0))
        sink.start()
        try:
            # several submits queued at once go out as one pipeline and keep their order
            await asyncio.gather(*(_submit(sink, big[i:i + 5000], "ch:list", "list") for i in range(0, 25_000, 5000)))
            await _submit(sink, [b"s%d" % i for i in range(300)], "ch:stream", "stream")
            await _submit(sink, [b"p1", b"p2 \r\n binary \x00"], "ch:pub", None)     # pubsub is the default
            return sink.stats
        finally:
            await sink.close()

    stats = asyncio.run(go())
    assert r.lrange("ch:list", 0, -1) == big
    entries = r.xrange("ch:stream")
    assert 100 <= len(entries) < 300 and entries[-1][1] == {b"data": b"s299"}      # MAXLEN ~ 100 trims
    got = []
    wait_for(lambda: got.extend(m["data"] for m in iter(lambda: sub.get_message(timeout=0.05), None)
                                if m["type"] == "message") or len(got) >= 2, 5, "published records")
    assert got == [b"p1", b"p2 \r\n binary \x00"]
    assert stats["records"] == 25_000 + 300 + 2 and stats["errors"] == 0


def test_redis_output_refusal_fails_only_that_batch(rc):
    port = rc.start_redis(node=False).info["port"]
    r = redis.Redis(port=port)
    r.set("ch:str", "not a list")

    async def go():
        sink = _sink(port)
        sink.start()
        try:
            bad = sink.submit([b"a"], "agent-1", {"channel_name": "ch:str", "data_type": "list"}, 1)
            good = sink.submit([b"b"], "agent-1", {"channel_name": "ch:ok", "data_type": "list"}, 1)
            with pytest.raises(OutputError, match="WRONGTYPE"):
                await asyncio.wait_for(bad, 10)
            await asyncio.wait_for(good, 10)
        finally:
            await sink.close()

    asyncio.run(go())
    assert r.lrange("ch:ok", 0, -1) == [b"b"]


def test_redis_output_password_is_used_and_never_logged(rc, caplog):
    secret = "s3cret-Pa55"
    port = rc.start_redis(node=False, args=("--requirepass", secret)).info["port"]

    async def go(passwd: str):
        sink = _sink(port, passwd=passwd)
        sink.start()
        try:
            await _submit(sink, [b"x"], "ch:auth", "list")
        finally:
            await sink.close()

    asyncio.run(go(secret))
    assert redis.Redis(port=port, password=secret).lrange("ch:auth", 0, -1) == [b"x"]
    with caplog.at_level(logging.DEBUG), pytest.raises(OutputError) as e:
        asyncio.run(go("wrong-" + secret))
    assert "WRONGPASS" in str(e.value) or "AUTH" in str(e.value)
    assert secret not in str(e.value) and secret not in caplog.text


def test_redis_output_finds_the_master_by_sentinel_and_follows_a_failover(rc):
    master = rc.start_redis(node=False).info["port"]
    replica = rc.start_redis(node=False, args=("--replicaof", "127.0.0.1", str(master))).info["port"]
    m, rp = redis.Redis(port=master), redis.Redis(port=replica)
    wait_for(lambda: rp.info("replication")["master_link_status"] == "up", 20, "replica in sync")
    sentinel = rc.start_sentinel("gse-out", master).info["port"]
    s = redis.Redis(port=sentinel)
    wait_for(lambda: s.sentinel_master("gse-out")["num-slaves"] == 1, 20, "sentinel sees the replica")

    async def go():
        # Nothing listens at the first address: the next Sentinel is asked.
        sink = _sink([free_port(), sentinel], master_name="gse-out")
        sink.start()
        try:
            await _submit(sink, [b"before"], "ch:ha", "list")
            s.execute_command("SENTINEL", "FAILOVER", "gse-out")
            await asyncio.to_thread(wait_for, lambda: rp.info("replication")["role"] == "master"
                                    and m.info("replication")["role"] == "slave", 30, "the roles swapped")
            # The old master answers READONLY (or drops us): batches fail until the sink asks the Sentinel
            # again and writes to the new master.
            deadline = time.monotonic() + 30
            while True:
                try:
                    await _submit(sink, [b"after"], "ch:ha", "list")
                    break
                except OutputError:
                    assert time.monotonic() < deadline, "the sink never found the new master"
                    await asyncio.sleep(0.2)
        finally:
            await sink.close()

    asyncio.run(go())
    assert rp.lrange("ch:ha", 0, -1) == [b"before", b"after"]

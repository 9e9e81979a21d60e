"""The task server's batch writer and acknowledgement batcher, in process with a fake dbproxy client: unit
tests, milliseconds each. They pin the public behaviour (merging per key, ordered ops before hash writes,
`written()` futures, one frame per agent per flush); retry timing is left to the end-to-end tests."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from gse.common import dbclient as db
from gse.common.errors import Unavailable
from gse.common.logs import JsonFormatter
from gse.common.records import HashWrite
from gse.pb import agent_pb2 as apb
from gse.pb import dbproxy_pb2 as dpb
from gse.taskserver.batch_writer import BatchWriter
from gse.taskserver.tasks import AckBatcher

pytestmark = pytest.mark.timeout(10)


class FakeDb:
    """Records every batch it is given; answers each op ok (or raises `fail` once)."""

    def __init__(self):
        self.batches: list[list[dpb.Op]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None       # set: batches wait for it

    async def execute(self, ops):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        self.batches.append(list(ops))
        return [dpb.Result(ok=True) for _ in ops]

    @property
    def ops(self) -> list[dpb.Op]:
        return [op for b in self.batches for op in b]


def hw(key: str, ttl: int = 1000, **fields) -> HashWrite:
    return HashWrite(key, {k: str(v).encode() for k, v in fields.items()}, ttl)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_writes_to_one_key_merge_into_one_hset_with_the_latest_fields():
    async def go():
        fake = FakeDb()
        w = BatchWriter(fake)
        w.put(hw("item:1", status=1, start=5))
        w.put(hw("item:1", status=2, end=9))
        w.put(hw("item:2", status=1))
        assert w.pending == 2
        await w.flush()
        return fake

    fake = run(go())
    assert len(fake.batches) == 1
    by_key = {op.key: op for op in fake.ops}
    assert set(by_key) == {"item:1", "item:2"}
    one = by_key["item:1"]
    assert one.kind == db.K.HSET and one.ttl_ms == 1000
    assert dict(one.fields) == {"status": b"2", "start": b"5", "end": b"9"}


def test_ordered_ops_go_before_the_hash_writes_and_keep_their_order():
    async def go():
        fake = FakeDb()
        w = BatchWriter(fake)
        w.put(hw("item:1", status=2))                          # the item says "finished"...
        w.add([db.setrange("out:1", 0, b"abc"), db.setrange("out:1", 3, b"def")])   # ...after its output
        w.add([db.append("log", b"x")])
        await w.flush()
        return fake

    ops = run(go()).ops
    assert [(op.kind, op.key) for op in ops] == [(db.K.SETRANGE, "out:1"), (db.K.SETRANGE, "out:1"),
                                                 (db.K.APPEND, "log"), (db.K.HSET, "item:1")]
    assert [op.start for op in ops[:2]] == [0, 3]


def test_written_resolves_only_once_what_was_queued_before_it_is_stored():
    async def go():
        fake = FakeDb()
        fake.gate = asyncio.Event()
        w = BatchWriter(fake, flush_interval_s=0.001)
        runner = asyncio.ensure_future(w.run())
        w.put(hw("a", x=1))
        first = w.written()
        await asyncio.sleep(0.02)
        assert not first.done()                       # the flush is held at dbproxy
        fake.gate.set()
        await first
        assert [op.key for op in fake.ops] == ["a"]
        w.put(hw("b", x=1))
        second = w.written()
        await second
        assert [op.key for op in fake.ops] == ["a", "b"]
        runner.cancel()

    run(go())


def test_lazy_writes_wait_for_the_tick_or_ride_with_the_next_flush():
    async def go():
        fake = FakeDb()
        w = BatchWriter(fake, flush_interval_s=0.001, lazy_interval_s=0.2)
        runner = asyncio.ensure_future(w.run())
        await asyncio.sleep(0.01)                 # the loop is waiting
        w.put(hw("hb:1", cpu=1), lazy=True)
        await asyncio.sleep(0.05)
        assert fake.ops == []                     # a heartbeat alone does not start a flush
        w.put(hw("item:1", status=2))             # a result does, and the heartbeat rides along
        await w.written()
        assert sorted(op.key for op in fake.ops) == ["hb:1", "item:1"]
        runner.cancel()

    run(go())


def test_a_large_queue_goes_in_batches_of_max_batch():
    async def go():
        fake = FakeDb()
        w = BatchWriter(fake, max_batch=100)
        w.add([db.append(f"k{i}", b"x") for i in range(250)])
        await w.flush()
        return fake

    fake = run(go())
    assert [len(b) for b in fake.batches] == [100, 100, 50]
    assert [op.key for op in fake.ops] == [f"k{i}" for i in range(250)]


def test_a_failed_flush_keeps_everything_and_newer_fields_win_when_merged_back():
    async def go():
        fake = FakeDb()
        w = BatchWriter(fake)
        w.put(hw("item:1", status=1, out=3))
        w.add([db.append("log", b"1")])
        waiter = w.written()
        fake.fail = Unavailable("no dbproxy answered")
        flushing = asyncio.ensure_future(w.flush())
        await asyncio.sleep(0.01)                 # failed once; what it held is queued again
        assert not waiter.done() and w.pending == 2 and fake.ops == []
        w.put(hw("item:1", status=2))             # newer than what failed
        flushing.cancel()                         # (not waiting out the retry's back-off: a flush now)
        await asyncio.gather(flushing, return_exceptions=True)
        await w.flush()
        await waiter
        return fake

    fake = run(go())
    ops = fake.ops
    assert [op.kind for op in ops] == [db.K.APPEND, db.K.HSET]
    assert dict(ops[1].fields) == {"status": b"2", "out": b"3"}


class FakeSession:
    def __init__(self, name: str):
        self.name = name
        self.frames: list[apb.ServerFrame] = []

    def send(self, body: bytes) -> None:
        self.frames.append(apb.ServerFrame.FromString(body))


def ref(task: str, atomic: int) -> apb.ItemRef:
    return apb.ItemRef(task_id=task, atomic_task_id=atomic)


def test_ack_batcher_one_frame_per_agent_after_the_reports_go_quiet():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("taskserver"))        # formats in the trace of the log call
    logger = logging.getLogger("gse.taskserver.tasks")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO

    async def go():
        fake = FakeDb()
        w = BatchWriter(fake, flush_interval_s=0.001)
        acks = AckBatcher(w, quiet_s=0.05, max_delay_s=1.0)
        tasks = [asyncio.ensure_future(w.run()), asyncio.ensure_future(acks.run())]
        a, b = FakeSession("a"), FakeSession("b")
        w.put(hw("item:a0", status=2))
        acks.when_stored(a, [ref("T1", 0)])
        w.put(hw("item:a1", status=2))
        acks.when_stored(a, [ref("T1", 1), ref("T2", 0)])
        w.put(hw("item:b0", status=2))
        acks.when_stored(b, [ref("T1", 0)])
        await asyncio.sleep(0.02)
        assert a.frames == [] and b.frames == []          # results still arriving: no acks yet
        await asyncio.sleep(0.15)
        for t in tasks:
            t.cancel()
        return a, b, fake

    try:
        a, b, fake = run(go())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(a.frames) == 1 and len(b.frames) == 1
    assert [(r.task_id, r.atomic_task_id) for r in a.frames[0].ack.items] == [("T1", 0), ("T1", 1), ("T2", 0)]
    assert [(r.task_id, r.atomic_task_id) for r in b.frames[0].ack.items] == [("T1", 0)]
    assert {op.key for op in fake.ops} == {"item:a0", "item:a1", "item:b0"}     # stored before acknowledged
    # One line per task, not per agent, naming the task through the trace.
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    stored = {d["task_id"]: (d["agents"], d["items"]) for d in lines if d["msg"] == "results stored"}
    assert stored == {"T1": (2, 3), "T2": (1, 1)}


def test_ack_batcher_never_waits_longer_than_max_delay_under_steady_reports():
    async def go():
        fake = FakeDb()
        w = BatchWriter(fake, flush_interval_s=0.001)
        acks = AckBatcher(w, quiet_s=0.05, max_delay_s=0.2)
        tasks = [asyncio.ensure_future(w.run()), asyncio.ensure_future(acks.run())]
        s = FakeSession("a")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        while not s.frames and loop.time() - t0 < 2:
            w.put(hw(f"item:{n}", status=2))
            acks.when_stored(s, [ref("T", n)])          # a report every 10 ms: never quiet for 50 ms
            n += 1
            await asyncio.sleep(0.01)
        waited = loop.time() - t0
        for t in tasks:
            t.cancel()
        return s, waited

    s, waited = run(go())
    assert s.frames and 0.15 <= waited < 0.6
    assert s.frames[0].ack.items[0].atomic_task_id == 0


def test_ack_batcher_holds_acks_until_the_writer_stored_the_results():
    async def go():
        fake = FakeDb()
        fake.gate = asyncio.Event()
        w = BatchWriter(fake, flush_interval_s=0.001)
        acks = AckBatcher(w, quiet_s=0.01, max_delay_s=0.05)
        tasks = [asyncio.ensure_future(w.run()), asyncio.ensure_future(acks.run())]
        s = FakeSession("a")
        w.put(hw("item:0", status=2))
        acks.when_stored(s, [ref("T", 0)])
        await asyncio.sleep(0.15)
        held = list(s.frames)
        fake.gate.set()
        await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        return held, s.frames

    held, frames = run(go())
    assert held == [] and len(frames) == 1

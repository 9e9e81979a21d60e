"""Micro-benchmark: the Python-side cost of one heartbeat on the task server, without gRPC.

Splits what the server does for one heartbeat frame into: protobuf decode (AgentFrame.FromString, what
the request deserializer runs), the handler (WhichOneof + AgentAccess._heartbeat building the session
fields and coalescing them into BatchWriter), and the flush's share (building one dbproxy hset op per
coalesced key, amortised), plus the asyncio wake-up cost of a Queue hand-off per message for comparison.
Compare the sum with the end-to-end figure from run_probe.py (us_per_hb): the rest is gRPC (core +
Cython/asyncio plumbing) and TLS.

    .venv/bin/python bench/probes/hb_cost.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gse.common import dbclient as db  # noqa: E402
from gse.pb import agent_pb2 as pb  # noqa: E402
from gse.taskserver.agent_access import AgentAccess  # noqa: E402
from gse.taskserver.batch_writer import BatchWriter  # noqa: E402


class _S:
    agent_id = "probe" + "0" * 27


def main() -> None:
    snap = pb.HostSnapshot(cpu_num=2, mem_size=8 << 30, cpu_rate=3.0, mem_rate=40.0, load1=0.1, uptime_s=3600,
                           proc_count=100, disk_total=100 << 30, disk_used=10 << 30)
    raw = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1, cpu_rate=0.1, mem_rate=0.2, host=snap)).SerializeToString()
    n = 200_000
    t_parse = timeit.timeit(lambda: pb.AgentFrame.FromString(raw), number=n) / n

    writer = BatchWriter(None, 0.01)
    access = AgentAccess("probe", "127.0.0.1", 1, writer, session_ttl_ms=1000, heartbeat_interval_s=10,
                         heartbeat_misses=3, hello_timeout_s=10)
    frame = pb.AgentFrame.FromString(raw)
    sessions = []
    for i in range(10_000):
        s = _S()
        s.agent_id = f"probe{i:027x}"
        sessions.append(s)

    def handle_all():
        for s in sessions:
            s.last_seen = time.monotonic()
            if frame.WhichOneof("body") == "heartbeat":
                access._heartbeat(s, frame.heartbeat)

    t_handler = timeit.timeit(handle_all, number=10) / (10 * len(sessions))

    def flush_build():
        hashes, writer._hashes = writer._hashes, {}
        return [db.hset(k, f, ttl) for k, (f, ttl) in hashes.items()]

    handle_all()
    t0 = time.perf_counter()
    ops = flush_build()
    t_flush = (time.perf_counter() - t0) / max(1, len(ops))

    async def queue_handoff(m: int) -> float:
        q: asyncio.Queue = asyncio.Queue()

        async def consumer():
            for _ in range(m):
                await q.get()

        c = asyncio.ensure_future(consumer())
        t = time.perf_counter()
        for _ in range(m):
            q.put_nowait(1)
            await asyncio.sleep(0)
        await c
        return (time.perf_counter() - t) / m

    import uvloop
    t_queue = uvloop.run(queue_handoff(100_000))
    print(f"protobuf decode       {t_parse * 1e6:6.1f} us")
    print(f"handler + coalesce    {t_handler * 1e6:6.1f} us")
    print(f"flush op build        {t_flush * 1e6:6.1f} us per coalesced key (once per key per flush)")
    print(f"queue hand-off+wake   {t_queue * 1e6:6.1f} us (what a Queue/reader-task hop costs per message)")
    print(f"sum (Python side)     {(t_parse + t_handler + t_flush) * 1e6:6.1f} us")


if __name__ == "__main__":
    main()

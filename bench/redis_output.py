"""The data server's Redis output alone: records/s and CPU per record of `RedisSink`, per mode and record size.

The whole data path (bench/data_throughput.py) shares two cores between agents, plugins, the data server and
Redis, so its figures swing with the machine; this measures only the output, in-process, against a real
redis-server (its own process): batches as the data server submits them (one agent batch each: up to
10,000 records or 512 KB), `--window` submits outstanding at a time (several agent streams), for
`--duration` seconds per mode and size. CPU is this process's (user + system) per record: the output's own
cost in the data server. The list or stream key is deleted every 0.2 s beside the run so that Redis memory
stays flat.

`--client` picks what writes: `gse` (the data server's RedisSink), or for comparison the same sink on
redis.asyncio: `redis-py` (its pipeline API: one pipeline per round of queued submits, executed in order) or
`redis-py-conn` (one of its connections, commands encoded by hiredis and written in one go, the replies read
with `read_response` one by one while the next pipelines are written).

    python bench/redis_output.py --duration 5 --sizes 1024 100 --modes list pubsub stream --client gse
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import hiredis  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402

from gse.common.address import split_host_port  # noqa: E402
from gse.dataserver.outputs import OutputError, RedisSink, SinkSettings, _QueuedSink  # noqa: E402
from gse.devcluster import Cluster  # noqa: E402

BATCH_BYTES = 512 * 1024
BATCH_RECORDS = 10_000


class RedisPySink(_QueuedSink):
    """The output on redis.asyncio's pipeline API (for comparison only)."""
    kind = "redis"

    def __init__(self, *args):
        super().__init__(*args)
        a = self.doc["stream_to"]["redis"]["storage_address"][0]
        self.client = aredis.Redis(host=a["ip"], port=a["port"], socket_timeout=self.settings.redis_timeout_s)

    async def process(self, items) -> None:
        pipe = self.client.pipeline(transaction=False)
        spans, n = [], 0
        for it in items:
            key, dtype, first = it.target["channel_name"], it.target.get("data_type", "pubsub"), n
            if dtype == "list":
                for i in range(0, len(it.records), 10_000):
                    pipe.rpush(key, *it.records[i:i + 10_000])
                    n += 1
            else:
                add = (lambda r: pipe.xadd(key, {"data": r})) if dtype == "stream" else (lambda r: pipe.publish(key, r))
                for r in it.records:
                    add(r)
                n += len(it.records)
            spans.append((it, first, n))
        replies = await pipe.execute(raise_on_error=False)
        _settle(self, spans, replies)

    async def close(self) -> None:
        await super().close()
        await self.client.aclose()


class RedisPyConnSink(_QueuedSink):
    """The output on one redis.asyncio connection: hiredis-encoded commands, replies read one by one (for
    comparison only)."""
    kind = "redis"

    def __init__(self, *args):
        super().__init__(*args)
        a = self.doc["stream_to"]["redis"]["storage_address"][0]
        self.client = aredis.Redis(host=a["ip"], port=a["port"])
        self.conn = None
        self.inflight = asyncio.Semaphore(4)
        self.last: asyncio.Task | None = None

    async def process(self, items) -> None:
        if self.conn is None:
            self.conn = await self.client.connection_pool.get_connection()
        pack, commands, spans = hiredis.pack_command, [], []
        for it in items:
            key, dtype, first = it.target["channel_name"].encode(), it.target.get("data_type", "pubsub"), len(commands)
            if dtype == "list":
                commands += [pack((b"RPUSH", key, *it.records[i:i + 10_000])) for i in range(0, len(it.records), 10_000)]
            elif dtype == "stream":
                commands += [pack((b"XADD", key, b"*", b"data", r)) for r in it.records]
            else:
                commands += [pack((b"PUBLISH", key, r)) for r in it.records]
            spans.append((it, first, len(commands)))
        await self.inflight.acquire()
        await self.conn.send_packed_command(commands, check_health=False)
        self.last = asyncio.ensure_future(self._replies(len(commands), spans, self.last))
        await asyncio.sleep(0)

    async def _replies(self, n: int, spans, before) -> None:
        try:
            if before is not None:
                await asyncio.shield(before)
            replies = []
            for _ in range(n):
                try:
                    replies.append(await self.conn.read_response(timeout=math.inf))
                except redis.ResponseError as exc:
                    replies.append(exc)
        finally:
            self.inflight.release()
        _settle(self, spans, replies)

    async def close(self) -> None:
        if self.last is not None:
            await asyncio.wait([self.last], timeout=5)
        await super().close()
        await self.client.aclose()


def _settle(sink, spans, replies) -> None:
    for it, a, b in spans:
        bad = next((r for r in replies[a:b] if isinstance(r, Exception)), None)
        if bad is not None:
            it.fut.set_exception(OutputError(str(bad)))
        else:
            sink._done(it.records, it.t0)
            it.fut.set_result(None)


CLIENTS = {"gse": RedisSink, "redis-py": RedisPySink, "redis-py-conn": RedisPyConnSink}


def batches(size: int, n: int = 64) -> list[list[bytes]]:
    """`n` agent batches of `size`-byte records (made once: the run measures the output, not their making)."""
    per = max(1, min(BATCH_RECORDS, BATCH_BYTES // size))
    return [[(b"%d %d " % (b, i)).ljust(size, b"x") for i in range(per)] for b in range(n)]


async def run_one(host: str, port: int, mode: str, size: int, duration: float, window: int,
                  client: str = "gse") -> dict:
    key = f"bench:{mode}:{size}"
    doc = {"stream_to": {"report_mode": "redis", "redis": {
        "storage_address": [{"ip": host, "port": port}]}}}
    sink = CLIENTS[client](1, doc, SinkSettings())
    sink.start()
    target = {"channel_name": key, "data_type": mode}
    work = batches(size)
    stop = threading.Event()

    def janitor() -> None:              # keeps the list and the stream from growing
        r = redis.Redis(host=host, port=port)
        while not stop.wait(0.2):
            r.delete(key)
        r.delete(key)
        r.close()

    jt = threading.Thread(target=janitor, daemon=True)
    jt.start()
    # warm-up: connect, first pipelines
    await asyncio.gather(*(sink.submit(work[i], "agent", target, 1) for i in range(4)))
    records = 0
    pending: dict[asyncio.Future, int] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    end = t0 + duration
    i = 0
    while time.perf_counter() < end:
        while len(pending) < window:
            b = work[i % len(work)]
            i += 1
            pending[sink.submit(b, f"agent-{i % 8}", target, 1)] = len(b)
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            f.result()
            records += pending.pop(f)
    for f, n in pending.items():
        await f
        records += n
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await sink.close()
    stop.set()
    jt.join(5)
    return {"client": client, "mode": mode, "record_bytes": size, "records": records,
            "records_per_s": round(records / wall), "mb_per_s": round(records * size / wall / 1e6, 1), "cpu_us_per_record": round(cpu / records * 1e6, 3),
            "cpu_share": round(cpu / wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per mode and size")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 100])
    p.add_argument("--modes", nargs="+", default=["list", "pubsub", "stream"], choices=["list", "pubsub", "stream"])
    p.add_argument("--window", type=int, default=8, help="submits outstanding at once")
    p.add_argument("--client", nargs="+", default=["gse"], choices=sorted(CLIENTS))
    p.add_argument("--rounds", type=int, default=1, help="repeat every mode and size this many times")
    p.add_argument("--redis", default="", help="host:port of a running Redis (default: start one)")
    args = p.parse_args()
    cluster = None
    if args.redis:
        host, port = split_host_port(args.redis)
    else:
        cluster = Cluster(tempfile.mkdtemp(prefix="gse-bench-redis-"))
        cluster.start_redis()
        host, port = split_host_port(cluster.redis[0])
    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}, load {os.getloadavg()[0]:.2f}; "
          f"the sink in this process, redis-server in its own", flush=True)
    results = []
    try:
        for _ in range(args.rounds):
            for size in args.sizes:
                for mode in args.modes:
                    for client in args.client:
                        r = asyncio.run(run_one(host, port, mode, size, args.duration, args.window, client))
                        results.append(r)
                        print(f"{client:<13} {mode:<6} {size:>5} B: {r['records_per_s']:>8} rec/s {r['mb_per_s']:>7} MB/s  "
                              f"cpu {r['cpu_us_per_record']:.2f} us/record (share {r['cpu_share']})", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    print(json.dumps({"benchmark": "redis_output", "load_after": round(os.getloadavg()[0], 2), "results": results}))


if __name__ == "__main__":
    main()

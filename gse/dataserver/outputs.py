"""Outputs of the data server: Kafka, Redis and rotating files, one sink per stream_to definition.

`submit(records, agent_id, target)` queues a batch's records synchronously (so that batches keep their order
per output) and returns a future that resolves once the output accepted them: the broker acknowledged
(Kafka, acks=all), Redis answered every command of the pipeline, the bytes were written to the file. A sink
that just failed answers new batches with the failure at once for `retry_s` (agents send them again later)
instead of letting every batch wait for the same timeout.

Each sink groups what is queued: Kafka batches are built straight into aiokafka record batches (one per
partition per submit), Redis commands of many submits go out as one pipeline write, file records of one
submit are one write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Histogram

from gse.dbproxy.resp import ConnectionLost, RedisReplyError, RespConnection, encode

log = logging.getLogger("gse.dataserver.outputs")

OUT_RECORDS = Counter("gse_dataserver_output_records_total", "Records accepted by an output", ["output"])
OUT_BYTES = Counter("gse_dataserver_output_bytes_total", "Bytes accepted by an output", ["output"])
OUT_ERRORS = Counter("gse_dataserver_output_errors_total", "Batches an output refused or failed", ["output"])
OUT_LATENCY = Histogram("gse_dataserver_output_seconds", "From submit to the output's acknowledgement",
                        ["output"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


class OutputError(Exception):
    """An output did not take a batch; the agent sends it again."""


@dataclass(frozen=True)
class SinkSettings:
    kafka_linger_ms: int = 5
    kafka_max_batch_bytes: int = 1024 * 1024
    kafka_request_timeout_s: float = 10.0
    kafka_acks: str = "all"
    redis_timeout_s: float = 5.0
    redis_stream_maxlen: int = 0          # 0 = unbounded XADD
    file_roots: tuple[str, ...] = ("/var/log/gse/data",)
    file_rotate_bytes: int = 256 * 1024 * 1024
    file_backups: int = 5
    retry_s: float = 2.0


class Sink:
    kind = "sink"

    def __init__(self, stream_to_id: int, doc: dict, settings: SinkSettings):
        self.stream_to_id = stream_to_id
        self.doc = doc
        self.settings = settings
        self.label = f"{stream_to_id}:{self.kind}"
        self._m_records = OUT_RECORDS.labels(self.label)
        self._m_bytes = OUT_BYTES.labels(self.label)
        self._m_errors = OUT_ERRORS.labels(self.label)
        self._m_latency = OUT_LATENCY.labels(self.label)
        self.failed_until = 0.0
        self.last_error = ""
        self.stats = {"records": 0, "bytes": 0, "errors": 0}

    def submit(self, records: list[bytes], agent_id: str, target: dict, channel_id: int) -> asyncio.Future:
        raise NotImplementedError

    def _failing(self) -> asyncio.Future | None:
        if self.failed_until > time.monotonic():
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(OutputError(f"{self.label} is failing: {self.last_error}"))
            self._m_errors.inc()
            self.stats["errors"] += 1
            return fut
        return None

    def _done(self, records: list[bytes], t0: float) -> None:
        n = len(records)
        size = sum(map(len, records))
        self._m_records.inc(n)
        self._m_bytes.inc(size)
        self._m_latency.observe(time.perf_counter() - t0)
        self.stats["records"] += n
        self.stats["bytes"] += size

    def _error(self, exc: BaseException) -> None:
        self.last_error = str(exc) or type(exc).__name__
        self.failed_until = time.monotonic() + self.settings.retry_s
        self._m_errors.inc()
        self.stats["errors"] += 1

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class _Item:
    __slots__ = ("records", "agent_id", "target", "channel_id", "fut", "t0")

    def __init__(self, records, agent_id, target, channel_id, fut):
        self.records, self.agent_id, self.target, self.channel_id, self.fut = records, agent_id, target, channel_id, fut
        self.t0 = time.perf_counter()


class _QueuedSink(Sink):
    """A sink with one worker task that takes queued submits in order."""

    def __init__(self, *args):
        super().__init__(*args)
        self.queue: deque[_Item] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    def submit(self, records, agent_id, target, channel_id) -> asyncio.Future:
        failing = self._failing()
        if failing is not None:
            return failing
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Item(records, agent_id, target, channel_id, fut))
        self.wake.set()
        return fut

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                items = list(self.queue)
                self.queue.clear()
                try:
                    await self.process(items)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the batches fail; the worker goes on
                    self._error(exc)
                    log.warning("output failed", extra={"output": self.label, "error": repr(exc)})
                    for it in items:
                        if not it.fut.done():
                            it.fut.set_exception(OutputError(f"{self.label}: {exc!r}"))
                    for it in list(self.queue):
                        if not it.fut.done():
                            it.fut.set_exception(OutputError(f"{self.label}: {exc!r}"))
                    self.queue.clear()

    async def process(self, items: list[_Item]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for it in self.queue:
            if not it.fut.done():
                it.fut.set_exception(OutputError(f"{self.label} closed"))
        self.queue.clear()


# ---- Kafka ----------------------------------------------------------------------------------------------

class KafkaSink(_QueuedSink):
    kind = "kafka"

    def __init__(self, *args):
        super().__init__(*args)
        k = self.doc["stream_to"]["kafka"]
        self.bootstrap = [f"{a['ip']}:{a['port']}" for a in k["storage_address"]]
        self.producer = None
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._tp_queues: dict[tuple[str, int], deque[_Item]] = {}
        self._tp_tasks: dict[tuple[str, int], asyncio.Task] = {}

    def _make_producer(self):
        from aiokafka import AIOKafkaProducer
        k = self.doc["stream_to"]["kafka"]
        s = self.settings
        kw = {}
        if k.get("security_protocol"):
            kw["security_protocol"] = k["security_protocol"]
        if k.get("sasl_mechanisms"):
            kw.update(sasl_mechanism=k["sasl_mechanisms"], sasl_plain_username=k.get("sasl_username") or None,
                      sasl_plain_password=k.get("sasl_passwd") or None)
        return AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks=s.kafka_acks if s.kafka_acks == "all"
                                else int(s.kafka_acks), linger_ms=s.kafka_linger_ms,
                                max_batch_size=s.kafka_max_batch_bytes, max_request_size=s.kafka_max_batch_bytes * 2,
                                request_timeout_ms=int(s.kafka_request_timeout_s * 1000),
                                enable_idempotence=False, client_id=f"gse-dataserver-{self.stream_to_id}", **kw)

    async def _producer(self):
        if self.producer is None:
            producer = self._make_producer()
            try:
                await asyncio.wait_for(producer.start(), self.settings.kafka_request_timeout_s)
            except BaseException:
                try:
                    await producer.stop()
                except Exception:  # noqa: BLE001
                    pass
                raise
            self.producer = producer
            log.info("kafka producer connected", extra={"output": self.label, "bootstrap": self.bootstrap})
        return self.producer

    async def _partition_of(self, producer, topic: str, agent_id: str) -> int:
        now = time.monotonic()
        cached = self._partitions.get(topic)
        if cached is None or cached[0] < now:
            parts = await asyncio.wait_for(producer.partitions_for(topic), self.settings.kafka_request_timeout_s)
            cached = (now + 60.0, sorted(parts))
            self._partitions[topic] = cached
        parts = cached[1]
        # One agent's records of a channel stay in one partition: their order is kept.
        return parts[zlib.crc32(agent_id.encode()) % len(parts)]

    async def process(self, items: list[_Item]) -> None:
        # aiokafka queues one record batch per partition at a time, so every partition gets its own worker:
        # a busy partition never holds up the others, and each keeps its submits in order.
        producer = await self._producer()
        for it in items:
            topic = it.target["topic_name"]
            partition = it.target.get("partition")
            if partition is None:
                partition = await self._partition_of(producer, topic, it.agent_id)
            key = (topic, partition)
            self._tp_queues.setdefault(key, deque()).append(it)
            if key not in self._tp_tasks:
                self._tp_tasks[key] = asyncio.ensure_future(self._tp_worker(producer, key))

    async def _tp_worker(self, producer, key: tuple[str, int]) -> None:
        topic, partition = key
        queue = self._tp_queues[key]
        try:
            while queue:
                it = queue.popleft()
                try:
                    futs = []
                    batch = producer.create_batch()
                    for r in it.records:
                        if batch.append(key=None, value=r, timestamp=None) is None:
                            futs.append(await producer.send_batch(batch, topic, partition=partition))
                            batch = producer.create_batch()
                            if batch.append(key=None, value=r, timestamp=None) is None:
                                raise OutputError(f"a record of {len(r)} bytes exceeds the Kafka batch size")
                    futs.append(await producer.send_batch(batch, topic, partition=partition))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this submit fails; the next ones are tried
                    self._error(exc)
                    if not it.fut.done():
                        it.fut.set_exception(OutputError(f"{self.label}: {exc!r}"))
                    continue
                self._chain(it, futs)
        finally:
            self._tp_tasks.pop(key, None)

    def _chain(self, it: _Item, futs: list) -> None:
        remaining = [len(futs)]

        def one(f: asyncio.Future) -> None:
            if it.fut.done():
                return
            if f.cancelled() or f.exception() is not None:
                exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
                self._error(exc)
                it.fut.set_exception(OutputError(f"{self.label}: {exc!r}"))
                return
            remaining[0] -= 1
            if remaining[0] == 0:
                self._done(it.records, it.t0)
                it.fut.set_result(None)

        for f in futs:
            f.add_done_callback(one)

    async def close(self) -> None:
        await super().close()
        for t in list(self._tp_tasks.values()):
            t.cancel()
        for q in self._tp_queues.values():
            for it in q:
                if not it.fut.done():
                    it.fut.set_exception(OutputError(f"{self.label} closed"))
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.stop(), 10)
            except Exception:  # noqa: BLE001 - closing a producer whose broker is gone
                pass
            self.producer = None


# ---- Redis ----------------------------------------------------------------------------------------------

def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


class RedisSink(_QueuedSink):
    kind = "redis"

    def __init__(self, *args):
        super().__init__(*args)
        r = self.doc["stream_to"]["redis"]
        self.addresses = [(a["ip"], a["port"]) for a in r["storage_address"]]
        self.password = r.get("passwd", "")
        self.master_name = r.get("master_name", "")
        self.conn: RespConnection | None = None
        self._inflight = asyncio.Semaphore(4)
        self._tasks: set[asyncio.Task] = set()

    async def _connection(self) -> RespConnection:
        if self.conn is not None:
            return self.conn
        timeout = self.settings.redis_timeout_s
        if self.master_name:
            host, port = await self._sentinel_master(timeout)
        else:
            host, port = self.addresses[0]
        self.conn = RespConnection(host, port, self.password, timeout)
        return self.conn

    async def _sentinel_master(self, timeout: float) -> tuple[str, int]:
        last: Exception | None = None
        for host, port in self.addresses:
            s = RespConnection(host, port, "", timeout)
            try:
                (reply,) = await s.pipeline([encode(b"SENTINEL", b"get-master-addr-by-name", self.master_name)])
                if isinstance(reply, list) and len(reply) == 2:
                    return reply[0].decode(), int(reply[1])
                last = OutputError(f"sentinel {host}:{port} does not know master {self.master_name!r}")
            except (OSError, ConnectionLost, asyncio.TimeoutError) as exc:
                last = exc
            finally:
                await s.close()
        raise OutputError(f"no sentinel named the master {self.master_name!r}: {last!r}")

    def _commands(self, it: _Item) -> list[bytes]:
        t = it.target
        key = _bulk(t["channel_name"].encode())
        dtype = t.get("data_type", "pubsub")
        if dtype == "list":
            out = []
            recs = it.records
            for i in range(0, len(recs), 10_000):
                chunk = recs[i:i + 10_000]
                out.append(b"*%d\r\n$5\r\nRPUSH\r\n" % (len(chunk) + 2) + key + b"".join(map(_bulk, chunk)))
            return out
        if dtype == "stream":
            maxlen = self.settings.redis_stream_maxlen
            head = (b"*7\r\n$4\r\nXADD\r\n" + key + b"$6\r\nMAXLEN\r\n$1\r\n~\r\n" + _bulk(str(maxlen).encode())
                    if maxlen else b"*5\r\n$4\r\nXADD\r\n" + key) + b"$1\r\n*\r\n$4\r\ndata\r\n"
            return [head + _bulk(r) for r in it.records]
        head = b"*3\r\n$7\r\nPUBLISH\r\n" + key
        return [head + _bulk(r) for r in it.records]

    async def process(self, items: list[_Item]) -> None:
        conn = await self._connection()
        commands: list[bytes] = []
        spans = []
        for it in items:
            cmds = self._commands(it)
            spans.append((it, len(commands), len(commands) + len(cmds)))
            commands.extend(cmds)
        await self._inflight.acquire()
        # Written in order now; the replies are awaited beside the next pipelines (Redis answers in order).
        task = asyncio.ensure_future(self._pipeline(conn, commands, spans))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)

    async def _pipeline(self, conn: RespConnection, commands: list[bytes], spans) -> None:
        try:
            replies = await conn.pipeline(commands)
        except (OSError, ConnectionLost, asyncio.TimeoutError) as exc:
            self._error(exc)
            self.conn = None
            await conn.close()
            log.warning("redis output failed", extra={"output": self.label, "error": repr(exc)})
            for it, _a, _b in spans:
                if not it.fut.done():
                    it.fut.set_exception(OutputError(f"{self.label}: {exc!r}"))
            return
        finally:
            self._inflight.release()
        for it, a, b in spans:
            bad = next((r for r in replies[a:b] if isinstance(r, RedisReplyError)), None)
            if it.fut.done():
                continue
            if bad is not None:
                self._error(bad)
                it.fut.set_exception(OutputError(f"{self.label}: redis refused: {bad}"))
            else:
                self._done(it.records, it.t0)
                it.fut.set_result(None)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await super().close()
        if self.conn is not None:
            await self.conn.close()


# ---- files ----------------------------------------------------------------------------------------------

class FileSink(Sink):
    """One record a line, appended to `<data_log_path>/<file_name>`; rotated at `file_rotate_bytes`."""
    kind = "file"

    def __init__(self, *args):
        super().__init__(*args)
        self.dir = Path(self.doc["stream_to"]["data_log_path"])
        self.files: dict[str, tuple[int, int]] = {}     # name -> (fd, size)
        roots = [os.path.normpath(r) for r in self.settings.file_roots]
        d = os.path.normpath(str(self.dir))
        self.allowed = any(d == r or d.startswith(r.rstrip("/") + "/") for r in roots)

    def submit(self, records, agent_id, target, channel_id) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        try:
            if not self.allowed:
                raise OutputError(f"data_log_path {self.dir} is outside the data server's file_roots")
            name = target.get("file_name") or f"channel_{channel_id}.log"
            data = b"\n".join(records) + b"\n"
            fd, size = self._open(name)
            if size and size + len(data) > self.settings.file_rotate_bytes:
                self._rotate(name)
                fd, size = self._open(name)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            self.files[name] = (fd, size + len(data))
        except (OSError, OutputError) as exc:
            self._error(exc)
            fut.set_exception(OutputError(f"{self.label}: {exc}"))
            return fut
        self._done(records, t0)
        fut.set_result(None)
        return fut

    def _open(self, name: str) -> tuple[int, int]:
        entry = self.files.get(name)
        if entry is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            entry = (fd, os.fstat(fd).st_size)
            self.files[name] = entry
        return entry

    def _rotate(self, name: str) -> None:
        fd, _ = self.files.pop(name)
        os.close(fd)
        base = self.dir / name
        n = self.settings.file_backups
        if n <= 0:
            base.unlink(missing_ok=True)
            return
        for i in range(n - 1, 0, -1):
            src = self.dir / f"{name}.{i}"
            if src.exists():
                os.replace(src, self.dir / f"{name}.{i + 1}")
        os.replace(base, self.dir / f"{name}.1")

    async def close(self) -> None:
        for fd, _ in self.files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.files.clear()


SINKS = {"kafka": KafkaSink, "redis": RedisSink, "file": FileSink}


class Outputs:
    """The sinks, one per stream_to; rebuilt when a stream_to definition changes (the old one drains)."""

    def __init__(self, settings: SinkSettings):
        self.settings = settings
        self.sinks: dict[int, Sink] = {}

    def get(self, stream_to_id: int) -> Sink | None:
        return self.sinks.get(stream_to_id)

    def apply(self, streamtos: dict[int, dict]) -> None:
        """Make the sinks match the definitions now (routes swapped in next find their sinks ready)."""
        old = self.sinks
        new: dict[int, Sink] = {}
        retired = []
        for sid, doc in streamtos.items():
            current = old.get(sid)
            if current is not None and current.doc.get("stream_to") == doc.get("stream_to"):
                new[sid] = current
                continue
            mode = doc.get("stream_to", {}).get("report_mode")
            cls = SINKS.get(mode)
            if cls is None:
                log.error("stream_to with an unknown report_mode ignored", extra={"stream_to_id": sid, "mode": mode})
                continue
            sink = cls(sid, doc, self.settings)
            sink.start()
            new[sid] = sink
            if current is not None:
                retired.append(current)
        retired += [s for sid, s in old.items() if sid not in new]
        self.sinks = new
        for s in retired:
            asyncio.ensure_future(self._retire(s))

    async def _retire(self, sink: Sink) -> None:
        await asyncio.sleep(self.settings.kafka_request_timeout_s + 1)   # let submits in progress finish
        await sink.close()

    async def close(self) -> None:
        for s in self.sinks.values():
            await s.close()
        self.sinks.clear()

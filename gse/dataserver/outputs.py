"""Outputs of the data server: Kafka, Redis and rotating files, one sink per stream_to definition.

`submit(records, agent_id, target)` queues a batch's records synchronously (so that batches keep their order
per output) and returns a future that resolves once the output accepted them: the broker acknowledged
(Kafka, acks=all), Redis answered every command of the pipeline, the bytes were written to the file. A sink
that just failed answers new batches with the failure at once for `retry_s` (agents send them again later)
instead of letting every batch wait for the same timeout.

Each sink groups what is queued: Kafka batches are built straight into aiokafka record batches (one per
partition per submit), Redis commands of many submits go out as one pipeline write (gse.common.resp), file
records of one submit are one write.
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

from gse.common.address import join_host_port
from gse.common.aio import spawn
from gse.common.resp import ConnectionLost, RedisReplyError, RespConnection, encode_each, encode_many

log = logging.getLogger("gse.dataserver.outputs")

LIST_CHUNK = 10_000         # records per RPUSH

OUT_RECORDS = Counter("gse_dataserver_output_records_total", "Records accepted by an output", ["output"])
OUT_BYTES = Counter("gse_dataserver_output_bytes_total", "Bytes accepted by an output", ["output"])
OUT_ERRORS = Counter("gse_dataserver_output_errors_total", "Batches an output refused or failed", ["output"])
OUT_LATENCY = Histogram("gse_dataserver_output_seconds", "From submit to the output's acknowledgement",
                        ["output"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


class OutputError(Exception):
    """An output did not take a batch; the agent sends it again."""


@dataclass(frozen=True)
class SinkSettings:
    """What every sink of one data server shares, from the data server's config (deploy/dataserver.yaml): Kafka
    producer linger (ms), batch size (bytes), request timeout (s) and acks ("all", "1", "0"); the Redis pipeline
    timeout (s) and XADD cap (0 = none); the directories file outputs may write under, the rotation size (bytes) and
    backups kept; and `retry_s`, how long a failed sink refuses new batches at once."""
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
    """One output (stream_to) of the data server. `submit` queues one batch's selected records for one route target
    and returns a future that resolves once the output took them, or fails with OutputError; `start` and `close`
    bracket its life. Figures are exported per `<stream_to_id>:<kind>` label."""
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
        """Queue `records` (bytes each) of channel `channel_id` from `agent_id` for `target` (the route's
        kafka/redis/file part); the future resolves when the output took them."""
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
        """Start the sink's background work (none here)."""
        pass

    async def close(self) -> None:
        """Release what the sink holds; batches not yet taken fail with OutputError."""
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
        """Queue the batch for the worker, or fail it at once while the sink is within `retry_s` of a failure."""
        failing = self._failing()
        if failing is not None:
            return failing
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Item(records, agent_id, target, channel_id, fut))
        self.wake.set()
        return fut

    def start(self) -> None:
        """Start the worker that takes queued submits in order."""
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
        """Hand `items` (the submits queued since the last call, in order) to the output; raising fails them all and
        every submit still queued."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop the worker; submits still queued fail with OutputError("closed")."""
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
    """A kafka stream_to (spec §3, data routes: `{storage_address: [{ip, port}], sasl_*, security_protocol}`): an
    aiokafka producer per sink. A route's records go to its `topic_name`, to `partition` when the route names one,
    else to a partition chosen by the agent id (one agent's records of a channel stay in order in one partition); a
    batch is accepted once the broker acknowledged every record batch it became (acks from the settings, "all" by
    default)."""
    kind = "kafka"

    def __init__(self, *args):
        super().__init__(*args)
        k = self.doc["stream_to"]["kafka"]
        self.bootstrap = [join_host_port(a["ip"], a["port"]) for a in k["storage_address"]]
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
        """Put each submit on its (topic, partition) queue, each queue with its own worker: a busy partition never
        holds up another, and each keeps its submits in order."""
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
            """One record batch of the submit settled: the first failure fails the submit; the last success accepts
            it."""
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
        """Stop the workers, fail what they still held, and stop the producer (at most 10 s)."""
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

class RedisSink(_QueuedSink):
    """A redis stream_to (spec §3, data routes: `{storage_address: [{ip, port}], passwd, master_name}`): each
    route's records go to its `channel_name` as PUBLISH (data_type `pubsub`, the default), RPUSH (`list`, up to
    10,000 records a command) or XADD `* data <record>` (`stream`, capped by `redis_stream_maxlen`). With
    `master_name`, the storage addresses are Sentinels and the master they name is written (looked up again
    after the connection failed or the master turned read-only); else the first address is the Redis.

    What is queued while a pipeline is out goes as the next pipeline on the same connection, written at once
    (up to four in flight: Redis answers in order, so batches keep their order); a batch is accepted when
    every one of its commands was answered without an error. The client is gse.common.resp (why not
    redis.asyncio: the measurement in that module)."""
    kind = "redis"

    def __init__(self, *args):
        super().__init__(*args)
        r = self.doc["stream_to"]["redis"]
        self.addresses = [(a["ip"], int(a["port"])) for a in r["storage_address"]]
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
            log.info("redis master found by sentinel", extra={"output": self.label, "master_name": self.master_name,
                                                              "master": join_host_port(host, port)})
        else:
            host, port = self.addresses[0]
        self.conn = RespConnection(host, port, self.password, timeout)
        return self.conn

    async def _sentinel_master(self, timeout: float) -> tuple[str, int]:
        """The address of the master `master_name` as the Sentinels see it (redis.asyncio's Sentinel: it asks
        each in turn and takes only a master that is up)."""
        from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
        sentinel = Sentinel(self.addresses, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            host, port = await sentinel.discover_master(self.master_name)
            return host, int(port)
        except MasterNotFoundError as exc:
            raise OutputError(f"no sentinel named a master {self.master_name!r}: {exc}") from None
        finally:
            for s in sentinel.sentinels:
                await s.aclose()

    def _commands(self, it: _Item) -> list[bytes]:
        t = it.target
        key = t["channel_name"].encode()
        dtype = t.get("data_type", "pubsub")
        recs = it.records
        if dtype == "list":
            return [encode_many((b"RPUSH", key), recs[i:i + LIST_CHUNK]) for i in range(0, len(recs), LIST_CHUNK)]
        if dtype == "stream":
            maxlen = self.settings.redis_stream_maxlen
            cap = (b"MAXLEN", b"~", maxlen) if maxlen else ()
            return encode_each((b"XADD", key, *cap, b"*", b"data"), recs)
        return encode_each((b"PUBLISH", key), recs)

    async def process(self, items: list[_Item]) -> None:
        """Encode the submits' commands into one pipeline and start it on the connection (at most four pipelines in
        flight); each submit is settled by its own replies in `_pipeline`."""
        conn = await self._connection()
        commands: list[bytes] = []
        spans = []
        for it in items:
            cmds = self._commands(it)
            spans.append((it, len(commands), len(commands) + len(cmds)))
            commands.extend(cmds)
        await self._inflight.acquire()
        # The task writes this pipeline at the sleep(0) below (once connected), before the next one is built;
        # its replies are awaited beside the next pipelines (Redis answers in order).
        task = asyncio.ensure_future(self._pipeline(conn, commands, spans))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)

    async def _pipeline(self, conn: RespConnection, commands: list[bytes], spans) -> None:
        try:
            replies = await conn.pipeline(commands)
        except (OSError, ConnectionLost, asyncio.TimeoutError) as exc:
            self._error(exc)
            self._drop(conn)
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
                if str(bad).startswith("READONLY"):     # the master became a replica: find the new one
                    self._drop(conn)
                it.fut.set_exception(OutputError(f"{self.label}: redis refused: {bad}"))
            else:
                self._done(it.records, it.t0)
                it.fut.set_result(None)

    def _drop(self, conn: RespConnection) -> None:
        if self.conn is conn:
            self.conn = None
        spawn(conn.close(), "closing a redis connection")

    async def close(self) -> None:
        """Wait (at most 5 s) for the pipelines in flight, then stop the worker and close the connection."""
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
        """Append the records, one a line, to the route's file (`file_name`, default `channel_<channel_id>.log`) under
        `data_log_path`, rotating first when the file would pass `file_rotate_bytes`; the future is already settled. A
        `data_log_path` outside `file_roots`, or a write that fails, fails the batch with OutputError."""
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
        """Close every open file."""
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
        """The sink of `stream_to_id`, None when there is none."""
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
            spawn(self._retire(s), "retiring an output")

    async def _retire(self, sink: Sink) -> None:
        await asyncio.sleep(self.settings.kafka_request_timeout_s + 1)   # let submits in progress finish
        await sink.close()

    async def close(self) -> None:
        """Close every sink now (at stop)."""
        for s in self.sinks.values():
            await s.close()
        self.sinks.clear()

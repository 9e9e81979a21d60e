"""A server daemon's own records on the data path: batches to a data server, acknowledged once routed.

Agents reach the data servers through their spooling pipeline (gse/agent/data.py); a daemon that emits
records (the alarm leader's agent-lost events on DataID 1000, spec section 10) does not keep a spool: it
decides what to send again itself (what it reported is kept through dbproxy). `DataSender.send` writes one
batch and returns once a data server acknowledged it, which a data server does only after every output of
the channel's route took it (or the channel has no route: then the records are counted and dropped there).

One stream at a time to one data server of the area, chosen by load among those registered in ZooKeeper
(`on_view`, the `dataserver` service); a stream that fails fails the batches in flight (`Unavailable`)
and the next send opens one to another server. The daemon names itself in the stream's metadata as agents
do (`x-gse-agent-id` = its own name), with its server certificate (role server may stream data).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

import grpc

from gse.pb import data_pb2 as pb

from . import rpc
from .datastate import MD_AGENT_ID, MD_CLOUD_ID, MD_IP, STREAM_METHOD
from .errors import Unavailable
from .tls import TLSMaterial

log = logging.getLogger("gse.datasend")


class DataSender:
    """Records of one daemon (`name`, shown to the data server as the stream's agent id; `ip` as its IP)."""

    def __init__(self, tls: TLSMaterial, name: str, ip: str = "", area: int = 0, timeout_s: float = 10.0):
        self.tls = tls
        self.name = name
        self.ip = ip
        self.area = area
        self.timeout_s = timeout_s
        self.servers: dict[str, float] = {}          # address -> load
        self._avoid: dict[str, float] = {}           # address -> monotonic time until which it is not picked
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._stream: _Stream | None = None

    def on_view(self, view: dict[str, dict]) -> None:
        """Discovery callback for the `dataserver` service: the servers of this area with their load."""
        self.servers = {i["address"]: float(i.get("load", 0)) for i in view.values()
                        if i.get("address") and int(i.get("area", 0)) == self.area}

    def _pick(self) -> str | None:
        now = time.monotonic()
        usable = [a for a in self.servers if self._avoid.get(a, 0) <= now] or list(self.servers)
        if not usable:
            return None
        least = min(self.servers[a] for a in usable)
        return random.choice([a for a in usable if self.servers[a] <= least + 1])

    async def send(self, data_id: int, records: list[bytes]) -> None:
        """Send one batch of `records` on channel `data_id`; returns once a data server acknowledged it.
        Raises `Unavailable` when no data server is known, or the batch was refused or not acknowledged
        within `timeout_s` (the caller decides whether to send it again)."""
        if not records:
            return
        async with self._lock:
            stream = self._stream
            if stream is None or stream.broken:
                if stream is not None:
                    await stream.close()
                address = self._pick()
                if address is None:
                    raise Unavailable("no data server is registered")
                stream = self._stream = _Stream(self, address)
                try:
                    await asyncio.wait_for(stream.open(), self.timeout_s)
                except (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError) as exc:
                    self._avoid[address] = time.monotonic() + 5.0
                    await stream.close()
                    self._stream = None
                    raise Unavailable(f"data server {address}: {_describe(exc)}") from None
            batch_id = next(self._ids)
            fut = stream.write(pb.DataBatch(batch_id=batch_id, data_id=data_id, records=records,
                                            arrival_ms=int(time.time() * 1000)))
        try:
            await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            stream.fail(f"no acknowledgement within {self.timeout_s}s")
            raise Unavailable(f"data server {stream.address} did not acknowledge in time") from None
        except Unavailable:
            self._avoid[stream.address] = time.monotonic() + 5.0
            raise

    async def close(self) -> None:
        """Close the open stream, if any; batches waiting on it fail with Unavailable."""
        if self._stream is not None:
            await self._stream.close()
            self._stream = None


class _Stream:
    """One open stream: batches written in order, futures settled by the acknowledgements."""

    def __init__(self, sender: DataSender, address: str):
        self.sender = sender
        self.address = address
        self.channel = rpc.make_channel(sender.tls, address)
        self.call = None
        self.pending: dict[int, asyncio.Future] = {}
        self.broken = False
        self.reader: asyncio.Task | None = None
        self.writes: asyncio.Queue = asyncio.Queue()
        self.writer: asyncio.Task | None = None

    async def open(self) -> None:
        """Open the DataIngest stream with the daemon's metadata and wait for the server's first (empty) ack; OSError
        when the server closes it instead, gRPC errors as they come. Starts the reader and the writer."""
        s = self.sender
        md = ((MD_AGENT_ID, s.name), (MD_CLOUD_ID, str(s.area)), (MD_IP, s.ip))
        self.call = self.channel.stream_stream(STREAM_METHOD, request_serializer=pb.DataBatch.SerializeToString,
                                               response_deserializer=pb.DataAck.FromString)(metadata=md)
        first = await self.call.read()          # the server's empty ack: the stream is open
        if first is grpc.aio.EOF:
            raise OSError("the data server closed the stream")
        self.reader = asyncio.ensure_future(self._read())
        self.writer = asyncio.ensure_future(self._write())
        log.info("data stream open", extra={"server": self.address})

    def write(self, batch: pb.DataBatch) -> asyncio.Future:
        """Queue `batch` on the stream; the future resolves on its ok ack and fails with Unavailable on a failed ack
        or a broken stream."""
        fut = asyncio.get_running_loop().create_future()
        self.pending[batch.batch_id] = fut
        self.writes.put_nowait(batch)
        return fut

    async def _write(self) -> None:
        try:
            while True:
                await self.call.write(await self.writes.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self.fail(_describe(exc))

    async def _read(self) -> None:
        try:
            while True:
                ack = await self.call.read()
                if ack is grpc.aio.EOF:
                    break
                for bid in ack.ok:
                    fut = self.pending.pop(bid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                for bid in ack.failed:
                    fut = self.pending.pop(bid, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(Unavailable(f"data server {self.address} refused the batch: {ack.reason}"))
            self.fail("the data server closed the stream")
        except grpc.aio.AioRpcError as exc:
            self.fail(_describe(exc))

    def fail(self, why: str) -> None:
        """Mark the stream broken (once logged) and fail every batch waiting for its ack with Unavailable naming
        `why`."""
        if not self.broken:
            log.warning("data stream ended", extra={"server": self.address, "reason": why})
        self.broken = True
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"data server {self.address}: {why}"))
        for t in (self.reader, self.writer):
            if t is not None and t is not asyncio.current_task():
                t.cancel()

    async def close(self) -> None:
        """Fail what is pending, cancel the call and close the channel."""
        self.fail("closed")
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__

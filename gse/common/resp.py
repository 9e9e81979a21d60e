"""The one Redis client of the daemons that write Redis in bulk (dbproxy's store, the data server's Redis output):
a lean pipelined connection, commands encoded to RESP by hiredis, replies parsed by hiredis.

One batch is one write of pre-encoded bytes, and replies are matched to batches in order (Redis answers in
order on a connection), so several batches can be in flight on one connection; all the replies that arrive
in one read are parsed in one pass.

Why our own and not redis.asyncio (which the API server and the tests use): both daemons send one command
per record or per key, thousands per batch, and redis.asyncio spends its per-command bookkeeping and one
coroutine per reply on each. Measured with bench/redis_output.py (docs/benchmarks.md, "Redis output"):
PUBLISH of 100-byte records costs 0.6 us per record here, 1.6 us through a redis.asyncio connection with
pre-encoded commands, 12 us through its pipeline API.
"""

from __future__ import annotations

import asyncio
from collections import deque

import hiredis


class RedisReplyError(Exception):
    """An error reply from Redis for one command (the rest of the batch is unaffected)."""


class ConnectionLost(ConnectionError):
    """The connection to Redis broke, or a reply did not come in time: the batch in flight may or may not have been
    applied."""
    pass


_EMPTY_BULK = b"$0\r\n\r\n"


def encode(*args) -> bytes:
    """One command as RESP: `encode(b"HSET", key, f1, v1)` (bytes, str or int arguments); hiredis's C
    encoder, ~3x faster than building the bytes in Python (a batch of 10,000 results is ~60,000 commands)."""
    return hiredis.pack_command(args)


def encode_many(head: tuple, values: list[bytes]) -> bytes:
    """One command of `head` followed by every one of `values` (bytes): `encode_many((b"RPUSH", key), records)`.
    For many large values, joining their bulk strings in Python costs ~20% less than hiredis's encoder."""
    rest = encode(*head).partition(b"\r\n")[2]
    return b"*%d\r\n%s%s" % (len(head) + len(values), rest, b"".join(map(_bulk, values)))


def _bulk(v: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(v), v)


def encode_each(head: tuple, values: list[bytes]) -> list[bytes]:
    """The command `head + (value,)` for each of `values` (bytes): `encode_each((b"PUBLISH", channel), records)`.
    The head is encoded once (by `encode`) and only each value's bulk string per command: half the cost of
    `encode` per record when every record is a command of its own (PUBLISH, XADD)."""
    prefix = encode(*head, b"")[:-len(_EMPTY_BULK)]
    return [b"%s$%d\r\n%s\r\n" % (prefix, len(v), v) for v in values]


class _Protocol(asyncio.Protocol):
    def __init__(self):
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[tuple[int, list, asyncio.Future]] = deque()
        self.lost: Exception | None = None

    def connection_made(self, transport):
        """asyncio callback: keep the transport for writes."""
        self.transport = transport

    def data_received(self, data):
        """asyncio callback: feed the bytes to the hiredis reader and hand each batch its replies once all of them are
        in. A protocol error fails every waiting batch and closes the connection."""
        self.reader.feed(data)
        waiters = self.waiters
        while waiters:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionLost(f"redis protocol error: {exc}"))
                self.transport.close()
                return
            if reply is False:
                return
            count, replies, fut = waiters[0]
            replies.append(reply)
            if len(replies) == count:
                waiters.popleft()
                if not fut.done():
                    fut.set_result(replies)

    def connection_lost(self, exc):
        """asyncio callback: every batch still waiting fails with ConnectionLost."""
        self._fail(ConnectionLost(f"redis connection lost: {exc!r}"))

    def _fail(self, exc: Exception):
        self.lost = exc
        while self.waiters:
            _n, _r, fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


class RespConnection:
    """One connection to one Redis (`host`, `port`), made on first use and again after it was lost; AUTH with
    `password` when given. `pipeline` raises ConnectionLost (or OSError / asyncio.TimeoutError while
    connecting) when the batch's fate is unknown; error replies come back in place as RedisReplyError."""

    def __init__(self, host: str, port: int, password: str = "", timeout_s: float = 2.0):
        self.host, self.port, self.password, self.timeout_s = host, port, password, timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None and not proto.transport.is_closing():
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and proto.lost is None and not proto.transport.is_closing():
                return proto
            loop = asyncio.get_running_loop()
            _t, proto = await asyncio.wait_for(loop.create_connection(_Protocol, self.host, self.port),
                                               self.timeout_s)
            self._proto = proto
            if self.password:
                (reply,) = await self._send(proto, [encode(b"AUTH", self.password)])
                if isinstance(reply, RedisReplyError):
                    proto.transport.close()
                    raise ConnectionLost(f"redis AUTH refused: {reply}")
            return proto

    async def _send(self, proto: _Protocol, commands: list[bytes]) -> list:
        fut = asyncio.get_running_loop().create_future()
        proto.waiters.append((len(commands), [], fut))
        proto.transport.write(b"".join(commands))
        return await asyncio.wait_for(fut, self.timeout_s)

    async def pipeline(self, commands: list[bytes]) -> list:
        """Send encoded commands in one write; their replies in order (error replies as RedisReplyError)."""
        if not commands:
            return []
        proto = await self._connection()
        try:
            return await self._send(proto, commands)
        except asyncio.TimeoutError:
            proto.transport.close()       # replies would no longer line up with their batches
            raise ConnectionLost("redis did not answer in time") from None

    async def close(self) -> None:
        """Close the connection (the next `pipeline` dials again); batches in flight fail with ConnectionLost."""
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
            self._proto = None

"""A collector plugin's side of the agent's IPC sockets (spec section 5), for tests, benchmarks and plugin authors.

`ReportClient` pushes data records and keepalives to `ipc.state.report`; `MessageClient` announces a plugin on
`ipc.state.message`, receives dispatched messages and responds. Both speak the same bytes as bk-gse-sdk.

    client = await ReportClient().connect("/var/run/gse/ipc.state.report")
    await client.send(1001, b'{"metric": 1}')
    identity = await client.keepalive()      # {"cloud_id": 0, "bk_agent_id": "..."}
    await client.close()
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Iterable

from gse.agent.ipc import (MESSAGE_HEADER, MESSAGE_MAGIC, MESSAGE_VERSION, PROTO_DATA_REPORT, PROTO_DISPATCH,
                           PROTO_KEEPALIVE_REQ, PROTO_KEEPALIVE_RESP, PROTO_RESPOND, PROTO_SYNC_CONFIG,
                           REPORT_DOWN_HEADER, REPORT_UP_HEADER)

DEFAULT_TIMEOUT_S = 5.0


def _dump_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _Connection:
    """What both clients share: the stream pair, `async with`, closing, and the writer while connected."""

    what = "connection"

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    @property
    def _w(self) -> asyncio.StreamWriter:
        if self._writer is None:
            raise ConnectionError(f"{self.what} is not connected")
        return self._writer


class ReportClient(_Connection):
    """A data-report connection: `send` records for a data id, `keepalive` to learn the agent's identity."""

    what = "report client"

    async def connect(self, path: str) -> ReportClient:
        """Connect to the agent's report socket at `path` (spec section 5); returns self. OSError (FileNotFoundError,
        PermissionError) when the socket is not there or not ours to use."""
        self._reader, self._writer = await asyncio.open_unix_connection(path)
        return self

    @staticmethod
    def frame(data_id: int, body: bytes, proto_type: int = PROTO_DATA_REPORT) -> bytes:
        """One plugin -> agent frame; utc_time is milliseconds truncated to 32 bits, as the SDK sends it."""
        utc = time.time_ns() // 1_000_000 & 0xFFFFFFFF
        return REPORT_UP_HEADER.pack(proto_type, data_id, utc, len(body), 0, 0) + body

    async def send(self, data_id: int, body: bytes) -> None:
        """Send one record `body` on DataID `data_id` (a 0x0C01 frame) and wait until it is written; the agent closes
        the connection on a body over its max message (10 MiB)."""
        self._w.write(self.frame(data_id, body))
        await self._w.drain()

    async def send_many(self, records: Iterable[tuple[int, bytes]]) -> None:
        """Send `(data_id, body)` records in one write."""
        self._w.write(b"".join(self.frame(data_id, body) for data_id, body in records))
        await self._w.drain()

    async def keepalive(self, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
        """Send a keepalive (sync-config) and return the agent's JSON reply `{cloud_id, bk_agent_id}`."""
        self._w.write(self.frame(0, b"", PROTO_SYNC_CONFIG))
        await self._w.drain()
        return await asyncio.wait_for(self._read_reply(), timeout)

    async def _read_reply(self) -> dict:
        assert self._reader is not None, "not connected"
        while True:
            header = await self._reader.readexactly(REPORT_DOWN_HEADER.size)
            proto_type, length = REPORT_DOWN_HEADER.unpack(header)
            body = await self._reader.readexactly(length)
            if proto_type == PROTO_SYNC_CONFIG:
                return json.loads(body)


class MessageClient(_Connection):
    """A message-socket connection: keepalive as a named plugin, `receive` dispatches, `respond` upward.

    A background reader demultiplexes the agent's frames: keepalive responses complete `keepalive()`, dispatches
    queue for `receive()`. When the agent drops the connection, `receive()` raises ConnectionError.
    """

    what = "message client"

    def __init__(self, max_message: int = 10 * 1024 * 1024) -> None:
        super().__init__()
        self.max_message = max_message
        self._task: asyncio.Task | None = None
        self._seq = itertools.count(1)
        self._keepalives: dict[int, asyncio.Future] = {}
        self._dispatches: asyncio.Queue = asyncio.Queue()
        self._closed_exc: BaseException | None = None

    async def connect(self, path: str) -> MessageClient:
        """Connect to the agent's message socket at `path` (spec section 5) and start reading its frames; returns
        self. OSError when the socket is not there or not ours to use."""
        self._reader, self._writer = await asyncio.open_unix_connection(path, limit=self.max_message)
        self._task = asyncio.create_task(self._read_loop())
        return self

    def _header(self, proto_type: int, body_len: int, reserved0: int = 0, reserved1: int = 0) -> tuple[int, bytes]:
        seq = next(self._seq)
        return seq, MESSAGE_HEADER.pack(MESSAGE_MAGIC, proto_type, MESSAGE_VERSION, seq,
                                        MESSAGE_HEADER.size + body_len, reserved0, reserved1)

    async def keepalive(self, plugin_name: str, version: str = "", pid: int | None = None, status_code: int = 0,
                        status: str = "ok", remark: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> dict:
        """Announce this plugin and return the agent's keepalive response JSON."""
        body = _dump_json({"plugin_name": plugin_name, "version": version,
                           "pid": os.getpid() if pid is None else pid,
                           "status_code": status_code, "status": status, "remark": remark})
        seq, header = self._header(PROTO_KEEPALIVE_REQ, len(body))
        fut = asyncio.get_running_loop().create_future()
        self._keepalives[seq] = fut
        try:
            self._w.write(header + body)
            await self._w.drain()
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._keepalives.pop(seq, None)

    async def respond(self, meta: dict, payload: bytes) -> None:
        """Send a respond (0x900a): meta `{name, transmit_type, topic, message_id, session_id}` and a payload."""
        raw_meta = _dump_json(meta)
        _, header = self._header(PROTO_RESPOND, len(raw_meta) + len(payload), len(raw_meta), len(payload))
        self._w.write(header + raw_meta + payload)
        await self._w.drain()

    async def receive(self, timeout: float | None = None) -> tuple[dict, bytes]:
        """The next dispatched message as `(meta, payload)`; meta is `{message_id, session_id}`."""
        if self._dispatches.empty() and self._closed_exc is not None:
            raise ConnectionError("message connection closed") from self._closed_exc
        item = await asyncio.wait_for(self._dispatches.get(), timeout)
        if item is None:
            self._dispatches.put_nowait(None)  # keep waking later receivers
            raise ConnectionError("message connection closed") from self._closed_exc
        return item

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                header = await reader.readexactly(MESSAGE_HEADER.size)
                magic, proto_type, _version, seq, length, meta_len, payload_len = MESSAGE_HEADER.unpack(header)
                if magic != MESSAGE_MAGIC or length < MESSAGE_HEADER.size or length > self.max_message:
                    raise ConnectionError(f"bad frame from agent: magic 0x{magic:x}, length {length}")
                body = await reader.readexactly(length - MESSAGE_HEADER.size)
                if proto_type == PROTO_KEEPALIVE_RESP:
                    fut = self._keepalives.get(seq) or next(iter(self._keepalives.values()), None)
                    if fut is not None and not fut.done():
                        fut.set_result(json.loads(body))
                elif proto_type == PROTO_DISPATCH:
                    if meta_len == 0 or meta_len + payload_len != len(body):
                        raise ConnectionError(f"bad dispatch lengths: meta {meta_len}, payload {payload_len}")
                    self._dispatches.put_nowait((json.loads(body[:meta_len]), body[meta_len:]))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
            self._closed_exc = exc
        except asyncio.CancelledError:
            self._closed_exc = ConnectionError("closed")
            raise
        finally:
            for fut in self._keepalives.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("message connection closed"))
            self._dispatches.put_nowait(None)

    async def close(self) -> None:
        """Stop reading and close the connection (idempotent); a waiting keepalive() or receive() then raises
        ConnectionError."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await super().close()

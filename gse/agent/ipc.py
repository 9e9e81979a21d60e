"""The agent's two local IPC sockets that collector plugins speak (spec section 5).

`ReportSocketServer` serves `<run_dir>/ipc.state.report`: plugins push data records for a data id and send a
keepalive (sync-config) every 3 s, answered with the agent's identity. `MessageSocketServer` serves
`<run_dir>/ipc.state.message`: plugins announce themselves with keepalives, the agent dispatches messages to
them and they respond. Both are byte-compatible with TencentBlueKing/bk-gse-sdk; all integers are big-endian.

Frames are parsed incrementally from one bytearray per connection inside an asyncio Protocol, so thousands of
small frames per second cost one `struct.unpack_from` each. A malformed, oversized or truncated frame closes only
that connection and bumps `stats["errors"][reason]`; a plugin that stops reading is dropped once its pending
output exceeds `max_write_buffer`, so it can never stall the agent or the other plugins.

Reasons counted in `stats["errors"]`: `unknown_type`, `oversize`, `bad_magic`, `bad_version`, `bad_length`,
`bad_json`, `truncated` (connection ended mid-frame), `slow_reader` (write buffer bound exceeded), `callback`
(on_records/on_respond/identity raised; the connection stays open), `internal` (a bug here; connection closed).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import socket
import stat
import struct
import time
from typing import Any, Callable, NamedTuple

import gse

log = logging.getLogger("gse.agent.ipc")

DEFAULT_REPORT_SOCKET = "ipc.state.report"
DEFAULT_MESSAGE_SOCKET = "ipc.state.message"
DEFAULT_MAX_MESSAGE = 10 * 1024 * 1024

# Report socket. Plugin -> agent: proto_type, data_id, utc_time, body_length, reserved0, reserved1.
REPORT_UP_HEADER = struct.Struct(">IIIIII")
# Agent -> plugin: proto_type, body_length.
REPORT_DOWN_HEADER = struct.Struct(">II")
PROTO_DATA_REPORT = 0x0C01
# The SDK names the reply ProtoTypeDataPluginSyncConfigResp and defines it equal to the request's 0x0A.
PROTO_SYNC_CONFIG = 0x0A

# Message socket: magic, proto_type, proto_version, sequence, length (header + body), reserved0, reserved1.
MESSAGE_HEADER = struct.Struct(">IHHQIII")
MESSAGE_MAGIC = 0xDEADBEEF
MESSAGE_VERSION = 6
PROTO_KEEPALIVE_REQ = 0x9006
PROTO_KEEPALIVE_RESP = 0x9007
PROTO_DISPATCH = 0x9008
PROTO_RESPOND = 0x900A

# What the SDK understands in a keepalive response: run_mode 0 is a proxy, 1 an agent; status_code 2 is running.
RUN_MODE_AGENT = 1
AGENT_STATUS_RUNNING = 2

_U64_MAX = 0xFFFFFFFFFFFFFFFF


class Record(NamedTuple):
    """One data report from a plugin: its data id, the raw body and the agent's arrival time in ms."""
    data_id: int
    body: bytes
    arrival_ms: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dump_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _load_json_object(raw: bytes | bytearray | memoryview) -> dict | None:
    """The JSON object in `raw`, or None when it is not valid UTF-8 JSON or not an object."""
    try:
        obj = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


class _FrameError(Exception):
    """A frame that breaks the protocol; the connection is closed and `reason` counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Connection(asyncio.Protocol):
    """One plugin connection: buffers input, hands it to `_parse`, bounds pending output."""

    def __init__(self, server: _UnixSocketServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.peer_pid = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A plugin connected: note its pid (SO_PEERCRED, for logs) and join the server's connections."""
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "SO_PEERCRED"):
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                self.peer_pid = struct.unpack("3i", creds)[0]
            except OSError:
                pass
        self.server._attach(self)

    def data_received(self, data: bytes) -> None:
        """Append to the connection's buffer and handle every whole frame in it; a protocol error drops the connection
        (counted by reason), a partial frame waits for the rest."""
        if self.closed:
            return
        self.server.stats["bytes"] += len(data)
        self.buf += data
        buf = self.buf
        view = memoryview(buf)  # bodies are copied once, straight out of the view
        try:
            consumed = self._parse(buf, view)
        except _FrameError as exc:
            self.fail(exc.reason, str(exc))
            return
        except Exception:
            log.exception("ipc frame handling failed", extra={"socket": self.server.path})
            self.fail("internal")
            return
        finally:
            view.release()
        if consumed and not self.closed:
            try:
                del buf[:consumed]
            except BufferError:  # a slice of the view outlived the parse (kept by a traceback): copy instead
                self.buf = buf[consumed:]

    def eof_received(self) -> bool:
        """The plugin half-closed: returning False closes our side too."""
        return False  # close our side too; connection_lost does the accounting

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: count a frame left half-received as `truncated` and leave the server's connections.
        """
        if not self.closed and self.buf:
            self.server._count_error("truncated")
            log.warning("ipc connection ended mid-frame",
                        extra={"socket": self.server.path, "pending": len(self.buf), "peer_pid": self.peer_pid})
        self.closed = True
        self.buf = bytearray()
        self.server._detach(self)

    # helpers

    def _parse(self, buf: bytearray, view: memoryview) -> int:
        """Handle every complete frame at the start of `buf` (`view` is over it); return the bytes consumed.

        Stops early once the connection is closed by a write that found the plugin not reading.
        """
        raise NotImplementedError

    def fail(self, reason: str, detail: str = "") -> None:
        """Count `reason` and drop this connection at once (pending output is discarded)."""
        if self.closed:
            return
        self.closed = True
        self.server._count_error(reason)
        log.warning("ipc connection dropped",
                    extra={"socket": self.server.path, "reason": reason, "detail": detail, "peer_pid": self.peer_pid})
        self.buf = bytearray()
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> bool:
        """Queue `data`; drop the connection when the peer is not reading. True when it was queued."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > self.server.max_write_buffer:
            self.fail("slow_reader", f"more than {self.server.max_write_buffer} bytes unread")
            return False
        return True


class _UnixSocketServer:
    """Binds a Unix stream socket with a safe mode and tracks its connections and counters."""

    _protocol: type[_Connection] = _Connection

    def __init__(self, path: str, *, max_message: int, mode: int, max_write_buffer: int):
        if max_message < 64:
            raise ValueError(f"max_message must be at least 64 bytes, got {max_message}")
        if mode & ~0o777:
            raise ValueError(f"mode must be permission bits only, got {oct(mode)}")
        self.path = os.path.abspath(path)
        self.max_message = max_message
        self.mode = mode
        self.max_write_buffer = max_write_buffer
        self.stats: dict[str, Any] = {"connections": 0, "active": 0, "frames": 0, "bytes": 0, "errors": {}}
        self._conns: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._paused = False

    async def start(self) -> None:
        """Bind and listen at `path`, replacing a stale socket file; the file has `mode` before anyone can connect."""
        if self._server is not None:
            return
        sock = self._bind()
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: self._protocol(self), sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        log.info("ipc socket listening", extra={"socket": self.path, "mode": oct(self.mode)})

    async def stop(self) -> None:
        """Stop accepting, drop every connection and remove the socket file. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
        self._unlink_own()
        try:
            await asyncio.wait_for(server.wait_closed(), 2.0)
        except asyncio.TimeoutError:
            pass
        self._conns.clear()
        self.stats["active"] = 0

    @property
    def serving(self) -> bool:
        """The socket is bound and accepting."""
        return self._server is not None

    def _bind(self) -> socket.socket:
        """Bind under a temporary name, chmod, then rename over `path`.

        A socket file's mode only matters at connect time, so it is set before the file appears at `path`; rename
        replaces a stale socket atomically. Listening starts after the rename, so no one connects in between.
        """
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._check_existing()
        tmp = os.path.join(directory, f".ipc-{secrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            try:
                os.chmod(tmp, self.mode)
                os.rename(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _check_existing(self) -> None:
        """Allow replacing a stale socket; refuse a live one or anything that is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace it", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(self.path)
        except (BlockingIOError, TimeoutError):
            pass  # a full backlog: someone is listening
        except OSError as exc:
            log.info("replacing stale ipc socket", extra={"socket": self.path, "probe": exc.strerror})
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "another process is serving this ipc socket", self.path)

    def _unlink_own(self) -> None:
        """Remove the socket file if it is still ours (a newer agent may have replaced it)."""
        inode, self._inode = self._inode, None
        if inode is None:
            return
        try:
            if os.lstat(self.path).st_ino == inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _attach(self, conn: _Connection) -> None:
        if self._server is None:
            conn.closed = True
            conn.transport.abort()  # type: ignore[union-attr]
            return
        self._conns.add(conn)
        self.stats["connections"] += 1
        self.stats["active"] = len(self._conns)
        if self._paused:
            conn.transport.pause_reading()  # type: ignore[union-attr]

    def _detach(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self.stats["active"] = len(self._conns)

    def _count_error(self, reason: str) -> None:
        errors = self.stats["errors"]
        errors[reason] = errors.get(reason, 0) + 1

    def pause_reading(self) -> None:
        """Stop reading from every plugin (upstream backpressure); the kernel buffers then block the plugins."""
        self._paused = True
        for conn in self._conns:
            if not conn.closed and conn.transport is not None:
                conn.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from every plugin again (upstream drained)."""
        self._paused = False
        for conn in self._conns:
            if not conn.closed and conn.transport is not None:
                conn.transport.resume_reading()


# ---------------------------------------------------------------------------------------------------------------
# Data report socket


class _ReportConnection(_Connection):
    server: ReportSocketServer

    def _parse(self, buf: bytearray, view: memoryview) -> int:
        server = self.server
        max_body = server.max_message - REPORT_UP_HEADER.size
        unpack = REPORT_UP_HEADER.unpack_from
        n = len(buf)
        off = 0
        frames = 0
        records: list[Record] = []
        arrival = 0
        try:
            while n - off >= 24 and not self.closed:
                ptype, data_id, _utc, body_len, _r0, _r1 = unpack(buf, off)
                if ptype != PROTO_DATA_REPORT and ptype != PROTO_SYNC_CONFIG:
                    raise _FrameError("unknown_type", f"proto_type 0x{ptype:x}")
                if body_len > max_body:
                    raise _FrameError("oversize", f"body_length {body_len} > {max_body}")
                end = off + 24 + body_len
                if end > n:
                    break
                if ptype == PROTO_DATA_REPORT:
                    if not arrival:
                        arrival = _now_ms()  # utc_time is truncated milliseconds in the SDK: stamp it here
                    records.append(Record(data_id, bytes(view[off + 24:end]), arrival))
                else:
                    # A body on a keepalive is ignored: the SDK sends none and nothing is defined for it.
                    self._reply_sync_config()
                frames += 1
                off = end
        finally:
            server.stats["frames"] += frames
            if records:
                server._deliver(records)
        return off

    def _reply_sync_config(self) -> None:
        server = self.server
        server.stats["keepalives"] += 1
        body = server._sync_config_body()
        if body is not None:
            self.write(REPORT_DOWN_HEADER.pack(PROTO_SYNC_CONFIG, len(body)) + body)


class ReportSocketServer(_UnixSocketServer):
    """The data report socket: delivers `Record`s in per-read batches and answers keepalives with identity().

    `on_records` is called from the event loop with every record parsed from one read of one connection, in
    arrival order; it must not block. `identity()` returns at least `{"cloud_id": int, "bk_agent_id": str}` and is
    called for every keepalive reply, so identity changes reach plugins on their next keepalive.
    """

    _protocol = _ReportConnection

    def __init__(self, path: str, on_records: Callable[[list[Record]], None], identity: Callable[[], dict],
                 max_message: int = DEFAULT_MAX_MESSAGE, mode: int = 0o660, max_write_buffer: int = 1024 * 1024):
        super().__init__(path, max_message=max_message, mode=mode, max_write_buffer=max_write_buffer)
        self.on_records = on_records
        self.identity = identity
        self.stats.update(records=0, keepalives=0)

    def _deliver(self, records: list[Record]) -> None:
        self.stats["records"] += len(records)
        try:
            self.on_records(records)
        except Exception:
            self._count_error("callback")
            log.exception("on_records failed", extra={"socket": self.path, "records": len(records)})

    def _sync_config_body(self) -> bytes | None:
        """The keepalive reply, or None (no reply) when identity() fails: a wrong identity is worse than none."""
        try:
            ident = self.identity()
            return _dump_json({"cloud_id": int(ident["cloud_id"]), "bk_agent_id": str(ident["bk_agent_id"])})
        except Exception:
            self._count_error("callback")
            log.exception("identity() failed, keepalive not answered", extra={"socket": self.path})
            return None


# ---------------------------------------------------------------------------------------------------------------
# Message socket


class _MessageConnection(_Connection):
    server: MessageSocketServer

    def __init__(self, server: MessageSocketServer):
        super().__init__(server)
        self.plugin_name = ""
        self.connected_ms = _now_ms()

    def _parse(self, buf: bytearray, view: memoryview) -> int:
        server = self.server
        max_message = server.max_message
        unpack = MESSAGE_HEADER.unpack_from
        n = len(buf)
        off = 0
        frames = 0
        try:
            while n - off >= 28 and not self.closed:
                magic, ptype, version, seq, length, r0, r1 = unpack(buf, off)
                if magic != MESSAGE_MAGIC:
                    raise _FrameError("bad_magic", f"0x{magic:x}")
                if version != MESSAGE_VERSION:
                    raise _FrameError("bad_version", str(version))
                if ptype == PROTO_RESPOND:
                    size = 28 + r0 + r1
                    if size > max_message:
                        raise _FrameError("oversize", f"frame of {size} bytes > {max_message}")
                    # Canonical length is header + meta + payload; some SDK releases put header + payload only
                    # while still sending meta + payload, so both are accepted and reserved0/1 frame the body.
                    if r0 == 0 or (length != size and length != 28 + r1):
                        raise _FrameError("bad_length", f"length {length}, meta {r0}, payload {r1}")
                elif ptype == PROTO_KEEPALIVE_REQ:
                    size = length
                    if size > max_message:
                        raise _FrameError("oversize", f"frame of {size} bytes > {max_message}")
                    if size <= 28:
                        raise _FrameError("bad_length", f"length {length} leaves no keepalive body")
                else:
                    raise _FrameError("unknown_type", f"proto_type 0x{ptype:x}")
                end = off + size
                if end > n:
                    break
                if ptype == PROTO_RESPOND:
                    self._on_respond(view, off + 28, r0, end)
                else:
                    self._on_keepalive(view[off + 28:end], seq)
                frames += 1
                off = end
        finally:
            server.stats["frames"] += frames
        return off

    def _on_keepalive(self, body: memoryview, seq: int) -> None:
        req = _load_json_object(body)
        name = req.get("plugin_name") if req is not None else None
        if not isinstance(name, str) or not name:
            raise _FrameError("bad_json", "keepalive body is not a JSON object with a plugin_name")
        server = self.server
        server.stats["keepalives"] += 1
        server._announce(self, name, req)
        resp = server._keepalive_body()
        if resp is None:
            return
        # The response echoes the request's sequence so a plugin can pair them (the SDK ignores it).
        self.write(MESSAGE_HEADER.pack(MESSAGE_MAGIC, PROTO_KEEPALIVE_RESP, MESSAGE_VERSION, seq,
                                       28 + len(resp), 0, 0) + resp)

    def _on_respond(self, view: memoryview, start: int, meta_len: int, end: int) -> None:
        meta = _load_json_object(view[start:start + meta_len])
        if meta is None:
            raise _FrameError("bad_json", "respond meta is not a JSON object")
        payload = bytes(view[start + meta_len:end])
        server = self.server
        server.stats["responds"] += 1
        name = self.plugin_name or str(meta.get("name", ""))
        try:
            server.on_respond(meta, payload, name)
        except Exception:
            server._count_error("callback")
            log.exception("on_respond failed", extra={"socket": server.path, "plugin": name})


class MessageSocketServer(_UnixSocketServer):
    """The message socket: tracks plugins by keepalive, dispatches messages to them and passes responds up.

    `on_respond(meta, payload, plugin_name)` is called from the event loop for every 0x900a frame; plugin_name
    is the name the connection announced by keepalive, else the meta's `name`. `identity()` returns at least
    `cloud_id` and `bk_agent_id`, optionally `version`, `run_mode`, `status_code`, `status`.
    """

    _protocol = _MessageConnection

    def __init__(self, path: str, on_respond: Callable[[dict, bytes, str], None], identity: Callable[[], dict],
                 max_message: int = DEFAULT_MAX_MESSAGE, mode: int = 0o660, max_write_buffer: int | None = None):
        if max_write_buffer is None:
            max_write_buffer = 2 * max_message + 64 * 1024  # room for two maximal dispatches in flight
        super().__init__(path, max_message=max_message, mode=mode, max_write_buffer=max_write_buffer)
        self.on_respond = on_respond
        self.identity = identity
        self.stats.update(keepalives=0, responds=0, dispatched=0)
        # Plugins known by keepalive: name -> what the plugin last said, plus where and when.
        self.plugins: dict[str, dict] = {}
        self._by_name: dict[str, _MessageConnection] = {}
        self._seq = 0

    def dispatch(self, message_id: str, session_id: str, content: bytes, plugin: str | None = None) -> int:
        """Send a 0x9008 frame to `plugin`'s connection, or to every open connection when None.

        Returns how many connections it was queued on; a plugin that stopped reading is dropped instead.
        """
        meta = _dump_json({"message_id": message_id, "session_id": session_id})
        size = 28 + len(meta) + len(content)
        if size > self.max_message:
            raise ValueError(f"dispatch of {size} bytes exceeds max_message {self.max_message}")
        if plugin is None:
            targets = [c for c in self._conns if not c.closed]
        else:
            conn = self._by_name.get(plugin)
            targets = [conn] if conn is not None and not conn.closed else []
        if not targets:
            return 0
        self._seq = self._seq + 1 if self._seq < _U64_MAX else 1
        frame = MESSAGE_HEADER.pack(MESSAGE_MAGIC, PROTO_DISPATCH, MESSAGE_VERSION, self._seq, size,
                                    len(meta), len(content)) + meta + content
        sent = sum(1 for conn in targets if conn.write(frame))
        self.stats["dispatched"] += sent
        return sent

    def _announce(self, conn: _MessageConnection, name: str, req: dict) -> None:
        if conn.plugin_name and conn.plugin_name != name and self._by_name.get(conn.plugin_name) is conn:
            del self._by_name[conn.plugin_name]
            self.plugins.pop(conn.plugin_name, None)
        conn.plugin_name = name
        self._by_name[name] = conn  # the newest connection of a name wins (a restarted plugin)
        self.plugins[name] = {
            "plugin_name": name,
            "version": req.get("version", ""),
            "pid": req.get("pid", 0),
            "status_code": req.get("status_code", 0),
            "status": req.get("status", ""),
            "remark": req.get("remark", ""),
            "peer_pid": conn.peer_pid,
            "connected_ms": conn.connected_ms,
            "last_keepalive_ms": _now_ms(),
        }

    def _detach(self, conn: _Connection) -> None:
        super()._detach(conn)
        name = getattr(conn, "plugin_name", "")
        if name and self._by_name.get(name) is conn:
            del self._by_name[name]
            self.plugins.pop(name, None)

    async def stop(self) -> None:
        """Stop serving (see `_UnixSocketServer.stop`) and forget the plugins known by keepalive."""
        await super().stop()
        self._by_name.clear()
        self.plugins.clear()

    def _keepalive_body(self) -> bytes | None:
        """The keepalive response, or None (no reply) when identity() fails: a wrong identity is worse than none."""
        try:
            ident = self.identity()
            return _dump_json({
                "agent_id": str(ident["bk_agent_id"]),
                "version": str(ident.get("version", gse.__version__)),
                "cloud_id": int(ident["cloud_id"]),
                "run_mode": int(ident.get("run_mode", RUN_MODE_AGENT)),
                "status_code": int(ident.get("status_code", AGENT_STATUS_RUNNING)),
                "status": str(ident.get("status", "running")),
            })
        except Exception:
            self._count_error("callback")
            log.exception("identity() failed, keepalive not answered", extra={"socket": self.path})
            return None

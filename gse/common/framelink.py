"""The agent link (port 48668): length-prefixed protobuf frames over mutual TLS.

Wire: TLS 1.2 or newer, both sides showing a certificate of the cluster CA, ALPN `gse-agent/1`. Then every
message is a 4-byte big-endian length followed by that many bytes: a serialized `AgentFrame` from the agent,
a `ServerFrame` from the task server. The agent's first frame is its hello; the server answers `Welcome`,
`Redirect` or `Refused`. Frames are at most MAX_FRAME bytes; anything else ends the link.

Why not a gRPC stream (measured, docs/benchmarks.md): one grpcio mutual-TLS stream costs the task server
85-98 KB and ~146 µs of CPU per message; this link costs ~29 KB and ~70-90 µs, which is what 10,000 agents
per task server process needs. gRPC stays between the daemons.

How it stays small: TLS is done here with a pair of `ssl.MemoryBIO`s and an `SSLObject`, so a connection
holds only OpenSSL's own state (asyncio's SSL transport keeps a 256 KiB read buffer per connection).
Plaintext is decrypted into one buffer shared by the process and framed in place: only a partial frame is
copied into the connection until the rest arrives. Bytes go through TLS in SLICE-sized pieces, so that
neither BIO keeps the size of a large burst.

The server side reads the peer certificate's role and agent id once, at the handshake (`link.identity`,
gse/common/roles.py); the handler decides with `roles.refusal` what the link may do.

A link calls its handler, which has three methods:
    link_open(link)               TCP connected (server side: the hello timeout starts)
    link_frame(link, body)        one frame; `body` is a memoryview valid only during the call
    link_lost(link, exc)          once, when the link is gone (exc: None or what ended it)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct

from . import roles

log = logging.getLogger("gse.framelink")

ALPN = "gse-agent/1"
HDR = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024        # as gRPC's message limit between the daemons
SLICE = 4096                        # bytes fed to TLS at a time (measured: keeps an idle link at ~30 KB)
MAX_BUFFERED = 64 * 1024 * 1024     # a peer that leaves this much unread is cut (server side)
COALESCE_MAX = 256 * 1024           # a coalescing link sends at once when this much has gathered

_SHARED = bytearray(64 * 1024)      # every link of the process decrypts into this (one event loop thread)
_SHARED_MV = memoryview(_SHARED)

# TCP keepalive: a peer that vanished without a FIN (power loss, cable) is noticed within ~60 s.
KEEPALIVE = ((socket.TCP_KEEPIDLE, 30), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3))
USER_TIMEOUT_MS = 60_000


class LinkError(ConnectionError):
    """The link could not be set up or was ended by a protocol error."""


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # ssl loads certificates only from files; a memfd keeps the key off the disk.
    fd = os.memfd_create("gse-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.rstrip(b"\n") + b"\n" + key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def server_context(tls, certificate_optional: bool = False) -> ssl.SSLContext:
    """Mutual TLS for the task server's agent port, from a gse.common.tls.TLSMaterial. With
    `certificate_optional` a client may show no certificate (its link's identity says so: such a link may
    only enroll); a certificate shown is verified all the same."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls.cert, tls.key)
    ctx.load_verify_locations(cadata=tls.ca.decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL if certificate_optional else ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    ctx.num_tickets = 0             # links live for days: session tickets would only cost bytes
    return ctx


def client_context(tls, with_certificate: bool = True) -> ssl.SSLContext:
    """The agent's side; without a certificate (`with_certificate=False`, only `tls.ca` is used) for the one
    Enroll exchange of an agent that has none yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if with_certificate:
        _load_chain(ctx, tls.cert, tls.key)
    ctx.load_verify_locations(cadata=tls.ca.decode())
    ctx.set_alpn_protocols([ALPN])
    return ctx


def _tune_socket(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in KEEPALIVE:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:     # not TCP (tests over other transports): nothing to tune
        pass


def peer_name(transport) -> str:
    """The peer as gRPC names it: ipv4:1.2.3.4:5678 / ipv6:[::1]:5678."""
    peer = transport.get_extra_info("peername")
    if not peer:
        return "unknown"
    host, port = peer[0], peer[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class FrameLink(asyncio.Protocol):
    """One TLS connection carrying frames, on either side."""

    __slots__ = ("ctx", "handler", "hostname", "transport", "inc", "out", "obj", "ready", "rest", "session",
                 "waiter", "paused", "drained", "peer", "server_side", "error", "identity", "coalesce",
                 "_pending", "_pending_size")

    def __init__(self, ctx: ssl.SSLContext, handler, *, server_hostname: str | None = None,
                 waiter: asyncio.Future | None = None):
        self.ctx = ctx
        self.handler = handler
        self.hostname = server_hostname
        self.server_side = server_hostname is None
        self.transport = None
        self.inc = self.out = self.obj = None
        self.ready = False
        self.rest: bytearray | None = None      # a partial frame, until the rest arrives
        self.session = None                     # the handler's own state for this link
        self.waiter = waiter                    # client side: resolved once TLS is up
        self.paused = False
        self.drained: asyncio.Future | None = None
        self.peer = "unknown"
        self.error = ""                         # why the link ended, when it was not a clean close
        self.identity = roles.NO_CERTIFICATE    # server side: what the peer's certificate says, once TLS is up
        # A link that carries many agents' frames (a proxy's, either side) gathers the small frames written in
        # one turn of the event loop into few TLS records and one send: see `write`.
        self.coalesce = False
        self._pending: list[bytes] | None = None
        self._pending_size = 0

    # ---- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        """TCP is up: tune the socket, set up the TLS objects and tell the handler (`link_open`); the client side starts
        the handshake."""
        self.transport = transport
        self.peer = peer_name(transport)
        _tune_socket(transport)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = self.ctx.wrap_bio(self.inc, self.out, server_side=self.server_side,
                                     server_hostname=self.hostname)
        self.handler.link_open(self)
        if not self.server_side:
            self._handshake()

    def data_received(self, data) -> None:
        """Feed received bytes to TLS, SLICE bytes at a time, and hand out every whole frame decrypted."""
        if len(data) <= SLICE:
            self._received(data)
            return
        mv = memoryview(data)
        for i in range(0, len(data), SLICE):
            if self.obj is None:
                return
            self._received(mv[i:i + SLICE])

    def eof_received(self):
        """The peer half-closed: returning False closes our side too."""
        return False                # close our side too

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: `drain` waits from now on."""
        self.paused = True

    def resume_writing(self) -> None:
        """The buffer drained: wake whoever waits in `drain`."""
        self.paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def connection_lost(self, exc) -> None:
        """The connection is gone: fail a pending `drain` and the handshake waiter, then tell the handler once
        (`link_lost`, `exc` None on a clean close)."""
        self.obj = self.inc = self.out = None
        self.rest = None
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(LinkError("link closed"))
        self.drained = None
        self._fail_waiter(exc or LinkError("connection closed during the TLS handshake"))
        self.handler.link_lost(self, exc)

    # ---- TLS and frames --------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.out is not None and self.out.pending:
            self.transport.write(self.out.read())

    def _fail_waiter(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.waiter = None

    def _handshake(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()           # the alert, if any
            self._fail(LinkError(f"TLS handshake failed: {exc}"))
            return False
        self._flush()
        if self.obj.selected_alpn_protocol() != ALPN:
            self._fail(LinkError(f"the peer does not speak {ALPN}"))
            return False
        self.ready = True
        if self.server_side:
            self.identity = roles.from_peercert(self.obj.getpeercert())
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self)
        self.waiter = None
        return True

    def _fail(self, exc: LinkError) -> None:
        log.debug("link failed", extra={"peer": self.peer, "error": str(exc)})
        self.error = str(exc)
        self._fail_waiter(exc)
        self.obj = None
        if self.transport is not None:
            self.transport.close()

    def _received(self, data) -> None:
        obj = self.obj
        if obj is None:             # closed; bytes still arriving
            return
        self.inc.write(data)
        if not self.ready and not self._handshake():
            return
        try:
            while True:
                n = obj.read(len(_SHARED), _SHARED)
                if not n:
                    self.close()
                    return
                self._feed(_SHARED_MV[:n])
                if self.obj is None:        # closed while handling a frame
                    return
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:      # close_notify
            self.close()
            return
        except ssl.SSLError as exc:     # a bad record, or the peer's alert (e.g. it refused our certificate)
            self.error = f"TLS: {exc}"
            log.debug("link: TLS error", extra={"peer": self.peer, "error": str(exc)})
            self.close()
            return
        except LinkError as exc:
            self.error = str(exc)
            log.warning("link: protocol error", extra={"peer": self.peer, "error": str(exc)})
            self.close()
            return
        self._flush()               # e.g. a TLS 1.3 KeyUpdate answer

    def _frames(self, mv) -> int:
        n, off = len(mv), 0
        while n - off >= 4:
            size = HDR.unpack_from(mv, off)[0]
            if size > MAX_FRAME:
                raise LinkError(f"frame of {size} bytes (at most {MAX_FRAME})")
            end = off + 4 + size
            if end > n:
                break
            self.handler.link_frame(self, mv[off + 4:end])
            if self.obj is None:
                return n
            off = end
        return off

    def _feed(self, data) -> None:
        if self.rest is None:
            off = self._frames(data)
            if off < len(data) and self.obj is not None:
                self.rest = bytearray(data[off:])
            return
        self.rest += data
        mv = memoryview(self.rest)
        try:
            off = self._frames(mv)
        finally:
            mv.release()
        if self.rest is not None:
            del self.rest[:off]
            if not self.rest:
                self.rest = None

    # ---- sending ---------------------------------------------------------------------------------------

    def write(self, body: bytes) -> bool:
        """Send one frame (never blocks; see `paused`/`drain` for flow control). False once closed."""
        obj = self.obj
        if obj is None or not self.ready:
            return False
        size = len(body)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes (at most {MAX_FRAME})")
        if self.coalesce and size + 4 <= SLICE:
            pending = self._pending
            if pending is None:
                pending = self._pending = []
                asyncio.get_running_loop().call_soon(self._send_pending)
            pending.append(HDR.pack(size))
            pending.append(bytes(body))
            self._pending_size += size + 4
            if self._pending_size >= COALESCE_MAX:
                self._send_pending()
            return True
        if self._pending:
            self._send_pending()                # frames keep their order
        if size + 4 <= SLICE:
            obj.write(HDR.pack(size) + body)
            self.transport.write(self.out.read())
        else:
            mv = memoryview(body)
            first = SLICE - 4
            obj.write(HDR.pack(size) + mv[:first])
            chunks = [self.out.read()]
            for i in range(first, size, SLICE):
                obj.write(mv[i:i + SLICE])
                chunks.append(self.out.read())
            self.transport.writelines(chunks)
        if self.server_side and self.transport.get_write_buffer_size() > MAX_BUFFERED:
            log.warning("link: the peer does not read; closing", extra={"peer": self.peer})
            self.abort()
            return False
        return True

    def _send_pending(self) -> None:
        """Send the frames gathered by a coalescing link: SLICE-sized TLS records, one transport write."""
        pending, self._pending, self._pending_size = self._pending, None, 0
        obj = self.obj
        if not pending or obj is None:
            return
        data = b"".join(pending)
        chunks = []
        for i in range(0, len(data), SLICE):
            obj.write(data[i:i + SLICE])
            chunks.append(self.out.read())
        self.transport.writelines(chunks)
        if self.server_side and self.transport.get_write_buffer_size() > MAX_BUFFERED:
            log.warning("link: the peer does not read; closing", extra={"peer": self.peer})
            self.abort()

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark again."""
        if not self.paused or self.obj is None:
            return
        if self.drained is None:
            self.drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self.drained)

    def close(self) -> None:
        """Send close_notify and what is buffered, then close."""
        obj = self.obj
        if obj is None:
            return
        if self._pending:
            self._send_pending()
        self.obj = None
        if self.ready:
            try:
                obj.unwrap()
            except ssl.SSLError:        # want-read: the peer's close_notify is not awaited
                pass
            self._flush()
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, without close_notify and discarding what is buffered."""
        self.obj = None
        if self.transport is not None:
            self.transport.abort()

    @property
    def closed(self) -> bool:
        """The link was closed or failed (no more frames either way)."""
        return self.obj is None


def bind(host: str, port: int, *, reuse_port: bool = False, backlog: int = 4096) -> socket.socket:
    """The listening socket, bound now (so that the port is known early); links are served by `listen`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def listen(ctx: ssl.SSLContext, handler, sock: socket.socket, backlog: int = 4096) -> asyncio.AbstractServer:
    """Serve links on `sock` (from `bind`), one FrameLink with `handler` per accepted connection; returns the asyncio
    server (close it to stop accepting; open links are the handler's to close)."""
    loop = asyncio.get_running_loop()
    # the loop calls listen() again: give it the same backlog, not its default of 100
    return await loop.create_server(lambda: FrameLink(ctx, handler), sock=sock, backlog=backlog)


async def dial(ctx: ssl.SSLContext, host: str, port: int, handler, *, server_hostname: str, local_ip: str = "",
               timeout: float = 10.0) -> FrameLink:
    """Connect (from `local_ip` if given) and finish the TLS handshake within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    link: FrameLink | None = None
    try:
        async with asyncio.timeout(timeout):
            _t, link = await loop.create_connection(
                lambda: FrameLink(ctx, handler, server_hostname=server_hostname, waiter=waiter), host, port,
                local_addr=(local_ip, 0) if local_ip else None)
            await waiter
    except BaseException:
        if link is not None:
            link.abort()
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled():
            waiter.exception()      # retrieved: the error raised here is the one that counts
        raise
    return link

"""A source-address relay, so that an agent's connections leave from a chosen local address.

gRPC in Python cannot bind a client socket to a source address. When an agent is told to bind (many agents
on one machine, each with its own 127.x.y.z), its channel dials an abstract Unix socket served here, and
each accepted connection is spliced to a TCP connection opened from `bind_ip` to the current server.
TLS still runs end to end between the agent's gRPC channel and the server; the relay only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

from gse.common.aio import spawn

log = logging.getLogger("gse.agent.relay")


class _Pipe(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport):
        """Keep the transport; bytes that arrive before the peer side is connected wait in `pending`."""
        self.transport = transport

    def data_received(self, data):
        """Forward to the peer side, or hold until it is connected."""
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc):
        """One side closed: close the other."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self):
        """Our side's buffer is full: stop reading the peer side."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        """Our side drained: read the peer side again."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class SourceRelay:
    """The relay of one agent component bound to `bind_ip`: an abstract Unix socket whose connections are spliced to TCP
    connections from `bind_ip` to `target` ((host, port), set by the owner before dialling; None refuses them)."""
    def __init__(self, bind_ip: str):
        self.bind_ip = bind_ip
        self.name = f"gse-agent-{os.getpid()}-{secrets.token_hex(6)}"
        self.target: tuple[str, int] | None = None
        self.server: asyncio.AbstractServer | None = None

    @property
    def grpc_target(self) -> str:
        """The gRPC target the channel dials instead of the server ("unix-abstract:<name>")."""
        return f"unix-abstract:{self.name}"

    async def start(self) -> None:
        """Listen on the abstract socket."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(self._accept, "\0" + self.name)

    def _accept(self) -> asyncio.Protocol:
        inner = _Pipe()
        spawn(self._connect(inner), "relay connect")
        return inner

    async def _connect(self, inner: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        if self.target is None:
            if inner.transport:
                inner.transport.close()
            return
        host, port = self.target
        try:
            _t, outer = await loop.create_connection(_Pipe, host, port, local_addr=(self.bind_ip, 0))
        except OSError as exc:
            log.debug("relay connect failed", extra={"target": f"{host}:{port}", "error": str(exc)})
            if inner.transport:
                inner.transport.close()
            return
        outer.peer, inner.peer = inner, outer
        for chunk in inner.pending:
            outer.transport.write(chunk)
        inner.pending.clear()
        if inner.transport is None or inner.transport.is_closing():
            outer.transport.close()

    async def stop(self) -> None:
        """Stop accepting (spliced connections end with their peers)."""
        if self.server is not None:
            self.server.close()
            self.server = None

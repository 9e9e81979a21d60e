"""The one place gRPC servers and channels are made: mutual TLS, the role check (gse/common/roles.py),
keepalive, message sizes, health service, the trace metadata that follows a task across daemons, and the
pool of channels by address."""

from __future__ import annotations

from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import roles
from .address import join_host_port
from .aio import spawn
from .logs import TRACE, current_trace
from .tls import TLSMaterial

# gRPC metadata keys of the trace (gse.common.logs): the task and the API request a call is about.
MD_TASK_ID = "x-gse-task-id"
MD_REQUEST_ID = "x-gse-request-id"

MAX_MESSAGE = 64 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
    # Measured (bench/probes): BDP probing pings after every quiet period, i.e. on every heartbeat of an
    # idle agent stream; off, a heartbeat costs the server ~40% less CPU. Our messages are small.
    ("grpc.http2.bdp_probe", 0),
    # No "grpc.tsi.max_frame_size": gRPC's SSL transport runs with its default frames. A 4096-byte frame saves
    # ~6-7 KB per long-lived stream, and agents hold none (their link is framelink), while it is the suspect
    # of TSI_DATA_CORRUPTED under load (docs/benchmarks.md, "Holding under load").
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),     # tolerant of a busy server: a dropped stream costs a reconnect
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a server restart; the caller adds its own jittered backoff on top.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.enable_retries", 0),
    ("grpc.http2.bdp_probe", 0),
]


def make_server(tls: TLSMaterial, options=(), deny: roles.DenyList | None = None,
                access=roles.ACCESS) -> grpc.aio.Server:
    """A gRPC server whose every call first passes the role check of `access` (gse/common/roles.py) and,
    with `deny`, the revocation list; handlers then run inside the caller's trace."""
    return grpc.aio.server(options=[*SERVER_OPTIONS, *options],
                           interceptors=[roles.RoleInterceptor(access, deny), TraceInterceptor()])


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace as call metadata (empty when there is none): pass as `metadata=` on calls about a
    task, so the callee's log lines name it too."""
    t = current_trace()
    md = []
    if t.get("task_id"):
        md.append((MD_TASK_ID, t["task_id"]))
    if t.get("request_id"):
        md.append((MD_REQUEST_ID, t["request_id"]))
    return tuple(md)


class TraceInterceptor(grpc.aio.ServerInterceptor):
    """Restores the caller's trace (task_id, request_id metadata) around a unary handler. Calls without
    trace metadata pass through untouched, so the hot paths (dbproxy batches, data streams) pay nothing."""

    async def intercept_service(self, continuation, handler_call_details):
        """Wrap unary handlers called with trace metadata so that they run inside that trace; anything else is
        returned unchanged."""
        handler = await continuation(handler_call_details)
        md = handler_call_details.invocation_metadata
        if handler is None or not md or handler.unary_unary is None:
            return handler
        t = {}
        for k, v in md:
            if k == MD_TASK_ID:
                t["task_id"] = v
            elif k == MD_REQUEST_ID:
                t["request_id"] = v
        if not t:
            return handler
        inner = handler.unary_unary

        async def traced(request, context):
            """The handler run with the caller's task_id/request_id set in gse.common.logs.TRACE."""
            token = TRACE.set(t)
            try:
                return await inner(request, context)
            finally:
                TRACE.reset(token)

        return grpc.unary_unary_rpc_method_handler(traced, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def bind(server: grpc.aio.Server, tls: TLSMaterial, host: str, port: int) -> int:
    """Bind a mutual-TLS listener; returns the port (useful with port 0). There is no plaintext listener."""
    bound = server.add_secure_port(join_host_port(host, port), tls.server_credentials())
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return bound


def make_channel(tls: TLSMaterial, target: str, options=()) -> grpc.aio.Channel:
    """An asyncio channel to `target` (`host:port`) with mutual TLS and CHANNEL_OPTIONS (plus `options`); the peer
    certificate is checked for `tls.server_name` when one is configured, else for the dialled host."""
    opts = [*CHANNEL_OPTIONS, *options]
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=opts)


def make_blocking_channel(tls: TLSMaterial, target: str, options=()) -> grpc.Channel:
    """A synchronous channel with the same TLS and options as `make_channel`, for calls made from a worker
    thread: grpc.aio sends a request on the event loop's thread with the GIL held (a 16 MiB request held it
    for tens of ms), the synchronous stack sends it with the GIL released."""
    opts = [*CHANNEL_OPTIONS, *options]
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.channel_credentials(), options=opts)


class ChannelPool:
    """Channels to peers by address (mutual TLS via `make_channel`), made on first use; the one place a
    daemon keeps the channels of a service it calls (dbproxies, task servers, file servers)."""

    def __init__(self, tls: TLSMaterial, options=()):
        self.tls = tls
        self.options = tuple(options)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to `address` (`host:port`), made on first use."""
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = make_channel(self.tls, address, self.options)
        return ch

    def retain(self, addresses: Iterable[str]) -> None:
        """Close the channels to every address not in `addresses` (peers that left the view)."""
        keep = set(addresses)
        for addr in [a for a in self._channels if a not in keep]:
            spawn(self._channels.pop(addr).close(), "closing a channel")

    def renew(self, address: str) -> grpc.aio.Channel:
        """Drop the channel to `address` (it failed in a way a new connection may not) and make a new one."""
        old = self._channels.pop(address, None)
        if old is not None:
            spawn(old.close(), "closing a channel")
        return self.get(address)

    async def close(self) -> None:
        """Close every channel of the pool."""
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()


def add_health(server: grpc.aio.Server):
    """Serve the standard grpc.health.v1 service; returns the servicer to flip SERVING/NOT_SERVING."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer, serving: bool, service: str = "") -> None:
    """Flip the health status of `service` ("" = the whole server) on a servicer from `add_health`."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set(service, status)


def identity(b: bytes) -> bytes:
    """A (de)serializer that passes bytes through: used where a message is serialized once for many streams."""
    return b

"""The one place gRPC servers and channels are made: mutual TLS, the role check (gse/common/roles.py),
keepalive, message sizes, health service."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import roles
from .tls import TLSMaterial

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
    # TLS frame protector buffers: 4 KiB frames save ~6-7 KB per agent connection.
    ("grpc.tsi.max_frame_size", 4096),
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
    with `deny`, the revocation list."""
    return grpc.aio.server(options=[*SERVER_OPTIONS, *options],
                           interceptors=[roles.RoleInterceptor(access, deny)])


def bind(server: grpc.aio.Server, tls: TLSMaterial, host: str, port: int) -> int:
    """Bind a mutual-TLS listener; returns the port (useful with port 0). There is no plaintext listener."""
    bound = server.add_secure_port(f"{_host(host)}:{port}", tls.server_credentials())
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return bound


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def make_channel(tls: TLSMaterial, target: str, options=()) -> grpc.aio.Channel:
    opts = [*CHANNEL_OPTIONS, *options]
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=opts)


def add_health(server: grpc.aio.Server):
    """Serve the standard grpc.health.v1 service; returns the servicer to flip SERVING/NOT_SERVING."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer, serving: bool, service: str = "") -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set(service, status)


def identity(b: bytes) -> bytes:
    """A (de)serializer that passes bytes through: used where a message is serialized once for many streams."""
    return b

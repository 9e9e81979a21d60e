"""The dbproxy daemon: a gRPC service (58859) in front of the Redis nodes, registered in ZooKeeper."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from gse.common import rpc
from gse.common.address import join_host_port
from gse.common.config import ConfigError, check_addresses
from gse.common.discovery import Discovery
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial
from gse.pb import dbproxy_pb2 as pb
from gse.pb import dbproxy_pb2_grpc as pb_grpc

from .store import ShardedStore

log = logging.getLogger("gse.dbproxy")

OPS = Counter("gse_dbproxy_ops_total", "Operations executed")
BATCHES = Histogram("gse_dbproxy_batch_seconds", "Time to execute one batch",
                    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
HEALTHY = Gauge("gse_dbproxy_redis_healthy", "1 while a Redis node is up and in sync", ["node"])
SYNCING = Gauge("gse_dbproxy_redis_syncing", "1 while a Redis node that came back is being repaired", ["node"])
COPIED = Gauge("gse_dbproxy_repair_copied_keys", "Keys copied to repair returning nodes (since start)")
HINTED = Gauge("gse_dbproxy_hinted_writes", "Writes that left a hint for a replica that missed them (since start)")


@dataclasses.dataclass(frozen=True)
class DbProxyConfig(BaseConfig):
    """dbproxy's configuration (deploy/dbproxy.yaml explains every key): where it listens, the Redis nodes behind it,
    how many replicas each key gets, and the probe/timeout periods in seconds."""
    host: str = "127.0.0.1"
    port: int = 58859
    advertise_host: str = ""           # "" = host
    redis: tuple[str, ...] = ("127.0.0.1:6379",)
    redis_password: str = ""
    replicas: int = 1
    key_prefix: str = ""
    probe_interval_s: float = 1.0
    settle_timeout_s: float = 30.0     # at start, wait this long at most for returning nodes to be repaired
    redis_timeout_s: float = 2.0
    max_batch: int = 100_000

    def validate(self) -> None:
        """ConfigError unless at least one Redis node is given, every node is host:port, and replicas is between 1 and
        the number of nodes."""
        super().validate()
        if not self.redis:
            raise ConfigError("redis: at least one node (host:port) is required")
        check_addresses("redis", self.redis)
        if not 1 <= self.replicas <= len(self.redis):
            raise ConfigError(f"replicas must be between 1 and the number of redis nodes ({len(self.redis)})")


class DbProxyServicer(pb_grpc.DbProxyServicer):
    """The DbProxy gRPC service (proto/gse/pb/dbproxy.proto): one Execute call runs a batch on the sharded store."""
    def __init__(self, store: ShardedStore, max_batch: int):
        self.store = store
        self.max_batch = max_batch

    async def Execute(self, request, context):
        """Run one batch (at most `max_batch` ops, else INVALID_ARGUMENT); one Result per op, in order. Failures of
        single ops are in their Results, never a gRPC error."""
        import grpc
        if len(request.ops) > self.max_batch:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"batch of {len(request.ops)} ops exceeds max_batch {self.max_batch}")
        t0 = time.perf_counter()
        reply = pb.BatchReply()
        await self.store.execute(request.ops, into=reply.results)
        BATCHES.observe(time.perf_counter() - t0)
        OPS.inc(len(request.ops))
        return reply


class DbProxyService(Service):
    """The dbproxy daemon: probes and repairs the Redis nodes, serves DbProxy on 58859 (spec §6) and registers in
    ZooKeeper once the nodes have settled."""
    name = "dbproxy"

    def __init__(self, config: DbProxyConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.store: ShardedStore | None = None
        self.server = None
        self.port = 0
        self.discovery = Discovery(config.zookeeper)

    def health(self):
        """Healthy while at least one Redis node is up and ZooKeeper is connected; the detail lists every node's
        state."""
        healthy = self.store.healthy_count() if self.store else 0
        ok = healthy > 0 and self.discovery.connected
        return ok, {"service": self.name, "node_id": self.node_id, "redis_healthy": healthy,
                    "redis": self.store.state() if self.store else {}, "zookeeper": self.discovery.connected}

    async def start(self) -> None:
        """Probe the Redis nodes and wait (at most settle_timeout_s) for returning ones to be repaired, then bind,
        serve and register in ZooKeeper with the address and metrics port."""
        await super().start()
        c = self.config
        self.store = ShardedStore(list(c.redis), c.replicas, c.key_prefix, c.redis_password, c.redis_timeout_s)
        await self.store.probe()
        await self.store.settle(c.settle_timeout_s)
        self.server = rpc.make_server(self.tls)
        pb_grpc.add_DbProxyServicer_to_server(DbProxyServicer(self.store, c.max_batch), self.server)
        health = rpc.add_health(self.server)
        self.port = rpc.bind(self.server, self.tls, c.host, c.port)
        await self.server.start()
        await rpc.set_serving(health, True)
        await self.discovery.start()
        await self.discovery.register(self.name, self.node_id, {
            "address": join_host_port(c.advertise_host or c.host, self.port),
            "metrics": join_host_port(c.metrics.host, self.ops.port),
            "redis": list(c.redis), "replicas": c.replicas,
        })
        log.info("dbproxy serving", extra={"port": self.port, "redis": list(c.redis), "replicas": c.replicas})

    async def run(self) -> None:
        """Probe the Redis nodes every probe_interval_s (repairing those that came back) and publish their states as
        metrics."""
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            await self.store.probe()
            for address, state in self.store.state().items():
                HEALTHY.labels(address).set(1 if state == "up" else 0)
                SYNCING.labels(address).set(1 if state == "syncing" else 0)
            COPIED.set(self.store.copied_total)
            HINTED.set(self.store.hints_total)

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper first (clients go elsewhere), then stop serving within `grace` seconds and close the Redis
        connections."""
        await self.discovery.stop()          # leave ZooKeeper first so that clients go elsewhere
        if self.server is not None:
            await self.server.stop(grace)
        if self.store is not None:
            await self.store.close()
        await super().stop(grace)

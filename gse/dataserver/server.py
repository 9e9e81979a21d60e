"""The data server daemon (58625): agent data streams in, routed by DataID to Kafka, Redis and files.

It registers in ZooKeeper with its load (agent streams held, records/s) so that agents spread across the data
servers, follows the route table under <root>/config/data/ live, keeps the latest host snapshot of every
agent in Redis (through dbproxy) for the API, and sends its own operating figures every `ops_interval_s` as
a record on the reserved channel `ops_data_id`, routed like any other channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time

from gse import __version__
from gse.common import roles, rpc
from gse.common.address import join_host_port
from gse.common.config import ConfigError, DbProxyClientConfig
from gse.common.datastate import CHANNEL_DATASERVER_OPS, CHANNEL_HOST_SNAPSHOT, DEFAULT_DATASERVER_PORT
from gse.common.dbclient import DbClient
from gse.common.discovery import Discovery
from gse.common.errors import GseError, Unavailable
from gse.common.records import AreaParents, HostSnapshotRecord
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial

from .ingest import Ingest
from .outputs import Outputs, SinkSettings
from .route_table import RouteTable
from .router import Router

log = logging.getLogger("gse.dataserver")

AREA_PARENTS_INTERVAL_S = 10.0   # how often the cascade of areas is read (what proxies may claim)


@dataclasses.dataclass(frozen=True)
class KafkaOutputConfig:
    """The data server's `kafka` section: producer linger (ms), the largest record batch per partition (bytes; no
    record may be larger), request timeout (s) and acks (all, 1 or 0)."""
    linger_ms: int = 5                  # how long the producer waits to fill a request
    max_batch_bytes: int = 1024 * 1024  # one record batch per partition (a record may not be larger)
    request_timeout_s: float = 10.0
    acks: str = "all"                   # all | 1 | 0

    def validate(self) -> None:
        """ConfigError unless acks is all, 1 or 0."""
        if self.acks not in ("all", "1", "0"):
            raise ConfigError("kafka.acks must be all, 1 or 0")


@dataclasses.dataclass(frozen=True)
class FileOutputConfig:
    """The data server's `files` section: the directories a file stream_to's data_log_path must lie under (spec
    section 3, report_mode file), and rotation (bytes per file, backups kept)."""
    roots: tuple[str, ...] = ("/var/log/gse/data",)     # a stream_to's data_log_path must lie under one
    rotate_bytes: int = 256 * 1024 * 1024
    backups: int = 5


@dataclasses.dataclass(frozen=True)
class DataServerConfig(BaseConfig):
    """The data server's config (deploy/dataserver.yaml): its port (58625), area, how often it reports its load and
    sends its operating figures (s, on `ops_data_id`), the host snapshot channel and TTL, output retry and Redis
    settings, and the kafka, files and dbproxy sections."""
    host: str = "127.0.0.1"
    port: int = DEFAULT_DATASERVER_PORT
    advertise_host: str = ""
    area: int = 0
    load_report_interval_s: float = 2.0
    ops_interval_s: float = 60.0
    ops_data_id: int = CHANNEL_DATASERVER_OPS
    snapshot_data_id: int = CHANNEL_HOST_SNAPSHOT
    snapshot_ttl_s: float = 60.0
    output_retry_s: float = 2.0         # after an output failed, batches for it fail at once for this long
    redis_timeout_s: float = 5.0
    redis_stream_maxlen: int = 0        # XADD MAXLEN ~ n for redis stream routes; 0 = unbounded
    no_route_log_interval_s: float = 60.0
    kafka: KafkaOutputConfig = KafkaOutputConfig()
    files: FileOutputConfig = FileOutputConfig()
    dbproxy: DbProxyClientConfig = DbProxyClientConfig()

    def validate(self) -> None:
        """ConfigError when the TLS material or an advertise_host for a wildcard host is missing, or
        load_report_interval_s or ops_interval_s is not positive."""
        super().validate()
        if self.load_report_interval_s <= 0 or self.ops_interval_s <= 0:
            raise ConfigError("load_report_interval_s and ops_interval_s must be positive")


class SnapshotCache:
    """The latest host snapshot of each agent, written to Redis through dbproxy with a TTL, once a second."""

    def __init__(self, client: DbClient, ttl_ms: int):
        self.db = client
        self.ttl_ms = ttl_ms
        self.latest: dict[str, bytes] = {}
        self.written = 0

    def on_records(self, _channel: int, agent_id: str, records) -> None:
        """Router tap for the host snapshot channel: keep the last record of `records` as the agent's latest snapshot
        (the channel id is not used)."""
        if records:
            self.latest[agent_id] = bytes(records[-1])

    async def run(self) -> None:
        """Every second, write the snapshots received since the last write to Redis (one dbproxy round trip, TTL
        `ttl_ms`); while dbproxy is unavailable they are logged and dropped (newer ones follow)."""
        while True:
            await asyncio.sleep(1.0)
            if not self.latest or not self.db.addresses:
                continue
            latest, self.latest = self.latest, {}
            ops = [HostSnapshotRecord.write(aid, body, self.ttl_ms) for aid, body in latest.items()]
            try:
                await self.db.execute(ops)
                self.written += len(ops)
            except Unavailable as exc:
                log.warning("host snapshots not stored", extra={"agents": len(ops), "error": str(exc)})


class DataServerService(Service):
    """The data server daemon (`python -m gse.dataserver`): agents' DataIngest streams in, records routed per DataID
    (spec section 3, data routes) to Kafka, Redis and files."""
    name = "dataserver"

    def __init__(self, config: DataServerConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.deny = roles.DenyList()
        self.db = DbClient(self.tls, config.dbproxy.addresses, config.dbproxy.timeout_s)
        c = config
        self.outputs = Outputs(SinkSettings(
            kafka_linger_ms=c.kafka.linger_ms, kafka_max_batch_bytes=c.kafka.max_batch_bytes,
            kafka_request_timeout_s=c.kafka.request_timeout_s, kafka_acks=c.kafka.acks,
            redis_timeout_s=c.redis_timeout_s, redis_stream_maxlen=c.redis_stream_maxlen,
            file_roots=tuple(c.files.roots), file_rotate_bytes=c.files.rotate_bytes, file_backups=c.files.backups,
            retry_s=c.output_retry_s))
        self.table = RouteTable(self.discovery, self._on_streamtos)
        self.snapshots = SnapshotCache(self.db, int(c.snapshot_ttl_s * 1000))
        self.router = Router(self.table, self.outputs, c.no_route_log_interval_s, tap=self.snapshots.on_records)
        self.router.tapped = {c.snapshot_data_id}
        self.ingest = Ingest(self.router, self.deny)
        self.server = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self._rate = (time.monotonic(), 0, 0)
        self.records_per_s = 0.0
        self.bytes_per_s = 0.0
        self.started = time.time()

    @property
    def advertise(self) -> str:
        """The host agents dial: advertise_host, else the listen host."""
        return self.config.advertise_host or self.config.host

    @property
    def node_id(self) -> str:
        """node_id from the config, else `<advertised host>-<port>`."""
        return self.config.node_id or f"{self.advertise}-{self.port or self.config.port}"

    def health(self):
        """(ok, detail) for /healthz: ok while serving and connected to ZooKeeper; the detail has agent streams,
        routes and stream_tos (and the route table version), the channels (up to 1,000), records in and each output's
        stats."""
        ok = self.server is not None and self.discovery.connected
        return ok, {"service": self.name, "node_id": self.node_id, "agents": self.ingest.load,
                    "zookeeper": self.discovery.connected, "routes": len(self.table.routes),
                    "stream_tos": len(self.table.streamtos), "route_version": self.table.version,
                    "channels": sorted(self.table.routes) if len(self.table.routes) <= 1000 else None,
                    "records_in": self.router.records_in, "outputs": {s.label: s.stats for s in
                                                                      self.outputs.sinks.values()}}

    def _registration(self) -> dict:
        return {"address": join_host_port(self.advertise, self.port), "area": self.config.area, "load": self.ingest.load,
                "records_per_s": round(self.records_per_s, 1), "bytes_per_s": round(self.bytes_per_s),
                "metrics": join_host_port(self.config.metrics.host, self.ops.port)}

    def _on_streamtos(self, streamtos: dict[int, dict]) -> None:
        self.outputs.apply(streamtos)

    async def start(self) -> None:
        """Start /healthz, ZooKeeper (following revocations, and dbproxy when none is configured), load the route
        table and make its outputs, bind and start the DataIngest gRPC server, then register in ZooKeeper with its
        load."""
        await super().start()
        c = self.config
        await self.discovery.start()
        await self.discovery.watch_config("revoked", self.deny.apply)     # revoked agents: refused here too
        if not c.dbproxy.addresses:
            await self.discovery.watch_service("dbproxy", self.db.on_view)
        await self.table.start()                # creates the outputs of the stream_tos it finds
        self.server = rpc.make_server(self.tls, deny=self.deny)
        self.server.add_generic_rpc_handlers((self.ingest.handler(),))
        health = rpc.add_health(self.server)
        self.port = rpc.bind(self.server, self.tls, c.host, c.port)
        await self.server.start()
        await rpc.set_serving(health, True)
        await self.discovery.register(self.name, self.node_id, self._registration())
        log.info("data server serving", extra={"port": self.port, "node_id": self.node_id,
                                                "routes": len(self.table.routes)})

    async def run(self) -> None:
        """Report the load to ZooKeeper every `load_report_interval_s`, send the operating figures every
        `ops_interval_s`, store host snapshots and re-read the area cascade, until cancelled."""
        self._tasks = [asyncio.ensure_future(t) for t in (self._report_load(), self._ops_figures(),
                                                          self.snapshots.run(), self._area_parents())]
        await asyncio.gather(*self._tasks)

    async def _area_parents(self) -> None:
        """Which areas are cascaded behind which (what proxies may claim for their agents), from Redis."""
        while True:
            try:
                (r,) = await self.db.execute([AreaParents.read()])
                self.ingest.area_parents = AreaParents.decode(r) or self.ingest.area_parents
            except GseError as exc:
                log.debug("area parents not read", extra={"error": str(exc)})
            await asyncio.sleep(AREA_PARENTS_INTERVAL_S)

    async def _report_load(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_report_interval_s)
            t0, r0, b0 = self._rate
            now = time.monotonic()
            r, b = self.router.records_in, self.router.bytes_in
            self.records_per_s = (r - r0) / max(1e-6, now - t0)
            self.bytes_per_s = (b - b0) / max(1e-6, now - t0)
            self._rate = (now, r, b)
            await self.discovery.update(self.name, self.node_id, self._registration())

    async def _ops_figures(self) -> None:
        """What the original called DataOpServer: this server's figures per channel and per output
        (gse/dataserver/dataop.py) as a record on a reserved channel, every ops_interval_s."""
        host = socket.gethostname()
        while True:
            await asyncio.sleep(self.config.ops_interval_s)
            figures = self.router.figures.record(self.outputs.sinks, self.ingest.load, self.config.ops_interval_s)
            body = json.dumps({
                "node_id": self.node_id, "hostname": host, "version": __version__, "time": int(time.time() * 1000),
                "records_in": self.router.records_in, "bytes_in": self.router.bytes_in,
                "records_per_s": round(self.records_per_s, 1), "bytes_per_s": round(self.bytes_per_s),
                "routes": len(self.table.routes), **figures,
            }, separators=(",", ":")).encode()
            fut = self.router.route(self.config.ops_data_id, [body], self.node_id,
                                    (str(self.config.ops_data_id).encode(), b"0", self.advertise.encode(),
                                     self.node_id.encode()))
            if fut is not None:
                try:
                    await asyncio.wait_for(fut, 30)
                except Exception as exc:  # noqa: BLE001 - figures are best effort
                    log.warning("operating figures not delivered", extra={"error": repr(exc)})

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper first (agents go elsewhere), end the ingest streams once their acks are written, stop
        following routes and the loops, stop gRPC within `grace` seconds, then close the outputs (what is still
        queued there fails: unacknowledged, the agents send it again) and the dbproxy client."""
        await self.discovery.stop()          # leave ZooKeeper first so that agents go elsewhere
        self.ingest.close()                  # streams end once their acks are written
        self.table.stop()
        for t in self._tasks:
            t.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        await self.outputs.close()
        await self.db.close()
        await super().stop(grace)

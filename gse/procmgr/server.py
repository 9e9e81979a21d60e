"""The procmgr daemon (50000): the ProcService (gse/pb/procmgr.proto) for the API server, over mutual TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from gse.common import rpc
from gse.common.config import ConfigError, DbProxyClientConfig
from gse.common.dbclient import DbClient
from gse.common.discovery import Discovery
from gse.common.peers import Peers
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial
from gse.pb import procmgr_pb2_grpc as pb_grpc

from .service import Dispatcher, ProcServicer, ProcStore, Watcher

log = logging.getLogger("gse.procmgr")


@dataclasses.dataclass(frozen=True)
class ProcMgrConfig(BaseConfig):
    """procmgr's configuration (deploy/procmgr.yaml explains every key): where the ProcService listens (default port
    50000), the dbproxies it stores through (or discovery), and its timings in seconds: the dispatch deadline per task
    server call, how long an offline agent is waited for before its targets answer 117, when and how often unanswered
    operations are sent again, the sweep period of open tasks and how long a namespace's index is cached for
    sync_proc_status pages."""
    host: str = "127.0.0.1"
    port: int = 50000
    advertise_host: str = ""
    taskserver_timeout_s: float = 10.0      # deadline of one dispatch call to a task server
    offline_grace_s: float = 30.0           # a target whose agent is offline this long is answered 117
    redispatch_after_s: float = 15.0        # operations without a result are sent again after this (and as often)
    sweep_interval_s: float = 5.0           # how often open tasks are looked at
    sync_cache_s: float = 5.0               # sync_proc_status pages read a namespace's index once per this
    dbproxy: DbProxyClientConfig = DbProxyClientConfig()

    def validate(self) -> None:
        """ConfigError unless the sweep, redispatch and dispatch periods are positive and the grace and cache periods
        not negative."""
        super().validate()
        if self.sweep_interval_s <= 0 or self.redispatch_after_s <= 0 or self.taskserver_timeout_s <= 0:
            raise ConfigError("sweep_interval_s, redispatch_after_s and taskserver_timeout_s must be positive")
        if self.offline_grace_s < 0 or self.sync_cache_s < 0:
            raise ConfigError("offline_grace_s and sync_cache_s must not be negative")


class ProcMgrService(Service):
    """The procmgr daemon: the ProcService over mutual TLS for the API server, the task servers it dispatches through
    (from ZooKeeper), and the Watcher that keeps open tasks moving."""
    name = "procmgr"

    def __init__(self, config: ProcMgrConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.db = DbClient(self.tls, config.dbproxy.addresses, config.dbproxy.timeout_s)
        self.peers = Peers(self.tls)
        self.server = None
        self.port = 0
        self.watcher: Watcher | None = None
        self._tasks: list[asyncio.Task] = []

    def health(self):
        """Healthy once serving, connected to ZooKeeper and with at least one dbproxy; the detail counts the task
        servers known."""
        ok = self.server is not None and self.discovery.connected and bool(self.db.addresses)
        return ok, {"service": self.name, "node_id": self.node_id, "zookeeper": self.discovery.connected,
                    "dbproxies": self.db.addresses, "taskservers": len(self.peers.taskservers)}

    def _registration(self) -> dict:
        return {"address": f"{self.advertise}:{self.port}", "metrics": f"{self.config.metrics.host}:{self.ops.port}"}

    async def start(self) -> None:
        """Connect to ZooKeeper, watch dbproxies (unless configured) and task servers, bind and start the ProcService,
        then register `<root>/procmgr/<node id>` with its address and metrics port."""
        await super().start()
        c = self.config
        await self.discovery.start()
        if not c.dbproxy.addresses:
            await self.discovery.watch_service("dbproxy", self.db.on_view)
        await self.discovery.watch_service("taskserver", self.peers.on_taskservers)
        store = ProcStore(self.db)
        dispatcher = Dispatcher(self.peers, c.taskserver_timeout_s)
        grace_ms = int(c.offline_grace_s * 1000)
        self.watcher = Watcher(store, dispatcher, interval_s=c.sweep_interval_s,
                               redispatch_after_s=c.redispatch_after_s, offline_grace_ms=grace_ms)
        self.server = rpc.make_server(self.tls)
        pb_grpc.add_ProcServiceServicer_to_server(
            ProcServicer(store, dispatcher, offline_grace_ms=grace_ms, sync_cache_s=c.sync_cache_s), self.server)
        health = rpc.add_health(self.server)
        self.port = rpc.bind(self.server, self.tls, c.host, c.port)
        await self.server.start()
        await rpc.set_serving(health, True)
        await self.discovery.register(self.name, self.node_id, self._registration())
        log.info("procmgr serving", extra={"port": self.port, "node_id": self.node_id})

    async def run(self) -> None:
        """Run the open-task Watcher until stopped."""
        self._tasks = [asyncio.ensure_future(self.watcher.run())]
        await asyncio.gather(*self._tasks)

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper first (the API server stops choosing us), cancel the Watcher, stop serving within `grace`
        seconds and close the dbproxy and task server channels."""
        await self.discovery.stop()
        for t in self._tasks:
            t.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        await self.db.close()
        await self.peers.close()
        await super().stop(grace)

"""The syncdata daemon: every agent's host identity file (spec section 11) kept current from a source.

Two or more instances elect one leader in ZooKeeper (`<root>/election/syncdata`); the leader runs its source
(the CMDB's resource-watch API, or a file / directory of identity documents: gse/syncdata/sources.py) and the
pusher (gse/syncdata/push.py), which writes what changed through dbproxy and hands each agent its file
through the task server holding it. What is wanted, what is pending and where the CMDB watch stopped live in
Redis, so another leader goes on from there. Per-host results: the API's `cluster/get_host_identity_result`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from gse.common.address import join_host_port, route_ip
from gse.common.config import ConfigError, DbProxyClientConfig
from gse.common.dbclient import DbClient
from gse.common.discovery import Discovery, Leadership
from gse.common.peers import Peers
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial

from .cmdb import CmdbClient
from .push import PushPolicy, Pusher
from .sources import CmdbSource, FileSource

log = logging.getLogger("gse.syncdata")


@dataclasses.dataclass(frozen=True)
class CmdbConfig:
    """syncdata's `cmdb` section: the CMDB's ESB or API gateway base URL ("" = no CMDB source), the app code, secret
    and user it calls as, the supplier account, a call's timeout and how long a resource_watch may be held (s), and
    how often every host is read again (s)."""
    url: str = ""                   # the CMDB's ESB / API gateway base URL; "" = no CMDB source
    app_code: str = ""
    app_secret: str = ""
    username: str = "admin"
    supplier_account: str = "0"
    timeout_s: float = 30.0         # one call (a watch is held up to watch_hold_s longer)
    watch_hold_s: float = 25.0      # how long the CMDB may hold a resource_watch call without events
    full_sync_s: float = 3600.0     # every host read again this often (heals what a missed event left)


@dataclasses.dataclass(frozen=True)
class FileSourceConfig:
    """syncdata's `file` section: a JSON file of identities or a directory of *.json ("" = none), polled every
    `poll_s` seconds."""
    path: str = ""                  # a JSON file of identities, or a directory of *.json; "" = none
    poll_s: float = 2.0


@dataclasses.dataclass(frozen=True)
class SyncDataConfig(BaseConfig):
    """The syncdata daemon's config (deploy/syncdata.yaml): exactly one source (cmdb or file) and the pusher's timings
    (s) and batch size (agents per dbproxy and task server call)."""
    advertise_host: str = ""        # shown in ZooKeeper; "" = this host's address towards ZooKeeper
    cmdb: CmdbConfig = CmdbConfig()
    file: FileSourceConfig = FileSourceConfig()
    push_interval_s: float = 1.0    # pending agents are looked at this often
    offline_check_s: float = 5.0    # an offline agent's session is looked at again after this
    retry_base_s: float = 5.0       # an unconfirmed push is sent again after this, doubling ...
    retry_max_s: float = 300.0      # ... up to this
    full_check_s: float = 300.0     # every identity checked against its host's file this often
    batch_size: int = 2000          # agents per dbproxy call and per task server call
    taskserver_timeout_s: float = 30.0
    dbproxy: DbProxyClientConfig = DbProxyClientConfig()

    def validate(self) -> None:
        """ConfigError when TLS material is missing, not exactly one source is configured, the CMDB source lacks its
        app code or secret, a push timing is not positive or retry_max_s < retry_base_s, or batch_size is below 1."""
        self.tls.require()          # (no listen address: nothing dials syncdata)
        if bool(self.cmdb.url) == bool(self.file.path):
            raise ConfigError("configure exactly one source: cmdb.url or file.path")
        if self.cmdb.url and not (self.cmdb.app_code and self.cmdb.app_secret):
            raise ConfigError("cmdb.app_code and cmdb.app_secret are required with cmdb.url")
        if min(self.push_interval_s, self.offline_check_s, self.retry_base_s, self.full_check_s) <= 0 \
                or self.retry_max_s < self.retry_base_s:
            raise ConfigError("the push timings must be positive, with retry_base_s <= retry_max_s")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")


class SyncDataService(Service):
    """The syncdata daemon (`python -m gse.syncdata`, spec section 11): instances contend for leadership; the leader
    keeps every agent's host identity file current from its source."""
    name = "syncdata"

    def __init__(self, config: SyncDataConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.db = DbClient(self.tls, config.dbproxy.addresses, config.dbproxy.timeout_s)
        self.peers = Peers(self.tls)
        self.ip = config.advertise_host or route_ip(config.zookeeper.hosts.split(",")[0])
        self._node_id = config.node_id or f"{self.ip}-{os.getpid()}"
        c = config
        self.pusher = Pusher(self.db, self.peers, PushPolicy(
            push_interval_s=c.push_interval_s, offline_check_s=c.offline_check_s, retry_base_s=c.retry_base_s,
            retry_max_s=c.retry_max_s, full_check_s=c.full_check_s, batch_size=c.batch_size,
            rpc_timeout_s=c.taskserver_timeout_s))
        self.cmdb: CmdbClient | None = None
        if c.cmdb.url:
            self.cmdb = CmdbClient(c.cmdb.url, c.cmdb.app_code, c.cmdb.app_secret, c.cmdb.username,
                                   c.cmdb.supplier_account, c.cmdb.timeout_s)
            self.source = CmdbSource(self.cmdb, self.db, c.cmdb.full_sync_s, c.cmdb.watch_hold_s)
        else:
            self.source = FileSource(c.file.path, c.file.poll_s)
        self.leadership: Leadership | None = None

    @property
    def node_id(self) -> str:
        """node_id from the config, else `<ip>-<pid>` (it listens on no port but /healthz)."""
        return self._node_id

    def health(self):
        """(ok, detail) for /healthz: ok once it contends, with ZooKeeper connected and a dbproxy known; the detail
        says whether it leads, its source, and the hosts known, pending and unresolved with the pusher's and source's
        counters."""
        ok = self.leadership is not None and self.discovery.connected and bool(self.db.addresses)
        return ok, {"service": self.name, "node_id": self.node_id,
                    "leader": bool(self.leadership and self.leadership.leading), "source": self.source.name,
                    "zookeeper": self.discovery.connected, "dbproxies": self.db.addresses,
                    "hosts": len(self.pusher.known), "pending": len(self.pusher.due),
                    "unresolved": len(self.pusher.unresolved), **self.pusher.stats,
                    "source_stats": self.source.stats}

    async def start(self) -> None:
        """Start /healthz and ZooKeeper, follow the dbproxies (unless configured) and the task servers, and register
        `<root>/syncdata/<node_id>`; contending starts in run()."""
        await super().start()
        c = self.config
        await self.discovery.start()
        if not c.dbproxy.addresses:
            await self.discovery.watch_service("dbproxy", self.db.on_view)
        await self.discovery.watch_service("taskserver", self.peers.on_taskservers)
        self.leadership = Leadership(self.discovery, self.name, self.node_id)
        await self.discovery.register(self.name, self.node_id, {
            "metrics": join_host_port(c.metrics.host, self.ops.port), "ip": self.ip, "source": self.source.name})
        log.info("syncdata contending for leadership", extra={"node_id": self.node_id, "source": self.source.name})

    async def lead(self) -> None:
        """While leading: the source and the pusher, together (either failing restarts both)."""
        self.pusher.due.clear()
        self.pusher.known.clear()
        async with asyncio.TaskGroup() as tg:      # one failing cancels the other
            tg.create_task(self.source.run(self.pusher))
            tg.create_task(self.pusher.run())

    async def run(self) -> None:
        """Contend for leadership for ever; while leading, run the source and the pusher together (see lead())."""
        await self.leadership.run(self.lead)

    async def stop(self, grace: float) -> None:
        """Give up leadership (source and pusher stop), leave ZooKeeper, close the CMDB, task server and dbproxy
        clients, then /healthz."""
        if self.leadership is not None:
            await self.leadership.stop()
        await self.discovery.stop()
        if self.cmdb is not None:
            await self.cmdb.close()
        await self.peers.close()
        await self.db.close()
        await super().stop(grace)

"""The alarm daemon: two or more instances, one elected leader that reports lost agents (spec section 10).

Every instance registers `<root>/alarm/<node-id>` and contends in the election `<root>/election/alarm`
(kazoo's Election recipe, gse.common.discovery.Leadership). Only the leader works (gse/alarm/lost.py): it
reads the agents' session records through dbproxy in batches and sends agent-lost records on DataID 1000
through a data server. When the leader dies, another is elected within the ZooKeeper session timeout and
goes on from what the last one reported (kept through dbproxy).

Process failures (type 101, from the agents' supervision) and ping alarms (type 8, from the proxies) are
records of the same shape, built by the same builder (gse/common/alarmrecord.py) and sent on the same
DataID by whoever sees them; the data path routes all of them alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from gse.common.address import join_host_port, route_ip
from gse.common.alarmrecord import DATAID_ALARM
from gse.common.config import ConfigError, DbProxyClientConfig
from gse.common.datasend import DataSender
from gse.common.dbclient import DbClient
from gse.common.discovery import Discovery, Leadership
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial

from .lost import LostAgents, LostPolicy

log = logging.getLogger("gse.alarm")


@dataclasses.dataclass(frozen=True)
class AlarmConfig(BaseConfig):
    """The alarm daemon's config (deploy/alarm.yaml): when an agent counts as lost and how often and how long it is
    reported (s; spec section 10: every minute for 24 h), how many sessions are read per dbproxy call and records sent
    per batch, the DataID (1000) and the area whose data servers carry the records."""
    advertise_host: str = ""            # the `server` IP in the records; "" = the address towards ZooKeeper
    area: int = 0                       # the data servers of this area carry the records
    scan_interval_s: float = 10.0       # the leader reads every session this often
    lost_grace_s: float = 30.0          # offline (or past its heartbeat deadline) this long before reported
    report_interval_s: float = 60.0     # one record per lost agent this often ...
    report_for_s: float = 86400.0       # ... for this long after the loss
    batch_size: int = 2000              # sessions read per dbproxy call
    records_per_batch: int = 500        # records per batch to the data server
    data_id: int = DATAID_ALARM         # the channel of the records (the monitoring platform reads 1000)
    send_timeout_s: float = 10.0        # a data server must acknowledge a batch within this
    dbproxy: DbProxyClientConfig = DbProxyClientConfig()

    def validate(self) -> None:
        """ConfigError when TLS material is missing, an interval is not positive, scan_interval_s exceeds
        report_interval_s, lost_grace_s is negative, or a batch size is below 1."""
        self.tls.require()              # (no listen address: nothing dials the alarm daemon)
        if self.scan_interval_s <= 0 or self.report_interval_s <= 0 or self.report_for_s <= 0:
            raise ConfigError("scan_interval_s, report_interval_s and report_for_s must be positive")
        if self.scan_interval_s > self.report_interval_s:
            raise ConfigError("scan_interval_s must not exceed report_interval_s (a minute would be skipped)")
        if self.lost_grace_s < 0:
            raise ConfigError("lost_grace_s must not be negative")
        if self.batch_size < 1 or self.records_per_batch < 1:
            raise ConfigError("batch_size and records_per_batch must be at least 1")


class AlarmService(Service):
    """The alarm daemon (`python -m gse.alarm`, spec section 10): instances contend for leadership; the leader reports
    lost agents on DataID 1000 through the data servers."""
    name = "alarm"

    def __init__(self, config: AlarmConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.db = DbClient(self.tls, config.dbproxy.addresses, config.dbproxy.timeout_s)
        self.ip = config.advertise_host or route_ip(config.zookeeper.hosts.split(",")[0])
        self._node_id = config.node_id or f"{self.ip}-{os.getpid()}"
        self.sender = DataSender(self.tls, f"gse-alarm-{self.node_id}", self.ip, config.area,
                                 config.send_timeout_s)
        c = config
        policy = LostPolicy(grace_ms=int(c.lost_grace_s * 1000), interval_ms=int(c.report_interval_s * 1000),
                            report_for_ms=int(c.report_for_s * 1000))
        self.lost = LostAgents(self.db, self.sender, policy, server_ip=self.ip, scan_interval_s=c.scan_interval_s,
                               batch_size=c.batch_size, records_per_batch=c.records_per_batch, data_id=c.data_id)
        self.leadership: Leadership | None = None

    @property
    def node_id(self) -> str:
        """node_id from the config, else `<ip>-<pid>` (no port: the daemon listens on none but /healthz)."""
        return self._node_id

    def health(self):
        """(ok, detail) for /healthz: ok once it contends, with ZooKeeper connected and a dbproxy known; the detail
        says whether it leads, the dbproxies and data servers it uses and the lost-agent counters."""
        ok = self.leadership is not None and self.discovery.connected and bool(self.db.addresses)
        return ok, {"service": self.name, "node_id": self.node_id, "leader": bool(self.leadership and
                                                                                 self.leadership.leading),
                    "zookeeper": self.discovery.connected, "dbproxies": self.db.addresses,
                    "data_servers": sorted(self.sender.servers), **self.lost.stats}

    async def start(self) -> None:
        """Start /healthz and ZooKeeper, follow the dbproxies (unless configured) and the data servers, and register
        `<root>/alarm/<node_id>`; contending starts in run()."""
        await super().start()
        c = self.config
        await self.discovery.start()
        if not c.dbproxy.addresses:
            await self.discovery.watch_service("dbproxy", self.db.on_view)
        await self.discovery.watch_service("dataserver", self.sender.on_view)
        self.leadership = Leadership(self.discovery, self.name, self.node_id)
        await self.discovery.register(self.name, self.node_id, {
            "metrics": join_host_port(c.metrics.host, self.ops.port), "ip": self.ip})
        log.info("alarm daemon contending for leadership", extra={"node_id": self.node_id})

    async def run(self) -> None:
        """Contend for leadership for ever; while leading (and connected), scan the sessions and report lost agents
        (gse/alarm/lost.py)."""
        await self.leadership.run(self.lost.lead)

    async def stop(self, grace: float) -> None:
        """Give up leadership (the scan stops), leave ZooKeeper, close the data sender and dbproxy client, then
        /healthz."""
        if self.leadership is not None:
            await self.leadership.stop()
        await self.discovery.stop()
        await self.sender.close()
        await self.db.close()
        await super().stop(grace)

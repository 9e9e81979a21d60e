"""The proxy daemon (PA, spec section 12): what the hosts of a cloud area reach instead of the servers.

One proxy serves one area (`area`, the bk_cloud_id; its certificate names the same area). Its relays:

| relay | port | what |
|---|---|---|
| agent access | 28668 | the area's agent links, relayed over `upstream.links` links to task servers (or the parent area's proxy) |
| data | 28625 | agents' data batches: spooled on the proxy's disk, forwarded to data servers, acknowledged end to end |
| files | 28925, tracker 20030 | a file entering the area is fetched once, cached and seeded inside it with the area's own tracker |

It also pings the area's hosts (chunks of 50, 20 s timeout) and reports the unreachable as type-8 alarms
on DataID 1000 through its data relay. Several proxies may serve one area: agents list them all and fail
over between them; each proxy pings its share of the hosts.

The proxy host also runs an agent, in proxy mode (`run_mode: 0`), dialling this proxy like the area's other
hosts. The proxy registers in ZooKeeper (`/gse/proxy/<node_id>`, with its area and addresses) when it can
reach it (`register`); the cluster also knows it from its upstream links (gse.common.records.ProxyRecord).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket

from gse import __version__
from gse.common import framelink, roles, rpc
from gse.common.address import join_host_port
from gse.common.config import ConfigError
from gse.common.discovery import Discovery
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial
from gse.pb import agent_pb2 as pb

from .access import AreaAccess, UpstreamConfig
from .data import DataRelay, ProxyDataConfig
from .files import FileRelay, ProxyFilesConfig
from .reach import PingConfig, Reachability

log = logging.getLogger("gse.proxy")


@dataclasses.dataclass(frozen=True)
class ProxyConfig(BaseConfig):
    """The proxy's config (deploy/proxy.yaml): the area it serves (bk_cloud_id > 0, as its certificate says), where
    its area's hosts reach it, whether it registers in ZooKeeper, and the sections of its upstream links, data relay,
    pinging and file relay."""
    area: int = 1                       # the cloud area (bk_cloud_id) served; the certificate names the same
    host: str = "127.0.0.1"             # where the area's hosts reach this proxy
    advertise_host: str = ""            # what they dial ("" = host)
    agent_port: int = 28668
    data_dir: str = "/var/lib/gse/proxy"
    register: bool = True               # register in ZooKeeper (false: a proxy that cannot reach it)
    hello_timeout_s: float = 10.0       # a link that sends no hello within this is cut
    enroll: bool = True                 # relay enrollments of agents without a certificate to a task server
    upstream: UpstreamConfig = UpstreamConfig()
    data: ProxyDataConfig = ProxyDataConfig()
    ping: PingConfig = PingConfig()
    files: ProxyFilesConfig = ProxyFilesConfig()
    load_report_interval_s: float = 5.0

    def validate(self) -> None:
        """ConfigError when the TLS material or an advertise_host for a wildcard host is missing, area is not
        1..2^31-1, or hello_timeout_s is not positive."""
        super().validate()
        if not 0 < self.area < 2**31:
            raise ConfigError("area must be a bk_cloud_id above 0 (area 0 reaches the servers directly)")
        if self.hello_timeout_s <= 0:
            raise ConfigError("hello_timeout_s must be positive")


class ProxyService(Service):
    """The proxy daemon (`python -m gse.proxy`, spec section 12): agent access, data and file relays and pinging for
    one cloud area. Constructing it raises ConfigError unless tls.cert is a proxy certificate naming `area`."""
    name = "proxy"

    def __init__(self, config: ProxyConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        ident = self.tls.identity()
        if ident.role != roles.PROXY or ident.area != config.area:
            raise ConfigError(f"tls.cert must be a proxy certificate for area {config.area} (it is role "
                              f"{ident.role or 'none'}, area {ident.area if ident.area >= 0 else 'none'}): "
                              f"gse certs issue --role proxy --area {config.area}")
        self.discovery = Discovery(config.zookeeper) if config.register else None
        self.deny = roles.DenyList()        # applied when ZooKeeper is reachable (the task servers check too)
        self.agent_sock = None
        self.agent_port = 0
        self.access: AreaAccess | None = None
        self.grpc = None
        self.data_port = 0
        self.data: DataRelay | None = None
        self.reach: Reachability | None = None
        self.files: FileRelay | None = None
        self.file_port = 0
        self.tracker_url = ""

    @property
    def main_port(self) -> int:
        """The agent port (bound once started, else the configured one): what names the proxy when no node_id is
        set."""
        return self.agent_port or self.config.agent_port

    def hello(self) -> pb.ProxyHello:
        """The ProxyHello this proxy opens each upstream link with: node id, area, the addresses its area's agents are
        told (agent, data, file relay, tracker URL), version, a fresh boot id, ip and hostname."""
        c = self.config
        return pb.ProxyHello(node_id=self.node_id, area=c.area,
                             agent_address=join_host_port(self.advertise, self.agent_port),
                             data_address=join_host_port(self.advertise, self.data_port),
                             file_address=join_host_port(self.advertise, self.file_port) if self.file_port else "",
                             tracker_url=self.tracker_url,
                             version=__version__, boot_id=random.getrandbits(62), ip=self.advertise,
                             hostname=socket.gethostname())

    def health(self):
        """/healthz: up once an upstream link is live; the detail names the agent, data and file addresses the
        area's agents are told, with each relay's own figures (before start: only the names)."""
        detail = {"service": self.name, "node_id": self.node_id, "area": self.config.area}
        if self.access is None:
            return False, detail
        up = bool(self.access.live)
        detail.update(self.access.health())
        hello = self.access.proxy_hello
        if self.data is not None:
            detail["data"] = {"address": hello.data_address, **self.data.health()}
        if self.reach is not None:
            detail["ping"] = self.reach.health()
        if self.files is not None:
            detail["files"] = {"address": hello.file_address, **self.files.health()}
        return up, detail

    def _registration(self) -> dict:
        h = self.access.proxy_hello
        return {"area": self.config.area, "agent_address": h.agent_address, "data_address": h.data_address,
                "file_address": h.file_address, "tracker_url": h.tracker_url, "load": self.access.agent_count,
                "metrics": join_host_port(self.config.metrics.host, self.ops.port)}

    async def start(self) -> None:
        """Start /healthz and, when registering, ZooKeeper (following the revocations); bind the agent, data and file
        ports; start the file relay (tracker, BitTorrent), the data relay's lanes and the gRPC server; then serve the
        agent port, open the upstream links and register in ZooKeeper."""
        await super().start()
        c = self.config
        if self.discovery is not None:
            await self.discovery.start()
            await self.discovery.watch_config("revoked", self.deny.apply)
        self.agent_sock = framelink.bind(c.host, c.agent_port)
        self.agent_port = self.agent_sock.getsockname()[1]
        # The data relay first: agents are told its address as soon as they attach.
        self.grpc = rpc.make_server(self.tls, deny=self.deny)
        self.data_port = rpc.bind(self.grpc, self.tls, c.host, c.data.port)
        if c.files.enabled:
            # The file relay: its file service on its own port (the same gRPC server), its tracker, BitTorrent.
            self.file_port = rpc.bind(self.grpc, self.tls, c.host, c.files.port)
            self.files = FileRelay(c.files, data_dir=c.data_dir, tls=self.tls, host=c.host, advertise=self.advertise,
                                   node_id=self.node_id, area=c.area)
            await self.files.start(self.grpc)
            self.tracker_url = self.files.tracker_url
        self.access = AreaAccess(node_id=self.node_id, area=c.area, tls=self.tls, server_name=c.tls.server_name,
                                 upstream=c.upstream, hello=self.hello(), hello_timeout_s=c.hello_timeout_s,
                                 enroll=c.enroll, deny=self.deny)
        self.data = DataRelay(c.data, data_dir=c.data_dir, tls=self.tls, node_id=self.node_id, area=c.area,
                              ip=self.advertise, access=self.access)
        self.grpc.add_generic_rpc_handlers((self.data.handler(),))
        health = rpc.add_health(self.grpc)
        await self.grpc.start()
        await rpc.set_serving(health, True)
        await self.data.start()
        self.access.on_upstream_view = self.data.on_view
        self.reach = Reachability(c.ping, node_id=self.node_id, area=c.area, ip=self.advertise, submit=self.data.submit)
        self.access.on_area_hosts = self.reach.on_area_hosts
        if self.files is not None:
            self.access.on_control = self.files.on_control
        self.access.data_view = pb.ServerFrame(data_servers=self.data.view_frame(
            self.access.proxy_hello.data_address)).SerializeToString()
        await self.access.listen(self.agent_sock)
        self.access.start()
        if self.discovery is not None:
            await self.discovery.register(self.name, self.node_id, self._registration())
        log.info("proxy serving", extra={"area": c.area, "agent_port": self.agent_port, "node_id": self.node_id})

    async def run(self) -> None:
        """Run the pinging rounds, the load update in ZooKeeper every `load_report_interval_s` and the file relay's
        expiry of abandoned transfers, until cancelled."""
        await asyncio.gather(self.reach.run(), self._report_load(), *([self.files.run()] if self.files else []))

    async def _report_load(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_report_interval_s)
            if self.discovery is not None:
                await self.discovery.update(self.name, self.node_id, self._registration())

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper, close the agent links and upstream links, stop the gRPC server within `grace` seconds,
        stop the data relay's lanes (what is unacknowledged stays spooled) and the file relay, then /healthz."""
        if self.discovery is not None:
            await self.discovery.stop()
        if self.access is not None:
            await self.access.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self.data is not None:
            await self.data.stop()
        if self.files is not None:
            await self.files.stop()
        await super().stop(grace)

"""The task server daemon: agent access point (48668), session keeper, balancer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from prometheus_client import Gauge

from gse.common import framelink, roles, rpc
from gse.common.address import join_host_port
from gse.common.config import ConfigError, DbProxyClientConfig
from gse.common.dbclient import DbClient
from gse.common.discovery import Discovery
from gse.common.peers import Peers
from gse.common.service import BaseConfig, Service, advertised_host
from gse.common.enrollment import TokenStore
from gse.common.tls import CA, CertError, TLSMaterial
from gse.common.workers import MAX_WORKERS
from gse.pb import taskserver_pb2 as task_pb
from gse.pb import taskserver_pb2_grpc as task_pb_grpc

from .agent_access import AgentAccess
from .balancer import Balancer
from .batch_writer import BatchWriter
from .data_relay import DataRelay
from .enroll import EnrollConfig, Enroller
from .files import FileCoordinator, FileReports
from .fleet import Fleet
from .identity import AgentIdentity
from .procs import ProcAckBatcher, ProcReports
from .tasks import AckBatcher, ResultRecorder, TaskClock, TaskService

log = logging.getLogger("gse.taskserver")

AREA_AGENTS = Gauge("gse_taskserver_agents_online", "Agents attached here, by the area (bk_cloud_id) served",
                    ["area"])


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """The `balance` section: whether agents are balanced across the task servers of the area, the margin a difference
    must exceed (`slack` agents and `ratio` of the local load), how often (s) and how many agents at most are shed per
    round. Applied live on SIGHUP."""
    enabled: bool = True
    slack: int = 50                 # never balance over a difference smaller than this many agents
    ratio: float = 0.1              # ... or than this share of the local load
    rebalance_interval_s: float = 30.0
    max_shed_per_round: int = 500


@dataclasses.dataclass(frozen=True)
class TaskServerConfig(BaseConfig):
    """The task server's configuration (deploy/taskserver.yaml explains every key): the agent (48668) and internal
    task (48669) ports, the area it serves, heartbeat, TTL and flush periods (s), write-queue and acknowledgement
    bounds, file limits (bytes), worker processes, and the balance, dbproxy and enroll sections."""
    host: str = "127.0.0.1"
    agent_port: int = 48668
    task_port: int = 48669              # internal task API (the API server dispatches here)
    advertise_host: str = ""            # what agents and peers dial; "" = host
    area: int = 0                       # the bk_cloud_id this server serves
    heartbeat_interval_s: float = 10.0
    heartbeat_misses: int = 3
    hello_timeout_s: float = 10.0
    session_ttl_s: float = 7 * 86400
    result_ttl_s: float = 86400         # task results and output
    file_direct_max: int = 10 * 1024    # files up to this size go direct through the file server
    file_max_size: int = 64 * 1024**3   # larger source files are refused (error 119)
    flush_interval_s: float = 0.01      # least time between two batch writes to dbproxy (group commit)
    write_queue_max: int = 200_000      # writes waiting for dbproxy beyond this: agent links are not read until
                                        # a quarter of it is left (results stay on the agents meanwhile)
    ack_quiet_s: float = 0.2            # result acknowledgements go out once reports were quiet this long...
    ack_max_delay_s: float = 2.0        # ... or when the oldest waiting one is this old
    reconnect_rate: float = 1000.0      # agents/s a peer can take if this server fails (agents spread over load/rate)
    host_snapshot_interval_s: float = 60.0  # agents send their host snapshot this often (liveness at every heartbeat)
    load_report_interval_s: float = 2.0
    data_view_interval_s: float = 30.0  # data server loads are told to agents at most this often
    area_hosts_interval_s: float = 60.0 # proxies are told the hosts of their area (they ping them) this often
    workers: int = 1                    # processes sharing agent_port (SO_REUSEPORT) under one supervisor
    balance: BalanceConfig = BalanceConfig()
    dbproxy: DbProxyClientConfig = DbProxyClientConfig()
    enroll: EnrollConfig = EnrollConfig()   # agents enrolling with one-time tokens (needs the CA's key)

    def validate(self) -> None:
        """ConfigError for a non-positive heartbeat interval, fewer than one heartbeat miss, a negative snapshot
        interval or reconnect rate, ack delays outside 0 <= quiet <= max <= 60, a write queue under 100, workers
        outside 1..MAX_WORKERS, or workers > 1 on agent port 0."""
        super().validate()
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("heartbeat_interval_s must be positive")
        if self.heartbeat_misses < 1:
            raise ConfigError("heartbeat_misses must be at least 1")
        if self.host_snapshot_interval_s < 0:
            raise ConfigError("host_snapshot_interval_s must be >= 0 (0: with every heartbeat)")
        if self.reconnect_rate < 0:
            raise ConfigError("reconnect_rate must be >= 0 (0: agents are told no spread)")
        if not 0 <= self.ack_quiet_s <= self.ack_max_delay_s <= 60:
            raise ConfigError("need 0 <= ack_quiet_s <= ack_max_delay_s <= 60")
        if self.write_queue_max < 100:
            raise ConfigError("write_queue_max must be at least 100")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be 1..{MAX_WORKERS}")
        if self.workers > 1 and self.agent_port == 0:
            raise ConfigError("agent_port cannot be 0 (any free port) with workers > 1: the workers share it")


class TaskServerService(Service):
    """The task server daemon (spec §6: agents on 48668, the internal task API on 48669): holds agent sessions and
    records what they report, dispatches the API server's tasks, coordinates transfers, relays data-path views and
    plugin messages, and balances agents with its peers."""
    name = "taskserver"

    def __init__(self, config: TaskServerConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.db = DbClient(self.tls, config.dbproxy.addresses, config.dbproxy.timeout_s)
        self.task_server = None
        self.agent_port = 0
        self.agent_sock = None
        self.task_port = 0
        self.access: AgentAccess | None = None
        self.writer: BatchWriter | None = None
        self.balancer: Balancer | None = None
        self.peers = Peers(self.tls)
        self.files: FileCoordinator | None = None
        self.data_relay: DataRelay | None = None
        self.deny = roles.DenyList()        # <root>/config/revoked, applied live
        self.identity = AgentIdentity(self.node_id, self.deny, self.db, lambda: self.peers.taskservers.keys())
        self.enroller: Enroller | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    @property
    def main_port(self) -> int:
        """The agent port (bound, else configured): it names the task server."""
        return self.agent_port or self.config.agent_port

    @classmethod
    def group_node_id(cls, config: TaskServerConfig) -> str:
        """The node id of a task server run as workers: its workers are `<this>-w<i>`."""
        return config.node_id or f"{advertised_host(config)}-{config.agent_port}"

    @classmethod
    def worker_overrides(cls, config: TaskServerConfig, index: int) -> dict:
        """What makes worker `index` a task server of its own: node id, task and operations ports."""
        return {"node_id": f"{cls.group_node_id(config)}-w{index}",
                "task_port": config.task_port + index if config.task_port else 0,
                "metrics.port": config.metrics.port + 1 + index if config.metrics.port else 0}

    def health(self):
        """Healthy once agents are served, ZooKeeper is connected and a dbproxy is known; the detail counts the agents
        held."""
        ok = self.access is not None and self.discovery.connected and bool(self.db.addresses)
        return ok, {"service": self.name, "node_id": self.node_id, "agents": self.access.load if self.access else 0,
                    "zookeeper": self.discovery.connected, "dbproxies": self.db.addresses}

    def _registration(self) -> dict:
        return {"agent_address": join_host_port(self.advertise, self.agent_port),
                "task_address": join_host_port(self.advertise, self.task_port), "area": self.config.area,
                "load": self.access.load if self.access else 0,
                "metrics": join_host_port(self.config.metrics.host, self.ops.port)}

    async def start(self) -> None:
        """Trust first (revocations, agent auth), then the batch writer, the agent port, the internal task API and
        every frame handler, and only then agents; then follow peers, file and data servers and message slots, and
        register in ZooKeeper."""
        await super().start()
        c = self.config
        if c.enroll.enabled:
            try:
                ca = CA.load(c.enroll.ca_cert or c.tls.ca, c.enroll.ca_key)
            except CertError as exc:
                raise ConfigError(f"enroll: {exc}") from None
            self.enroller = Enroller(ca, TokenStore(self.discovery), self.deny, c.enroll.cert_days,
                                     c.enroll.max_pending)
        await self.discovery.start()
        # Trust first: revocations and the shared-certificate switch apply from the first agent link on.
        await self.discovery.watch_config("revoked", self.deny.apply)
        await self.discovery.watch_config("agent_auth", self.identity.apply_config)
        if not c.dbproxy.addresses:
            await self.discovery.watch_service("dbproxy", self.db.on_view)
        self.writer = BatchWriter(self.db, c.flush_interval_s, high_water=c.write_queue_max,
                                  low_water=c.write_queue_max // 4)
        self.acks = AckBatcher(self.writer, c.ack_quiet_s, c.ack_max_delay_s)
        self.clock = TaskClock()            # task creation times: result latency (gse_taskserver_task_result_seconds)
        # Workers of one machine share the agent port: the kernel spreads new agent connections across them.
        self.agent_sock = framelink.bind(c.host, c.agent_port, reuse_port=c.workers > 1)
        self.agent_port = self.agent_sock.getsockname()[1]
        self.identity.node_id = self.node_id            # final now that the agent port is bound
        self.balancer = Balancer(self.node_id, c.area, slack=c.balance.slack, ratio=c.balance.ratio,
                                 enabled=c.balance.enabled, agent_address=join_host_port(self.advertise, self.agent_port))
        ttl = int(c.result_ttl_s * 1000)
        host_every = max(1, round(c.host_snapshot_interval_s / c.heartbeat_interval_s))
        self.access = AgentAccess(self.node_id, self.advertise, self.agent_port, self.writer,
                                  session_ttl_ms=int(c.session_ttl_s * 1000),
                                  heartbeat_interval_s=c.heartbeat_interval_s, heartbeat_misses=c.heartbeat_misses,
                                  hello_timeout_s=c.hello_timeout_s, balancer=self.balancer,
                                  reconnect_rate=c.reconnect_rate, host_snapshot_every=host_every,
                                  on_report=ResultRecorder(self.writer, ttl, self.acks, self.clock).on_report,
                                  identity=self.identity, enroller=self.enroller, area=c.area)
        self.task_server = rpc.make_server(self.tls, deny=self.deny)
        self.task_port = rpc.bind(self.task_server, self.tls, c.host, c.task_port)
        self.files = FileCoordinator(self.node_id, self.access, self.writer, self.db, self.peers, ttl,
                                     c.file_direct_max, c.file_max_size)
        reports = FileReports(self.writer, ttl, self.acks)
        self.access.handlers.update({
            "file_manifest": lambda s, m: self._spawn(self.files.on_manifest(s, m)),
            "file_report": reports.on_report,
            "need_direct": self._need_direct,
            "source_changed": self._source_changed,
        })
        self.data_relay = DataRelay(self.access, c.area, c.data_view_interval_s)
        self.access.handlers["plugin_reply"] = self.data_relay.on_plugin_reply
        self.proc_acks = ProcAckBatcher(self.writer, c.ack_quiet_s, c.ack_max_delay_s)
        self.access.handlers["proc_report"] = ProcReports(self.writer, self.db, self.proc_acks).on_report
        self.access.on_attach = self.data_relay.on_attach
        self.access.relays.on_proxy_attach = self.data_relay.on_attach
        self.writer.on_pressure = self.access.on_pressure
        fleet = Fleet(self.access, self.writer)
        self.access.handlers.update({"host_identity_result": fleet.on_hostid_result,
                                     "operation_result": fleet.on_operation_result})
        task_pb_grpc.add_TaskServiceServicer_to_server(TaskService(self.access, self.files, self.clock),
                                                       self.task_server)
        task_health = rpc.add_health(self.task_server)
        await self.task_server.start()
        await rpc.set_serving(task_health, True)
        # Agents last: by now every frame they can send has its handler.
        await self.access.listen(self.tls, self.agent_sock)
        await self.discovery.watch_service(self.name, self._on_taskservers)
        await self.discovery.watch_service("fileserver", self.peers.on_fileservers)
        await self.discovery.watch_service("dataserver", self.data_relay.on_view)
        await self.discovery.watch_config("message_slots", self.data_relay.on_slots)
        await self.discovery.register(self.name, self.node_id, self._registration())
        log.info("task server serving",
                 extra={"agent_port": self.agent_port, "task_port": self.task_port, "node_id": self.node_id})

    def _on_taskservers(self, view: dict) -> None:
        self.balancer.on_view(view)
        self.peers.on_taskservers(view)

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def _need_direct(self, session, msg) -> None:
        if msg.coordinator == self.node_id:
            self.files.on_need_direct(msg.transfer_id, msg.index)
            return
        stub = self.peers.task(msg.coordinator)
        if stub is not None:
            self._spawn(stub.NeedDirect(task_pb.NeedDirectRequest(
                transfer_id=msg.transfer_id, index=msg.index, agent_id=session.agent_id), timeout=10))

    def _source_changed(self, session, msg) -> None:
        if msg.coordinator == self.node_id:
            self._spawn(self.files.on_source_changed(msg.transfer_id, msg.index, msg.error_msg))
            return
        stub = self.peers.task(msg.coordinator)
        if stub is not None:
            self._spawn(stub.SourceChanged(task_pb.SourceChangedRequest(
                transfer_id=msg.transfer_id, index=msg.index, agent_id=session.agent_id, error_msg=msg.error_msg),
                timeout=10))

    async def run(self) -> None:
        """Run the batch writer, the acknowledgement batchers, the session sweep, load reports, rebalancing and the
        transfer monitor until stopped."""
        self._tasks = [asyncio.ensure_future(t) for t in (
            self.writer.run(), self.acks.run(), self.access.sweep_loop(), self._report_load(), self._rebalance(),
            self.files.monitor(), self.proc_acks.run(),
            self.access.relays.area_hosts_loop(self.db, self.config.area_hosts_interval_s),
            self.discovery.refresh_loop(self.config.load_report_interval_s))]
        await asyncio.gather(*self._tasks)

    async def _report_load(self) -> None:
        area = AREA_AGENTS.labels(str(self.config.area))
        while True:
            await asyncio.sleep(self.config.load_report_interval_s)
            area.set(self.access.load)
            self.access.retune()
            await self.discovery.update(self.name, self.node_id, self._registration())

    async def _rebalance(self) -> None:
        while True:
            c = self.config.balance          # read every round: SIGHUP changes apply
            await asyncio.sleep(c.rebalance_interval_s)
            plan = self.balancer.shed_plan(self.access.load, c.max_shed_per_round)
            if not plan:
                continue
            # Shed the most recently attached agents: long-lived sessions stay where they are.
            # Agents relayed by proxies are not ours to send elsewhere: their proxies choose.
            newest = sorted((s for s in self.access.sessions.values() if not s.relayed), key=lambda s: s.connected_at,
                            reverse=True)
            pos = 0
            for address, n in plan:
                self.access.redirect(newest[pos:pos + n], address, "rebalance")
                pos += n
            log.info("rebalanced agents to peers", extra={"plan": plan})

    async def apply_reload(self, new: TaskServerConfig) -> None:
        """SIGHUP: apply the new `balance` section (the other keys wait for a restart)."""
        b = new.balance
        self.balancer.slack, self.balancer.ratio, self.balancer.enabled = b.slack, b.ratio, b.enabled

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper, stop the relays and loops, close every agent link, stop the task API within `grace`
        seconds, then write what is still queued and close the clients."""
        await self.discovery.stop()
        if self.data_relay is not None:
            await self.data_relay.close()
        for t in self._tasks:
            t.cancel()
        if self.access is not None:
            self.access.close_all()
        if self.task_server is not None:
            await self.task_server.stop(grace)
        if self.writer is not None:
            await self.writer.drain()
        await self.db.close()
        await self.peers.close()
        await super().stop(grace)

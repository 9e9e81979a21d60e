"""The API server daemon (HTTP, 50002)."""

from __future__ import annotations

import dataclasses
import logging

from aiohttp import web

from gse.common.address import join_host_port
from gse.common.config import ConfigError, DbProxyClientConfig
from gse.common.dbclient import DbClient
from gse.common.discovery import Discovery
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial

from .agent_endpoints import AgentEndpoints
from .agents_view import AgentsView
from .app import Api
from .command_guard import CommandGuard
from .data_endpoints import DataEndpoints
from .file_endpoints import FileEndpoints
from .proc_endpoints import ProcEndpoints, ProcMgrs
from .fleet_endpoints import FleetEndpoints
from .task_endpoints import TaskEndpoints
from .taskservers import TaskServers

log = logging.getLogger("gse.apiserver")


@dataclasses.dataclass(frozen=True)
class ApiServerConfig(BaseConfig):
    """The API server's configuration (deploy/apiserver.yaml explains every key): listen address, app credentials,
    per-call host limit, body limits (bytes), result TTL and offline grace (s) and the deadlines of calls to task
    servers and procmgr (s)."""
    host: str = "127.0.0.1"
    port: int = 50002
    advertise_host: str = ""
    # bk_app_code -> bk_app_secret. More apps can be added live under <zk root>/config/apps.
    apps: dict[str, str] = dataclasses.field(default_factory=dict)
    max_hosts_per_call: int = 5000
    max_body_bytes: int = 64 * 1024 * 1024
    # Without the X-Bkapi-Authorization header, credentials are looked for in at most this much of the body.
    max_auth_body_bytes: int = 1024 * 1024
    result_ttl_s: float = 86400              # task records written by the API server
    offline_grace_s: float = 30.0            # an unfinished item of an agent offline this long reads as 117
    taskserver_timeout_s: float = 10.0
    procmgr_timeout_s: float = 30.0          # deadline of one call to procmgr (process endpoints)
    agent_upgrade_dir: str = "/var/lib/gse/agent/upgrade"   # where operate_agent upgrades put the package on hosts
    dbproxy: DbProxyClientConfig = DbProxyClientConfig()

    def validate(self) -> None:
        """ConfigError unless max_hosts_per_call >= 1 and 1024 <= max_auth_body_bytes <= max_body_bytes."""
        super().validate()
        if self.max_hosts_per_call < 1:
            raise ConfigError("max_hosts_per_call must be at least 1")
        if not 1024 <= self.max_auth_body_bytes <= self.max_body_bytes:
            raise ConfigError("need 1024 <= max_auth_body_bytes <= max_body_bytes")
        if not self.agent_upgrade_dir.startswith("/") or ".." in self.agent_upgrade_dir.split("/"):
            raise ConfigError("agent_upgrade_dir must be an absolute path without '..'")


class ApiServerService(Service):
    """The API server daemon: the HTTP API of spec §1-§4 and §8 on 50002, over the task servers, procmgr, dbproxy and
    ZooKeeper's live configuration (apps, command rules, data routes)."""
    name = "apiserver"

    def __init__(self, config: ApiServerConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.db = DbClient(self.tls, config.dbproxy.addresses, config.dbproxy.timeout_s)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.api: Api | None = None
        self.tasks: TaskEndpoints | None = None
        self.taskservers = TaskServers(self.tls, config.taskserver_timeout_s)
        self.guard = CommandGuard()
        self.procmgrs = ProcMgrs(self.tls, config.procmgr_timeout_s)

    def apps(self) -> dict[str, str]:
        """The app credentials in force: bk_app_code -> bk_app_secret from the config file, overridden and extended
        live by ZooKeeper config/apps."""
        live = self.discovery.config("apps") or {}
        merged = dict(self.config.apps)
        if isinstance(live, dict):
            merged.update({k: v for k, v in live.items() if isinstance(k, str) and isinstance(v, str)})
        return merged

    def health(self):
        """Healthy while the HTTP site runs, ZooKeeper is connected and at least one dbproxy is known."""
        ok = self.runner is not None and self.discovery.connected and bool(self.db.addresses)
        return ok, {"service": self.name, "node_id": self.node_id, "zookeeper": self.discovery.connected,
                    "dbproxies": self.db.addresses}

    def build_api(self) -> Api:
        """The routing table with every endpoint module registered on it."""
        api = Api(self.apps, self.config.max_body_bytes, self.config.max_auth_body_bytes)
        c = self.config
        view = AgentsView(self.db)
        AgentEndpoints(view, c.max_hosts_per_call).register(api)
        DataEndpoints(view, self.taskservers, self.discovery, max_hosts=c.max_hosts_per_call).register(api)
        tasks = TaskEndpoints(view, self.taskservers, self.guard, max_hosts=c.max_hosts_per_call,
                              result_ttl_ms=int(c.result_ttl_s * 1000),
                              offline_grace_ms=int(c.offline_grace_s * 1000))
        tasks.register(api)
        self.tasks = tasks
        files = FileEndpoints(tasks)
        files.register(api)
        FleetEndpoints(view, self.taskservers, self.discovery, files, max_hosts=c.max_hosts_per_call,
                       upgrade_dir=c.agent_upgrade_dir).register(api)
        ProcEndpoints(self.procmgrs, c.max_hosts_per_call).register(api)
        return api

    async def start(self) -> None:
        """Follow ZooKeeper (apps, command rules, task servers, procmgr, dbproxies), serve HTTP, start the
        body-parsing worker, then register in ZooKeeper with the URL and metrics address."""
        await super().start()
        c = self.config
        await self.discovery.start()
        await self.discovery.watch_config("apps")
        await self.discovery.watch_config("command_rules", self.guard.apply_config)
        await self.discovery.watch_config("agent_packages")
        await self.discovery.watch_service("taskserver", self.taskservers.on_view)
        await self.discovery.watch_service("procmgr", self.procmgrs.on_view)
        if not c.dbproxy.addresses:
            await self.discovery.watch_service("dbproxy", self.db.on_view)
        self.api = self.build_api()
        self.runner = web.AppRunner(self.api.make_app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, c.host, c.port, backlog=1024)
        await site.start()
        self.port = self.runner.addresses[0][1]
        await self.api.bodies.start()       # the body-parsing worker, before anyone is told to come
        await self.discovery.register(self.name, self.node_id, {
            "url": f"http://{join_host_port(c.advertise_host or c.host, self.port)}",
            "metrics": join_host_port(c.metrics.host, self.ops.port)})
        log.info("api server serving", extra={"port": self.port})

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper, stop serving HTTP, then close the background work, the parsing worker, the command-check
        threads and every client."""
        await self.discovery.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.tasks is not None:
            await self.tasks.close()
        if self.api is not None:
            self.api.bodies.close()
        self.guard.close()
        await self.db.close()
        await self.taskservers.close()
        await self.procmgrs.close()
        await super().stop(grace)

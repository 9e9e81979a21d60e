"""The agent: one per host. Holds one link to a task server (gse/common/framelink.py) and heartbeats over it.

Its identity: the `bk_agent_id` its certificate names (`gse://agent/<id>`), else the one it made once
(32 hex characters) and keeps in its data dir. An agent without a certificate of its own enrolls once
before anything else: it makes its key on the host (written 0600 from its first byte; the key never
leaves the host), sends a certificate request with the one-time token its node manager gave it
(`enroll.token` or `enroll.token_file`, removed once used) to a task server, and keeps the certificate it
gets back (gse/taskserver/enroll.py is the other side).

It connects to one of the configured task servers, follows redirects to less loaded peers, and fails over
to another server with jittered exponential backoff (full jitter: no thundering herd when a server with
thousands of agents dies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import platform
import random
import socket
import time
import uuid
import zlib
from pathlib import Path

import psutil
from google.protobuf.message import DecodeError

from gse import __version__
from gse.common import framelink, roles
from gse.common.address import route_ip, split_host_port, valid_agent_id
from gse.common.backoff import Backoff
from gse.common.config import ConfigError, LogConfig, MetricsConfig, TLSConfig, check_addresses
from gse.common.safefile import write_private, write_public
from gse.common.screen import check_code_page
from gse.common.service import LiteOpsServer, Service
from gse.common.tls import TLSMaterial, make_csr, new_key, pem_key
from gse.pb import agent_pb2 as pb

from .data import DataConfig, DataPipeline
from .executor import Pools
from .files import FileManager
from .procs import ProcConfig, ProcManager
from .hostid import DEFAULT_PATH as HOSTID_PATH, HostIdentityFile
from .operations import Operations
from .upgrade import confirm_on_attach
from .tasks import TaskManager

log = logging.getLogger("gse.agent")

REDIRECT_COOLDOWN_S = 60.0


@dataclasses.dataclass(frozen=True)
class ReconnectConfig:
    """The agent's `reconnect` section: full-jitter back-off between task server links (seconds): the first window
    `base_s`, doubling up to `max_s`; a link that lasted `stable_s` resets it."""
    base_s: float = 1.0        # the first retry waits up to this long (uniformly random)
    max_s: float = 30.0        # the retry window doubles up to this
    stable_s: float = 10.0     # a session that lasted this long resets the backoff

    def validate(self) -> None:
        """ConfigError unless 0 < base_s <= max_s."""
        if not 0 < self.base_s <= self.max_s:
            raise ConfigError("reconnect: need 0 < base_s <= max_s")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The agent's `tasks` section: how many scripts, file and process operations run at once and how many wait (more
    are refused as busy), the output kept per item (bytes), the TERM-to-KILL grace (s), the host's code page and how
    long a user's login environment is reused (s)."""
    pool_script: int = 16          # scripts running at once
    pool_file: int = 8             # file operations at once
    pool_proc: int = 8             # process operations at once
    queue_limit: int = 256         # waiting tasks per kind beyond the pool; more is refused as busy
    max_output_bytes: int = 10 * 1024 * 1024    # per item; beyond it the output is truncated and says so
    kill_grace_s: float = 3.0      # TERM, then KILL after this long
    # The encoding commands write on this host (the original agent's task.host_code_page_name): output is
    # converted from it to UTF-8, undecodable bytes escaped (gse/common/screen.py).
    host_code_page_name: str = "utf8"
    # Each user's login environment is captured once and reused for this long (and redone at once when a profile
    # file changes); 0 sources the profiles for every command instead (gse/agent/executor.py).
    login_env_max_age_s: float = 600.0

    def validate(self) -> None:
        """ConfigError when a pool is below 1, queue_limit or login_env_max_age_s is negative, or the code page is
        unknown."""
        if min(self.pool_script, self.pool_file, self.pool_proc) < 1 or self.queue_limit < 0:
            raise ConfigError("tasks: pools must be at least 1 and queue_limit not negative")
        if self.login_env_max_age_s < 0:
            raise ConfigError("tasks.login_env_max_age_s must not be negative")
        try:
            check_code_page(self.host_code_page_name)
        except ValueError as exc:
            raise ConfigError(f"tasks.host_code_page_name: {exc}") from None


@dataclasses.dataclass(frozen=True)
class FileConfig:
    """The agent's `files` section: its BitTorrent port range, when a stalled or corrupt swarm falls back to direct
    mode (seconds, failed pieces) and how often a source re-checks what it serves (s)."""
    bt_port: int = 60020            # BitTorrent listen port (the next free one up to bt_port_max)
    bt_port_max: int = 60030
    bt_stall_s: float = 20.0        # no BitTorrent progress for this long: switch to direct mode
    bt_max_hash_failures: int = 8   # ... or this many pieces failed their hash check (then for good)
    source_check_s: float = 1.0     # a source checks the files it serves for changes this often (0 = never)

    def validate(self) -> None:
        """ConfigError unless 0 < bt_port <= bt_port_max < 65536 and source_check_s >= 0."""
        if not 0 < self.bt_port <= self.bt_port_max < 65536:
            raise ConfigError("files: need 0 < bt_port <= bt_port_max < 65536")
        if self.source_check_s < 0:
            raise ConfigError("files: source_check_s must not be negative")


@dataclasses.dataclass(frozen=True)
class EnrollmentConfig:
    """Used only while tls.cert does not exist: the agent enrolls once with this one-time token."""
    token: str = ""              # the token itself (`gse certs token`), or
    token_file: str = ""         # a file holding it (the node manager writes it at install; removed once used)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The agent's whole config (deploy/agent.yaml): where it keeps data and sockets, the task servers (host:port) it
    dials, its area (bk_cloud_id) and ip, run_mode (1 agent, 0 a proxy's own agent, spec section 4), and the sections
    of each part."""
    data_dir: str = "/var/lib/gse/agent"
    run_dir: str = "/var/run/gse"
    servers: tuple[str, ...] = ("127.0.0.1:48668",)
    cloud_id: int = 0
    ip: str = ""                 # "" = the bind address, else the address that routes to the first server
    bind_ip: str = ""            # leave from this local address (several agents on one machine)
    hostname: str = ""           # "" = the machine's
    run_mode: int = 1            # 1 agent, 0 proxy
    hostid_path: str = HOSTID_PATH   # the host identity file syncdata keeps current (spec section 11)
    heartbeat_interval_s: float = 10.0   # until the task server says otherwise
    connect_timeout_s: float = 10.0
    reconnect: ReconnectConfig = ReconnectConfig()
    tasks: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()      # plugin data: IPC sockets, batching, spool, data servers
    files: FileConfig = FileConfig()
    procs: ProcConfig = ProcConfig()     # process supervision and plugin auto-load
    tls: TLSConfig = TLSConfig()
    enroll: EnrollmentConfig = EnrollmentConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    stop_grace_s: float = 5.0

    def validate(self) -> None:
        """ConfigError when tls.ca, cert or key is not set, there is no task server or one is not host:port, the
        heartbeat interval is not positive, run_mode is not 0 or 1, or cloud_id is negative. (The sections validate
        themselves when loaded.)"""
        self.tls.require()
        if not self.servers:
            raise ConfigError("servers: at least one task server address (host:port) is required")
        check_addresses("servers", self.servers)
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("heartbeat_interval_s must be positive")
        if self.run_mode not in (0, 1):
            raise ConfigError("run_mode must be 1 (agent) or 0 (proxy)")
        if self.cloud_id < 0:
            raise ConfigError("cloud_id must not be negative")


def load_or_create_agent_id(data_dir: str | os.PathLike) -> str:
    """The agent's identity: made once, kept in `data_dir/agent_id`."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "agent_id"
    if path.exists():
        agent_id = path.read_text().strip()
        if not valid_agent_id(agent_id):
            raise ConfigError(f"{path} does not hold a valid bk_agent_id")
        return agent_id
    agent_id = uuid.uuid4().hex
    write_public(path, (agent_id + "\n").encode())
    return agent_id


def adopt_agent_id(data_dir: str | os.PathLike, agent_id: str) -> str:
    """The certificate names the agent: keep its id in `data_dir/agent_id` too (tools read it there)."""
    path = Path(data_dir) / "agent_id"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text().strip() != agent_id:
        write_public(path, (agent_id + "\n").encode())
    return agent_id


class HostSampler:
    """The agent's own cpu/mem use and a small snapshot of the host, for heartbeats."""

    def __init__(self):
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self, with_host: bool = True) -> tuple[float, float, pb.HostSnapshot | None]:
        """The agent's own cpu and memory percent, and the host snapshot (None unless `with_host`; host cpu
        is then the average since the previous snapshot)."""
        if not with_host:
            return self.proc.cpu_percent(None), self.proc.memory_percent(), None
        vm = psutil.virtual_memory()
        try:
            du = psutil.disk_usage("/")
            disk_total, disk_used = du.total, du.used
        except OSError:
            disk_total = disk_used = 0
        snap = pb.HostSnapshot(
            cpu_num=psutil.cpu_count() or 1, mem_size=vm.total, cpu_rate=psutil.cpu_percent(None),
            mem_rate=vm.percent, load1=os.getloadavg()[0], uptime_s=int(time.time() - psutil.boot_time()),
            proc_count=len(psutil.pids()), disk_total=disk_total, disk_used=disk_used)
        return self.proc.cpu_percent(None), self.proc.memory_percent(), snap


class _Inbox:
    """The agent's link handler: frames from the task server, parsed, in order; None once the link is gone."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def link_open(self, link) -> None:
        """framelink callback: nothing to do until the first frame."""

    def link_frame(self, link, body) -> None:
        """One ServerFrame, parsed and queued; an undecodable frame closes the link (the agent dials again)."""
        try:
            self.queue.put_nowait(pb.ServerFrame.FromString(body))
        except DecodeError:
            log.warning("undecodable frame from the task server; closing the link", extra={"peer": link.peer})
            link.close()

    def link_lost(self, link, exc) -> None:
        """framelink callback: the link is gone; `get` answers None after the frames already queued."""
        self.queue.put_nowait(None)

    async def get(self) -> pb.ServerFrame | None:
        """The next frame in arrival order, or None once the link is gone."""
        return await self.queue.get()


@dataclasses.dataclass
class _Outcome:
    redirect: str | None = None
    connected_s: float = 0.0


def _same_key(cert_pem: bytes, key) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = x509.load_pem_x509_certificate(cert_pem).public_key()
    return pub.public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def first_server(agent_id: str, servers: int) -> int:
    """Index (0..servers-1) of the server an agent dials first: spread by its id, whatever the id's form (hex, or a
    certificate's name such as 'agent-x'), the same for the same agent every time."""
    return zlib.crc32(agent_id.encode()) % servers


class Agent(Service):
    """The agent daemon (`python -m gse.agent`, spec sections 2, 5, 8, 11): enrolls if it has no certificate, keeps
    one link to a task server (redirects, fail-over with back-off), heartbeats, and hands the frames it gets to its
    parts: tasks, files, the data path, process supervision, host identity and agent operations."""
    name = "agent"
    ops_server = LiteOpsServer      # light: no HTTP framework on every host (gse/common/service.py)
    use_uvloop = False

    def __init__(self, config: AgentConfig, *args):
        super().__init__(config, *args)
        self.tls: TLSMaterial | None = None     # None until enrolled (start() enrolls first)
        self.ssl = None
        if Path(config.tls.cert).exists():
            self._use_certificate()
        else:
            self.agent_id = load_or_create_agent_id(config.data_dir)
        self.boot_id = random.getrandbits(62)
        self.start_ms = int(time.time() * 1000)
        self.ip = config.ip or config.bind_ip or route_ip(config.servers[0])
        self.sampler = HostSampler()
        self.server: str | None = None        # the task server we are attached to
        self.parent: tuple[str, int] | None = None
        self.attached = asyncio.Event()
        self.sessions = 0
        self.reconnect_spread_s = 0.0         # told by the task server (Welcome / Tune): see run()
        self.backoff: Backoff | None = None   # the reconnect back-off of run()
        self._out: asyncio.Queue | None = None      # frames to the current task server
        t = config.tasks
        self.tasks = TaskManager(config.data_dir, self.send,
                                 Pools({"script": t.pool_script, "file": t.pool_file, "proc": t.pool_proc},
                                       {"script": t.queue_limit, "file": t.queue_limit, "proc": t.queue_limit}),
                                 t.max_output_bytes, t.kill_grace_s, code_page=t.host_code_page_name,
                                 login_env_max_age_s=t.login_env_max_age_s)
        self.data = DataPipeline(config.data, data_dir=config.data_dir, run_dir=config.run_dir, tls=self.tls,
                                 identity=self.identity, send=self.send, ip=self.ip, bind_ip=config.bind_ip)
        self.files = FileManager(self, config.data_dir, config.files)
        self.procs = ProcManager(config.procs, config.data_dir, send=self.send,
                                 submit=self.data.submit if config.data.enabled else None,
                                 identity=lambda: {**self.identity(), "ip": self.ip, "version": __version__},
                                 plugins=lambda: self.data.messages.plugins, pools=self.tasks.pools,
                                 kill_grace_s=t.kill_grace_s)
        self.hostid = HostIdentityFile(config.hostid_path)
        self.operations = Operations(self)
        self._background: set[asyncio.Task] = set()

    def _use_certificate(self) -> None:
        """Load the TLS material; a certificate naming an agent gives the agent its id."""
        self.tls = TLSMaterial.load(self.config.tls)
        self.ssl = framelink.client_context(self.tls)
        named = roles.of_pem_file(self.config.tls.cert).agent_id     # (without loading cryptography)
        if named:
            self.agent_id = adopt_agent_id(self.config.data_dir, named)
        else:           # a shared certificate (the cluster must be in shared-certificate mode)
            self.agent_id = load_or_create_agent_id(self.config.data_dir)
        if hasattr(self, "data"):
            self.data.tls = self.tls

    # ---- enrollment ---------------------------------------------------------------------------------

    def _token(self) -> str:
        e = self.config.enroll
        if e.token:
            return e.token.strip()
        if e.token_file:
            try:
                return Path(e.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"enroll.token_file {e.token_file}: {exc.strerror}") from None
        return ""

    def _enroll_key(self):
        """The key of the certificate to come: made here (0600 from its first byte), or the one an earlier
        attempt made."""
        from cryptography.hazmat.primitives import serialization
        path = Path(self.config.tls.key)
        if path.exists():
            return serialization.load_pem_private_key(path.read_bytes(), None)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = new_key()
        write_private(path, pem_key(key))
        return key

    async def enroll(self) -> None:
        """Get a certificate of our own: until a task server signs our request (or refuses the token: then
        the operator must give another; we keep trying with the longest backoff)."""
        c = self.config
        token = self._token()
        if not token:
            raise ConfigError(f"tls.cert {c.tls.cert} does not exist and no enrollment token is configured "
                              f"(enroll.token or enroll.token_file)")
        key = self._enroll_key()
        csr = make_csr(key, self.agent_id)
        ca_only = TLSMaterial(Path(c.tls.ca).read_bytes(), b"", b"", c.tls.server_name)
        ctx = framelink.client_context(ca_only, with_certificate=False)
        frame = pb.AgentFrame(enroll=pb.Enroll(token=token, agent_id=self.agent_id, csr=csr)).SerializeToString()
        servers = list(c.servers)
        backoff = Backoff(c.reconnect.base_s, c.reconnect.max_s)
        log.info("enrolling", extra={"bk_agent_id": self.agent_id})
        while True:
            address = servers[backoff.attempt % len(servers)]
            answer = await self._enroll_once(ctx, address, frame)
            kind = answer.WhichOneof("body") if answer is not None else None
            if kind == "enrolled":
                cert = answer.enrolled.certificate
                ident = roles.of_pem(cert)
                mine = _same_key(cert, key)
                if ident.role == roles.AGENT and ident.agent_id == self.agent_id and mine:
                    write_public(c.tls.cert, cert)
                    if c.enroll.token_file:
                        Path(c.enroll.token_file).unlink(missing_ok=True)
                    log.info("enrolled", extra={"bk_agent_id": self.agent_id, "serial": ident.serial,
                                                "server": address})
                    self._use_certificate()
                    return
                log.error("the certificate received is not ours; not kept",
                          extra={"server": address, "role": ident.role, "agent_id": ident.agent_id})
            elif kind == "refused":
                log.error("enrollment refused", extra={"server": address, "code": answer.refused.code,
                                                       "reason": answer.refused.reason})
            # A refused token will not become good by itself: wait the longest (the operator must give another).
            backoff.floor_s = c.reconnect.max_s if kind == "refused" and answer.refused.code.startswith("token") \
                else 0.0
            await backoff.sleep()

    async def _enroll_once(self, ctx, address: str, frame: bytes) -> pb.ServerFrame | None:
        host, port = split_host_port(address)
        inbox = _Inbox()
        link = None
        try:
            link = await framelink.dial(ctx, host, port, inbox,
                                        server_hostname=self.config.tls.server_name or host,
                                        local_ip=self.config.bind_ip, timeout=self.config.connect_timeout_s)
            link.write(frame)
            return await asyncio.wait_for(inbox.get(), 30)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("enrollment: task server unreachable",
                        extra={"server": address, "error": str(exc) or repr(exc)})
            return None
        finally:
            if link is not None:
                link.close()

    def send(self, frame: pb.AgentFrame) -> bool:
        """Queue a frame to the task server; False while not attached (the caller keeps what it sent)."""
        if self._out is None:
            return False
        self._out.put_nowait(frame)
        return True

    @property
    def node_id(self) -> str:
        """The agent's bk_agent_id (what the daemon is named by in logs and /healthz)."""
        return self.agent_id

    def identity(self) -> dict:
        """{'cloud_id', 'bk_agent_id'}: what the data path, the plugins' keepalive replies (spec section 5) and
        process events name the agent by."""
        return {"cloud_id": self.config.cloud_id, "bk_agent_id": self.agent_id}

    def health(self):
        """(ok, detail): ok while attached. `data` is what node managers check after an install (bk-nodeman's
        setup scripts read `.ok` and `.data.base|cluster|data|file`, each "ok" or what is wrong)."""
        attached = self.attached.is_set()
        c = self.config
        parts = {"base": "ok",
                 "cluster": "ok" if attached else "not attached to a task server",
                 "data": "ok" if not c.data.enabled or self.data.current or not self.data.needed
                 else "no data server stream open",
                 "file": "ok"}
        return attached, {"service": self.name, "bk_agent_id": self.agent_id, "ip": self.ip, "server": self.server,
                          "version": __version__, "pid": os.getpid(), "data": parts,
                          "procs": self.procs.health(), "tasks_running": len(self.tasks.runs),
                          "transfers": len(self.files.sources) + len(self.files.targets)}

    def _write_run_files(self) -> None:
        """<run_dir>/gse_agent.pid and gse_agent.json (pid, metrics address, id, version): how the command line
        (--quit, --reload, --healthz) and the package's scripts find the running agent."""
        import json
        run = Path(self.config.run_dir)
        info = {"pid": os.getpid(), "metrics": f"{self.config.metrics.host}:{self.ops.port if self.ops else 0}",
                "bk_agent_id": self.agent_id, "version": __version__, "start_time": self.start_ms}
        write_public(run / "gse_agent.json", json.dumps(info).encode())
        write_public(run / "gse_agent.pid", f"{os.getpid()}\n".encode())

    def _remove_run_files(self) -> None:
        run = Path(self.config.run_dir)
        try:
            if (run / "gse_agent.pid").read_text().strip() == str(os.getpid()):
                (run / "gse_agent.pid").unlink(missing_ok=True)
                (run / "gse_agent.json").unlink(missing_ok=True)
        except OSError:
            pass

    def hello(self, redirects: int, hostid_md5: str = "") -> pb.AgentFrame:
        """The AgentHello opening a link: id, area, ip, hostname, OS, arch, version, run_mode, start time (epoch ms),
        boot id, how many redirects led here (`redirects` > 0 asks not to be redirected again) and the md5 of the host
        identity file ("" when there is none)."""
        c = self.config
        return pb.AgentFrame(hello=pb.AgentHello(
            agent_id=self.agent_id, cloud_id=c.cloud_id, ip=self.ip, hostname=c.hostname or socket.gethostname(),
            os=platform.system().lower(), arch=platform.machine(), version=__version__, run_mode=c.run_mode,
            start_time_ms=self.start_ms, redirects=redirects, boot_id=self.boot_id, hostid_md5=hostid_md5))

    async def start(self) -> None:
        """Start /healthz; enroll first when there is no certificate (retries until a task server signs; ConfigError
        without a token); write the run files (pid, metrics address); start the data path (when enabled); take up task
        results and file transfers kept across a restart; start process supervision (when enabled). The link itself is
        made by run()."""
        await super().start()
        if self.tls is None:
            await self.enroll()
        Path(self.config.run_dir).mkdir(parents=True, exist_ok=True)
        self._write_run_files()
        if self.config.data.enabled:
            await self.data.start()
        recovered = self.tasks.recover()
        self.tasks.prewarm()
        if recovered:
            log.info("task results kept across a restart", extra={"items": recovered})
        resumed = self.files.recover()
        if resumed:
            log.info("file transfers taken up again after a restart", extra={"transfers": resumed})
        if self.config.procs.enabled:
            await self.procs.start()
        log.info("agent starting", extra={"bk_agent_id": self.agent_id, "ip": self.ip,
                                          "servers": list(self.config.servers)})

    async def run(self) -> None:
        """Keep one link to a task server for ever: start at a server chosen by the agent id, follow up to 3 redirects
        in a row, then the next server after a back-off (full jitter, never narrower than the spread the last server
        asked for). Returns only when cancelled."""
        c = self.config
        idx = first_server(self.agent_id, len(c.servers))
        # Full jitter, never narrower than the spread the last server asked for (`floor_s`, kept current by
        # _set_spread): when a server holding thousands of agents dies, they come back to its peers at a rate
        # the peers can take.
        self.backoff = backoff = Backoff(c.reconnect.base_s, c.reconnect.max_s, floor_s=self.reconnect_spread_s)
        redirect: str | None = None
        redirects = 0
        no_redirect_until = 0.0
        while True:
            servers = list(self.config.servers)        # read every round: a reload's servers apply
            address = redirect or servers[idx % len(servers)]
            # After a redirect target failed, ask not to be redirected for a while: a server may still see a
            # dead peer in ZooKeeper (until its session expires) and would keep sending agents there.
            asked = redirects or (1 if time.monotonic() < no_redirect_until else 0)
            outcome = await self._session(address, asked)
            if outcome.redirect and redirects < 3:
                redirect, redirects = outcome.redirect, redirects + 1
                log.info("redirected", extra={"to": redirect})
                continue
            if redirect is not None and outcome.connected_s == 0:
                no_redirect_until = time.monotonic() + REDIRECT_COOLDOWN_S
            redirect, redirects = None, 0
            if outcome.connected_s >= c.reconnect.stable_s:
                backoff.reset()
            idx += 1
            await backoff.sleep()

    def _set_spread(self, spread_ms: int) -> None:
        spread = max(0, spread_ms) / 1000
        if spread != self.reconnect_spread_s:
            log.info("reconnect spread", extra={"spread_s": spread})
            self.reconnect_spread_s = spread
            if self.backoff is not None:
                self.backoff.floor_s = spread

    async def _session(self, address: str, redirects: int) -> _Outcome:
        outcome = _Outcome()
        host, port = split_host_port(address)
        inbox = _Inbox()
        beat: asyncio.Task | None = None
        writer: asyncio.Task | None = None
        started = 0.0
        link = None
        try:
            link = await framelink.dial(self.ssl, host, port, inbox,
                                        server_hostname=self.tls.server_name or host, local_ip=self.config.bind_ip,
                                        timeout=self.config.connect_timeout_s)
            link.write(self.hello(redirects, await asyncio.to_thread(self.hostid.md5)).SerializeToString())
            first = await asyncio.wait_for(inbox.get(), self.config.connect_timeout_s)
            if first is None:
                log.warning("task server stream failed", extra={"server": address, "error": link.error or "closed"})
                return outcome
            kind = first.WhichOneof("body")
            if kind == "redirect":
                outcome.redirect = first.redirect.address
                return outcome
            if kind == "refused":
                log.warning("task server refused the link", extra={"server": address, "reason": first.refused.reason})
                return outcome
            if kind != "welcome":
                log.warning("unexpected first frame from server", extra={"kind": kind})
                return outcome
            w = first.welcome
            self._set_spread(w.reconnect_spread_ms)
            started = time.monotonic()
            self.server, self.parent = address, (w.parent_ip, w.parent_port)
            self.sessions += 1
            self.attached.set()
            log.info("attached", extra={"server": address, "node": w.node_id})
            interval = (w.heartbeat_interval_ms / 1000) or self.config.heartbeat_interval_s
            self._out = asyncio.Queue()
            writer = asyncio.ensure_future(self._write(link, self._out))
            beat = asyncio.ensure_future(self._heartbeats(interval, w.host_snapshot_every))
            self._on_attached()
            if self.sessions == 1:
                confirm_on_attach(self)     # a new version confirms its upgrade once it attached
            while True:
                frame = await inbox.get()
                if frame is None:
                    if link.error:
                        log.warning("task server stream failed", extra={"server": address, "error": link.error})
                    break
                kind = frame.WhichOneof("body")
                if kind == "redirect":
                    outcome.redirect = frame.redirect.address
                    break
                self.on_frame(frame)
        except asyncio.TimeoutError:        # (an OSError too: first)
            log.warning("task server did not answer in time", extra={"server": address})
        except OSError as exc:              # refused, reset, TLS failed (framelink.LinkError)
            log.warning("task server stream failed", extra={"server": address, "error": str(exc) or repr(exc)})
        finally:
            self._out = None
            for t in (beat, writer):
                if t is not None:
                    t.cancel()
            if started:
                outcome.connected_s = time.monotonic() - started
                self.attached.clear()
                log.info("detached", extra={"server": address})
            if link is not None:
                link.close()
        return outcome

    def _on_attached(self) -> None:
        """A task server holds us now: send it again whatever it has not acknowledged."""
        self.tasks.on_attach()
        self.files.on_attach()
        self.procs.on_attach()

    def on_frame(self, frame: pb.ServerFrame) -> None:
        """Hand one ServerFrame of the attached link to the part it is for (tasks, acknowledgements, files, the data
        server view, plugin messages, process operations, host identity, agent operations, reconnect spread); a second
        Welcome (through a proxy) sends again all that is unacknowledged. Unknown kinds are ignored."""
        kind = frame.WhichOneof("body")
        if kind == "welcome":
            # Another Welcome on the same link: our proxy attached us upstream again (it lost its task server
            # and found another): what was in flight may be lost, so everything unacknowledged goes again.
            w = frame.welcome
            self.parent = (w.parent_ip, w.parent_port)
            log.info("attached again through our proxy", extra={"node": w.node_id})
            self._on_attached()
            return
        if kind == "task":
            self.tasks.on_task(frame.task)
        elif kind == "terminate":
            self.tasks.on_terminate(frame.terminate.task_id)
        elif kind == "data_servers":
            self.data.on_view(frame.data_servers)
        elif kind == "plugin_message":
            self.data.on_plugin_message(frame.plugin_message)
        elif kind == "ack":
            self.tasks.on_ack(frame.ack)
            self.files.on_ack(frame.ack.items)
        elif kind == "file_source":
            self.files.on_source(frame.file_source)
        elif kind == "file_target":
            self.files.on_target(frame.file_target)
        elif kind == "upload_request":
            self.files.on_upload_request(frame.upload_request)
        elif kind == "end_transfer":
            self.files.on_end(frame.end_transfer)
        elif kind == "end_entry":
            self.files.on_end_entry(frame.end_entry)
        elif kind == "tune":
            self._set_spread(frame.tune.reconnect_spread_ms)
        elif kind == "proc_ops":
            self.procs.on_ops(frame.proc_ops)
        elif kind == "proc_ack":
            self.procs.on_ack(frame.proc_ack)
        elif kind == "host_identity":
            self.spawn(self._host_identity(frame.host_identity))
        elif kind == "operate":
            self.operations.on_operate(frame.operate)
        else:
            log.debug("unhandled frame", extra={"kind": kind})

    def spawn(self, coro) -> None:
        """Run `coro` in the background of the agent (held until done, cancelled when the agent stops): for
        handlers of frames that must not hold up the link's reader (agent operations, host identity)."""
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _host_identity(self, msg: pb.HostIdentity) -> None:
        result = await self.hostid.write(msg)
        self.send(pb.AgentFrame(host_identity_result=result))     # lost if detached: the next hello says it

    async def _write(self, link, queue: asyncio.Queue) -> None:
        """The one writer of the link: frames go out in the order they were queued, and wait while the
        server reads slower than we send (the queue holds them, not the socket buffer)."""
        try:
            while True:
                frame = await queue.get()
                try:
                    if not link.write(frame.SerializeToString()):
                        return
                except ValueError as exc:       # larger than a frame may be: this one frame is lost
                    log.error("frame not sent", extra={"kind": frame.WhichOneof("body"), "error": str(exc)})
                    continue
                if link.paused:
                    await link.drain()
        except ConnectionError as exc:
            log.warning("link write ended", extra={"error": repr(exc)})

    async def _heartbeats(self, interval: float, host_every: int = 1) -> None:
        seq = 0
        # The first heartbeat goes at once so that the server has the host snapshot without waiting; then the
        # snapshot rides on one heartbeat in `host_every` (the server's choice), the others carry liveness.
        while True:
            with_host = seq % max(1, host_every) == 0
            cpu, mem, snap = await asyncio.to_thread(self.sampler.sample, with_host)
            seq += 1
            hb = pb.Heartbeat(seq=seq, cpu_rate=cpu, mem_rate=mem)
            if snap is not None:
                hb.host.CopyFrom(snap)
            self.send(pb.AgentFrame(heartbeat=hb))
            await asyncio.sleep(interval)

    async def stop(self, grace: float) -> None:
        """Stop process supervision first (its last events still reach the data path), spool what plugins sent, stop
        running tasks (unless restarting in place: then commands keep running), stop file transfers and background
        work, remove the run files, then /healthz."""
        await self.procs.stop()         # first: its last events still go to the data path
        if self.config.data.enabled:
            await self.data.stop()      # spools what plugins sent
        if not self.exec_after_stop:
            await self.tasks.stop()
        # (restarting in place: the commands keep running; the journal reports them as status 6 afterwards)
        await self.files.stop()
        for t in list(self._background):
            t.cancel()
        if not self.exec_after_stop:
            self._remove_run_files()
        await super().stop(grace)

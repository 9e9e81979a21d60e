"""One service lifecycle for every daemon.

`start()` binds and registers; `run()` supervises the daemon's tasks; `stop(grace)` is idempotent and
bounded. SIGTERM/SIGINT stop gracefully, SIGHUP reloads the config file. systemd hears READY=1 only after
`start()` returned, that is once the ports are bound and the ZooKeeper node exists.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import logging
import os
import signal
import socket
import sys
from typing import Any

from . import gctune, lazymetrics
from .config import ConfigError, LogConfig, MetricsConfig, TLSConfig, ZooKeeperConfig, load_config
from .logs import setup_logging

log = logging.getLogger("gse.service")

STOP_BOUND_S = 15.0

UP = lazymetrics.Gauge("gse_up", "1 while the daemon is serving", ["service"])


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Sections every server daemon has."""
    node_id: str = ""          # "" = <advertised host>-<main port>
    log: LogConfig = LogConfig()
    tls: TLSConfig = TLSConfig()
    zookeeper: ZooKeeperConfig = ZooKeeperConfig()
    metrics: MetricsConfig = MetricsConfig()
    stop_grace_s: float = 5.0

    def validate(self) -> None:
        """ConfigError when TLS material is missing, or when the daemon listens on a wildcard or empty host without an
        advertise_host for peers to dial."""
        self.tls.require()
        host = getattr(self, "host", "")
        if host in ("0.0.0.0", "::", "") and not getattr(self, "advertise_host", "x"):
            raise ConfigError(f"host is {host or 'empty'}: set advertise_host to the address peers and agents dial")


def advertised_host(config: Any) -> str:
    """The address peers and agents dial: advertise_host, else the listen host."""
    return getattr(config, "advertise_host", "") or getattr(config, "host", "") or socket.gethostname()


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (READY=1, STOPPING=1, RELOADING=1, STATUS=...). No-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False


class OpsServer:
    """The operations HTTP endpoint: `/metrics` for Prometheus and `/healthz` for people and harnesses.

    `health()` returns (ok, detail), or an awaitable of it when finding out takes I/O."""

    def __init__(self, cfg: MetricsConfig, health, registry=None):
        self.cfg = cfg
        self.health = health
        self.registry = registry            # None: prometheus_client's default registry
        self.runner = None
        self.port = 0

    async def start(self) -> int:
        """Serve /metrics and /healthz on `cfg.host`:`cfg.port`; returns the bound port (useful with port 0)."""
        from aiohttp import web
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def _metrics(self, request):
        from aiohttp import web
        body, content_type = metrics_page(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request):
        from aiohttp import web
        result = self.health()
        ok, detail = await result if inspect.isawaitable(result) else result
        return web.json_response({"ok": ok, **detail}, status=200 if ok else 503)

    async def stop(self) -> None:
        """Stop serving /metrics and /healthz (idempotent)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def metrics_page(registry=None) -> tuple[bytes, str]:
    """The Prometheus text of `registry` (default: the process's), the lazy metrics included."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    lazymetrics.install()
    return generate_latest(registry or REGISTRY), CONTENT_TYPE_LATEST


class LiteOpsServer:
    """/healthz and /metrics as OpsServer serves them, on asyncio's own streams: for the agent, which runs on
    every host and should not carry an HTTP framework (~10 MB) for a page read now and then. One request per
    connection, headers bounded (8 KiB, 5 s); prometheus_client is imported at the first /metrics."""

    MAX_HEAD = 8192

    def __init__(self, cfg: MetricsConfig, health, registry=None):
        self.cfg = cfg
        self.health = health
        self.registry = registry
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen on `cfg.host`:`cfg.port` (0: any free port) and return the bound port; OSError when the address is
        taken."""
        self.server = await asyncio.start_server(self._serve, self.cfg.host, self.cfg.port, limit=self.MAX_HEAD)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, path = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
            path = path.split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"", "text/plain"
            elif path == b"/healthz":
                result = self.health()
                ok, detail = await result if inspect.isawaitable(result) else result
                body = json.dumps({"ok": ok, **detail}, default=str).encode()
                status, ctype = ("200 OK" if ok else "503 Service Unavailable"), "application/json"
            elif path == b"/metrics":
                body, ctype = metrics_page(self.registry)
                status = "200 OK"
            else:
                status, body, ctype = "404 Not Found", b"", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if method != b"HEAD" else b""))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        """Stop accepting connections (idempotent); a request being answered finishes."""
        if self.server is not None:
            self.server.close()
            self.server = None


class Service:
    """Base of every daemon. Subclasses implement `start`, `run` and `stop` and call the base versions."""

    name = "service"
    ops_server = OpsServer      # the /metrics and /healthz server (the agent takes LiteOpsServer)
    use_uvloop = True           # uvloop's event loop (the agent keeps asyncio's: ~9 MB less, one link to serve)

    def __init__(self, config: Any, config_path: str | None = None, overrides: tuple = ()):
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.ops = self.ops_server(config.metrics, self.health) if hasattr(config, "metrics") else None
        self._stopped = False
        # A command line to exec once stopped (a daemon restarting itself in place: the agent's restart and
        # upgrade); serve() then tells systemd RELOADING=1 rather than STOPPING=1, the same pid comes back.
        self.exec_after_stop: list[str] | None = None
        self._stop_soon = None          # set by serve(): ends run() and stops, as SIGTERM does

    @property
    def advertise(self) -> str:
        """The host peers and agents dial (see `advertised_host`)."""
        return advertised_host(self.config)

    @property
    def main_port(self) -> int:
        """The port that names this daemon (bound port once started, else the configured one)."""
        return getattr(self, "port", 0) or getattr(self.config, "port", 0)

    @property
    def node_id(self) -> str:
        """This daemon's name in ZooKeeper: `node_id` from the config, else `<advertised host>-<main port>` (the pid
        before a port is known)."""
        return self.config.node_id or f"{self.advertise}-{self.main_port or os.getpid()}"

    def health(self) -> tuple[bool, dict]:
        """(ok, detail) for /healthz; subclasses add what their health depends on (ZooKeeper, Redis, peers)."""
        return True, {"service": self.name, "node_id": self.node_id}

    async def start(self) -> None:
        """Start the operations endpoint and mark the daemon up; subclasses bind and register after calling it."""
        if self.ops is not None:
            await self.ops.start()
        UP.labels(self.name).set(1)

    async def run(self) -> None:
        """Supervise the daemon's tasks until cancelled; the base has none and waits for ever."""
        await asyncio.Event().wait()

    async def stop(self, grace: float) -> None:
        """Idempotent: mark the daemon down and stop the operations endpoint; subclasses release their own parts, then
        call it."""
        if self._stopped:
            return
        self._stopped = True
        UP.labels(self.name).set(0)
        if self.ops is not None:
            await self.ops.stop()

    def stop_soon(self) -> None:
        """Stop as SIGTERM would (from inside the daemon)."""
        if self._stop_soon is not None:
            self._stop_soon()

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; the log level applies at once, `apply_reload` does the rest."""
        try:
            new = load_config(type(self.config), self.config_path, self.overrides, env_prefix=self.name)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            return
        logging.getLogger().setLevel(new.log.level.upper())
        await self.apply_reload(new)
        self.config = new
        log.info("configuration reloaded")

    async def apply_reload(self, new_config: Any) -> None:
        """Apply a re-read config on SIGHUP (the log level is applied already); the base applies nothing else, so
        other keys wait for a restart."""
        pass


def parse_args(prog: str, argv=None) -> argparse.Namespace:
    """The command line every daemon shares: `--config FILE`, repeatable `--set key.path=value`, and the hidden
    `--worker`, `--supervisor`, `--ready-fd` a supervisor gives the worker processes it starts (gse.common.workers).
    Exits with a usage error on bad arguments."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", "-c", help="YAML configuration file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration key (dotted path), may repeat")
    # Given by a supervisor to the worker processes it starts (a daemon configured with workers > 1).
    p.add_argument("--worker", type=int, metavar="INDEX", help=argparse.SUPPRESS)
    p.add_argument("--supervisor", type=int, metavar="PID", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None and args.supervisor is None:
        p.error("--worker needs --supervisor")
    return args


def main(service_cls, config_cls, argv=None) -> int:
    """Entry point shared by every daemon: `python -m gse.<daemon> --config FILE`."""
    name = service_cls.name
    args = parse_args(f"gse-{name}", argv)
    if args.worker is not None or args.ready_fd is not None:
        from . import workers       # (only daemons run as workers need it: it brings aiohttp and prometheus)
    if args.worker is not None and not workers.follow_supervisor(args.supervisor):
        print(f"gse-{name}: worker {args.worker}: supervisor {args.supervisor} is gone", file=sys.stderr)
        return 1
    try:
        config = load_config(config_cls, args.config, tuple(args.set), env_prefix=name)
    except ConfigError as exc:
        print(f"gse-{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(name if args.worker is None else f"{name}-w{args.worker}", config.log.level, config.log.format)
    try:
        gctune.install()
    except ValueError as exc:
        print(f"gse-{name}: {exc}", file=sys.stderr)
        return 2
    if service_cls.use_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:  # pragma: no cover - uvloop is a dependency; run on asyncio's loop without it
            pass
    if args.worker is None and getattr(config, "workers", 1) > 1:
        from . import workers
        service = workers.Supervisor(service_cls, config, args.config, tuple(args.set))
    else:
        service = service_cls(config, args.config, tuple(args.set))
    on_ready = workers.ready_reporter(args.ready_fd) if args.ready_fd is not None else None
    try:
        code = asyncio.run(serve(service, on_ready))
    except KeyboardInterrupt:
        return 0
    if service.exec_after_stop and code == 0:
        log.info("executing again", extra={"argv": service.exec_after_stop})
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(service.exec_after_stop[0], service.exec_after_stop)
    return code


async def serve(service: Service, on_ready=None) -> int:
    """Run `service` until SIGTERM/SIGINT; `on_ready(service)` is called once it is ready (after READY=1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task] = set()

    def on_hup():
        """SIGHUP: tell systemd RELOADING=1, reload, then READY=1 again."""
        sd_notify("RELOADING=1")
        t = loop.create_task(service.reload())
        reloads.add(t)
        t.add_done_callback(lambda _t: (reloads.discard(_t), sd_notify("READY=1")))

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    service._stop_soon = stop.set
    starter = loop.create_task(service.start())
    stopper = loop.create_task(stop.wait())
    await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not starter.done():
        # Stopped while starting (waiting for ZooKeeper, for workers, ...): nothing was served yet.
        sd_notify("STOPPING=1")
        starter.cancel()
        await asyncio.wait({starter}, timeout=STOP_BOUND_S)
        log.info("stopped before it was ready")
        await asyncio.wait_for(service.stop(0), STOP_BOUND_S)
        return 0
    if starter.cancelled() or starter.exception() is not None:
        log.error("start failed", exc_info=None if starter.cancelled() else starter.exception())
        stopper.cancel()
        await asyncio.wait_for(service.stop(0), STOP_BOUND_S)
        return 1
    gctune.freeze_startup()
    sd_notify("READY=1")
    if on_ready is not None:
        on_ready(service)
    log.info("ready", extra={"node_id": service.node_id})
    runner = loop.create_task(service.run())
    done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if runner in done and not runner.cancelled() and runner.exception() is not None:
        log.error("service failed", exc_info=runner.exception())
        code = 1
    sd_notify("RELOADING=1" if service.exec_after_stop else "STOPPING=1")
    log.info("stopping")
    grace = getattr(service.config, "stop_grace_s", 5.0)
    runner.cancel()
    stopper.cancel()
    try:
        await asyncio.wait_for(service.stop(grace), min(STOP_BOUND_S, grace + 5.0))
    except asyncio.TimeoutError:
        log.error("stop did not finish within its bound")
        code = code or 1
    log.info("stopped", extra={"gc": gctune.summary()})
    return code

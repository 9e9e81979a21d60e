"""Several worker processes of one daemon on one machine, under a small supervisor.

One process may hold only so many open files and runs on one core, so a daemon that must hold more agent
connections than that (a task server taking over the agents of a dead peer) runs as `workers` processes that
listen on the same port (SO_REUSEPORT: the kernel spreads new connections across them). Each worker is a full
daemon of its own, with its own node id, internal ports and ZooKeeper node: the daemon's service class says
how they derive from the configuration (`group_node_id(config)`, `worker_overrides(config, index)`).

The supervisor is what `python -m gse.<daemon>` runs as when `workers` > 1. It
- starts the workers as `python -m gse.<daemon> ... --set <derived keys> --worker I --supervisor PID
  --ready-fd FD`; a worker writes one JSON line to FD once it is ready (ports bound, ZooKeeper node made);
- tells systemd READY=1 once every worker is ready and its /healthz is ok;
- restarts a worker that exits, after a full-jitter back-off whose window doubles from 1 s to 30 s (1 s again
  once the worker had lived 60 s);
- forwards SIGHUP (reload); on SIGTERM/SIGINT stops every worker within the stop bound, then exits;
- serves /healthz (ok while every worker is alive and healthy) and its own /metrics.
A worker is killed by the kernel when its supervisor dies (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from .address import join_host_port
from .backoff import Backoff
from .service import STOP_BOUND_S, OpsServer, Service

log = logging.getLogger("gse.workers")

MAX_WORKERS = 64
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 60.0      # a worker that had lived this long is restarted after BACKOFF_MIN_S again
HEALTH_TIMEOUT_S = 2.0

PR_SET_PDEATHSIG = 1        # <linux/prctl.h>

# The supervisor's own figures: the default registry holds those of the daemon modules it imports.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
WORKERS = Gauge("gse_workers", "Worker processes configured", registry=REGISTRY)
WORKERS_ALIVE = Gauge("gse_workers_alive", "Worker processes running", registry=REGISTRY)
RESTARTS = Counter("gse_worker_restarts", "Worker processes restarted after they exited", ["worker"],
                   registry=REGISTRY)


# ---- in a worker ------------------------------------------------------------------------------------

def follow_supervisor(supervisor_pid: int) -> bool:
    """In a worker, first thing: have the kernel SIGKILL this process when its supervisor dies. False when
    the supervisor is already gone (it died before the prctl, which only covers deaths after it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == supervisor_pid


def ready_reporter(fd: int):
    """In a worker: the `on_ready` of `service.serve`, telling the supervisor on `fd` that it serves."""
    def report(service: Service) -> None:
        """Write `{"pid", "node_id", "ops_port"}` as one JSON line to the supervisor's pipe and close it (a failure is
        logged, the worker carries on)."""
        line = {"pid": os.getpid(), "node_id": service.node_id, "ops_port": service.ops.port if service.ops else 0}
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        except OSError as exc:
            log.warning("cannot tell the supervisor this worker is ready", extra={"error": str(exc)})
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return report


# ---- the supervisor ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Worker:
    """One worker process slot; the process in it changes when the worker is restarted."""
    index: int
    node_id: str = ""
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ops_port: int = 0                       # where its /healthz is, once it said it is ready
    ready: asyncio.Task | None = None       # True once ready, False when it exited before
    restarts: int = 0

    @property
    def alive(self) -> bool:
        """A process is in the slot and has not exited."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        """The pid of the process in the slot, None before the first start."""
        return self.proc.pid if self.proc is not None else None


def _dial(host: str, port: int) -> str:
    """The address to reach a listener bound to `host`:`port` from this machine."""
    return join_host_port({"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


class Supervisor(Service):
    """A daemon configured with `workers` > 1: starts, watches, restarts and stops its worker processes."""

    def __init__(self, service_cls: type, config: Any, config_path: str | None = None, overrides: tuple = ()):
        super().__init__(config, config_path, overrides)
        self.name = service_cls.name
        self.service_cls = service_cls
        self.module = service_cls.__module__.rsplit(".", 1)[0]     # gse.<daemon>, run as python -m
        self.ops = OpsServer(config.metrics, self.health, registry=REGISTRY)
        self.workers = [Worker(i) for i in range(config.workers)]
        self._keepers: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False
        WORKERS.set(len(self.workers))
        WORKERS_ALIVE.set_function(lambda: sum(w.alive for w in self.workers))

    @property
    def node_id(self) -> str:
        """The daemon's node id as a group (`group_node_id` of the service class); each worker registers its own
        derived one."""
        return self.service_cls.group_node_id(self.config)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each has reported ready and its /healthz is ok; RuntimeError when one
        exits first. systemd hears READY=1 after this returns."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S))
        await super().start()
        for w in self.workers:
            await self._spawn(w)
        pending = {w.ready: w for w in self.workers}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for ready in done:
                w = pending.pop(ready)
                if not ready.result():
                    raise RuntimeError(f"worker {w.index} exited with {await w.proc.wait()} before it was ready")
        while not (await self.health())[0]:
            dead = [w.index for w in self.workers if not w.alive]
            if dead:
                raise RuntimeError(f"workers {dead} exited while starting")
            await asyncio.sleep(0.2)
        log.info("workers ready", extra={"workers": [w.node_id for w in self.workers]})

    async def run(self) -> None:
        """Keep every worker running: restart each that exits, with back-off."""
        self._keepers = [asyncio.ensure_future(self._keep(w)) for w in self.workers]
        await asyncio.gather(*self._keepers)

    async def stop(self, grace: float) -> None:
        """Idempotent: SIGTERM every worker, SIGKILL those still running just before the stop bound, then stop the
        operations endpoint."""
        if self._stopping:
            return
        self._stopping = True
        for t in self._keepers:
            t.cancel()
        running = [w for w in self.workers if w.alive]
        for w in running:
            self._signal(w, signal.SIGTERM)
        # The workers stop within the same bound as any daemon; what is left just before ours is killed.
        bound = max(1.0, min(STOP_BOUND_S, grace + 5.0) - 1.0)
        waits = {asyncio.ensure_future(w.proc.wait()): w for w in running}
        if waits:
            _, late = await asyncio.wait(waits, timeout=bound)
            for fut in late:
                w = waits[fut]
                log.error("worker did not stop within the bound; killing it", extra={"worker": w.index, "pid": w.pid})
                self._signal(w, signal.SIGKILL)
            if late:
                await asyncio.wait(late, timeout=5.0)
        for w in running:
            log.info("worker stopped", extra={"worker": w.index, "pid": w.pid, "code": w.proc.returncode})
        for w in self.workers:
            if w.ready is not None:
                w.ready.cancel()
        if self._http is not None:
            await self._http.close()
        await super().stop(grace)

    async def reload(self) -> None:
        """SIGHUP: every worker re-reads the config file; the supervisor applies the log level."""
        for w in self.workers:
            if w.alive:
                self._signal(w, signal.SIGHUP)
        await super().reload()

    async def apply_reload(self, new_config: Any) -> None:
        """The workers apply their own config on SIGHUP; a changed `workers` count only warns (it takes a restart)."""
        if new_config.workers != len(self.workers):
            log.warning("the number of workers changes at the next restart",
                        extra={"workers": len(self.workers), "configured": new_config.workers})

    # ---- workers --------------------------------------------------------------------------------

    def _command(self, w: Worker, ready_fd: int) -> list[str]:
        cmd = [sys.executable, "-m", self.module]
        if self.config_path:
            cmd += ["--config", self.config_path]
        derived = self.service_cls.worker_overrides(self.config, w.index)
        w.node_id = derived["node_id"]
        for item in (*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in derived.items())):
            cmd += ["--set", item]
        return cmd + ["--worker", str(w.index), "--supervisor", str(os.getpid()), "--ready-fd", str(ready_fd)]

    async def _spawn(self, w: Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}    # systemd hears the supervisor
        try:
            # Forked from the event loop's thread, which lives as long as the supervisor: the kernel sends
            # PR_SET_PDEATHSIG when the thread that forked the child ends.
            w.proc = await asyncio.create_subprocess_exec(*self._command(w, write_fd), pass_fds=(write_fd,),
                                                          env=env, stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        w.started_at = time.monotonic()
        w.ops_port = 0
        w.ready = asyncio.ensure_future(self._await_ready(w, read_fd))
        log.info("worker started", extra={"worker": w.index, "pid": w.pid, "node_id": w.node_id})

    async def _await_ready(self, w: Worker, fd: int) -> bool:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(fd, "rb", 0))
        try:
            line = await reader.readline()
        finally:
            transport.close()
        if not line:
            return False            # the pipe closed without a word: the worker exited
        try:
            info = json.loads(line)
            w.ops_port = int(info["ops_port"])
        except (ValueError, KeyError, TypeError):
            log.error("worker sent a bad ready report", extra={"worker": w.index, "report": line[:200]})
            return False
        log.info("worker ready", extra={"worker": w.index, "pid": w.pid, "node_id": w.node_id,
                                        "ops_port": w.ops_port})
        return True

    async def _keep(self, w: Worker) -> None:
        """Restart worker `w` whenever it exits, with back-off (gse.common.backoff)."""
        backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        while True:
            code = await w.proc.wait()
            lived = time.monotonic() - w.started_at
            if lived >= BACKOFF_RESET_S:
                backoff.reset()
            delay = backoff.next()
            log.warning("worker exited; restarting it", extra={
                "worker": w.index, "pid": w.pid, "code": code, "lived_s": round(lived, 1),
                "restart_in_s": round(delay, 2)})
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._spawn(w)
                    break
                except OSError as exc:
                    delay = backoff.next()
                    log.error("cannot start a worker", extra={"worker": w.index, "error": str(exc),
                                                               "retry_in_s": round(delay, 2)})
            w.restarts += 1
            RESTARTS.labels(str(w.index)).inc()

    def _signal(self, w: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(sig)

    # ---- health ---------------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict]:
        """Ok while every worker is alive and its /healthz says ok; the detail carries each worker's state."""
        states = await asyncio.gather(*(self._worker_health(w) for w in self.workers))
        return all(s["ok"] for s in states), {"service": self.name, "node_id": self.node_id,
                                             "role": "supervisor", "pid": os.getpid(), "workers": states}

    async def _worker_health(self, w: Worker) -> dict:
        state = {"index": w.index, "pid": w.pid, "node_id": w.node_id, "alive": w.alive, "restarts": w.restarts,
                 "ok": False}
        if not w.alive or not w.ops_port or self._http is None:
            return state
        state["ops"] = _dial(self.config.metrics.host, w.ops_port)
        try:
            async with self._http.get(f"http://{state['ops']}/healthz") as r:
                body = await r.json()
            state["ok"] = r.status == 200 and body.get("ok") is True
            state["health"] = body
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            state["error"] = str(exc) or type(exc).__name__
        return state

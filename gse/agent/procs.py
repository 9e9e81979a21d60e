"""Process supervision on the agent (spec sections 3 and 8): operations from procmgr, keep-alive, one-shot and
scheduled processes, health checks, resource limits, status reports, events, and plugin auto-load.

- **Registrations** (namespace, name -> spec, supervised or not) are kept in `<data_dir>/procs/registry.json`
  (mode 0600, replaced atomically) and resumed at boot: an agent restart, the loss of every server, or a
  reinstall that keeps the data dir leave supervision running.
- **Operations** (`ProcOperations` frames) run in the agent's "proc" pool, one at a time per process. Control
  commands run as the registration's `user` with that user's login environment (the task executor's
  `TaskRun`, the one way the agent runs a command as a user), in `setup_path`, killed at `op_timeout`. A
  result is kept (and journaled) until the task server acknowledges it; the same (task, process) sent again
  is answered with the kept result, never run twice.
- **Keep-alive** (auto_type 1, supervised): a process that was seen running (or started by the agent) and is
  found dead is started again. After `start_retries` failed starts in a row each next try waits
  `start_interval`: a missing binary costs at most start_retries + 60 / start_interval tries a minute. Reaching
  `start_retries` failures sends the `process_restart_failed` event and a type-101 alarm (then at most once an
  hour while it keeps failing).
- **One-shot** (auto_type 2): start succeeds when `start_cmd` exits 0; nothing keeps it alive. **Scheduled**
  (auto_type 0): start (and register for supervision, and restart) puts the process on its `crontab_rule`
  (croniter: five fields, or six with seconds last) without running it; `start_cmd` then runs at each time of the
  rule, killed at `op_timeout`. A time that comes while a run still goes (or while `pid_path` names a running
  process) is skipped, not run late. Stop and kill take it off the schedule; a run in progress ends first.
- **Health**: `health_cmd` every `health_check_secs` while running; a failure is treated as a death: the process
  is taken down (stop_cmd, then SIGKILL) and keep-alive starts it again, its `process_restart_success` event
  naming the failed check.
- **Resources** (`cpu`, `mem` in percent of the host): cgroup v2 where the host has it (proc_host.CgroupV2),
  else measured every `sample_interval_s`; `resource_breach_samples` samples in a row over a limit send
  `process_resource_limit_exceed` and restart the process (supervised ones; others are reported only).
- **Status** (pid, cpu, memory, fds, version from `version_cmd` or the plugin's message-socket keepalive) is
  reported to the task server when it changes (figures at most every `status_min_interval_s`), and whole at
  every attach; the server caches it, so status queries never reach agents.
- **Events** go to DataID 1100008 in the shape of spec section 8 (the monitoring platform alerts on them).
- **Auto-load**: every valid descriptor in `plugin_dir` (proc_host.load_descriptor) is registered, supervised
  and started at boot without any API call; the directory is scanned again every `plugin_scan_interval_s`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Callable

from google.protobuf import json_format
from gse.common.lazymetrics import Counter

from gse.common import alarmrecord
from gse.common.config import ConfigError
from gse.common.errors import ErrorCode, ScriptStatus
from gse.common.logs import trace
from gse.common.safefile import write_private
from gse.pb import agent_pb2 as pb

from .executor import AtomicTask, Busy, Pools, TaskRun
from .proc_host import CgroupV2, Sampler, proc_alive, scan_plugins

log = logging.getLogger("gse.agent.procs")

DATAID_PROC_EVENT = 1100008
OPS = Counter("gse_agent_proc_ops_total", "Process operations run", ["op_type", "error_code"])
RESTARTS = Counter("gse_agent_proc_restarts_total", "Keep-alive starts of supervised processes", ["outcome"])
EVENTS = Counter("gse_agent_proc_events_total", "Process events sent on DataID 1100008", ["event_name"])

OP_START, OP_STOP, OP_STATUS, OP_SUPERVISE, OP_UNSUPERVISE = 0, 1, 2, 3, 4
OP_RESTART, OP_RELOAD, OP_KILL, OP_DEFINE, OP_FORGET = 7, 8, 9, 100, 101
KNOWN_OPS = frozenset({OP_START, OP_STOP, OP_STATUS, OP_SUPERVISE, OP_UNSUPERVISE, OP_RESTART, OP_RELOAD, OP_KILL,
                       OP_DEFINE, OP_FORGET})
RESIDENT, ONE_SHOT, SCHEDULED = 1, 2, 0
RUNNING, STOPPED = 1, 2

# Defaults of the monitor policy (spec section 8).
DEF_START_CHECK, DEF_STOP_CHECK, DEF_RETRIES, DEF_INTERVAL, DEF_TIMEOUT, DEF_HEALTH = 5, 5, 4, 10, 60, 60
ALARM_REPEAT_S = 3600.0
_ACKED_KEEP = 4096


@dataclasses.dataclass(frozen=True)
class ProcConfig:
    """The agent's `procs` section."""
    enabled: bool = True
    plugin_dir: str = "/usr/local/gse/plugins"    # auto-load: <plugin_dir>/<name>/project.yaml
    plugin_scan_interval_s: float = 60.0
    check_interval_s: float = 1.0                 # liveness of supervised processes
    sample_interval_s: float = 10.0               # cpu/memory/fd figures, resource limits
    resource_breach_samples: int = 3              # samples in a row over a limit before acting
    status_min_interval_s: float = 60.0           # figure-only changes are reported at most this often
    max_output_bytes: int = 64 * 1024             # of a control command, in its result
    cgroup_root: str = "/sys/fs/cgroup"           # cgroup v2 mount; "" = measure limits, never use cgroups

    def validate(self) -> None:
        """ConfigError unless the check, sample and scan periods are positive, at least one breach sample is needed and
        results keep at least 1 KiB of output."""
        if self.check_interval_s <= 0 or self.sample_interval_s <= 0 or self.plugin_scan_interval_s <= 0:
            raise ConfigError("procs: check_interval_s, sample_interval_s and plugin_scan_interval_s must be > 0")
        if self.resource_breach_samples < 1 or self.max_output_bytes < 1024:
            raise ConfigError("procs: resource_breach_samples >= 1 and max_output_bytes >= 1024")


def _secs(v: int, default: int) -> int:
    return v if v > 0 else default


def path_problem(spec: pb.ProcSpec) -> str:
    """Why the spec's paths are refused ("" when fine): absolute, without '..' components."""
    for field in ("setup_path", "pid_path"):
        p = getattr(spec, field)
        if not p or not os.path.isabs(p) or ".." in p.split("/") or "\0" in p:
            return f"{field} {p!r} must be an absolute path without '..'"
    return ""


@dataclasses.dataclass
class Proc:
    """One registration on this host and its supervision state."""
    namespace: str
    name: str
    spec: pb.ProcSpec
    labels_json: str = ""
    source: str = "api"
    registered_at: int = 0          # ms
    isauto: bool = False            # supervised
    armed: bool = False             # seen running under supervision: a death is restarted
    # runtime
    pid: int = -1
    running: bool = False
    last_start: int = 0             # s
    version: str = ""
    message: str = ""
    failures: int = 0
    next_try: float = 0.0           # monotonic
    alarmed_at: float = 0.0
    busy: bool = False              # an operation or a keep-alive start is in progress
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    figures: tuple = (0.0, 0.0, 0, 0)   # cpu, mem, fd, mem_bytes
    breaches: int = 0
    cgroup: object = None
    cg_counters: tuple = (0, 0)
    next_health: float = 0.0
    next_cron: float = 0.0          # s since the epoch; 0 = not on a schedule
    down_why: str = ""              # why the agent took it down (health, resources): the restart event says so
    reported: tuple | None = None
    reported_at: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name): the registration's key on this host."""
        return self.namespace, self.name

    def persist(self) -> dict:
        """The registration as one entry of `registry.json` (the spec as JSON with proto field names; runtime figures
        are not kept)."""
        return {"namespace": self.namespace, "name": self.name,
                "spec": json_format.MessageToDict(self.spec, preserving_proto_field_name=True),
                "labels_json": self.labels_json, "source": self.source, "registered_at": self.registered_at,
                "isauto": self.isauto, "armed": self.armed, "version": self.version, "last_start": self.last_start}


@dataclasses.dataclass
class CmdResult:
    """How a control command ended: `ok` when it exited 0, its exit code (None when it did not run to its end: then
    `problem` says why), and its output decoded as UTF-8 (at most `procs.max_output_bytes`)."""
    ok: bool                        # exited 0
    exit_code: int | None
    output: str
    problem: str = ""               # timed out, user unknown, could not start: the command did not run to its end


class ProcManager:
    """Supervision of the processes registered on this host (see the module docstring)."""

    def __init__(self, cfg: ProcConfig, data_dir: str, *, send: Callable[[pb.AgentFrame], bool],
                 submit: Callable[[int, list[bytes]], None] | None, identity: Callable[[], dict],
                 plugins: Callable[[], dict] | None, pools: Pools, kill_grace_s: float = 3.0):
        self.cfg = cfg
        self.dir = Path(data_dir) / "procs"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.send = send
        self.submit = submit
        self.identity = identity        # {"bk_agent_id", "cloud_id", "ip", "version"}
        self.plugins = plugins or (lambda: {})
        self.pools = pools
        self.kill_grace_s = kill_grace_s
        self.procs: dict[tuple[str, str], Proc] = {}
        self.results: dict[tuple[str, str, str], pb.ProcOpResult] = {}
        self.inflight: set[tuple[str, str, str]] = set()
        self.acked: collections.OrderedDict = collections.OrderedDict()
        self.sampler = Sampler()
        self.cgroups = CgroupV2(cfg.cgroup_root)
        self._tasks: list[asyncio.Task] = []
        self._spawned: set[asyncio.Task] = set()
        self._dirty_states: set[tuple[str, str]] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._attached = False

    # ---- persistence ------------------------------------------------------------------------------

    def _save(self) -> None:
        doc = {"version": 1, "procs": [p.persist() for p in self.procs.values()]}
        write_private(self.dir / "registry.json", json.dumps(doc, separators=(",", ":")).encode())

    def _save_results(self) -> None:
        doc = [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in self.results.values()]
        write_private(self.dir / "results.json", json.dumps(doc, separators=(",", ":")).encode(), sync=False)

    def _load(self) -> None:
        path = self.dir / "registry.json"
        if path.exists():
            try:
                for d in json.loads(path.read_text())["procs"]:
                    spec = json_format.ParseDict(d["spec"], pb.ProcSpec(), ignore_unknown_fields=True)
                    p = Proc(d["namespace"], d["name"], spec, d.get("labels_json", ""), d.get("source", "api"),
                             int(d.get("registered_at", 0)), bool(d.get("isauto")), bool(d.get("armed")),
                             version=d.get("version", ""), last_start=int(d.get("last_start", 0)))
                    self.procs[p.key] = p
            except (OSError, ValueError, KeyError, TypeError, json_format.ParseError) as exc:
                log.error("process registry unreadable; starting without it", extra={"error": repr(exc)})
        path = self.dir / "results.json"
        if path.exists():
            try:
                for d in json.loads(path.read_text()):
                    r = json_format.ParseDict(d, pb.ProcOpResult(), ignore_unknown_fields=True)
                    self.results[(r.task_id, r.namespace, r.name)] = r
            except (OSError, ValueError, json_format.ParseError) as exc:
                log.error("process results journal unreadable; dropped", extra={"error": repr(exc)})

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the registry and kept results, auto-load plugins, note which processes run now, and start the liveness,
        sampling and plugin-scan loops."""
        self._load()
        self._scan_plugins()
        for p in self.procs.values():
            p.running, p.pid = proc_alive(p.spec)
            if p.isauto:
                self._schedule_cron(p)
        log.info("process supervision resumed", extra={"registrations": len(self.procs),
                                                       "supervised": sum(p.isauto for p in self.procs.values()),
                                                       "cgroup_v2": self.cgroups.available})
        self._tasks = [asyncio.ensure_future(c) for c in (self._check_loop(), self._sample_loop(), self._scan_loop())]

    async def stop(self) -> None:
        """Cancel the loops and in-flight operations (their commands' process groups are killed), waiting up to 5 s;
        supervised processes keep running."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for t in list(self._spawned):
            t.cancel()
        if self._spawned:
            await asyncio.wait(self._spawned, timeout=5)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._spawned.add(t)
        t.add_done_callback(self._spawned.discard)
        return t

    # ---- plugin auto-load -------------------------------------------------------------------------

    def _scan_plugins(self) -> None:
        found, problems = scan_plugins(self.cfg.plugin_dir)
        for why in problems:
            log.error("plugin descriptor refused", extra={"reason": why})
        seen = set()
        changed = False
        for d in found:
            seen.add((d.namespace, d.name))
            p = self.procs.get((d.namespace, d.name))
            if p is not None and p.source != "plugin":
                continue        # registered through the API: the API's definition wins
            if p is None:
                p = self.procs[(d.namespace, d.name)] = Proc(d.namespace, d.name, d.spec, "", "plugin",
                                                             int(time.time() * 1000), isauto=True, armed=True)
                p.version = d.version
                log.info("plugin auto-loaded", extra={"plugin": d.name, "descriptor": d.path})
                changed = True
            elif p.spec != d.spec:
                p.spec = d.spec
                changed = True
            self._dirty_states.add(p.key)
        for key in [k for k, p in self.procs.items() if p.source == "plugin" and k not in seen]:
            log.info("plugin descriptor gone; no longer supervised", extra={"plugin": key[1]})
            del self.procs[key]
            changed = True
        if changed:
            self._save()
            self._schedule()

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.plugin_scan_interval_s)
            try:
                self._scan_plugins()
            except OSError as exc:
                log.warning("plugin directory scan failed", extra={"error": str(exc)})

    # ---- commands ---------------------------------------------------------------------------------

    async def _run(self, p: Proc, command: str, timeout: int) -> CmdResult:
        """Run `command` as the registration's user, in its setup_path, killed at `timeout` s."""
        chunks: list[bytes] = []
        final: list = []

        def _on_update(u) -> None:
            if u.output_chunk:
                chunks.append(u.output_chunk)
            if u.is_final:
                final.append(u)

        line = f"cd -- {shlex.quote(p.spec.setup_path)} && {command}"
        run = TaskRun(f"proc:{p.namespace}:{p.name}", p.spec.user or "root", [], [AtomicTask(0, line, timeout)], {},
                      _on_update, max_output_bytes=self.cfg.max_output_bytes, kill_grace_s=self.kill_grace_s)
        try:
            await run.run()
        except asyncio.CancelledError:
            run.terminate()
            raise
        out = b"".join(chunks).decode("utf-8", "replace")
        u = final[-1] if final else None
        if u is None:
            return CmdResult(False, None, out, "the command did not report an end")
        if u.error_code == ErrorCode.USER_NOT_FOUND:
            return CmdResult(False, None, out, f"user {p.spec.user!r} does not exist on this host")
        if u.status == ScriptStatus.TIMEOUT:
            return CmdResult(False, None, out, f"killed after op_timeout ({timeout} s)")
        if u.exit_code is None:
            return CmdResult(False, None, out, u.error_msg or "the command could not run")
        return CmdResult(u.exit_code == 0, u.exit_code, out)

    def _alive(self, p: Proc) -> bool:
        p.running, p.pid = proc_alive(p.spec)
        return p.running

    async def _wait_alive(self, p: Proc, want: bool, within: float) -> bool:
        """Whether the process is (want=True) or is no longer (want=False) running after up to `within` s."""
        deadline = time.monotonic() + within
        while True:
            if self._alive(p) == want:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _start(self, p: Proc, command: str | None = None) -> tuple[int, str, str]:
        """Run the start (or given) command and post-check: (error_code, error_msg, output)."""
        s = p.spec
        res = await self._run(p, command or s.start_cmd, _secs(s.op_timeout, DEF_TIMEOUT))
        if res.problem:
            return ErrorCode.FAILED, res.problem, res.output
        p.last_start = int(time.time())
        if s.auto_type == ONE_SHOT:
            self._alive(p)
            if res.ok:
                return ErrorCode.OK, "", res.output
            return ErrorCode.FAILED, f"start_cmd exited with {res.exit_code}", res.output
        if not res.ok and not self._alive(p):
            return (ErrorCode.PROC_CHECK_FAILED,
                    f"start post-check failed: start_cmd exited with {res.exit_code} and {s.pid_path} names no "
                    f"running {s.proc_name or 'process'}", res.output)
        await asyncio.sleep(_secs(s.start_check_secs, DEF_START_CHECK))
        if self._alive(p):
            self._refresh_version(p)
            return ErrorCode.OK, "", res.output
        return (ErrorCode.PROC_CHECK_FAILED, f"start post-check failed: {s.pid_path} names no running "
                f"{s.proc_name or 'process'} {_secs(s.start_check_secs, DEF_START_CHECK)} s after start",
                res.output)

    async def _stop(self, p: Proc, command: str, sig: int) -> tuple[int, str, str]:
        """Run the stop (or kill) command, or signal the pid when there is none; post-check it is gone."""
        pid = p.pid
        out = ""
        if command:
            res = await self._run(p, command, _secs(p.spec.op_timeout, DEF_TIMEOUT))
            if res.problem:
                return ErrorCode.FAILED, res.problem, res.output
            out = res.output
        elif pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        within = _secs(p.spec.stop_check_secs, DEF_STOP_CHECK)
        if await self._wait_alive(p, False, within):
            return ErrorCode.OK, "", out
        return ErrorCode.PROC_CHECK_FAILED, f"stop post-check failed: still running {within} s later (pid {p.pid})", out

    def _refresh_version(self, p: Proc) -> None:
        if p.spec.version_cmd:
            self._spawn(self._version(p))

    async def _version(self, p: Proc) -> None:
        res = await self._run(p, p.spec.version_cmd, min(_secs(p.spec.op_timeout, DEF_TIMEOUT), 30))
        if res.ok:
            v = (res.output.strip().splitlines() or [""])[0].strip()[:64]
            if v != p.version:
                p.version = v
                self._save()
                self._changed(p)

    def _keepalive_version(self, p: Proc) -> str:
        """The version the plugin of this name announces on the message socket (spec section 9), if any."""
        info = self.plugins().get(p.name)
        return str(info.get("version", "")) if isinstance(info, dict) else ""

    # ---- operations -------------------------------------------------------------------------------

    def on_ops(self, msg: pb.ProcOperations) -> None:
        """A ProcOperations frame: each (task, process) runs once; a repeat is answered with the kept result."""
        for op in msg.ops:
            key = (msg.task_id, op.namespace, op.name)
            if key in self.inflight:
                continue
            if key in self.results:
                self._schedule()
                continue
            if key in self.acked:
                continue
            self.inflight.add(key)
            with trace(task_id=msg.task_id, request_id=msg.request_id):
                self._spawn(self._op(msg.task_id, op))

    async def _op(self, task_id: str, op: pb.ProcOperation) -> None:
        key = (task_id, op.namespace, op.name)
        try:
            try:
                async with self.pools.slot("proc"):
                    code, msg, content = await self._execute(op)
            except Busy as exc:
                code, msg, content = ErrorCode.FAILED, str(exc), ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed operation ends its target, never the agent
                log.exception("process operation failed", extra={"op_type": op.op_type, "proc": op.name})
                code, msg, content = ErrorCode.FAILED, f"agent error: {exc!r}", ""
            if not content:
                content = self._control_content(op.namespace, op.name, op.spec.setup_path, msg, False)
            OPS.labels(str(op.op_type), str(int(code))).inc()
            log.info("process operation done", extra={"op_type": op.op_type, "namespace": op.namespace,
                                                      "proc": op.name, "error_code": int(code), "error_msg": msg})
            self.results[key] = pb.ProcOpResult(task_id=task_id, namespace=op.namespace, name=op.name,
                                                error_code=int(code), error_msg=msg, content=content)
            self._save_results()
        finally:
            self.inflight.discard(key)
        self._schedule()

    def _control_content(self, namespace: str, name: str, setup_path: str, result: str, isauto: bool) -> str:
        """`content` of a control operation (spec section 8): exactly one element in `value`."""
        p = self.procs.get((namespace, name))
        return json.dumps({"value": [{
            "bk_agent_id": self.identity()["bk_agent_id"], "procName": p.spec.proc_name if p else name,
            "setupPath": p.spec.setup_path if p else setup_path, "result": result,
            "isAuto": p.isauto if p else isauto}]}, ensure_ascii=False)

    def _status_content(self, p: Proc | None, name: str) -> str:
        """`content` of op 2 (spec section 8)."""
        now = time.time()
        running = p is not None and self._alive(p)
        cpu, mem = (p.figures[0], p.figures[1]) if p else (0.0, 0.0)
        inst = {"processName": p.spec.proc_name if p else name, "version": self._version_of(p) if p else "",
                "isAuto": bool(p and p.isauto), "cpuUsage": cpu, "phyMemUsage": mem,
                "pid": p.pid if running else -1, "report_time": int(now)}
        return json.dumps({
            "bk_agent_id": self.identity()["bk_agent_id"],
            "utctime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
            "utctime2": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
            "timezone": int((time.localtime(now).tm_gmtoff or 0) // 3600),
            "process": [{"procname": name, "instance": [inst]}]}, ensure_ascii=False)

    def _version_of(self, p: Proc) -> str:
        return p.version or self._keepalive_version(p)

    def _define(self, op: pb.ProcOperation) -> Proc:
        """Take the operation's spec as the registration's (a new one, or the new definition of one)."""
        p = self.procs.get((op.namespace, op.name))
        if p is None:
            p = Proc(op.namespace, op.name, op.spec, op.labels_json, "api",
                     op.registered_at or int(time.time() * 1000))
            self.procs[p.key] = p
            self._alive(p)
        else:
            rule_changed = (p.spec.auto_type, p.spec.crontab_rule) != (op.spec.auto_type, op.spec.crontab_rule)
            p.spec, p.source = op.spec, "api"
            if rule_changed and p.isauto:
                self._schedule_cron(p)
            if op.labels_json:
                p.labels_json = op.labels_json
            if op.registered_at:
                p.registered_at = op.registered_at
        return p

    async def _execute(self, op: pb.ProcOperation) -> tuple[int, str, str]:
        if not self.cfg.enabled:
            return ErrorCode.FAILED, "process management is disabled in this agent's configuration (procs.enabled)", ""
        if op.op_type not in KNOWN_OPS:
            return ErrorCode.PROC_BAD_OP, f"unknown op_type {op.op_type}", ""
        if op.HasField("spec"):
            why = path_problem(op.spec)
            if why:
                return ErrorCode.FAILED, why, ""
        key = (op.namespace, op.name)
        if op.op_type == OP_FORGET:
            p = self.procs.pop(key, None)
            if p is not None:
                if op.registered_at and p.registered_at > op.registered_at:
                    self.procs[key] = p         # registered again after the unregister that sent this
                    return ErrorCode.OK, "registered again since; kept", ""
                self.cgroups.remove(*key)
                self._save()
                self._dirty_states.add(key)
            return ErrorCode.OK, "", ""
        if op.HasField("spec"):
            p = self._define(op)
            self._save()
        else:
            p = self.procs.get(key)
            if p is None:
                return ErrorCode.FAILED, f"process {op.namespace}:{op.name} is not registered on this host", ""
        if op.op_type == OP_DEFINE:
            self._changed(p)
            return ErrorCode.OK, "", ""
        async with p.lock:
            p.busy = True
            try:
                code, msg, out = await self._control(p, op.op_type)
            finally:
                p.busy = False
        self._save()
        self._changed(p)
        if op.op_type == OP_STATUS:
            return code, msg, out
        return code, msg, self._control_content(p.namespace, p.name, p.spec.setup_path, out or msg, p.isauto)

    async def _control(self, p: Proc, op_type: int) -> tuple[int, str, str]:
        s = p.spec
        if op_type == OP_STATUS:
            return ErrorCode.OK, "", self._status_content(p, p.name)
        if op_type == OP_SUPERVISE:
            if s.auto_type == SCHEDULED:
                return self._arm_schedule(p)
            p.isauto = True
            p.armed = self._alive(p)
            p.failures = 0
            return ErrorCode.OK, "", ""
        if op_type == OP_UNSUPERVISE:
            p.isauto = p.armed = False
            p.next_cron = 0.0
            return ErrorCode.OK, "", ""
        if op_type == OP_START:
            if s.auto_type != ONE_SHOT and self._alive(p):
                p.isauto, p.armed = True, s.auto_type == RESIDENT
                if s.auto_type == SCHEDULED:
                    self._arm_schedule(p)
                return ErrorCode.PROC_ALREADY_RUNNING, f"already running (pid {p.pid})", ""
            if s.auto_type == SCHEDULED:
                return self._arm_schedule(p)
            code, msg, out = await self._start(p)
            if code == ErrorCode.OK:
                p.isauto, p.armed, p.failures = True, s.auto_type == RESIDENT, 0
            return code, msg, out
        if op_type in (OP_STOP, OP_KILL):
            was = p.isauto
            p.isauto = p.armed = False
            p.next_cron = 0.0
            if not self._alive(p):
                return ErrorCode.PROC_NOT_RUNNING, "not running", ""
            code, msg, out = await self._stop(p, s.stop_cmd if op_type == OP_STOP else s.kill_cmd,
                                              signal.SIGTERM if op_type == OP_STOP else signal.SIGKILL)
            if code != ErrorCode.OK:
                p.isauto = was
                self._schedule_cron(p)
            return code, msg, out
        if op_type == OP_RESTART:
            if s.auto_type == SCHEDULED:
                out = ""
                if self._alive(p):
                    code, msg, out = await self._stop(p, s.stop_cmd, signal.SIGTERM)
                    if code != ErrorCode.OK:
                        return code, msg, out
                code, msg, out2 = self._arm_schedule(p)
                return code, msg, out + out2
            if s.restart_cmd:
                code, msg, out = await self._start(p, s.restart_cmd)
            else:
                out = ""
                if self._alive(p):
                    code, msg, out = await self._stop(p, s.stop_cmd, signal.SIGTERM)
                    if code != ErrorCode.OK:
                        return code, msg, out
                code, msg, out2 = await self._start(p)
                out += out2
            if code == ErrorCode.OK:
                p.isauto, p.armed, p.failures = True, s.auto_type == RESIDENT, 0
            return code, msg, out
        if op_type == OP_RELOAD:
            if not s.reload_cmd:
                return ErrorCode.FAILED, "no reload_cmd is registered for this process", ""
            res = await self._run(p, s.reload_cmd, _secs(s.op_timeout, DEF_TIMEOUT))
            if res.problem:
                return ErrorCode.FAILED, res.problem, res.output
            await asyncio.sleep(min(1.0, _secs(s.start_check_secs, DEF_START_CHECK)))
            if self._alive(p):
                return ErrorCode.OK, "", res.output
            return ErrorCode.PROC_CHECK_FAILED, f"reload post-check failed: {s.pid_path} names no running process", \
                res.output
        return ErrorCode.PROC_BAD_OP, f"unknown op_type {op_type}", ""

    # ---- keep-alive, schedules, health ------------------------------------------------------------

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_interval_s)
            try:
                self._check()
            except Exception:  # noqa: BLE001 - supervision goes on whatever one pass met
                log.exception("supervision pass failed")

    def _check(self) -> None:
        now, wall = time.monotonic(), time.time()
        for p in list(self.procs.values()):
            # A time of the rule is used up whether it runs or is skipped (a run still going, the process running):
            # a skipped time is never run late.
            due = bool(p.isauto and p.spec.auto_type == SCHEDULED and p.next_cron and wall >= p.next_cron)
            if due:
                self._schedule_cron(p)
            if p.busy:
                continue
            was = p.running
            alive = self._alive(p)
            if alive != was:
                self._changed(p)
            if alive:
                p.down_why = ""
                if p.isauto and not p.armed and p.spec.auto_type == RESIDENT:
                    p.armed = True
                    self._save()
                if p.failures:
                    p.failures = 0
                if p.isauto and p.spec.health_cmd and now >= p.next_health:
                    p.next_health = now + _secs(p.spec.health_check_secs, DEF_HEALTH)
                    self._spawn(self._health(p))
                continue
            if not p.isauto:
                continue
            if p.spec.auto_type == RESIDENT and p.armed and now >= p.next_try:
                p.busy = True
                why = p.down_why or ("process exited" if was else "process not running")
                self._spawn(self._restart(p, why))
            elif due:
                p.busy = True
                self._spawn(self._scheduled_run(p))

    async def _restart(self, p: Proc, why: str) -> None:
        try:
            async with p.lock:
                if not p.isauto or self._alive(p):
                    return
                log.info("supervised process down; starting it", extra={"namespace": p.namespace, "proc": p.name,
                                                                        "reason": why, "failures": p.failures})
                code, msg, out = await self._start(p)
            if code == ErrorCode.OK:
                RESTARTS.labels("ok").inc()
                p.failures, p.next_try = 0, 0.0
                self._event(p, "process_restart_success", f"{p.name} restarted ({why}), pid {p.pid}")
                self._save()
            else:
                RESTARTS.labels("failed").inc()
                p.failures += 1
                retries = _secs(p.spec.start_retries, DEF_RETRIES)
                p.message = f"restart failed ({p.failures} in a row): {msg}"
                if p.failures >= retries:
                    p.next_try = time.monotonic() + _secs(p.spec.start_interval, DEF_INTERVAL)
                    now = time.monotonic()
                    if p.failures == retries or now - p.alarmed_at >= ALARM_REPEAT_S:
                        p.alarmed_at = now
                        text = f"{p.name} failed to start {p.failures} times in a row: {msg} {out.strip()[-200:]}"
                        self._event(p, "process_restart_failed", text)
                        self._alarm(p, text)
                log.warning("supervised process did not start", extra={"proc": p.name, "failures": p.failures,
                                                                       "error": msg})
        finally:
            p.busy = False
            self._changed(p)

    def _schedule_cron(self, p: Proc) -> None:
        """Set `next_cron` to the rule's next time after now (0 with `message` saying why when there is none)."""
        if p.spec.auto_type != SCHEDULED:
            p.next_cron = 0.0
            return
        if not p.spec.crontab_rule:
            p.next_cron = 0.0
            p.message = "a scheduled process (auto_type 0) needs a crontab_rule"
            return
        from croniter import croniter
        try:
            p.next_cron = croniter(p.spec.crontab_rule, time.time()).get_next(float)
        except (ValueError, KeyError) as exc:
            p.next_cron = 0.0
            p.message = f"crontab_rule {p.spec.crontab_rule!r} is not valid: {exc}"

    def _arm_schedule(self, p: Proc) -> tuple[int, str, str]:
        """Put a scheduled process (auto_type 0) on its crontab_rule, supervised; nothing runs now. (code, message,
        output): 65535 when the rule is missing or not valid."""
        self._schedule_cron(p)
        if not p.next_cron:
            return ErrorCode.FAILED, p.message, ""
        p.isauto, p.armed, p.failures = True, False, 0
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.next_cron))
        return ErrorCode.OK, "", f"scheduled by crontab_rule {p.spec.crontab_rule!r}; next run at {at}"

    async def _scheduled_run(self, p: Proc) -> None:
        try:
            async with p.lock:
                if not p.isauto:
                    return          # taken off the schedule while this run waited for the lock
                p.last_start = int(time.time())
                self._changed(p)
                res = await self._run(p, p.spec.start_cmd, _secs(p.spec.op_timeout, DEF_TIMEOUT))
                p.message = "" if res.ok else (res.problem or f"scheduled run exited with {res.exit_code}")
        finally:
            p.busy = False
            self._changed(p)

    async def _health(self, p: Proc) -> None:
        if p.busy:
            return
        res = await self._run(p, p.spec.health_cmd, min(_secs(p.spec.op_timeout, DEF_TIMEOUT), 60))
        if res.ok or not p.isauto:
            return
        log.warning("health check failed; restarting", extra={"proc": p.name, "exit_code": res.exit_code})
        p.message = f"health_cmd failed: {res.problem or f'exit {res.exit_code}'}"
        await self._force_down(p, p.message)

    async def _force_down(self, p: Proc, why: str) -> None:
        """Take a misbehaving supervised process down (stop_cmd, then SIGKILL); keep-alive starts it again, its
        restart event giving `why`."""
        async with p.lock:
            p.busy = True
            try:
                if self._alive(p):
                    p.down_why = why
                    code, _m, _o = await self._stop(p, p.spec.stop_cmd, signal.SIGTERM)
                    if code != ErrorCode.OK and p.pid > 0:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(p.pid, signal.SIGKILL)
            finally:
                p.busy = False

    # ---- figures and resource limits --------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sample_interval_s)
            try:
                await self._sample()
            except Exception:  # noqa: BLE001
                log.exception("process sampling failed")

    async def _sample(self) -> None:
        live = [p for p in self.procs.values() if p.running and p.pid > 0]
        figures = await asyncio.to_thread(self.sampler.sample, [p.pid for p in live])
        for p in live:
            f = figures.get(p.pid)
            if f is None:
                continue
            p.figures = (f.cpu, f.mem, f.fd, f.mem_bytes)
            self._changed(p, figures_only=True)
            if p.spec.cpu <= 0 and p.spec.mem <= 0:
                continue
            if p.cgroup is None and self.cgroups.available:
                pids = [p.pid]
                p.cgroup = self.cgroups.apply(p.namespace, p.name, p.spec.cpu, p.spec.mem, pids, self.sampler.ncpu,
                                              self.sampler.total_mem)
            if p.cgroup is not None:
                counters = self.cgroups.counters(p.cgroup)
                mem_hit, cpu_hit = counters[0] > p.cg_counters[0], counters[1] > p.cg_counters[1]
                p.cg_counters = counters
                over = mem_hit or cpu_hit
            else:
                over = (p.spec.cpu > 0 and f.cpu > p.spec.cpu) or (p.spec.mem > 0 and f.mem > p.spec.mem)
            p.breaches = p.breaches + 1 if over else 0
            if p.breaches >= self.cfg.resource_breach_samples:
                p.breaches = 0
                text = (f"{p.name} over its limits: cpu {f.cpu}% (limit {p.spec.cpu or '-'}), memory {f.mem}% "
                        f"(limit {p.spec.mem or '-'})")
                self._event(p, "process_resource_limit_exceed", text)
                p.message = text
                if p.isauto and p.cgroup is None and not p.busy:
                    self._spawn(self._force_down(p, "over its resource limits"))

    # ---- events and alarms ------------------------------------------------------------------------

    def _event(self, p: Proc, event_name: str, content: str) -> None:
        """One process event on DataID 1100008 (spec section 8)."""
        EVENTS.labels(event_name).inc()
        log.info("process event", extra={"event_name": event_name, "proc": p.name, "content": content})
        if self.submit is None:
            return
        ident = self.identity()
        ip, cloud = ident.get("ip", ""), ident.get("cloud_id", 0)
        labels = {}
        with contextlib.suppress(ValueError, TypeError):
            labels = json.loads(p.labels_json) if p.labels_json else {}
        record = {"data": [{
            "dimension": {"bk_target_cloud_id": str(cloud), "bk_target_ip": ip,
                          "process_group_id": str(labels.get("process_group_id", "")) if isinstance(labels, dict)
                          else "", "process_index": f"{p.namespace}:{p.name}", "process_name": p.spec.proc_name
                          or p.name, "bk_agent_id": ident["bk_agent_id"], "agent_version": ident.get("version", "")},
            "event": {"content": content}, "event_name": event_name, "target": f"{ip}|{cloud}",
            "timestamp": int(time.time() * 1000)}], "data_id": DATAID_PROC_EVENT}
        self.submit(DATAID_PROC_EVENT, [json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()])

    def _alarm(self, p: Proc, text: str) -> None:
        """A type-101 alarm record on DataID 1000 (spec section 10)."""
        if self.submit is None:
            return
        ident = self.identity()
        host = alarmrecord.AlarmHost(ident.get("ip", ""), int(ident.get("cloud_id", 0)), ident["bk_agent_id"])
        rec = alarmrecord.alarm_record(alarmrecord.TYPE_PROCESS, [host], server=host.ip, desc=text, extra={
            "process": {"namespace": p.namespace, "name": p.name, "proc_name": p.spec.proc_name,
                        "failures": p.failures}})
        self.submit(alarmrecord.DATAID_ALARM, [alarmrecord.encode(rec)])

    # ---- reports to the task server ---------------------------------------------------------------

    def _state(self, p: Proc) -> pb.ProcState:
        cpu, mem, fd, mem_bytes = p.figures if p.running else (0.0, 0.0, 0, 0)
        return pb.ProcState(namespace=p.namespace, name=p.name, registered=True,
                            status=RUNNING if p.running else STOPPED, isauto=p.isauto, pid=p.pid if p.running else -1,
                            version=self._version_of(p), cpu_usage=cpu, mem_usage=mem, fd=fd,
                            last_start_time=p.last_start, report_time=int(time.time()), message=p.message,
                            source=p.source, registered_at=p.registered_at, labels_json=p.labels_json,
                            mem_bytes=mem_bytes)

    def _sig(self, p: Proc) -> tuple:
        """What a report is sent again for when it changes (figures aside): running, isauto, pid, version, message
        and the last start (a scheduled run changes only that)."""
        return p.running, p.isauto, p.pid, self._version_of(p), p.message, p.last_start

    def _changed(self, p: Proc, figures_only: bool = False) -> None:
        """Report the registration's state if it changed (figures alone: at most every status_min_interval_s)."""
        sig = self._sig(p)
        if p.reported == sig:
            if not figures_only or time.monotonic() - p.reported_at < self.cfg.status_min_interval_s:
                return
        self._dirty_states.add(p.key)
        self._schedule()

    def on_attach(self) -> None:
        """A new session: every registration's state (full inventory) and every kept result, again."""
        self._attached = True
        states = [self._state(p) for p in self.procs.values()]
        for p in self.procs.values():
            p.reported, p.reported_at = self._sig(p), time.monotonic()
        self._dirty_states.clear()
        report = pb.ProcReport(results=list(self.results.values()), states=states, full=True)
        self.send(pb.AgentFrame(proc_report=report))

    def on_ack(self, ack: pb.ProcAck) -> None:
        """The `proc_ack` frame handler: drop the acknowledged results (a repeat of one of those operations is then
        ignored, for the last 4,096) and rewrite the journal."""
        dropped = False
        for ref in ack.items:
            key = (ref.task_id, ref.namespace, ref.name)
            if self.results.pop(key, None) is not None:
                dropped = True
                self.acked[key] = True
                if len(self.acked) > _ACKED_KEEP:
                    self.acked.popitem(last=False)
        if dropped:
            self._save_results()

    def _schedule(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send one ProcReport with every kept result and the states that changed (a registration gone reports
        `registered` false); changed states are sent again later when the agent is not attached."""
        self._flush_handle = None
        report = pb.ProcReport(results=list(self.results.values()))
        for key in self._dirty_states:
            p = self.procs.get(key)
            if p is None:
                report.states.append(pb.ProcState(namespace=key[0], name=key[1], registered=False,
                                                  report_time=int(time.time())))
                continue
            report.states.append(self._state(p))
            p.reported, p.reported_at = self._sig(p), time.monotonic()
        if not report.results and not report.states:
            return
        if self.send(pb.AgentFrame(proc_report=report)):
            self._dirty_states.clear()

    # ---- what the operator sees -------------------------------------------------------------------

    def health(self) -> dict:
        """The supervision figures of the agent's /healthz: registrations, supervised, running, unacknowledged results
        and whether cgroup v2 is used."""
        return {"registrations": len(self.procs), "supervised": sum(p.isauto for p in self.procs.values()),
                "running": sum(p.running for p in self.procs.values()), "results_unacked": len(self.results),
                "cgroup_v2": self.cgroups.available}

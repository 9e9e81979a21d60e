"""procmgr's service: registrations, operations, results and status of processes on hosts (spec sections 3, 8).

- **Registrations and wanted states** are `ProcRecord`s in Redis (through dbproxy): a procmgr or task server
  restart loses nothing. An operation that carries a spec (operate_proc_multi) defines the process as well;
  one without (v1 operate_proc) uses the stored definition, else the one the agent holds, else the agent
  answers 65535 "not registered".
- **Operations** become one `ProcOperations` frame per agent (agents with the same operations share one
  serialized frame), sent through the task servers holding the agents, one `DispatchBatch` call per task
  server. Offline agents are answered 117 at once, unknown op_types 832; both without reaching an agent.
  The task record keeps the frames: `Watcher` sends them again to agents that have not answered after
  `redispatch_after_s` (an agent runs each (task, process) once), answers 117 for agents gone longer than
  `offline_grace_s`, and 65535 for what has no result at the task's deadline.
- **Results and status** are read from Redis: `ProcResults` of a task (one read for any number of targets),
  `ProcRecord` per (host, process) for status (one read for 2,000 hosts): status queries never reach agents.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from gse.apiserver.agents_view import AgentsView
from gse.common import dbclient as db
from gse.common.address import parse_host_id
from gse.common.errors import ErrorCode, GseError, Unavailable
from gse.common.peers import Peers
from gse.common.records import (AgentAddress, AgentRecord, ProcGroups, ProcIndex, ProcOpenTasks, ProcRecord,
                                ProcResult, ProcResults, ProcTask, TaskTarget, new_task_id, now_ms, valid_agent_id)
from gse.common.records.proc import WANT_NONE, WANT_RUNNING, WANT_STOPPED, spec_digest
from gse.common.rpc import trace_metadata
from gse.pb import agent_pb2 as apb
from gse.pb import procmgr_pb2 as pb
from gse.pb import procmgr_pb2_grpc as pb_grpc
from gse.pb import taskserver_pb2 as tpb

log = logging.getLogger("gse.procmgr")

OPERATIONS = Counter("gse_procmgr_operations_total", "Process operations accepted, per target", ["op_type"])
REDISPATCHED = Counter("gse_procmgr_redispatched_total", "Operations sent again to agents that had not answered")
EXPIRED = Counter("gse_procmgr_expired_total", "Targets ended by procmgr", ["code"])

API_OPS = frozenset({0, 1, 2, 3, 4, 7, 8, 9})
OP_DEFINE, OP_FORGET = 100, 101
SESSION = ("agent_id", "online", "deadline", "node", "cloud_id", "ip")
CHUNK = 20_000
DEF_TIMEOUT, DEF_START_CHECK, DEF_STOP_CHECK = 60, 5, 5

# What status answers read of a ProcRecord (never the spec: status for 2,000 hosts reads only these).
NAMES_WITH_SPEC = ("registered", "spec_digest", "register_time", "registered_at", "labels", "flag", "want_auto")
NAMES_NO_SPEC = ("registered", "spec", "register_time", "registered_at", "labels", "flag", "want_auto")
STATUS_FIELDS = ("registered", "labels", "register_time", "flag", "agent_registered", "status", "isauto", "pid",
                 "version", "message", "last_start_time", "report_time", "cpu_usage", "mem_usage", "fd",
                 "agent_labels", "agent_registered_at", "cloud_id", "ip")
WANTED = {0: (WANT_RUNNING, True), 7: (WANT_RUNNING, True), 8: (WANT_RUNNING, True), 1: (WANT_STOPPED, False),
          9: (WANT_STOPPED, False), 3: (None, True), 4: (None, False)}


def control_content(agent_id: str, name: str, setup_path: str, result: str) -> str:
    """The `content` procmgr answers for a target it ends itself (spec section 8: always JSON, one element)."""
    return json.dumps({"value": [{"bk_agent_id": agent_id, "procName": name, "setupPath": setup_path,
                                  "result": result, "isAuto": False}]}, ensure_ascii=False)


def op_budget_s(op_type: int, spec: apb.ProcSpec | None) -> int:
    """How long an operation may take on the agent: its commands' op_timeout and post-check waits."""
    t = (spec.op_timeout if spec and spec.op_timeout > 0 else DEF_TIMEOUT)
    start = spec.start_check_secs if spec and spec.start_check_secs > 0 else DEF_START_CHECK
    stop = spec.stop_check_secs if spec and spec.stop_check_secs > 0 else DEF_STOP_CHECK
    return (2 * t if op_type == 7 else t) + start + stop


@dataclass
class Resolved:
    """A request's target: its key forms and its agent's session (None: never seen)."""
    target: pb.Target
    agent_id: str                   # the bk_agent_id, or the requested id when it never resolved
    record: AgentRecord | None

    @property
    def cloud_ip(self) -> tuple[int, str]:
        """(bk_cloud_id, ip) of the target: as named by host or as "cloud:ip", else from the agent's session, else (0,
        "")."""
        t = self.target
        if t.by_host:
            return t.cloud_id, t.ip
        h = parse_host_id(t.requested)
        if h is not None:
            return h
        if self.record is not None:
            return self.record.cloud_id, self.record.ip
        return 0, ""

    def task_target(self, namespace: str, name: str) -> TaskTarget:
        """The target as stored in the task record (ProcTask.targets) for process `namespace`/`name`."""
        cloud, ip = self.cloud_ip
        t = self.target
        return TaskTarget(t.requested, self.agent_id, cloud, ip, t.supplier_id, t.by_host, namespace, name)

    def answer(self) -> pb.Target:
        """The target as answered to the API server: `agent_id` set only when the agent was ever seen."""
        cloud, ip = self.cloud_ip
        t = self.target
        return pb.Target(requested=t.requested, cloud_id=cloud, ip=ip, supplier_id=t.supplier_id, by_host=t.by_host,
                         agent_id=self.agent_id if self.record is not None else "")


class Dispatcher:
    """Sends frames to agents through the task servers holding them: one DispatchBatch call per server."""

    def __init__(self, peers: Peers, timeout_s: float):
        self.peers = peers
        self.timeout_s = timeout_s

    async def send(self, frames: dict[bytes, list[str]], nodes: dict[str, str]) -> list[tuple[str, int, str]]:
        """`frames`: serialized ServerFrame -> agent ids; `nodes`: agent id -> node. Failures (id, code, msg)."""
        parts: dict[str, list] = defaultdict(list)
        for frame, ids in frames.items():
            by_node: dict[str, list[str]] = defaultdict(list)
            for a in ids:
                by_node[nodes[a]].append(a)
            for node, nids in by_node.items():
                parts[node].append(tpb.DispatchRequest(frame=frame, agent_ids=nids))
        calls = [self._call(node, p) for node, p in parts.items()]
        return [f for fs in await asyncio.gather(*calls) for f in fs]

    async def _call(self, node: str, parts: list) -> list[tuple[str, int, str]]:
        ids = [a for p in parts for a in p.agent_ids]
        stub = self.peers.task(node)
        if stub is None:
            return [(a, ErrorCode.AGENT_OFFLINE, f"task server {node} holding the agent is gone") for a in ids]
        try:
            reply = await stub.DispatchBatch(tpb.DispatchBatchRequest(parts=parts), timeout=self.timeout_s,
                                             metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            log.warning("task server call failed", extra={"node": node, "code": exc.code().name})
            return [(a, ErrorCode.AGENT_OFFLINE, f"task server {node} unreachable: {exc.code().name}") for a in ids]
        return [(f.agent_id, f.code, f.message) for f in reply.failures]


class ProcStore:
    """The reads and writes of process records, in as few dbproxy round trips as the request allows."""

    def __init__(self, client: db.DbClient):
        self.db = client
        self.view = AgentsView(client)

    async def execute(self, ops: list) -> list:
        """Run dbproxy ops in order, in batches of CHUNK (20,000) ops; returns one Result per op. Raises what the
        DbClient raises (GseError, Unavailable) when dbproxy cannot be reached."""
        out = []
        for i in range(0, len(ops), CHUNK):
            out += await self.db.execute(ops[i:i + CHUNK])
        return out

    async def write(self, ops: list) -> None:
        """Run write ops; GseError naming the first failure when any op failed."""
        res = await self.execute(ops)
        bad = [r.error for r in res if not r.ok]
        if bad:
            raise GseError(f"storing process state failed: {bad[0]}")

    async def resolve(self, targets, then=None) -> tuple[list[Resolved], list]:
        """Every target with its bk_agent_id and session, and the results of `then(agent ids)` (ops to run
        once the ids are known: in the same round trip as the sessions). One round trip when no target is
        named as "cloud:ip", two otherwise."""
        requested = []
        for t in targets:
            if t.by_host:
                t.requested = f"{t.cloud_id}:{t.ip}"
            requested.append(t.requested)
        real = await self.view.resolve(requested)
        ids = [real.get(r) or r for r in requested]
        uniq = list(dict.fromkeys(real.values()))
        extra = then(ids) if then is not None else []
        results = await self.execute([AgentRecord.pick(a, names=SESSION) for a in uniq] + extra)
        records = {}
        for a, x in zip(uniq, results):
            rec = AgentRecord.decode(x, SESSION)
            if rec is not None:
                rec.agent_id = a
                records[a] = rec
        out = [Resolved(t, aid, records.get(aid) if t.requested in real else None)
               for t, aid in zip(targets, ids)]
        return out, results[len(uniq):]


class ProcServicer(pb_grpc.ProcServiceServicer):
    """The gRPC face of procmgr (see the module docstring). Errors of the store reach the caller as
    UNAVAILABLE (the API answers 1000503)."""

    def __init__(self, store: ProcStore, dispatcher: Dispatcher, *, offline_grace_ms: int, sync_cache_s: float = 5.0):
        self.store = store
        self.dispatcher = dispatcher
        self.offline_grace_ms = offline_grace_ms
        self.sync_cache_s = sync_cache_s
        self._ns_cache: dict[str, tuple[float, list[tuple[str, str]]]] = {}

    async def _guard(self, context, coro):
        try:
            return await coro
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        except GseError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, exc.message)

    # ---- operations -------------------------------------------------------------------------------

    async def Operate(self, request, context):
        """gRPC Operate: `operate` (operate_proc, operate_proc_v2, operate_proc_multi); store errors abort UNAVAILABLE
        or INTERNAL."""
        return await self._guard(context, self.operate(request))

    async def operate(self, request: pb.OperateRequest, internal: bool = False) -> pb.OperateReply:
        """Make a task of every (target, process) of `request.entries`; its id comes back at once (spec §3, §8).

        Each target is resolved to its agent; a spec in the request is stored as the definition (written only when
        its digest or labels changed), and an operation without one carries the stored spec. Unknown op_types
        answer 832 and offline agents 117 without being sent; the rest get one ProcOperations frame per distinct
        set of operations, through the task servers holding them, and a 115 placeholder result. An agent its task
        server could not reach answers the code the task server gave (117 when the server itself was unreachable).
        The task's deadline is the largest operation budget (`op_budget_s`) plus 30 s. `internal`: procmgr's own
        definition pushes (op types 100 define, 101 forget), which nobody polls."""
        task_id = new_task_id("GSEPROC")
        at = now_ms()
        t0 = time.perf_counter()
        targets = [t for e in request.entries for t in e.targets]
        entry_of = [e for e in request.entries for _t in e.targets]
        # The stored definitions, read with the sessions: digests for operations that carry a spec (is it a
        # new definition?), the spec itself for those that do not.
        names_of = [NAMES_WITH_SPEC if e.has_spec else NAMES_NO_SPEC for e in entry_of]
        resolved, reads = await self.store.resolve(targets, lambda ids: [
            ProcRecord.pick(a, e.namespace, e.name, names=n) for a, e, n in zip(ids, entry_of, names_of)])
        rows = list(zip(entry_of, resolved))
        stored = [ProcRecord.decode(x, n) for x, n in zip(reads, names_of)]
        t_resolved = t_read = time.perf_counter()
        task_targets: list[TaskTarget] = []
        own: dict[str, ProcResult] = {}
        placeholders: dict[str, ProcResult] = {}
        per_agent: dict[str, list[apb.ProcOperation]] = defaultdict(list)
        nodes: dict[str, str] = {}
        writes: list = []
        budget = 30
        for (e, r), rec in zip(rows, stored):
            tt = r.task_target(e.namespace, e.name)
            if tt.field in placeholders or tt.field in own:
                continue            # the same process on the same host twice in one request: once
            task_targets.append(tt)
            OPERATIONS.labels(str(e.op_type)).inc()
            spec_path = e.spec.setup_path if e.has_spec else ""
            if e.op_type not in API_OPS and not (internal and e.op_type in (OP_DEFINE, OP_FORGET)):
                own[tt.field] = ProcResult(ErrorCode.PROC_BAD_OP, f"unknown op_type {e.op_type}",
                                           control_content(tt.agent_id, e.name, spec_path, "unknown op_type"))
                continue
            registered = rec is not None and rec.registered
            op = apb.ProcOperation(namespace=e.namespace, name=e.name, op_type=e.op_type)
            first = not registered
            reg_at = at if first or not rec.registered_at else rec.registered_at
            if e.has_spec:
                op.spec.CopyFrom(e.spec)
                op.labels_json = e.labels_json
                if e.op_type == OP_DEFINE:
                    # Only definitions carry the time: agents with the same operation then share one frame.
                    op.registered_at = reg_at
            fields = {}
            if e.has_spec and e.op_type != OP_FORGET:
                spec_bytes = e.spec.SerializeToString(deterministic=True)
                digest = spec_digest(spec_bytes)
                if first or rec.spec_digest != digest or rec.labels != e.labels_json:
                    fields.update(registered=True, spec=spec_bytes, spec_digest=digest, labels=e.labels_json,
                                  registered_at=reg_at,
                                  unregistered_at=0, register_time=int(at / 1000) if first or not rec.register_time
                                  else rec.register_time)
                if first:
                    writes += ProcIndex.add_ops(r.agent_id, e.namespace, e.name)
            elif not e.has_spec and registered and rec.spec:
                op.spec.ParseFromString(rec.spec)
                op.labels_json = rec.labels
            flag, auto = WANTED.get(e.op_type, (None, None))
            if auto is not None and e.op_type != OP_DEFINE:
                if rec is None or rec.want_auto != auto:
                    fields["want_auto"] = auto
                if flag is not None and (rec is None or rec.flag != flag):
                    fields["flag"] = flag
            if fields:     # unchanged definitions and wanted states are not written again
                writes.append(ProcRecord.update(r.agent_id, e.namespace, e.name, **fields).op())
            if r.record is None or not r.record.alive(at):
                own[tt.field] = ProcResult(ErrorCode.AGENT_OFFLINE, "agent is offline",
                                           control_content(tt.agent_id, e.name, spec_path, "agent is offline"))
                continue
            per_agent[r.agent_id].append(op)
            nodes[r.agent_id] = r.record.node
            placeholders[tt.field] = ProcResult()
            budget = max(budget, op_budget_s(e.op_type, op.spec if op.HasField("spec") else None) + 30)
        # Agents with the same operations share one frame: group by the operations' bytes, then build each
        # distinct frame once (a broadcast to 5,000 hosts is one frame, however many entries named them).
        groups: dict[bytes, list[str]] = defaultdict(list)
        for aid, ops in per_agent.items():
            groups[b"".join(op.SerializeToString(deterministic=True) for op in ops)].append(aid)
        frames: dict[bytes, list[str]] = {}
        for agents in groups.values():
            frame = apb.ServerFrame(proc_ops=apb.ProcOperations(task_id=task_id, ops=per_agent[agents[0]],
                                                                request_id=request.request_id))
            frames[frame.SerializeToString(deterministic=True)] = agents
        task = ProcTask.update(task_id, created=at, request_id=request.request_id,
                               targets=[list(t) for t in task_targets],
                               frames=[[base64.b64encode(f).decode(), ids] for f, ids in frames.items()],
                               deadline=at + budget * 1000, internal=internal)
        writes += [task.op(), ProcResults.update(task_id, {**placeholders, **own}).op()]
        if placeholders:
            writes.append(ProcOpenTasks.add(task_id))
        t_built = time.perf_counter()
        written, failures = await asyncio.gather(self.store.write(writes), self.dispatcher.send(frames, nodes),
                                                 return_exceptions=True)
        log.info("process task accepted", extra={
            "task_id": task_id, "targets": len(task_targets), "dispatched": len(placeholders), "answered": len(own),
            "frames": len(frames), "writes": len(writes), "resolve_ms": round(1000 * (t_resolved - t0)),
            "read_ms": round(1000 * (t_read - t_resolved)), "build_ms": round(1000 * (t_built - t_read)),
            "send_ms": round(1000 * (time.perf_counter() - t_built))})
        if isinstance(written, BaseException):
            raise written
        if isinstance(failures, BaseException):
            raise failures
        if failures:
            failed = {a: (c, m) for a, c, m in failures}
            done = {tt.field: ProcResult(failed[tt.agent_id][0], failed[tt.agent_id][1],
                                         control_content(tt.agent_id, tt.name, "", failed[tt.agent_id][1]))
                    for tt in task_targets if tt.agent_id in failed and tt.field in placeholders}
            await self.store.write([ProcResults.update(task_id, done).op()])
        return pb.OperateReply(task_id=task_id)

    async def Result(self, request, context):
        """gRPC Result: `result` (get_proc_operate_result, _v2)."""
        return await self._guard(context, self.result(request.task_id))

    async def result(self, task_id: str) -> pb.TargetResults:
        """Every target of `task_id` in request order with its result (115 with empty message and content while
        running); `known` false when the task record is absent (never made, or past its one-day TTL)."""
        t, r = await self.store.execute([ProcTask.read(task_id), ProcResults.read(task_id)])
        task = ProcTask.decode(t)
        if task is None:
            return pb.TargetResults(known=False)
        results = ProcResults.decode(r)
        out = pb.TargetResults(known=True)
        for tt in task.task_targets():
            res = results.get(tt.field) or ProcResult()
            out.results.append(pb.TargetResult(
                target=pb.Target(requested=tt.requested, agent_id=tt.agent_id, cloud_id=tt.cloud_id, ip=tt.ip,
                                 supplier_id=tt.supplier_id, by_host=tt.by_host),
                namespace=tt.namespace, name=tt.name, error_code=res.error_code,
                error_msg=res.error_msg if res.final else "", content=res.content if res.final else ""))
        return out

    # ---- registrations (v1 register/update/unregister_proc_info) ----------------------------------

    async def Define(self, request, context):
        """gRPC Define: `define` (register_proc_info, update_proc_info, unregister_proc_info)."""
        return await self._guard(context, self.define(request))

    async def define(self, request: pb.DefineRequest) -> pb.TargetResults:
        """Register (action 1: 850 when already registered), update (2: registers when absent) or unregister (3: 829
        when not registered; leaves a tombstone) the entries' processes on their targets, answered per target at once.
        Agents online now get the change pushed as an internal task; a push that fails is logged, not answered."""
        at = now_ms()
        rows = []
        targets = [t for e in request.entries for t in e.targets]
        resolved, _ = await self.store.resolve(targets)
        i = 0
        for e in request.entries:
            for _t in e.targets:
                rows.append((e, resolved[i]))
                i += 1
        names = ("registered", "register_time", "registered_at")
        stored = [ProcRecord.decode(x, names) for x in await self.store.execute(
            [ProcRecord.pick(r.agent_id, e.namespace, e.name, names=names) for e, r in rows])]
        writes, out = [], pb.TargetResults(known=True)
        push = []
        for (e, r), rec in zip(rows, stored):
            registered = rec is not None and rec.registered
            code, msg = ErrorCode.OK, ""
            if request.action == 1 and registered:
                code, msg = ErrorCode.PROC_ALREADY_REGISTERED, "already registered"
            elif request.action in (1, 2):
                first = not registered
                reg_at = at if first or not rec.registered_at else rec.registered_at
                writes.append(ProcRecord.update(
                    r.agent_id, e.namespace, e.name, registered=True, spec=e.spec.SerializeToString(deterministic=True),
                    spec_digest=spec_digest(e.spec.SerializeToString(deterministic=True)),
                    labels=e.labels_json, registered_at=reg_at, unregistered_at=0,
                    register_time=int(at / 1000) if first or not rec.register_time else rec.register_time).op())
                writes += ProcIndex.add_ops(r.agent_id, e.namespace, e.name)
                push.append((e, r, OP_DEFINE))
            elif not registered:
                code, msg = ErrorCode.PROC_NOT_RUNNING, "not registered"
            else:
                writes.append(ProcRecord.update(r.agent_id, e.namespace, e.name, registered=False, unregistered_at=at,
                                                flag=WANT_NONE, want_auto=False).op())
                writes += ProcIndex.remove(r.agent_id, e.namespace, e.name)
                push.append((e, r, OP_FORGET))
            tt = r.task_target(e.namespace, e.name)
            out.results.append(pb.TargetResult(target=r.answer(), namespace=e.namespace, name=e.name,
                                               error_code=code, error_msg=msg,
                                               content=control_content(tt.agent_id, e.name, e.spec.setup_path,
                                                                       msg or "ok")))
        await self.store.write(writes)
        # Agents online now learn the new definition at once; the others with their next operation, and an
        # unregistration through the tombstone when they attach again.
        live = [(e, r, op) for e, r, op in push if r.record is not None and r.record.alive(at)]
        if live:
            entries = []
            for e, r, op in live:
                entry = pb.ProcEntry(namespace=e.namespace, name=e.name, labels_json=e.labels_json, op_type=op,
                                     has_spec=op == OP_DEFINE, targets=[pb.Target(requested=r.agent_id)])
                if op == OP_DEFINE:
                    entry.spec.CopyFrom(e.spec)
                entries.append(entry)
            try:
                await self.operate(pb.OperateRequest(entries=entries), internal=True)
            except (GseError, grpc.aio.AioRpcError) as exc:
                log.warning("definitions not pushed to agents now", extra={"error": str(exc)})
        return out

    # ---- status -----------------------------------------------------------------------------------

    def _info(self, namespace: str, name: str, agent_id: str, rec: ProcRecord | None, target: pb.Target | None,
              cloud: int = 0, ip: str = "") -> pb.ProcInfo:
        info = pb.ProcInfo(namespace=namespace, name=name, bk_agent_id=agent_id, pid=-1, cloud_id=cloud, ip=ip)
        if target is not None:
            info.target.CopyFrom(target)
        if rec is None:
            return info
        info.status = rec.proc_status
        if not rec.known:
            return info
        info.labels_json = rec.labels or rec.agent_labels
        info.isauto = rec.isauto if rec.agent_registered else False
        info.message = rec.message
        info.pid = rec.pid if info.status == 1 else -1
        info.version = rec.version
        info.register_time = rec.register_time or rec.agent_registered_at // 1000
        info.last_start_time = rec.last_start_time
        info.report_time = rec.report_time
        info.cpu_usage = rec.cpu_usage
        info.mem_usage = rec.mem_usage
        info.fd = rec.fd
        info.flag = rec.flag
        if rec.ip:
            info.cloud_id, info.ip = rec.cloud_id, rec.ip
        return info

    async def Status(self, request, context):
        """gRPC Status: `status` (get_proc_status, _v2)."""
        return await self._guard(context, self.status(request))

    async def status(self, request: pb.StatusRequest) -> pb.ProcInfos:
        """One ProcInfo per requested target for process `namespace`/`name`, from the stored records in one round trip
        after resolving (status 0 for a host never registered); agents are not asked."""
        resolved, reads = await self.store.resolve(list(request.targets), lambda ids: [
            ProcRecord.pick(a, request.namespace, request.name, names=STATUS_FIELDS) for a in ids])
        out = pb.ProcInfos()
        for r, x in zip(resolved, reads):
            cloud, ip = r.cloud_ip
            rec = ProcRecord.decode(x, STATUS_FIELDS)
            out.infos.append(self._info(request.namespace, request.name, r.target.requested, rec,
                                        r.answer(), cloud, ip))
        out.count = len(out.infos)
        return out

    async def Sync(self, request, context):
        """gRPC Sync: `sync` (sync_proc_status)."""
        return await self._guard(context, self.sync(request))

    async def _members(self, namespace: str) -> list[tuple[str, str]]:
        """The namespace's (bk_agent_id, name), sorted; cached `sync_cache_s` so that the pages of one sync
        (clients fetch them concurrently) read the index once."""
        hit = self._ns_cache.get(namespace)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.sync_cache_s:
            return hit[1]
        (res,) = await self.store.execute([ProcIndex.read_namespace(namespace)])
        members = sorted(ProcIndex.decode(res))
        if len(self._ns_cache) > 256:
            self._ns_cache.clear()
        self._ns_cache[namespace] = (now, members)
        return members

    async def sync(self, request: pb.SyncRequest) -> pb.ProcInfos:
        """One page (`offset`, `limit`) of the namespace's registrations sorted by (bk_agent_id, name), with `count` the
        namespace's total."""
        members = await self._members(request.namespace)
        page = members[request.offset:request.offset + request.limit]
        reads = await self.store.execute([ProcRecord.pick(a, request.namespace, n, names=STATUS_FIELDS)
                                          for a, n in page])
        out = pb.ProcInfos(count=len(members))
        for (a, n), x in zip(page, reads):
            rec = ProcRecord.decode(x, STATUS_FIELDS)
            out.infos.append(self._info(request.namespace, n, a, rec, None, *_host_of(a, rec)))
        return out

    async def List(self, request, context):
        """gRPC List: `list` (the `gse proc list` extension)."""
        return await self._guard(context, self.list(request))

    async def list(self, request: pb.ListRequest) -> pb.ProcInfos:
        """Every known process (registered through the API or held by the agent) of the requested agents, by namespace
        and name."""
        resolved, _ = await self.store.resolve(list(request.targets))
        idx = await self.store.execute([ProcIndex.read_agent(r.agent_id) for r in resolved])
        keys = [(r, ns, n) for r, x in zip(resolved, idx) for ns, n in sorted(ProcIndex.decode(x))]
        reads = await self.store.execute([ProcRecord.pick(r.agent_id, ns, n, names=STATUS_FIELDS)
                                          for r, ns, n in keys])
        out = pb.ProcInfos()
        for (r, ns, n), x in zip(keys, reads):
            rec = ProcRecord.decode(x, STATUS_FIELDS)
            if rec is None or not rec.known:
                continue
            cloud, ip = r.cloud_ip
            out.infos.append(self._info(ns, n, r.target.requested, rec, r.answer(), cloud, ip))
        out.count = len(out.infos)
        return out

    # ---- upgrade_to_agent_id ----------------------------------------------------------------------

    async def UpgradeToAgentId(self, request, context):
        """gRPC UpgradeToAgentId: `upgrade` (upgrade_to_agent_id)."""
        return await self._guard(context, self.upgrade(request))

    async def upgrade(self, request: pb.UpgradeRequest) -> pb.UpgradeReply:
        """Registrations made for "cloud:ip" before the agent was known move under its bk_agent_id. A
        bk_agent_id given as "cloud:ip" (a rollback) moves nothing: that form resolves to the agent anyway."""
        out = pb.UpgradeReply()
        hosts = list(request.hosts)
        seen = await self.store.execute([AgentAddress.read(h.cloud_id, h.ip) for h in hosts])
        pseudo = await self.store.execute([ProcIndex.read_agent(f"{h.cloud_id}:{h.ip}") for h in hosts])
        moves: list[tuple[str, str, str, str]] = []
        for h, s, p in zip(hosts, seen, pseudo):
            label = f"{h.cloud_id}:{h.ip}"
            if parse_host_id(h.agent_id) is not None:
                out.success.append(label)
                continue
            known = AgentAddress.decode(s)
            if not valid_agent_id(h.agent_id) or (known is not None and known != h.agent_id):
                out.failed.append(label)
                continue
            moves += [(label, h.agent_id, ns, n) for ns, n in ProcIndex.decode(p)]
            out.success.append(label)
        if moves:
            reads = await self.store.execute([ProcRecord.read(src, ns, n) for src, _d, ns, n in moves])
            writes = []
            for (src, dst, ns, n), x in zip(moves, reads):
                rec = ProcRecord.decode(x)
                if rec is not None and rec.registered:
                    writes.append(ProcRecord.update(dst, ns, n, registered=True, spec=rec.spec,
                                                    spec_digest=rec.spec_digest, labels=rec.labels,
                                                    register_time=rec.register_time, registered_at=rec.registered_at,
                                                    flag=rec.flag, want_auto=rec.want_auto).op())
                    writes += ProcIndex.add_ops(dst, ns, n)
                writes.append(db.delete(ProcRecord.key(src, ns, n)))
                writes += ProcIndex.remove(src, ns, n)
            await self.store.write(writes)
        return out

    # ---- process groups ---------------------------------------------------------------------------

    async def SetGroups(self, request, context):
        """gRPC SetGroups: `set_groups` (set_process_group_info)."""
        return await self._guard(context, self.set_groups(request))

    async def set_groups(self, request: pb.GroupsRequest) -> pb.TargetResults:
        """Replace the process groups of `namespace` on every target (stored; agents do not enforce them); every target
        answers 0."""
        resolved, _ = await self.store.resolve(list(request.targets))
        groups = [{"id": g.id, "resource": {"cpu_pool_limit": g.cpu_pool_limit, "mem_pool_limit": g.mem_pool_limit,
                                            "cpu_pool_weight": g.cpu_pool_weight,
                                            "mem_pool_weight": g.mem_pool_weight}} for g in request.groups]
        await self.store.write([ProcGroups.write(r.agent_id, request.namespace, groups) for r in resolved])
        return pb.TargetResults(known=True, results=[
            pb.TargetResult(target=r.answer(), namespace=request.namespace, error_code=ErrorCode.OK,
                            content=control_content(r.agent_id, "", "", "ok")) for r in resolved])

    async def GetGroups(self, request, context):
        """gRPC GetGroups: `get_groups` (get_process_group_info)."""
        return await self._guard(context, self.get_groups(request))

    async def get_groups(self, request: pb.GroupsQuery) -> pb.GroupsReply:
        """The stored process groups of `namespace` per target (an empty list where none were set)."""
        resolved, _ = await self.store.resolve(list(request.targets))
        reads = await self.store.execute([ProcGroups.read(r.agent_id, request.namespace) for r in resolved])
        out = pb.GroupsReply()
        for r, x in zip(resolved, reads):
            hg = out.hosts.add(target=r.answer())
            for g in ProcGroups.decode(x):
                res = g.get("resource") or {}
                hg.groups.add(id=str(g.get("id", "")), cpu_pool_limit=float(res.get("cpu_pool_limit") or 0),
                              mem_pool_limit=float(res.get("mem_pool_limit") or 0),
                              cpu_pool_weight=float(res.get("cpu_pool_weight") or 0),
                              mem_pool_weight=float(res.get("mem_pool_weight") or 0))
        return out


def _host_of(agent_id: str, rec: ProcRecord | None) -> tuple[int, str]:
    if rec is not None and rec.ip:
        return rec.cloud_id, rec.ip
    h = parse_host_id(agent_id)
    return h if h is not None else (0, "")


class Watcher:
    """Keeps open tasks moving (see the module docstring): every `interval_s`, for each open task older than
    `redispatch_after_s`, agents without a result get their frame again (alive) or 117 (offline longer than
    the grace); at the deadline what is left ends 65535. A task with every target final leaves the set.
    Several procmgrs may watch the same tasks: a repeated frame is answered from the agent's kept result."""

    def __init__(self, store: ProcStore, dispatcher: Dispatcher, *, interval_s: float, redispatch_after_s: float,
                 offline_grace_ms: int):
        self.store = store
        self.dispatcher = dispatcher
        self.interval_s = interval_s
        self.redispatch_after_ms = int(redispatch_after_s * 1000)
        self.offline_grace_ms = offline_grace_ms
        self._last_sent: dict[str, int] = {}

    async def run(self) -> None:
        """Sweep every `interval_s` seconds for ever; a sweep that cannot reach dbproxy is logged and tried at the next
        period."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except (Unavailable, GseError) as exc:
                log.warning("open tasks not swept", extra={"error": str(exc)})

    async def sweep(self) -> None:
        """One pass over the open tasks: drop those ended or gone, end what is left at the deadline with 65535, and send
        the frames again (or answer 117) for targets still without a result after `redispatch_after_s`."""
        (res,) = await self.store.execute([ProcOpenTasks.read()])
        open_ids = ProcOpenTasks.decode(res)
        at = now_ms()
        done = []
        for task_id in open_ids:
            t, r = await self.store.execute([ProcTask.read(task_id), ProcResults.read(task_id)])
            task = ProcTask.decode(t)
            if task is None:
                done.append(task_id)
                continue
            results = ProcResults.decode(r)
            pending = [tt for tt in task.task_targets() if not (results.get(tt.field) or ProcResult()).final]
            if not pending:
                done.append(task_id)
                continue
            if at >= task.deadline:
                msg = f"no result from the agent within {(task.deadline - task.created) // 1000} s"
                EXPIRED.labels(str(ErrorCode.FAILED)).inc(len(pending))
                await self.store.write([ProcResults.update(task_id, {
                    tt.field: ProcResult(ErrorCode.FAILED, msg, control_content(tt.agent_id, tt.name, "", msg))
                    for tt in pending}).op()])
                done.append(task_id)
                continue
            if at - task.created < self.redispatch_after_ms or \
                    at - self._last_sent.get(task_id, 0) < self.redispatch_after_ms:
                continue
            self._last_sent[task_id] = at
            await self._again(task_id, task, pending, at)
        if done:
            await self.store.write([ProcOpenTasks.remove(done)])
            for task_id in done:
                self._last_sent.pop(task_id, None)

    async def _again(self, task_id: str, task: ProcTask, pending: list[TaskTarget], at: int) -> None:
        agents = {tt.agent_id for tt in pending}
        records = await self.store.view.records(list(agents), SESSION)
        gone = {a for a in agents if a not in records or
                (not records[a].alive(at) and at - records[a].deadline > self.offline_grace_ms)}
        if gone:
            msg = "agent went offline before reporting a result"
            EXPIRED.labels(str(ErrorCode.AGENT_OFFLINE)).inc(len(gone))
            await self.store.write([ProcResults.update(task_id, {
                tt.field: ProcResult(ErrorCode.AGENT_OFFLINE, msg, control_content(tt.agent_id, tt.name, "", msg))
                for tt in pending if tt.agent_id in gone}).op()])
        alive = {a for a in agents - gone if records[a].alive(at)}
        if not alive:
            return
        frames: dict[bytes, list[str]] = {}
        for b64, ids in task.frames or []:
            mine = [a for a in ids if a in alive]
            if mine:
                frames[base64.b64decode(b64)] = mine
        REDISPATCHED.inc(len(alive))
        log.info("operations sent again to agents without a result", extra={"task_id": task_id,
                                                                           "agents": len(alive)})
        await self.dispatcher.send(frames, {a: records[a].node for a in alive})

"""Tasks on the task server: the internal task API (48669) and the recording of what agents report.

Dispatch takes one serialized frame and a list of agents: the frame is written as is to every target held
here (one serialization for all). Reports from agents (output chunks, item results) are written through
the batch writer; a final result is acknowledged to its agent only once it is stored, and the agent keeps
it until then. Acknowledgements are batched off the latency path (see AckBatcher).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import grpc
from prometheus_client import Counter, Histogram

from gse.common.errors import ErrorCode
from gse.common.logs import trace
from gse.common.records import PROXY_PREFIX, TaskItem, TaskOutput
from gse.common.records.task import INLINE_OUTPUT_MAX
from gse.pb import agent_pb2 as apb
from gse.pb import taskserver_pb2 as pb
from gse.pb import taskserver_pb2_grpc as pb_grpc

from .agent_access import AgentAccess, AgentSession
from .batch_writer import BatchWriter

log = logging.getLogger("gse.taskserver.tasks")

DISPATCHED = Counter("gse_taskserver_task_dispatched_total", "Task frames written to agents")
RESULTS = Counter("gse_taskserver_task_results_total", "Item results received from agents", ["final"])
OUTPUT_BYTES = Counter("gse_taskserver_task_output_bytes_total", "Task output bytes received")
ACKS = Counter("gse_taskserver_ack_frames_total", "Result acknowledgement frames written to agents")
FINAL_RESULTS, PARTIAL_RESULTS = RESULTS.labels("1"), RESULTS.labels("0")
RESULT_SECONDS = Histogram("gse_taskserver_task_result_seconds",
                           "From a task's creation (the API server accepting it) to each item's final result here",
                           buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 1800))


class TaskClock:
    """When the tasks dispatched here were created (task id -> ms; the newest `keep`), so that final results
    can be timed from the API call (the result latency of the dashboards)."""

    def __init__(self, keep: int = 20_000):
        self.keep = keep
        self.created: OrderedDict[str, int] = OrderedDict()

    def note(self, task_id: str, created_ms: int) -> None:
        """Remember when task `task_id` was created (epoch ms; 0 = unknown, ignored); the oldest is forgotten past
        `keep`."""
        if created_ms and task_id not in self.created:
            self.created[task_id] = created_ms
            if len(self.created) > self.keep:
                self.created.popitem(last=False)

    def observe(self, task_id: str, at_ms: int) -> None:
        """Time one item's final result at `at_ms` (epoch ms) from its task's creation into
        gse_taskserver_task_result_seconds; nothing for a task not noted here."""
        created = self.created.get(task_id)
        if created:
            RESULT_SECONDS.observe(max(0, at_ms - created) / 1000)


class TaskService(pb_grpc.TaskServiceServicer):
    """The internal TaskService (proto/gse/pb/taskserver.proto; 48669): the API server, procmgr and peer task servers
    hand it frames for the agents held here, and transfers for the sources held here. Every answer lists the agents it
    could not serve (117: not attached here)."""

    def __init__(self, access: AgentAccess, files=None, clock: TaskClock | None = None):
        self.access = access
        self.files = files          # FileCoordinator
        self.clock = clock or TaskClock()

    def _send(self, frame: bytes, agent_ids, quiet: bool = False) -> pb.DispatchReply:
        failures = []
        sessions = self.access.sessions
        relays = self.access.relays
        for aid in agent_ids:
            s = sessions.get(aid)
            if s is None and aid.startswith(PROXY_PREFIX):     # a proxy itself (records.proxy_target)
                s = relays.target(aid)
            if s is None or not s.send(frame):
                failures.append(pb.AgentFailure(agent_id=aid, code=ErrorCode.AGENT_OFFLINE,
                                                message="agent is not attached to this task server"))
        DISPATCHED.inc(len(agent_ids) - len(failures))
        if not quiet:
            log.info("frame dispatched", extra={"agents": len(agent_ids), "not_held": len(failures)})
        return pb.DispatchReply(failures=failures)

    async def Dispatch(self, request, context):
        """Write the serialized ServerFrame as is to every agent named (INVALID_ARGUMENT when it is not a
        ServerFrame); the agents not attached here are the failures."""
        try:
            frame = apb.ServerFrame.FromString(request.frame)
            kind = frame.WhichOneof("body")
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError; anything else is as bad
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frame is not a ServerFrame")
        if kind == "task":
            self.clock.note(frame.task.task_id, frame.task.created_ms)
        reply = self._send(request.frame, request.agent_ids)
        # One line per call (the trace names the task), never one per agent.
        log.info("delivered to agents", extra={"kind": kind, "agents": len(request.agent_ids),
                                               "not_attached": len(reply.failures)})
        return reply

    async def DispatchBatch(self, request, context):
        """Several frames, each to its own agents, in one call (procmgr's per-agent operations, syncdata's
        per-agent identity files)."""
        failures = []
        for part in request.parts:
            try:
                apb.ServerFrame.FromString(part.frame)
            except Exception:  # noqa: BLE001 - protobuf raises DecodeError; anything else is as bad
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a frame is not a ServerFrame")
            failures += self._send(part.frame, part.agent_ids, quiet=True).failures
        log.info("frames dispatched", extra={"frames": len(request.parts), "not_held": len(failures)})
        return pb.DispatchReply(failures=failures)

    async def Terminate(self, request, context):
        """Send TerminateTask for `task_id` to the agents named; those not attached here are the failures."""
        frame = apb.ServerFrame(terminate=apb.TerminateTask(task_id=request.task_id)).SerializeToString()
        return self._send(frame, request.agent_ids)

    async def StartTransfer(self, request, context):
        """Start the transfer whose source (or first push target) is held here (see FileCoordinator.start)."""
        failures = await self.files.start(request)
        return pb.DispatchReply(failures=[pb.AgentFailure(agent_id=a, code=c, message=m) for a, c, m in failures])

    async def TerminateTransfer(self, request, context):
        """Terminate the transfer `task_id` (a transfer id) coordinated here, whole or for the targets `agent_ids`
        only (see FileCoordinator.terminate); one failure when it is not coordinated here."""
        found = await self.files.terminate(request.task_id, request.agent_ids)
        failures = [] if found else [pb.AgentFailure(code=ErrorCode.AGENT_OFFLINE, message="no such live transfer here")]
        return pb.DispatchReply(failures=failures)

    async def SourceChanged(self, request, context):
        """The source's task server reports that entry `index` changed mid-transfer: end it with 127 on every target
        (see FileCoordinator.on_source_changed)."""
        ok = await self.files.on_source_changed(request.transfer_id, request.index, request.error_msg)
        failures = [] if ok else [pb.AgentFailure(agent_id=request.agent_id, code=ErrorCode.AGENT_OFFLINE,
                                                  message="no such live transfer here")]
        return pb.DispatchReply(failures=failures)

    async def NeedDirect(self, request, context):
        """A target's task server reports that BitTorrent keeps failing for entry `index`: ask the source to upload it
        directly."""
        ok = self.files.on_need_direct(request.transfer_id, request.index)
        failures = [] if ok else [pb.AgentFailure(agent_id=request.agent_id, code=ErrorCode.AGENT_OFFLINE,
                                                  message="no such live transfer here")]
        return pb.DispatchReply(failures=failures)


class AckBatcher:
    """Acknowledgements of stored results, sent once reports have been quiet for `quiet_s` (or when the
    oldest waiting one is `max_delay_s` old), one frame per agent for everything stored meanwhile.

    An acknowledgement only lets the agent drop its copy of a result that is already readable, so it is
    not on anyone's latency path; writing it to the agent stream costs as much server CPU as the task
    frame itself. During a broadcast to thousands of agents, deferring the acknowledgements until the
    results stop arriving leaves the CPU to the reads and writes that make results readable, and several
    results of one agent share one frame. Nothing is lost by the delay: an agent that reconnects before its
    acknowledgement resends the result, and storing it again is idempotent."""

    def __init__(self, writer: BatchWriter, quiet_s: float = 0.2, max_delay_s: float = 2.0):
        self.writer = writer
        self.quiet_s = quiet_s
        self.max_delay_s = max_delay_s
        self._pending: dict[AgentSession, list] = {}
        self._oldest = 0.0
        self._last = 0.0
        self._wake = asyncio.Event()

    def when_stored(self, session: AgentSession, refs: list) -> None:
        """Acknowledge `refs` to the agent once everything the writer holds now is stored."""
        self.writer.written().add_done_callback(lambda _f: self.add(session, refs))

    def add(self, session: AgentSession, refs: list) -> None:
        """Queue `refs` for the agent of `session` (merged with what waits for it) and wake the flush loop."""
        now = time.monotonic()
        if not self._pending:
            self._oldest = now
        self._last = now
        waiting = self._pending.get(session)
        if waiting is None:
            self._pending[session] = list(refs)
        else:
            waiting.extend(refs)
        self._wake.set()

    async def run(self) -> None:
        """Flush whenever reports have been quiet for `quiet_s`, or the oldest waiting acknowledgement is
        `max_delay_s` old."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                now = time.monotonic()
                due = min(self._last + self.quiet_s, self._oldest + self.max_delay_s)
                if now < due:
                    await asyncio.sleep(due - now)
                    continue
                self.flush()

    def flush(self) -> None:
        """Send each agent one ResultAck with everything waiting for it, and log one line per task of how many agents
        and items were stored."""
        pending, self._pending = self._pending, {}
        stored: dict[str, list[int]] = {}          # task id -> [agents, items] stored since the last flush
        for session, refs in pending.items():
            session.send(apb.ServerFrame(ack=apb.ResultAck(items=refs)).SerializeToString())
            tasks = set()
            for r in refs:
                counts = stored.setdefault(r.task_id, [0, 0])
                counts[1] += 1
                if r.task_id not in tasks:
                    tasks.add(r.task_id)
                    counts[0] += 1
        ACKS.inc(len(pending))
        for task_id, (agents, items) in stored.items():
            # File reports are acknowledged as "file:<transfer id>", whose task id is its prefix.
            with trace(task_id=task_id[5:].partition("/")[0] if task_id.startswith("file:") else task_id):
                log.info("results stored", extra={"agents": agents, "items": items})



def inline_outputs(report: apb.TaskReport) -> dict[tuple[str, int], bytes]:
    """{(task_id, atomic_task_id): output} for the items of an agent's TaskReport whose final result (not
    truncated, output_size <= INLINE_OUTPUT_MAX) comes with their whole output as one chunk at offset 0: written
    into the item (`TaskItem.output`) and never to a TaskOutput key."""
    sizes = {(r.task_id, r.atomic_task_id): r.output_size for r in report.results
             if r.final and not r.truncated and 0 < r.output_size <= INLINE_OUTPUT_MAX}
    if not sizes:
        return {}
    chunks: dict[tuple[str, int], apb.TaskOutput | None] = {}
    for out in report.outputs:
        k = (out.task_id, out.atomic_task_id)
        if k in sizes:
            chunks[k] = None if k in chunks else out        # more than one chunk: stored the usual way
    return {k: o.data for k, o in chunks.items() if o is not None and o.offset == 0 and len(o.data) == sizes[k]}


class ResultRecorder:
    """Writes agents' task reports; acknowledges final results once stored (through `acks`)."""

    def __init__(self, writer: BatchWriter, ttl_ms: int, acks: AckBatcher, clock: TaskClock | None = None):
        self.writer = writer
        self.ttl_ms = ttl_ms
        self.acks = acks
        self.clock = clock or TaskClock()

    def on_report(self, session: AgentSession, report) -> None:
        """The `report` frame handler: store output chunks (at their offsets) and item results through the batch
        writer; final results are acknowledged once stored."""
        aid = session.agent_id
        ttl = self.ttl_ms
        inline = inline_outputs(report)
        for out in report.outputs:
            OUTPUT_BYTES.inc(len(out.data))
        chunks = [out for out in report.outputs if (out.task_id, out.atomic_task_id) not in inline]
        if chunks:
            self.writer.add([TaskOutput.write(out.task_id, aid, out.atomic_task_id, out.offset, out.data, ttl)
                             for out in chunks])
            # Readers fetch output only for items that have some (`out_end` merges into the item's hash write).
            for out in chunks:
                self.writer.put(TaskItem.update(out.task_id, aid, out.atomic_task_id, ttl_ms=ttl,
                                                out_end=out.offset + len(out.data)))
        finals = []
        now = int(time.time() * 1000)
        for r in report.results:
            fields = {"status": r.status, "error_code": r.error_code, "error_msg": r.error_msg,
                      "output_size": r.output_size, "truncated": r.truncated}
            if r.start_time_ms:
                fields["start_time"] = r.start_time_ms
            if r.end_time_ms:
                fields["end_time"] = r.end_time_ms
            if r.has_exit_code:
                fields["exit_code"] = r.exit_code
            whole = inline.get((r.task_id, r.atomic_task_id))
            if whole is not None:
                fields["output"] = whole
            self.writer.put(TaskItem.update(r.task_id, aid, r.atomic_task_id, ttl_ms=ttl, **fields))
            if r.final:
                finals.append(apb.ItemRef(task_id=r.task_id, atomic_task_id=r.atomic_task_id))
                self.clock.observe(r.task_id, now)
        FINAL_RESULTS.inc(len(finals))
        PARTIAL_RESULTS.inc(len(report.results) - len(finals))
        if finals and log.isEnabledFor(logging.DEBUG):      # one line per agent: debug only
            for r in report.results:
                if r.final:
                    log.debug("item finished", extra={"task_id": r.task_id, "agent_id": aid,
                                                      "atomic_task_id": r.atomic_task_id, "status": r.status,
                                                      "error_code": r.error_code})
        if finals:
            self.acks.when_stored(session, finals)

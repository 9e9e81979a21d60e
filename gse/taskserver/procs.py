"""Process reports on the task server: what agents say about their processes, stored for procmgr and the API.

- Operation results go to `ProcResults` (the agent's field "r:<t>") through the batch writer and are
  acknowledged to the agent once stored (`ProcAckBatcher`, off the latency path like script results); the
  agent keeps a result until then.
- States go to the agent's fields of `ProcRecord` and to the indexes (`ProcIndex`): this is the status
  cache get_proc_status and sync_proc_status read, so status queries never reach agents.
- A full inventory (sent at every attach) is checked against unregistrations: a registration the API
  unregistered while the agent was away (a tombstone newer than the agent's copy) is dropped on the agent.
  An absent record never drops anything (Redis may have been lost; the agent's copy is then the truth).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from gse.common.dbclient import DbClient
from gse.common.errors import Unavailable
from gse.common.records import ProcIndex, ProcRecord, ProcResult, ProcResults, new_task_id
from gse.common.records.proc import SOURCE_API
from gse.pb import agent_pb2 as apb

from .agent_access import AgentSession
from .batch_writer import BatchWriter
from .tasks import AckBatcher

log = logging.getLogger("gse.taskserver.procs")

PROC_RESULTS = Counter("gse_taskserver_proc_results_total", "Process operation results received from agents")
PROC_STATES = Counter("gse_taskserver_proc_states_total", "Process states received from agents")
RECONCILED = Counter("gse_taskserver_proc_dropped_total", "Registrations dropped on agents after an unregister")

OP_FORGET = 101
INDEXED_MAX = 500_000


class ProcAckBatcher(AckBatcher):
    """AckBatcher for process results: the same quiet/max-delay policy, `ProcAck` frames."""

    def flush(self) -> None:
        """Send each agent one ProcAck with every result stored since the last flush."""
        pending, self._pending = self._pending, {}
        for session, refs in pending.items():
            session.send(apb.ServerFrame(proc_ack=apb.ProcAck(items=refs)).SerializeToString())


class ProcReports:
    """The `proc_report` frame handler (see the module docstring)."""

    def __init__(self, writer: BatchWriter, db: DbClient, acks: ProcAckBatcher):
        self.writer = writer
        self.db = db
        self.acks = acks
        self._background: set[asyncio.Task] = set()
        self._indexed: set[tuple[str, str, str]] = set()

    def on_report(self, session: AgentSession, report: apb.ProcReport) -> None:
        """The `proc_report` frame handler: store operation results (acknowledged once stored), process states and the
        indexes; a full inventory is reconciled against the API's unregistrations in the background."""
        aid = session.agent_id
        if report.results:
            by_task: dict[str, dict[str, ProcResult]] = {}
            refs = []
            for r in report.results:
                by_task.setdefault(r.task_id, {})[f"{aid}:{r.namespace}:{r.name}"] = ProcResult(
                    r.error_code, r.error_msg, r.content)
                refs.append(apb.ProcResultRef(task_id=r.task_id, namespace=r.namespace, name=r.name))
            for task_id, results in by_task.items():
                self.writer.put(ProcResults.update(task_id, results, agent=True))
            PROC_RESULTS.inc(len(refs))
            self.acks.when_stored(session, refs)
        if report.states:
            PROC_STATES.inc(len(report.states))
            for st in report.states:
                if st.registered:
                    self.writer.put(ProcRecord.update(
                        aid, st.namespace, st.name, agent_registered=True, source=st.source, status=st.status,
                        isauto=st.isauto, pid=st.pid, version=st.version, message=st.message,
                        last_start_time=st.last_start_time, report_time=st.report_time, cpu_usage=st.cpu_usage,
                        mem_usage=st.mem_usage, fd=st.fd, agent_labels=st.labels_json,
                        agent_registered_at=st.registered_at, cloud_id=session.cloud_id, ip=session.ip))
                    key = (aid, st.namespace, st.name)
                    if key not in self._indexed:
                        # Once per process and task server run: the indexes hold it from then on.
                        if len(self._indexed) >= INDEXED_MAX:
                            self._indexed.clear()
                        self._indexed.add(key)
                        for w in ProcIndex.add(*key):
                            self.writer.put(w)
                else:
                    self._indexed.discard((aid, st.namespace, st.name))
                    self.writer.put(ProcRecord.update(
                        aid, st.namespace, st.name, agent_registered=False, isauto=False, pid=-1, status=0,
                        report_time=st.report_time))
            if report.full:
                api = [st for st in report.states if st.registered and st.source == SOURCE_API]
                if api:
                    t = asyncio.ensure_future(self._reconcile(session, api))
                    self._background.add(t)
                    t.add_done_callback(self._background.discard)

    async def _reconcile(self, session: AgentSession, states: list) -> None:
        names = ("registered", "unregistered_at")
        try:
            results = await self.db.execute([ProcRecord.pick(session.agent_id, s.namespace, s.name, names=names)
                                             for s in states])
        except Unavailable as exc:
            log.warning("inventory not checked against unregistrations", extra={"agent_id": session.agent_id,
                                                                                 "error": str(exc)})
            return
        drop = []
        for st, r in zip(states, results):
            rec = ProcRecord.decode(r, names)
            if rec is not None and not rec.registered and rec.unregistered_at > st.registered_at:
                drop.append(apb.ProcOperation(namespace=st.namespace, name=st.name, op_type=OP_FORGET,
                                              registered_at=rec.unregistered_at))
        if drop and not session.closed:
            RECONCILED.inc(len(drop))
            log.info("dropping registrations unregistered while the agent was away",
                     extra={"agent_id": session.agent_id, "count": len(drop)})
            session.send(apb.ServerFrame(proc_ops=apb.ProcOperations(
                task_id=new_task_id("GSEPROC"), ops=drop)).SerializeToString())

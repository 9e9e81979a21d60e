"""Fleet frames on the task server (spec section 11): host identity and agent operation results.

syncdata hands each agent its identity file through the task server holding it (`DispatchBatch`, one call per
task server for any number of agents, a frame of its own per agent); what the agent answers, and what
operations (restart, reload, upgrade) came to, is written to its session record through the batch writer,
where syncdata and the API read it.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

from gse.common.records import AgentRecord, now_ms
from gse.pb import agent_pb2 as apb

from .agent_access import AgentAccess, AgentSession
from .batch_writer import BatchWriter

log = logging.getLogger("gse.taskserver.fleet")

HOSTID_RESULTS = Counter("gse_taskserver_hostid_results_total", "Host identity results from agents", ["outcome"])
OPERATIONS = Counter("gse_taskserver_operation_results_total", "Agent operation results", ["op", "state"])

UPGRADE_TERMINAL = frozenset({"done", "rolled_back", "failed"})


class Fleet:
    """The recording of identity and operation results."""

    def __init__(self, access: AgentAccess, writer: BatchWriter):
        self.access = access
        self.writer = writer
        self.ttl_ms = access.ttl_ms

    def on_hostid_result(self, session: AgentSession, r: apb.HostIdentityResult) -> None:
        """The `host_identity_result` frame handler: the md5, version and outcome of the identity file the agent
        wrote go to its session record (hostid_* fields), with the time of the answer."""
        HOSTID_RESULTS.labels("ok" if r.error_code == 0 else "failed").inc()
        self.writer.put(AgentRecord.update(
            session.agent_id, ttl_ms=self.ttl_ms, hostid_md5=r.md5, hostid_version=r.version, hostid_time=now_ms(),
            hostid_error_code=r.error_code, hostid_error=r.error_msg))

    def on_operation_result(self, session: AgentSession, r: apb.OperationResult) -> None:
        """The `operation_result` frame handler: log the outcome of a restart, reload or upgrade; an upgrade's state
        (with its deadline cleared once it is done, rolled back or failed) goes to the session record, which
        list_agent_state reads for status 5."""
        OPERATIONS.labels(str(r.op), r.state or ("ok" if r.error_code == 0 else "failed")).inc()
        log.info("agent operation result", extra={"agent_id": session.agent_id, "op": r.op, "state": r.state,
                                                   "error_code": r.error_code, "error": r.error_msg,
                                                   "version": r.version, "request_id": r.request_id})
        if r.op != 3 or not r.state:
            return
        fields = {"upgrade_state": r.state, "upgrade_time": now_ms(), "upgrade_error": r.error_msg}
        if r.from_version:
            fields["upgrade_from"] = r.from_version
        if r.state in UPGRADE_TERMINAL:
            fields["upgrade_until"] = 0
        self.writer.put(AgentRecord.update(session.agent_id, ttl_ms=self.ttl_ms, **fields))

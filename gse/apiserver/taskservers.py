"""The API server's calls to the task servers' internal service: one call per task server holding targets.

Every call carries the current trace (task_id, request_id) as metadata, so the task server's log lines
about it name the task too. The stubs come from the one registry of peers (`gse.common.peers`).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from gse.common.errors import ErrorCode
from gse.common.peers import Peers
from gse.common.rpc import trace_metadata
from gse.common.tls import TLSMaterial
from gse.pb import taskserver_pb2 as pb

log = logging.getLogger("gse.apiserver.taskservers")


class TaskServers:
    """Dispatch, terminate and transfer calls to the task servers registered in ZooKeeper (`on_view`)."""

    def __init__(self, tls: TLSMaterial, timeout_s: float = 10.0):
        self.peers = Peers(tls)
        self.timeout_s = timeout_s

    def on_view(self, view: dict[str, dict]) -> None:
        """Discovery callback for the `taskserver` service."""
        self.peers.on_taskservers(view)

    async def _call(self, node: str, method: str, request, ids=None) -> list[tuple[str, int, str]]:
        """Failures as (agent id, code, message); an unreachable server fails every agent it was given (117)."""
        stub = self.peers.task(node)
        ids = list(request.agent_ids) if ids is None else ids
        if stub is None:
            return [(a, ErrorCode.AGENT_OFFLINE, f"task server {node} holding the agent is gone") for a in ids]
        try:
            reply = await getattr(stub, method)(request, timeout=self.timeout_s, metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            log.warning("task server call failed", extra={"node": node, "method": method, "code": exc.code().name})
            return [(a, ErrorCode.AGENT_OFFLINE, f"task server {node} unreachable: {exc.code().name}") for a in ids]
        return [(f.agent_id, f.code, f.message) for f in reply.failures]

    async def dispatch(self, frame: bytes, by_node: dict[str, list[str]]) -> list[tuple[str, int, str]]:
        """Write a serialized ServerFrame to agents, grouped by the task server holding them (one call each)."""
        calls = [self._call(node, "Dispatch", pb.DispatchRequest(frame=frame, agent_ids=ids))
                 for node, ids in by_node.items()]
        return [f for failures in await asyncio.gather(*calls) for f in failures]

    async def terminate(self, task_id: str, by_node: dict[str, list[str]]) -> list[tuple[str, int, str]]:
        """Terminate a script task on its agents, grouped by the task server holding them."""
        calls = [self._call(node, "Terminate", pb.TerminateRequest(task_id=task_id, agent_ids=ids))
                 for node, ids in by_node.items()]
        return [f for failures in await asyncio.gather(*calls) for f in failures]

    async def start_transfer(self, node: str, spec: pb.TransferSpec) -> list[tuple[str, int, str]]:
        """Start one transfer on the task server holding its source (which coordinates it)."""
        return await self._call(node, "StartTransfer", spec, [spec.source_agent])

    async def terminate_transfer(self, node: str, transfer_id: str) -> list[tuple[str, int, str]]:
        """Terminate one transfer on its coordinating task server."""
        return await self._call(node, "TerminateTransfer", pb.TerminateRequest(task_id=transfer_id), [])

    async def close(self) -> None:
        await self.peers.close()

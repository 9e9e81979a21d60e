"""The API server's calls to the task servers' internal service: one call per task server holding targets.

Every call carries the current trace (task_id, request_id) as metadata, so the task server's log lines
about it name the task too. The stubs come from the one registry of peers (`gse.common.peers`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from gse.common import wire
from gse.common.errors import ErrorCode
from gse.common.peers import Peers
from gse.common.rpc import make_blocking_channel, trace_metadata
from gse.common.tls import TLSMaterial
from gse.pb import taskserver_pb2 as pb

log = logging.getLogger("gse.apiserver.taskservers")

_DISPATCH = f"/{pb.DESCRIPTOR.services_by_name['TaskService'].full_name}/Dispatch"
LARGE_REQUEST = 1 << 20


class TaskServers:
    """Dispatch, terminate and transfer calls to the task servers registered in ZooKeeper (`on_view`)."""

    def __init__(self, tls: TLSMaterial, timeout_s: float = 10.0):
        self.tls = tls
        self.peers = Peers(tls)
        self.timeout_s = timeout_s
        # Large dispatches go out on synchronous channels from these threads (see `_dispatch`).
        self._blocking: dict[str, grpc.Channel] = {}
        self._senders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dispatch")

    def on_view(self, view: dict[str, dict]) -> None:
        """Discovery callback for the `taskserver` service."""
        self.peers.on_taskservers(view)
        for addr in [a for a in self._blocking if a not in self.peers.taskservers.values()]:
            self._blocking.pop(addr).close()

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

    async def dispatch(self, frame: bytes | list[bytes], by_node: dict[str, list[str]]) -> list[tuple[str, int, str]]:
        """Write a serialized ServerFrame (bytes, or parts to be joined: `gse.common.wire`) to agents, grouped
        by the task server holding them (one call each). The DispatchRequest is assembled from the frame's
        parts with one copy, never through the message classes (a frame may be 16 MiB)."""
        parts = [frame] if isinstance(frame, bytes) else frame
        head = wire.length_delimited(pb.DispatchRequest, "frame", parts)
        calls = [self._dispatch(node, b"".join([*head, pb.DispatchRequest(agent_ids=ids).SerializeToString()]), ids)
                 for node, ids in by_node.items()]
        failures = [f for failed in await asyncio.gather(*calls) for f in failed]
        log.info("task dispatched", extra={"taskservers": len(by_node), "agents": sum(map(len, by_node.values())),
                                           "not_delivered": len(failures)})
        return failures

    async def _dispatch(self, node: str, request: bytes, ids: list[str]) -> list[tuple[str, int, str]]:
        """TaskService.Dispatch with a request serialized already. A request of LARGE_REQUEST bytes or more is
        sent from a worker thread on a synchronous channel: grpc.aio would send it on the event loop's thread
        with the GIL held (a 16 MiB script held it for 10-60 ms; other callers waited as long)."""
        address = self.peers.task_address(node)
        if address is None:
            return [(a, ErrorCode.AGENT_OFFLINE, f"task server {node} holding the agent is gone") for a in ids]
        metadata = trace_metadata()
        try:
            if len(request) >= LARGE_REQUEST:
                channel = self._blocking.get(address)
                if channel is None:
                    channel = self._blocking[address] = make_blocking_channel(self.tls, address)
                call = channel.unary_unary(_DISPATCH, request_serializer=None,
                                           response_deserializer=pb.DispatchReply.FromString)
                reply = await asyncio.get_running_loop().run_in_executor(
                    self._senders, functools.partial(call, request, timeout=self.timeout_s, metadata=metadata))
            else:
                call = self.peers.pool.get(address).unary_unary(_DISPATCH, request_serializer=None,
                                                                response_deserializer=pb.DispatchReply.FromString)
                reply = await call(request, timeout=self.timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            log.warning("task server call failed", extra={"node": node, "method": "Dispatch", "code": exc.code().name})
            return [(a, ErrorCode.AGENT_OFFLINE, f"task server {node} unreachable: {exc.code().name}") for a in ids]
        return [(f.agent_id, f.code, f.message) for f in reply.failures]

    async def terminate(self, task_id: str, by_node: dict[str, list[str]]) -> list[tuple[str, int, str]]:
        """Terminate a script task on its agents, grouped by the task server holding them."""
        calls = [self._call(node, "Terminate", pb.TerminateRequest(task_id=task_id, agent_ids=ids))
                 for node, ids in by_node.items()]
        return [f for failures in await asyncio.gather(*calls) for f in failures]

    async def start_transfer(self, node: str, spec: pb.TransferSpec) -> list[tuple[str, int, str]]:
        """Start one transfer on the task server holding its source (which coordinates it)."""
        failures = await self._call(node, "StartTransfer", spec, [spec.source_agent])
        if not failures:
            log.info("transfer dispatched", extra={"transfer_id": spec.transfer_id, "coordinator": node,
                                                   "targets": len(spec.target_agents)})
        return failures

    async def terminate_transfer(self, node: str, transfer_id: str,
                                 agent_ids: list[str] | None = None) -> list[tuple[str, int, str]]:
        """Terminate one transfer on its coordinating task server: whole, or for the targets `agent_ids` only
        (bk_agent_ids; the coordinator ends the whole transfer when they name its source or every target)."""
        return await self._call(node, "TerminateTransfer",
                                pb.TerminateRequest(task_id=transfer_id, agent_ids=agent_ids or []), [])

    async def close(self) -> None:
        """Close the channels to the task servers, the blocking channels and the sender threads."""
        await self.peers.close()
        for channel in self._blocking.values():
            channel.close()
        self._blocking.clear()
        self._senders.shutdown(wait=False, cancel_futures=True)

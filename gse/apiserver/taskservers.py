"""The API server's view of the task servers: where each one takes tasks, and one call per server."""

from __future__ import annotations

import asyncio
import logging

import grpc

from gse.common.rpc import make_channel
from gse.common.tls import TLSMaterial
from gse.pb import taskserver_pb2 as pb
from gse.pb import taskserver_pb2_grpc as pb_grpc

log = logging.getLogger("gse.apiserver.taskservers")


class TaskServers:
    def __init__(self, tls: TLSMaterial, timeout_s: float = 10.0):
        self.tls = tls
        self.timeout_s = timeout_s
        self.nodes: dict[str, str] = {}           # node id -> task_address
        self._channels: dict[str, grpc.aio.Channel] = {}

    def on_view(self, view: dict[str, dict]) -> None:
        self.nodes = {nid: info["task_address"] for nid, info in view.items() if info.get("task_address")}
        for addr in [a for a in self._channels if a not in self.nodes.values()]:
            asyncio.ensure_future(self._channels.pop(addr).close())

    def _stub(self, address: str) -> pb_grpc.TaskServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = make_channel(self.tls, address)
        return pb_grpc.TaskServiceStub(ch)

    async def _call(self, node: str, method: str, request, ids=None) -> list[tuple[str, int, str]]:
        """Failures as (agent id, code, message); an unreachable server fails every agent it was given."""
        address = self.nodes.get(node)
        ids = list(request.agent_ids) if ids is None else ids
        if address is None:
            return [(a, 117, f"task server {node} holding the agent is gone") for a in ids]
        try:
            reply = await getattr(self._stub(address), method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("task server call failed", extra={"node": node, "code": exc.code().name})
            return [(a, 117, f"task server {node} unreachable: {exc.code().name}") for a in ids]
        return [(f.agent_id, f.code, f.message) for f in reply.failures]

    async def dispatch(self, frame: bytes, by_node: dict[str, list[str]]) -> list[tuple[str, int, str]]:
        calls = [self._call(node, "Dispatch", pb.DispatchRequest(frame=frame, agent_ids=ids))
                 for node, ids in by_node.items()]
        return [f for failures in await asyncio.gather(*calls) for f in failures]

    async def terminate(self, task_id: str, by_node: dict[str, list[str]]) -> list[tuple[str, int, str]]:
        calls = [self._call(node, "Terminate", pb.TerminateRequest(task_id=task_id, agent_ids=ids))
                 for node, ids in by_node.items()]
        return [f for failures in await asyncio.gather(*calls) for f in failures]

    async def start_transfer(self, node: str, spec: pb.TransferSpec) -> list[tuple[str, int, str]]:
        return await self._call(node, "StartTransfer", spec, [spec.source_agent])

    async def terminate_transfer(self, node: str, transfer_id: str) -> list[tuple[str, int, str]]:
        return await self._call(node, "TerminateTransfer", pb.TerminateRequest(task_id=transfer_id), [])

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

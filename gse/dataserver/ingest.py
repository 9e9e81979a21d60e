"""Agent data streams (58625): batches in, acknowledgements out.

One stream per agent. The first message down is an empty DataAck (the stream is open and the agent may
count this server as its own). A proxy (spec section 12) relays the batches of many agents of its area on
one stream: its certificate names its area, every batch names its agent, and a batch naming an agent the
proxy may not speak for (gse.common.roles.relay_claim_refusal: not of its area or of one cascaded behind
it) or a revoked agent is refused (failed, with the reason). Batches are routed in the order they arrive, each as soon as it is read, so
many are in flight at once; their acknowledgements are gathered and written together, whatever order the
outputs finish in.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import Counter, Gauge

from gse.common import roles
from gse.common.datastate import MD_AGENT_ID, MD_CLOUD_ID, MD_IP
from gse.common.records import valid_agent_id
from gse.pb import data_pb2 as pb

from .router import Router

log = logging.getLogger("gse.dataserver.ingest")

STREAMS = Gauge("gse_dataserver_agent_streams", "Agent data streams open")
BATCHES = Counter("gse_dataserver_batches_total", "Batches received", ["outcome"])
RELAY_REFUSED = Counter("gse_dataserver_relay_refused_total", "Batches a proxy relayed for an agent it may not "
                        "speak for (or a revoked one)")


class Ingest:
    """The DataIngest service (proto/gse/pb/data.proto; 58625, spec §6): one bidirectional stream per agent, DataBatch
    in, DataAck out. `streams` maps each open stream to its agent id; `load` (their count) is what the data server
    advertises."""
    SERVICE = "gse.pb.DataIngest"

    def __init__(self, router: Router, deny: roles.DenyList | None = None):
        self.router = router
        self.deny = deny
        self.area_parents: dict[int, int] = {}   # area -> the area it is cascaded behind (gse.common.records)
        self.streams: dict[int, str] = {}     # id(task) -> agent id
        self.closing = False
        self._wakes: set[asyncio.Event] = set()

    def close(self) -> None:
        """Stop taking batches: every stream ends once the acks of what it already took are written."""
        self.closing = True
        for wake in list(self._wakes):
            wake.set()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic gRPC handler serving `gse.pb.DataIngest/Stream`."""
        return grpc.method_handlers_generic_handler(self.SERVICE, {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.stream, request_deserializer=pb.DataBatch.FromString,
                response_serializer=pb.DataAck.SerializeToString),
        })

    @property
    def load(self) -> int:
        """The number of agent streams open."""
        return len(self.streams)

    async def stream(self, request_iterator, context):
        """One agent's stream. The agent names itself in metadata (x-gse-agent-id, at most 64 characters, else
        INVALID_ARGUMENT; a certificate for another agent is PERMISSION_DENIED; UNAVAILABLE while stopping). Sends an
        empty DataAck first, routes each batch as it is read, and writes the ids of batches the outputs took (`ok`) or
        refused (`failed`, with the first `reason`) in acks that gather whatever finished meanwhile. Ends once the
        agent closed its side (or the server is stopping) and every batch taken is acknowledged."""
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        agent_id = md.get(MD_AGENT_ID, "")
        if not agent_id or len(agent_id) > 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"metadata {MD_AGENT_ID} is required (a bk_agent_id of 1-64 characters)")
        peer = roles.peer_identity(context)
        relaying = peer.role == roles.PROXY
        if relaying and peer.area == roles.NO_AREA:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the proxy certificate names no area")
        certified = peer.agent_id
        if certified and certified != agent_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the stream names agent {agent_id} but the certificate is agent {certified}")
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "data server is stopping")
        proto = (b"", md.get(MD_CLOUD_ID, "0").encode(), md.get(MD_IP, "").encode(), agent_id.encode())
        key = id(asyncio.current_task())
        self.streams[key] = agent_id
        STREAMS.set(len(self.streams))
        ok: list[int] = []
        failed: list[int] = []
        reason = [""]
        wake = asyncio.Event()
        self._wakes.add(wake)
        pending = [0]
        router = self.router

        def settle(f: asyncio.Future, batch_id: int) -> None:
            """A batch's outputs finished: count it ok or failed and wake the ack writer."""
            pending[0] -= 1
            if f.cancelled() or f.exception() is not None:
                failed.append(batch_id)
                if not reason[0]:
                    reason[0] = str(f.exception() if not f.cancelled() else "cancelled")
                BATCHES.labels("failed").inc()
            else:
                ok.append(batch_id)
                BATCHES.labels("ok").inc()
            wake.set()

        async def read() -> None:
            """Route every batch the agent sends, in order; a batch read after `close` is left unacknowledged (the
            agent sends it elsewhere)."""
            async for batch in request_iterator:
                if self.closing:
                    break               # not acknowledged: the agent sends it to another data server
                sender = agent_id
                if relaying:
                    sender = batch.agent_id
                    why = self.relay_refusal(peer.area, batch)
                    if why:
                        RELAY_REFUSED.inc()
                        failed.append(batch.batch_id)
                        reason[0] = reason[0] or why
                        wake.set()
                        continue
                    fields = (str(batch.data_id).encode(), str(batch.cloud_id).encode(), batch.ip.encode(),
                              sender.encode())
                else:
                    fields = (str(batch.data_id).encode(), *proto[1:])
                try:
                    fut = router.route(batch.data_id, batch.records, sender, fields, batch.arrival_ms)
                except Exception as exc:  # noqa: BLE001 - a bug in routing fails the batch, not the stream
                    log.exception("routing failed", extra={"channel": batch.data_id})
                    failed.append(batch.batch_id)
                    reason[0] = reason[0] or repr(exc)
                    wake.set()
                    continue
                if fut is None:
                    ok.append(batch.batch_id)
                    BATCHES.labels("ok").inc()
                    wake.set()
                else:
                    pending[0] += 1
                    fut.add_done_callback(lambda f, b=batch.batch_id: settle(f, b))

        reader = asyncio.ensure_future(read())
        reader.add_done_callback(lambda _t: wake.set())
        try:
            await context.write(pb.DataAck())
            while True:
                await wake.wait()
                wake.clear()
                if ok or failed:
                    ack = pb.DataAck(ok=ok, failed=failed, reason=reason[0])
                    ok.clear()
                    failed.clear()
                    reason[0] = ""
                    await context.write(ack)
                if (reader.done() or self.closing) and pending[0] == 0 and not ok and not failed:
                    exc = reader.exception() if not reader.cancelled() else None
                    if exc is not None and not isinstance(exc, (grpc.aio.AioRpcError, asyncio.CancelledError)):
                        log.warning("agent data stream failed", extra={"agent_id": agent_id, "error": repr(exc)})
                    break
        finally:
            reader.cancel()
            self._wakes.discard(wake)
            self.streams.pop(key, None)
            STREAMS.set(len(self.streams))

    def relay_refusal(self, proxy_area: int, batch) -> str:
        """Why a batch a proxy of `proxy_area` relays may not be taken ("" if it may)."""
        if not valid_agent_id(batch.agent_id):
            return "a relayed batch must name its agent (bk_agent_id)"
        why = roles.relay_claim_refusal(proxy_area, batch.cloud_id, self.area_parents, what=f"agent {batch.agent_id}")
        if why:
            return why
        if self.deny is not None and batch.agent_id in self.deny.agents:
            return f"agent {batch.agent_id} is revoked"
        return ""

"""The proxy's data relay (spec section 12, default port 28625): agents' batches in, data servers out.

    agent --DataIngest stream--> relay: spool on the proxy's disk --lane stream--> data server (or parent proxy)
          <-- ack once the data server acknowledged --'

- **In.** The area's agents (and the proxies of areas cascaded behind this one) open the same DataIngest
  stream they would open to a data server; this proxy's agent access tells them its address instead of the
  data servers'. An agent's stream must be of this area and name the agent its certificate names; a
  cascaded proxy's batches each name their agent, of an area behind it (gse.common.roles).
- **Spooled.** Every batch taken is appended to one of `lanes` spools on the proxy's disk (the agent's own
  spool, gse/agent/spool.py), re-labelled with the proxy's batch id and the agent's identity (the
  DataBatch fields a proxy sets), before it goes upstream. The lane of an agent is fixed (its batches keep
  their order).
- **Out.** Each lane is one stream (the agent's sender, gse/agent/data.py: in-flight window, resend after a
  broken stream, refused batches again later) to a data server of those upstream names, spread by load.
- **Acknowledged end to end.** An agent's batch is acknowledged to it only once a data server acknowledged
  the proxy's copy, so the agent keeps its own until then: a proxy killed and never back loses nothing (the
  agents send again to another proxy of the area), and a proxy back after a crash sends what its spool
  holds (at-least-once: duplicates, never gaps). A batch sent again while the proxy still holds it (the
  agent's stream broke, or it timed out waiting while upstream was away) is not spooled twice: it waits
  for the same acknowledgement. While upstream is away the relay keeps taking batches into its spools
  (bounded by `spool_max_bytes` per lane).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import zlib

import grpc
from prometheus_client import Counter, Gauge

from gse.agent.data import DataConfig, DataPipeline
from gse.common import roles
from gse.common.config import ConfigError
from gse.common.datastate import MD_AGENT_ID, MD_CLOUD_ID, MD_IP
from gse.common.records import valid_agent_id
from gse.pb import data_pb2 as pb

log = logging.getLogger("gse.proxy.data")

STREAMS = Gauge("gse_proxy_data_streams", "Data streams of agents (and cascaded proxies) open")
TAKEN = Counter("gse_proxy_data_batches_total", "Batches taken from agents", ["outcome"])
ACKED = Counter("gse_proxy_data_acked_total", "Batches acknowledged to agents once a data server took them")
PENDING = Gauge("gse_proxy_data_pending_batches", "Batches held here, not yet acknowledged upstream")


@dataclasses.dataclass(frozen=True)
class ProxyDataConfig:
    """The proxy's `data` section: its DataIngest port, how many spools (lanes) it keeps, each lane's spool and
    segment size (bytes) and fsync interval (s), and the in-flight window, ack timeout and retry delay of each lane's
    stream upstream."""
    port: int = 28625                   # agents' data streams (spec section 12; 58625 in GSE 1.0)
    lanes: int = 2                      # spools, each with its own stream upstream
    spool_max_bytes: int = 1024**3      # per lane; beyond it the oldest segments are dropped (and counted)
    spool_segment_bytes: int = 16 * 1024**2
    spool_fsync_interval_s: float = 0.0  # 0: leave writing back to the kernel (survives the proxy being killed)
    max_inflight_bytes: int = 32 * 1024**2   # per lane stream
    max_inflight_batches: int = 1024
    ack_timeout_s: float = 30.0
    retry_delay_s: float = 1.0

    def validate(self) -> None:
        """ConfigError unless lanes is 1..16 and 1 MiB <= spool_segment_bytes <= spool_max_bytes."""
        if not 1 <= self.lanes <= 16:
            raise ConfigError("data.lanes must be 1..16")
        if self.spool_max_bytes < self.spool_segment_bytes or self.spool_segment_bytes < 1024 * 1024:
            raise ConfigError("data: need 1 MiB <= spool_segment_bytes <= spool_max_bytes")

    def lane_config(self) -> DataConfig:
        """The agent sender's DataConfig a lane runs with: batches up to min(8 MiB, a segment), at least 8 MiB in
        flight, and this section's spool and timeouts."""
        return DataConfig(batch_max_bytes=min(8 * 1024**2, self.spool_segment_bytes),
                          max_inflight_bytes=max(self.max_inflight_bytes, 8 * 1024**2),
                          max_inflight_batches=self.max_inflight_batches, ack_timeout_s=self.ack_timeout_s,
                          retry_delay_s=self.retry_delay_s, spool_max_bytes=self.spool_max_bytes,
                          spool_segment_bytes=self.spool_segment_bytes,
                          spool_fsync_interval_s=self.spool_fsync_interval_s)


class Lane(DataPipeline):
    """One spool and its stream upstream: the agent's sender, without plugin sockets or host snapshots."""

    def __init__(self, relay: "DataRelay", index: int, cfg: ProxyDataConfig, data_dir: str, tls, identity, ip: str):
        super().__init__(cfg.lane_config(), data_dir=f"{data_dir}/lane-{index}", run_dir=f"{data_dir}/lane-{index}",
                         tls=tls, identity=identity, send=lambda _f: False, ip=ip)
        self.index = index
        self.owner: dict[int, tuple[str, int]] = {}     # our batch id -> (sender, its batch id)
        self.on_acked = lambda ids: relay.acked(self, ids)

    async def start(self) -> None:
        """Open the lane's spool and start its send and re-spread loops (and the fsync loop when set); batches a
        previous run left go first. No plugin sockets, no snapshots."""
        self.spool.open()
        self.cursor = self.spool.first_pending() or self.spool.next_id
        if self.spool.first_pending() is not None:
            self._has_data.set()                        # batches kept from before a crash go first
        coros = [self._send_loop(), self._respread_loop()]
        if self.cfg.spool_fsync_interval_s > 0:
            coros.append(self._fsync_loop())
        self._tasks = [asyncio.ensure_future(c) for c in coros]

    async def stop(self) -> None:
        """Wait up to 2 s for the acknowledgements of what is in flight, then stop the loops and close the spool (what
        is unacknowledged stays in it for the next run)."""
        deadline = asyncio.get_running_loop().time() + 2.0
        while self.inflight and self.current and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.spool.close()

    def recovered(self) -> list[tuple[int, pb.DataBatch]]:
        """What a previous run left in this spool: (our batch id, the batch)."""
        out = []
        bid = self.spool.first_pending()
        while bid is not None:
            payload = self.spool.read(bid)
            if payload is not None:
                out.append((bid, pb.DataBatch.FromString(payload)))
            bid = self.spool.first_pending(bid + 1)
        return out


class _Sink:
    """The acknowledgements owed to one downstream stream."""

    __slots__ = ("ok", "wake", "open")

    def __init__(self):
        self.ok: list[int] = []
        self.wake = asyncio.Event()
        self.open = True

    def ack(self, batch_id: int) -> None:
        if self.open:
            self.ok.append(batch_id)
            self.wake.set()


class DataRelay:
    """The DataIngest service of a proxy and its lanes upstream."""

    SERVICE = "gse.pb.DataIngest"

    def __init__(self, cfg: ProxyDataConfig, *, data_dir: str, tls, node_id: str, area: int, ip: str, access=None):
        self.cfg = cfg
        self.node_id = node_id
        self.area = area
        self.ip = ip
        self.access = access        # the agent access: which areas are cascaded behind this proxy
        ident = lambda: {"bk_agent_id": node_id, "cloud_id": area}      # noqa: E731 - how lanes name themselves
        self.lanes = [Lane(self, i, cfg, data_dir, tls, ident, ip) for i in range(cfg.lanes)]
        self.held: dict[tuple[str, int], tuple[Lane, int]] = {}     # (sender, its batch id) -> (lane, our id)
        self.waiting: dict[tuple[str, int], _Sink] = {}             # ... -> the stream to acknowledge it on
        self.streams = 0

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every lane and take up what their spools hold from a previous run, so that an agent sending a batch
        again waits for the same acknowledgement instead of spooling it twice."""
        recovered = 0
        for lane in self.lanes:
            await lane.start()
            for bid, batch in lane.recovered():
                key = (batch.agent_id, batch.origin_batch_id)
                lane.owner[bid] = key
                if key != (self.node_id, 0):        # (the proxy's own records are not anybody's to wait for)
                    self.held[key] = (lane, bid)
                recovered += 1
        if recovered:
            log.info("data relay spools recovered", extra={"batches": recovered})
        PENDING.set(len(self.held))

    async def stop(self) -> None:
        """Stop every lane (each waits up to 2 s for acknowledgements in flight)."""
        for lane in self.lanes:
            await lane.stop()

    def on_view(self, view) -> None:
        """The data servers upstream (told by the task server, or the parent proxy's data relay)."""
        for lane in self.lanes:
            lane.on_view(view)

    def health(self) -> dict:
        """The data relay in the proxy's /healthz: open agent streams, batches held unacknowledged, and each lane's
        data server and spool figures."""
        return {"streams": self.streams, "pending": len(self.held),
                "lanes": [{"data_server": lane.current, "spool": lane.spool.stats()} for lane in self.lanes]}

    # ---- in ------------------------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler serving gse.pb.DataIngest/Stream (DataBatch in, DataAck out), the method agents call on a
        data server."""
        return grpc.method_handlers_generic_handler(self.SERVICE, {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.stream, request_deserializer=pb.DataBatch.FromString,
                response_serializer=pb.DataAck.SerializeToString)})

    def _lane(self, agent_id: str) -> Lane:
        return self.lanes[zlib.crc32(agent_id.encode()) % len(self.lanes)]

    def _refusal(self, peer: roles.Identity, md: dict) -> str:
        agent_id = md.get(MD_AGENT_ID, "")
        if not valid_agent_id(agent_id):
            return f"metadata {MD_AGENT_ID} must be a bk_agent_id"
        cloud = md.get(MD_CLOUD_ID, "0") or "0"
        if not (cloud.isdigit() and len(cloud) < 10):
            return f"metadata {MD_CLOUD_ID} must be a bk_cloud_id (a non-negative number)"
        cloud = int(cloud)
        if peer.role == roles.AGENT:
            if peer.agent_id != agent_id:
                return f"the stream names agent {agent_id} but the certificate is agent {peer.agent_id or '(none)'}"
            return roles.relay_claim_refusal(self.area, cloud, what=f"agent {agent_id}")
        if peer.area == roles.NO_AREA or peer.area == self.area:
            return "a proxy relaying data here must be of an area cascaded behind this proxy's"
        return ""

    def _batch_refusal(self, peer: roles.Identity, batch: pb.DataBatch) -> str:
        """A cascaded proxy's batch: it names an agent of its area or of one behind it."""
        if not valid_agent_id(batch.agent_id):
            return "a relayed batch must name its agent"
        parents = self.access.parents if self.access is not None else {}
        return roles.relay_claim_refusal(peer.area, batch.cloud_id, parents, what=f"agent {batch.agent_id}")

    async def stream(self, request_iterator, context):
        """One agent's (or cascaded proxy's) DataIngest stream: aborted with PERMISSION_DENIED when the metadata or
        certificate may not send for that agent or area; else an empty DataAck at once, then each batch is spooled and
        acknowledged (`ok`) once a data server acknowledged the proxy's copy. A cascaded proxy's batch naming an agent
        it may not speak for comes back in `failed` with the reason."""
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        peer = roles.peer_identity(context)
        why = self._refusal(peer, md)
        if why:
            TAKEN.labels("refused").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        sender = md[MD_AGENT_ID]
        relaying = peer.role == roles.PROXY
        cloud, ip = int(md.get(MD_CLOUD_ID, "0") or 0), md.get(MD_IP, "")
        sink = _Sink()
        failed: list[int] = []
        reason = [""]
        self.streams += 1
        STREAMS.set(self.streams)

        async def read() -> None:
            async for batch in request_iterator:
                if relaying:
                    why = self._batch_refusal(peer, batch)
                    if why:
                        TAKEN.labels("refused").inc()
                        failed.append(batch.batch_id)
                        reason[0] = reason[0] or why
                        sink.wake.set()
                        continue
                    self.take(sender, batch, batch.agent_id, batch.cloud_id, batch.ip, sink)
                else:
                    self.take(sender, batch, sender, cloud, ip, sink)

        reader = asyncio.ensure_future(read())
        reader.add_done_callback(lambda _t: sink.wake.set())
        try:
            await context.write(pb.DataAck())
            while True:
                await sink.wake.wait()
                sink.wake.clear()
                if sink.ok or failed:
                    ack = pb.DataAck(ok=sink.ok, failed=failed, reason=reason[0])
                    sink.ok = []
                    failed.clear()
                    reason[0] = ""
                    await context.write(ack)
                if reader.done():
                    break
        finally:
            sink.open = False
            reader.cancel()
            self.streams -= 1
            STREAMS.set(self.streams)

    def take(self, sender: str, batch: pb.DataBatch, agent_id: str, cloud: int, ip: str, sink: _Sink) -> None:
        """One batch from `sender` (an agent, or a cascaded proxy relaying `agent_id`'s)."""
        key = (sender, batch.batch_id)
        self.waiting[key] = sink
        if key in self.held:
            TAKEN.labels("again").inc()         # sent again while we hold it: the same acknowledgement serves
            return
        lane = self._lane(agent_id)

        def payload(bid: int) -> bytes:
            return pb.DataBatch(batch_id=bid, data_id=batch.data_id, records=batch.records,
                                arrival_ms=batch.arrival_ms, agent_id=agent_id, cloud_id=cloud, ip=ip,
                                origin_batch_id=batch.batch_id).SerializeToString()

        bid = lane.enqueue(payload, len(batch.records))
        lane.owner[bid] = key
        self.held[key] = (lane, bid)
        TAKEN.labels("taken").inc()
        PENDING.set(len(self.held))

    def submit(self, data_id: int, records: list[bytes]) -> None:
        """The proxy's own records (its reachability alarms): sent as the proxy's, on its own lane."""
        lane = self._lane(self.node_id)

        def payload(bid: int) -> bytes:
            return pb.DataBatch(batch_id=bid, data_id=data_id, records=records, arrival_ms=int(time.time() * 1000),
                                agent_id=self.node_id, cloud_id=self.area, ip=self.ip).SerializeToString()

        bid = lane.enqueue(payload, len(records))
        lane.owner[bid] = (self.node_id, 0)

    # ---- out -----------------------------------------------------------------------------------------------

    def acked(self, lane: Lane, ids: list[int]) -> None:
        """A data server acknowledged our batches: acknowledge the senders' own."""
        n = 0
        for bid in ids:
            key = lane.owner.pop(bid, None)
            if key is None or key[1] == 0 and key[0] == self.node_id:
                continue
            if self.held.get(key, (None, 0))[1] == bid:
                del self.held[key]
            sink = self.waiting.pop(key, None)
            if sink is not None:
                sink.ack(key[1])
                n += 1
        ACKED.inc(n)
        PENDING.set(len(self.held))

    def view_frame(self, address: str) -> pb.DataServerView:
        """What agents are told instead of the data servers: this relay."""
        return pb.DataServerView(servers=[pb.DataServerInfo(node_id=self.node_id, address=address, load=self.streams)])

"""The agent's data path: plugin IPC sockets in, batches per DataID out to a data server, at-least-once.

    plugin --report socket--> on_records --> open batch per DataID --seal--> spool (disk) --> stream --> data server
                                                                                   ^ ack drops it --'

- **Batching.** Records are grouped per DataID into an open batch that is sealed when it reaches
  `batch_max_bytes` or `batch_max_records`, or `batch_delay_ms` after its first record.
- **Durability.** A sealed batch is appended to the spool (gse.agent.spool) before it is sent and leaves the
  spool only when a data server acknowledged it, which a data server does only after every output of the
  channel's route accepted it. What is acknowledged to a plugin: the IPC protocol has no acknowledgement, so
  the agent's promise is that a record it read is in the spool within `batch_delay_ms` (and at once on a
  graceful stop); from then on, neither a data server crash nor an agent restart loses it. Resends after a
  lost ack make duplicates, never gaps.
- **Sending.** One TLS gRPC stream to one data server, a window of unacknowledged batches in flight
  (`max_inflight_bytes` / `max_inflight_batches`). Batches are sent in id order; a stream that breaks puts
  its unacknowledged batches back, and they go first on the next stream. A batch an output refused is
  sent again after `retry_delay_s`. No data server reachable: batches wait in the spool (bounded; when full
  the oldest are dropped and counted) and drain when one is back.
- **Balancing.** The task server tells the agent the data servers registered in ZooKeeper and their load
  (agents connected). A new stream goes to a server chosen at random weighted by how far below the average
  load it is. Every `respread_interval_s` an agent on a server above the average moves with probability
  (load - average) / load, so a server that joins fills up within a round and no server is stampeded.
- **Host snapshot** every `snapshot_interval_s` as a record on the reserved DataID (0, the default: none; the
  heartbeats carry the host's figures to the task server anyway, and list_agent_info shows them).
- **Nothing loaded before it is needed.** No stream is opened (and gRPC not even imported) until there is a
  batch to send: an agent whose plugins report nothing carries no data-path connection.
- **Messages.** cluster/dispatch_message content reaches the plugins on the message socket; their responds go
  back to the task server, which posts them to the slot's callback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import psutil

from gse.common.lazyimport import lazy_module
from gse.common.lazymetrics import Counter, Gauge
from gse.common.backoff import Backoff
from gse.common.address import split_host_port
from gse.common.config import ConfigError, check_addresses
from gse.common.datastate import (CHANNEL_HOST_SNAPSHOT, MD_AGENT_ID, MD_CLOUD_ID, MD_IP, STREAM_METHOD)
from gse.common.tls import TLSMaterial
from gse.pb import agent_pb2 as apb
from gse.pb import data_pb2 as pb

from .ipc import DEFAULT_MESSAGE_SOCKET, DEFAULT_REPORT_SOCKET, MessageSocketServer, Record, ReportSocketServer
from .relay import SourceRelay
from .spool import Spool

grpc = lazy_module("grpc")                  # loaded with the first data stream (an idle agent has none)
rpc = lazy_module("gse.common.rpc")

log = logging.getLogger("gse.agent.data")

RECONNECT_BASE_S = 0.2     # the first reconnect to a data server waits up to this long

RECORDS_IN = Counter("gse_agent_data_records_total", "Records read from plugins (and the agent's own)")
BATCHES_SENT = Counter("gse_agent_data_batches_sent_total", "Batches written to a data server (resends too)")
BATCHES_ACKED = Counter("gse_agent_data_batches_acked_total", "Batches acknowledged by a data server")
BATCHES_FAILED = Counter("gse_agent_data_batches_failed_total", "Batches a data server refused (sent again)")
RESENDS = Counter("gse_agent_data_resends_total", "Batches put back for sending after a stream ended")
SPOOL_BYTES = Gauge("gse_agent_data_spool_bytes", "Bytes in the on-disk spool")
SPOOL_UNACKED = Gauge("gse_agent_data_spool_unacked_batches", "Batches in the spool not yet acknowledged")
SPOOL_DROPPED = Gauge("gse_agent_data_spool_dropped_records", "Records dropped because the spool was full")
SPOOL_DROPPED_BATCHES = Gauge("gse_agent_data_spool_dropped_batches", "Batches dropped because the spool was full")
CONNECTED = Gauge("gse_agent_data_connected", "1 while a data server stream is open")
SWITCHES = Counter("gse_agent_data_server_switches_total", "Moves to another data server", ["reason"])
MESSAGES = Counter("gse_agent_plugin_messages_total", "dispatch_message deliveries", ["outcome"])
IPC_ERRORS = Gauge("gse_agent_ipc_errors", "Plugin connections dropped for a bad frame", ["socket", "reason"])
IPC_RECORDS = Gauge("gse_agent_ipc_records", "Records read from the report socket")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The agent's `data` config section: batching (bytes, records, delay in ms), the in-flight window to a data
    server, timeouts and back-off (seconds), the on-disk spool (bytes), host snapshots and the plugin IPC sockets
    (spec section 5: 10 MiB messages, socket mode). `servers` (host:port) are used only when the task server names no
    data server."""
    enabled: bool = True
    servers: tuple[str, ...] = ()       # data servers (host:port) to use when the task server names none
    batch_max_bytes: int = 512 * 1024
    batch_max_records: int = 10_000
    batch_delay_ms: int = 5
    max_inflight_bytes: int = 16 * 1024 * 1024
    max_inflight_batches: int = 256
    ack_timeout_s: float = 30.0         # an unacknowledged batch older than this ends the stream
    retry_delay_s: float = 1.0          # a refused batch is sent again after this
    connect_timeout_s: float = 10.0
    reconnect_max_s: float = 5.0
    respread_interval_s: float = 60.0
    spool_max_bytes: int = 512 * 1024 * 1024
    spool_segment_bytes: int = 16 * 1024 * 1024
    spool_cache_bytes: int = 64 * 1024 * 1024
    spool_fsync_interval_s: float = 0.0     # 0 = leave writing back to the kernel (survives agent crashes)
    snapshot_interval_s: float = 0.0    # 0 = no host snapshot records
    snapshot_data_id: int = CHANNEL_HOST_SNAPSHOT
    ipc_max_message: int = 10 * 1024 * 1024
    ipc_mode: int = 0o660

    def validate(self) -> None:
        """Raise ConfigError naming the keys when the sizes do not nest (batch <= segment <= spool, batch <= in-flight
        bytes), an interval is not positive, `ipc_mode` gives others access, or a server address is malformed."""
        if self.batch_max_bytes < 1024 or self.batch_max_records < 1 or self.batch_delay_ms < 0:
            raise ConfigError("data: batch_max_bytes >= 1024, batch_max_records >= 1, batch_delay_ms >= 0")
        if self.spool_segment_bytes < self.batch_max_bytes or self.spool_max_bytes < self.spool_segment_bytes:
            raise ConfigError("data: need batch_max_bytes <= spool_segment_bytes <= spool_max_bytes")
        if self.max_inflight_batches < 1 or self.max_inflight_bytes < self.batch_max_bytes:
            raise ConfigError("data: max_inflight_batches >= 1 and max_inflight_bytes >= batch_max_bytes")
        if self.respread_interval_s <= 0 or self.snapshot_interval_s < 0 or self.reconnect_max_s <= 0:
            raise ConfigError("data: respread_interval_s and reconnect_max_s must be positive, snapshot_interval_s "
                              "not negative")
        if self.ipc_mode & ~0o770:
            raise ConfigError("data: ipc_mode must not give others access (0660 or tighter)")
        check_addresses("data.servers", self.servers)


class _Open:
    """A batch being filled."""
    __slots__ = ("records", "size", "arrival", "timer")

    def __init__(self, arrival: int):
        self.records: list[bytes] = []
        self.size = 0
        self.arrival = arrival
        self.timer: asyncio.TimerHandle | None = None


def choose_server(loads: dict[str, float], rng: random.Random = random) -> str | None:
    """A data server for a new stream: random, weighted by how far each is below the average load."""
    if not loads:
        return None
    addrs = sorted(loads)
    target = (sum(loads.values()) + 1) / len(addrs)
    weights = [max(0.0, target - loads[a]) for a in addrs]
    if sum(weights) <= 0:
        return rng.choice(addrs)
    return rng.choices(addrs, weights)[0]


def should_move(loads: dict[str, float], current: str, rng: random.Random = random) -> str | None:
    """Re-spread: where to move from `current` this round, or None to stay."""
    if current not in loads or len(loads) < 2:
        return None
    avg = sum(loads.values()) / len(loads)
    mine = loads[current]
    if mine - avg < 1 or mine <= 0:
        return None
    if rng.random() >= (mine - avg) / mine:
        return None
    below = {a: l for a, l in loads.items() if a != current and l < avg}
    return choose_server(below, rng) if below else None


class HostSnapshotter:
    """The host snapshot record: cpu, memory, disks, network, load, uptime, process count."""

    def __init__(self):
        psutil.cpu_percent(None)

    def sample(self, identity: dict) -> bytes:
        """One host snapshot record (compact JSON bytes: cpu, memory, disks, network counters, load, uptime in s,
        process count, time in epoch ms) for the agent named by `identity` (`bk_agent_id`, `cloud_id`, optional `ip`;
        KeyError without the first two). Blocking (psutil): run it in a thread."""
        vm = psutil.virtual_memory()
        disks = []
        for part in psutil.disk_partitions(all=False):
            try:
                du = psutil.disk_usage(part.mountpoint)
            except OSError:
                continue
            disks.append({"mount": part.mountpoint, "fstype": part.fstype, "total": du.total, "used": du.used,
                          "rate": du.percent})
        net = []
        for name, io in psutil.net_io_counters(pernic=True).items():
            net.append({"name": name, "rx_bytes": io.bytes_recv, "tx_bytes": io.bytes_sent,
                        "rx_packets": io.packets_recv, "tx_packets": io.packets_sent})
        load1, load5, load15 = os.getloadavg()
        boot = psutil.boot_time()
        return json.dumps({
            "bk_agent_id": identity["bk_agent_id"], "bk_cloud_id": identity["cloud_id"],
            "ip": identity.get("ip", ""), "hostname": socket.gethostname(), "time": int(time.time() * 1000),
            "cpu": {"num": psutil.cpu_count() or 1, "rate": psutil.cpu_percent(None)},
            "mem": {"total": vm.total, "used": vm.total - vm.available, "rate": vm.percent},
            "disks": disks, "net": net, "load": {"load1": load1, "load5": load5, "load15": load15},
            "uptime_s": int(time.time() - boot), "boot_time": int(boot), "proc_count": len(psutil.pids()),
        }, separators=(",", ":")).encode()


class DataPipeline:
    """The agent's data path (see the module): the plugin report and message sockets (spec section 5), batches per
    DataID in the spool, one stream to a data server, and plugin messages both ways (spec sections 4 and 9).
    `identity()` gives the agent's bk_agent_id and cloud_id; `send` writes a frame to the task server (False when it
    cannot now)."""
    def __init__(self, cfg: DataConfig, *, data_dir: str, run_dir: str, tls: TLSMaterial,
                 identity: Callable[[], dict], send: Callable[[apb.AgentFrame], bool], ip: str, bind_ip: str = ""):
        self.cfg = cfg
        self.tls = tls
        self.identity = identity
        self.send_frame = send
        self.ip = ip
        self.relay = SourceRelay(bind_ip) if bind_ip else None
        self.spool = Spool(Path(data_dir) / "spool", max_bytes=cfg.spool_max_bytes,
                           segment_bytes=cfg.spool_segment_bytes, cache_bytes=cfg.spool_cache_bytes)
        self.report = ReportSocketServer(os.path.join(run_dir, DEFAULT_REPORT_SOCKET), self.on_records,
                                         self.identity, max_message=cfg.ipc_max_message, mode=cfg.ipc_mode)
        self.messages = MessageSocketServer(os.path.join(run_dir, DEFAULT_MESSAGE_SOCKET), self.on_respond,
                                            self.identity, max_message=cfg.ipc_max_message, mode=cfg.ipc_mode)
        self._open: dict[int, _Open] = {}
        self._wake = asyncio.Event()
        self._has_data = asyncio.Event()            # set once there is something to send
        self._view_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Sending state: the next batch id to consider and the batches in flight on the current stream.
        self.cursor = 1
        self.inflight: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.inflight_bytes = 0
        self._failed: list[tuple[float, int]] = []      # (when to resend, batch id)
        self.loads: dict[str, float] = {}                # data server address -> load, as last announced
        self.current: str | None = None
        self._move_to: str | None = None
        self._switch_reason = ""
        self._avoid: dict[str, float] = {}               # address -> until when not to pick it
        self._replies: list[apb.AgentFrame] = []        # plugin replies waiting for the task server
        self._slots: OrderedDict[str, str] = OrderedDict()   # message_id -> slot_id
        self.stats = {"acked_records": 0, "sent_batches": 0}
        self.on_acked: Callable[[list[int]], None] | None = None     # batch ids a data server acknowledged

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (resuming after what was acknowledged), start the source-address relay when `bind_ip` is
        set, bind the report and message sockets, and start the send, re-spread and housekeeping loops (and the
        snapshot and fsync loops when configured). No stream is opened until the first batch; batches left from before
        a restart count as one."""
        self.spool.open()
        self.cursor = self.spool.first_pending() or self.spool.next_id
        self._gauges()
        if self.relay is not None:
            await self.relay.start()
        await self.report.start()
        await self.messages.start()
        if self.cfg.servers and not self.loads:
            self.loads = {s: 0.0 for s in self.cfg.servers}
        coros = [self._send_loop(), self._respread_loop(), self._housekeeping()]
        if self.cfg.snapshot_interval_s > 0:
            coros.append(self._snapshot_loop())
        if self.spool.first_pending() is not None:
            self._has_data.set()                    # batches kept from before a restart
        if self.cfg.spool_fsync_interval_s > 0:
            coros.append(self._fsync_loop())
        self._tasks = [asyncio.ensure_future(c) for c in coros]

    async def stop(self) -> None:
        """Stop reading plugins, spool every open batch, give the stream a moment to get its acks."""
        await self.report.stop()
        await self.messages.stop()
        for data_id in list(self._open):
            self._seal(data_id)
        deadline = time.monotonic() + 2.0
        while self.inflight and self.current and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.relay is not None:
            await self.relay.stop()
        self.spool.close()

    # ---- records in -------------------------------------------------------------------------------

    def on_records(self, records: list[Record]) -> None:
        """From the report socket (and the agent itself): append to the open batch of each record's DataID."""
        cfg = self.cfg
        max_bytes, max_records = cfg.batch_max_bytes, cfg.batch_max_records
        opened = self._open
        RECORDS_IN.inc(len(records))
        for data_id, body, arrival in records:
            ob = opened.get(data_id)
            if ob is None:
                ob = opened[data_id] = _Open(arrival)
                if cfg.batch_delay_ms > 0:
                    ob.timer = asyncio.get_running_loop().call_later(cfg.batch_delay_ms / 1000, self._expire,
                                                                     data_id, ob)
            ob.records.append(body)
            ob.size += len(body)
            if ob.size >= max_bytes or len(ob.records) >= max_records:
                self._seal(data_id)
        if cfg.batch_delay_ms <= 0:
            for data_id in list(opened):
                self._seal(data_id)

    def submit(self, data_id: int, bodies: list[bytes]) -> None:
        """The agent's own records (`bodies`, one record each) on DataID `data_id`, stamped now (epoch ms) and batched
        like a plugin's."""
        at = time.time_ns() // 1_000_000
        self.on_records([Record(data_id, b, at) for b in bodies])

    def _expire(self, data_id: int, ob: _Open) -> None:
        if self._open.get(data_id) is ob:
            ob.timer = None
            self._seal(data_id)

    def _seal(self, data_id: int) -> None:
        ob = self._open.pop(data_id)
        if ob.timer is not None:
            ob.timer.cancel()
        records = ob.records

        def payload(batch_id: int) -> bytes:
            """The sealed batch as the spool keeps it, under the batch id the spool gives it."""
            return pb.DataBatch(batch_id=batch_id, data_id=data_id, records=records,
                                arrival_ms=ob.arrival).SerializeToString()

        self.enqueue(payload, len(records))

    def enqueue(self, payload: Callable[[int], bytes], count: int) -> int:
        """Append one batch to the spool and wake the sender: `payload(batch_id)` gives the serialized DataBatch,
        `count` its records. Returns the batch id. The first batch also opens the first stream."""
        batch_id, _ = self.spool.append(payload, count)
        self._wake.set()
        self._has_data.set()
        return batch_id

    # ---- data server view and balancing -----------------------------------------------------------

    def on_view(self, view: pb.DataServerView) -> None:
        """The data servers the task server told (DataServerView: address and load of each); with none, the configured
        `servers`. A stream on a server no longer listed moves to another."""
        loads = {s.address: float(s.load) for s in view.servers if s.address}
        if not loads and self.cfg.servers:
            loads = {s: 0.0 for s in self.cfg.servers}
        self.loads = loads
        if self.current is not None and self.current not in loads and loads:
            self._request_move(choose_server(loads), "server_left")
        self._view_changed.set()
        self._wake.set()

    def _request_move(self, address: str | None, reason: str) -> None:
        if address and address != self.current:
            self._move_to, self._switch_reason = address, reason
            self._wake.set()

    async def _respread_loop(self) -> None:
        while True:
            # Jittered below the interval: a data server that joins gets its share within one interval.
            await asyncio.sleep(self.cfg.respread_interval_s * random.uniform(0.75, 1.0))
            if self.current is None or self._move_to is not None:
                continue
            target = should_move(self.loads, self.current)
            if target is not None:
                log.info("moving to a less loaded data server", extra={"from": self.current, "to": target})
                self._request_move(target, "respread")

    def _pick(self) -> str | None:
        if self._move_to is not None:
            address, self._move_to = self._move_to, None
            if address in self.loads:
                return address
        now = time.monotonic()
        usable = {a: l for a, l in self.loads.items() if self._avoid.get(a, 0) <= now}
        return choose_server(usable or self.loads)

    # ---- sending ----------------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self.relay is None:
            return rpc.make_channel(self.tls, address)
        self.relay.target = split_host_port(address)
        name = self.tls.server_name or self.relay.target[0]
        return rpc.make_channel(self.tls, self.relay.grpc_target,
                                [("grpc.ssl_target_name_override", name), ("grpc.default_authority", address)])

    async def _send_loop(self) -> None:
        # Full jitter from 0.2 s up to reconnect_max_s; a stream that lasted 10 s starts over.
        backoff = Backoff(min(RECONNECT_BASE_S, self.cfg.reconnect_max_s), self.cfg.reconnect_max_s)
        await self._has_data.wait()                 # the first stream waits for the first batch
        while True:
            address = self._pick()
            if address is None:
                self._view_changed.clear()
                await self._view_changed.wait()
                continue
            started = time.monotonic()
            try:
                ok = await self._stream(address)
            except Exception:  # noqa: BLE001 - a bug here must not stop sending for good
                log.exception("data stream failed unexpectedly", extra={"server": address})
                ok = False
            if ok and time.monotonic() - started > 10:
                backoff.reset()
            if self._move_to is not None:
                continue
            if not ok:
                self._avoid[address] = time.monotonic() + min(30.0, 2.0 * (backoff.attempt + 1))
            await backoff.sleep()

    async def _stream(self, address: str) -> bool:
        """One stream to one data server; False when it failed (rather than being left on purpose)."""
        ident = self.identity()
        md = ((MD_AGENT_ID, str(ident["bk_agent_id"])), (MD_CLOUD_ID, str(ident["cloud_id"])), (MD_IP, self.ip))
        channel = self._channel(address)
        call = channel.stream_stream(STREAM_METHOD, request_serializer=rpc.identity,
                                     response_deserializer=pb.DataAck.FromString)(metadata=md)
        reader: asyncio.Task | None = None
        ok = True
        try:
            first = await asyncio.wait_for(call.read(), self.cfg.connect_timeout_s)
            if first is grpc.aio.EOF:
                return False
            self.current = address
            CONNECTED.set(1)
            log.info("data server stream open", extra={"server": address})
            reader = asyncio.ensure_future(self._read_acks(call))
            await self._write_batches(call, reader)
        except grpc.aio.AioRpcError as exc:
            ok = False
            log.warning("data server stream failed", extra={"server": address, "code": exc.code().name,
                                                             "details": exc.details()})
        except asyncio.TimeoutError:
            ok = False
            log.warning("data server did not answer", extra={"server": address})
        except _StreamEnded as exc:
            ok = exc.ok
            if not ok:
                log.warning("data server stream ended", extra={"server": address, "reason": str(exc)})
        finally:
            if reader is not None:
                reader.cancel()
            self._requeue_inflight()
            if self.current == address:
                self.current = None
                CONNECTED.set(0)
            call.cancel()
            await channel.close()
        return ok

    def _requeue_inflight(self) -> None:
        if self.inflight:
            RESENDS.inc(len(self.inflight))
            self.cursor = min(self.cursor, next(iter(self.inflight)))
            self.inflight.clear()
            self.inflight_bytes = 0

    async def _read_acks(self, call) -> None:
        spool = self.spool
        while True:
            ack = await call.read()         # read(), as for the first message: grpc refuses mixing styles
            if ack is grpc.aio.EOF:
                break
            for bid in ack.ok:
                entry = self.inflight.pop(bid, None)
                if entry is not None:
                    self.inflight_bytes -= entry[0]
                n = spool.records_of(bid)
                if spool.ack(bid):
                    self.stats["acked_records"] += n
                    BATCHES_ACKED.inc()
            if ack.ok and self.on_acked is not None:
                self.on_acked(list(ack.ok))
            if ack.failed:
                BATCHES_FAILED.inc(len(ack.failed))
                at = time.monotonic() + self.cfg.retry_delay_s
                for bid in ack.failed:
                    entry = self.inflight.pop(bid, None)
                    if entry is not None:
                        self.inflight_bytes -= entry[0]
                    self._failed.append((at, bid))
                log.warning("data server refused batches; sending them again later",
                            extra={"batches": len(ack.failed), "reason": ack.reason})
            self._wake.set()
        raise _StreamEnded(False, "data server closed the stream")

    async def _write_batches(self, call, reader: asyncio.Task) -> None:
        cfg = self.cfg
        spool = self.spool
        while True:
            if reader.done():
                exc = reader.exception()
                raise exc if exc is not None else _StreamEnded(False, "ack reader ended")
            if self._move_to is not None:
                await self._drain_before_move(call, reader)
                raise _StreamEnded(True, "moving")
            now = time.monotonic()
            if self._failed and self._failed[0][0] <= now:
                due = [b for t, b in self._failed if t <= now]
                self._failed = [(t, b) for t, b in self._failed if t > now]
                self.cursor = min([self.cursor, *due])
            if self.inflight:
                oldest = next(iter(self.inflight.values()))[1]
                if now - oldest > cfg.ack_timeout_s:
                    raise _StreamEnded(False, f"no acknowledgement within {cfg.ack_timeout_s}s")
            wrote = False
            while (self.cursor < spool.next_id and len(self.inflight) < cfg.max_inflight_batches
                   and self.inflight_bytes < cfg.max_inflight_bytes and self._move_to is None):
                bid = self.cursor
                self.cursor += 1
                if bid in self.inflight or not spool.pending(bid):
                    continue
                payload = spool.read(bid)
                if payload is None:
                    continue
                self.inflight[bid] = (len(payload), time.monotonic())
                self.inflight_bytes += len(payload)
                await call.write(payload)
                BATCHES_SENT.inc()
                self.stats["sent_batches"] += 1
                wrote = True
            if wrote:
                continue
            self._wake.clear()
            timeout = 1.0
            if self._failed:
                timeout = max(0.0, min(timeout, self._failed[0][0] - time.monotonic()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _drain_before_move(self, call, reader: asyncio.Task) -> None:
        """Leave a stream on purpose: no new batches, a bounded wait for the acks of those in flight."""
        SWITCHES.labels(self._switch_reason or "move").inc()
        deadline = time.monotonic() + min(5.0, self.cfg.ack_timeout_s)
        while self.inflight and not reader.done() and time.monotonic() < deadline:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass

    # ---- snapshot, messages, housekeeping --------------------------------------------------------

    async def _snapshot_loop(self) -> None:
        snapper = HostSnapshotter()
        await asyncio.sleep(min(2.0, self.cfg.snapshot_interval_s))
        while True:
            ident = {**self.identity(), "ip": self.ip}
            try:
                body = await asyncio.to_thread(snapper.sample, ident)
                self.submit(self.cfg.snapshot_data_id, [body])
            except Exception:  # noqa: BLE001 - a failing probe must not stop the next snapshot
                log.exception("host snapshot failed")
            await asyncio.sleep(self.cfg.snapshot_interval_s)

    def on_plugin_message(self, msg: pb.PluginMessage) -> None:
        """Hand a cluster/dispatch_message content (spec section 4) to the plugin on the message socket (to the named
        plugin, or every one), remembering its slot for the reply (the newest 10,000 messages). Too large or no
        plugin: counted and logged, never raised."""
        self._slots[msg.message_id] = msg.slot_id
        while len(self._slots) > 10_000:
            self._slots.popitem(last=False)
        try:
            n = self.messages.dispatch(msg.message_id, msg.slot_id, msg.content, msg.plugin_name or None)
        except ValueError as exc:
            MESSAGES.labels("too_large").inc()
            log.warning("plugin message not delivered", extra={"message_id": msg.message_id, "error": str(exc)})
            return
        MESSAGES.labels("delivered" if n else "no_plugin").inc()
        if not n:
            log.warning("no plugin on the message socket for a message",
                        extra={"message_id": msg.message_id, "slot_id": msg.slot_id, "plugin": msg.plugin_name})

    def on_respond(self, meta: dict, payload: bytes, plugin_name: str) -> None:
        """A plugin's 0x900a respond (spec sections 5 and 9): sent up as a PluginReply to the slot that dispatched
        `message_id` (else the meta's session_id); kept (the newest 1,000) and sent again every second while the task
        server is away."""
        message_id = str(meta.get("message_id", ""))
        slot = self._slots.get(message_id) or str(meta.get("session_id", ""))
        frame = apb.AgentFrame(plugin_reply=pb.PluginReply(
            message_id=message_id, slot_id=slot, plugin_name=plugin_name, content=payload,
            meta_json=json.dumps(meta, separators=(",", ":"), ensure_ascii=False)))
        if not self.send_frame(frame):
            self._replies.append(frame)
            del self._replies[:-1000]

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._replies:
                pending, self._replies = self._replies, []
                for i, frame in enumerate(pending):
                    if not self.send_frame(frame):
                        self._replies = pending[i:] + self._replies
                        break
            self._gauges()

    async def _fsync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.spool_fsync_interval_s)
            await asyncio.to_thread(self.spool.sync)

    def _gauges(self) -> None:
        s = self.spool
        SPOOL_BYTES.set(s.total_bytes)
        SPOOL_UNACKED.set(s.unacked)
        SPOOL_DROPPED.set(s.dropped_records)
        SPOOL_DROPPED_BATCHES.set(s.dropped_batches)
        IPC_RECORDS.set(self.report.stats["records"])
        for name, server in (("report", self.report), ("message", self.messages)):
            for reason, n in server.stats["errors"].items():
                IPC_ERRORS.labels(name, reason).set(n)

    @property
    def needed(self) -> bool:
        """Whether this agent has had anything to send yet (until then it holds no data server stream)."""
        return self._has_data.is_set()

    def health(self) -> dict:
        """The data path in /healthz: the data server streamed to (None when none), spool figures, batches in flight
        and the two IPC sockets' counters."""
        return {"data_server": self.current, "spool": self.spool.stats(), "inflight": len(self.inflight),
                "ipc_report": self.report.stats, "ipc_message": {k: v for k, v in self.messages.stats.items()}}


class _StreamEnded(Exception):
    def __init__(self, ok: bool, reason: str):
        super().__init__(reason)
        self.ok = ok

"""The file server daemon: the BitTorrent tracker (10030) and the file control service (58925).

A transfer exists only when a task server created it (file management takes only the server role: see
ACCESS in gse/common/roles.py); its members get one token each, valid for the tracker announces of the
transfer's torrents and for direct-mode fetches; only its uploaders' tokens (the source's, and those of the
proxies relaying the source's uploads out of its area) are valid for uploads, so no target can replace the
bytes the other targets receive. Direct mode relays data through here: the source uploads an entry
(small files always, large ones when a target's BitTorrent keeps failing) and targets fetch it, waiting for
bytes the source has not sent yet. The server caps greediness: a per-member rate (the request's, else the
configured default, at most `max_share` of an agent's configured bandwidth) and connections per torrent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import Counter, Gauge

from gse.common import roles, rpc
from gse.common.address import join_host_port
from gse.common.aio import spawn
from gse.common.config import ConfigError
from gse.common.discovery import Discovery
from gse.common.service import BaseConfig, Service
from gse.common.tls import TLSMaterial
from gse.pb import file_pb2 as pb
from gse.pb import file_pb2_grpc as pb_grpc

from .tracker import Tracker

log = logging.getLogger("gse.fileserver")

TRANSFERS = Gauge("gse_fileserver_transfers", "Live transfers")
RELAYED = Counter("gse_fileserver_relayed_bytes_total", "Direct-mode bytes", ["direction"])
REFUSED = Counter("gse_fileserver_refused_total", "Calls refused", ["reason"])

CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class FileServerConfig(BaseConfig):
    """The file server's configuration (deploy/fileserver.yaml explains every key): the control and tracker ports, the
    relay's data directory, the rate caps (bytes/s; `max_share` of `agent_bandwidth`), the connections per torrent,
    the announce interval and the TTL of transfers nobody ended (s)."""
    host: str = "127.0.0.1"
    port: int = 58925
    tracker_port: int = 10030
    advertise_host: str = ""
    data_dir: str = "/var/lib/gse/fileserver"
    default_rate: int = 0                 # bytes/s per member when the request names none (0 = unlimited)
    agent_bandwidth: int = 0              # bytes/s an agent's link is assumed to have (0 = unknown: no share cap)
    max_share: float = 0.8                # a transfer takes at most this share of agent_bandwidth
    max_connections_per_torrent: int = 50
    announce_interval_s: int = 5
    transfer_ttl_s: float = 6 * 3600      # a transfer nobody ended is dropped after this

    def validate(self) -> None:
        """ConfigError unless 0 < max_share <= 1."""
        super().validate()
        if not 0 < self.max_share <= 1:
            raise ConfigError("max_share must be in (0, 1]")


@dataclass
class Blob:
    """One entry's bytes on the relay, filled in order by the source's upload."""
    path: Path
    size: int = -1
    received: int = 0
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def complete(self) -> bool:
        """The source has uploaded all `size` bytes."""
        return self.size >= 0 and self.received >= self.size


@dataclass
class Transfer:
    """One live transfer as the file server holds it: its members (bk_agent_ids) and their tokens both ways, the area
    its torrents are scoped to, when it expires (monotonic s), its relay directory, the tracker swarms of its torrents
    ("<transfer_id>/<info hash hex>"), the direct-mode entries relayed so far, and the members that may upload
    them (the source, or a proxy relaying its uploads)."""
    transfer_id: str
    area: int
    members: dict[str, str]               # member -> token
    by_token: dict[str, str]              # token -> member
    expires: float
    directory: Path
    torrents: list[str] = field(default_factory=list)
    blobs: dict[int, Blob] = field(default_factory=dict)
    member_areas: dict[str, int] = field(default_factory=dict)   # members of another area than `area`
    cross_area: bool = False
    uploaders: frozenset[str] = frozenset()

    def blob(self, index: int) -> Blob:
        """The relayed entry `index`, made (empty, size unknown) on first use."""
        b = self.blobs.get(index)
        if b is None:
            b = self.blobs[index] = Blob(self.directory / str(index))
        return b


class FileService(pb_grpc.FileServiceServicer):
    """The FileService gRPC service (proto/gse/pb/file.proto; 58925, spec §6). Task servers create, scope and end
    transfers; members (holding a token of the transfer) upload and fetch direct-mode entries through it. Transfers
    live in memory only: the relay directory is emptied at start."""

    def __init__(self, cfg: FileServerConfig, tracker: Tracker, tracker_url: str):
        self.cfg = cfg
        self.tracker = tracker
        self.tracker_url = tracker_url
        self.transfers: dict[str, Transfer] = {}
        self.root = Path(cfg.data_dir) / "relay"
        shutil.rmtree(self.root, ignore_errors=True)      # nothing survives a restart: transfers are in memory
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- helpers ----------------------------------------------------------------------------------

    async def _member(self, context, transfer_id: str, token: str, upload: bool = False) -> Transfer:
        """The live transfer `token` is a member of (of its uploaders, for an `upload`); else the call is aborted:
        NOT_FOUND for an unknown transfer, PERMISSION_DENIED for a stranger's token or a member that may not
        upload (refusals counted by reason)."""
        t = self.transfers.get(transfer_id)
        if t is None:
            REFUSED.labels("unknown_transfer").inc()
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live transfer {transfer_id}")
        member = t.by_token.get(token)
        if member is None:
            REFUSED.labels("bad_token").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a member of this transfer")
        if upload and member not in t.uploaders:
            REFUSED.labels("not_uploader").inc()
            log.warning("upload refused: not the source", extra={"transfer_id": transfer_id, "member": member})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "only the transfer's source (or a proxy relaying it) may upload its entries")
        return t

    def rate_limit(self, requested: int) -> int:
        """The per-member rate (bytes/s, 0 = unlimited) for a request asking `requested`: that or else the configured
        default, capped at `max_share` of `agent_bandwidth` when that is known."""
        caps = [r for r in (requested or self.cfg.default_rate,) if r > 0]
        if self.cfg.agent_bandwidth > 0:
            caps.append(int(self.cfg.agent_bandwidth * self.cfg.max_share))
        return min(caps) if caps else 0

    def end(self, transfer_id: str) -> None:
        """Drop the transfer: unregister its torrents from the tracker and delete its relay data. Unknown ids are
        ignored."""
        t = self.transfers.pop(transfer_id, None)
        if t is None:
            return
        for sub in t.torrents:
            self.tracker.unregister_transfer(sub)
        # off the event loop: a relay directory may hold many large files
        spawn(asyncio.to_thread(shutil.rmtree, t.directory, ignore_errors=True), "removing a relay directory")
        TRANSFERS.set(len(self.transfers))
        log.info("transfer ended", extra={"transfer_id": transfer_id})

    def expire(self) -> None:
        """End every transfer past its expiry (a transfer whose task server never ended it)."""
        now = time.monotonic()
        for tid in [t.transfer_id for t in self.transfers.values() if t.expires < now]:
            self.end(tid)

    # ---- task servers -----------------------------------------------------------------------------

    def create(self, transfer_id: str, area: int, tokens: dict[str, str], timeout_seconds: int = 0,
               member_areas: dict[str, int] | None = None, cross_area: bool = False,
               uploaders: Iterable[str] = ()) -> Transfer:
        """Open a transfer to the members of `tokens` (member -> token), of which only `uploaders` may upload
        direct-mode entries; also what a proxy relaying a transfer into its area does with the tokens the
        transfer's file server gave (gse/proxy/files.py)."""
        ttl = timeout_seconds + 60 if timeout_seconds > 0 else self.cfg.transfer_ttl_s
        # Named by a digest of the id: no id (".." say) can name a directory outside the relay root.
        d = self.root / hashlib.sha256(transfer_id.encode()).hexdigest()[:32]
        d.mkdir(parents=True, exist_ok=True)
        t = self.transfers[transfer_id] = Transfer(transfer_id, area, dict(tokens), {v: k for k, v in tokens.items()},
                                                   time.monotonic() + ttl, d, member_areas=dict(member_areas or {}),
                                                   cross_area=cross_area, uploaders=frozenset(uploaders) & set(tokens))
        TRANSFERS.set(len(self.transfers))
        log.info("transfer created", extra={"transfer_id": transfer_id, "members": len(tokens), "area": area,
                                            "cross_area": cross_area})
        return t

    def add_torrents(self, t: Transfer, info_hashes) -> None:
        """Register the transfer's torrents with the tracker (one tracker transfer per torrent)."""
        for ih in info_hashes:
            sub = f"{t.transfer_id}/{ih.hex()}"
            if sub in t.torrents:
                continue
            self.tracker.register_transfer(sub, ih, t.area, list(t.members), tokens=t.members, areas=t.member_areas,
                                           cross_area=t.cross_area)
            t.torrents.append(sub)

    async def CreateTransfer(self, request, context):
        """Task servers: create a transfer for `members` (the source first; INVALID_ARGUMENT for an empty or
        existing id, or no members), of which `uploaders` (default: the source) may upload direct-mode entries.
        Answers a token per member, the tracker URL, the rate cap and max connections per torrent; the transfer
        expires `timeout_seconds` + 60 s from now, else after transfer_ttl_s."""
        if request.transfer_id in self.transfers or not request.transfer_id or not request.members:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a new transfer id and members are required")
        tokens = {m: secrets.token_urlsafe(24) for m in request.members}
        self.create(request.transfer_id, request.area, tokens, request.timeout_seconds, dict(request.member_areas),
                    request.cross_area, request.uploaders or request.members[:1])
        return pb.CreateTransferReply(tokens=tokens, tracker_url=self.tracker_url,
                                      rate_limit=self.rate_limit(request.max_rate),
                                      max_connections=self.cfg.max_connections_per_torrent)

    async def AddTorrents(self, request, context):
        """Task servers: open a tracker swarm for each info hash (20 bytes) of the transfer, limited to its members
        and its area; NOT_FOUND for an unknown transfer. Hashes already added are skipped."""
        t = self.transfers.get(request.transfer_id)
        if t is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live transfer {request.transfer_id}")
        self.add_torrents(t, request.info_hashes)
        return pb.AddTorrentsReply()

    async def EndTransfer(self, request, context):
        """Task servers: end the transfer (see `end`); unknown ids are fine."""
        self.end(request.transfer_id)
        return pb.EndTransferReply()

    # ---- members ----------------------------------------------------------------------------------

    async def Upload(self, request_iterator, context):
        """The transfer's uploaders (its source, or a proxy relaying the source's upload): the stream of one
        entry's chunks, in order (offset 0 starts it again; a chunk at another offset than the bytes received so
        far is INVALID_ARGUMENT). Data is written to the relay file, holes (`zeros`) are kept as holes; fetchers
        waiting on the entry are woken at every chunk. NOT_FOUND for an unknown transfer; PERMISSION_DENIED,
        before anything is written, for a token that is not a member's or a member that is not an uploader
        (a target). Answers the bytes received."""
        transfer: Transfer | None = None
        blob: Blob | None = None
        fd = None
        try:
            async for chunk in request_iterator:
                if transfer is None:
                    transfer = await self._member(context, chunk.transfer_id, chunk.token, upload=True)
                    blob = transfer.blob(chunk.index)
                    fd = os.open(blob.path, os.O_WRONLY | os.O_CREAT, 0o600)
                    async with blob.cond:
                        blob.size = chunk.size
                        blob.received = 0 if chunk.offset == 0 else blob.received
                if chunk.offset != blob.received and chunk.offset != 0:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"chunk at {chunk.offset}, expected {blob.received}")
                if chunk.zeros:
                    # a hole of the source: the relay file keeps it as a hole (extended, nothing written)
                    if chunk.data or chunk.zeros < 0 or chunk.offset + chunk.zeros > max(blob.size, 0):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a hole chunk carries no data and "
                                                                              "stays inside the entry")
                    if os.fstat(fd).st_size < chunk.offset + chunk.zeros:
                        os.ftruncate(fd, chunk.offset + chunk.zeros)
                elif chunk.data:
                    await asyncio.to_thread(os.pwrite, fd, chunk.data, chunk.offset)
                    RELAYED.labels("in").inc(len(chunk.data))
                async with blob.cond:
                    blob.received = max(blob.received, chunk.offset + len(chunk.data) + chunk.zeros)
                    blob.cond.notify_all()
        finally:
            if fd is not None:
                os.close(fd)
        return pb.UploadReply(received=blob.received if blob else 0)

    async def Fetch(self, request, context):
        """Members: stream entry `index` from `offset`, waiting (up to `wait_seconds`, default 60, for each next
        piece: DEADLINE_EXCEEDED after) for bytes the source has not uploaded yet. Holes of at least 64 KiB travel as
        `zeros` chunks; data in chunks of at most 1 MiB; the chunk reaching the entry's size is marked `last`."""
        transfer = await self._member(context, request.transfer_id, request.token)
        blob = transfer.blob(request.index)
        offset = request.offset
        wait = request.wait_seconds or 60
        fd = None
        try:
            while True:
                async with blob.cond:
                    try:
                        await asyncio.wait_for(blob.cond.wait_for(
                            lambda: blob.received > offset or blob.complete), wait)
                    except asyncio.TimeoutError:
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            "the source has not uploaded this entry in time")
                    upto = blob.received
                    size = blob.size
                if offset >= size >= 0:
                    yield pb.Chunk(transfer_id=transfer.transfer_id, index=request.index, offset=offset,
                                   size=size, last=True)
                    return
                if fd is None:
                    fd = os.open(blob.path, os.O_RDONLY)
                hole = _hole_at(fd, offset, upto)
                if hole:
                    last = size >= 0 and offset + hole >= size
                    yield pb.Chunk(transfer_id=transfer.transfer_id, index=request.index, offset=offset,
                                   zeros=hole, size=size, last=last)
                    offset += hole
                    if last:
                        return
                    continue
                n = min(CHUNK, upto - offset, _data_until(fd, offset, upto) - offset)
                data = await asyncio.to_thread(os.pread, fd, n, offset)
                RELAYED.labels("out").inc(len(data))
                last = size >= 0 and offset + len(data) >= size
                yield pb.Chunk(transfer_id=transfer.transfer_id, index=request.index, offset=offset, data=data,
                               size=size, last=last)
                offset += len(data)
                if last:
                    return
        finally:
            if fd is not None:
                os.close(fd)


HOLE_MIN = 64 * 1024          # holes shorter than this are sent as data


def _hole_at(fd: int, offset: int, upto: int) -> int:
    """Length of the hole (reads as zeros, not stored) starting at `offset`, up to `upto`; 0 if data is there
    or the hole is shorter than HOLE_MIN."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            return 0
        data = upto                                 # no data after offset: a hole to the end
    n = min(data, upto) - offset
    return n if n >= HOLE_MIN else 0


def _data_until(fd: int, offset: int, upto: int) -> int:
    """Where the data run at `offset` ends (the next hole of at least HOLE_MIN), at most `upto`."""
    pos = offset
    while pos < upto:
        try:
            start = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            return upto
        if start >= upto:
            return upto
        if _hole_at(fd, start, upto):
            return max(start, offset + 1)
        try:
            pos = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:
            return upto
    return upto


class FileServerService(Service):
    """The file server daemon: the BitTorrent tracker (HTTP, 10030) and FileService (gRPC, 58925), registered in
    ZooKeeper with its address, tracker URL and load (live transfers)."""
    name = "fileserver"

    def __init__(self, config: FileServerConfig, *args):
        super().__init__(config, *args)
        self.tls = TLSMaterial.load(config.tls)
        self.discovery = Discovery(config.zookeeper)
        self.deny = roles.DenyList()
        self.server = None
        self.port = 0
        self.tracker_runner: web.AppRunner | None = None
        self.tracker_port = 0
        self.service: FileService | None = None

    def health(self):
        """Healthy while the gRPC server runs and ZooKeeper is connected; the detail counts live transfers."""
        ok = self.server is not None and self.discovery.connected
        return ok, {"service": self.name, "node_id": self.node_id, "zookeeper": self.discovery.connected,
                    "transfers": len(self.service.transfers) if self.service else 0}

    async def start(self) -> None:
        """Serve the tracker, then FileService (revoked agents refused live), then register in ZooKeeper."""
        await super().start()
        c = self.config
        tracker = Tracker(interval=c.announce_interval_s, min_interval=max(1, c.announce_interval_s // 2))
        app = web.Application()
        tracker.add_routes(app)
        self.tracker_runner = web.AppRunner(app, access_log=None)
        await self.tracker_runner.setup()
        site = web.TCPSite(self.tracker_runner, c.host, c.tracker_port)
        await site.start()
        self.tracker_port = self.tracker_runner.addresses[0][1]
        tracker_url = f"http://{join_host_port(self.advertise, self.tracker_port)}/announce"
        tracker.public_url = tracker_url
        self.service = FileService(c, tracker, tracker_url)
        self.server = rpc.make_server(self.tls, deny=self.deny)
        pb_grpc.add_FileServiceServicer_to_server(self.service, self.server)
        health = rpc.add_health(self.server)
        self.port = rpc.bind(self.server, self.tls, c.host, c.port)
        await self.server.start()
        await rpc.set_serving(health, True)
        await self.discovery.start()
        await self.discovery.watch_config("revoked", self.deny.apply)     # revoked agents: refused here too
        await self.discovery.register(self.name, self.node_id, {
            "address": join_host_port(self.advertise, self.port), "tracker_url": tracker_url,
            "metrics": join_host_port(c.metrics.host, self.ops.port), "load": 0})
        log.info("file server serving", extra={"port": self.port, "tracker": tracker_url})

    async def run(self) -> None:
        """Every 10 s: end expired transfers and publish the load (live transfers) in ZooKeeper."""
        while True:
            await asyncio.sleep(10)
            self.service.expire()
            await self.discovery.update(self.name, self.node_id, {
                "address": join_host_port(self.advertise, self.port), "tracker_url": self.service.tracker_url,
                "metrics": join_host_port(self.config.metrics.host, self.ops.port),
                "load": len(self.service.transfers)})

    async def stop(self, grace: float) -> None:
        """Leave ZooKeeper, then stop FileService within `grace` seconds and the tracker."""
        await self.discovery.stop()
        if self.server is not None:
            await self.server.stop(grace)
        if self.tracker_runner is not None:
            await self.tracker_runner.cleanup()
        await super().stop(grace)

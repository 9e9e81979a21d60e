"""The proxy's file relay (spec section 12): a file crosses into the area once, and is seeded inside it.

A task server planning a transfer that touches this proxy's area (gse/taskserver/area_files.py) sends the
proxy a RelayTransfer: the area swarm's members with their tokens, the entries (torrents, direct-mode
files), and where the swarm on the other side of the proxy's upstream link is (the file server's, or the
parent area's proxy's; none for the top of the chain). The proxy then

- **tracks the area's swarm** with its own tracker (port 20030, the file server's tracker code): members
  announce there with their tokens, and learn only the members of this area's swarm;
- **takes part in both swarms with one torrent**: libtorrent announces it to both trackers, so every piece
  the proxy gets from the other side (the source, or the proxies above) is at once offered inside the area,
  and the area's hosts share pieces among themselves; the file crosses the boundary once, whatever the
  number of hosts (the other way round for a source inside the area);
- **caches the file** (`cache_dir`, named by info-hash, `cache_max_bytes`, least recently used go first): a
  later transfer of the same file seeds it from the cache and does not cross again;
- **relays direct-mode entries** (small files, and BitTorrent's fallback): its file service (port 28925, the
  file server's) serves the area's members their token-checked Fetch from a copy fetched once from the other
  side, and forwards what a source inside the area uploads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import Counter, Gauge

from gse.agent.torrent import TorrentError, TorrentSession
from gse.common import rpc
from gse.common.aio import spawn
from gse.common.address import join_host_port
from gse.common.config import ConfigError
from gse.fileserver.server import FileServerConfig, FileService
from gse.fileserver.tracker import Tracker
from gse.pb import agent_pb2 as apb
from gse.pb import file_pb2 as fpb
from gse.pb import file_pb2_grpc as fpb_grpc

log = logging.getLogger("gse.proxy.files")

RELAYS = Gauge("gse_proxy_file_transfers", "Transfers relayed now")
FETCHED = Counter("gse_proxy_file_fetched_bytes_total", "Direct-mode bytes fetched from upstream")
FORWARDED = Counter("gse_proxy_file_forwarded_bytes_total", "Direct-mode bytes uploaded upstream")
CACHE_HITS = Counter("gse_proxy_file_cache_hits_total", "Torrents seeded from the cache (not fetched again)")
CACHE_BYTES = Gauge("gse_proxy_file_cache_bytes", "Bytes in the file cache")

CHUNK = 1024 * 1024
ARRIVAL_WAIT_S = 10.0       # how long a call for a transfer not relayed yet waits for its RelayTransfer


@dataclasses.dataclass(frozen=True)
class ProxyFilesConfig:
    """The proxy's `files` section: the direct-mode relay's port, the area tracker's port and announce interval (s),
    the BitTorrent port range, the cache directory and its bound (bytes), and peers per torrent."""
    enabled: bool = True
    port: int = 28925               # direct-mode relay (the file service's Fetch/Upload; 58925 in GSE 1.0)
    tracker_port: int = 20030       # the area's BitTorrent tracker
    bt_port: int = 20020            # BitTorrent (the next free port up to bt_port_max)
    bt_port_max: int = 20029
    cache_dir: str = ""             # "" = <data_dir>/files
    cache_max_bytes: int = 10 * 1024**3
    announce_interval_s: int = 5    # what the area's tracker tells its members
    max_connections_per_torrent: int = 50

    def validate(self) -> None:
        """ConfigError unless 0 < bt_port <= bt_port_max < 65536, cache_max_bytes >= 0 and announce_interval_s >=
        1."""
        if not 0 < self.bt_port <= self.bt_port_max < 65536:
            raise ConfigError("files: need 0 < bt_port <= bt_port_max < 65536")
        if self.cache_max_bytes < 0 or self.announce_interval_s < 1:
            raise ConfigError("files: cache_max_bytes >= 0 and announce_interval_s >= 1")


class RelayFileService(FileService):
    """The file server's direct-mode service, serving this area's members: what they fetch is fetched once
    from upstream, what a source uploads here is forwarded upstream. Only the uploaders the coordinator named
    (RelayTransfer.uploaders: the source inside the area, or the relay of the area below on its way) may
    upload; the upload is then forwarded with this proxy's own token, which the side above accepts because
    this proxy is on the source's way too."""

    def __init__(self, cfg: FileServerConfig, tracker: Tracker, tracker_url: str, relay: "FileRelay"):
        super().__init__(cfg, tracker, tracker_url)
        self.relay = relay
        self.arrivals: dict[str, asyncio.Event] = {}

    def create(self, transfer_id: str, *args, **kw):
        """FileService.create, waking the calls that wait for this transfer (see `_member`)."""
        t = super().create(transfer_id, *args, **kw)
        ev = self.arrivals.pop(transfer_id, None)
        if ev is not None:
            ev.set()
        return t

    async def _member(self, context, transfer_id: str, token: str, upload: bool = False):
        """FileService._member, after waiting up to ARRIVAL_WAIT_S for a transfer not relayed yet: its
        coordinator tells this proxy and the members at once, on links that need not keep that order."""
        if transfer_id and transfer_id not in self.transfers:
            ev = self.arrivals.setdefault(transfer_id, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), ARRIVAL_WAIT_S)
            except asyncio.TimeoutError:
                if self.arrivals.get(transfer_id) is ev:
                    del self.arrivals[transfer_id]
        return await super()._member(context, transfer_id, token, upload)

    async def Fetch(self, request, context):
        """The file service's Fetch for a member of the area, after asking the relay to fetch that entry from upstream
        once (the reply streams as it arrives)."""
        self.relay.want(request.transfer_id, request.index)
        async for chunk in super().Fetch(request, context):
            yield chunk

    async def Upload(self, request_iterator, context):
        """The file service's Upload from a source inside the area; once it is complete, the relay forwards the entry
        upstream."""
        which: list[tuple[str, int]] = []

        async def tap():
            async for chunk in request_iterator:
                if not which:
                    which.append((chunk.transfer_id, chunk.index))
                yield chunk

        reply = await super().Upload(tap(), context)
        if which:
            self.relay.forward(*which[0])
        return reply


@dataclasses.dataclass
class _Relayed:
    msg: apb.RelayTransfer
    hashes: list[bytes]
    entries: set[int] = dataclasses.field(default_factory=set)     # the indexes of the entries relayed so far
    fetchers: dict[int, asyncio.Task] = dataclasses.field(default_factory=dict)
    uploads: set = dataclasses.field(default_factory=set)


class FileRelay:
    """The file relay of one proxy (see the module)."""

    def __init__(self, cfg: ProxyFilesConfig, *, data_dir: str, tls, host: str, advertise: str, node_id: str,
                 area: int):
        self.cfg = cfg
        self.tls = tls
        self.host = host
        self.advertise = advertise
        self.node_id = node_id
        self.area = area
        self.cache = Path(cfg.cache_dir or os.path.join(data_dir, "files"))
        self.tracker = Tracker(interval=cfg.announce_interval_s, min_interval=max(1, cfg.announce_interval_s // 2))
        self.tracker_url = ""
        self.service: RelayFileService | None = None
        self.session: TorrentSession | None = None
        self.relayed: dict[str, _Relayed] = {}
        self.users: dict[bytes, set[str]] = {}      # info-hash -> transfers using its torrent
        self._runner: web.AppRunner | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()

    async def start(self, server: grpc.aio.Server) -> int:
        """Serve the tracker and the file service (on `server`), open the BitTorrent session."""
        c = self.cfg
        app = web.Application()
        self.tracker.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, c.tracker_port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.tracker_url = self.tracker.public_url = f"http://{join_host_port(self.advertise, port)}/announce"
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        fs_cfg = FileServerConfig(data_dir=str(self.cache.parent / "relay-direct"),
                                  max_connections_per_torrent=c.max_connections_per_torrent)
        self.service = RelayFileService(fs_cfg, self.tracker, self.tracker_url, self)
        fpb_grpc.add_FileServiceServicer_to_server(self.service, server)
        last = None
        for bt in range(c.bt_port, c.bt_port_max + 1):
            s = TorrentSession(join_host_port(self.host, bt))
            try:
                await s.start()
                self.session = s
                break
            except Exception as exc:  # noqa: BLE001 - port taken: the next one
                last = exc
                await s.close()
        if self.session is None:
            raise OSError(f"no BitTorrent port free in {c.bt_port}-{c.bt_port_max}: {last}")
        self._account()
        return port

    async def stop(self) -> None:
        """End every relayed transfer (complete files stay cached), close the BitTorrent session, the tracker and the
        channels upstream."""
        for tid in list(self.relayed):
            await self.end(tid)
        if self.session is not None:
            await self.session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for ch in self._channels.values():
            await ch.close()

    def health(self) -> dict:
        """The file relay in the proxy's /healthz: tracker URL, transfers relayed now, bytes cached."""
        return {"tracker_url": self.tracker_url, "transfers": len(self.relayed),
                "cached_bytes": self._cache_bytes()}

    async def run(self) -> None:
        """End relayed transfers nobody ended (their coordinator went away): after their timeout."""
        while True:
            await asyncio.sleep(10)
            self.service.expire()
            for tid in [t for t in self.relayed if t not in self.service.transfers]:
                await self._guard(self.end(tid))

    # ---- transfers ------------------------------------------------------------------------------------

    def on_control(self, frame: apb.ServerFrame) -> None:
        """A frame from upstream meant for this proxy: RelayTransfer starts relaying, EndTransfer ends one; both in
        the background (a failure is logged, never raised)."""
        kind = frame.WhichOneof("body")
        if kind == "relay_transfer":
            spawn(self._guard(self.relay(frame.relay_transfer)), "relaying a transfer")
        elif kind == "end_transfer":
            spawn(self._guard(self.end(frame.end_transfer.transfer_id)), "ending a relayed transfer")

    async def _guard(self, coro) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - one transfer's trouble must not stop the proxy
            log.exception("file relay failed")

    def _token(self, msg: apb.RelayTransfer) -> str:
        return msg.members.get(msg.member, "")

    async def relay(self, msg: apb.RelayTransfer) -> None:
        """Relay one transfer (see the module): the first RelayTransfer, sent when it starts, registers its area
        swarm's members, tokens and uploaders with the tracker and file service; the one carrying the source's
        entries joins each torrent on both trackers (seeded from the cache when the file is there, else downloaded
        into it) and fetches direct-mode files from upstream once (unless the source is on this side). Entries
        already relayed are skipped."""
        async with self._lock:
            st = self.relayed.get(msg.transfer_id)
            if st is None:
                self.service.create(msg.transfer_id, msg.area, dict(msg.members), msg.timeout_seconds,
                                    uploaders=msg.uploaders)
                st = self.relayed[msg.transfer_id] = _Relayed(msg, [])
                RELAYS.set(len(self.relayed))
                log.info("transfer relayed", extra={"transfer_id": msg.transfer_id, "members": len(msg.members),
                                                    "upstream": msg.upstream_fileserver or "-"})
            t = self.service.transfers.get(msg.transfer_id)
            new = [e for e in msg.entries if e.index not in st.entries]
            if t is None or not new:
                return
            st.msg = msg
            st.entries.update(e.index for e in new)
            token = self._token(msg)
            hashes = [e.info_hash for e in new if e.torrent]
            self.service.add_torrents(t, hashes)
            st.hashes += hashes
            trackers = [f"{self.tracker_url}?gse_token={token}"]
            if msg.upstream_tracker_url:
                trackers.append(f"{msg.upstream_tracker_url}?gse_token={token}")
            for e in new:
                if e.torrent:
                    await self._torrent(msg, e, trackers)
                elif not e.is_dir and not e.link_target and not e.error_code and not e.content:
                    self.want(msg.transfer_id, e.index)     # a direct-mode entry: fetched once, now
            log.info("transfer entries relayed", extra={"transfer_id": msg.transfer_id, "torrents": len(hashes),
                                                        "entries": len(new)})

    async def _torrent(self, msg: apb.RelayTransfer, e, trackers: list[str]) -> None:
        ih = e.info_hash
        users = self.users.setdefault(ih, set())
        users.add(msg.transfer_id)
        existing = next((x for x in self.session.torrents() if x.info_hash == ih and not x.removed), None)
        if existing is not None:
            for url in trackers:
                existing.handle.add_tracker({"url": url})
            return
        cached = self.cache / ih.hex()
        try:
            if cached.is_file() and cached.stat().st_size == e.size:
                os.utime(cached)
                await self.session.seed(e.torrent, str(cached), trackers, verified=True,
                                        max_connections=msg.max_connections)
                CACHE_HITS.inc()
                log.info("relayed from the cache", extra={"transfer_id": msg.transfer_id, "info_hash": ih.hex()})
                return
            await self._make_room(e.size)
            tor = await self.session.download(e.torrent, str(self.cache), trackers, tmp_name=f"{ih.hex()}.part",
                                              download_rate_limit=msg.rate, max_connections=msg.max_connections)
        except TorrentError as exc:
            log.warning("relay torrent not added", extra={"transfer_id": msg.transfer_id, "error": str(exc)})
            return
        spawn(self._guard(self._cached_when_complete(tor, ih)), "caching a relayed file")

    async def _cached_when_complete(self, tor, ih: bytes) -> None:
        try:
            await tor.wait_complete()
        except TorrentError as exc:
            log.warning("relay download failed", extra={"info_hash": ih.hex(), "error": str(exc)})
            return
        await self.session.commit(tor, ih.hex())
        self._account()
        log.info("file cached", extra={"info_hash": ih.hex(), "size": tor.progress().total_size})

    async def end(self, transfer_id: str) -> None:
        """End one relayed transfer: cancel its fetches, forget its members, and remove each torrent no other transfer
        uses (a complete file stays in the cache, a partial one is deleted)."""
        st = self.relayed.pop(transfer_id, None)
        RELAYS.set(len(self.relayed))
        if st is None:
            return
        for task in st.fetchers.values():
            task.cancel()
        self.service.end(transfer_id)
        for ih in st.hashes:
            users = self.users.get(ih, set())
            users.discard(transfer_id)
            if users:
                continue
            self.users.pop(ih, None)
            tor = next((x for x in self.session.torrents() if x.info_hash == ih and not x.removed), None)
            if tor is not None:
                # A complete file stays in the cache (under its info-hash); an unfinished one goes.
                await self.session.remove(tor, delete_files=not tor.complete)
        self._account()
        log.info("relayed transfer ended", extra={"transfer_id": transfer_id})

    # ---- the cache ---------------------------------------------------------------------------------------

    def _cache_bytes(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.cache.iterdir() if p.is_file())
        except OSError:
            return 0

    def _account(self) -> None:
        CACHE_BYTES.set(self._cache_bytes())

    async def _make_room(self, need: int) -> None:
        """Drop the least recently used cached files not in use until `need` more bytes fit."""
        in_use = {x.info_hash.hex() for x in self.session.torrents()}
        files = sorted((p for p in self.cache.iterdir() if p.is_file() and p.name not in in_use
                        and not p.name.endswith(".part")), key=lambda p: p.stat().st_mtime)
        total = self._cache_bytes()
        while files and total + need > self.cfg.cache_max_bytes:
            p = files.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            log.info("cached file dropped", extra={"info_hash": p.name})

    # ---- direct mode -----------------------------------------------------------------------------------

    def _stub(self, address: str) -> fpb_grpc.FileServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.make_channel(self.tls, address)
        return fpb_grpc.FileServiceStub(ch)

    def want(self, transfer_id: str, index: int) -> None:
        """A member fetches entry `index`: have it fetched from upstream once (unless it is here, or comes from
        a source inside the area)."""
        st = self.relayed.get(transfer_id)
        if st is None or not st.msg.upstream_fileserver or st.msg.source_inside or index in st.fetchers \
                or index in st.uploads:
            return
        t = self.service.transfers.get(transfer_id)
        if t is None:
            return
        blob = t.blob(index)
        if blob.complete:
            return
        st.fetchers[index] = spawn(self._guard(self._fetch(st, t, index)), "fetching a direct entry")

    async def _fetch(self, st: _Relayed, t, index: int) -> None:
        msg = st.msg
        blob = t.blob(index)
        call = self._stub(msg.upstream_fileserver).Fetch(fpb.FetchRequest(
            transfer_id=msg.transfer_id, index=index, offset=0, token=self._token(msg), wait_seconds=60))
        fd = -1
        try:
            fd = os.open(blob.path, os.O_WRONLY | os.O_CREAT, 0o600)
            async for chunk in call:
                if chunk.zeros:
                    if os.fstat(fd).st_size < chunk.offset + chunk.zeros:
                        os.ftruncate(fd, chunk.offset + chunk.zeros)
                elif chunk.data:
                    await asyncio.to_thread(os.pwrite, fd, chunk.data, chunk.offset)
                    FETCHED.inc(len(chunk.data))
                async with blob.cond:
                    blob.size = chunk.size
                    blob.received = max(blob.received, chunk.offset + len(chunk.data) + chunk.zeros)
                    blob.cond.notify_all()
                if chunk.last:
                    break
        except grpc.aio.AioRpcError as exc:
            log.warning("direct entry not fetched from upstream", extra={
                "transfer_id": msg.transfer_id, "index": index, "error": f"{exc.code().name}: {exc.details()}"})
            st.fetchers.pop(index, None)        # a later fetch tries again
        except Exception:
            st.fetchers.pop(index, None)        # (the cache's disk, say): a later fetch tries again
            raise
        finally:
            call.cancel()
            if fd >= 0:
                os.close(fd)

    def forward(self, transfer_id: str, index: int) -> None:
        """An upload into this relay (from a source inside the area) finished: send it on upstream."""
        st = self.relayed.get(transfer_id)
        t = self.service.transfers.get(transfer_id)
        if st is None or t is None or not st.msg.upstream_fileserver or index in st.uploads or index in st.fetchers:
            return
        blob = t.blob(index)
        if blob.complete:
            st.uploads.add(index)
            spawn(self._guard(self._upload(st, blob, index)), "forwarding an upload")

    async def _upload(self, st: _Relayed, blob, index: int) -> None:
        msg = st.msg
        token = self._token(msg)

        async def chunks():
            with open(blob.path, "rb") as f:
                offset = 0
                while True:
                    data = await asyncio.to_thread(f.read, CHUNK)
                    last = offset + len(data) >= blob.size
                    yield fpb.Chunk(transfer_id=msg.transfer_id, index=index, offset=offset, data=data, token=token,
                                    size=blob.size, last=last)
                    FORWARDED.inc(len(data))
                    offset += len(data)
                    if last or not data:
                        break

        try:
            await self._stub(msg.upstream_fileserver).Upload(chunks(), timeout=max(60, blob.size / (1 << 20)))
        except grpc.aio.AioRpcError as exc:
            st.uploads.discard(index)
            log.warning("upload not forwarded upstream", extra={"transfer_id": msg.transfer_id, "index": index,
                                                                "error": f"{exc.code().name}: {exc.details()}"})


"""The agent's BitTorrent engine: one libtorrent session, driven from asyncio.

The session makes torrents (hashing in a thread), seeds a source file, and downloads a target into a temporary
name in the destination directory (`.gse-<info_hash>.part`). A download is complete only when every piece passed
its SHA-1 check; the caller may then verify further (md5) and `commit()` it, which has libtorrent rename the file
to its final name (rename(2) in the same directory: atomic) while it keeps seeding to the other targets. Nothing
ever exists under the final name before that.

libtorrent is asynchronous inside; its alerts are popped every POLL_INTERVAL by a background task and dispatched
to the `Torrent` they belong to, so no call here blocks the event loop for long.

Settings that matter: DHT, LSD, UPnP and NAT-PMP off; TCP only (uTP is very slow on loopback); several connections
per IP allowed (many agents behind one address, and tests on loopback); outgoing connections leave from the listen
address; the global rate limits also apply to peers on local networks (libtorrent exempts those by default).
Torrents are private (no PEX, no DHT) and v1-only (20-byte info_hash).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import libtorrent as lt

from gse.common.address import join_host_port, split_host_port

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.15  # seconds between alert pops
STATUS_INTERVAL = 0.5  # seconds between progress updates
ALERT_WAIT = 10.0  # bound on waiting for one libtorrent answer (rename, remove, listen)

_CAT = lt.alert.category_t
_ALERT_MASK = (_CAT.status_notification | _CAT.error_notification | _CAT.peer_notification
               | _CAT.storage_notification | _CAT.tracker_notification)
TOP_PRIORITY, DEFAULT_PRIORITY, HELD = 7, 4, 0  # libtorrent piece priorities: 7 goes first, 0 is not wanted
_CREATE_V1_ONLY = 64  # lt::create_torrent::v1_only; not exported by the 2.1 bindings' create_torrent_flags_t

_STATE_NAMES = {
    lt.torrent_status.states.checking_files: "checking",
    lt.torrent_status.states.downloading_metadata: "metadata",
    lt.torrent_status.states.downloading: "downloading",
    lt.torrent_status.states.finished: "finished",
    lt.torrent_status.states.seeding: "seeding",
    lt.torrent_status.states.checking_resume_data: "checking",
}


class TorrentError(Exception):
    """A torrent failed: bad torrent data, a storage error, a failed rename, a source that changed."""


@dataclass(frozen=True)
class Progress:
    """A snapshot of one torrent: percent done (0-100), rates in bytes/s, sizes in bytes."""

    info_hash: str
    progress: float
    total_size: int
    total_done: int
    download_rate: int
    upload_rate: int
    num_peers: int
    num_seeds: int
    hash_failures: int
    state: str
    complete: bool
    error: str | None = None
    tracker_error: str | None = None


def info_hash(torrent_bytes: bytes) -> bytes:
    """The 20-byte v1 info_hash of a .torrent."""
    return _torrent_info(torrent_bytes).info_hashes().v1.to_bytes()


def _torrent_info(torrent_bytes: bytes) -> lt.torrent_info:
    try:
        return lt.torrent_info(lt.bdecode(torrent_bytes) if isinstance(torrent_bytes, bytes) else torrent_bytes)
    except (RuntimeError, TypeError) as e:
        raise TorrentError(f"bad torrent data: {e}") from None


def _make_torrent_sync(path: str, piece_size: int) -> bytes:
    if not os.path.isfile(path):
        raise TorrentError(f"not a regular file: {path}")
    entries = lt.list_files(path)
    ct = lt.create_torrent(entries, piece_size, _CREATE_V1_ONLY)
    ct.set_priv(True)
    ct.set_creator("gse")
    lt.set_piece_hashes(ct, os.path.dirname(os.path.abspath(path)))  # releases the GIL while hashing
    return lt.bencode(ct.generate())


async def make_torrent(path: str, piece_size: int = 0) -> bytes:
    """The .torrent of one file (piece_size 0: libtorrent picks); the hashing runs in a thread."""
    try:
        return await asyncio.to_thread(_make_torrent_sync, path, piece_size)
    except RuntimeError as e:
        raise TorrentError(f"cannot make a torrent of {path}: {e}") from None


def _make_torrent_fd_sync(fd: int, name: str, size: int, zero_pieces, piece_size: int) -> bytes:
    entry = lt.create_file_entry(name, size)
    ct = lt.create_torrent([entry], piece_size, _CREATE_V1_ONLY)
    ct.set_priv(True)
    ct.set_creator("gse")
    plen = ct.piece_length()
    zeros: dict[int, bytes] = {}
    holes = zero_pieces(plen, ct.num_pieces()) if zero_pieces is not None else None
    buf = bytearray(plen)                           # one buffer read into for every piece
    view = memoryview(buf)
    for i in range(ct.num_pieces()):
        n = ct.piece_size(i)
        if holes is not None and holes[i]:
            digest = zeros.get(n)
            if digest is None:
                digest = zeros[n] = hashlib.sha1(bytes(n)).digest()
        else:
            got = os.preadv(fd, [view[:n]], i * plen)
            if got != n:
                raise TorrentError(f"{name} is shorter than {size} bytes now (it changed while being hashed)")
            digest = hashlib.sha1(view[:n]).digest()   # hashlib releases the GIL for large buffers
        ct.set_hash(i, digest)
    return lt.bencode(ct.generate())


async def make_torrent_fd(fd: int, name: str, size: int, zero_pieces=None, piece_size: int = 0) -> bytes:
    """The .torrent of the open file `fd` under the file name `name` (hashing in a thread, through the
    descriptor: no path is looked up). `zero_pieces(piece_length, num_pieces)` may name the pieces that lie
    in holes: their hash is that of zeros, computed once, without reading them."""
    try:
        return await asyncio.to_thread(_make_torrent_fd_sync, fd, name, size, zero_pieces, piece_size)
    except (RuntimeError, OSError) as e:
        raise TorrentError(f"cannot make a torrent of {name}: {e}") from None


def _split_listen(listen_interface: str) -> tuple[str, int]:
    try:
        return split_host_port(listen_interface, listen=True)
    except ValueError as exc:
        raise ValueError(f"listen_interface must be IP:PORT: {exc}") from None


class Torrent:
    """One torrent in a TorrentSession: a seed or a download, with its progress and its completion."""

    def __init__(self, session: TorrentSession, ih: bytes, role: str, save_path: str, file_name: str,
                 on_progress: Callable[[Progress], None] | None):
        self.session = session
        self.info_hash = ih
        self.role = role  # "seed" or "download"
        self.save_path = save_path
        self.file_name = file_name  # the name on disk right now (the .part name until commit)
        self.handle: lt.torrent_handle | None = None
        self.hash_failures = 0
        self.piece_failures: dict[int, int] = {}  # piece index -> how often it failed its hash check
        self.error: str | None = None
        self.tracker_error: str | None = None
        self.removed = False
        self._on_progress = on_progress
        self._total_size = 0
        self._last: Progress | None = None
        loop = asyncio.get_running_loop()
        self._complete: asyncio.Future[None] = loop.create_future()
        self._finished_seen = False
        self._pending: dict[str, asyncio.Future] = {}  # "rename" / "remove" / "delete" waiters
        self._stripe: list[int] = []   # pieces this download takes first (from the source), see download()
        self._held: set[int] = set()   # pieces not wanted yet: no other target has them so far
        self._downloading_pieces = 0   # pieces the connected non-seed peers had at the last piece_gaps()

    @property
    def path(self) -> str:
        """The file's path on disk now (`save_path`/`file_name`: the .part name until `commit`)."""
        return os.path.join(self.save_path, self.file_name)

    @property
    def complete(self) -> bool:
        """Every piece is downloaded and passed its hash check (a seed is complete from the start)."""
        return self._complete.done() and not self._complete.cancelled() and self._complete.exception() is None

    async def wait_complete(self, timeout: float | None = None) -> Progress:
        """Waits until every piece is downloaded and passed its hash check; raises TorrentError on failure."""
        await asyncio.wait_for(asyncio.shield(self._complete), timeout)
        return self.progress()

    def progress(self) -> Progress:
        """The latest snapshot (refreshed every STATUS_INTERVAL by the session)."""
        if self._last is None:
            return Progress(self.info_hash.hex(), 100.0 if self.complete else 0.0, self._total_size,
                            self._total_size if self.complete else 0, 0, 0, 0, 0, self.hash_failures,
                            "seeding" if self.complete else "starting", self.complete, self.error, self.tracker_error)
        return self._last

    def piece_gaps(self) -> tuple[bool, bool]:
        """`(gap, gaining)`: whether some piece this download lacks is had by no connected peer (none connected:
        every lacking piece), and whether the connected peers that are still downloading (no seeds: a proxy's
        relay fetching from the area below, another target) have more pieces together than at the previous call,
        i.e. may bring the missing piece yet. A sum, not per peer: libtorrent gives a peer that connects again a
        new peer id. Call it at a steady pace (the caller's one-second look). (False, False) when not known."""
        h = self.handle
        if h is None or self.removed or not h.is_valid():
            return False, False
        try:
            avail = h.piece_availability()
            gap = any(a == 0 and not h.have_piece(i) for i, a in enumerate(avail))
            downloading = sum(p.num_pieces for p in h.get_peer_info() if not p.flags & lt.peer_info.seed)
        except RuntimeError:
            return False, False
        gaining, self._downloading_pieces = downloading > self._downloading_pieces, downloading
        return gap, gaining

    def set_limits(self, *, download_rate: int | None = None, upload_rate: int | None = None,
                   max_connections: int | None = None) -> None:
        """Per-torrent limits; rates in bytes/s, 0 unlimited."""
        h = self._require_handle()
        if download_rate is not None:
            h.set_download_limit(download_rate if download_rate > 0 else -1)
        if upload_rate is not None:
            h.set_upload_limit(upload_rate if upload_rate > 0 else -1)
        if max_connections is not None:
            h.set_max_connections(max_connections if max_connections > 0 else -1)

    def _require_handle(self) -> lt.torrent_handle:
        if self.handle is None or self.removed:
            raise TorrentError("torrent is not in the session")
        return self.handle

    # ---- alert dispatch (called by the session on the event loop) ----

    def _update(self, st: lt.torrent_status) -> None:
        total = st.total_wanted or self._total_size
        done = st.total_wanted_done
        pct = 100.0 if self.complete else min(99.99, st.progress_ppm / 10_000)
        self._last = Progress(
            info_hash=self.info_hash.hex(), progress=pct, total_size=total,
            total_done=total if self.complete else done,
            download_rate=st.download_payload_rate, upload_rate=st.upload_payload_rate,
            num_peers=st.num_peers, num_seeds=st.num_seeds, hash_failures=self.hash_failures,
            state=_STATE_NAMES.get(st.state, str(st.state)), complete=self.complete,
            error=self.error, tracker_error=self.tracker_error)
        if self._on_progress is not None:
            try:
                self._on_progress(self._last)
            except Exception:
                log.exception("progress callback failed", extra={"info_hash": self.info_hash.hex()})

    def _fail(self, message: str) -> None:
        self.error = message
        if not self._complete.done():
            self._complete.set_exception(TorrentError(message))
            self._complete.exception()  # a failure nobody waits on must not be logged as "never retrieved"

    def _mark_complete(self) -> None:
        if not self._complete.done():
            self._complete.set_result(None)
        if self.handle is not None and self.handle.is_valid():
            self._update(self.handle.status())

    def _resolve(self, key: str, error: str | None = None) -> None:
        fut = self._pending.pop(key, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(TorrentError(error))

    def _release_held(self) -> None:
        """Wants the held-back pieces that some other target has by now (all of them once our stripe is in)."""
        h = self.handle
        if not self._held or h is None or not h.is_valid():
            return
        if all(h.have_piece(i) for i in self._stripe):
            self._release_all()
            return
        avail = h.piece_availability()   # per piece: connected peers that have it, seeds included
        seeds = h.status(0).num_seeds
        ready = [i for i in self._held if avail[i] > seeds]
        if ready:
            self._held.difference_update(ready)
            h.prioritize_pieces([(i, DEFAULT_PRIORITY) for i in ready])

    def _release_all(self) -> None:
        held, self._held = self._held, set()
        h = self.handle
        if held and h is not None and h.is_valid():
            h.prioritize_pieces([(i, DEFAULT_PRIORITY) for i in held])

    def _dispatch(self, a: lt.alert) -> None:
        if isinstance(a, lt.hash_failed_alert):
            self.hash_failures += 1
            self.piece_failures[a.piece_index] = self.piece_failures.get(a.piece_index, 0) + 1
            if self.role == "seed":
                # In seed mode libtorrent verifies each piece on first request: the file changed since hashing.
                self._fail(f"source file does not match its torrent (piece {a.piece_index} failed its hash)")
        elif isinstance(a, lt.torrent_finished_alert):
            if self._held or (self._stripe and self.handle is not None and not self.handle.status(0).is_seeding):
                # Every wanted piece is in, but some were still held back: want them all; not complete yet.
                self._release_all()
                return
            if self.role == "download" and not self._finished_seen:
                self._finished_seen = True
                # All pieces passed; have the disk cache written out before anyone reads or renames the file.
                self._require_handle().flush_cache()
        elif isinstance(a, lt.cache_flushed_alert):
            if self._finished_seen:
                self._mark_complete()
        elif isinstance(a, lt.file_renamed_alert):
            self.file_name = a.new_name()
            self._resolve("rename")
        elif isinstance(a, lt.file_rename_failed_alert):
            self._resolve("rename", f"rename failed: {a.error.message()}")
        elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
            self._fail(f"{a.error.message()}: {getattr(a, 'filename', lambda: '')() or self.path}")
            for key in list(self._pending):
                self._resolve(key, self.error)
        elif isinstance(a, lt.tracker_error_alert):
            reason = a.failure_reason() or a.error.message()
            self.tracker_error = f"{a.tracker_url()}: {reason}"
        elif isinstance(a, lt.tracker_reply_alert):
            self.tracker_error = None
        elif isinstance(a, lt.torrent_removed_alert):
            self.removed = True
            self._resolve("remove")
        elif isinstance(a, lt.torrent_deleted_alert):
            self._resolve("delete")
        elif isinstance(a, lt.torrent_delete_failed_alert):
            self._resolve("delete", f"delete failed: {a.error.message()}")


class TorrentSession:
    """One libtorrent session per agent; `start()` binds the listen socket and starts the alert pump."""

    def __init__(self, listen_interface: str, download_rate_limit: int = 0, upload_rate_limit: int = 0):
        host, port = _split_listen(listen_interface)
        settings = {
            "listen_interfaces": join_host_port(host, port),
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_utp": False,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": _ALERT_MASK,
            "alert_queue_size": 10_000,
            "download_rate_limit": max(download_rate_limit, 0),
            "upload_rate_limit": max(upload_rate_limit, 0),
            "stop_tracker_timeout": 1,  # closing must not hang on a tracker that went away
            # Our tracker's interval rules (libtorrent's default floor is 300 s between announces): a peer that
            # announced before the source was known learns it at the next announce, not minutes later.
            "min_announce_interval": 1,
            "min_reconnect_time": 2,
            # A seed shared by several transfers carries one tracker URL (token) per transfer: announce to all.
            "announce_to_all_trackers": True,
            "announce_to_all_tiers": True,
            "user_agent": "gse-agent",
            # Every peer is a member of the same transfer: upload to all that ask. libtorrent's default of 8
            # unchoke slots leaves half of 16 targets waiting on the source (bench/file_distribution.py, 200 MB
            # to 16 hosts at 100 Mbit/s: 28.2 s with 8 slots, 22.5 s unlimited, one run each).
            "unchoke_slots_limit": -1,
        }
        ip = ipaddress.ip_address(host)  # raises ValueError for a name: interfaces are given as addresses
        if not ip.is_unspecified:
            settings["outgoing_interfaces"] = host  # connect from the address peers know us by
        self.listen_interface = listen_interface
        self._host = host
        self._ses = lt.session(settings)
        # libtorrent puts local-network peers in a class without rate limits; GSE limits apply to every peer.
        everyone = lt.ip_filter()
        global_class = 1 << lt.session.global_peer_class_id
        everyone.add_rule("0.0.0.0", "255.255.255.255", global_class)
        everyone.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", global_class)
        self._ses.set_peer_class_filter(everyone)
        self._torrents: dict[bytes, Torrent] = {}
        self._pump: asyncio.Task | None = None
        self._listening: asyncio.Future | None = None
        self._last_status = 0.0
        self.listen_port = 0

    # ---- lifecycle ----

    async def start(self) -> None:
        """Start the alert pump and wait (at most ALERT_WAIT seconds) until the session listens; on failure the session
        is closed and the error raised (TorrentError, or TimeoutError)."""
        if self._pump is not None:
            return
        self._listening = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._run(), name=f"torrent-alerts-{self.listen_interface}")
        try:
            await asyncio.wait_for(asyncio.shield(self._listening), ALERT_WAIT)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Removes every torrent (files stay) and drops the session; bounded, idempotent."""
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            try:
                await pump
            except asyncio.CancelledError:
                pass
        ses, self._ses = self._ses, None
        if ses is None:
            return
        for t in self._torrents.values():
            if not t._complete.done():
                t._fail("torrent session closed")
        self._torrents.clear()
        # The destructor waits for the "stopped" announces (stop_tracker_timeout): keep it off the event loop,
        # which may be serving that very tracker. The holder makes the worker thread drop the last reference.
        holder = [ses]
        del ses
        await asyncio.to_thread(_drop, holder)

    async def __aenter__(self) -> TorrentSession:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def listen_address(self) -> tuple[str, int]:
        """(host, port) the session listens on, as peers and the tracker are told."""
        return self._host, self.listen_port

    # ---- torrents ----

    make_torrent = staticmethod(make_torrent)
    info_hash = staticmethod(info_hash)

    async def seed(self, torrent_bytes: bytes, path: str, tracker_url: str | None = None, *,
                   verified: bool = False, upload_rate_limit: int = 0, max_connections: int = 0,
                   on_progress: Callable[[Progress], None] | None = None, super_seeding: bool = False) -> Torrent:
        """Seeds the existing file `path` without a full re-check on add.

        verified=False (default) adds it in libtorrent's seed mode: each piece is hashed the first time a peer asks
        for it, and a mismatch (the file changed after hashing) fails this Torrent. verified=True marks every piece
        as already checked, for a file this process has just hashed and nobody can change; libtorrent then never
        hashes it again, and would serve whatever bytes are on disk.
        """
        ti = _torrent_info(torrent_bytes)
        if ti.num_files() != 1:
            raise TorrentError("only single-file torrents are supported")
        if not os.path.isfile(path):
            raise TorrentError(f"source file missing: {path}")
        if os.path.getsize(path) != ti.total_size():
            raise TorrentError(f"source file size {os.path.getsize(path)} does not match the torrent")
        save_path, name = os.path.split(os.path.abspath(path))
        atp = self._params(ti, save_path, tracker_url, name)
        if verified:
            atp.have_pieces = [True] * ti.num_pieces()
            atp.verified_pieces = [True] * ti.num_pieces()
        else:
            atp.flags |= lt.torrent_flags.seed_mode
        if super_seeding:
            # BEP 16: offer each peer pieces nobody has yet. Not used for transfers: libtorrent 2.1 drops the two
            # offers it makes during the handshake and offers a first piece only after a peer stayed uninterested
            # for 10 s, so every transfer would start 10 s late; striped downloads (download()) do the same job.
            atp.flags |= lt.torrent_flags.super_seeding
        if upload_rate_limit > 0:
            atp.upload_limit = upload_rate_limit
        if max_connections > 0:
            atp.max_connections = max_connections
        t = await self._add(atp, ti, "seed", save_path, name, on_progress)
        t._mark_complete()
        return t

    async def download(self, torrent_bytes: bytes, dest_dir: str, tracker_url: str | None = None, *,
                       on_progress: Callable[[Progress], None] | None = None, tmp_name: str | None = None,
                       download_rate_limit: int = 0, upload_rate_limit: int = 0,
                       max_connections: int = 0, stripe: tuple[int, int] | None = None,
                       have_pieces: list[bool] | None = None) -> Torrent:
        """Starts downloading into dest_dir under `tmp_name` (default `.gse-<info_hash>.part`).

        Await `Torrent.wait_complete()`, then `commit()` to move it to its final name. A .part file left by an
        earlier attempt is checked and resumed.

        stripe=(k, n), for one of n targets of a transfer: pieces k, k+n, k+2n, ... are this target's share and go
        first; every other piece is wanted only once some other peer than a seed has it, so this target never
        asks the source for another target's share while that target is still fetching it. Once the share is
        in, every missing piece is wanted from anyone (so a target that went away delays, never blocks, the rest).

        have_pieces marks pieces as already there without checking them (the pieces of a sparse source that lie
        in holes, on a new file of the full size whose holes read as zeros): they are never fetched or written.
        """
        ti = _torrent_info(torrent_bytes)
        if ti.num_files() != 1:
            raise TorrentError("only single-file torrents are supported")
        if not os.path.isdir(dest_dir):
            raise TorrentError(f"destination directory missing: {dest_dir}")
        ih = ti.info_hashes().v1.to_bytes()
        name = tmp_name or f".gse-{ih.hex()}.part"
        _check_file_name(name)
        save_path = os.path.abspath(dest_dir)
        atp = self._params(ti, save_path, tracker_url, name)
        if download_rate_limit > 0:
            atp.download_limit = download_rate_limit
        if upload_rate_limit > 0:
            atp.upload_limit = upload_rate_limit
        if max_connections > 0:
            atp.max_connections = max_connections
        if have_pieces is not None and any(have_pieces):
            if len(have_pieces) != ti.num_pieces():
                raise ValueError(f"have_pieces names {len(have_pieces)} pieces of {ti.num_pieces()}")
            atp.have_pieces = list(have_pieces)
        mine: list[int] = []
        if stripe is not None:
            k, n = stripe
            if not 0 <= k < n:
                raise ValueError(f"stripe {k} of {n}")
            mine = list(range(k, ti.num_pieces(), n)) if n > 1 else []
            if mine:
                atp.piece_priorities = [TOP_PRIORITY if i % n == k else HELD for i in range(ti.num_pieces())]
        return await self._add(atp, ti, "download", save_path, name, on_progress, stripe=mine)

    async def commit(self, torrent: Torrent, final_name: str) -> str:
        """Renames a complete download to `final_name` in its directory (atomic; seeding goes on); returns the path."""
        _check_file_name(final_name)
        if not torrent.complete:
            raise TorrentError("download is not complete")
        if torrent.file_name == final_name:
            return torrent.path
        h = torrent._require_handle()
        fut = torrent._pending["rename"] = asyncio.get_running_loop().create_future()
        h.rename_file(0, final_name)
        await asyncio.wait_for(fut, ALERT_WAIT)
        return torrent.path

    async def remove(self, torrent: Torrent, delete_files: bool = False) -> None:
        """Takes the torrent out of the session; delete_files also deletes its file (e.g. an unfinished .part)."""
        if torrent.removed or torrent.handle is None or self._ses is None:
            self._torrents.pop(torrent.info_hash, None)
            return
        loop = asyncio.get_running_loop()
        waits = [loop.create_future()]
        torrent._pending["remove"] = waits[0]
        if delete_files:
            waits.append(loop.create_future())
            torrent._pending["delete"] = waits[1]
        self._ses.remove_torrent(torrent.handle, lt.session.delete_files if delete_files else 0)
        try:
            await asyncio.wait_for(asyncio.gather(*waits), ALERT_WAIT)
        finally:
            torrent.removed = True
            if not torrent._complete.done():
                torrent._fail("removed")
            if self._torrents.get(torrent.info_hash) is torrent:
                del self._torrents[torrent.info_hash]

    def add_peer(self, torrent: Torrent, ip: str, port: int) -> None:
        """Connects the torrent straight to a peer, without a tracker."""
        torrent._require_handle().connect_peer((ip, port))

    def torrents(self) -> list[Torrent]:
        """The torrents in the session now, seeds and downloads."""
        return list(self._torrents.values())

    def _params(self, ti: lt.torrent_info, save_path: str, tracker_url: str | list[str] | None,
                name: str) -> lt.add_torrent_params:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = save_path
        # Several trackers: a proxy relaying a file is a member of two swarms (its area's and the one above).
        atp.trackers = [tracker_url] if isinstance(tracker_url, str) and tracker_url else list(tracker_url or [])
        # Not auto-managed: libtorrent's queue (3 active downloads by default) must not park a GSE transfer.
        atp.flags = (lt.torrent_flags.default_flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
                     | lt.torrent_flags.update_subscribe)
        if ti.name() != name:  # a single-file torrent: its name is its file name
            atp.renamed_files = {0: name}
        return atp

    async def _add(self, atp: lt.add_torrent_params, ti: lt.torrent_info, role: str, save_path: str, name: str,
                   on_progress: Callable[[Progress], None] | None, stripe: list[int] | None = None) -> Torrent:
        if self._ses is None or self._pump is None:
            raise TorrentError("torrent session is not started")
        ih = ti.info_hashes().v1.to_bytes()
        if ih in self._torrents:
            raise TorrentError(f"torrent {ih.hex()} is already in this session")
        t = Torrent(self, ih, role, save_path, name, on_progress)
        t._total_size = ti.total_size()
        if stripe:
            t._stripe = stripe
            t._held = set(range(ti.num_pieces())) - set(stripe)
        self._torrents[ih] = t  # registered before adding, so no early alert is lost
        try:
            t.handle = await asyncio.to_thread(self._ses.add_torrent, atp)
        except RuntimeError as e:
            del self._torrents[ih]
            raise TorrentError(f"cannot add torrent {ih.hex()}: {e}") from None
        except BaseException:
            del self._torrents[ih]
            raise
        log.info("torrent added", extra={"info_hash": ih.hex(), "role": role, "path": t.path})
        return t

    # ---- alert pump ----

    async def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:
                log.exception("torrent alert dispatch failed")
            await asyncio.sleep(POLL_INTERVAL)

    def poll(self) -> None:
        """Pops and dispatches pending alerts; asks for fresh progress every STATUS_INTERVAL."""
        ses = self._ses
        if ses is None:
            return
        for t in self._torrents.values():
            if t._held:
                t._release_held()
        for a in ses.pop_alerts():
            try:
                self._dispatch(a)
            except Exception:  # noqa: BLE001 - one bad alert must not drop the rest of the batch
                log.exception("torrent alert dispatch failed", extra={"alert": type(a).__name__})
        now = time.monotonic()
        if now - self._last_status >= STATUS_INTERVAL and self._torrents:
            self._last_status = now
            ses.post_torrent_updates()

    def _dispatch(self, a: lt.alert) -> None:
        if isinstance(a, lt.state_update_alert):
            for st in a.status:
                t = self._torrents.get(st.info_hashes.v1.to_bytes())
                if t is not None:
                    t._update(st)
            return
        if isinstance(a, lt.listen_succeeded_alert):
            if a.socket_type == lt.socket_type_t.tcp:
                self.listen_port = a.port
                if self._listening is not None and not self._listening.done():
                    self._listening.set_result(None)
                log.info("torrent session listening", extra={"address": str(a.address), "port": a.port})
            return
        if isinstance(a, lt.listen_failed_alert):
            if a.socket_type == lt.socket_type_t.tcp and self._listening is not None and not self._listening.done():
                self._listening.set_exception(
                    TorrentError(f"cannot listen on {self.listen_interface}: {a.error.message()}"))
            return
        ih = _alert_info_hash(a)
        if ih is None:
            return
        t = self._torrents.get(ih)
        if t is None:
            return
        if isinstance(a, (lt.torrent_error_alert, lt.file_error_alert, lt.hash_failed_alert)):
            log.warning("torrent problem", extra={"info_hash": ih.hex(), "alert": a.message()})
        t._dispatch(a)


def _alert_info_hash(a: lt.alert) -> bytes | None:
    hashes = getattr(a, "info_hashes", None)  # removed/deleted alerts: the handle is already gone
    if hashes is not None:
        return hashes.v1.to_bytes()
    handle = getattr(a, "handle", None)
    if handle is None or not handle.is_valid():
        return None
    return handle.info_hashes().v1.to_bytes()


def _check_file_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise TorrentError(f"not a plain file name: {name!r}")


def _drop(holder: list) -> None:
    ses = holder.pop()
    ses.pause()
    del ses  # the last reference: libtorrent shuts the session down here, in this worker thread

"""File transfers on the agent: as a source and as a target.

Source: finds what the request names (a file, a directory tree, a wildcard or `regex:` pattern), hashes
large files into torrents and seeds them, uploads small files (and, on request, large ones) to the file
server for direct mode, and sends the manifest. Target: checks the destination (normalised, no `..`
escape, no writing through a symlink that leaves the directory), downloads to a temporary name in the
destination directory, verifies (MD5 for direct mode, piece hashes for BitTorrent), sets owner and mode,
renames into place, and reports progress. A BitTorrent download that stalls or keeps failing hash checks
switches to direct mode through the file server ("mixed"). Targets resume after an agent restart: the
request is kept in the data dir until the transfer ends.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import pwd
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gse.common import patterns
from gse.common.address import join_host_port, split_host_port
from gse.common.errors import ErrorCode, ScriptStatus
from gse.common.safefile import write_private
from gse.pb import agent_pb2 as pb
from gse.pb import file_pb2 as fpb
from gse.pb import file_pb2_grpc as fpb_grpc

log = logging.getLogger("gse.agent.files")

CHUNK = 1024 * 1024
REPORT_EVERY_S = 1.0


class FileError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Outgoing:
    """One target entry's latest report; final ones are kept until the server acknowledges them."""
    progress: pb.FileProgress
    sent_at: float = 0.0
    dirty: bool = True


@dataclass
class TransferState:
    transfer_id: str
    role: str                                  # source | target
    frame: pb.FileSource | pb.FileTarget
    torrents: list = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)   # entry index -> source path
    tasks: list[asyncio.Task] = field(default_factory=list)
    temps: set[str] = field(default_factory=set)


def parse_permission(digits: int) -> int:
    """644 (as written for chmod) -> 0o644; 0 -> 0 (keep the source's mode)."""
    if digits == 0:
        return 0
    text = str(digits)
    if len(text) > 4 or any(ch not in "01234567" for ch in text):
        raise FileError(ErrorCode.FAILED, f"permission {digits} is not chmod digits")
    return int(text, 8)


def expand_source(store_dir: str, name: str) -> tuple[str, list[tuple[str, str, bool]]]:
    """(base dir, [(rel_path, absolute path, is_dir)]) for a file, a directory, a wildcard or `regex:`."""
    store = os.path.abspath(store_dir or "/")
    if name.startswith("regex:"):
        try:
            rx = patterns.compile_user(name[6:], what="the regex: file name")     # linear time (RE2)
        except ValueError as exc:
            raise FileError(ErrorCode.FAILED, str(exc)) from None
        names = sorted(n for n in _listdir(store) if rx.fullmatch(os.fsencode(n)))
        return store, [(n, os.path.join(store, n), False) for n in names if os.path.isfile(os.path.join(store, n))]
    if any(ch in name for ch in "*?["):
        names = sorted(n for n in _listdir(store) if fnmatch.fnmatchcase(n, name))
        return store, [(n, os.path.join(store, n), False) for n in names if os.path.isfile(os.path.join(store, n))]
    path = os.path.normpath(os.path.join(store, name))
    if os.path.isdir(path):
        base = os.path.dirname(path)
        out = [(os.path.relpath(path, base), path, True)]
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for d in dirs:
                p = os.path.join(root, d)
                out.append((os.path.relpath(p, base), p, True))
            for f in sorted(files):
                p = os.path.join(root, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    out.append((os.path.relpath(p, base), p, False))
        return base, out
    if os.path.isfile(path):
        return os.path.dirname(path), [(os.path.basename(path), path, False)]
    return store, []


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


def safe_destination(dest_dir: str, rel: str) -> str:
    """The final path of `rel` under `dest_dir`, refusing `..` escapes and symlinks that lead outside."""
    if not os.path.isabs(dest_dir):
        raise FileError(ErrorCode.NOT_WRITABLE, f"target dir {dest_dir!r} is not an absolute path")
    root = os.path.normpath(dest_dir)
    final = os.path.normpath(os.path.join(root, rel))
    if rel.startswith("/") or os.path.commonpath([root, final]) != root or final == root:
        raise FileError(ErrorCode.NOT_WRITABLE, f"target path {rel!r} leaves the target dir")
    real_root = os.path.realpath(root)
    # The deepest ancestor that exists decides where missing directories would be created.
    ancestor = os.path.dirname(final)
    while not os.path.lexists(ancestor) and ancestor != root:
        ancestor = os.path.dirname(ancestor)
    if os.path.lexists(ancestor) and os.path.commonpath([real_root, os.path.realpath(ancestor)]) != real_root:
        raise FileError(ErrorCode.NOT_WRITABLE, f"target {final} goes through a symlink out of the target dir")
    if os.path.islink(final):
        raise FileError(ErrorCode.NOT_WRITABLE, f"target {final} is a symlink; refusing to write through it")
    return final


def _md5_file(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify_pieces(path: str, torrent: bytes) -> bool:
    """Check a file against a torrent's piece hashes (used after a direct download of a BitTorrent entry)."""
    import libtorrent as lt
    ti = lt.torrent_info(lt.bdecode(torrent))
    if os.path.getsize(path) != ti.total_size():
        return False
    with open(path, "rb") as f:
        for i in range(ti.num_pieces()):
            data = f.read(ti.piece_size(i))
            if hashlib.sha1(data).digest() != ti.hash_for_piece(i):
                return False
    return True


class FileManager:
    def __init__(self, agent, data_dir: str, cfg):
        self.agent = agent
        self.cfg = cfg
        self.dir = Path(data_dir) / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.transfers: dict[str, TransferState] = {}
        self.outgoing: dict[tuple[str, int, int], Outgoing] = {}   # (transfer, mode, index)
        self._session = None
        self._session_lock = asyncio.Lock()
        self._relays: dict[str, object] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._flusher: asyncio.Handle | None = None
        self._seed_locks: dict[bytes, asyncio.Lock] = {}
        self._finished: set[tuple[str, int, int]] = set()   # items whose final report was made

    # ---- plumbing ---------------------------------------------------------------------------------

    async def session(self):
        async with self._session_lock:
            if self._session is None:
                from .torrent import TorrentSession
                host = self.agent.config.bind_ip or "0.0.0.0"
                last: Exception | None = None
                for port in range(self.cfg.bt_port, self.cfg.bt_port_max + 1):
                    s = TorrentSession(join_host_port(host, port))
                    try:
                        await s.start()
                        self._session = s
                        break
                    except Exception as exc:  # noqa: BLE001 - port taken: try the next one
                        last = exc
                        await s.close()
                if self._session is None:
                    raise FileError(ErrorCode.FAILED, f"no BitTorrent port free in {self.cfg.bt_port}-"
                                                 f"{self.cfg.bt_port_max}: {last}")
            return self._session

    def fileserver(self, address: str) -> fpb_grpc.FileServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            from gse.common import rpc
            if not self.agent.config.bind_ip:
                ch = rpc.make_channel(self.agent.tls, address)
            else:
                from .relay import SourceRelay
                relay = self._relays.get(address)
                if relay is None:
                    relay = self._relays[address] = SourceRelay(self.agent.config.bind_ip)
                    relay.target = split_host_port(address)
                    asyncio.ensure_future(relay.start())
                host = relay.target[0]
                ch = rpc.make_channel(self.agent.tls, relay.grpc_target,
                                      [("grpc.ssl_target_name_override", self.agent.tls.server_name or host),
                                       ("grpc.default_authority", address)])
            self._channels[address] = ch
        return fpb_grpc.FileServiceStub(ch)

    def _spawn(self, state: TransferState, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        state.tasks.append(t)
        return t

    # ---- reports ----------------------------------------------------------------------------------

    def report(self, p: pb.FileProgress, force: bool = False) -> None:
        key = (p.transfer_id, p.mode, p.index)
        out = self.outgoing.get(key)
        if out is None:
            if key in self._finished:
                return              # a late progress callback (the torrent seeds on) after the final report
            out = self.outgoing[key] = Outgoing(p)
        elif out.progress.final:
            return                  # a final report is never replaced by a later progress
        else:
            out.progress = p
            out.dirty = True
        if p.final:
            self._finished.add(key)
        now = time.monotonic()
        if force or p.final or now - out.sent_at >= REPORT_EVERY_S:
            self._schedule(0.0)
        else:
            self._schedule(REPORT_EVERY_S)

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if delay == 0 and self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._flusher is None:
            self._flusher = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        self._flusher = None
        items = [o for o in self.outgoing.values() if o.dirty]
        if not items:
            return
        if not self.agent.send(pb.AgentFrame(file_report=pb.FileReport(items=[o.progress for o in items]))):
            return
        now = time.monotonic()
        for o in items:
            o.dirty = False
            o.sent_at = now
            if not o.progress.final:
                self.outgoing.pop((o.progress.transfer_id, o.progress.mode, o.progress.index), None)

    def on_ack(self, refs) -> None:
        acked = set()
        for ref in refs:
            if ref.task_id.startswith("file:"):
                tid = ref.task_id[5:]
                for mode in (0, 1):
                    o = self.outgoing.get((tid, mode, ref.atomic_task_id))
                    if o is not None and o.progress.final and not o.dirty:
                        del self.outgoing[(tid, mode, ref.atomic_task_id)]
                        acked.add(tid)
        for tid in acked:
            self._forget_if_done(tid)

    def _forget_if_done(self, transfer_id: str) -> None:
        """A target whose every entry has a final result the server stored has nothing left to resume after
        a restart: its journal goes now, not only at the transfer's end (an agent restarted in between
        would otherwise take up a finished transfer again, and hold its torrent against the next one)."""
        state = self.transfers.get(transfer_id)
        if state is None or state.role != "target":
            return
        keys = [(transfer_id, 1, e.index) for e in state.frame.entries]
        if all(k in self._finished and k not in self.outgoing for k in keys):
            self._journal_path(transfer_id).unlink(missing_ok=True)

    def on_attach(self) -> None:
        for o in self.outgoing.values():
            o.dirty = True
        if self.outgoing:
            self._schedule(0.0)

    # ---- source -----------------------------------------------------------------------------------

    def on_source(self, fs_: pb.FileSource) -> None:
        state = self.transfers.get(fs_.transfer_id)
        if state is not None:
            return
        state = self.transfers[fs_.transfer_id] = TransferState(fs_.transfer_id, "source", fs_)
        self._spawn(state, self._source(state, fs_))

    async def _source(self, state: TransferState, req: pb.FileSource) -> None:
        manifest = pb.FileManifest(task_id=req.task_id, transfer_id=req.transfer_id)
        try:
            base, found = await asyncio.to_thread(expand_source, req.store_dir, req.file_name)
            manifest.source_dir = base
            if not found:
                raise FileError(ErrorCode.SOURCE_MISSING, f"source {os.path.join(req.store_dir, req.file_name)} "
                                                      f"does not exist (or the pattern matched nothing)")
            entries = []
            for index, (rel, path, is_dir) in enumerate(found):
                st = os.stat(path)
                e = pb.FileEntry(index=index, rel_path=rel, is_dir=is_dir, size=0 if is_dir else st.st_size,
                                 mode=stat.S_IMODE(st.st_mode))
                if not is_dir and st.st_size > req.max_file_size > 0:
                    raise FileError(ErrorCode.TOO_LARGE, f"{path} is {st.st_size} bytes; the limit is {req.max_file_size}")
                entries.append((e, path))
            if req.md5 and len(entries) == 1 and not entries[0][0].is_dir:
                actual = await asyncio.to_thread(_md5_file, entries[0][1])
                if actual != req.md5.lower():
                    raise FileError(ErrorCode.CHECKSUM, f"source md5 is {actual}, the request expected {req.md5}")
            url = f"{req.tracker_url}?gse_token={req.token}"
            for e, path in entries:
                state.paths[e.index] = path
                if e.is_dir:
                    continue
                if e.size <= req.direct_max:
                    e.md5 = await asyncio.to_thread(_md5_file, path)
                    await self._upload(req, e.index, path)
                else:
                    from .torrent import info_hash, make_torrent
                    e.torrent = await make_torrent(path)
                    e.info_hash = info_hash(e.torrent)
                    # A plain seed: the targets share the pieces out among themselves (see _stripe).
                    state.torrents.append(await self._seed(e.torrent, path, url, req.upload_rate))
            manifest.entries.extend(e for e, _p in entries)
        except FileError as exc:
            manifest.error_code, manifest.error_msg = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - whatever failed, the transfer must hear of it
            log.exception("preparing the source failed", extra={"transfer_id": req.transfer_id})
            manifest.error_code, manifest.error_msg = ErrorCode.FAILED, f"source failed: {exc!r}"
        self.agent.send(pb.AgentFrame(file_manifest=manifest))

    async def _seed(self, torrent_bytes: bytes, path: str, url: str, rate: int):
        """Seed `path`; a file another live transfer already seeds is shared (one torrent, its trackers added)."""
        from .torrent import info_hash
        session = await self.session()
        ih = info_hash(torrent_bytes)
        lock = self._seed_locks.setdefault(ih, asyncio.Lock())
        async with lock:
            existing = next((t for t in session.torrents() if t.info_hash == ih and not t.removed
                             and t.handle is not None and t.handle.is_valid()), None)
            if existing is not None:
                existing.handle.add_tracker({"url": url})
                return existing
            return await session.seed(torrent_bytes, path, url, upload_rate_limit=rate)

    async def _upload(self, req: pb.FileSource, index: int, path: str) -> None:
        size = os.path.getsize(path)

        async def chunks():
            with open(path, "rb") as f:
                offset = 0
                while True:
                    data = await asyncio.to_thread(f.read, CHUNK)
                    yield fpb.Chunk(transfer_id=req.transfer_id, index=index, offset=offset, data=data,
                                    token=req.token, size=size, last=offset + len(data) >= size)
                    offset += len(data)
                    if not data or offset >= size:
                        return

        await self.fileserver(req.fileserver).Upload(chunks(), timeout=max(60, size / (1 << 20)))

    def on_upload_request(self, ur: pb.UploadRequest) -> None:
        state = self.transfers.get(ur.transfer_id)
        if state is None or state.role != "source":
            return
        if ur.announce:
            for torrent in state.torrents:
                if torrent.handle is not None and not torrent.removed:
                    torrent.handle.force_reannounce()
        for index in ur.indexes:
            path = state.paths.get(index)
            if path is not None:
                self._spawn(state, self._upload(state.frame, index, path))

    # ---- target -----------------------------------------------------------------------------------

    def on_target(self, ft: pb.FileTarget, persist: bool = True) -> None:
        if ft.transfer_id in self.transfers:
            return
        state = self.transfers[ft.transfer_id] = TransferState(ft.transfer_id, "target", ft)
        if persist:
            self._journal(ft)
        for e in sorted(ft.entries, key=lambda e: (not e.is_dir, e.rel_path)):
            self._spawn(state, self._target_entry(state, ft, e))

    def _journal_path(self, transfer_id: str) -> Path:
        return self.dir / (transfer_id.replace("/", "_").replace(":", "_") + ".target")

    def _journal(self, ft: pb.FileTarget) -> None:
        # 0600 from its first byte: it holds the transfer's tokens (tracker and file server).
        write_private(self._journal_path(ft.transfer_id), ft.SerializeToString())

    def recover(self) -> int:
        """After a restart: take up the transfers this agent was receiving."""
        n = 0
        for p in self.dir.glob("*.target"):
            try:
                ft = pb.FileTarget.FromString(p.read_bytes())
                age = time.time() - p.stat().st_mtime
            except Exception:  # noqa: BLE001 - an unreadable journal is dropped, not fatal
                p.unlink(missing_ok=True)
                continue
            if age > (ft.timeout_seconds or 3600):
                p.unlink(missing_ok=True)       # the transfer is over by now, one way or the other
                continue
            self.on_target(ft, persist=False)
            n += 1
        return n

    def _progress(self, ft: pb.FileTarget, e: pb.FileEntry, **kw) -> pb.FileProgress:
        return pb.FileProgress(task_id=ft.task_id, transfer_id=ft.transfer_id, index=e.index, size=e.size, mode=1,
                               task_index=ft.task_index, **kw)

    async def _target_entry(self, state: TransferState, ft: pb.FileTarget, e: pb.FileEntry) -> None:
        start = int(time.time() * 1000)
        kind = "direct" if not e.torrent else "bt"
        final = ""
        try:
            async with self.agent.tasks.pools.slot("file"):
                self.report(self._progress(ft, e, status=ScriptStatus.RUNNING, error_code=ErrorCode.RUNNING, type=kind,
                                           start_time_ms=start), force=True)
                single = len(ft.entries) == 1 and not e.is_dir
                rel = ft.dest_name if (single and ft.dest_name) else e.rel_path
                final = safe_destination(ft.dest_dir, rel)
                uid, gid = self._owner(ft)
                if e.is_dir:
                    await self._make_dirs(ft, final, e.mode)
                else:
                    parent = os.path.dirname(final)
                    if not os.path.isdir(parent):
                        if ft.auto_mkdir or os.path.commonpath([ft.dest_dir, parent]) != os.path.normpath(ft.dest_dir):
                            await self._make_dirs(ft, parent, 0o755)
                        else:
                            raise FileError(ErrorCode.NOT_WRITABLE, f"target dir {parent} does not exist "
                                                                f"(auto_mkdir is off)")
                    if not _can_write(parent, ft.user or "root"):
                        raise FileError(ErrorCode.NOT_WRITABLE, f"target dir {parent} is not writable for "
                                                            f"{ft.user or 'root'}")
                    safe_destination(ft.dest_dir, rel)     # again, now that the parents exist
                    if kind == "direct":
                        await self._direct(state, ft, e, final, start)
                    else:
                        kind = await self._bittorrent(state, ft, e, final, start)
                    mode = parse_permission(ft.permission) or e.mode
                    os.chmod(final, mode)
                    os.chown(final, uid, gid)
            self.report(self._progress(ft, e, status=ScriptStatus.SUCCESS, error_code=0, progress=100, type=kind,
                                       start_time_ms=start, end_time_ms=int(time.time() * 1000), final=True,
                                       dest_path=final))
        except FileError as exc:
            self.report(self._progress(ft, e, status=ScriptStatus.FAILED, error_code=exc.code, error_msg=exc.message,
                                       type=kind, start_time_ms=start, end_time_ms=int(time.time() * 1000),
                                       final=True, dest_path=final))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the entry fails; the agent goes on
            log.exception("file entry failed", extra={"transfer_id": ft.transfer_id, "index": e.index})
            self.report(self._progress(ft, e, status=ScriptStatus.FAILED, error_code=ErrorCode.FAILED, error_msg=repr(exc),
                                       type=kind, start_time_ms=start, end_time_ms=int(time.time() * 1000),
                                       final=True, dest_path=final))

    def _tag(self, ft: pb.FileTarget) -> str:
        """Temporary names: the same in every run of this agent (a restart resumes its .part files), and
        distinct between agents that share a filesystem."""
        return hashlib.md5(f"{ft.transfer_id}/{self.agent.agent_id}".encode()).hexdigest()[:12]

    def _stripe(self, ft: pb.FileTarget) -> tuple[int, int] | None:
        """This target's share of the pieces to fetch from the source: (k, n) = every n-th piece from piece k.

        Every target knows the transfer's members (their tokens); sorted, they give each target its own k. Each
        target then asks the source for its own share only and takes every other piece from whichever target has
        it (TorrentSession.download), so the source sends each piece about once and every target forwards its
        share to the others: with N targets each uploads ~(N-1)/N of the file while it downloads.
        """
        targets = sorted(m for m in ft.tokens if m != ft.source_agent_id)
        if self.agent.agent_id not in targets or len(targets) < 2:
            return None
        return targets.index(self.agent.agent_id), len(targets)

    def _owner(self, ft: pb.FileTarget) -> tuple[int, int]:
        name = ft.owner or ft.user or "root"
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise FileError(ErrorCode.USER_NOT_FOUND, f"owner {name!r} not found") from None
        return pw.pw_uid, pw.pw_gid

    async def _make_dirs(self, ft: pb.FileTarget, path: str, mode: int) -> None:
        root = os.path.normpath(ft.dest_dir)
        if not os.path.isdir(root):
            if not ft.auto_mkdir:
                raise FileError(ErrorCode.NOT_WRITABLE, f"target dir {root} does not exist (auto_mkdir is off)")
        try:
            os.makedirs(path, exist_ok=True)
            if path != root and mode:
                os.chmod(path, mode)
        except OSError as exc:
            raise FileError(ErrorCode.NOT_WRITABLE, f"cannot create {path}: {exc.strerror}") from None

    async def _direct(self, state: TransferState, ft: pb.FileTarget, e: pb.FileEntry, final: str, start: int,
                      verify_torrent: bool = False) -> None:
        tmp = os.path.join(os.path.dirname(final), f".gse-{self._tag(ft)}-{e.index}.part")
        state.temps.add(tmp)
        token = ft.tokens.get(self.agent.agent_id, "")
        md5 = hashlib.md5()
        t0 = time.monotonic()
        done = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                call = self.fileserver(ft.fileserver).Fetch(fpb.FetchRequest(
                    transfer_id=ft.transfer_id, index=e.index, offset=0, token=token,
                    wait_seconds=ft.timeout_seconds or 600))
                pace = _Pace(ft.download_rate)
                async for chunk in call:
                    if chunk.data:
                        await pace.take(len(chunk.data))
                        await asyncio.to_thread(os.pwrite, fd, chunk.data, chunk.offset)
                        md5.update(chunk.data)
                        done = chunk.offset + len(chunk.data)
                        speed = int(done / max(0.001, time.monotonic() - t0) / 1024)
                        self.report(self._progress(ft, e, status=ScriptStatus.RUNNING, error_code=ErrorCode.RUNNING,
                                                   progress=int(100 * done / max(1, e.size)), speed=speed,
                                                   type="mixed" if verify_torrent else "direct",
                                                   start_time_ms=start))
                    if chunk.last:
                        break
            finally:
                os.close(fd)
        except grpc.aio.AioRpcError as exc:
            _unlink(tmp)
            raise FileError(ErrorCode.FAILED, f"direct download failed: {exc.code().name}: {exc.details()}") from None
        if done != e.size:
            _unlink(tmp)
            raise FileError(ErrorCode.CHECKSUM, f"got {done} bytes of {e.size}")
        if verify_torrent:
            ok = await asyncio.to_thread(_verify_pieces, tmp, e.torrent)
        else:
            ok = md5.hexdigest() == e.md5
        if not ok:
            _unlink(tmp)
            raise FileError(ErrorCode.CHECKSUM, "checksum mismatch after direct download")
        os.replace(tmp, final)
        state.temps.discard(tmp)

    async def _bittorrent(self, state: TransferState, ft: pb.FileTarget, e: pb.FileEntry, final: str,
                          start: int) -> str:
        session = await self.session()
        token = ft.tokens.get(self.agent.agent_id, "")
        url = f"{ft.tracker_url}?gse_token={token}"
        last = {"done": -1, "at": time.monotonic(), "failures": 0}

        def on_progress(p) -> None:
            if p.complete:
                return              # the outcome is reported once the file is in place
            if p.total_done != last["done"]:
                last["done"], last["at"] = p.total_done, time.monotonic()
            last["failures"] = p.hash_failures
            self.report(self._progress(ft, e, status=ScriptStatus.RUNNING, error_code=ErrorCode.RUNNING, progress=int(p.progress),
                                       speed=int(p.download_rate / 1024), type="bt", start_time_ms=start))

        from .torrent import TorrentError
        try:
            torrent = await session.download(e.torrent, os.path.dirname(final), url, on_progress=on_progress,
                                             tmp_name=f".gse-{self._tag(ft)}-{e.index}.bt.part",
                                             download_rate_limit=ft.download_rate,
                                             upload_rate_limit=ft.upload_rate, max_connections=ft.max_connections,
                                             stripe=self._stripe(ft))
        except TorrentError as exc:
            # e.g. this agent already moves the same file in another live transfer: go direct instead.
            log.warning("BitTorrent unavailable for this entry; direct mode",
                        extra={"transfer_id": ft.transfer_id, "index": e.index, "error": str(exc)})
            self.agent.send(pb.AgentFrame(need_direct=pb.NeedDirect(
                transfer_id=ft.transfer_id, coordinator=ft.coordinator, index=e.index)))
            await self._direct(state, ft, e, final, start, verify_torrent=True)
            return "mixed"
        state.torrents.append(torrent)
        waiter = asyncio.ensure_future(torrent.wait_complete())
        relay: asyncio.Task | None = None
        asked = False
        mixed = False
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=1.0)
                if waiter.done():
                    break
                p = torrent.progress()
                if relay is None:
                    stalled = time.monotonic() - last["at"] > self.cfg.bt_stall_s
                    if stalled or last["failures"] >= self.cfg.bt_max_hash_failures:
                        reason = "no usable peer" if stalled else f"{last['failures']} piece hash failures"
                        log.warning("BitTorrent failing; fetching the missing pieces directly",
                                    extra={"transfer_id": ft.transfer_id, "index": e.index, "reason": reason})
                        if not asked:
                            asked = True
                            self.agent.send(pb.AgentFrame(need_direct=pb.NeedDirect(
                                transfer_id=ft.transfer_id, coordinator=ft.coordinator, index=e.index)))
                        mixed = True
                        last["failures_at_switch"] = last["failures"]
                        relay = asyncio.ensure_future(self._relay_pieces(ft, e, torrent))
                elif p.download_rate > 0 and p.num_peers > 0:
                    # Peers deliver again: back to BitTorrent for the rest.
                    log.info("BitTorrent recovered; direct fetching stops",
                             extra={"transfer_id": ft.transfer_id, "index": e.index})
                    relay.cancel()
                    relay = None
                    last["at"] = time.monotonic()
                    last["failures"] = last.get("failures_at_switch", 0)
                elif relay.done() and relay.exception() is not None:
                    raise relay.exception()
            waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
            if relay is not None and not relay.done():
                relay.cancel()
        log.debug("download complete; committing", extra={"transfer_id": ft.transfer_id, "index": e.index})
        await session.commit(torrent, os.path.basename(final))
        log.debug("committed", extra={"transfer_id": ft.transfer_id, "path": final})
        return "mixed" if mixed else "bt"

    async def _relay_pieces(self, ft: pb.FileTarget, e: pb.FileEntry, torrent) -> None:
        """Fetch the pieces this torrent still lacks from the file server's relay and hand them to libtorrent,
        which checks each against its hash. Runs until cancelled (BitTorrent recovered) or every piece is in."""
        import libtorrent as lt
        ti = lt.torrent_info(lt.bdecode(e.torrent))
        plen = ti.piece_length()
        h = torrent.handle
        token = ft.tokens.get(self.agent.agent_id, "")
        missing = [i for i in range(ti.num_pieces()) if not h.have_piece(i)]
        while missing:
            first = missing[0]
            call = self.fileserver(ft.fileserver).Fetch(fpb.FetchRequest(
                transfer_id=ft.transfer_id, index=e.index, offset=first * plen, token=token,
                wait_seconds=ft.timeout_seconds or 600))
            buf = bytearray()
            piece = first
            pace = _Pace(ft.download_rate)
            try:
                async for chunk in call:
                    await pace.take(len(chunk.data))
                    buf += chunk.data
                    while len(buf) >= ti.piece_size(piece) or (chunk.last and buf):
                        size = ti.piece_size(piece)
                        data, buf = bytes(buf[:size]), buf[size:]
                        if not h.have_piece(piece):
                            h.add_piece(piece, data, 0)
                        piece += 1
                        if piece >= ti.num_pieces():
                            break
                    if chunk.last or piece >= ti.num_pieces():
                        break
            except grpc.aio.AioRpcError as exc:
                raise FileError(ErrorCode.FAILED, f"direct download failed: {exc.code().name}: {exc.details()}") from None
            finally:
                call.cancel()
            await asyncio.sleep(0.5)          # let libtorrent check what was added
            missing = [i for i in range(ti.num_pieces()) if not h.have_piece(i)]

    # ---- the end ----------------------------------------------------------------------------------

    def on_end(self, et: pb.EndTransfer) -> None:
        self._finished = {k for k in self._finished if k[0] != et.transfer_id}
        state = self.transfers.pop(et.transfer_id, None)
        self._journal_path(et.transfer_id).unlink(missing_ok=True)
        if state is None:
            return
        asyncio.ensure_future(self._end(state, et.terminated))

    async def _end(self, state: TransferState, terminated: bool) -> None:
        for t in state.tasks:
            if not t.done():
                t.cancel()
        if state.tasks:
            await asyncio.wait(state.tasks, timeout=10)
        keep = state.role == "source" and state.frame.keep_seeding and not terminated
        shared = {id(t) for s in self.transfers.values() for t in s.torrents}
        if self._session is not None and not keep:
            for torrent in state.torrents:
                if id(torrent) in shared:
                    continue
                # Under the seed lock: a transfer seeding the same file meanwhile waits for the removal.
                async with self._seed_locks.setdefault(torrent.info_hash, asyncio.Lock()):
                    try:
                        await self._session.remove(torrent, delete_files=not torrent.complete)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
        for tmp in state.temps:
            _unlink(tmp)

    async def stop(self) -> None:
        for state in list(self.transfers.values()):
            for t in state.tasks:
                t.cancel()
        if self._session is not None:
            await self._session.close()
        for ch in self._channels.values():
            await ch.close()
        for relay in self._relays.values():
            await relay.stop()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Pace:
    """Keeps a byte stream at or under `rate` bytes/s (0 = unlimited)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    async def take(self, n: int) -> None:
        self.sent += n
        if self.rate > 0:
            ahead = self.sent / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                await asyncio.sleep(ahead)


def _can_write(path: str, user: str) -> bool:
    """Whether `user` may create files in directory `path` (the agent writes on that user's behalf)."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
        st = os.stat(path)
        pw = pwd.getpwnam(user)
    except (OSError, KeyError):
        return False
    if pw.pw_uid == 0:
        return True
    import grp
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IWUSR and st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_IXOTH)

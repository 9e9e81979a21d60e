"""File transfers on the agent: as a source and as a target.

Source: finds what the request names, reading as the user the task names (`safepath.run_as`): a file, a
directory tree, a wildcard or `regex:` pattern. Each file is opened once, as that user, and from then on read only
through its descriptor: hashed into a torrent and seeded (libtorrent reads `/proc/self/fd/<n>`, the same open
file), or uploaded to the file server for direct mode; its holes are found with SEEK_HOLE/SEEK_DATA and sent
as holes. While a transfer runs the source checks every file it serves (size, mtime and inode, every
`source_check_s`); a file that changed is reported (`FileSourceChanged`) and its items end with 127 naming it.

Decisions (spec section 4):
- A name is first taken literally: a file (or directory) with exactly the given name is that file, even when the
  name contains `*`, `?` or `[`. Only when no such entry exists is the name a wildcard (its last component is
  matched against the entries of its directory). `regex:<expression>` is always a regular expression.
- A directory is sent as a tree: directories (with their modes, empty ones too), regular files, and symlinks.
  A symlink whose target stays inside the sent directory (relative, not climbing out of it) arrives as the same
  link, as `tar` or `cp -a` would make it. A symlink leaving the tree (absolute, or climbing above the sent
  directory) is **refused**: its item fails with a message naming the link and its target; the rest of the tree
  is sent. Links are never descended into, so a loop (`current -> .`) is just a link. Other special files
  (FIFOs, sockets, devices) are refused the same way. The directory named by the request may itself be a
  symlink: the request names it, so it is followed.

Target: writes through `safepath` (directory descriptors, `O_NOFOLLOW|O_EXCL` temporary files, owner and mode
set on the descriptor before the rename), with the filesystem identity of the target's user, so that a target a
user could not write is refused by the kernel (123). Direct mode (files up to 10 KB, and the fallback) verifies
MD5 or the piece hashes before the rename. BitTorrent downloads into a private directory the agent makes in the
target directory (`.gse-<tag>-<index>.d`, root's, mode 0700: libtorrent works by path, and no other user can
plant anything there), reached as `/proc/self/fd/<n>`; the finished file is linked into place (no copy) and
libtorrent seeds on from the private name until the transfer ends. Sparse sources: pieces that lie in holes are
never fetched or written. A target that is also the source of the transfer copies the file locally. A download
whose BitTorrent stalls switches to direct mode through the file server and back when peers deliver again; one
whose pieces keep failing their hash switches for good, and a piece that fails from the source's own data twice
ends the entry with 127. Targets resume after an agent restart: the request is kept in the data dir until the
transfer ends.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import hashlib
import logging
import os
import posixpath
import pwd
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from gse.common.lazyimport import lazy_module
from gse.common.address import join_host_port, split_host_port
from gse.common.aio import spawn
from gse.common.errors import ErrorCode, ScriptStatus
from gse.common.logs import trace
from gse.common.safefile import write_private
from gse.pb import agent_pb2 as pb
from gse.pb import file_pb2 as fpb

from . import safepath, sparse
from .safepath import Identity, UnsafePath

grpc = lazy_module("grpc")                  # loaded with the first transfer through the file server
patterns = lazy_module("gse.common.patterns")   # RE2, for regex: file names
fpb_grpc = lazy_module("gse.pb.file_pb2_grpc")

log = logging.getLogger("gse.agent.files")

CHUNK = 1024 * 1024
REPORT_EVERY_S = 1.0
PART = ".gse-part"                   # the download's name inside its private directory
RELAY_PIECE_FAILURES = 1             # a piece of the source's own data (the relay) failing its hash: the source changed
HASH_FAILURE_LIMIT = 10              # ... and this many times bt_max_hash_failures in all ends the entry too


class FileError(Exception):
    """A file entry (or a whole source) failed: `code` is the file error code it reports (104 source missing, 119 too
    large, 122 user not found, 123 not writable, 127 checksum, 65535 other), `message` what the caller is told."""
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
class SourceItem:
    """One thing the source found: kind is dir, file or link; error is set for what is not sent."""
    rel: str
    path: str
    kind: str
    mode: int = 0
    size: int = 0
    link: str = ""
    error: str = ""


@dataclass
class Held:
    """A source file the agent keeps open while it serves it, with what it was when it was hashed."""
    fd: int
    path: str
    st: os.stat_result


@dataclass
class SourceState:
    """What this agent serves as the source of one transfer: the request, the user it reads as, and per entry index its
    path, stat when read, held descriptor and seeding torrent; entries whose file changed; the tasks to cancel at the
    end."""
    transfer_id: str
    frame: pb.FileSource
    identity: Identity | None = None
    paths: dict[int, str] = field(default_factory=dict)         # entry index -> source path
    stats: dict[int, os.stat_result] = field(default_factory=dict)
    held: dict[int, Held] = field(default_factory=dict)          # large entries, open while seeding
    seeds: dict[int, object] = field(default_factory=dict)       # entry index -> its seeding Torrent
    changed: set[int] = field(default_factory=set)
    torrents: list = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)


@dataclass
class Private:
    """A BitTorrent download's private directory in the target directory (see the module docstring)."""
    parent_fd: int
    name: str
    fd: int


@dataclass
class TargetState:
    """What this agent receives in one transfer: the request, one task per entry (index -> task), entries ended from
    outside (index -> (code, message)), the target directory's descriptor, and the torrents and private download
    directories to clean up at the end."""
    transfer_id: str
    frame: pb.FileTarget
    tasks: dict[int, asyncio.Task] = field(default_factory=dict)
    aborted: dict[int, tuple[int, str]] = field(default_factory=dict)
    root_fd: int | None = None
    root_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    torrents: list = field(default_factory=list)
    privates: list[Private] = field(default_factory=list)


def _trace(state: SourceState | TargetState):
    """The trace of a transfer's work on this agent: its task and the API request that made it."""
    return trace(task_id=state.frame.task_id, request_id=state.frame.request_id)


def parse_permission(digits: int) -> int:
    """644 (as written for chmod) -> 0o644; 0 -> 0 (keep the source's mode)."""
    if digits == 0:
        return 0
    text = str(digits)
    if len(text) > 4 or any(ch not in "01234567" for ch in text):
        raise FileError(ErrorCode.FAILED, f"permission {digits} is not chmod digits")
    return int(text, 8)


# ---- finding the source (runs with the source user's identity) ------------------------------------------

def expand_source(store_dir: str, name: str) -> tuple[str, list[SourceItem]]:
    """(base dir, items) for what `name` names in `store_dir`: a file or directory of exactly that name, else a
    wildcard, or `regex:<expression>`. Items' rel paths are relative to the base dir. Blocking: run it through
    `safepath.run_as` with the source user's identity."""
    store = os.path.normpath(os.path.join("/", store_dir or "/"))
    if name.startswith("regex:"):
        try:
            rx = patterns.compile_user(name[6:], what="the regex: file name")     # linear time (RE2)
        except ValueError as exc:
            raise FileError(ErrorCode.FAILED, str(exc)) from None
        return store, _matching_files(store, lambda n: rx.fullmatch(os.fsencode(n)))
    exact = os.path.normpath(os.path.join(store, name))
    if os.path.lexists(exact) or not any(ch in name for ch in "*?["):
        if os.path.isdir(exact):
            return os.path.dirname(exact), _tree(exact)
        if os.path.lexists(exact):
            return os.path.dirname(exact), [SourceItem(os.path.basename(exact), exact, "file")]
        return store, []
    folder, pattern = os.path.split(exact)
    return folder, _matching_files(folder, lambda n: fnmatch.fnmatchcase(n, pattern))


def _matching_files(folder: str, match) -> list[SourceItem]:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [SourceItem(n, os.path.join(folder, n), "file") for n in names
            if match(n) and os.path.isfile(os.path.join(folder, n))]


def _tree(top: str) -> list[SourceItem]:
    """Every directory, file and symlink below `top` (symlinks are not descended into), dirs before what
    they hold; what is not sent carries its reason."""
    root = os.path.basename(top)
    items = [SourceItem(root, top, "dir", mode=stat.S_IMODE(os.stat(top).st_mode))]
    stack = [(top, root)]
    seen = {(os.stat(top).st_dev, os.stat(top).st_ino)}
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            items.append(SourceItem(rel, folder, "dir", error=f"cannot list {folder}: {exc.strerror}"))
            continue
        subdirs = []
        for d in found:
            r = f"{rel}/{d.name}"
            try:
                st = d.stat(follow_symlinks=False)
            except OSError as exc:
                items.append(SourceItem(r, d.path, "file", error=f"cannot read {d.path}: {exc.strerror}"))
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(d.path)
                items.append(SourceItem(r, d.path, "link", mode=0o777, link=target, error=link_leaves(r, target)))
            elif stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:         # a bind mount of an ancestor: never recurse
                    items.append(SourceItem(r, d.path, "dir", error=f"{d.path} loops back to a directory above"))
                    continue
                seen.add((st.st_dev, st.st_ino))
                items.append(SourceItem(r, d.path, "dir", mode=stat.S_IMODE(st.st_mode)))
                subdirs.append((d.path, r))
            elif stat.S_ISREG(st.st_mode):
                items.append(SourceItem(r, d.path, "file", mode=stat.S_IMODE(st.st_mode), size=st.st_size))
            else:
                items.append(SourceItem(r, d.path, "file", error=f"{d.path} is not a regular file, directory or "
                                                                 f"symlink; it is not sent"))
        stack.extend(reversed(subdirs))
    return items


def link_leaves(rel: str, target: str) -> str:
    """Why the symlink at `rel` (its first component is the sent directory) pointing to `target` is not sent,
    or "" when it stays inside the sent directory."""
    if not target or "\0" in target:
        return f"symlink {rel} has an empty target"
    if target.startswith("/"):
        return (f"symlink {rel} -> {target} is absolute: it leaves the sent directory and is not sent (only links "
                f"that stay inside it are)")
    top = rel.split("/", 1)[0]
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved != top and not resolved.startswith(top + "/"):
        return (f"symlink {rel} -> {target} leaves the sent directory and is not sent (only links that stay "
                f"inside it are)")
    return ""


def _md5_fd(fd: int, size: int) -> str:
    h = hashlib.md5()
    offset = 0
    while offset < size:
        data = os.pread(fd, min(CHUNK, size - offset), offset)
        if not data:
            break
        h.update(data)
        offset += len(data)
    return h.hexdigest()


def _verify_pieces_fd(fd: int, torrent: bytes) -> bool:
    """Check an open file against a torrent's piece hashes (after a direct download of a BitTorrent entry)."""
    import libtorrent as lt
    ti = lt.torrent_info(lt.bdecode(torrent))
    if os.fstat(fd).st_size != ti.total_size():
        return False
    plen = ti.piece_length()
    for i in range(ti.num_pieces()):
        if hashlib.sha1(os.pread(fd, ti.piece_size(i), i * plen)).digest() != ti.hash_for_piece(i):
            return False
    return True


def _what_changed(h: Held) -> str:
    """How the held source file differs from when it was hashed ("" = not at all): size, mtime, inode."""
    st = os.fstat(h.fd)
    if st.st_size != h.st.st_size:
        return f"its size went from {h.st.st_size} to {st.st_size} bytes"
    if st.st_mtime_ns != h.st.st_mtime_ns:
        return "it was modified"
    try:
        now = os.stat(h.path)
    except FileNotFoundError:
        return "it was removed"
    except OSError:
        return ""
    if (now.st_dev, now.st_ino) != (h.st.st_dev, h.st.st_ino):
        return "it was replaced by another file"
    return ""


def _identity(name: str) -> Identity:
    try:
        return Identity.lookup(name)
    except KeyError:
        raise FileError(ErrorCode.USER_NOT_FOUND, f"user {name!r} not found") from None


def _not_writable(exc: BaseException, what: str) -> FileError:
    if isinstance(exc, FileError):
        return exc
    if isinstance(exc, UnsafePath):
        return FileError(ErrorCode.NOT_WRITABLE, f"{what}: {exc}")
    if isinstance(exc, FileNotFoundError):
        return FileError(ErrorCode.NOT_WRITABLE, f"{what}: {exc.strerror or exc} ({exc.filename or ''})".rstrip(" ()"))
    if isinstance(exc, OSError):
        return FileError(ErrorCode.NOT_WRITABLE, f"{what}: {exc.strerror or exc}")
    return FileError(ErrorCode.FAILED, f"{what}: {exc!r}")


def _make_link_temp(dir_fd: int, target: str) -> str:
    for _attempt in range(16):
        name = f".gse-{secrets.token_hex(6)}.tmp"
        try:
            os.symlink(target, name, dir_fd=dir_fd)
            return name
        except FileExistsError:
            continue
    raise FileExistsError("no free temporary name")


def _private_dir(parent_fd: int, name: str) -> bool:
    """Make the private directory `name` in `parent_fd` (as the acting user: that proves they may write
    there); True if it is new, False if it was there already (a resumed download)."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        return True
    except FileExistsError:
        return False


def _sweep(dir_fd: int, prefix: str) -> None:
    """Remove files left under `prefix` by an earlier run of this entry (an agent killed mid-download)."""
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return
    for n in names:
        if n.startswith(prefix):
            try:
                os.unlink(n, dir_fd=dir_fd)
            except OSError:
                pass


class FileManager:
    """The agent's file transfer handler (spec section 4, async_transfer_file and async_push_file; see the module
    docstring): serves the FileSource, FileTarget, UploadRequest, EndEntry and EndTransfer frames, reports each entry's
    progress and outcome in FileReport frames (final ones kept until acknowledged) and journals target requests in
    `<data_dir>/files/` to resume them after a restart."""
    def __init__(self, agent, data_dir: str, cfg):
        self.agent = agent
        self.cfg = cfg
        self.dir = Path(data_dir) / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sources: dict[str, SourceState] = {}
        self.targets: dict[str, TargetState] = {}
        self.outgoing: dict[tuple[str, int, int], Outgoing] = {}   # (transfer, mode, index)
        self._session = None
        self._session_lock = asyncio.Lock()
        self._relays: dict[str, object] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._flusher: asyncio.Handle | None = None
        self._seed_locks: dict[bytes, asyncio.Lock] = {}
        self._seed_fds: dict[bytes, int] = {}                 # info_hash -> the descriptor a seed reads
        self._finished: set[tuple[str, int, int]] = set()   # items whose final report was made
        self._ended: dict[str, float] = {}                    # transfers that ended (monotonic time)

    # ---- plumbing ---------------------------------------------------------------------------------

    async def session(self):
        """The agent's libtorrent session, started on first use on the first free port of `bt_port`-`bt_port_max`;
        raises FileError when none is free."""
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
        """A FileService stub for the file server at `address` (host:port), its channel kept per address; with `bind_ip`
        configured the channel goes through a SourceRelay so that it leaves from that address."""
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
                    spawn(relay.start(), "file relay start")
                host = relay.target[0]
                ch = rpc.make_channel(self.agent.tls, relay.grpc_target,
                                      [("grpc.ssl_target_name_override", self.agent.tls.server_name or host),
                                       ("grpc.default_authority", address)])
            self._channels[address] = ch
        return fpb_grpc.FileServiceStub(ch)

    # ---- reports ----------------------------------------------------------------------------------

    def report(self, p: pb.FileProgress, force: bool = False) -> None:
        """Queue an entry's progress for the next FileReport: progress at most every REPORT_EVERY_S (1 s) unless
        `force`, a final report at once. A final report is never replaced, and nothing is reported for a transfer that
        ended."""
        if p.transfer_id in self._ended:
            return                  # the transfer is over: its items' outcomes are the coordinator's now
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
        """Send every changed report in one FileReport frame; progress reports are then forgotten, final ones kept until
        acknowledged. Not attached: they are sent on the next attach."""
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
        """The `ack` frame handler for file items (task ids "file:<transfer id>"): drop the acknowledged final
        reports, and a target's journal once every entry of it was acknowledged."""
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
        state = self.targets.get(transfer_id)
        if state is None:
            return
        keys = [(transfer_id, 1, e.index) for e in state.frame.entries]
        if all(k in self._finished and k not in self.outgoing for k in keys):
            self._journal_path(transfer_id).unlink(missing_ok=True)

    def on_attach(self) -> None:
        """A new session: every kept report is sent again."""
        for o in self.outgoing.values():
            o.dirty = True
        if self.outgoing:
            self._schedule(0.0)

    # ---- source -----------------------------------------------------------------------------------

    def on_source(self, fs_: pb.FileSource) -> None:
        """The `file_source` frame handler: find, open and hash (or upload) what the request names, as its user, and
        answer a FileManifest; a transfer already served here is ignored."""
        if fs_.transfer_id in self.sources:
            return
        state = self.sources[fs_.transfer_id] = SourceState(fs_.transfer_id, fs_)
        with _trace(state):        # every line the transfer's work logs names its task and request
            log.info("transfer source", extra={"transfer_id": fs_.transfer_id, "path": os.path.join(
                fs_.store_dir, fs_.file_name), "targets": fs_.targets})
            state.tasks.append(asyncio.ensure_future(self._source(state, fs_)))

    async def _source(self, state: SourceState, req: pb.FileSource) -> None:
        manifest = pb.FileManifest(task_id=req.task_id, transfer_id=req.transfer_id)
        try:
            ident = state.identity = _identity(req.user or "root")
            try:
                base, found = await safepath.run_as(ident, expand_source, req.store_dir, req.file_name)
            except PermissionError as exc:
                raise FileError(ErrorCode.SOURCE_MISSING, f"cannot read {req.store_dir} as {ident.name}: "
                                                      f"{exc.strerror}") from None
            manifest.source_dir = base
            if not found:
                raise FileError(ErrorCode.SOURCE_MISSING, f"source {os.path.join(req.store_dir, req.file_name)} "
                                                      f"does not exist (or the pattern matched nothing)")
            entries: list[tuple[pb.FileEntry, SourceItem]] = []
            for index, item in enumerate(found):
                e = pb.FileEntry(index=index, rel_path=item.rel, is_dir=item.kind == "dir", mode=item.mode)
                if item.error:
                    e.error_code, e.error_msg = ErrorCode.FAILED, item.error
                elif item.kind == "link":
                    e.link_target = item.link
                if item.kind == "file" and item.size > req.max_file_size > 0:
                    raise FileError(ErrorCode.TOO_LARGE, f"{item.path} is {item.size} bytes; the limit is "
                                                     f"{req.max_file_size}")
                entries.append((e, item))
            url = f"{req.tracker_url}?gse_token={req.token}"
            for e, item in entries:
                if item.kind == "file" and not e.error_code:
                    await self._prepare_file(state, req, e, item, url, single=len(entries) == 1)
            manifest.entries.extend(e for e, _i in entries)
        except FileError as exc:
            manifest.error_code, manifest.error_msg = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - whatever failed, the transfer must hear of it
            log.exception("preparing the source failed", extra={"transfer_id": req.transfer_id})
            manifest.error_code, manifest.error_msg = ErrorCode.FAILED, f"source failed: {exc!r}"
        log.info("source ready", extra={"transfer_id": req.transfer_id, "entries": len(manifest.entries),
                                        "error_code": manifest.error_code, "error": manifest.error_msg})
        self.agent.send(pb.AgentFrame(file_manifest=manifest))
        if state.held and self.cfg.source_check_s > 0 and not manifest.error_code:
            state.tasks.append(asyncio.ensure_future(self._watch(state)))

    async def _prepare_file(self, state: SourceState, req: pb.FileSource, e: pb.FileEntry, item: SourceItem,
                            url: str, single: bool) -> None:
        """Open one source file as the user, then hash and seed it (large) or upload it (small)."""
        ident = state.identity
        try:
            fd, st = await safepath.run_as(ident, safepath.open_source, item.path,
                                           discard=lambda r: os.close(r[0]))
        except (OSError, UnsafePath) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            code = ErrorCode.SOURCE_MISSING
            e.error_code, e.error_msg = code, f"cannot read {item.path} as {ident.name}: {why}"
            if single:
                raise FileError(code, e.error_msg) from None
            return
        keep = False
        try:
            await self._serve_file(state, req, e, item, url, single, fd, st)
            keep = e.index in state.held
        except FileError as exc:
            if single or exc.code == ErrorCode.TOO_LARGE:
                raise
            e.error_code, e.error_msg = exc.code, exc.message     # this entry fails; the rest of the tree goes
        finally:
            if not keep:
                os.close(fd)

    async def _serve_file(self, state: SourceState, req: pb.FileSource, e: pb.FileEntry, item: SourceItem, url: str,
                          single: bool, fd: int, st: os.stat_result) -> None:
        from .torrent import TorrentError
        try:
            e.size, e.mode = st.st_size, stat.S_IMODE(st.st_mode)
            if st.st_size > req.max_file_size > 0:
                raise FileError(ErrorCode.TOO_LARGE, f"{item.path} is {st.st_size} bytes; the limit is {req.max_file_size}")
            state.paths[e.index] = item.path
            state.stats[e.index] = st
            if req.md5 and single:
                actual = await asyncio.to_thread(_md5_fd, fd, st.st_size)
                if actual != req.md5.lower():
                    raise FileError(ErrorCode.CHECKSUM, f"source md5 is {actual}, the request expected {req.md5}")
            holes = await asyncio.to_thread(sparse.holes, fd, st.st_size)
            e.holes.extend(sparse.flatten(holes))
            if e.size <= req.direct_max:
                e.md5 = await asyncio.to_thread(_md5_fd, fd, st.st_size)
                await self._upload(req, e.index, fd, e.size)
            else:
                from .torrent import info_hash, make_torrent_fd
                e.torrent = await make_torrent_fd(
                    fd, posixpath.basename(item.rel), st.st_size,
                    lambda plen, n: sparse.hole_pieces(holes, plen, n, st.st_size))
                e.info_hash = info_hash(e.torrent)
                why = await asyncio.to_thread(_what_changed, Held(fd, item.path, st))
                if why:
                    raise FileError(ErrorCode.CHECKSUM, f"source {item.path} changed while it was hashed ({why})")
                # A plain seed: the targets share the pieces out among themselves (see _stripe).
                seed = state.seeds[e.index] = await self._seed(e.torrent, fd, url, req.upload_rate)
                state.torrents.append(seed)
                state.held[e.index] = Held(fd, item.path, st)
        except TorrentError as exc:
            raise FileError(ErrorCode.CHECKSUM, f"source {item.path}: {exc}") from None

    async def _seed(self, torrent_bytes: bytes, fd: int, url: str, rate: int):
        """Seed the open file `fd`; a file another live transfer already seeds is shared (one torrent, its
        trackers added). libtorrent reads a descriptor of its own (/proc/self/fd/<n>), closed with the torrent."""
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
            own = os.dup(fd)
            try:
                torrent = await session.seed(torrent_bytes, f"/proc/self/fd/{own}", url, upload_rate_limit=rate)
            except BaseException:
                os.close(own)
                raise
            self._seed_fds[ih] = own
            return torrent

    async def _watch(self, state: SourceState) -> None:
        """Check every held source file for changes until the transfer ends; report each change once."""
        while True:
            await asyncio.sleep(self.cfg.source_check_s)
            for index, h in list(state.held.items()):
                if index in state.changed:
                    continue
                try:
                    why = await asyncio.to_thread(_what_changed, h)
                except OSError:
                    continue
                seed = state.seeds.get(index)
                if not why and seed is not None and seed.hash_failures:
                    # libtorrent checks a seed's piece when it is first asked for: this one no longer matches
                    why = "a piece no longer matches what was hashed"
                if not why:
                    continue
                state.changed.add(index)
                msg = f"source {h.path} changed during the transfer ({why})"
                log.warning("source changed during a transfer", extra={"transfer_id": state.transfer_id,
                                                                        "index": index, "path": h.path})
                self.agent.send(pb.AgentFrame(source_changed=pb.FileSourceChanged(
                    transfer_id=state.transfer_id, coordinator=state.frame.coordinator, index=index,
                    error_msg=msg)))

    async def _upload(self, req: pb.FileSource, index: int, fd: int, size: int) -> None:
        """Upload an entry to the file server from its open descriptor; holes travel as zeros without data."""
        holes = await asyncio.to_thread(sparse.holes, fd, size)

        async def _chunks():
            offset = 0
            spans = [h for h in holes if h[1] >= sparse.BLOCK] + [(size, 0)]
            for h_off, h_len in spans:
                while offset < h_off:
                    data = await asyncio.to_thread(os.pread, fd, min(CHUNK, h_off - offset), offset)
                    if not data:
                        raise FileError(ErrorCode.CHECKSUM, f"source entry {index} ended at {offset} of {size} bytes")
                    yield fpb.Chunk(transfer_id=req.transfer_id, index=index, offset=offset, data=data,
                                    token=req.token, size=size, last=offset + len(data) >= size)
                    offset += len(data)
                if h_len:
                    yield fpb.Chunk(transfer_id=req.transfer_id, index=index, offset=h_off, zeros=h_len,
                                    token=req.token, size=size, last=h_off + h_len >= size)
                    offset = h_off + h_len
            if size == 0:
                yield fpb.Chunk(transfer_id=req.transfer_id, index=index, offset=0, token=req.token, size=0,
                                last=True)

        await self.fileserver(req.fileserver).Upload(_chunks(), timeout=max(60, size / (1 << 20)))

    async def _source_fd(self, state: SourceState, index: int) -> tuple[int, os.stat_result]:
        """A descriptor of a source entry (its own: the caller closes it) and its stat when it was read."""
        h = state.held.get(index)
        if h is not None:
            return os.dup(h.fd), h.st
        path = state.paths.get(index)
        if path is None or state.identity is None:
            raise FileError(ErrorCode.SOURCE_MISSING, f"source entry {index} is not known here")
        fd, _st = await safepath.run_as(state.identity, safepath.open_source, path, discard=lambda r: os.close(r[0]))
        return fd, state.stats[index]

    def on_upload_request(self, ur: pb.UploadRequest) -> None:
        """The `upload_request` frame handler: upload the named entries to the file server for direct mode (entries
        whose source changed are skipped), and re-announce the seeds when asked."""
        state = self.sources.get(ur.transfer_id)
        if state is None:
            return
        if ur.announce:
            for torrent in state.torrents:
                if torrent.handle is not None and not torrent.removed:
                    torrent.handle.force_reannounce()
        for index in ur.indexes:
            if index in state.paths and index not in state.changed:
                with _trace(state):
                    state.tasks.append(asyncio.ensure_future(self._upload_entry(state, index)))

    async def _upload_entry(self, state: SourceState, index: int) -> None:
        fd, st = await self._source_fd(state, index)
        try:
            await self._upload(state.frame, index, fd, st.st_size)
        except Exception:  # noqa: BLE001 - the target that asked times out on its own; the source goes on
            log.exception("direct upload failed", extra={"transfer_id": state.transfer_id, "index": index})
        finally:
            os.close(fd)

    # ---- target -----------------------------------------------------------------------------------

    def on_target(self, ft: pb.FileTarget, persist: bool = True) -> None:
        """The `file_target` frame handler (and `recover`, with `persist` false): journal the request and start one task
        per entry, directories first; a transfer already received here is ignored."""
        if ft.transfer_id in self.targets:
            return
        state = self.targets[ft.transfer_id] = TargetState(ft.transfer_id, ft)
        if persist:
            self._journal(ft)
        with _trace(state):
            log.info("transfer target", extra={"transfer_id": ft.transfer_id, "entries": len(ft.entries),
                                               "dest_dir": ft.dest_dir, "resumed": not persist})
            for e in sorted(ft.entries, key=lambda e: (not e.is_dir, e.rel_path)):
                state.tasks[e.index] = asyncio.ensure_future(self._target_entry(state, ft, e))

    def on_end_entry(self, ee: pb.EndEntry) -> None:
        """One entry ends now (its source changed): stop its download; it reports the given error."""
        state = self.targets.get(ee.transfer_id)
        if state is None:
            return
        task = state.tasks.get(ee.index)
        if task is not None and not task.done():
            state.aborted[ee.index] = (ee.error_code or ErrorCode.FAILED, ee.error_msg)
            task.cancel()

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

    async def _root(self, state: TargetState, ft: pb.FileTarget, ident: Identity) -> int:
        """The target directory's descriptor, opened (and made, with auto_mkdir) once per transfer."""
        async with state.root_lock:
            if state.root_fd is None:
                try:
                    state.root_fd = await safepath.run_as(ident, safepath.open_dir, ft.dest_dir, ident.uid,
                                                          create=ft.auto_mkdir, discard=os.close)
                except FileNotFoundError:
                    raise FileError(ErrorCode.NOT_WRITABLE, f"target dir {ft.dest_dir} does not exist (auto_mkdir "
                                                        f"is off)") from None
                except (OSError, UnsafePath) as exc:
                    raise _not_writable(exc, f"target dir {ft.dest_dir}") from None
            return state.root_fd

    async def _target_entry(self, state: TargetState, ft: pb.FileTarget, e: pb.FileEntry) -> None:
        start = int(time.time() * 1000)
        kind = "direct" if not e.torrent else "bt"
        final = ""
        try:
            async with self.agent.tasks.pools.slot("file"):
                self.report(self._progress(ft, e, status=ScriptStatus.RUNNING, error_code=ErrorCode.RUNNING, type=kind,
                                           start_time_ms=start), force=True)
                if e.error_code:
                    raise FileError(e.error_code, e.error_msg)
                single = len(ft.entries) == 1 and not e.is_dir
                rel = ft.dest_name if (single and ft.dest_name) else e.rel_path
                try:
                    parts = safepath.plain_parts(rel)
                except UnsafePath as exc:
                    raise FileError(ErrorCode.NOT_WRITABLE, f"target path {rel!r} leaves the target dir ({exc})") from None
                final = os.path.join(ft.dest_dir, *parts)
                ident = _identity(ft.user or "root")
                uid, gid = self._owner(ft)
                root = await self._root(state, ft, ident)
                kind = await self._place(state, ft, e, root, parts, ident, uid, gid, kind, start)
            self.report(self._progress(ft, e, status=ScriptStatus.SUCCESS, error_code=0, progress=100, type=kind,
                                       start_time_ms=start, end_time_ms=int(time.time() * 1000), final=True,
                                       dest_path=final))
            log.info("entry received", extra={"transfer_id": ft.transfer_id, "index": e.index, "type": kind,
                                              "path": final})
        except FileError as exc:
            log.info("entry failed", extra={"transfer_id": ft.transfer_id, "index": e.index, "type": kind,
                                            "error_code": exc.code, "error": exc.message})
            self.report(self._progress(ft, e, status=ScriptStatus.FAILED, error_code=exc.code, error_msg=exc.message,
                                       type=kind, start_time_ms=start, end_time_ms=int(time.time() * 1000),
                                       final=True, dest_path=final))
        except asyncio.CancelledError:
            aborted = state.aborted.get(e.index)
            if aborted is None:
                raise
            self.report(self._progress(ft, e, status=ScriptStatus.FAILED, error_code=aborted[0], error_msg=aborted[1],
                                       type=kind, start_time_ms=start, end_time_ms=int(time.time() * 1000),
                                       final=True, dest_path=final))
        except Exception as exc:  # noqa: BLE001 - the entry fails; the agent goes on
            log.exception("file entry failed", extra={"transfer_id": ft.transfer_id, "index": e.index})
            self.report(self._progress(ft, e, status=ScriptStatus.FAILED, error_code=ErrorCode.FAILED, error_msg=repr(exc),
                                       type=kind, start_time_ms=start, end_time_ms=int(time.time() * 1000),
                                       final=True, dest_path=final))

    async def _place(self, state: TargetState, ft: pb.FileTarget, e: pb.FileEntry, root: int, parts: list[str],
                     ident: Identity, uid: int, gid: int, kind: str, start: int) -> str:
        """Put one entry in place below the target directory; returns how it came (direct, bt, mixed, local)."""
        where = os.path.join(ft.dest_dir, *parts)
        try:
            if e.is_dir:
                fd = await safepath.run_as(ident, safepath.open_below, root, parts, discard=os.close)
                try:
                    if e.mode:
                        os.fchmod(fd, e.mode)
                finally:
                    os.close(fd)
                return kind
            parent = await safepath.run_as(ident, safepath.open_below, root, parts[:-1], discard=os.close)
        except (OSError, UnsafePath) as exc:
            raise _not_writable(exc, where) from None
        name = parts[-1]
        mode = parse_permission(ft.permission) or e.mode or 0o644
        try:
            if e.link_target:
                if link_leaves(e.rel_path, e.link_target):
                    raise FileError(ErrorCode.NOT_WRITABLE, link_leaves(e.rel_path, e.link_target))
                tmp = await safepath.run_as(ident, _make_link_temp, parent, e.link_target)
                try:
                    os.chown(tmp, uid, gid, dir_fd=parent, follow_symlinks=False)
                    safepath.replace(parent, tmp, name, ident.uid)
                except BaseException:
                    safepath.unlink_quietly(parent, tmp)
                    raise
                return "direct"
            source = self.sources.get(ft.transfer_id)
            if ft.source_agent_id and ft.source_agent_id == self.agent.agent_id and source is not None:
                await self._local_copy(source, ft, e, parent, name, ident, uid, gid, mode)
                return "local"
            if not ft.fileserver:
                await self._inline(ft, e, parent, name, ident, uid, gid, mode)
                return "direct"
            if not e.torrent:
                await self._direct(ft, e, parent, name, ident, uid, gid, mode, start)
                return "direct"
            return await self._bittorrent(state, ft, e, parent, name, ident, uid, gid, mode, start)
        except (OSError, UnsafePath) as exc:
            raise _not_writable(exc, where) from None
        finally:
            os.close(parent)

    def _tag(self, ft: pb.FileTarget) -> str:
        """Names of this agent's temporary files: the same in every run of this agent (a restart finds what an
        earlier run left), and distinct between agents that share a filesystem."""
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

    async def _commit(self, parent: int, fd: int, tmp: str, name: str, ident: Identity, uid: int, gid: int,
                      mode: int, durable: bool = False) -> None:
        """Owner and mode on the descriptor, then the rename into place (rule 3 of safepath)."""
        safepath.set_owner_mode(fd, uid, gid, mode)
        if durable:
            await asyncio.to_thread(os.fsync, fd)
        safepath.replace(parent, tmp, name, ident.uid)

    async def _new_temp(self, ft: pb.FileTarget, e: pb.FileEntry, parent: int, ident: Identity) -> tuple[int, str]:
        prefix = f".gse-{self._tag(ft)}-{e.index}."
        await asyncio.to_thread(_sweep, parent, prefix)
        return await safepath.run_as(ident, safepath.create_temp, parent, prefix, discard=lambda r: os.close(r[0]))

    async def _inline(self, ft: pb.FileTarget, e: pb.FileEntry, parent: int, name: str, ident: Identity, uid: int,
                      gid: int, mode: int) -> None:
        """A file whose content came with the request (async_push_file): written, checked, fsynced, renamed."""
        if e.md5 and hashlib.md5(e.content).hexdigest() != e.md5.lower():
            raise FileError(ErrorCode.CHECKSUM, f"content md5 is {hashlib.md5(e.content).hexdigest()}, "
                                            f"the request said {e.md5}")
        fd, tmp = await self._new_temp(ft, e, parent, ident)
        done = False
        try:
            view = memoryview(e.content)
            while view:
                view = view[os.write(fd, view):]
            await self._commit(parent, fd, tmp, name, ident, uid, gid, mode, durable=True)
            done = True
        finally:
            os.close(fd)
            if not done:
                safepath.unlink_quietly(parent, tmp)

    async def _local_copy(self, source: SourceState, ft: pb.FileTarget, e: pb.FileEntry, parent: int, name: str,
                          ident: Identity, uid: int, gid: int, mode: int) -> None:
        """This agent is the transfer's source too: copy the file it serves (holes kept), check that the source
        did not change meanwhile (size, mtime, inode; MD5 for direct-size files), and rename into place."""
        if e.index in source.changed:
            raise FileError(ErrorCode.CHECKSUM, f"source {source.paths.get(e.index, e.rel_path)} changed during the "
                                            f"transfer")
        src_fd, expected = await self._source_fd(source, e.index)
        try:
            fd, tmp = await self._new_temp(ft, e, parent, ident)
            done = False
            try:
                await asyncio.to_thread(sparse.copy_sparse, src_fd, fd, e.size)
                why = await asyncio.to_thread(_what_changed, Held(src_fd, source.paths[e.index], expected))
                if why:
                    raise FileError(ErrorCode.CHECKSUM, f"source {source.paths[e.index]} changed during the "
                                                    f"transfer ({why})")
                if e.md5 and await asyncio.to_thread(_md5_fd, fd, e.size) != e.md5:
                    raise FileError(ErrorCode.CHECKSUM, "checksum mismatch after the local copy")
                await self._commit(parent, fd, tmp, name, ident, uid, gid, mode)
                done = True
            finally:
                os.close(fd)
                if not done:
                    safepath.unlink_quietly(parent, tmp)
        finally:
            os.close(src_fd)

    async def _direct(self, ft: pb.FileTarget, e: pb.FileEntry, parent: int, name: str, ident: Identity, uid: int,
                      gid: int, mode: int, start: int, verify_torrent: bool = False) -> None:
        token = ft.tokens.get(self.agent.agent_id, "")
        md5 = hashlib.md5()
        t0 = time.monotonic()
        done = 0
        fd, tmp = await self._new_temp(ft, e, parent, ident)
        placed = False
        try:
            try:
                call = self.fileserver(ft.fileserver).Fetch(fpb.FetchRequest(
                    transfer_id=ft.transfer_id, index=e.index, offset=0, token=token,
                    wait_seconds=ft.timeout_seconds or 600))
                pace = _Pace(ft.download_rate)
                async for chunk in call:
                    if chunk.offset != done:
                        raise FileError(ErrorCode.CHECKSUM, f"direct download: data at {chunk.offset}, expected {done}")
                    if chunk.zeros:
                        if not verify_torrent:
                            _md5_zeros(md5, chunk.zeros)
                        done = chunk.offset + chunk.zeros
                    elif chunk.data:
                        await pace.take(len(chunk.data))
                        await asyncio.to_thread(sparse.pwrite_sparse, fd, chunk.data, chunk.offset)
                        if not verify_torrent:
                            md5.update(chunk.data)
                        done = chunk.offset + len(chunk.data)
                    if chunk.zeros or chunk.data:
                        speed = int(done / max(0.001, time.monotonic() - t0) / 1024)
                        self.report(self._progress(ft, e, status=ScriptStatus.RUNNING, error_code=ErrorCode.RUNNING,
                                                   progress=int(100 * done / max(1, e.size)), speed=speed,
                                                   type="mixed" if verify_torrent else "direct",
                                                   start_time_ms=start))
                    if chunk.last:
                        break
            except grpc.aio.AioRpcError as exc:
                raise FileError(ErrorCode.FAILED, f"direct download failed: {exc.code().name}: {exc.details()}") from None
            if done != e.size:
                raise FileError(ErrorCode.CHECKSUM, f"got {done} bytes of {e.size}")
            os.ftruncate(fd, e.size)
            if verify_torrent:
                ok = await asyncio.to_thread(_verify_pieces_fd, fd, e.torrent)
            else:
                ok = md5.hexdigest() == e.md5
            if not ok:
                raise FileError(ErrorCode.CHECKSUM, "checksum mismatch after direct download")
            await self._commit(parent, fd, tmp, name, ident, uid, gid, mode)
            placed = True
        finally:
            os.close(fd)
            if not placed:
                safepath.unlink_quietly(parent, tmp)

    async def _private(self, state: TargetState, ft: pb.FileTarget, e: pb.FileEntry, parent: int,
                       ident: Identity) -> tuple[Private, bool]:
        """The entry's private download directory in `parent`: made as the user (who must be allowed to write
        there), then the agent's (root's) with mode 0700 and checked empty, so that nobody else can place
        anything in it. One an earlier run of this agent left (the agent's, 0700) is taken up again.
        (Private, is_new)."""
        name = f".gse-{self._tag(ft)}-{e.index}.d"
        fresh = await safepath.run_as(ident, _private_dir, parent, name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            raise UnsafePath(f"{name} in the target dir is not a directory the agent made ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if fresh:
                os.fchown(fd, os.geteuid(), os.getegid())
                os.fchmod(fd, 0o700)
                if os.listdir(fd):
                    raise UnsafePath(f"{name} in the target dir was written to by another user; not used")
            elif st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
                raise UnsafePath(f"{name} in the target dir is not the agent's; not used")
        except BaseException:
            os.close(fd)
            raise
        p = Private(os.dup(parent), name, fd)
        state.privates.append(p)
        return p, fresh

    async def _bittorrent(self, state: TargetState, ft: pb.FileTarget, e: pb.FileEntry, parent: int, name: str,
                          ident: Identity, uid: int, gid: int, mode: int, start: int) -> str:
        session = await self.session()
        token = ft.tokens.get(self.agent.agent_id, "")
        url = f"{ft.tracker_url}?gse_token={token}"
        last = {"done": -1, "at": time.monotonic(), "failures": 0}

        def _on_progress(p) -> None:
            if p.complete:
                return              # the outcome is reported once the file is in place
            if p.total_done != last["done"]:
                last["done"], last["at"] = p.total_done, time.monotonic()
            last["failures"] = p.hash_failures
            self.report(self._progress(ft, e, status=ScriptStatus.RUNNING, error_code=ErrorCode.RUNNING, progress=int(p.progress),
                                       speed=int(p.download_rate / 1024), type="bt", start_time_ms=start))

        from .torrent import TorrentError
        priv, fresh = await self._private(state, ft, e, parent, ident)
        have = None
        try:
            pfd = os.open(PART, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=priv.fd)
            try:
                os.ftruncate(pfd, e.size)       # a new file of the full size: its holes read as zeros
            finally:
                os.close(pfd)
            import libtorrent as lt
            ti = lt.torrent_info(lt.bdecode(e.torrent))
            have = sparse.hole_pieces(sparse.pairs(e.holes), ti.piece_length(), ti.num_pieces(), e.size)
        except FileExistsError:
            pass                                # a .part an earlier run left: libtorrent checks and resumes it
        try:
            torrent = await session.download(e.torrent, f"/proc/self/fd/{priv.fd}", url, on_progress=_on_progress,
                                             tmp_name=PART, download_rate_limit=ft.download_rate,
                                             upload_rate_limit=ft.upload_rate, max_connections=ft.max_connections,
                                             stripe=self._stripe(ft), have_pieces=have)
        except TorrentError as exc:
            # e.g. this agent already moves the same file in another live transfer: go direct instead.
            log.warning("BitTorrent unavailable for this entry; direct mode",
                        extra={"transfer_id": ft.transfer_id, "index": e.index, "error": str(exc)})
            self.agent.send(pb.AgentFrame(need_direct=pb.NeedDirect(
                transfer_id=ft.transfer_id, coordinator=ft.coordinator, index=e.index)))
            await self._direct(ft, e, parent, name, ident, uid, gid, mode, start, verify_torrent=True)
            return "mixed"
        state.torrents.append(torrent)
        waiter = asyncio.ensure_future(torrent.wait_complete())
        relay: asyncio.Task | None = None
        asked = False
        mixed = False
        for_good = False            # switched because pieces fail their hash: BitTorrent does not get it back
        limit = max(1, self.cfg.bt_max_hash_failures)
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=1.0)
                if waiter.done():
                    break
                p = torrent.progress()
                if torrent.hash_failures >= HASH_FAILURE_LIMIT * limit:
                    raise FileError(ErrorCode.CHECKSUM, f"{torrent.hash_failures} pieces of "
                                                    f"{posixpath.join(ft.source_dir, e.rel_path)} failed their hash "
                                                    f"check: the source changed during the transfer")
                if relay is None:
                    now = time.monotonic()
                    stalled = now - last["at"] > self.cfg.bt_stall_s
                    failing = last["failures"] >= limit
                    gap, gaining = torrent.piece_gaps()
                    if gap and not gaining:
                        last.setdefault("unavailable_since", now)
                    else:           # no gap, or a peer gained pieces meanwhile: it may bring the missing ones yet
                        last.pop("unavailable_since", None)
                    # pieces no peer has (e.g. a source that no longer has them) while no peer gains any, for as
                    # long as a stall
                    orphaned = now - last.get("unavailable_since", now) > self.cfg.bt_stall_s
                    if stalled or failing or orphaned:
                        reason = (f"{last['failures']} piece hash failures" if failing else
                                  "pieces no peer has" if orphaned and not stalled else "no usable peer")
                        log.warning("BitTorrent failing; fetching the missing pieces directly",
                                    extra={"transfer_id": ft.transfer_id, "index": e.index, "reason": reason})
                        if not asked:
                            asked = True
                            self.agent.send(pb.AgentFrame(need_direct=pb.NeedDirect(
                                transfer_id=ft.transfer_id, coordinator=ft.coordinator, index=e.index)))
                        mixed = True
                        # BitTorrent goes on beside the relay; only a plain stall may hand back to it
                        for_good = for_good or failing or not stalled
                        last["failures_at_switch"] = last["failures"]
                        relay = asyncio.ensure_future(self._relay_pieces(ft, e, torrent))
                elif relay.done() and relay.exception() is not None:
                    raise relay.exception()
                elif not for_good and p.download_rate > 0 and p.num_peers > 0:
                    # Peers deliver again after a stall: back to BitTorrent for the rest.
                    log.info("BitTorrent recovered; direct fetching stops",
                             extra={"transfer_id": ft.transfer_id, "index": e.index})
                    relay.cancel()
                    relay = None
                    last["at"] = time.monotonic()
                    last["failures"] = last.get("failures_at_switch", 0)
            waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
            if relay is not None and not relay.done():
                relay.cancel()
        log.debug("download complete; placing it", extra={"transfer_id": ft.transfer_id, "index": e.index})
        await self._place_download(ft, e, priv, parent, name, ident, uid, gid, mode)
        return "mixed" if mixed else "bt"

    async def _place_download(self, ft: pb.FileTarget, e: pb.FileEntry, priv: Private, parent: int, name: str,
                              ident: Identity, uid: int, gid: int, mode: int) -> None:
        """Owner and mode on the finished download, then a hard link from the private directory into the
        target directory under a temporary name, renamed over the final name. libtorrent seeds on from the
        private name. Across filesystems (a mount inside the target dir) the file is copied instead."""
        fd = os.open(PART, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=priv.fd)
        try:
            safepath.set_owner_mode(fd, uid, gid, mode)
            for _attempt in range(16):
                tmp = f".gse-{secrets.token_hex(6)}.tmp"
                try:
                    os.link(PART, tmp, src_dir_fd=priv.fd, dst_dir_fd=parent, follow_symlinks=False)
                    break
                except FileExistsError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    cfd, tmp = await self._new_temp(ft, e, parent, ident)
                    try:
                        await asyncio.to_thread(sparse.copy_sparse, fd, cfd, e.size)
                        safepath.set_owner_mode(cfd, uid, gid, mode)
                    except BaseException:
                        safepath.unlink_quietly(parent, tmp)
                        raise
                    finally:
                        os.close(cfd)
                    break
            else:
                raise FileExistsError("no free temporary name")
            try:
                safepath.replace(parent, tmp, name, ident.uid)
            except BaseException:
                safepath.unlink_quietly(parent, tmp)
                raise
        finally:
            os.close(fd)

    async def _relay_pieces(self, ft: pb.FileTarget, e: pb.FileEntry, torrent) -> None:
        """Fetch the pieces this torrent still lacks from the file server's relay and hand them to libtorrent,
        which checks each against its hash. Runs until cancelled (BitTorrent recovered) or every piece is in.
        The relay's data is the source's own: a piece that fails from it RELAY_PIECE_FAILURES times means the
        source file no longer matches its torrent (127)."""
        import libtorrent as lt
        ti = lt.torrent_info(lt.bdecode(e.torrent))
        plen = ti.piece_length()
        h = torrent.handle
        token = ft.tokens.get(self.agent.agent_id, "")
        failed_from_relay: dict[int, int] = {}
        missing = [i for i in range(ti.num_pieces()) if not h.have_piece(i)]
        while missing:
            first = missing[0]
            before = dict(torrent.piece_failures)
            added: list[int] = []
            call = self.fileserver(ft.fileserver).Fetch(fpb.FetchRequest(
                transfer_id=ft.transfer_id, index=e.index, offset=first * plen, token=token,
                wait_seconds=ft.timeout_seconds or 600))
            buf = bytearray()
            piece = first
            pace = _Pace(ft.download_rate)

            def take(data) -> None:
                """Whole pieces out of the buffer to libtorrent (the ones it lacks)."""
                nonlocal buf, piece
                buf += data
                while piece < ti.num_pieces() and len(buf) >= ti.piece_size(piece):
                    size = ti.piece_size(piece)
                    if not h.have_piece(piece):
                        h.add_piece(piece, bytes(buf[:size]), 0)
                        added.append(piece)
                    del buf[:size]
                    piece += 1

            try:
                async for chunk in call:
                    await pace.take(len(chunk.data))
                    if chunk.zeros:
                        left = chunk.zeros          # a hole: zeros a piece at a time, never the whole hole
                        while left > 0 and piece < ti.num_pieces():
                            step = min(left, max(1, ti.piece_size(piece) - len(buf)))
                            take(bytes(step))
                            left -= step
                    else:
                        take(chunk.data)
                    if chunk.last or piece >= ti.num_pieces():
                        break
            except grpc.aio.AioRpcError as exc:
                raise FileError(ErrorCode.FAILED, f"direct download failed: {exc.code().name}: {exc.details()}") from None
            finally:
                call.cancel()
            await asyncio.sleep(0.5)          # let libtorrent check what was added
            for i in added:
                if torrent.piece_failures.get(i, 0) > before.get(i, 0):
                    failed_from_relay[i] = failed_from_relay.get(i, 0) + 1
                    if failed_from_relay[i] >= RELAY_PIECE_FAILURES:
                        raise FileError(ErrorCode.CHECKSUM, f"piece {i} of {posixpath.join(ft.source_dir, e.rel_path)} "
                                                        f"fails its hash check from the source's own data: the "
                                                        f"source changed during the transfer")
            missing = [i for i in range(ti.num_pieces()) if not h.have_piece(i)]

    # ---- the end ----------------------------------------------------------------------------------

    def on_end(self, et: pb.EndTransfer) -> None:
        """The `end_transfer` frame handler: forget the transfer's pending progress and journal, then release its
        torrents, descriptors and private directories in the background (a source with `keep_seeding` and not terminated
        seeds on)."""
        now = time.monotonic()
        self._ended = {t: at for t, at in self._ended.items() if now - at < 3600}
        self._ended[et.transfer_id] = now
        # Progress not sent yet is stale now; a late one would overwrite the outcome the coordinator wrote
        # (timed out, terminated). Final reports stay until acknowledged.
        for key in [k for k, o in self.outgoing.items() if k[0] == et.transfer_id and not o.progress.final]:
            del self.outgoing[key]
        self._finished = {k for k in self._finished if k[0] != et.transfer_id}
        source = self.sources.pop(et.transfer_id, None)
        target = self.targets.pop(et.transfer_id, None)
        self._journal_path(et.transfer_id).unlink(missing_ok=True)
        if target is not None:
            with _trace(target):
                log.info("transfer ended", extra={"transfer_id": et.transfer_id, "role": "target",
                                                  "terminated": et.terminated})
                spawn(self._end_target(target), "end of a target transfer")
        if source is not None:
            with _trace(source):
                log.info("transfer ended", extra={"transfer_id": et.transfer_id, "role": "source",
                                                  "terminated": et.terminated})
                spawn(self._end_source(source, et.terminated), "end of a source transfer")

    def _live_torrents(self) -> set[int]:
        live = {id(t) for s in self.sources.values() for t in s.torrents}
        return live | {id(t) for s in self.targets.values() for t in s.torrents}

    async def _remove(self, torrent) -> bool:
        """Take a torrent out of the session (its files stay); False if libtorrent did not confirm in time."""
        if self._session is None:
            return True
        async with self._seed_locks.setdefault(torrent.info_hash, asyncio.Lock()):
            try:
                await self._session.remove(torrent, delete_files=False)
            except asyncio.TimeoutError:
                return False
            except Exception:  # noqa: BLE001 - already gone
                pass
        return True

    async def _end_source(self, state: SourceState, terminated: bool) -> None:
        await _cancel(state.tasks)
        keep = state.frame.keep_seeding and not terminated
        live = self._live_torrents()
        if not keep:
            for torrent in state.torrents:
                if id(torrent) in live:
                    continue
                if await self._remove(torrent):
                    safepath.close_quietly(self._seed_fds.pop(torrent.info_hash, None))
        for h in state.held.values():
            safepath.close_quietly(h.fd)

    async def _end_target(self, state: TargetState) -> None:
        await _cancel(list(state.tasks.values()))
        live = self._live_torrents()
        removed = True
        for torrent in state.torrents:
            if id(torrent) not in live:
                removed = await self._remove(torrent) and removed
        for p in state.privates:
            if removed:
                # libtorrent no longer uses the directory: the download goes (the placed file is another link)
                safepath.unlink_quietly(p.fd, PART)
                try:
                    now = os.stat(p.name, dir_fd=p.parent_fd, follow_symlinks=False)
                    mine = os.fstat(p.fd)
                    if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                        os.rmdir(p.name, dir_fd=p.parent_fd)
                except OSError:
                    pass
                safepath.close_quietly(p.fd)
            safepath.close_quietly(p.parent_fd)
        safepath.close_quietly(state.root_fd)

    async def stop(self) -> None:
        """Cancel every transfer's tasks and close the torrent session, the file server channels and the relays; the
        journals stay for the next run."""
        for state in [*self.sources.values(), *self.targets.values()]:
            tasks = state.tasks.values() if isinstance(state.tasks, dict) else state.tasks
            for t in tasks:
                t.cancel()
        if self._session is not None:
            await self._session.close()
        for ch in self._channels.values():
            await ch.close()
        for relay in self._relays.values():
            await relay.stop()


async def _cancel(tasks) -> None:
    for t in tasks:
        if not t.done():
            t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)


def _md5_zeros(h, n: int) -> None:
    block = bytes(min(n, CHUNK))
    while n > 0:
        h.update(block[:min(n, len(block))])
        n -= len(block)


class _Pace:
    """Keeps a byte stream at or under `rate` bytes/s (0 = unlimited)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    async def take(self, n: int) -> None:
        """Count `n` more bytes and sleep for as long as the stream is ahead of `rate`."""
        self.sent += n
        if self.rate > 0:
            ahead = self.sent / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                await asyncio.sleep(ahead)

"""Safe path operations for everything the agent reads or writes on behalf of a task.

The agent runs as root, and the paths a task names lead through directories other users may write: a symlink
planted there must never turn a root write (or a root read) into one somewhere else. Every file target, every
script and every pushed file goes through this module. The rules:

1. **Walking a directory the task names** (a target `store_dir`, a `script_store_dir`): each component is opened
   relative to its parent's descriptor with `O_NOFOLLOW`. A component that is a symlink is followed only when
   nobody but root (or the acting user) could have put it there: the link belongs to root or the acting user,
   and so does its directory, which nobody else may write (no group or other write bit: a link in `/tmp` or in
   someone's writable directory is never followed). Anything else is refused (`UnsafePath`). Followed links are
   resolved by the same rules, at most `MAX_LINKS` of them. Missing directories are created on the way when the
   caller asks (auto_mkdir) and are then opened the same way, so a symlink raced in after the `mkdir` is refused.
2. **Below a target directory** (the tree being received, the file name): no symlink is ever followed. A
   directory component that is a symlink is refused; a file name that is a symlink is replaced (the rename
   replaces the link itself, never what it points to).
3. **Writing a file**: it is created under a fresh name with `O_CREAT|O_EXCL|O_NOFOLLOW` in its directory's
   descriptor, written through its own descriptor, given its owner and mode with `fchown`/`fchmod`, and renamed
   over the final name with `renameat` on the directory descriptor. Nothing ever exists under the final name with
   other content, owner or mode, and no path is looked up twice.
4. **Acting as a user.** Operations for a user other than the agent's own run on a thread of their own whose
   filesystem identity is that user's: `setfsuid`/`setfsgid` and the thread's own supplementary groups, system
   calls that change the calling thread only (as NFS and SMB servers serve many users from one process). The
   kernel then checks every lookup, open and create against the user at the moment it happens, so no check can
   race the use, and what the user may not read or write fails with EACCES as it would for them. The thread ends
   after the operation and its identity with it. A source file is opened this way and then read by the agent
   through the descriptor (see `open_source`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
import pwd
import secrets
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MAX_LINKS = 40                      # symlinks followed while walking one path (the kernel's own bound)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# setgroups(2) as a raw system call: glibc's wrapper changes every thread of the process (POSIX semantics), the
# kernel's call only the caller. The generic table (aarch64, riscv64, loongarch64) and x86_64.
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "loongarch64": 159}
_libc = ctypes.CDLL(None, use_errno=True)
_NO_ID = 0xFFFFFFFF                 # (uid_t)-1: setfsuid/setfsgid then only report the current value


class UnsafePath(Exception):
    """A path the agent will not use: a symlink it must not follow, a non-directory where a directory must be,
    a name that would leave its directory. The message names the path and the reason."""


@dataclass(frozen=True)
class Identity:
    """Whose permissions an operation runs with: a user's name, uid, primary gid and all of its groups."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> Identity:
        """The identity of user `name` from the system's user database; KeyError when there is no such user."""
        pw = pwd.getpwnam(name)
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    @property
    def is_agent(self) -> bool:
        """Whether this is the agent's own identity (no switch needed)."""
        return self.uid == os.geteuid() and (self.uid == 0 or self.gid == os.getegid())


async def run_as(identity: Identity, fn: Callable[..., T], *args: Any,
                 discard: Callable[[T], None] | None = None, **kwargs: Any) -> T:
    """Run the blocking `fn(*args, **kwargs)` with the filesystem identity of `identity`, off the event loop.

    The agent's own identity runs in the default thread pool; any other runs on a fresh thread that takes the
    user's identity first and ends afterwards. A non-root agent can only act as itself (PermissionError).
    If the caller is cancelled, a result nobody takes is passed to `discard` (e.g. to close a descriptor).
    """
    if identity.is_agent:
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    else:
        if os.geteuid() != 0:
            raise PermissionError(f"the agent does not run as root and cannot act as {identity.name!r}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def _body() -> None:
            try:
                _become(identity)
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

        threading.Thread(target=_body, name=f"as-{identity.name}", daemon=True).start()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if discard is not None:
            fut.add_done_callback(lambda f: discard(f.result()) if not f.cancelled() and f.exception() is None
                                  else None)
        raise


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _become(identity: Identity) -> None:
    """Give the calling thread (only) the filesystem identity of `identity`."""
    nr = _SYS_SETGROUPS.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"acting as another user is not supported on {platform.machine()}")
    groups = (ctypes.c_uint32 * max(1, len(identity.groups)))(*identity.groups)
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_long(len(identity.groups)), groups) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setgroups for {identity.name}: {os.strerror(e)}")
    _libc.setfsgid(ctypes.c_uint32(identity.gid))
    _libc.setfsuid(ctypes.c_uint32(identity.uid))
    if (_libc.setfsuid(ctypes.c_uint32(_NO_ID)) != identity.uid
            or _libc.setfsgid(ctypes.c_uint32(_NO_ID)) != identity.gid):
        raise OSError(errno.EPERM, f"could not take the filesystem identity of {identity.name}")


# ---- walking -----------------------------------------------------------------------------------------

def plain_parts(rel: str) -> list[str]:
    """The components of a relative path that must stay below its directory; UnsafePath for absolute paths,
    `..`, empty names and NUL bytes."""
    if not rel or rel.startswith("/") or "\0" in rel:
        raise UnsafePath(f"{rel!r} is not a relative path")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafePath(f"{rel!r} leaves its directory")
    return parts


def open_dir(path: str, acting_uid: int, *, create: bool = False, mode: int = 0o755) -> int:
    """A descriptor of the directory `path` (absolute), walked by rule 1; create missing directories when
    `create` (with `mode`, less the umask). FileNotFoundError when a component is missing and `create` is off;
    UnsafePath for a symlink that is not followed or a component that is not a directory; other OSErrors as
    the kernel gives them (EACCES for a user who may not look or create there). The caller closes it."""
    if not os.path.isabs(path) or "\0" in path:
        raise UnsafePath(f"{path!r} is not an absolute path")
    fd = os.open("/", _DIR)
    try:
        pending = [p for p in path.split("/") if p not in ("", ".")]
        links = mkdirs = 0
        while pending:
            name = pending.pop(0)
            try:
                nfd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                mkdirs += 1
                if not create or name == ".." or mkdirs > len(path):
                    raise FileNotFoundError(errno.ENOENT, f"{path}: {name} does not exist") from None
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                pending.insert(0, name)       # open what is there now, by the same rules
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"{path}: {name} is not a directory") from None
                links += 1
                if links > MAX_LINKS:
                    raise UnsafePath(f"{path}: more than {MAX_LINKS} symlinks") from None
                _check_link(fd, name, st, acting_uid, path)
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _DIR)
                pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_link(dir_fd: int, name: str, link: os.stat_result, acting_uid: int, path: str) -> None:
    d = os.fstat(dir_fd)
    trusted = {0, acting_uid}
    if link.st_uid not in trusted or d.st_uid not in trusted or d.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(f"{path}: symlink {name} is not followed (it, or the directory it is in, can be "
                         f"changed by another user)")


def open_below(dir_fd: int, parts: list[str], *, create: bool = True, mode: int = 0o755) -> int:
    """A descriptor of the directory `parts` below `dir_fd`, following no symlink at all (rule 2); missing
    directories are created with `mode` when `create`. UnsafePath for a symlink or a non-directory on the way,
    FileNotFoundError when a component is missing and `create` is off. The caller closes it."""
    fd = os.dup(dir_fd)
    try:
        for name in parts:
            if name in ("", ".", "..") or "/" in name:
                raise UnsafePath(f"{name!r} is not a plain name")
            for _attempt in range(3):
                try:
                    nfd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
                    break
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, mode, dir_fd=fd)
                    except FileExistsError:
                        pass
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        what = "a symlink" if exc.errno == errno.ELOOP else "not a directory"
                        raise UnsafePath(f"{'/'.join(parts)}: {name} is {what}; it is not followed") from None
                    raise
            else:
                raise UnsafePath(f"{'/'.join(parts)}: {name} keeps changing")
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


# ---- writing -----------------------------------------------------------------------------------------

def create_temp(dir_fd: int, prefix: str = ".gse-", mode: int = 0o600) -> tuple[int, str]:
    """A new empty file in `dir_fd` under a fresh name (O_EXCL, never through a symlink): (descriptor opened
    read-write, its name). The caller renames it into place with `replace` or unlinks it."""
    for _attempt in range(16):
        name = f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(name, _NEW_FILE, mode, dir_fd=dir_fd)
            return fd, name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name")


def set_owner_mode(fd: int, uid: int, gid: int, mode: int) -> None:
    """fchown (uid or gid -1: unchanged) then fchmod, on the descriptor: the order keeps set-id bits, which a
    chown would clear."""
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)


def replace(dir_fd: int, tmp_name: str, final_name: str, acting_uid: int = 0) -> None:
    """Rename `tmp_name` over `final_name`, both in `dir_fd` (atomic; a symlink at the final name is replaced,
    never followed). In a sticky directory an acting user other than root may replace only what they own (or
    what the directory's owner owns), as the kernel would allow them."""
    if "/" in final_name or final_name in ("", ".", ".."):
        raise UnsafePath(f"{final_name!r} is not a plain file name")
    if acting_uid != 0:
        d = os.fstat(dir_fd)
        if d.st_mode & stat.S_ISVTX:
            try:
                cur = os.stat(final_name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                cur = None
            if cur is not None and cur.st_uid not in (acting_uid, d.st_uid):
                raise PermissionError(errno.EPERM, f"{final_name} belongs to another user (sticky directory)")
    try:
        os.rename(tmp_name, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError:
        raise UnsafePath(f"{final_name} is a directory; a file cannot replace it") from None


def unlink_quietly(dir_fd: int, name: str) -> None:
    """Remove `name` in the directory `dir_fd` (never following a link: unlink removes the link itself); a name already
    gone is no error, any other OSError is raised."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def write_file(dir_path: str, name: str, data: bytes, *, uid: int = -1, gid: int = -1, mode: int = 0o644,
               create_dirs: bool = True, dir_mode: int = 0o755, acting_uid: int = 0, durable: bool = False) -> str:
    """Write `data` to `dir_path/name` by rules 1 and 3 (blocking; run it through `run_as`): the directory is
    walked safely (and created when `create_dirs`), the file written under a temporary name, given `uid`/`gid`
    (-1: unchanged) and `mode`, optionally fsynced, and renamed into place. Returns the final path."""
    if "/" in name or name in ("", ".", "..") or "\0" in name:
        raise UnsafePath(f"{name!r} is not a plain file name")
    dfd = open_dir(dir_path, acting_uid, create=create_dirs, mode=dir_mode)
    try:
        fd, tmp = create_temp(dfd, f".{name[:32]}.")
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                set_owner_mode(fd, uid, gid, mode)
                if durable:
                    os.fsync(fd)
            finally:
                # Closed before the rename: a file still open for writing cannot be executed (ETXTBSY), and
                # from the rename on, another task may run it (two tasks writing the same script).
                os.close(fd)
            replace(dfd, tmp, name, acting_uid)
        except BaseException:
            unlink_quietly(dfd, tmp)
            raise
        if durable:
            os.fsync(dfd)
    finally:
        os.close(dfd)
    return os.path.join(dir_path, name)


# ---- reading -----------------------------------------------------------------------------------------

def open_source(path: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading, with whatever identity the calling thread has: (descriptor, its stat).
    Symlinks in the path are followed (the user named it and the kernel checks the user's access to every
    step); anything but a regular file (a FIFO, a device) is refused without blocking on it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def close_quietly(fd: int | None) -> None:
    """Close `fd` when it is one (None or negative: nothing), ignoring errors: for cleanup paths."""
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass

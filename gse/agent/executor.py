"""The agent's task executor: runs one script task (scripts plus dependent atomic commands) on this host.

A `TaskRun` writes the task's scripts, then runs its atomic tasks in dependency order, each as `/bin/sh -c COMMAND`
in its own session and process group, as the task's user and with that user's login environment. Every change of an
item (started, new output, ended) is handed to `on_update` as an `ItemUpdate`; output is coalesced, bounded and
streamed while the command runs. `Pools` bounds how many tasks of each kind the agent runs at once.

Decisions the spec leaves open:

- A malformed task (duplicate atomic task ids, a dependency cycle, a relation naming an unknown atomic task, a
  negative timeout) is not raised from the constructor: `run()` ends every item failed (5 / 65535) with a message
  saying what is wrong, so the caller reports it like any other failure.
- Processes are started with `subprocess.Popen` from the event loop thread (what asyncio's own subprocess transport
  does), not with `asyncio.create_subprocess_exec`: uvloop, which the daemons install, refuses `user=`, `group=` and
  `extra_groups=`, and a `preexec_fn` that switches credentials is unsafe in a process with gRPC threads. Exit is
  watched with a pidfd (a waiter thread on kernels without one); output is read through `loop.connect_read_pipe`.
- The login environment is built without PAM: a clean environment (HOME, USER, LOGNAME, SHELL, PATH, and LANG if
  the agent has it), then /etc/profile and the user's profile are sourced (bash users: the first of ~/.bash_profile,
  ~/.bash_login, ~/.profile, sourced by bash; everyone else: ~/.profile, sourced by /bin/sh and skipped if it does
  not parse, because a syntax error in a sourced file kills a POSIX shell). Their output is discarded. The command
  then runs as `/bin/sh -c COMMAND` with cwd = HOME (or / when HOME is missing).
- Sourcing the profiles costs a login shell per command (about 0.1 s of CPU for root on a typical host, against
  0.001 s for `sh -c true`), so `LoginEnvironments` does it once per user: a login shell sources the profiles and
  prints its exported environment and umask, and commands exec `/bin/sh -c COMMAND` directly with them. The capture
  is redone when one of the profile files changes (`_PROFILE_FILES`: their inode, size and mtime are checked before
  every task) or when it is older than its bound (`max_age_s`, 600 s by default). What differs from sourcing for
  every command: only exported variables and the umask carry over (functions, aliases and unexported variables never
  cross an exec either way), and what else a profile does to the shell process (`ulimit`, `cd`) does not reach the
  commands; values computed at login (`$RANDOM`, an ssh-agent's socket, a date) are those of the capture; a
  profile's side effects (starting a daemon, writing a file) happen once per capture; and a change in a file the
  profiles read that is not a profile file (a script they source from elsewhere, /etc/environment) is seen only
  after the bound. A task waits for a capture at most `_CAPTURE_WAIT_S`: when the profiles are slower than that
  (seen: `pyenv init` waiting up to a minute for its rehash lock), the task's commands source them themselves (the
  time counting against their own timeouts), while the capture finishes for later tasks. A user whose capture fails
  (a profile that hangs past `capture_timeout_s`, or exits non-zero) gets the profiles sourced for each command, and
  another capture is tried after `_RETRY_FAILED_S`.
- When a command's main process exits normally, whatever it left running in its process group (`daemon &`) is left
  alone, so jobs can start services; output is still read for up to `_DRAIN_AFTER_EXIT_S` after the exit, then the
  pipe is closed. On timeout and terminate the whole process group is killed (SIGTERM, SIGKILL after kill_grace_s).
- A process that died of signal N reports exit_code 128 + N, as a shell would.
- Items that end without running report start_time_ms == end_time_ms == the time they ended.
- Orphans left by a killed command are reparented to init. Where init does not reap (the agent is PID 1, or a
  container's PID 1 is not an init), call `enable_child_subreaper()` once at agent start: orphans then come back to
  the agent and `TaskRun` reaps its own process groups with `waitpid(-pgid)`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import pwd
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from gse.common.errors import FINAL_STATUSES, ErrorCode, ScriptStatus, Unavailable
from gse.common.screen import OutputDecoder
from gse.common.taskgraph import dependency_cycle

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 10 * 1024 * 1024
_FLUSH_INTERVAL_S = 0.05       # output is reported at most this often ...
_FLUSH_BYTES = 64 * 1024       # ... unless this much is pending
_READ_CHUNK = 64 * 1024
_DRAIN_AFTER_EXIT_S = 2.0      # how long output is still read after the command's main process exited
_POLL_S = 0.02                 # how often a dying process group is checked
_REAP_WAIT_S = 1.0             # how long to wait for a SIGKILLed group to disappear

_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_USER_PATH = "/usr/local/bin:/usr/bin:/bin"

# `$0` is the command. Profiles are sourced with their output discarded and stdin closed; a profile that does not
# parse is skipped (a syntax error in a sourced file ends a POSIX shell).
_SH_LOGIN = (
    'for f in /etc/profile "$HOME/.profile"; do '
    '[ -r "$f" ] && /bin/sh -n "$f" && . "$f"; '
    'done >/dev/null 2>&1 </dev/null; '
    'exec /bin/sh -c "$0"'
)
# bash's login order; bash survives syntax errors in sourced files.
_BASH_LOGIN = (
    '{ [ -r /etc/profile ] && . /etc/profile; '
    'if [ -r "$HOME/.bash_profile" ]; then . "$HOME/.bash_profile"; '
    'elif [ -r "$HOME/.bash_login" ]; then . "$HOME/.bash_login"; '
    'elif [ -r "$HOME/.profile" ]; then . "$HOME/.profile"; fi; '
    '} >/dev/null 2>&1 </dev/null; '
    'exec /bin/sh -c "$0"'
)

# The capture: the profiles sourced as above, then the umask and the exported environment (NUL-separated) printed.
_CAPTURE_TAIL = "umask; exec env -0"
_SH_CAPTURE = _SH_LOGIN.replace('exec /bin/sh -c "$0"', _CAPTURE_TAIL)
_BASH_CAPTURE = _BASH_LOGIN.replace('exec /bin/sh -c "$0"', _CAPTURE_TAIL)
# Set by the capturing shell itself, not by the profiles: not carried to commands.
_SHELL_OWN_VARS = frozenset({"_", "SHLVL", "PWD", "OLDPWD"})
# What the login shells above read: a change in any of them (inode, size, mtime) means a new capture.
_PROFILE_FILES = ("/etc/profile", "/etc/profile.d", "/etc/bash.bashrc", "/etc/bashrc", "~/.bash_profile",
                  "~/.bash_login", "~/.profile", "~/.bashrc")
_RETRY_FAILED_S = 30.0
_CAPTURE_WAIT_S = 2.0

_WINDOWS_PROGRAMS = frozenset({"cmd", "cmd.exe", "powershell", "powershell.exe", "pwsh", "pwsh.exe"})
_WINDOWS_SUFFIXES = (".bat", ".cmd", ".ps1")

_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class AtomicTask:
    """One command of a task; timeout_seconds 0 means no limit."""

    atomic_task_id: int
    command: str
    timeout_seconds: int


@dataclass
class Script:
    """A script written to `store_dir/name` (mode 0755, owned by the run-as user) before any command runs."""

    name: str
    store_dir: str
    content: str


@dataclass
class ItemUpdate:
    """The state of one atomic task when it changed, with the output produced since the previous update."""

    atomic_task_id: int
    status: int
    error_code: int
    error_msg: str = ""
    start_time_ms: int = 0
    end_time_ms: int = 0
    exit_code: int | None = None
    output_chunk: bytes = b""
    truncated: bool = False

    @property
    def is_final(self) -> bool:
        """The item has ended (success, timeout, stopped, failed or agent restarted): no update follows."""
        return self.status in FINAL_STATUSES


class Busy(Unavailable):
    """The waiting queue of a pool is full: the agent refuses more work of that kind for now."""

    def __init__(self, kind: str, queue_limit: int):
        super().__init__(f"agent busy: {kind} queue is full ({queue_limit} waiting)")
        self.kind = kind
        self.queue_limit = queue_limit


def enable_child_subreaper(enabled: bool = True) -> bool:
    """Make this process the reaper of its orphaned descendants (Linux prctl); True when the kernel accepted it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class _Pool:
    """A bounded FIFO semaphore that refuses new waiters beyond queue_limit."""

    def __init__(self, kind: str, size: int, queue_limit: int):
        self.kind = kind
        self.size = size
        self.queue_limit = queue_limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot now (cancelled waiters not counted)."""
        return sum(1 for fut in self._waiters if not fut.done())

    async def acquire(self) -> None:
        """Take a slot, waiting in FIFO order behind earlier waiters; raises Busy at once when `queue_limit` callers
        already wait. A waiter cancelled just as a slot was handed to it passes the slot on."""
        if self.in_use < self.size and not self.waiting:
            self.in_use += 1
            return
        if self.waiting >= self.queue_limit:
            raise Busy(self.kind, self.queue_limit)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over: in_use already counts us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.in_use -= 1


class Pools:
    """Separate bounded concurrency pools per task kind; `async with pools.slot("script"):` runs within one."""

    DEFAULT_SIZES: Mapping[str, int] = {"script": 16, "file": 8, "proc": 8}
    DEFAULT_QUEUE_LIMIT = 256

    def __init__(self, sizes: Mapping[str, int] | None = None, queue_limits: Mapping[str, int] | None = None):
        sizes = dict(self.DEFAULT_SIZES if sizes is None else sizes)
        queue_limits = dict(queue_limits or {})
        unknown = sorted(set(queue_limits) - set(sizes))
        if unknown:
            raise ValueError(f"queue limits for unknown pool kinds: {', '.join(unknown)}")
        self._pools: dict[str, _Pool] = {}
        for kind, size in sizes.items():
            limit = queue_limits.get(kind, self.DEFAULT_QUEUE_LIMIT)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"pool {kind!r}: size must be a positive integer, got {size!r}")
            if not isinstance(limit, int) or limit < 0:
                raise ValueError(f"pool {kind!r}: queue limit must be a non-negative integer, got {limit!r}")
            self._pools[kind] = _Pool(kind, size, limit)

    def _pool(self, kind: str) -> _Pool:
        try:
            return self._pools[kind]
        except KeyError:
            raise ValueError(f"unknown pool kind {kind!r}") from None

    @contextlib.asynccontextmanager
    async def slot(self, kind: str) -> AsyncIterator[None]:
        """Hold one slot of `kind` for the block; waits in FIFO order, raises Busy at once if the queue is full."""
        pool = self._pool(kind)
        await pool.acquire()
        try:
            yield
        finally:
            pool.release()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per kind: size, in_use, waiting, queue_limit (for metrics and agent info)."""
        return {kind: {"size": p.size, "in_use": p.in_use, "waiting": p.waiting, "queue_limit": p.queue_limit}
                for kind, p in self._pools.items()}


@dataclass(frozen=True)
class _RunAs:
    """The resolved run-as user."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @classmethod
    def lookup(cls, name: str) -> _RunAs:
        """Resolve a user name through the system's user database; KeyError when it is unknown."""
        pw = pwd.getpwnam(name)
        return cls(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, groups=tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)),
                   home=pw.pw_dir or "/", shell=pw.pw_shell or "/bin/sh")

    def environment(self) -> dict[str, str]:
        """The clean login environment before the profiles: HOME, USER, LOGNAME, SHELL, PATH (root's or a user's) and
        the agent's LANG when it has one."""
        env = {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell,
               "PATH": _ROOT_PATH if self.uid == 0 else _USER_PATH}
        if "LANG" in os.environ:
            env["LANG"] = os.environ["LANG"]
        return env

    @property
    def uses_bash(self) -> bool:
        """The user's login shell is an executable bash (then bash's profile order applies)."""
        return os.path.basename(self.shell) == "bash" and os.access(self.shell, os.X_OK)

    def argv(self, command: str) -> list[str]:
        """Run `command` under /bin/sh after sourcing the login profiles the way the user's login shell would."""
        if self.uses_bash:
            return [self.shell, "-c", _BASH_LOGIN, command]
        return ["/bin/sh", "-c", _SH_LOGIN, command]

    def capture_argv(self) -> list[str]:
        """A login shell that sources the profiles like `argv` and prints the umask and the environment."""
        if self.uses_bash:
            return [self.shell, "-c", _BASH_CAPTURE]
        return ["/bin/sh", "-c", _SH_CAPTURE]

    @property
    def cwd(self) -> str:
        """The directory commands start in: the user's home, or / when it does not exist."""
        return self.home if os.path.isdir(self.home) else "/"

    def credentials(self) -> dict:
        """Popen arguments that switch to this user (in C, in the child: safe with threads)."""
        euid = os.geteuid()
        if euid == 0:
            return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}
        if euid == self.uid:
            return {}
        raise PermissionError(f"the agent does not run as root and cannot run commands as {self.name!r}")


@dataclass(frozen=True)
class LoginEnv:
    """A user's captured login environment: what commands exec with instead of sourcing the profiles."""

    env: dict[str, str]
    umask: int
    stamp: tuple             # the profile files' (path, inode, size, mtime_ns) when captured
    captured_at: float       # time.monotonic()


class LoginEnvironments:
    """Each user's login environment, captured once by a login shell and reused (see the module docstring).

    `get(run_as, wait_s)` returns the current LoginEnv of the user, capturing it when there is none, when a
    profile file changed or when it is older than `max_age_s`; None when the capture failed or is not done
    within `wait_s` (the caller sources the profiles per command then; the capture goes on for later callers).
    Concurrent callers for one user share one capture. `max_age_s` 0 turns the cache off (`get` always answers
    None)."""

    def __init__(self, max_age_s: float = 600.0, capture_timeout_s: float = 60.0):
        self.max_age_s = max_age_s
        self.capture_timeout_s = capture_timeout_s
        self._envs: dict[tuple, LoginEnv] = {}
        self._failed: dict[tuple, float] = {}
        self._inflight: dict[tuple, asyncio.Future] = {}
        self.captures = 0

    async def prewarm(self, user: str) -> None:
        """Capture `user`'s environment ahead of its first task (nothing when the user is unknown or the agent
        may not run as it)."""
        try:
            run_as = _RunAs.lookup(user)
            run_as.credentials()
        except (KeyError, PermissionError):
            return
        await self.get(run_as)

    @staticmethod
    def _key(run_as: _RunAs) -> tuple:
        return (run_as.uid, run_as.gid, run_as.groups, run_as.name, run_as.home, run_as.shell)

    async def get(self, run_as: _RunAs, wait_s: float | None = None) -> LoginEnv | None:
        """The current LoginEnv of `run_as` (see the class docstring), waiting at most `wait_s` seconds (None: until the
        capture ends); None when the cache is off, the capture failed in the last 30 s or did not finish in time."""
        if self.max_age_s <= 0:
            return None
        key = self._key(run_as)
        now = time.monotonic()
        stamp = await asyncio.to_thread(_profile_stamp, run_as.home)
        env = self._envs.get(key)
        if env is not None and env.stamp == stamp and now - env.captured_at < self.max_age_s:
            return env
        if now - self._failed.get(key, -_RETRY_FAILED_S) < _RETRY_FAILED_S:
            return None
        fut = self._inflight.get(key)
        if fut is None:
            fut = self._inflight[key] = asyncio.ensure_future(self._capture(key, run_as, stamp))
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except asyncio.TimeoutError:
            return None

    async def _capture(self, key: tuple, run_as: _RunAs, stamp: tuple) -> LoginEnv | None:
        self.captures += 1
        try:
            env, umask = await asyncio.to_thread(_capture_login, run_as, self.capture_timeout_s)
        except (OSError, ValueError, subprocess.SubprocessError, PermissionError) as exc:
            log.warning("login environment of %s not captured (profiles are sourced per command): %s",
                        run_as.name, exc)
            self._envs.pop(key, None)
            self._failed[key] = time.monotonic()
            return None
        self._failed.pop(key, None)
        captured = self._envs[key] = LoginEnv(env, umask, stamp, time.monotonic())
        return captured


def _profile_stamp(home: str) -> tuple:
    out = []
    for path in _PROFILE_FILES:
        path = home + path[1:] if path.startswith("~/") else path
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, None))
            continue
        out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
        if path == "/etc/profile.d":
            try:
                names = sorted(os.listdir(path))
            except OSError:
                names = []
            for name in names:
                try:
                    st = os.stat(os.path.join(path, name))
                except OSError:
                    continue
                out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _capture_login(run_as: _RunAs, timeout_s: float) -> tuple[dict[str, str], int]:
    """Run the user's login shell once (as the user, in a new session) and parse its umask and environment."""
    proc = subprocess.Popen(run_as.capture_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=run_as.cwd, env=run_as.environment(),
                            start_new_session=True, close_fds=True, **run_as.credentials())
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # The shell and whatever its profiles started: TERM first, so that a profile's own cleanup runs (a
        # `pyenv rehash` killed outright leaves its lock behind, and every later login waits on it), then KILL.
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise ValueError(f"the login profiles did not finish within {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise ValueError(f"the login shell exited with {proc.returncode}")
    head, sep, rest = out.partition(b"\n")
    if not sep or not head.strip().isdigit():
        raise ValueError("the login shell printed no umask")
    env = {}
    for entry in rest.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq and name and b"\n" not in name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    if "PATH" not in env or "HOME" not in env:
        raise ValueError("the login shell printed no environment")
    for name in _SHELL_OWN_VARS:
        env.pop(name, None)
    return env, int(head.strip(), 8)


def windows_only_program(command: str) -> str | None:
    """The program of `command` when it only exists on Windows (.bat/.cmd/.ps1, cmd, powershell, pwsh), else None."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for word in words:
        name, sep, _ = word.partition("=")
        if sep and name.isidentifier():
            continue  # a leading VAR=value assignment
        base = word.replace("\\", "/").rsplit("/", 1)[-1].lower()
        if base in _WINDOWS_PROGRAMS or base.endswith(_WINDOWS_SUFFIXES):
            return word
        return None
    return None


def _write_scripts(scripts: list[Script], run_as: _RunAs) -> None:
    """Write each script with mode 0755, owned by the run-as user, by the rules of `safepath`: the store dir is
    walked without following symlinks others could have planted (and made when missing), the script is written
    under a fresh O_EXCL name, given owner and mode on its descriptor and renamed into place."""
    from .safepath import UnsafePath, write_file
    chown = os.geteuid() == 0 or os.geteuid() == run_as.uid
    for script in scripts:
        name, store_dir = script.name, script.store_dir
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"invalid script name {name!r}")
        if not store_dir or not os.path.isabs(store_dir):
            raise ValueError(f"script store dir {store_dir!r} of {name!r} is not an absolute path")
        path = os.path.join(store_dir, name)
        try:
            write_file(store_dir, name, script.content.encode("utf-8"), uid=run_as.uid if chown else -1,
                       gid=run_as.gid if chown else -1, mode=0o755, create_dirs=True)
        except UnsafePath as exc:
            raise ValueError(f"writing script {path} refused: {exc}") from exc
        except OSError as exc:
            raise OSError(f"writing script {path} failed: {exc.strerror or exc}") from exc
        except UnicodeError as exc:
            raise ValueError(f"writing script {path} failed: {exc}") from exc


def _now_ms() -> int:
    return int(time.time() * 1000)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap_group(pgid: int) -> None:
    """Reap exited members of a process group that are our children (orphans, when we are a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _watch_exit(proc: subprocess.Popen) -> asyncio.Future[int]:
    """A future with the process's return code once it exited and was reaped."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        def _on_exit() -> None:
            rc = proc.poll()
            if rc is None:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not fut.done():
                fut.set_result(rc)
        loop.add_reader(pidfd, _on_exit)
    else:  # kernels before 5.3
        def _set_result(rc: int) -> None:
            if not fut.done():
                fut.set_result(rc)

        def _wait() -> None:
            rc = proc.wait()
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(_set_result, rc)
        threading.Thread(target=_wait, name=f"executor-wait-{proc.pid}", daemon=True).start()
    return fut


class _OutputReader(asyncio.Protocol):
    """Feeds a command's output pipe to its item; `closed` resolves at end of file or when the pipe is closed."""

    def __init__(self, on_data: Callable[[bytes], None]):
        self._on_data = on_data
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        """Hand the bytes to the item."""
        self._on_data(data)

    def eof_received(self) -> bool:
        """End of file: returning False lets the transport close the pipe."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The pipe is closed: resolve `closed`."""
        if not self.closed.done():
            self.closed.set_result(None)


class _Item:
    """The run state of one atomic task."""

    def __init__(self, task: AtomicTask, deps: list[int], code_page: str):
        self.task = task
        self.decoder = OutputDecoder(code_page)
        self.deps = deps
        self.status = ScriptStatus.DISPATCHED
        self.ended = asyncio.Event()
        self.start_ms = 0
        self.reported = 0
        self.truncated = False
        self.pending = bytearray()
        self.flush_timer: asyncio.TimerHandle | None = None


class TaskRun:
    """One script task on this host: writes its scripts, then runs its atomic tasks in dependency order.

    `run()` returns once every item ended; `terminate()` ends running items and those not started yet (4 / 126).
    A malformed task (cycle, unknown or duplicate id, negative timeout) ends all items failed (5 / 65535).
    Output is reported as UTF-8 converted from `code_page` (the host's; see `gse.common.screen`): whole
    characters only, undecodable bytes escaped; `max_output_bytes` bounds the converted bytes.
    """

    def __init__(self, task_id: str, user: str, scripts: list[Script], atomic_tasks: list[AtomicTask],
                 relations: dict[int, list[int]], on_update: Callable[[ItemUpdate], None],
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, kill_grace_s: float = 3.0,
                 code_page: str = "utf8", login: LoginEnvironments | None = None):
        if max_output_bytes < 0:
            raise ValueError("max_output_bytes must not be negative")
        if kill_grace_s < 0:
            raise ValueError("kill_grace_s must not be negative")
        self.task_id = task_id
        self.user = user or "root"
        self.scripts = list(scripts)
        self.atomic_tasks = list(atomic_tasks)
        self.relations = {int(k): [int(d) for d in v] for k, v in (relations or {}).items()}
        self.on_update = on_update
        self.max_output_bytes = max_output_bytes
        self.kill_grace_s = kill_grace_s
        self._items: dict[int, _Item] = {}
        for task in self.atomic_tasks:
            self._items.setdefault(task.atomic_task_id,
                                   _Item(task, self.relations.get(task.atomic_task_id, []), code_page))
        self._stop = asyncio.Event()
        self._started = False
        self.login = login if login is not None else LoginEnvironments()

    # --- public -------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the whole task; returns when every item has ended (each got a final ItemUpdate)."""
        if self._started:
            raise RuntimeError(f"task {self.task_id} already ran")
        self._started = True
        problem = self._validate()
        if problem:
            log.warning("task %s refused: %s", self.task_id, problem)
            self._end_all(ScriptStatus.FAILED, ErrorCode.FAILED, problem)
            return
        if self._stop.is_set():
            self._end_all(ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated before start")
            return
        try:
            run_as = _RunAs.lookup(self.user)
        except KeyError:
            self._end_all(ScriptStatus.FAILED, ErrorCode.USER_NOT_FOUND, f"user {self.user} not found")
            return
        try:
            credentials = run_as.credentials()
            await asyncio.to_thread(_write_scripts, self.scripts, run_as)
        except (OSError, ValueError) as exc:
            self._end_all(ScriptStatus.FAILED, ErrorCode.FAILED, str(exc))
            return
        login = await self.login.get(run_as, wait_s=_CAPTURE_WAIT_S)
        await asyncio.gather(*(self._run_item(item, run_as, credentials, login) for item in self._items.values()))

    def terminate(self) -> None:
        """End running items (process group killed, 4 / 126); items not started yet end 4 / 126 without running.

        Idempotent; call it from the event loop's thread (use `loop.call_soon_threadsafe` from elsewhere).
        """
        self._stop.set()

    # --- validation ---------------------------------------------------------------------------------------------

    def _validate(self) -> str | None:
        ids = collections.Counter(t.atomic_task_id for t in self.atomic_tasks)
        dupes = sorted(i for i, n in ids.items() if n > 1)
        if dupes:
            return f"duplicate atomic task ids: {dupes}"
        for task in self.atomic_tasks:
            if task.timeout_seconds < 0:
                return f"atomic task {task.atomic_task_id}: negative timeout {task.timeout_seconds}"
        for tid, deps in self.relations.items():
            if tid not in self._items:
                return f"relations name unknown atomic task {tid}"
            for dep in deps:
                if dep not in self._items:
                    return f"atomic task {tid} depends on unknown atomic task {dep}"
        cycle = dependency_cycle({tid: item.deps for tid, item in self._items.items()})
        if cycle:
            return f"dependency cycle among atomic tasks: {' -> '.join(map(str, cycle))}"
        return None

    # --- items --------------------------------------------------------------------------------------------------

    async def _run_item(self, item: _Item, run_as: _RunAs, credentials: dict, login: LoginEnv | None) -> None:
        if item.deps:
            deps_ended = asyncio.ensure_future(self._deps_ended(item))
            stopped = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({deps_ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                deps_ended.cancel()
                stopped.cancel()
        if self._stop.is_set():
            self._end(item, ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated before start")
            return
        for dep in item.deps:
            if self._items[dep].status != ScriptStatus.SUCCESS:
                self._end(item, ScriptStatus.FAILED, ErrorCode.FAILED, f"dependency {dep} did not succeed")
                return
        program = windows_only_program(item.task.command)
        if program:
            self._end(item, ScriptStatus.FAILED, ErrorCode.FAILED, f"not supported on this OS: {program} needs Windows")
            return
        await self._execute(item, run_as, credentials, login)

    async def _deps_ended(self, item: _Item) -> None:
        for dep in item.deps:
            await self._items[dep].ended.wait()

    async def _execute(self, item: _Item, run_as: _RunAs, credentials: dict, login: LoginEnv | None) -> None:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        if login is not None:       # the captured login environment: the command runs directly
            argv, env, extra = ["/bin/sh", "-c", item.task.command], dict(login.env), {"umask": login.umask}
        else:                       # no capture: the profiles are sourced for this command
            argv, env, extra = run_as.argv(item.task.command), run_as.environment(), {}
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd, cwd=run_as.cwd, env=env,
                start_new_session=True, close_fds=True, **credentials, **extra)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            os.close(read_fd)
            self._end(item, ScriptStatus.FAILED, ErrorCode.FAILED, f"cannot start command: {exc}")
            return
        finally:
            os.close(write_fd)
        pgid = proc.pid
        exited = _watch_exit(proc)
        item.status = ScriptStatus.RUNNING
        item.start_ms = _now_ms()
        log.info("atomic task started", extra={"atomic_task_id": item.task.atomic_task_id, "pid": proc.pid})
        self._emit(item, ScriptStatus.RUNNING, ErrorCode.RUNNING, "running")
        transport = None
        try:
            transport, reader = await loop.connect_read_pipe(
                lambda: _OutputReader(lambda data: self._on_output(item, data)), os.fdopen(read_fd, "rb", 0))
            stopped = asyncio.ensure_future(self._stop.wait())
            timeout = item.task.timeout_seconds or None
            try:
                done, _ = await asyncio.wait({exited, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            ending = None
            if exited not in done:
                ending = (ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated") if stopped in done else \
                    (ScriptStatus.TIMEOUT, ErrorCode.TIMEOUT, f"timed out after {item.task.timeout_seconds} s")
                await self._kill_group(pgid, exited)
            returncode = await exited
            _reap_group(pgid)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader.closed), _DRAIN_AFTER_EXIT_S)
        except BaseException:
            _signal_group(pgid, signal.SIGKILL)  # cancelled (agent stopping): leave nothing running
            if transport is not None:
                transport.close()
            raise
        transport.close()
        exit_code = _exit_code(returncode)
        if ending is None:
            if returncode == 0:
                ending = (ScriptStatus.SUCCESS, ErrorCode.OK, "")
            elif returncode < 0:
                ending = (ScriptStatus.FAILED, ErrorCode.OK, f"killed by signal {signal.Signals(-returncode).name}"
                          if -returncode in signal.valid_signals() else f"killed by signal {-returncode}")
            else:
                ending = (ScriptStatus.FAILED, ErrorCode.OK, f"exited with code {returncode}")
        self._end(item, *ending, exit_code=exit_code)

    async def _kill_group(self, pgid: int, exited: asyncio.Future[int]) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; returns once it is gone (bounded)."""
        _signal_group(pgid, signal.SIGTERM)
        if await self._group_gone(pgid, exited, self.kill_grace_s):
            return
        _signal_group(pgid, signal.SIGKILL)
        if not await self._group_gone(pgid, exited, _REAP_WAIT_S):
            log.warning("task %s: process group %d still exists after SIGKILL (unreaped zombies?)", self.task_id, pgid)

    @staticmethod
    async def _group_gone(pgid: int, exited: asyncio.Future[int], within: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if exited.done():  # only once the leader is reaped: waitpid(-pgid) must not steal it from Popen
                _reap_group(pgid)
                if not _group_exists(pgid):
                    return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(_POLL_S, remaining))

    # --- output and updates -------------------------------------------------------------------------------------

    def _on_output(self, item: _Item, data: bytes, final: bool = False) -> None:
        if item.truncated or item.status != ScriptStatus.RUNNING:
            return  # beyond the bound: keep draining the pipe, drop the bytes
        data = item.decoder.feed(data, final)
        room = self.max_output_bytes - item.reported
        if len(data) > room:
            while room > 0 and (data[room] & 0xC0) == 0x80:      # cut between characters, never inside one
                room -= 1
            item.pending += data[:room]
            item.reported += room
            item.truncated = True
            item.pending += f"\n[output truncated at {self.max_output_bytes} bytes]\n".encode()
        else:
            item.pending += data
            item.reported += len(data)
        if final:
            return
        if len(item.pending) >= _FLUSH_BYTES or item.truncated:
            self._flush(item)
        elif item.flush_timer is None:
            item.flush_timer = asyncio.get_running_loop().call_later(_FLUSH_INTERVAL_S, self._flush, item)

    def _flush(self, item: _Item) -> None:
        if item.flush_timer is not None:
            item.flush_timer.cancel()
            item.flush_timer = None
        if item.pending and item.status == ScriptStatus.RUNNING:
            self._emit(item, ScriptStatus.RUNNING, ErrorCode.RUNNING, "running")

    def _emit(self, item: _Item, status: int, error_code: int, error_msg: str,
              end_ms: int = 0, exit_code: int | None = None) -> None:
        chunk = bytes(item.pending)
        item.pending.clear()
        update = ItemUpdate(atomic_task_id=item.task.atomic_task_id, status=status, error_code=error_code,
                            error_msg=error_msg, start_time_ms=item.start_ms, end_time_ms=end_ms,
                            exit_code=exit_code, output_chunk=chunk, truncated=item.truncated)
        try:
            self.on_update(update)
        except Exception:
            log.exception("task %s: on_update failed for atomic task %d", self.task_id, item.task.atomic_task_id)

    def _end(self, item: _Item, status: int, error_code: int, error_msg: str, exit_code: int | None = None) -> None:
        if item.flush_timer is not None:
            item.flush_timer.cancel()
            item.flush_timer = None
        if item.status == ScriptStatus.RUNNING:
            self._on_output(item, b"", final=True)     # a character left unfinished at the end: its bytes, escaped
        end_ms = _now_ms()
        if not item.start_ms:
            item.start_ms = end_ms
        item.status = status
        self._emit(item, status, error_code, error_msg, end_ms=end_ms, exit_code=exit_code)
        item.ended.set()
        log.debug("task %s atomic task %d ended: status %d error %d %s", self.task_id, item.task.atomic_task_id,
                  status, error_code, error_msg)

    def _end_all(self, status: int, error_code: int, error_msg: str) -> None:
        for item in self._items.values():
            if not item.ended.is_set():
                self._end(item, status, error_code, error_msg)

"""What process supervision needs of the host: pid files, whether a pid is the process it should be, the
figures of a process tree, cgroup v2 limits, and plugin descriptors.

- **Pid files** are read without following a symlink at the last component and without blocking on a FIFO
  (the agent runs as root; a plugin's user owns the file).
- **Liveness**: a pid is the supervised process when it exists, is not a zombie (a daemon whose parent does
  not reap it stays a zombie) and, when `proc_name` is given, its name matches (the comm, the executable's
  base name, or one of the first two words of its command line: `sh /path/plugin` runs a script): a pid that
  was reused by another program after a crash is not taken for the plugin.
- **cgroup v2**: where the host has a unified hierarchy with the cpu and memory controllers, a process with
  `resource` limits is moved into `<root>/gse-procs/<namespace>.<name>` with `cpu.max` and `memory.max` set
  (the kernel enforces them; the agent reads `memory.events` and `cpu.stat` to report breaches). Plain files:
  no maintained Python library manages cgroup v2 (cgroupspy and cgroup-utils speak v1 only; the rest are
  unmaintained), and the interface is the four files written here. Where the host has no such hierarchy
  (cgroup v1, or a container without the controllers), the limits are measured and acted on instead.
- **Plugin descriptors**: `<plugin_dir>/<name>/project.yaml`, the node manager's package descriptor with
  the keys of spec section 8. A descriptor (and its directory) must belong to root (or the agent's user) and
  not be writable by group or others: whoever can write it chooses what the agent runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path

import psutil
import yaml

from gse.pb import agent_pb2 as pb

log = logging.getLogger("gse.agent.procs")

DESCRIPTOR = "project.yaml"
PLUGIN_NAMESPACE = "nodeman"        # the namespace the node manager queries its plugins in


def read_pid(path: str) -> int | None:
    """The pid written in `path`, or None (no file, not a regular file, no number)."""
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = raw.split(b"\n", 1)[0].strip()
    return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None


def _names(pid: int) -> tuple[str, list[str], str] | None:
    """(comm, first two words of the command line, state) of `pid`, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
        comm = s[s.index(b"(") + 1:s.rindex(b")")].decode("utf-8", "replace")
        state = s[s.rindex(b")") + 2:s.rindex(b")") + 3].decode()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [os.path.basename(a.decode("utf-8", "replace")) for a in f.read().split(b"\0")[:2] if a]
        except OSError:
            argv = []
        return comm, argv, state
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None, proc_name: str = "") -> bool:
    """Whether `pid` is a live (non-zombie) process named `proc_name` (any name when it is "")."""
    if not pid:
        return False
    found = _names(pid)
    if found is None:
        return False
    comm, argv, state = found
    if state in ("Z", "X"):
        return False
    if not proc_name:
        return True
    want = os.path.basename(proc_name)
    return comm == want[:15] or want in argv or (len(want) > 15 and comm == want[:15])


def proc_alive(spec: pb.ProcSpec) -> tuple[bool, int]:
    """(alive, pid) of a registration by its pid file; pid -1 when not running."""
    pid = read_pid(spec.pid_path)
    if pid is not None and pid_alive(pid, spec.proc_name):
        return True, pid
    return False, -1


@dataclasses.dataclass
class Figures:
    """A process tree's use: cpu percent of the host (all cores = 100), memory percent and bytes, open fds."""
    cpu: float = 0.0
    mem: float = 0.0
    mem_bytes: int = 0
    fd: int = 0


class Sampler:
    """cpu/memory/fd of process trees. cpu is measured between two calls for the same pid (the first reads 0)."""

    def __init__(self):
        self._procs: dict[int, psutil.Process] = {}
        self.ncpu = psutil.cpu_count() or 1
        self.total_mem = psutil.virtual_memory().total

    def sample(self, pids: list[int]) -> dict[int, Figures]:
        """Figures of each root pid with its descendants (blocking: run it in a thread)."""
        out: dict[int, Figures] = {}
        seen: set[int] = set()
        for root in pids:
            f = Figures()
            try:
                tree = [psutil.Process(root)]
                tree += tree[0].children(recursive=True)
            except psutil.Error:
                out[root] = f
                continue
            for p in tree:
                cached = self._procs.get(p.pid)
                if cached is None or cached.create_time() != p.create_time():
                    cached = self._procs[p.pid] = p
                    p.cpu_percent(None)
                try:
                    with cached.oneshot():
                        f.cpu += cached.cpu_percent(None) / self.ncpu
                        rss = cached.memory_info().rss
                        f.mem_bytes += rss
                        f.fd += cached.num_fds()
                except psutil.Error:
                    continue
                seen.add(p.pid)
            f.mem = 100.0 * f.mem_bytes / self.total_mem if self.total_mem else 0.0
            f.cpu, f.mem = round(f.cpu, 2), round(f.mem, 2)
            out[root] = f
        for pid in [p for p in self._procs if p not in seen]:
            del self._procs[pid]
        return out


class CgroupV2:
    """Resource limits enforced by the kernel (cgroup v2), one leaf cgroup per registration under
    `<root>/gse-procs`. `available` is False where the host has no unified hierarchy with cpu and memory."""

    PERIOD_US = 100_000

    def __init__(self, root: str):
        self.root = Path(root) if root else None
        self.base = self.root / "gse-procs" if self.root else None
        self.available = False
        if self.root is None:
            return
        try:
            controllers = (self.root / "cgroup.controllers").read_text().split()
        except OSError:
            return
        self.available = {"cpu", "memory"} <= set(controllers)

    def _prepare(self) -> None:
        self.base.mkdir(mode=0o755, exist_ok=True)
        for parent in (self.root, self.base):
            enabled = (parent / "cgroup.subtree_control").read_text().split()
            missing = [c for c in ("cpu", "memory") if c not in enabled]
            if missing:
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))

    def leaf(self, namespace: str, name: str) -> Path:
        """The leaf cgroup directory of registration `namespace`/`name` under `<root>/gse-procs`: "<namespace>.<name>"
        with every character but letters, digits, '.', '_' and '-' replaced by '_'."""
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in f"{namespace}.{name}")
        return self.base / safe

    def apply(self, namespace: str, name: str, cpu: float, mem: float, pids: list[int], ncpu: int,
              total_mem: int) -> Path | None:
        """Put `pids` into the registration's cgroup with its limits (percent of the host; 0 = none).
        Returns the cgroup, or None when it could not be used (then limits are measured instead)."""
        if not self.available:
            return None
        try:
            self._prepare()
            leaf = self.leaf(namespace, name)
            leaf.mkdir(mode=0o755, exist_ok=True)
            quota = int(cpu / 100 * ncpu * self.PERIOD_US) if cpu > 0 else 0
            (leaf / "cpu.max").write_text(f"{max(quota, 1000)} {self.PERIOD_US}" if quota else "max")
            (leaf / "memory.max").write_text(str(int(mem / 100 * total_mem)) if mem > 0 else "max")
            for pid in pids:
                try:
                    (leaf / "cgroup.procs").write_text(str(pid))
                except OSError:
                    continue        # exited meanwhile
            return leaf
        except OSError as exc:
            log.warning("cgroup v2 not usable; limits are measured instead", extra={"error": str(exc)})
            self.available = False
            return None

    @staticmethod
    def counters(leaf: Path) -> tuple[int, int]:
        """(oom_kill + max events of memory.events, nr_throttled of cpu.stat): growing means a breach."""
        mem = thr = 0
        try:
            for line in (leaf / "memory.events").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k in ("max", "oom_kill"):
                    mem += int(v)
            for line in (leaf / "cpu.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "nr_throttled":
                    thr = int(v)
        except (OSError, ValueError):
            pass
        return mem, thr

    def remove(self, namespace: str, name: str) -> None:
        """Remove the registration's leaf cgroup when it is empty; one that still holds processes, or is gone, stays as
        it is."""
        if not self.available:
            return
        try:
            self.leaf(namespace, name).rmdir()      # only empty cgroups go; a live one stays until it is
        except OSError:
            pass


def _safe_owner(path: Path) -> str:
    """Why `path` may not be trusted as a descriptor ("" when it may)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others"
    return ""


def _pick(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


@dataclasses.dataclass
class Descriptor:
    """A plugin found in the plugin directory."""
    namespace: str
    name: str
    version: str
    spec: pb.ProcSpec
    path: str


def load_descriptor(path: Path) -> Descriptor:
    """A plugin descriptor (`<plugin_dir>/<name>/project.yaml`): ValueError naming what is wrong.

    Keys (the node manager's project.yaml, with spec section 8's names accepted too): `name` (required),
    `namespace` (default "nodeman"), `version`, `process_name`/`proc_name`, `setup_path` (default: the
    descriptor's directory; relative = relative to it), `pid_path` (default /var/run/gse/<name>.pid), `user`
    (root), `auto_type` (1), `control: {start|start_cmd, stop, restart, reload, kill, version, health}`,
    `resource: {cpu, mem}`, `monitor_policy`/`alive_monitor_policy: {start_check_secs, start_retries,
    start_interval, op_timeout, stop_check_secs, crontab_rule, health_check_secs}`."""
    for p in (path.parent, path):
        why = _safe_owner(p)
        if why:
            raise ValueError(why)
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f.read(256 * 1024))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not readable YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a mapping")
    name = str(doc.get("name") or "")
    if not name or ":" in name or "/" in name or len(name) > 128:
        raise ValueError(f"{path}: 'name' is required (no ':' or '/', at most 128 characters)")
    namespace = str(doc.get("namespace") or PLUGIN_NAMESPACE)
    if ":" in namespace:
        raise ValueError(f"{path}: 'namespace' must not hold ':'")
    control = doc.get("control") or {}
    policy = _pick(doc, "alive_monitor_policy", "monitor_policy", default={}) or {}
    resource = doc.get("resource") or {}
    if not all(isinstance(x, dict) for x in (control, policy, resource)):
        raise ValueError(f"{path}: control, monitor_policy and resource must be mappings")
    setup = str(doc.get("setup_path") or path.parent)
    if not os.path.isabs(setup):
        setup = str(path.parent / setup)
    try:
        spec = pb.ProcSpec(
            proc_name=str(_pick(doc, "process_name", "proc_name", default=name)),
            setup_path=os.path.normpath(setup),
            pid_path=str(doc.get("pid_path") or f"/var/run/gse/{name}.pid"),
            user=str(doc.get("user") or "root"),
            config_path=str(doc.get("config_path") or ""), log_path=str(doc.get("log_path") or ""),
            start_cmd=str(_pick(control, "start", "start_cmd", default="")),
            stop_cmd=str(_pick(control, "stop", "stop_cmd", default="")),
            restart_cmd=str(_pick(control, "restart", "restart_cmd", default="")),
            reload_cmd=str(_pick(control, "reload", "reload_cmd", default="")),
            kill_cmd=str(_pick(control, "kill", "kill_cmd", default="")),
            version_cmd=str(_pick(control, "version", "version_cmd", default="")),
            health_cmd=str(_pick(control, "health", "health_cmd", default="")),
            cpu=float(resource.get("cpu") or 0), mem=float(resource.get("mem") or 0),
            auto_type=int(_pick(doc, "auto_type", default=_pick(policy, "auto_type", default=1))),
            start_check_secs=int(policy.get("start_check_secs") or 0),
            stop_check_secs=int(policy.get("stop_check_secs") or 0),
            start_retries=int(policy.get("start_retries") or 0),
            start_interval=int(policy.get("start_interval") or 0),
            op_timeout=int(policy.get("op_timeout") or 0),
            crontab_rule=str(policy.get("crontab_rule") or ""),
            health_check_secs=int(policy.get("health_check_secs") or 0))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not spec.start_cmd:
        raise ValueError(f"{path}: control.start is required")
    if spec.auto_type not in (0, 1, 2):
        raise ValueError(f"{path}: auto_type must be 0, 1 or 2")
    return Descriptor(namespace, name, str(doc.get("version") or ""), spec, str(path))


def scan_plugins(plugin_dir: str) -> tuple[list[Descriptor], list[str]]:
    """Every valid descriptor under `plugin_dir`, and the problems with the others (one line each)."""
    found, problems = [], []
    base = Path(plugin_dir)
    if not plugin_dir or not base.is_dir():
        return found, problems
    for path in sorted(base.glob(f"*/{DESCRIPTOR}")):
        try:
            found.append(load_descriptor(path))
        except (ValueError, OSError) as exc:
            problems.append(str(exc))
    return found, problems

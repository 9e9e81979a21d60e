"""A tiny plugin for the process management tests: a shell daemon that writes its pid file and sleeps in a loop,
with start/stop/reload scripts in the node manager's layout (spec section 8), made in a temporary directory.

    p = make_plugin(tmp_path, "tp1")      # p.dir/bin/tp1, p.dir/start.sh, stop.sh, reload.sh; p.pid_path
    p.spec()                              # the `spec` of operate_proc_multi for it
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DAEMON = """#!/bin/sh
# {name}: a plugin that keeps running (a sleep loop) until it is told to stop.
echo $$ > {pid_path}
trap 'rm -f {pid_path}; exit 0' TERM
trap 'echo reloaded >> {dir}/reloads' USR1
{extra}
while :; do sleep 0.2; done
"""

START = """#!/bin/sh
echo start >> {dir}/starts
nohup ./bin/{name} "$@" >/dev/null 2>&1 &
echo "started {name}"
"""

STOP = """#!/bin/sh
[ -f {pid_path} ] && kill $(cat {pid_path})
echo "stopped {name}"
"""

RELOAD = """#!/bin/sh
kill -USR1 $(cat {pid_path})
echo "reloaded {name}"
"""


@dataclass
class Plugin:
    name: str
    dir: Path
    pid_path: str

    def pid(self) -> int | None:
        try:
            return int(Path(self.pid_path).read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if not pid:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def starts(self) -> int:
        try:
            return len((self.dir / "starts").read_text().splitlines())
        except OSError:
            return 0

    def kill(self) -> None:
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def spec(self, **policy) -> dict:
        return {"identity": {"index_key": "", "proc_name": self.name, "setup_path": str(self.dir),
                             "pid_path": self.pid_path, "user": "root"},
                "control": {"start_cmd": "./start.sh", "stop_cmd": "./stop.sh", "restart_cmd": "",
                            "reload_cmd": "./reload.sh", "kill_cmd": "", "version_cmd": "echo 1.2.3",
                            "health_cmd": ""},
                "resource": {"cpu": 30, "mem": 10},
                "alive_monitor_policy": {"auto_type": 1, "start_check_secs": 1, "op_timeout": 20, **policy}}


MADE: list[Plugin] = []


def kill_all() -> None:
    """SIGKILL every plugin process the tests made that still runs (whatever a failed test left behind)."""
    for p in MADE:
        if p.alive():
            p.kill()


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o755)


def make_plugin(base: Path, name: str, extra: str = "") -> Plugin:
    """The plugin `name` under `base/name` (its own pid file there). `extra`: shell lines the daemon runs
    before its loop (e.g. to hold memory)."""
    d = base / name
    (d / "bin").mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    os.chmod(d, 0o755)
    pid_path = str(d / f"{name}.pid")
    fmt = {"name": name, "pid_path": pid_path, "dir": d, "extra": extra}
    _write(d / "bin" / name, DAEMON.format(**fmt))
    _write(d / "start.sh", START.format(**fmt))
    _write(d / "stop.sh", STOP.format(**fmt))
    _write(d / "reload.sh", RELOAD.format(**fmt))
    p = Plugin(name, d, pid_path)
    MADE.append(p)
    return p


def descriptor(p: Plugin, *, start: str = "./start.sh", retries: int = 4, interval: int = 10, **extra) -> Path:
    """A project.yaml for `p` in its directory (auto-load)."""
    lines = [f"name: {p.name}", "version: 0.9.1", f"process_name: {p.name}", f"pid_path: {p.pid_path}", "user: root",
             "auto_type: 1", "control:", f"  start: {start}", "  stop: ./stop.sh", "  reload: ./reload.sh",
             "monitor_policy:", "  start_check_secs: 1", f"  start_retries: {retries}",
             f"  start_interval: {interval}", "  op_timeout: 10"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = p.dir / "project.yaml"
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    return path

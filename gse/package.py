"""`gse package agent`: the agent as a tarball a node manager can push and unpack on a host with nothing built
there: its Python runtime, the libraries it needs (compiled for this platform), scripts and a unit.

    gse-agent-<version>-linux-<machine>.tar.gz
      agent/bin/gse_agent            launcher: runs the current version; upgrade trial, roll back, watchdog
      agent/bin/gsectl               start | stop | restart | reload | status | healthz | version
      agent/etc/gse_agent.conf.tpl   the configuration with @@PLACEHOLDERS@@ to fill in (copy to gse_agent.conf)
      agent/systemd/gse-agent.service   the unit (Type=notify, KillMode=process; @@HOME@@ to fill in)
      agent/current -> versions/<version>
      agent/versions/<version>/bin/gse_agent    this version's entry point
      agent/versions/<version>/python/          the interpreter, its shared library and standard library
      agent/versions/<version>/lib/             gse and its runtime dependencies
      agent/versions/<version>/VERSION

Install: `tar xzf gse-agent-....tar.gz -C /usr/local/gse` (the home is then /usr/local/gse/agent), fill in
etc/gse_agent.conf, then `bin/gsectl start` or install the unit. The same tarball is what operate_agent
upgrades to (gse/agent/upgrade.py takes only its versions/<version>/).

The interpreter is this one (sys.base_prefix), minus what an agent never uses (tests, IDLE, tkinter,
ensurepip, the static library); the dependencies are the distributions gse requires at run time, found from
their metadata, copied with the files their records list. Nothing is downloaded or compiled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import re
import shutil
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

import gse

# What gse requires for its server daemons and the agent never imports (ZooKeeper, Redis, Kafka clients).
AGENT_UNUSED = {"kazoo", "redis", "aiokafka"}
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "pydoc_data",
               "__pycache__"}
TOP = "agent"

LAUNCHER = r'''#!/bin/sh
# gse_agent: the GSE agent's launcher (never replaced by an upgrade). Runs the version `current` points at.
# While an upgrade is on trial (upgrade.state: state=trial) it counts the new version's starts: a second start
# without a confirmation, or one after the deadline, switches `current` back to the previous version first.
# `gse_agent --upgrade-watchdog PID [ARGS]` watches a trial: if the agent PID dies or the deadline passes without
# a confirmation it rolls back and starts the previous version (systemd restarts it itself when in charge).
HOME_DIR=$(cd "$(dirname "$0")/.." && pwd -P)
STATE="$HOME_DIR/upgrade.state"

# The agent rewrites the file (renamed over whole) while the watchdog looks: each look reads it once
# (state_read) and takes every value from that one copy (state_get), never a state of one version and a
# deadline of the next.
state_read() { SNAP=$(cat "$STATE" 2>/dev/null); }
state_get() { printf '%s\n' "$SNAP" | sed -n "s/^$1=//p" | head -n 1; }

state_set() {   # key=value pairs replacing the file (written whole, then renamed)
    tmp="$HOME_DIR/.upgrade.state.$$"
    : > "$tmp" && for kv in "$@"; do echo "$kv" >> "$tmp"; done && mv -f "$tmp" "$STATE"
}

roll_back() {
    from=$(state_get from); to=$(state_get to); request=$(state_get request)
    [ -n "$from" ] && [ -d "$HOME_DIR/versions/$from" ] || return 1
    ln -sfn "versions/$from" "$HOME_DIR/.current.$$" && mv -Tf "$HOME_DIR/.current.$$" "$HOME_DIR/current"
    state_set "state=rolled_back" "from=$from" "to=$to" "request=$request"
    echo "gse_agent: upgrade to $to rolled back to $from" >&2
}

if [ "$1" = "--upgrade-watchdog" ]; then
    pid=$2; shift 2
    while state_read && [ "$(state_get state)" = "trial" ]; do
        now=$(date +%s); deadline=$(state_get deadline)
        if ! kill -0 "$pid" 2>/dev/null || [ "$now" -ge "${deadline:-0}" ]; then
            # a confirmation written since the look above wins: the new version attached in time
            state_read && [ "$(state_get state)" = "trial" ] || exit 0
            if kill -0 "$pid" 2>/dev/null; then
                kill -TERM "$pid" 2>/dev/null
                i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
                kill -KILL "$pid" 2>/dev/null
            fi
            roll_back || exit 1
            if [ -z "$INVOCATION_ID" ]; then        # not under systemd: start the previous version ourselves
                nohup "$0" "$@" >>"${GSE_AGENT_LOG:-/dev/null}" 2>&1 </dev/null &
            fi
            exit 0
        fi
        sleep 1
    done
    exit 0
fi

state_read
if [ "$(state_get state)" = "trial" ]; then
    starts=$(state_get starts); now=$(date +%s)
    if [ "${starts:-0}" -ge 1 ] || [ "$now" -ge "$(state_get deadline)" ]; then
        roll_back
    else
        state_set "state=trial" "from=$(state_get from)" "to=$(state_get to)" "deadline=$(state_get deadline)" \
            "starts=$((starts + 1))" "request=$(state_get request)"
    fi
fi
export GSE_AGENT_LAUNCHER="$HOME_DIR/bin/gse_agent"
exec "$HOME_DIR/current/bin/gse_agent" "$@"
'''

VERSION_LAUNCHER = r'''#!/bin/sh
# One version's entry point: its own interpreter and libraries (the agent takes these variables out of its
# environment once started, so commands and plugins never see them).
V=$(cd "$(dirname "$0")/.." && pwd -P)
export GSE_AGENT_HOME=$(cd "$V/../.." && pwd -P)
export PYTHONHOME="$V/python" PYTHONPATH="$V/lib" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
export LD_LIBRARY_PATH="$V/python/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$V/python/bin/@@PYTHON@@" -P -m gse.agent "$@"      # -P: never the working directory's gse
'''

GSECTL = r'''#!/bin/sh
# gsectl: start | stop | restart | reload | status | healthz | version of the GSE agent in this home.
HOME_DIR=$(cd "$(dirname "$0")/.." && pwd -P)
AGENT="$HOME_DIR/bin/gse_agent"
CONF=${GSE_AGENT_CONF:-$HOME_DIR/etc/gse_agent.conf}
LOG=${GSE_AGENT_LOG:-$HOME_DIR/gse_agent.out}
export GSE_AGENT_LOG="$LOG"             # where a rolled-back agent started by the upgrade watchdog logs too

healthy() { "$AGENT" -f "$CONF" --healthz >/dev/null 2>&1; }

case "$1" in
    start)
        if healthy; then echo "gse_agent: already running"; exit 0; fi
        nohup "$AGENT" -f "$CONF" >>"$LOG" 2>&1 </dev/null &
        i=0; while [ $i -lt 60 ]; do
            if healthy; then echo "gse_agent: started"; exit 0; fi
            sleep 0.5; i=$((i + 1))
        done
        echo "gse_agent: not healthy after 30 s (see $LOG)" >&2; exit 1 ;;
    stop) "$AGENT" -f "$CONF" --quit ;;
    restart) "$AGENT" -f "$CONF" --quit && "$0" start ;;
    reload) "$AGENT" -f "$CONF" --reload ;;
    status|healthz) "$AGENT" -f "$CONF" --healthz ;;
    version) "$AGENT" --version ;;
    *) echo "usage: gsectl start|stop|restart|reload|status|healthz|version" >&2; exit 2 ;;
esac
'''

UNIT = '''# gse-agent: the GSE agent, installed from its package (gse package agent) in @@HOME@@.
# KillMode=process: stopping or restarting the agent leaves the processes it started (tasks, plugins) running.
# The agent restarts and upgrades itself in place (same pid: systemd is told RELOADING, then READY again).
[Unit]
Description=GSE agent
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=@@HOME@@/bin/gse_agent -f @@HOME@@/etc/gse_agent.conf
ExecReload=@@HOME@@/bin/gse_agent -f @@HOME@@/etc/gse_agent.conf --reload
KillMode=process
Restart=on-failure
RestartSec=2
TimeoutStopSec=20
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
'''

CONFIG_TEMPLATE = '''# GSE agent configuration (YAML). Fill in the @@...@@ placeholders; every other key has its default.
# The full list of keys, each commented: deploy/agent.yaml of the GSE source.
data_dir: @@HOME@@/data
run_dir: @@HOME@@/run
servers: [@@SERVERS@@]          # task servers (host:port, port 48668), comma-separated
cloud_id: 0
hostid_path: /var/lib/gse/host/hostid
tls:
  ca: @@HOME@@/etc/certs/ca.crt
  cert: @@HOME@@/etc/certs/agent.crt    # made at enrollment when it does not exist yet
  key: @@HOME@@/etc/certs/agent.key
  server_name: gse-server
enroll:
  token_file: @@HOME@@/etc/enroll.token  # the one-time token the node manager gives (removed once used)
log:
  level: info
  format: json
'''


def runtime_distributions(root: str = "gse", unused: set[str] = frozenset()) -> list[md.Distribution]:
    """The distributions `root` needs at run time (its requirements without extras, recursively), leaving out
    `unused` (names of requirements of `root` itself) and what only they need."""
    from packaging.requirements import Requirement
    seen: dict[str, md.Distribution] = {}

    def walk(name: str) -> None:
        """Add the distribution `name` and, depth first, what it requires at run time (no extras) to `seen`."""
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            return
        dist = md.distribution(name)
        seen[key] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if name == root and req.name.lower() in unused:
                continue
            walk(req.name)

    walk(root)
    return [d for k, d in sorted(seen.items()) if k != root]


def _copy_stdlib(dest: Path) -> str:
    base = Path(sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable),
                 dest / "bin" / ver)
    lib = dest / "lib"
    lib.mkdir()
    libdir = Path(sysconfig.get_config_var("LIBDIR") or base / "lib")
    for so in libdir.glob("libpython*.so*"):
        shutil.copy2(so, lib / so.name, follow_symlinks=True)
    src = base / "lib" / ver

    def ignore(d, names):
        """copytree's filter: at the top of the standard library what STDLIB_SKIP names, config-* and static
        archives; below it only __pycache__."""
        skip = {n for n in names if n in STDLIB_SKIP or n.startswith("config-") or n.endswith(".a")}
        return skip if Path(d) == src else {n for n in names if n == "__pycache__"}

    shutil.copytree(src, lib / ver, ignore=ignore, symlinks=True)
    (lib / ver / "site-packages").mkdir()
    return ver


def _copy_distributions(dest: Path) -> list[str]:
    dest.mkdir(parents=True)
    names = []
    for dist in runtime_distributions(unused=AGENT_UNUSED):
        for f in dist.files or []:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            src = Path(dist.locate_file(f))
            rel = Path(f)
            if rel.is_absolute() or ".." in rel.parts or not src.is_file():
                continue        # files installed outside site-packages (scripts, data): not needed
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
        names.append(f"{dist.metadata['Name']}=={dist.version}")
    # gse itself from the source it runs from (an editable install has no file list worth copying)
    shutil.copytree(Path(gse.__file__).parent, dest / "gse", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return names


def _write_exec(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def build(out_dir: str | os.PathLike, version: str | None = None, compresslevel: int = 6) -> tuple[Path, str]:
    """Make the package in `out_dir`; returns (its path, its sha256). `version` stamps another version
    than gse.__version__ into the packaged copy (a release build; tests make two versions this way)."""
    version = version or gse.__version__
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", version):
        raise ValueError(f"version {version!r}: letters, digits and ._+- only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gse-agent-{version}-{platform.system().lower()}-{platform.machine()}.tar.gz"
    with tempfile.TemporaryDirectory(prefix="gse-package-") as tmp:
        home = Path(tmp) / TOP
        vdir = home / "versions" / version
        py = _copy_stdlib(vdir / "python")
        deps = _copy_distributions(vdir / "lib")
        init = vdir / "lib" / "gse" / "__init__.py"
        init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
        _write_exec(vdir / "bin" / "gse_agent", VERSION_LAUNCHER.replace("@@PYTHON@@", py))
        (vdir / "VERSION").write_text(version + "\n")
        (vdir / "REQUIREMENTS").write_text("\n".join(deps) + "\n")
        _write_exec(home / "bin" / "gse_agent", LAUNCHER)
        _write_exec(home / "bin" / "gsectl", GSECTL)
        (home / "etc").mkdir()
        (home / "etc" / "gse_agent.conf.tpl").write_text(CONFIG_TEMPLATE)
        (home / "systemd").mkdir()
        (home / "systemd" / "gse-agent.service").write_text(UNIT)
        os.symlink(f"versions/{version}", home / "current")
        target = out / name
        partial = out / f".{name}.partial"
        with tarfile.open(partial, "w:gz", compresslevel=compresslevel) as tar:
            tar.add(home, arcname=TOP)
        os.replace(partial, target)
    h = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return target, h.hexdigest()


def render_config(template: str, home: str, servers: list[str]) -> str:
    """The config template with its placeholders filled in (what an installer does)."""
    return template.replace("@@HOME@@", home).replace("@@SERVERS@@", ", ".join(servers))


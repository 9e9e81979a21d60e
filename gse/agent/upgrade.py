"""Agent upgrades (operate_agent type 3, spec section 11): install beside, switch, confirm or roll back.

An installed agent lives in its home (`gse package agent` makes it; GSE_AGENT_HOME names it):

    <home>/bin/gse_agent        the launcher (never replaced by an upgrade): runs <home>/current, rolls back
    <home>/bin/gsectl           start | stop | restart | reload | status | healthz
    <home>/current -> versions/<version>
    <home>/versions/<version>/  one version: its launcher, its Python runtime and libraries, VERSION
    <home>/etc/gse_agent.conf   the configuration (shared by every version)
    <home>/upgrade.state        the upgrade in progress (key=value lines; the launcher reads it too)

The steps, each reported to the task server (OperationResult state):

1. **waiting**: the package arrives through the file path (the API server starts a transfer of it to
   `package_path`); the agent waits for it, bounded by the operation's timeout.
2. **installing**: its sha256 must be the one asked (else error 127 and nothing changes); its
   `agent/versions/<version>/` is extracted (no member may leave it) beside the running version.
3. **switching**: `upgrade.state` says `state=trial` with the version to go back to and a deadline;
   `current` is switched (a symlink renamed over, atomic); a watchdog (the launcher's `--upgrade-watchdog`,
   shell, outside any version) is started; the agent executes the launcher in its own pid.
4. The new version attaches and confirms (`state=done`; reported **done**). If it does not attach by the
   deadline, or dies before, the watchdog (or, under systemd, the launcher when systemd starts it again)
   switches `current` back and starts the old version, which reports **rolled_back**.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import tarfile
import time
from pathlib import Path

from gse import __version__
from gse.common.errors import ErrorCode
from gse.pb import agent_pb2 as pb

log = logging.getLogger("gse.agent.upgrade")

STATE = "upgrade.state"
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
KEEP_VERSIONS = 3


def home() -> Path | None:
    """The agent's home when it runs from an installed package."""
    h = os.environ.get("GSE_AGENT_HOME")
    return Path(h) if h else None


def read_state(home_dir: Path) -> dict[str, str]:
    """The `upgrade.state` file of `home_dir` as a dict of its key=value lines; {} when there is none or it cannot be
    read."""
    try:
        text = (home_dir / STATE).read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def write_state(home_dir: Path, **values) -> None:
    """Replace the state file (temporary file, fsync, rename: the launcher never sees half of it)."""
    for k, v in values.items():
        if not re.fullmatch(r"[A-Za-z0-9._+:-]*", str(v)):
            raise ValueError(f"upgrade state {k}={v!r} has characters the launcher would not take")
    tmp = home_dir / f".{STATE}.{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, home_dir / STATE)


def switch_current(home_dir: Path, version: str) -> None:
    """Point `current` at versions/<version> (atomically)."""
    tmp = home_dir / f".current.{secrets.token_hex(4)}"
    os.symlink(f"versions/{version}", tmp)
    os.replace(tmp, home_dir / "current")


def sha256_of(path: str) -> str:
    """The hex SHA-256 of the file at `path`, read in 1 MiB pieces (blocking: run it in a thread). Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_version(package: str, home_dir: Path, version: str) -> Path:
    """Extract `agent/versions/<version>/` of the package into home/versions/<version>; returns it. Refuses a
    package without it or with members leaving it (links included)."""
    prefix = f"agent/versions/{version}/"
    final = home_dir / "versions" / version
    tmp = home_dir / "versions" / f".{version}.{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(package, "r:*") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix):
                    continue
                m.name = m.name[len(prefix):]
                if not m.name:
                    continue
                members.append(m)
            if not members:
                raise ValueError(f"the package holds no {prefix}")
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "bin" / "gse_agent").exists():
            raise ValueError("the package's version has no bin/gse_agent")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(home_dir: Path, keep: set[str]) -> None:
    """Remove old versions beyond the newest KEEP_VERSIONS (never one in `keep`)."""
    versions = sorted((p for p in (home_dir / "versions").iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for p in versions[KEEP_VERSIONS:]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


class Upgrader:
    """Runs one upgrade at a time for `agent` (steps 1-3 of the module docstring); step 4 is `confirm_on_attach` in the
    new version."""
    def __init__(self, agent):
        self.agent = agent
        self.busy = False

    async def run(self, op: pb.AgentOperation, result) -> None:
        """Steps 1-3 (the module's docstring); `result(op, **fields)` reports."""
        h = home()
        if h is None:
            result(op, state="failed", error_code=ErrorCode.FAILED, from_version=__version__,
                   error_msg="this agent does not run from an installed package (gse package agent): not upgraded")
            return
        if self.busy:
            result(op, state="failed", error_code=ErrorCode.FAILED, error_msg="an upgrade is already under way")
            return
        if not VERSION_RE.fullmatch(op.version) or not re.fullmatch(r"[0-9a-f]{64}", op.sha256.lower()):
            result(op, state="failed", error_code=ErrorCode.FAILED, error_msg="bad version or sha256 in the request")
            return
        if op.version == __version__:
            result(op, state="done", from_version=__version__, error_msg="already running this version")
            return
        self.busy = True
        try:
            await self._run(op, result, h)
        except Exception as exc:  # noqa: BLE001 - any failure before the switch leaves the running version as is
            log.exception("upgrade failed", extra={"version": op.version})
            result(op, state="failed", error_code=ErrorCode.FAILED, from_version=__version__,
                   error_msg=f"upgrade failed: {exc}")
        finally:
            self.busy = False

    async def _run(self, op: pb.AgentOperation, result, h: Path) -> None:
        deadline = time.monotonic() + max(10, op.timeout_seconds or 600)
        result(op, state="waiting", from_version=__version__)
        while not os.path.isfile(op.package_path):
            if time.monotonic() > deadline:
                log.warning("upgrade abandoned: the package did not arrive", extra={"path": op.package_path})
                result(op, state="failed", error_code=ErrorCode.TIMEOUT, from_version=__version__,
                       error_msg=f"the package did not arrive at {op.package_path} in time")
                return
            await asyncio.sleep(1.0)
        result(op, state="installing", from_version=__version__)
        digest = await asyncio.to_thread(sha256_of, op.package_path)
        if digest != op.sha256.lower():
            log.warning("upgrade refused: checksum mismatch", extra={"version": op.version, "sha256": digest,
                                                                      "asked": op.sha256})
            result(op, state="failed", error_code=ErrorCode.CHECKSUM, from_version=__version__,
                   error_msg=f"checksum mismatch: the package's sha256 is {digest}, {op.sha256} was asked")
            return
        await asyncio.to_thread(extract_version, op.package_path, h, op.version)
        remaining = max(10, int(deadline - time.monotonic()))
        write_state(h, state="trial", to=op.version, **{"from": __version__}, deadline=int(time.time()) + remaining,
                    starts=0, request=re.sub(r"[^A-Za-z0-9._+:-]", "", op.request_id)[:64] or "-")
        switch_current(h, op.version)
        result(op, state="switching", from_version=__version__)
        launcher = str(h / "bin" / "gse_agent")
        watchdog = await asyncio.create_subprocess_exec(
            launcher, "--upgrade-watchdog", str(os.getpid()), *self.agent_args(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        log.info("switching to the new version", extra={"version": op.version, "watchdog": watchdog.pid})
        self.agent.operations.restart(command=[launcher, *self.agent_args()])

    @staticmethod
    def agent_args() -> list[str]:
        """The agent's own command-line arguments, passed again to the launcher and the watchdog."""
        import sys
        return sys.argv[1:]


def confirm_on_attach(agent) -> None:
    """Called once the agent attached: a trial of this version is confirmed (done); a rollback to it is
    reported. Nothing when no upgrade is in progress."""
    h = home()
    if h is None:
        return
    st = read_state(h)
    state = st.get("state")
    if state == "trial" and st.get("to") == __version__:
        write_state(h, state="done", to=st["to"], **{"from": st.get("from", "")}, request=st.get("request", "-"))
        agent.send(pb.AgentFrame(operation_result=pb.OperationResult(
            op=3, request_id=st.get("request", ""), state="done", version=__version__,
            from_version=st.get("from", ""))))
        log.info("upgrade confirmed", extra={"version": __version__, "from": st.get("from")})
        try:
            prune(h, {__version__, st.get("from", "")})
        except OSError:
            pass
    elif state == "rolled_back":
        write_state(h, state="reported", to=st.get("to", ""), **{"from": st.get("from", "")})
        agent.send(pb.AgentFrame(operation_result=pb.OperationResult(
            op=3, request_id=st.get("request", ""), state="rolled_back", version=__version__,
            from_version=st.get("from", ""), error_code=ErrorCode.FAILED,
            error_msg=f"version {st.get('to')} did not attach in time; back on {__version__}")))
        log.warning("upgrade rolled back", extra={"version": st.get("to"), "back_on": __version__})

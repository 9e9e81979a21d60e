"""Agent operations end to end (spec section 11), on an agent installed from its package (gse package agent)
into a temporary root: the package unpacks and starts with its own runtime and attaches; the command line
node managers call (--version, --healthz, --register, --reload, --quit; gsectl); operate_agent restart (same
pid, new start, a running task reported as status 6), reload (configuration re-read, link kept) and upgrade
(the package through the file path, checksum-verified, status 5 meanwhile, switched and confirmed; a package
whose agent dies or never attaches rolled back by itself; a wrong checksum refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import api_for

from gse import package
from gse.devcluster import free_port, wait_for

pytestmark = pytest.mark.timeout(240)

V1 = "1.0.0"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """The agent package (stamped V1), built once for the module."""
    out = tmp_path_factory.mktemp("pkg")
    path, sha = package.build(out, V1, compresslevel=1)
    return path, sha


class Installed:
    """An agent installed from the package into `root` (the home is root/agent), configured for cluster c."""

    def __init__(self, c, pkg_path: Path, root: Path):
        self.c = c
        with tarfile.open(pkg_path) as tar:
            tar.extractall(root, filter="tar")
        self.home = root / "agent"
        self.conf = self.home / "etc" / "gse_agent.conf"
        text = package.render_config((self.home / "etc" / "gse_agent.conf.tpl").read_text(), str(self.home),
                                     [p.info["address"] for p in c.taskservers])
        self.agent_id = os.urandom(16).hex()
        (self.home / "etc" / "certs").mkdir(mode=0o700)
        c.ca.issue_files(self.home / "etc" / "certs", "agent", "agent", agent_id=self.agent_id, sync=False)
        shutil.copy(c.certs_dir / "ca.crt", self.home / "etc" / "certs" / "ca.crt")
        self.metrics_port = free_port()
        text = text.replace("hostid_path: /var/lib/gse/host/hostid", f"hostid_path: {self.home}/host/hostid")
        text = text.replace("  format: json", "  format: text")
        text += (f"ip: 127.0.0.{200 + os.getpid() % 50}\nheartbeat_interval_s: 1.0\nmetrics:\n  host: 127.0.0.1\n"
                 f"  port: {self.metrics_port}\nreconnect:\n  base_s: 0.3\n  max_s: 2.0\n")
        self.conf.write_text(text)

    def cli(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.home / "bin" / "gse_agent"), "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, (done.stdout, done.stderr)
        return done

    def gsectl(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.home / "bin" / "gsectl"), *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "GSE_AGENT_LOG": str(self.home / "agent.log")})

    def pid(self) -> int | None:
        try:
            pid = int((self.home / "run" / "gse_agent.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            return (self.home / "agent.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self) -> None:
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGKILL)


def version_tarball(inst: Installed, version: str, out: Path, patch=None) -> tuple[Path, str]:
    """An upgrade package of another version: the installed version's tree restamped (and `patch`ed)."""
    src = inst.home / "versions" / V1
    stage = out / f"stage-{version}"
    dst = stage / "agent" / "versions" / version
    shutil.copytree(src, dst, symlinks=True)
    init = dst / "lib" / "gse" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
    (dst / "VERSION").write_text(version + "\n")
    if patch is not None:
        patch(dst)
    path = out / f"gse-agent-{version}.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(stage / "agent", arcname="agent")
    shutil.rmtree(stage)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def oc(request, make_cluster, tmp_path, pkg):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_fileserver()
    c.start_apiserver(agent_upgrade_dir=str(tmp_path / "upgrade"))
    source = c.start_agent()            # the node manager's host that holds packages
    inst = Installed(c, pkg[0], tmp_path / "root")
    started = inst.gsectl("start")
    try:
        assert started.returncode == 0, (started.stdout, started.stderr, inst.log())
        yield c, inst, source
    finally:
        inst.gsectl("stop")
        inst.kill()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"===== the packaged agent's log =====\n{inst.log()}")


def info(api, agent_id) -> dict:
    return api.infos([agent_id])[agent_id]


def test_packaged_agent_command_line_restart_and_reload(oc, tmp_path):
    c, inst, _source = oc
    api = api_for(c)
    aid = inst.agent_id
    api.wait_alive([aid])
    first = info(api, aid)
    assert first["version"] == V1 and first["status_code"] == 2
    # The command line node managers' scripts call.
    assert inst.cli("--version").stdout.strip() == V1
    assert inst.cli("--register").stdout == aid + "\n"
    out = inst.cli("--healthz", "1").stdout
    assert out.startswith("healthz: ")
    doc = json.loads(out[len("healthz: "):])
    assert doc["ok"] is True and doc["data"]["base"] == "ok" and doc["data"]["cluster"] == "ok"
    pid = inst.pid()
    # A task running across the restart: reported as status 6 (the agent restarted).
    r = api.call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": aid, "user": "root"}],
        "atomic_tasks": [{"atomic_task_id": 0, "command": "sleep 30", "timeout_seconds": 60}]})
    task_id = r["data"]["result"]["task_id"]

    def item():
        res = api.call("/api/v2/task/get_execute_script_result", {
            "task_id": task_id, "agent_tasks": [{"bk_agent_id": aid, "atomic_tasks": [{"atomic_task_id": 0}]}]})
        return (res.get("data") or {}).get("result", [{}])[0]
    wait_for(lambda: item().get("status") == 1, 15, "the task running")
    r = api.call("/api/v2/cluster/operate_agent", {"type": 1, "agent_id_list": [aid, "0:10.255.0.9"]})
    assert r["code"] == 0 and r["data"]["results"] == ["0:10.255.0.9"], r
    again = wait_for(lambda: (i := info(api, aid))["start_time"] != first["start_time"] and i["status_code"] == 2
                     and i, 30, "the agent back after its restart")
    assert inst.pid() == pid and again["version"] == V1          # executed again in place
    wait_for(lambda: item().get("status") == 6, 20, "the lost task reported as status 6")
    # Reload: the configuration is read again, the link stays.
    before = info(api, aid)
    inst.conf.write_text(inst.conf.read_text().replace("level: info", "level: debug"))
    r = api.call("/api/v2/cluster/operate_agent", {"type": 2, "agent_id_list": [aid]})
    assert r["data"]["results"] == []
    wait_for(lambda: "configuration reloaded" in inst.log(), 15, "the reload")
    assert inst.pid() == pid and info(api, aid)["conn_cycle_time"] >= before["conn_cycle_time"]
    assert api.infos([aid])[aid]["start_time"] == before["start_time"]
    inst.cli("--reload")                                            # SIGHUP from the command line too
    wait_for(lambda: inst.log().count("configuration reloaded") >= 2, 15, "the command-line reload")
    # --quit stops it; gsectl starts it again.
    inst.cli("--quit")
    assert inst.pid() is None
    assert inst.gsectl("start").returncode == 0
    api.wait_alive([aid])


def test_packaged_agent_upgrades_and_rolls_back_broken_versions(oc, tmp_path):
    c, inst, source = oc
    api = api_for(c)
    aid = inst.agent_id
    api.wait_alive([aid])
    store = Path(source.info["data_dir"]).parent / "packages"
    store.mkdir()

    def register(sign, version, path, sha):
        shutil.copy(path, store / path.name)
        r = api.call("/api/v2/cluster/register_agent_package", {
            "version_sign": sign, "version": version, "file_name": path.name, "store_dir": str(store),
            "source_agent": source.info["bk_agent_id"], "sha256": sha, "size": path.stat().st_size})
        assert r["code"] == 0, r

    def upgrade(sign, timeout=60):
        r = api.call("/api/v2/cluster/operate_agent", {"type": 3, "agent_id_list": [aid],
                                                       "target_version_sign": sign, "timeout": timeout})
        assert r["code"] == 0 and r["data"]["results"] == [], r
        return r["data"]["task_id"]

    v2, v2_sha = version_tarball(inst, "1.1.0", tmp_path)
    register("agent-1.1.0", "1.1.0", v2, v2_sha)
    pid = inst.pid()
    upgrade("agent-1.1.0")
    assert api.states([aid])[aid]["status_code"] == 5                 # upgrading
    done = wait_for(lambda: (s := api.states([aid])[aid])["version"] == "1.1.0" and s["status_code"] == 2 and s,
                    90, "the agent on 1.1.0")
    assert done and inst.pid() == pid
    assert os.readlink(inst.home / "current") == "versions/1.1.0"
    assert (inst.home / "versions" / V1).is_dir()                   # installed beside, kept for going back
    assert inst.cli("--version").stdout.strip() == "1.1.0"

    # A version that dies at start: the watchdog switches back and starts 1.1.0 again.
    def crash(d: Path):
        (d / "lib" / "gse" / "agent" / "__main__.py").write_text("raise SystemExit('broken build')\n")
    v3, v3_sha = version_tarball(inst, "1.2.0", tmp_path, crash)
    register("agent-1.2.0", "1.2.0", v3, v3_sha)
    upgrade("agent-1.2.0")
    wait_for(lambda: (inst.home / "upgrade.state").exists() and "rolled_back" in (inst.home / "upgrade.state")
             .read_text() or "reported" in (inst.home / "upgrade.state").read_text(), 90, "the crash rolled back")
    back = wait_for(lambda: (s := api.states([aid])[aid])["status_code"] == 2 and s["version"] == "1.1.0" and s,
                    60, "1.1.0 running again")
    assert back and os.readlink(inst.home / "current") == "versions/1.1.0"

    # A version that starts but never attaches: rolled back once its bound passes.
    def hang(d: Path):
        (d / "lib" / "gse" / "agent" / "__main__.py").write_text("import time\ntime.sleep(3600)\n")
    v4, v4_sha = version_tarball(inst, "1.3.0", tmp_path, hang)
    register("agent-1.3.0", "1.3.0", v4, v4_sha)
    t0 = time.monotonic()
    upgrade("agent-1.3.0", timeout=15)
    wait_for(lambda: os.readlink(inst.home / "current") == "versions/1.3.0", 60, "the switch to 1.3.0")
    wait_for(lambda: (s := api.states([aid])[aid])["status_code"] == 2 and s["version"] == "1.1.0"
             and os.readlink(inst.home / "current") == "versions/1.1.0", 90, "1.1.0 back after the bound")
    assert time.monotonic() - t0 >= 10

    # A package whose checksum is not the one registered: refused, nothing switched.
    register("agent-bad-sum", "1.4.0", v2, "0" * 64)
    upgrade("agent-bad-sum", timeout=30)
    wait_for(lambda: api.states([aid])[aid]["status_code"] == 2, 60, "the refused upgrade over")
    assert os.readlink(inst.home / "current") == "versions/1.1.0" and not (inst.home / "versions" / "1.4.0").exists()
    wait_for(lambda: "checksum mismatch" in inst.log(), 15, "the refusal in the agent's log")


def test_upgrade_watchdog_never_takes_a_confirmation_for_a_trial_without_a_deadline(tmp_path):
    """The watchdog runs beside the new version, which replaces upgrade.state (trial -> done, the deadline gone)
    while the watchdog looks: a look must see one version of the file, never `trial` from the old one and no
    deadline from the new one (that read as "deadline passed" and killed a confirmed agent). Eight watchdogs in turn
    watch while the file flips between the two versions as fast as it can be replaced; each must end (it saw the
    confirmation) with the watched process (a sleep standing in for the agent) alive and nothing rolled back."""
    home = tmp_path / "agent"
    (home / "bin").mkdir(parents=True)
    for v in ("1.0.0", "1.1.0"):
        (home / "versions" / v).mkdir(parents=True)
    os.symlink("versions/1.1.0", home / "current")
    launcher = home / "bin" / "gse_agent"
    launcher.write_text(package.LAUNCHER)
    launcher.chmod(0o755)
    trial = f"state=trial\nto=1.1.0\nfrom=1.0.0\ndeadline={int(time.time()) + 3600}\nstarts=1\nrequest=r1\n"
    done = "state=done\nto=1.1.0\nfrom=1.0.0\nrequest=r1\n"
    for name, text in (("trial", trial), ("done", done)):
        (home / name).write_text(text)
    state = home / "upgrade.state"

    def put(name: str) -> None:
        shutil.copyfile(home / name, home / ".next")
        os.replace(home / ".next", state)

    watched = subprocess.Popen(["sleep", "60"])
    try:
        for _ in range(8):
            put("trial")
            # INVOCATION_ID: as under systemd, so a watchdog that wrongly rolled back starts nothing itself
            dog = subprocess.Popen([str(launcher), "--upgrade-watchdog", str(watched.pid)],
                                   env={**os.environ, "INVOCATION_ID": "test"}, stderr=subprocess.PIPE, text=True)
            end = time.monotonic() + 10.0
            while dog.poll() is None and time.monotonic() < end:
                put("done")
                put("trial")
            put("done")
            assert dog.wait(timeout=10) == 0
            assert "rolled back" not in dog.stderr.read()
            assert watched.poll() is None, "the watchdog killed an agent whose trial was confirmed"
            assert "state=done" in state.read_text() and os.readlink(home / "current") == "versions/1.1.0"
    finally:
        watched.kill()
        watched.wait()

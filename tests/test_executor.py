"""Tests of the agent's task executor: real commands on this host (run as root), short timeouts throughout."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gse.agent import executor
from gse.agent.executor import AtomicTask, Busy, ItemUpdate, Pools, Script, TaskRun
from gse.common.errors import ScriptStatus

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the executor tests run commands as other users")


@pytest.fixture(autouse=True, scope="module")
def subreaper():
    """Killed commands' orphans come back to this process so the executor can reap them (PID 1 here does not)."""
    assert executor.enable_child_subreaper(True)
    yield
    executor.enable_child_subreaper(False)


@pytest.fixture(scope="module")
def runner():
    """The user most tests run commands as: the host's root profile is not ours to run (or to kill mid-way)."""
    name = f"gsetest{secrets.token_hex(4)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    yield pwd.getpwnam(name)
    subprocess.run(["userdel", "-r", name], capture_output=True)


@pytest.fixture
def work(runner):
    """A directory the runner user owns, and that user's name."""
    path = Path(tempfile.mkdtemp(prefix="gse-executor-"))
    os.chmod(path, 0o755)
    os.chown(path, runner.pw_uid, runner.pw_gid)
    yield SimpleNamespace(path=path, user=runner.pw_name, uid=runner.pw_uid)
    shutil.rmtree(path, ignore_errors=True)


class Recorder:
    """Collects ItemUpdates with their arrival time and checks each item ends exactly once, last."""

    def __init__(self):
        self.updates: list[ItemUpdate] = []
        self.times: list[float] = []

    def __call__(self, update: ItemUpdate) -> None:
        assert isinstance(update.output_chunk, bytes)
        assert not any(u.is_final for u in self.of(update.atomic_task_id)), "update after the final one"
        self.updates.append(update)
        self.times.append(time.monotonic())

    def of(self, tid: int) -> list[ItemUpdate]:
        return [u for u in self.updates if u.atomic_task_id == tid]

    def final(self, tid: int) -> ItemUpdate:
        finals = [u for u in self.of(tid) if u.is_final]
        assert len(finals) == 1, f"atomic task {tid}: {len(finals)} final updates"
        return finals[0]

    def output(self, tid: int) -> bytes:
        return b"".join(u.output_chunk for u in self.of(tid))

    def running(self, tid: int) -> bool:
        return any(u.status == ScriptStatus.RUNNING for u in self.of(tid))


def tasks(*commands: str, timeout: int = 10) -> list[AtomicTask]:
    return [AtomicTask(i, cmd, timeout) for i, cmd in enumerate(commands, start=1)]


async def run_task(atomic_tasks, relations=None, scripts=(), *, user: str, **kwargs):
    rec = Recorder()
    run = TaskRun("task-1", user, list(scripts), atomic_tasks, relations or {}, rec, **kwargs)
    await asyncio.wait_for(run.run(), 30)
    for t in atomic_tasks:
        rec.final(t.atomic_task_id)
    return rec


async def wait_until(predicate, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- dependencies and concurrency ------------------------------------------------------------------------------


async def test_executor_runs_dependencies_in_order(work):
    log = work.path / "order"
    rec = await run_task(
        tasks(f"sleep 0.2; echo 1 >> {log}", f"echo 2 >> {log}", f"echo 3 >> {log}", f"echo 4 >> {log}"),
        relations={2: [1], 3: [2], 4: [1, 2]}, user=work.user)
    lines = log.read_text().split()
    assert lines[:2] == ["1", "2"] and sorted(lines[2:]) == ["3", "4"]
    for tid in (1, 2, 3, 4):
        final = rec.final(tid)
        assert (final.status, final.error_code, final.exit_code) == (2, 0, 0)
    assert rec.final(2).start_time_ms >= rec.final(1).end_time_ms
    assert rec.final(3).start_time_ms >= rec.final(2).end_time_ms


async def test_executor_dependency_failure_propagates(work):
    tmp_path = work.path
    rec = await run_task(
        [AtomicTask(1, "exit 3", 10), AtomicTask(2, f"touch {tmp_path}/m2", 10),
         AtomicTask(3, f"touch {tmp_path}/m3", 10),
         AtomicTask(4, f"touch {tmp_path}/m4", 10), AtomicTask(5, f"touch {tmp_path}/m5", 10),
         AtomicTask(6, "sleep 5", 1), AtomicTask(7, f"touch {tmp_path}/m7", 10)],
        relations={2: [1], 3: [2], 5: [4], 7: [6]}, kill_grace_s=0.5, user=work.user)
    ran_nonzero = rec.final(1)
    assert (ran_nonzero.status, ran_nonzero.error_code, ran_nonzero.exit_code) == (5, 0, 3)
    for tid, dep in ((2, 1), (3, 2), (7, 6)):
        final = rec.final(tid)
        assert (final.status, final.error_code, final.exit_code) == (5, 65535, None)
        assert final.error_msg == f"dependency {dep} did not succeed"
        assert not (tmp_path / f"m{tid}").exists()
        assert not any(u.status == ScriptStatus.RUNNING for u in rec.of(tid))
    assert (rec.final(6).status, rec.final(6).error_code) == (3, 120)
    assert rec.final(4).status == rec.final(5).status == 2
    assert (tmp_path / "m4").exists() and (tmp_path / "m5").exists()


async def test_executor_runs_independent_tasks_concurrently(work):
    started = time.monotonic()
    rec = await run_task(tasks("sleep 0.5", "sleep 0.5", "sleep 0.5", "sleep 0.5"), user=work.user)
    assert time.monotonic() - started < 1.3
    finals = [rec.final(tid) for tid in (1, 2, 3, 4)]
    assert all(f.status == 2 for f in finals)
    assert max(f.start_time_ms for f in finals) < min(f.end_time_ms for f in finals)


@pytest.mark.parametrize("relations, message", [
    ({1: [2], 2: [1]}, "dependency cycle"),
    ({2: [2]}, "dependency cycle"),
    ({1: [9]}, "depends on unknown atomic task 9"),
    ({7: [1]}, "unknown atomic task 7"),
])
async def test_executor_refuses_malformed_relations(tmp_path, relations, message):
    rec = await run_task(tasks(f"touch {tmp_path}/m1", f"touch {tmp_path}/m2"), relations=relations, user="root")
    for tid in (1, 2):
        final = rec.final(tid)
        assert (final.status, final.error_code) == (5, 65535)
        assert message in final.error_msg
    assert list(tmp_path.iterdir()) == []


# --- scripts and interpreters ----------------------------------------------------------------------------------


async def test_executor_writes_scripts_and_runs_them(work):
    store = work.path / "created" / "store"
    scripts = [
        Script("a.sh", str(store), '#!/bin/sh\necho "sh $1"\n'),
        Script("b.py", str(store), '#!/usr/bin/env python3\nimport sys\nprint("py", sys.argv[1])\n'),
        Script("c.pl", str(store), '#!/usr/bin/perl\nprint "perl $ARGV[0]\\n";\n'),
        Script("d.sh", str(store), "#!/bin/bash\necho \"bash ${BASH_VERSINFO[0]:+yes}\"\n"),
    ]
    rec = await run_task(tasks(f"{store}/a.sh x", f"{store}/b.py y", f"{store}/c.pl z", f"{store}/d.sh",
                               "python3 -c 'print(6 * 7)'", "perl -e 'print 1+1'"), scripts=scripts, user=work.user)
    for script in scripts:
        st = os.stat(store / script.name)
        assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == work.uid
    assert sorted(os.listdir(store)) == ["a.sh", "b.py", "c.pl", "d.sh"]  # no temp files left
    expected = {1: b"sh x\n", 2: b"py y\n", 3: b"perl z\n", 4: b"bash yes\n", 5: b"42\n", 6: b"2"}
    for tid, out in expected.items():
        assert rec.final(tid).status == 2, rec.output(tid)
        assert rec.output(tid) == out


@pytest.mark.parametrize("store_dir", ["blocker/sub", "relative/dir"])
async def test_executor_fails_all_items_when_a_script_cannot_be_written(tmp_path, store_dir):
    (tmp_path / "blocker").write_text("a file, not a directory")
    store = str(tmp_path / store_dir) if store_dir.startswith("blocker") else store_dir
    scripts = [Script("ok.sh", str(tmp_path / "fine"), "echo ok\n"), Script("x.sh", store, "echo x\n")]
    rec = await run_task(tasks(f"touch {tmp_path}/m1", f"touch {tmp_path}/m2"), scripts=scripts, user="root")
    for tid in (1, 2):
        final = rec.final(tid)
        assert (final.status, final.error_code) == (5, 65535)
        assert "x.sh" in final.error_msg
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


# --- users and the login environment ---------------------------------------------------------------------------


@pytest.fixture(params=["/bin/bash", "/bin/sh"])
def login_user(request):
    """A real user with a supplementary group and a .profile that sets a marker, removed afterwards."""
    name = f"gsetest{secrets.token_hex(4)}"
    group = f"{name}g"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    request.addfinalizer(lambda: subprocess.run(["groupdel", group], capture_output=True))
    subprocess.run(["useradd", "-m", "-s", request.param, "-G", group, name], check=True, capture_output=True)
    request.addfinalizer(lambda: subprocess.run(["userdel", "-r", name], capture_output=True))
    pw = pwd.getpwnam(name)
    marker = secrets.token_hex(8)
    profile = os.path.join(pw.pw_dir, ".profile")
    with open(profile, "w") as f:
        f.write(f'echo profile-noise\nexport GSE_PROFILE_MARKER={marker}\nexport PATH="$HOME/gsebin:$PATH"\n')
    os.chown(profile, pw.pw_uid, pw.pw_gid)
    store = tempfile.mkdtemp(prefix="gse-executor-")
    os.chmod(store, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(store, ignore_errors=True))
    return SimpleNamespace(name=name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir, shell=request.param,
                           marker=marker, extra_gid=grp.getgrnam(group).gr_gid, store=store)


def parse_env(output: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.decode().splitlines() if "=" in line)


async def test_executor_runs_as_user_with_login_environment(login_user, monkeypatch):
    monkeypatch.setenv("GSE_AGENT_ONLY", "must-not-leak")
    monkeypatch.setenv("LANG", "C.UTF-8")
    u = login_user
    script = Script("whoami.sh", u.store, '#!/bin/sh\necho "uid=$(id -u)"\necho "groups=$(id -G)"\n'
                                          'echo "cwd=$(pwd)"\nenv\n')
    rec = await run_task(tasks(f"{u.store}/whoami.sh"), scripts=[script], user=u.name)
    assert rec.final(1).status == 2, rec.output(1)
    st = os.stat(os.path.join(u.store, "whoami.sh"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (u.uid, u.gid, 0o755)
    out = rec.output(1)
    assert b"profile-noise" not in out
    env = parse_env(out)
    assert env["uid"] == str(u.uid)
    assert {str(u.gid), str(u.extra_gid)} <= set(env["groups"].split())
    assert env["cwd"] == u.home
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"]) == (u.home, u.name, u.name, u.shell)
    assert env["GSE_PROFILE_MARKER"] == u.marker
    path = env["PATH"].split(":")
    assert path[0] == f"{u.home}/gsebin" and "/usr/bin" in path and not any("sbin" in p for p in path)
    assert env["LANG"] == "C.UTF-8"
    assert "GSE_AGENT_ONLY" not in env


async def test_executor_login_environment_captured_once_and_refreshed(login_user):
    """The profiles are sourced once per user, not per command: three tasks, one capture; the environment and the
    profile's umask reach every command; a changed profile (and only that, or the age bound) means a new capture."""
    u = login_user
    profile = os.path.join(u.home, ".profile")
    with open(profile, "a") as f:
        f.write(f'umask 027\necho sourced >> {u.store}/sourced\n')
    login = executor.LoginEnvironments(max_age_s=600)

    async def env_of() -> dict[str, str]:
        rec = await run_task(tasks('echo "umask=$(umask)"; env'), user=u.name, login=login)
        assert rec.final(1).status == 2, rec.output(1)
        return parse_env(rec.output(1))

    os.chmod(u.store, 0o777)
    for _ in range(3):
        env = await env_of()
        assert env["GSE_PROFILE_MARKER"] == u.marker and env["umask"] == "0027"
        assert env["PATH"].split(":")[0] == f"{u.home}/gsebin" and "SHLVL" not in env
    assert login.captures == 1 and open(f"{u.store}/sourced").read().count("sourced") == 1
    with open(profile, "a") as f:
        f.write("export GSE_PROFILE_MARKER=changed\n")
    assert (await env_of())["GSE_PROFILE_MARKER"] == "changed" and login.captures == 2
    login.max_age_s = 0.2
    await asyncio.sleep(0.3)
    await env_of()
    assert login.captures == 3


async def test_executor_login_capture_that_fails_falls_back_to_sourcing_per_command(login_user):
    u = login_user
    with open(os.path.join(u.home, ".profile"), "a") as f:
        f.write("sleep 1\n")
    login = executor.LoginEnvironments(max_age_s=600, capture_timeout_s=0.3)
    rec = await run_task(tasks("echo mark=$GSE_PROFILE_MARKER"), user=u.name, login=login)
    assert rec.final(1).status == 2 and rec.output(1) == f"mark={u.marker}\n".encode()
    assert login.captures == 1
    await run_task(tasks("true"), user=u.name, login=login)
    assert login.captures == 1          # not retried at once: a failing capture must not double every command


async def test_executor_slow_login_capture_does_not_hold_up_tasks(login_user, monkeypatch):
    """A profile slower than the capture wait: the first task sources it itself (as before), the capture
    finishes meanwhile, and later tasks use it."""
    monkeypatch.setattr(executor, "_CAPTURE_WAIT_S", 0.2)
    u = login_user
    with open(os.path.join(u.home, ".profile"), "a") as f:
        f.write("sleep 1\n")
    login = executor.LoginEnvironments(max_age_s=600)
    t0 = time.monotonic()
    rec = await run_task(tasks("echo mark=$GSE_PROFILE_MARKER"), user=u.name, login=login)
    assert rec.output(1) == f"mark={u.marker}\n".encode() and time.monotonic() - t0 < 5
    await wait_until(lambda: not login._inflight, within=10)
    t0 = time.monotonic()
    rec = await run_task(tasks("echo mark=$GSE_PROFILE_MARKER"), user=u.name, login=login)
    assert rec.output(1) == f"mark={u.marker}\n".encode() and time.monotonic() - t0 < 0.9
    assert login.captures == 1


async def test_executor_defaults_to_root():
    rec = await run_task(tasks('echo "uid=$(id -u)"; env'), user="")
    env = parse_env(rec.output(1))
    assert env["uid"] == "0" and env["USER"] == "root" and "/usr/sbin" in env["PATH"].split(":")


async def test_executor_unknown_user_runs_nothing(tmp_path):
    name = f"gsenosuch{secrets.token_hex(4)}"
    scripts = [Script("s.sh", str(tmp_path / "store"), "echo hi\n")]
    rec = await run_task(tasks(f"touch {tmp_path}/m1", f"touch {tmp_path}/m2"), relations={2: [1]},
                         scripts=scripts, user=name)
    for tid in (1, 2):
        final = rec.final(tid)
        assert (final.status, final.error_code, final.error_msg) == (5, 122, f"user {name} not found")
        assert len(rec.of(tid)) == 1
    assert list(tmp_path.iterdir()) == []


# --- timeout, terminate ----------------------------------------------------------------------------------------


async def test_executor_timeout_kills_the_whole_process_group(work):
    tmp_path = work.path
    tree = Script("tree.sh", str(tmp_path), "#!/bin/sh\n"
                  "echo \"pgid=$(ps -o pgid= -p $$ | tr -d ' ')\"\n"
                  "sh -c 'trap \"\" TERM; sleep 30 & echo \"grandchild=$!\"; echo \"child=$$\"; wait' &\n"
                  "sleep 30\n")
    started = time.monotonic()
    rec = await run_task([AtomicTask(1, f"{tmp_path}/tree.sh", 1)], scripts=[tree], kill_grace_s=0.5, user=work.user)
    elapsed = time.monotonic() - started
    final = rec.final(1)
    assert (final.status, final.error_code) == (3, 120)
    assert 1.0 <= elapsed < 4.0
    info = parse_env(rec.output(1))
    pgid = int(info["pgid"])
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    for who in ("child", "grandchild"):
        with pytest.raises(ProcessLookupError):
            os.kill(int(info[who]), 0)


async def test_executor_terminate_mid_run(work):
    tmp_path = work.path
    rec = Recorder()
    run = TaskRun("task-t", work.user, [], [AtomicTask(1, "sleep 30", 0), AtomicTask(2, f"touch {tmp_path}/m2", 0),
                                         AtomicTask(3, "trap '' TERM; echo ready; sleep 30", 0)],
                  {2: [1]}, rec, kill_grace_s=0.3)
    runner = asyncio.create_task(run.run())
    await wait_until(lambda: rec.running(1) and rec.output(3) == b"ready\n")
    started = time.monotonic()
    run.terminate()
    await asyncio.wait_for(runner, 5)
    assert time.monotonic() - started < 3
    for tid in (1, 2, 3):
        assert (rec.final(tid).status, rec.final(tid).error_code) == (4, 126)
    assert rec.final(1).exit_code is not None and rec.final(3).exit_code == 128 + 9
    assert not rec.running(2) and rec.final(2).error_msg == "terminated before start"
    assert not (tmp_path / "m2").exists()


async def test_executor_terminate_before_run(tmp_path):
    rec = Recorder()
    run = TaskRun("task-t", "root", [Script("s.sh", str(tmp_path / "store"), "")],
                  [AtomicTask(1, f"touch {tmp_path}/m1", 0)], {}, rec)
    run.terminate()
    await asyncio.wait_for(run.run(), 5)
    assert (rec.final(1).status, rec.final(1).error_code) == (4, 126)
    assert list(tmp_path.iterdir()) == []


# --- output ----------------------------------------------------------------------------------------------------


async def test_executor_streams_output_while_running(work):
    rec = await run_task(tasks("echo a; sleep 1; echo b"), user=work.user)
    first = next(i for i, u in enumerate(rec.updates) if u.output_chunk)
    assert not rec.updates[first].is_final and rec.updates[first].output_chunk == b"a\n"
    assert rec.times[-1] - rec.times[first] > 0.5
    assert rec.output(1) == b"a\nb\n" and rec.final(1).status == 2


async def test_executor_coalesces_chatty_output(work):
    rec = await run_task(tasks('i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i+1)); done'), user=work.user)
    assert rec.output(1).count(b"\n") == 3000
    assert len(rec.updates) < 50


async def test_executor_interleaves_stdout_and_stderr(work):
    rec = await run_task(tasks("echo out1; echo err1 >&2; echo out2"), user=work.user)
    assert rec.output(1) == b"out1\nerr1\nout2\n"


async def test_executor_bounds_output(work):
    tmp_path = work.path
    rec = await run_task(tasks(f"head -c 1000000 /dev/zero | tr '\\0' x; echo done >&2; touch {tmp_path}/m1"),
                         max_output_bytes=64 * 1024, user=work.user)
    final = rec.final(1)
    assert (final.status, final.exit_code, final.truncated) == (2, 0, True)
    marker = b"\n[output truncated at 65536 bytes]\n"
    out = rec.output(1)
    assert out == b"x" * 65536 + marker
    assert (tmp_path / "m1").exists()  # the command kept running to the end


@pytest.mark.parametrize("command", [
    "C:\\scripts\\deploy.bat", "run.cmd /q", "./setup.ps1", "cmd /c dir", "CMD.EXE /c echo hi",
    "powershell -Command Get-Date", "pwsh -File x.ps1", "FOO=1 install.bat",
])
async def test_executor_refuses_windows_only_commands(command):
    rec = await run_task(tasks(command), user="root")
    final = rec.final(1)
    assert (final.status, final.error_code) == (5, 65535)
    assert "not supported on this OS" in final.error_msg
    assert rec.output(1) == b"" and len(rec.updates) == 1


async def test_executor_runs_commands_that_only_mention_windows_words(work):
    rec = await run_task(tasks("echo cmd powershell x.bat"), user=work.user)
    assert rec.final(1).status == 2 and rec.output(1) == b"cmd powershell x.bat\n"


async def test_executor_survives_a_failing_on_update(work):
    def broken(update):
        raise RuntimeError("consumer bug")
    run = TaskRun("task-b", work.user, [], tasks("echo hi"), {}, broken)
    await asyncio.wait_for(run.run(), 5)


# --- pools -----------------------------------------------------------------------------------------------------


async def test_pools_refuse_when_the_queue_is_full():
    pools = Pools(sizes={"script": 1, "file": 1}, queue_limits={"script": 1, "file": 0})
    release = asyncio.Event()
    order: list[str] = []

    async def hold(kind: str, name: str) -> None:
        async with pools.slot(kind):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("script", "first"))
    await wait_until(lambda: order == ["first"])
    second = asyncio.create_task(hold("script", "second"))
    await wait_until(lambda: pools.stats()["script"]["waiting"] == 1)
    with pytest.raises(Busy) as busy:
        async with pools.slot("script"):
            pass
    assert busy.value.kind == "script"
    file_holder = asyncio.create_task(hold("file", "file"))  # another kind has its own pool
    await wait_until(lambda: "file" in order)
    with pytest.raises(Busy):  # queue limit 0: no waiting at all
        async with pools.slot("file"):
            pass
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second, file_holder), 5)
    assert order == ["first", "file", "second"]
    assert pools.stats()["script"] == {"size": 1, "in_use": 0, "waiting": 0, "queue_limit": 1}


async def test_pools_cancelled_waiter_frees_its_queue_place():
    pools = Pools(sizes={"proc": 1}, queue_limits={"proc": 1})
    release = asyncio.Event()

    async def hold() -> None:
        async with pools.slot("proc"):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await wait_until(lambda: pools.stats()["proc"]["waiting"] == 1)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    late = asyncio.create_task(hold())  # would be Busy if the cancelled waiter still held the place
    await wait_until(lambda: pools.stats()["proc"]["waiting"] == 1)
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, late), 5)
    assert pools.stats()["proc"]["in_use"] == 0


def test_pools_reject_bad_settings():
    assert Pools().stats()["script"] == {"size": 16, "in_use": 0, "waiting": 0, "queue_limit": 256}
    with pytest.raises(ValueError):
        Pools(sizes={"script": 1}, queue_limits={"file": 1})
    with pytest.raises(ValueError):
        Pools(sizes={"script": 0})


async def test_pools_reject_unknown_kind():
    with pytest.raises(ValueError):
        async with Pools().slot("nope"):
            pass


def test_windows_only_program_detection():
    assert executor.windows_only_program("c:/x/RUN.BAT arg") == "c:/x/RUN.BAT"
    assert executor.windows_only_program("/opt/app/run.sh --cmd x") is None
    assert executor.windows_only_program("cmdline --help") is None
    assert executor.windows_only_program("") is None

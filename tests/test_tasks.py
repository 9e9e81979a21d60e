"""Task execution end to end: API -> task server -> real agents running real processes -> results."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
import uuid

import pytest
from kazoo.client import KazooClient

from conftest import ApiClient, _new_cluster, api_for, isolated, start_agents

from gse.cli import still_running
from gse.devcluster import wait_for

RUN = "/api/v2/task/async_execute_script"
RESULT = "/api/v2/task/get_execute_script_result"
TERMINATE = "/api/v2/task/async_terminate_execute_script"


@pytest.fixture(scope="module")
def user():
    """A real unprivileged user with a login profile, removed afterwards."""
    name = f"gsetask{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    home = pwd.getpwnam(name).pw_dir
    with open(f"{home}/.profile", "w") as f:
        f.write("export GSE_PROFILE_MARK=from-profile\n")
    yield name
    subprocess.run(["pkill", "-KILL", "-u", name], check=False)
    subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def tc(infra, tmp_path_factory):
    """One cluster for the tests that do not kill daemons: two task servers, three agents."""
    c = _new_cluster(tmp_path_factory.mktemp("tasks"), infra)
    c.start_dbproxy()
    c.start_taskserver()
    c.start_taskserver()
    c.start_apiserver()
    agents = start_agents(c, 3, tasks={"max_output_bytes": 65536})
    api = api_for(c)
    api.wait_alive([a.info["bk_agent_id"] for a in agents])
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tapi(tc) -> ApiClient:
    return api_for(tc)


# No task of a test still runs when the next starts; rules back as they were (conftest.Baseline).
_isolated = isolated("tc")


def ids(c) -> list[str]:
    return [a.info["bk_agent_id"] for a in c.agents]


def submit(api, agent_ids, commands, user="root", scripts=(), relations=(), timeout=30, path=RUN) -> str:
    body = {"agents": [{"bk_agent_id": a, "user": user} for a in agent_ids],
            "scripts": list(scripts),
            "atomic_tasks": [{"atomic_task_id": i, "command": c, "timeout_seconds": timeout}
                             for i, c in enumerate(commands)],
            "atomic_tasks_relations": [{"atomic_task_id": t, "atomic_task_id_idx": d} for t, d in relations]}
    r = api.call(path, body)
    assert r["code"] == 0, r
    return r["data"]["result"]["task_id"]


def results(api, task_id, agent_ids, n_atomic, path=RESULT, offset=0, limit=0) -> dict:
    body = {"task_id": task_id, "agent_tasks": [
        {"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": i, "offset": offset, "limit": limit}
                                            for i in range(n_atomic)]} for a in agent_ids]}
    return api.call(path, body)


def wait_done(api, task_id, agent_ids, n_atomic, timeout=60) -> dict[tuple[str, int], dict]:
    def done():
        r = results(api, task_id, agent_ids, n_atomic)
        return r if not still_running(r) else None
    r = wait_for(done, timeout, f"task {task_id} to finish", interval=0.1)
    return {(d["bk_agent_id"], d["atomic_task_id"]): d for d in r["data"]["result"]}


def test_dependency_order_and_failure_propagation(tc, tapi, tmp_path):
    a = ids(tc)[0]
    log = tmp_path / "order.log"
    cmds = [f"sleep 0.3; echo first >> {log}", f"echo second >> {log}", f"echo third >> {log}; exit 4",
            f"echo never >> {log}", "echo independent"]
    tid = submit(tapi, [a], cmds, relations=[(1, [0]), (2, [1]), (3, [2, 0])])
    res = wait_done(tapi, tid, [a], 5)
    assert log.read_text().split() == ["first", "second", "third"]
    assert [res[(a, i)]["status"] for i in range(5)] == [2, 2, 5, 5, 2]
    assert res[(a, 2)]["script_exit_code"] == 4 and res[(a, 2)]["error_code"] == 0
    assert res[(a, 3)]["error_code"] == 65535 and "dependency" in res[(a, 3)]["error_msg"]
    assert res[(a, 4)]["screen"] == "independent\n"
    assert res[(a, 1)]["start_time"] >= res[(a, 0)]["end_time"]


def test_scripts_written_and_run_everywhere(tc, tapi, tmp_path):
    store = str(tmp_path / "scripts")
    scripts = [{"script_name": "a.sh", "script_store_dir": store, "script_content": "#!/bin/sh\necho sh:$1\n"},
               {"script_name": "b.py", "script_store_dir": store,
                "script_content": "#!/usr/bin/env python3\nimport sys; print('py', sys.version_info[0])\n"}]
    tid = submit(tapi, ids(tc), [f"{store}/a.sh x", f"python3 {store}/b.py", f"stat -c %a {store}/a.sh"],
                 scripts=scripts)
    res = wait_done(tapi, tid, ids(tc), 3)
    for a in ids(tc):
        assert res[(a, 0)]["screen"] == "sh:x\n" and res[(a, 1)]["screen"] == "py 3\n"
        assert res[(a, 2)]["screen"] == "755\n"


def test_run_as_user_with_login_environment(tc, tapi, user):
    a = ids(tc)[1]
    tid = submit(tapi, [a], ["id -un; id -u; echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME SHELL=$SHELL; "
                             "echo MARK=$GSE_PROFILE_MARK; echo PATH=$PATH; pwd"], user=user)
    out = wait_done(tapi, tid, [a], 1)[(a, 0)]
    assert out["status"] == 2, out
    lines = out["screen"].splitlines()
    pw = pwd.getpwnam(user)
    assert lines[0] == user and lines[1] == str(pw.pw_uid)
    assert lines[2] == f"HOME={pw.pw_dir} USER={user} LOGNAME={user} SHELL=/bin/sh"
    assert lines[3] == "MARK=from-profile"
    assert lines[4].startswith("PATH=/") and lines[5] == pw.pw_dir


def test_unknown_user_runs_nothing(tc, tapi, tmp_path):
    marker = tmp_path / "ran"
    a = ids(tc)[0]
    tid = submit(tapi, [a], [f"touch {marker}"], user="no_such_user_gse")
    res = wait_done(tapi, tid, [a], 1)[(a, 0)]
    assert res["error_code"] == 122 and res["status"] == 5
    assert not marker.exists()


def test_timeout_kills_whole_tree(tc, tapi, user):
    a = ids(tc)[2]
    tag = f"gsetree{uuid.uuid4().hex[:8]}"
    cmd = (f"sh -c 'trap \"\" TERM; sleep 300; echo {tag}' & "
           f"sh -c 'sh -c \"sleep 301 # {tag}\" & wait' & "
           f"echo started; sleep 302 # {tag}")
    t0 = time.monotonic()
    tid = submit(tapi, [a], [cmd], user=user, timeout=2)
    res = wait_done(tapi, tid, [a], 1, timeout=30)[(a, 0)]
    assert res["status"] == 3 and res["error_code"] == 120
    assert time.monotonic() - t0 < 15
    assert "started" in res["screen"]
    survivors = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
    assert survivors == []


def test_terminate_mid_run(tc, tapi, user, tmp_path):
    a = ids(tc)[0]
    marker = tmp_path / "after"
    tid = submit(tapi, [a], ["echo begin; sleep 60", f"touch {marker}"], user=user, relations=[(1, [0])])
    wait_for(lambda: "begin" in results(tapi, tid, [a], 1)["data"]["result"][0]["screen"], 15, "running")
    r = tapi.call(TERMINATE, {"task_id": tid, "agents": [{"bk_agent_id": a}]})
    assert r["code"] == 0
    res = wait_done(tapi, tid, [a], 2, timeout=20)
    assert res[(a, 0)]["error_code"] == 126 and res[(a, 0)]["status"] == 4
    assert res[(a, 1)]["error_code"] == 126
    assert not marker.exists()


def test_output_streams_before_the_end_and_pages(tc, tapi):
    a = ids(tc)[1]
    tid = submit(tapi, [a], ["echo one; sleep 2; echo two"])
    seen = wait_for(lambda: (r := results(tapi, tid, [a], 1)) and r["code"] == 0 and
                    r["data"]["result"][0]["screen"] == "one\n" and r, 10, "output while running")
    assert seen["data"]["result"][0]["status"] in (0, 1) and seen["data"]["result"][0]["error_code"] == 115
    wait_done(tapi, tid, [a], 1)
    r = results(tapi, tid, [a], 1, offset=4, limit=2)["data"]["result"][0]
    assert r["screen"] == "tw"


def test_finished_item_whose_output_has_not_landed_reads_as_running(tc, tapi):
    """Results and output are written to the replicas in parallel: a reader can see the final status before
    the output. Such an item must read as running (the caller polls again), never as done with a short
    screen; and output that never lands stops holding the caller back 30 s after the item ended."""
    import asyncio

    from gse.common import dbclient as db
    from gse.common.records import TaskItem, TaskOutput
    from gse.common.tls import TLSMaterial

    a = ids(tc)[0]
    # more output than an item holds itself (INLINE_OUTPUT_MAX): it is written apart, and may land late
    tid = submit(tapi, [a], ["head -c 5000 /dev/zero | tr '\\0' x"])
    assert wait_done(tapi, tid, [a], 1)[(a, 0)]["screen"] == "x" * 5000
    d = tc.certs_dir
    tls = TLSMaterial.from_dir(d, "server")

    async def write(ops):
        client = db.DbClient(tls, [p.info["address"] for p in tc.dbproxies])
        try:
            assert all(r.ok for r in await client.execute(ops))
        finally:
            await client.close()

    asyncio.run(write([db.delete(TaskOutput.key(tid, a, 0))]))      # as if the output were still on its way
    r = results(tapi, tid, [a], 1)
    assert r["code"] == 0
    assert r["data"]["result"][0]["error_code"] == 115 and r["data"]["result"][0]["screen"] == ""
    asyncio.run(write([TaskItem.update(tid, a, 0, end_time=int(time.time() * 1000) - 60_000).op()]))
    r = results(tapi, tid, [a], 1)
    assert r["code"] == 0 and r["data"]["result"][0]["status"] == 2 and r["data"]["result"][0]["screen"] == ""


def test_short_output_kept_in_its_item_pages_like_any_other(tc, tapi):
    """An output that came whole with its final result is kept in the item itself (no TaskOutput key): it reads,
    pages by offset and limit, and counts as landed exactly like output stored apart."""
    import asyncio

    from gse.common import dbclient as db
    from gse.common.records import TaskItem, TaskOutput
    from gse.common.tls import TLSMaterial

    a = ids(tc)[0]
    tid = submit(tapi, [a], ["printf 0123456789"])
    assert wait_done(tapi, tid, [a], 1)[(a, 0)]["screen"] == "0123456789"
    r = results(tapi, tid, [a], 1, offset=3, limit=4)
    assert r["code"] == 0 and r["data"]["result"][0]["screen"] == "3456", r

    async def read():
        client = db.DbClient(TLSMaterial.from_dir(tc.certs_dir, "server"), [p.info["address"] for p in tc.dbproxies])
        try:
            return await client.execute([TaskItem.read(tid, a, 0), db.exists(TaskOutput.key(tid, a, 0))])
        finally:
            await client.close()

    item, output_key = asyncio.run(read())
    assert TaskItem.decode(item).output == b"0123456789" and output_key.integer == 0


def test_output_bound(tc, tapi):
    a = ids(tc)[2]
    tid = submit(tapi, [a], ["head -c 300000 /dev/zero | tr '\\0' x; echo; echo end"])
    res = wait_done(tapi, tid, [a], 1)[(a, 0)]
    assert res["status"] == 2 and res.get("truncated") is True
    assert 65536 <= len(res["screen"]) < 66000 and "truncated" in res["screen"][-100:]


def test_offline_target_answered_at_once(tc, tapi):
    t0 = time.monotonic()
    tid = submit(tapi, [ids(tc)[0], "0:10.254.0.9", "b" * 32], ["echo hi"])
    res = wait_done(tapi, tid, [ids(tc)[0], "0:10.254.0.9", "b" * 32], 1, timeout=10)
    assert res[("0:10.254.0.9", 0)]["error_code"] == 117 and res[("b" * 32, 0)]["error_code"] == 117
    assert res[(ids(tc)[0], 0)]["status"] == 2
    assert time.monotonic() - t0 < 5


def test_both_path_forms_and_cloud_ip_targets(tc, tapi):
    a = tc.agents[0]
    host = f"0:{a.info['ip']}"
    ext_run = "/api/v2/task/extensions/async_execute_script"
    tid = submit(tapi, [host], ["echo via-ext"], path=ext_run)
    def done():
        r = results(tapi, tid, [host], 1, path="/api/v2/task/extensions/get_execute_script_result/")
        return r if not still_running(r) else None
    r = wait_for(done, 20, "extensions path result")
    assert r["data"]["result"][0]["screen"] == "via-ext\n" and r["data"]["result"][0]["bk_agent_id"] == host


def test_one_host_named_by_id_and_as_cloud_ip_is_refused_like_a_duplicate(tc, tapi, tmp_path):
    """Decision (README, The API): the same agent twice in one task, whatever the forms, is refused (1000400,
    naming both entries) and nothing runs; the same for two users on one host."""
    a = tc.agents[2]
    marker = tmp_path / "alias-ran"
    for second_user in ("root", "nobody"):
        body = {"agents": [{"bk_agent_id": a.info["bk_agent_id"], "user": "root"},
                           {"bk_agent_id": f"0:{a.info['ip']}", "user": second_user}],
                "atomic_tasks": [{"atomic_task_id": 0, "command": f"touch {marker}", "timeout_seconds": 10}]}
        r = tapi.call(RUN, body)
        assert r["code"] == 1000400, r
        assert "'agents[1].bk_agent_id'" in r["message"] and "'agents[0].bk_agent_id'" in r["message"]
    r = tapi.call(RUN, {"agents": [{"bk_agent_id": a.info["bk_agent_id"]}, {"bk_agent_id": a.info["bk_agent_id"]}],
                        "atomic_tasks": [{"atomic_task_id": 0, "command": f"touch {marker}"}]})
    assert r["code"] == 1000400 and "listed twice" in r["message"]
    time.sleep(1.0)     # nothing was dispatched: give a wrongly dispatched task the time to show itself
    assert not marker.exists()


def test_windows_only_command_refused_clearly(tc, tapi):
    a = ids(tc)[0]
    tid = submit(tapi, [a], ["powershell -Command Get-Date", "C:\\run.bat"])
    res = wait_done(tapi, tid, [a], 2)
    for i in range(2):
        assert res[(a, i)]["status"] == 5 and "not supported" in res[(a, i)]["error_msg"]


def test_blocked_command_never_reaches_an_agent(tc, tapi, tmp_path):
    marker = tmp_path / "marker"
    body = {"agents": [{"bk_agent_id": ids(tc)[0], "user": "root"}],
            "atomic_tasks": [{"atomic_task_id": 0, "command": f"touch {marker}; false && rm -rf /"}]}
    r = tapi.call(RUN, body)
    assert r["code"] == 1000403 and "rm-root" in r["message"] and r["result"] is False
    body["atomic_tasks"][0]["command"] = f"touch {marker}"
    body["scripts"] = [{"script_name": "x.sh", "script_store_dir": str(tmp_path),
                        "script_content": "#!/bin/sh\nfalse && mkfs.ext4 /dev/sdz\n"}]
    r = tapi.call(RUN, body)
    assert r["code"] == 1000403 and "mkfs" in r["message"]
    time.sleep(0.5)
    assert not marker.exists()


def test_16_mib_script_checked_fast_while_other_callers_are_served(tc, tapi, tmp_path):
    """The issue's hostile shape (`true ` then one long line) at 16 MiB: submitted in a few seconds at most on a
    loaded machine (it took minutes), the script arrives whole, and list_agent_state callers meanwhile are
    answered promptly (the rule check and the body parsing stay off the event loop)."""
    import threading

    a = ids(tc)[0]
    content = "#!/bin/sh\ntrue " + "a" * (16 * 1024 * 1024 - 20) + "\n"
    store = str(tmp_path / "big")
    done: dict = {}

    def submit_big():
        t0 = time.monotonic()
        done["tid"] = submit(tapi, [a], [f"wc -c < {store}/big.sh"],
                             scripts=[{"script_name": "big.sh", "script_store_dir": store, "script_content": content}])
        done["s"] = time.monotonic() - t0

    th = threading.Thread(target=submit_big)
    th.start()
    lat = []
    while th.is_alive():
        t0 = time.monotonic()
        assert tapi.states([a])[a]["status_code"] == 2
        lat.append(time.monotonic() - t0)
    th.join()
    assert done["s"] < 5.0, done
    assert lat and max(lat) < 1.0, sorted(lat)[-5:]
    res = wait_done(tapi, done["tid"], [a], 1, timeout=60)[(a, 0)]
    assert res["status"] == 2 and res["screen"].strip() == str(len(content.encode()))


def test_live_warn_rule_recorded_on_every_item(tc, tapi):
    zk = KazooClient(hosts=tc.zookeeper, timeout=5)
    zk.start(10)
    try:
        path = f"{tc.zk_root}/config/command_rules"
        zk.ensure_path(path)
        zk.set(path, b'{"include_defaults": true, "rules": [{"name": "loud-echo", "pattern": "echo WARNME",'
                     b' "severity": "warn", "message": "noisy"}]}')
        def warned():
            r = tapi.call(RUN, {"agents": [{"bk_agent_id": a} for a in ids(tc)],
                                "atomic_tasks": [{"atomic_task_id": 0, "command": "echo WARNME"}]})
            return r["data"]["result"]["task_id"] if r["code"] == 0 else None
        def warned_everywhere():                 # until the rule has reached the API server
            res = wait_done(tapi, warned(), ids(tc), 1)
            return res if all("loud-echo" in d.get("warning", "") for d in res.values()) else None

        res = wait_for(warned_everywhere, 20, "the warn rule applied", interval=0.2)
        assert all("loud-echo" in d.get("warning", "") and d["status"] == 2 for d in res.values())
        zk.set(path, b'{"include_defaults": true, "rules": [{"name": "no-echo", "pattern": "echo BLOCKME",'
                     b' "severity": "block", "message": "no"}]}')
        wait_for(lambda: tapi.call(RUN, {"agents": [{"bk_agent_id": ids(tc)[0]}], "atomic_tasks": [
            {"atomic_task_id": 0, "command": "echo BLOCKME"}]})["code"] == 1000403, 10, "live block rule")
    finally:
        zk.delete(f"{tc.zk_root}/config/command_rules")
        zk.stop()
        zk.close()


def test_thousand_task_chain_accepted_and_a_long_cycle_named(tapi):
    chain = [{"atomic_task_id": i, "atomic_task_id_idx": [i - 1] * 3} for i in range(1, 1000)]
    body = {"agents": [{"bk_agent_id": "b" * 32}],
            "atomic_tasks": [{"atomic_task_id": i, "command": "true"} for i in range(1000)],
            "atomic_tasks_relations": chain}
    assert tapi.call(RUN, body)["code"] == 0
    body["atomic_tasks_relations"] = chain + [{"atomic_task_id": 0, "atomic_task_id_idx": [999]}]
    r = tapi.call(RUN, body)
    assert r["code"] == 1000400 and "cycle" in r["message"]


@pytest.mark.parametrize("body,field", [
    ({"atomic_tasks": [{"atomic_task_id": 0, "command": "true"}]}, "agents"),
    ({"agents": [{"bk_agent_id": "a" * 32}]}, "atomic_tasks"),
    ({"agents": [{"bk_agent_id": "a" * 32}], "atomic_tasks": [{"atomic_task_id": "x", "command": "true"}]},
     "atomic_tasks[0].atomic_task_id"),
    ({"agents": [{"bk_agent_id": "a" * 32}], "atomic_tasks": [{"atomic_task_id": 0}]}, "atomic_tasks[0].command"),
    ({"agents": [{"bk_agent_id": "a" * 32}], "atomic_tasks": [{"atomic_task_id": 0, "command": "true"},
                                                            {"atomic_task_id": 1, "command": "true"}],
      "atomic_tasks_relations": [{"atomic_task_id": 0, "atomic_task_id_idx": [1]},
                                 {"atomic_task_id": 1, "atomic_task_id_idx": [0]}]}, "cycle"),
    ({"agents": [{"bk_agent_id": "a" * 32}], "atomic_tasks": [{"atomic_task_id": 0, "command": "true"}],
      "scripts": [{"script_name": "../x", "script_store_dir": "/tmp", "script_content": ""}]}, "script_name"),
])
def test_malformed_task_requests(tapi, body, field):
    r = tapi.call(RUN, body)
    assert r["code"] == 1000400 and field in r["message"], r


def test_result_codes_unknown_task_is_1000115_running_items_115_under_code_0(tc, tapi):
    """Spec section 4 (correction): top-level 1000115 means only "task id not known yet"; a known task answers
    0 while its items run, each running item carrying 115."""
    r = tapi.call(RESULT, {"task_id": "GSETASK:nope", "agent_tasks": [{"bk_agent_id": "a" * 32}]})
    assert r["code"] == 1000115 and r["result"] is False and "not known" in r["message"]
    a = ids(tc)[0]
    tid = submit(tapi, [a], ["sleep 1.5", "true"])
    r = results(tapi, tid, [a], 2)
    assert r["code"] == 0 and r["result"] is True
    assert r["data"]["result"][0]["error_code"] == 115 and r["data"]["result"][0]["status"] in (0, 1)
    res = wait_done(tapi, tid, [a], 2)
    assert res[(a, 0)]["error_code"] == 0 and res[(a, 1)]["error_code"] == 0
    r = tapi.call(TERMINATE, {"task_id": "GSETASK:nope", "agents": [{"bk_agent_id": a}]})
    assert r["code"] == 1000400 and "unknown" in r["message"]
    r = tapi.call("/api/v2/task/get_transfer_file_result", {"task_id": tid})      # found by the API fuzz test
    assert r["code"] == 1000400 and "not a file transfer" in r["message"]
    r = tapi.call(TERMINATE, {"task_id": 5, "agents": []})
    assert r["code"] == 1000400 and "task_id" in r["message"]


def test_items_not_written_yet_read_as_dispatched_only_for_the_task_s_targets(tc, tapi):
    """Only the task record (naming its targets) is stored before the dispatch: a target's item its task server has
    not written yet reads as dispatched (115 under code 0); another agent, or an atomic task the task does not
    have, reads as not part of the task (the caller must not poll for it for ever)."""
    a, other = ids(tc)[:2]
    tid = submit(tapi, [a], ["sleep 2"])
    r = tapi.call(RESULT, {"task_id": tid, "agent_tasks": [
        {"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": 0}, {"atomic_task_id": 7}]},
        {"bk_agent_id": other, "atomic_tasks": [{"atomic_task_id": 0}]}]})
    assert r["code"] == 0, r
    mine, unknown_atomic, not_target = r["data"]["result"]
    assert mine["error_code"] == 115 and mine["status"] in (0, 1), mine
    for e in (unknown_atomic, not_target):
        assert e["status"] == 5 and e["error_code"] != 115 and "not part of the task" in e["error_msg"], e
    assert wait_done(tapi, tid, [a], 1)[(a, 0)]["error_code"] == 0


def test_gse_run_cli(tc, tmp_path):
    env = {**os.environ}
    args = [sys.executable, "-m", "gse.cli", "run", "--api-url", tc.api_url(), "--app-code", tc.app_code,
            "--app-secret", tc.app_secret]
    ok = subprocess.run(args + ["all", "--", "echo", "hi-from-$(hostname)"], capture_output=True, text=True,
                        timeout=60, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("| hi-from-") == 3 and "ok 3" in ok.stdout
    ip = tc.agents[1].info["ip"]
    glob = "*." + ip.rsplit(".", 1)[1]          # matches this agent's address only
    bad = subprocess.run(args + [glob, "--", "exit 7"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "ok 0, failed 1," in bad.stdout
    assert bad.stderr.strip() == f"0:{ip} ! exited with code 7"


# ---- tests that kill daemons get their own cluster ---------------------------------------------------

def test_agent_killed_mid_task_reports_restarted(make_cluster, user):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    (agent,) = start_agents(c, 1)
    a = agent.info["bk_agent_id"]
    api.wait_alive([a])
    tid = submit(api, [a], ["echo start; sleep 30", "echo quick"], user=user)
    wait_for(lambda: "start" in results(api, tid, [a], 1)["data"]["result"][0]["screen"], 15, "running")
    agent.kill()
    subprocess.run(["pkill", "-KILL", "-u", user], check=False)
    agent = c.restart(agent)
    res = wait_done(api, tid, [a], 2, timeout=30)
    assert res[(a, 0)]["status"] == 6 and res[(a, 0)]["error_code"] != 0
    assert res[(a, 1)]["status"] == 2 and res[(a, 1)]["screen"] == "quick\n"


def test_agent_gone_for_good_mid_task_reads_offline_after_the_grace(make_cluster, user):
    """An item whose agent vanished reads as running while the agent may still come back (its deadline plus
    offline_grace_s, counted from dispatch at the earliest), then as 117; never finished, never stuck."""
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver(offline_grace_s=4.0)
    api = api_for(c)
    (agent,) = start_agents(c, 1)
    a = agent.info["bk_agent_id"]
    api.wait_alive([a])
    tid = submit(api, [a], ["echo start; sleep 60"], user=user)
    t0 = time.monotonic()
    wait_for(lambda: "start" in results(api, tid, [a], 1)["data"]["result"][0]["screen"], 15, "running")
    agent.kill()
    subprocess.run(["pkill", "-KILL", "-u", user], check=False)
    killed = time.monotonic()
    first = results(api, tid, [a], 1)
    assert first["code"] == 0 and first["data"]["result"][0]["error_code"] == 115

    def offline():
        r = results(api, tid, [a], 1)["data"]["result"][0]
        return r if r["error_code"] == 117 else None
    r = wait_for(offline, 30, "the item to read as offline", interval=0.2)
    waited = time.monotonic()
    assert "offline" in r["error_msg"] and r["status"] == 5
    # not before the grace has passed since dispatch, nor before the agent's deadline plus the grace
    assert waited - t0 >= 4.0
    assert waited - killed >= 4.0 - 1.0     # its deadline was up to hb_interval x misses + 1 s after the kill


def test_result_delivered_after_reconnect_to_another_task_server(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    (agent,) = start_agents(c, 1)
    a = agent.info["bk_agent_id"]
    api.wait_alive([a])
    port = api.infos([a])[a]["parent_port"]
    holder = next(t for t in c.taskservers if t.info["address"].endswith(f":{port}"))
    tid = submit(api, [a], ["echo before; sleep 3; echo after"])
    wait_for(lambda: "before" in results(api, tid, [a], 1)["data"]["result"][0]["screen"], 15, "running")
    holder.kill()
    res = wait_done(api, tid, [a], 1, timeout=40)[(a, 0)]
    assert res["status"] == 2 and res["screen"] == "before\nafter\n"
    assert api.infos([a])[a]["parent_port"] != port


def test_a_target_list_dbproxy_cannot_read_is_an_outage_never_an_empty_task():
    """The result read falls back to the task's target list for items not written yet: when dbproxy cannot read
    it (no replica up), the call answers Unavailable and keeps nothing, so the next poll reads it again instead
    of every unwritten item reading as "not part of the task" for the task's life."""
    import asyncio
    import json as _json

    from gse.apiserver.task_endpoints import TaskEndpoints
    from gse.common.errors import Unavailable
    from gse.pb import dbproxy_pb2 as dpb

    class Db:
        def __init__(self):
            self.up = False

        async def execute(self, ops):
            if not self.up:
                return [dpb.Result(ok=False, retryable=True, error="no replica of the key is up") for _ in ops]
            return [dpb.Result(ok=True, found=True, values=[_json.dumps(["a1", "a2"]).encode()], present=[True])
                    for _ in ops]

    class View:
        db = Db()

    t = TaskEndpoints(View(), None, None, max_hosts=10, result_ttl_ms=1000, offline_grace_ms=1000)
    with pytest.raises(Unavailable):
        asyncio.run(t._target_set("GSETASK:x"))
    View.db.up = True
    assert asyncio.run(t._target_set("GSETASK:x")) == {"a1", "a2"}


def test_inline_outputs_only_whole_small_outputs_with_their_final_result():
    from gse.common.records.task import INLINE_OUTPUT_MAX
    from gse.pb import agent_pb2 as apb
    from gse.taskserver.tasks import inline_outputs

    def report(*items):
        r = apb.TaskReport()
        for tid, atomic, chunks, size, final, truncated in items:
            for off, data in chunks:
                r.outputs.add(task_id=tid, atomic_task_id=atomic, offset=off, data=data)
            r.results.add(task_id=tid, atomic_task_id=atomic, status=2, output_size=size, final=final,
                          truncated=truncated)
        return r

    big = b"x" * (INLINE_OUTPUT_MAX + 1)
    got = inline_outputs(report(
        ("t", 0, [(0, b"whole\n")], 6, True, False),                  # kept in the item
        ("t", 1, [(0, b"ab"), (2, b"cd")], 4, True, False),           # two chunks
        ("t", 2, [(0, b"run")], 3, False, False),                     # not final yet
        ("t", 3, [(4, b"tail")], 8, True, False),                     # the rest of what came before
        ("t", 4, [(0, b"cut")], 3, True, True),                       # truncated
        ("t", 5, [(0, big)], len(big), True, False),                  # too big
        ("t", 6, [], 0, True, False)))                                # no output at all
    assert got == {("t", 0): b"whole\n"}
    assert inline_outputs(apb.TaskReport()) == {}

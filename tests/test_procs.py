"""Process management end to end (spec sections 3, 8, 10): the API as the node manager and the process config
manager call it -> procmgr -> task servers -> real agents supervising real processes (tests/procplugin.py: a
shell daemon with its pid file), events and alarms read back from a real Redis route of the data path.

One cluster for the module (dbproxy, a task server, procmgr, a data server, the API, three agents); every test
uses its own process names and plugin directories, so tests do not see each other's processes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
import redis

from conftest import _new_cluster, api_for, start_agents
from procplugin import descriptor, kill_all, make_plugin
from test_data_flow import add_route, add_streamto, to_redis, wait_routes

from gse.devcluster import wait_for

pytestmark = pytest.mark.timeout(120)

V2 = "/api/v2/proc"
V1 = "/api/c/compapi/v2/gse"
NS = "nodeman"
PROCS = {"check_interval_s": 0.3, "sample_interval_s": 0.5, "resource_breach_samples": 2,
         "plugin_scan_interval_s": 1.0, "status_min_interval_s": 1.0}
DATA = {"batch_delay_ms": 5, "respread_interval_s": 1.0, "retry_delay_s": 0.3, "reconnect_max_s": 1.0,
        "connect_timeout_s": 3.0}


@pytest.fixture(scope="module")
def pc(infra, tmp_path_factory):
    c = _new_cluster(tmp_path_factory.mktemp("procs"), infra)
    try:
        c.start_dbproxy()
        c.start_taskserver(data_view_interval_s=0.5, load_report_interval_s=0.5)
        c.start_dataserver(load_report_interval_s=0.5)
        c.start_procmgr(redispatch_after_s=3.0, sweep_interval_s=0.5, offline_grace_s=3.0)
        c.start_apiserver()
        start_agents(c, 3, procs=PROCS, data=DATA)
        api_for(c).wait_alive([a.info["bk_agent_id"] for a in c.agents])
    except BaseException:
        print(c.logs(40))
        c.stop()
        raise
    yield c
    c.stop()
    kill_all()


@pytest.fixture(scope="module")
def papi(pc):
    return api_for(pc)


@pytest.fixture(scope="module")
def rds(infra):
    host, port = infra.redis[0].split(":")
    r = redis.Redis(host=host, port=int(port))
    yield r
    r.close()


@pytest.fixture(scope="module")
def routes(pc, papi):
    """Redis lists receiving DataID 1100008 (process events) and 1000 (alarms) of this cluster."""
    tag = uuid.uuid4().hex[:8]
    sid = add_streamto(papi, "redis", pc)
    keys = {"events": f"pe{tag}", "alarms": f"al{tag}"}
    add_route(papi, [to_redis(sid, keys["events"])], channel_id=1100008)
    add_route(papi, [to_redis(sid, keys["alarms"])], channel_id=1000)
    wait_routes(pc, [1100008, 1000])
    return keys


@pytest.fixture(autouse=True)
def _logs_on_failure(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "pc" in request.fixturenames:
        print(f"\n===== logs of the process cluster =====\n{request.getfixturevalue('pc').logs(60)}")


# ---- helpers ---------------------------------------------------------------------------------------

def ids(pc) -> list[str]:
    return [a.info["bk_agent_id"] for a in pc.agents[:3]]


def multi(api, name: str, op: int, agents: list[str], spec: dict | None = None, **extra) -> str:
    req = {"meta": {"namespace": NS, "name": name, "labels": {"proc_name": name, "bk_process_id": 42}},
           "op_type": op, "agent_id_list": agents, "nodeman_spec": {"process_status_id": 1}, **extra}
    if spec is not None:
        req["spec"] = spec
    r = api.call(f"{V2}/operate_proc_multi", {"proc_operate_req": [req], "no_request": True})
    assert r["code"] == 0, r
    assert isinstance(r["data"]["task_id"], str)
    return r["data"]["task_id"]


def result(api, task_id: str, v1: bool = False, timeout: float = 40.0) -> dict:
    """The task's result once every target is final (polling as clients do: 1000115 and 115 mean poll again)."""
    path = f"{V1}/get_proc_operate_result" if v1 else f"{V2}/get_proc_operate_result_v2"

    def final():
        r = api.call(path, {"task_id": task_id, "no_request": True})
        if r["code"] == 1000115:
            return None
        assert r["code"] == 0, r
        return r["data"] if all(x["error_code"] != 115 for x in r["data"].values()) else None

    data = wait_for(final, timeout, f"results of {task_id}", interval=0.1)
    for x in data.values():      # types are strict; content is JSON for every final code
        assert isinstance(x["error_code"], int) and isinstance(x["error_msg"], str)
        json.loads(x["content"])
    return data


def codes(data: dict) -> dict[str, int]:
    return {k: v["error_code"] for k, v in data.items()}


def status(api, name: str, agents: list[str]) -> dict[str, dict]:
    r = api.call(f"{V2}/get_proc_status_v2", {"meta": {"namespace": NS, "name": name, "labels": {"proc_name": name}},
                                               "agent_id_list": agents, "no_request": True})
    assert r["code"] == 0, r
    return {i["bk_agent_id"]: i for i in r["data"]["proc_infos"]}


def wait_status(api, name, agents, pred, what, timeout=20.0):
    return wait_for(lambda: (s := status(api, name, agents)) and all(pred(s[a]) for a in agents) and s,
                    timeout, what, interval=0.1)


def events(rds, key: str, name: str | None = None) -> list[dict]:
    out = []
    for raw in rds.lrange(key, 0, -1):
        doc = json.loads(raw)
        for e in doc["data"]:
            if name is None or e["dimension"]["process_index"].endswith(f":{name}"):
                out.append(e)
    return out


# ---- the lifecycle --------------------------------------------------------------------------------

def test_proc_lifecycle_v2_on_three_agents(pc, papi, tmp_path):
    agents = ids(pc)
    name = f"tp{uuid.uuid4().hex[:6]}"
    # All three agents run on this one machine: each gets its own plugin directory (own pid file), so each
    # host gets its own entry, as the node manager sends them (one entry per host).
    plugins = {a: make_plugin(tmp_path / a, name) for a in agents}
    entries = lambda op: [{"meta": {"namespace": NS, "name": name}, "op_type": op, "agent_id_list": [a],
                           "spec": plugins[a].spec()} for a in agents]

    def run(op):
        r = papi.call(f"{V2}/operate_proc_multi", {"proc_operate_req": entries(op)})
        assert r["code"] == 0, r
        return result(papi, r["data"]["task_id"])

    keys = {a: f"{a}:{NS}:{name}" for a in agents}
    # register for supervision (op 3) does not start it
    assert set(codes(run(3)).values()) == {0}
    assert not any(p.alive() for p in plugins.values())
    # start
    data = run(0)
    assert codes(data) == {keys[a]: 0 for a in agents}
    content = json.loads(data[keys[agents[0]]]["content"])
    assert len(content["value"]) == 1 and content["value"][0]["isAuto"] is True
    assert "started" in content["value"][0]["result"]
    assert all(p.alive() for p in plugins.values())
    # start again: 828 (already running)
    assert set(codes(run(0)).values()) == {828}
    # status (op 2): the content of spec section 8, live from the agent
    st = run(2)
    for a in agents:
        doc = json.loads(st[keys[a]]["content"])
        inst = doc["process"][0]["instance"][0]
        assert doc["bk_agent_id"] == a and inst["pid"] == plugins[a].pid() and inst["isAuto"] is True
    # get_proc_status_v2: cached, the pid and version the agents reported
    s = wait_status(papi, name, agents, lambda i: i["status"] == 1 and i["version"] == "1.2.3", "status cached")
    for a in agents:
        assert s[a]["pid"] == plugins[a].pid() and s[a]["isauto"] is True and s[a]["flag"] == 1
        assert s[a]["host"]["ip"] and s[a]["meta"]["name"] == name and s[a]["register_time"] > 0
    # reload: the daemon gets its reload signal (USR1: nohup leaves HUP ignored, and sh cannot trap it then)
    assert set(codes(run(8)).values()) == {0}
    wait_for(lambda: all((p.dir / "reloads").exists() for p in plugins.values()), 5, "reloads")
    # restart (no restart_cmd: stop, then start): a new pid
    before = {a: plugins[a].pid() for a in agents}
    assert set(codes(run(7)).values()) == {0}
    assert all(plugins[a].alive() and plugins[a].pid() != before[a] for a in agents)
    # stop, then stop again: 829 (not running)
    assert set(codes(run(1)).values()) == {0}
    assert not any(p.alive() for p in plugins.values())
    assert set(codes(run(1)).values()) == {829}
    s = wait_status(papi, name, agents, lambda i: i["status"] == 2 and not i["isauto"], "stopped")
    assert all(s[a]["flag"] == 2 for a in agents)
    # start, kill (op 9: SIGKILL without a kill_cmd), kill again: 829
    assert set(codes(run(0)).values()) == {0}
    assert set(codes(run(9)).values()) == {0}
    assert not any(p.alive() for p in plugins.values())
    assert set(codes(run(9)).values()) == {829}
    # unregister from supervision (op 4) and drop the definition (v1 unregister_proc_info)
    assert set(codes(run(4)).values()) == {0}
    r = papi.call(f"{V1}/unregister_proc_info", {"meta": {"namespace": NS, "name": name},
                                                   "agent_id_list": agents})
    assert r["code"] == 0 and set(codes(r["data"]).values()) == {0}, r
    wait_status(papi, name, agents, lambda i: i["status"] == 0, "unregistered")


def test_proc_lifecycle_v1_hosts_and_registration(pc, papi, tmp_path):
    """The v1 forms: register_proc_info / update_proc_info with hosts, operate_proc without a spec (the
    registered definition is used), get_proc_operate_result keyed cloud:supplier:ip:ns:name."""
    a = pc.agents[0]
    ip, aid = a.info["ip"], a.info["bk_agent_id"]
    name = f"v1{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    hosts = [{"ip": ip, "bk_cloud_id": 0, "bk_supplier_id": 0}]
    body = {"meta": {"namespace": NS, "name": name, "labels": {"proc_name": name}}, "hosts": hosts,
            "spec": {**p.spec(), "monitor_policy": p.spec()["alive_monitor_policy"]}}
    del body["spec"]["alive_monitor_policy"]
    key = f"0:0:{ip}:{NS}:{name}"
    r = papi.call(f"{V1}/register_proc_info", body)
    assert r["code"] == 0 and codes(r["data"]) == {key: 0}, r
    r = papi.call(f"{V1}/register_proc_info", body)
    assert codes(r["data"]) == {key: 850}                      # already registered
    r = papi.call(f"{V1}/update_proc_info", body)
    assert codes(r["data"]) == {key: 0}

    def op(op_type):
        r = papi.call(f"{V1}/operate_proc", {"meta": {"namespace": NS, "name": name}, "hosts": hosts,
                                              "op_type": op_type})
        assert r["code"] == 0, r
        return result(papi, r["data"]["task_id"], v1=True)

    assert codes(op(0)) == {key: 0}
    assert p.alive()
    assert codes(op(0)) == {key: 828}
    # the v2 result of the same kind of task is keyed cloud:ip:ns:name for hosts
    r = papi.call(f"{V1}/operate_proc_v2", {"meta": {"namespace": NS, "name": name}, "hosts": hosts, "op_type": 2})
    data = result(papi, r["data"]["task_id"])
    assert list(data) == [f"0:{ip}:{NS}:{name}"]
    # v1 get_proc_status with hosts: one entry per host, host present
    r = papi.call(f"{V1}/get_proc_status", {"meta": {"namespace": NS, "name": name}, "hosts": hosts})
    (info,) = r["data"]["proc_infos"]
    assert info["host"] == {"ip": ip, "bk_cloud_id": 0} and info["status"] in (1, 2)
    assert codes(op(1)) == {key: 0}
    assert not p.alive()
    r = papi.call(f"{V1}/unregister_proc_info", {"meta": {"namespace": NS, "name": name}, "hosts": hosts})
    assert codes(r["data"]) == {key: 0}
    r = papi.call(f"{V1}/unregister_proc_info", {"meta": {"namespace": NS, "name": name}, "hosts": hosts})
    assert codes(r["data"]) == {key: 829}                      # not registered
    # an operation on what is not registered anywhere: 65535 with a message
    data = op(0)
    assert data[key]["error_code"] == 65535 and "not registered" in data[key]["error_msg"]
    assert status(papi, name, [aid])[aid]["status"] == 0


# ---- supervision ----------------------------------------------------------------------------------

def test_proc_keepalive_restarts_after_sigkill(pc, papi, tmp_path, rds, routes):
    aid = pc.agents[1].info["bk_agent_id"]
    name = f"ka{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    assert codes(result(papi, multi(papi, name, 0, [aid], p.spec(start_check_secs=1)))) == {f"{aid}:{NS}:{name}": 0}
    for n in (1, 2):
        old = p.pid()
        t0 = time.monotonic()
        p.kill()
        # back within start_check_secs (1) + 2 s of the kill
        wait_for(lambda: p.alive() and p.pid() != old, 1 + 2, "the plugin back after SIGKILL", interval=0.05)
        assert time.monotonic() - t0 <= 1 + 2
        # the agent's post-check of that start is over (its event sent) before the next kill
        wait_for(lambda: len(events(rds, routes["events"], name)) >= n, 15, f"restart event {n}")
    evs = events(rds, routes["events"], name)
    assert {e["event_name"] for e in evs} == {"process_restart_success"}
    e = evs[0]
    assert e["dimension"]["bk_agent_id"] == aid and e["dimension"]["process_index"] == f"{NS}:{name}"
    assert e["target"] == f"{pc.agents[1].info['ip']}|0" and isinstance(e["timestamp"], int)
    assert codes(result(papi, multi(papi, name, 1, [aid]))) == {f"{aid}:{NS}:{name}": 0}
    # stopped through the API: no longer kept alive
    time.sleep(1.0)
    assert not p.alive()


def test_proc_agent_restart_keeps_supervision(pc, papi, tmp_path):
    idx = 2
    a = pc.agents[idx]
    aid = a.info["bk_agent_id"]
    name = f"ar{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    assert codes(result(papi, multi(papi, name, 0, [aid], p.spec()))) == {f"{aid}:{NS}:{name}": 0}
    pid = p.pid()
    a.stop()
    assert p.alive() and p.pid() == pid                   # the agent's stop leaves its processes running
    p.kill()                                              # dies while no agent watches
    pc.agents[idx] = a = pc.restart(a)
    wait_for(lambda: p.alive() and p.pid() != pid, 10, "supervision resumed after the agent restart")
    papi.wait_alive([aid])
    wait_status(papi, name, [aid], lambda i: i["status"] == 1 and i["pid"] == p.pid(), "status after restart")
    assert codes(result(papi, multi(papi, name, 1, [aid]))) == {f"{aid}:{NS}:{name}": 0}


def test_proc_supervised_plugin_keeps_running_across_operate_agent_restart(pc, papi, tmp_path):
    """cluster/operate_agent type 1: the agent executes itself again in place; what it supervises is its child
    and keeps running, supervised again by the new image (spec section 11)."""
    a = pc.agents[1]
    aid = a.info["bk_agent_id"]
    name = f"or{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    assert codes(result(papi, multi(papi, name, 0, [aid], p.spec()))) == {f"{aid}:{NS}:{name}": 0}
    pid, agent_pid = p.pid(), a.pid
    before = papi.infos([aid])[aid]["start_time"]
    r = papi.call("/api/v2/cluster/operate_agent", {"type": 1, "agent_id_list": [aid]})
    assert r["code"] == 0 and r["data"]["results"] == []
    wait_for(lambda: (i := papi.infos([aid])[aid])["start_time"] != before and i["status_code"] == 2, 30,
             "the agent back after operate_agent restart", interval=0.2)
    assert a.alive() and a.pid == agent_pid and p.alive() and p.pid() == pid
    wait_status(papi, name, [aid], lambda i: i["status"] == 1 and i["pid"] == pid, "still supervised")
    assert codes(result(papi, multi(papi, name, 1, [aid]))) == {f"{aid}:{NS}:{name}": 0}


def test_proc_one_shot_runs_once(pc, papi, tmp_path):
    aid = pc.agents[0].info["bk_agent_id"]
    name = f"os{uuid.uuid4().hex[:6]}"
    d = tmp_path / name
    d.mkdir()
    spec = {"identity": {"proc_name": name, "setup_path": str(d), "pid_path": str(d / "x.pid"), "user": "root"},
            "control": {"start_cmd": "echo ran >> runs; echo done"},
            "alive_monitor_policy": {"auto_type": 2, "start_check_secs": 1}}
    data = result(papi, multi(papi, name, 0, [aid], spec))
    assert codes(data) == {f"{aid}:{NS}:{name}": 0}
    assert "done" in json.loads(data[f"{aid}:{NS}:{name}"]["content"])["value"][0]["result"]
    time.sleep(2.0)                                        # a one-shot process that ended is not started again
    assert (d / "runs").read_text().splitlines() == ["ran"]
    spec["control"]["start_cmd"] = "exit 3"
    data = result(papi, multi(papi, name, 0, [aid], spec))
    assert data[f"{aid}:{NS}:{name}"]["error_code"] == 65535


def test_proc_scheduled_runs_at_each_time_of_its_rule(pc, papi, tmp_path):
    """auto_type 0: start puts the process on its crontab_rule (croniter's 6th field is seconds) without running it;
    start_cmd then runs at each time of the rule, one run at a time: a time that comes while a run still goes is
    skipped, not run late when that run ends. Stop takes it off the schedule."""
    aid = pc.agents[1].info["bk_agent_id"]
    name = f"cr{uuid.uuid4().hex[:6]}"
    key = f"{aid}:{NS}:{name}"
    d = tmp_path / name
    d.mkdir()
    period, length = 6, 9           # each run outlasts one period: every other time of the rule finds it running
    (d / "job.sh").write_text("#!/bin/sh\n"
                              "[ -e running ] && echo overlap >> overlaps\n"
                              "touch running\n"
                              "date +%s.%N >> begins\n"
                              f"sleep {length}\n"
                              "rm -f running\n"
                              "echo end >> ends\n")
    os.chmod(d / "job.sh", 0o755)
    spec = {"identity": {"index_key": "", "proc_name": name, "setup_path": str(d), "pid_path": str(d / "job.pid"),
                         "user": "root"},
            "control": {"start_cmd": "./job.sh", "stop_cmd": "", "restart_cmd": "", "reload_cmd": "", "kill_cmd": "",
                        "version_cmd": "", "health_cmd": ""},
            "alive_monitor_policy": {"auto_type": 0, "crontab_rule": f"* * * * * */{period}", "start_check_secs": 1,
                                     "op_timeout": 20}}
    # a rule croniter refuses is refused by the API, naming the field
    bad = json.loads(json.dumps(spec))
    bad["alive_monitor_policy"]["crontab_rule"] = "61 * * * *"
    r = papi.call(f"{V2}/operate_proc_multi", {"proc_operate_req": [
        {"meta": {"namespace": NS, "name": name}, "op_type": 0, "agent_id_list": [aid], "spec": bad}]})
    assert r["code"] == 1000400 and "crontab_rule" in r["message"], r

    # auto_type 0 without a rule: a clear per-target error, nothing scheduled
    norule = json.loads(json.dumps(spec))
    norule["alive_monitor_policy"]["crontab_rule"] = ""
    data = result(papi, multi(papi, name, 0, [aid], norule))
    assert data[key]["error_code"] == 65535 and "crontab_rule" in data[key]["error_msg"], data

    def begins() -> list[float]:
        path = d / "begins"
        return [float(x) for x in path.read_text().split()] if path.exists() else []

    t0 = time.monotonic()
    data = result(papi, multi(papi, name, 0, [aid], spec))
    assert codes(data) == {key: 0}, data
    assert time.monotonic() - t0 < length                 # start arms the schedule, it does not wait for a run
    value = json.loads(data[key]["content"])["value"][0]
    assert value["isAuto"] is True and "next run" in value["result"], value
    wait_for(lambda: len(begins()) >= 3, 5 * period + 3 * length, "three scheduled runs", interval=0.2)
    runs = begins()
    # Every run began shortly after a time of the rule (whole multiples of `period` s; 3 s leaves room for a busy
    # host): a run started as soon as the one before ended would begin length % period = 3 s after one, plus lags.
    assert all(b % period < 3.0 for b in runs), [round(b % period, 2) for b in runs]
    # the time that came during each run was skipped: runs are two periods apart
    assert all(round((b - a) / period) == 2 for a, b in zip(runs, runs[1:])), runs
    assert not (d / "overlaps").exists()                  # never two runs at once
    s = wait_status(papi, name, [aid], lambda i: i["last_start_time"] >= int(runs[1]), "last run in the status")
    assert s[aid]["isauto"] is True and s[aid]["status"] == 2       # nothing stays running between runs
    # stop: off the schedule (a run in progress ends first); nothing runs at the next time of the rule
    data = result(papi, multi(papi, name, 1, [aid]))
    assert codes(data) in ({key: 0}, {key: 829}), data    # 829: nothing was running (clients count it as success)
    n = len(begins())
    assert len((d / "ends").read_text().split()) == n     # the run going when stop came ended first
    wait_status(papi, name, [aid], lambda i: i["isauto"] is False, "off the schedule")
    time.sleep(period + 1)                                # one time of the rule passes: the window of the check
    assert len(begins()) == n and not (d / "running").exists()


def test_proc_health_cmd_failure_restarts_the_process(pc, papi, tmp_path, rds, routes):
    """health_cmd runs every health_check_secs while a supervised process runs; a failing check is a death: the
    process is taken down and started again (new pid, process_restart_success naming the health check). Once the
    check passes again the process stays up."""
    aid = pc.agents[0].info["bk_agent_id"]
    name = f"hc{uuid.uuid4().hex[:6]}"
    key = f"{aid}:{NS}:{name}"
    p = make_plugin(tmp_path, name)
    marker, checks = p.dir / "unhealthy", p.dir / "checks"
    spec = p.spec(start_check_secs=1, health_check_secs=1)
    spec["control"]["health_cmd"] = (f"if [ -e {marker} ]; then echo fail >> {checks}; exit 1; fi; "
                                     f"echo ok >> {checks}")

    def oks() -> int:
        return checks.read_text().split().count("ok") if checks.exists() else 0

    assert codes(result(papi, multi(papi, name, 0, [aid], spec))) == {key: 0}
    first = p.pid()
    wait_for(lambda: oks() >= 2, 15, "two passing health checks", interval=0.1)
    assert p.alive() and p.pid() == first                 # passing checks leave it alone
    # the check starts failing: restarted under a new pid, and the event and the status say so
    marker.touch()
    wait_for(lambda: p.alive() and p.pid() != first, 15, "the plugin restarted after its health check failed",
             interval=0.1)
    assert "fail" in checks.read_text().split()
    ev = wait_for(lambda: [e for e in events(rds, routes["events"], name)
                           if e["event_name"] == "process_restart_success"], 15, "the restart event")
    assert "health_cmd" in ev[0]["event"]["content"] and ev[0]["dimension"]["bk_agent_id"] == aid, ev
    s = wait_status(papi, name, [aid], lambda i: i["status"] == 1 and i["pid"] not in (first, -1), "the new pid")
    assert s[aid]["isauto"] is True and "health_cmd" in s[aid]["message"], s
    # the check passes again: it stays up under the same pid through the next checks
    marker.unlink()
    seen = len(checks.read_text().split())
    wait_for(lambda: "ok" in checks.read_text().split()[seen:], 15, "a passing check after the fix", interval=0.1)
    wait_for(p.alive, 10, "the plugin running")
    pid, n, restarts = p.pid(), oks(), len(events(rds, routes["events"], name))
    wait_for(lambda: oks() >= n + 3, 15, "three more passing checks", interval=0.1)
    assert p.alive() and p.pid() == pid
    assert len(events(rds, routes["events"], name)) == restarts
    wait_status(papi, name, [aid], lambda i: i["status"] == 1 and i["pid"] == pid, "the status of the kept pid")
    assert codes(result(papi, multi(papi, name, 1, [aid]))) == {key: 0}
    assert not p.alive()


def test_proc_resource_limit_breach_sends_an_event(pc, papi, tmp_path, rds, routes):
    aid = pc.agents[0].info["bk_agent_id"]
    name = f"rl{uuid.uuid4().hex[:6]}"
    # The daemon holds ~150 MB in a child (python); the limit is 0.05 % of the host's memory.
    p = make_plugin(tmp_path, name, extra="python3 -c 'import time; b = bytearray(150 * 2**20); time.sleep(600)' &")
    spec = p.spec()
    spec["resource"] = {"cpu": 90, "mem": 0.05}
    assert codes(result(papi, multi(papi, name, 0, [aid], spec))) == {f"{aid}:{NS}:{name}": 0}
    wait_for(lambda: any(e["event_name"] == "process_resource_limit_exceed" for e in events(rds, routes["events"], name)),
             20, "the resource-limit event on DataID 1100008")
    e = next(e for e in events(rds, routes["events"], name) if e["event_name"] == "process_resource_limit_exceed")
    assert "memory" in e["event"]["content"] and e["dimension"]["bk_agent_id"] == aid
    # a supervised process over its limits is restarted
    wait_for(lambda: any(e["event_name"] == "process_restart_success" for e in events(rds, routes["events"], name)),
             20, "the restart after the breach")
    spec["resource"] = {"cpu": 0, "mem": 0}
    result(papi, multi(papi, name, 1, [aid], spec))
    os.system("pkill -f 'bytearray\\(150' >/dev/null 2>&1")


# ---- auto-load --------------------------------------------------------------------------------------

def test_proc_autoload_at_boot_and_missing_binary_rate(pc, papi, rds, routes):
    """A plugin in the plugin directory is started and supervised at boot (no API call); one whose binary is
    missing is tried at most start_retries + window / start_interval times, and its failures send the
    process_restart_failed event and a type-101 alarm."""
    base = Path(pc.base) / "agents" / "agent-4" / "plugins"
    good = make_plugin(base, "autogood")
    descriptor(good)
    bad = make_plugin(base, "autobad")
    (bad.dir / "bin" / "autobad").unlink()                # the binary is gone
    descriptor(bad, start="echo try >> starts; ./bin/autobad", retries=2, interval=3)
    t0 = time.monotonic()
    (agent,) = start_agents(pc, 1, procs=PROCS, data=DATA)
    aid = agent.info["bk_agent_id"]
    wait_for(good.alive, 15, "the auto-loaded plugin running")
    papi.wait_alive([aid])
    s = wait_status(papi, "autogood", [aid], lambda i: i["status"] == 1, "auto-loaded plugin status")
    assert s[aid]["isauto"] is True and s[aid]["pid"] == good.pid()
    # kept alive like any supervised process
    old = good.pid()
    good.kill()
    wait_for(lambda: good.alive() and good.pid() != old, 3, "auto-loaded plugin restarted")
    # the broken one: rate-limited tries, event and alarm
    wait_for(lambda: any(e["event_name"] == "process_restart_failed" for e in events(rds, routes["events"], "autobad")),
             20, "process_restart_failed")
    alarms = [json.loads(x) for x in rds.lrange(routes["alarms"], 0, -1)]
    mine = [al for al in alarms if al["value"][0]["extra"]["host"][0]["agent_id"] == aid]
    assert mine, alarms
    al = mine[0]
    assert len(al["value"]) == 1 and al["value"][0]["extra"]["type"] == 101
    assert al["value"][0]["event_type"] == "gse_basic_alarm_type" and al["value"][0]["extra"]["count"] == 1
    assert al["value"][0]["extra"]["process"]["name"] == "autobad"
    window = 12.0
    first = bad.starts()
    time.sleep(window)
    tries = bad.starts() - first
    elapsed = time.monotonic() - t0
    assert bad.starts() <= 2 + elapsed / 3 + 1, (bad.starts(), elapsed)
    assert tries <= window / 3 + 1, tries
    assert tries >= 2                                     # it keeps trying
    agent.stop()
    good.kill()


# ---- bad input ------------------------------------------------------------------------------------

def test_proc_bad_input(pc, papi, tmp_path):
    aid = pc.agents[0].info["bk_agent_id"]
    name = f"bi{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    key = f"{aid}:{NS}:{name}"
    # unknown op_type: 832 for the target, the call itself succeeds
    assert codes(result(papi, multi(papi, name, 5, [aid], p.spec()))) == {key: 832}
    # a missing identity field: 1000400 naming it
    spec = p.spec()
    del spec["identity"]["pid_path"]
    r = papi.call(f"{V2}/operate_proc_multi", {"proc_operate_req": [
        {"meta": {"namespace": NS, "name": name}, "op_type": 0, "agent_id_list": [aid], "spec": spec}]})
    assert r["code"] == 1000400 and "proc_operate_req[0].spec.identity.pid_path" in r["message"], r
    # a relative setup_path, one with '..'
    for bad in ("relative/dir", "/opt/../etc"):
        spec = p.spec()
        spec["identity"]["setup_path"] = bad
        r = papi.call(f"{V2}/operate_proc_multi", {"proc_operate_req": [
            {"meta": {"namespace": NS, "name": name}, "op_type": 0, "agent_id_list": [aid], "spec": spec}]})
        assert r["code"] == 1000400 and "setup_path" in r["message"], r
    # an unknown user: a clear per-target error
    spec = p.spec()
    spec["identity"]["user"] = "no-such-user-x"
    data = result(papi, multi(papi, name, 0, [aid], spec))
    assert data[key]["error_code"] == 65535 and "no-such-user-x" in data[key]["error_msg"]
    assert not p.alive()
    # a start_cmd that hangs: killed at op_timeout, 65535 with its output
    spec = p.spec(op_timeout=2)
    spec["control"]["start_cmd"] = "echo hanging; sleep 60"
    t0 = time.monotonic()
    data = result(papi, multi(papi, name, 0, [aid], spec))
    assert data[key]["error_code"] == 65535 and "op_timeout" in data[key]["error_msg"]
    assert "hanging" in json.loads(data[key]["content"])["value"][0]["result"]
    assert time.monotonic() - t0 < 10
    # an agent never seen: 117 at once; optional fields null; labels of any scalar
    ghost = "0:127.0.0.250"
    spec = p.spec(op_timeout=None)
    spec["resource"] = None
    data = result(papi, multi(papi, name, 0, [ghost], spec))
    assert codes(data) == {f"{ghost}:{NS}:{name}": 117}
    # the agent still answers: nothing above blocked it
    assert codes(result(papi, multi(papi, name, 2, [aid], p.spec()))) == {key: 0}
    # a result read for an unknown task: 1000115; a bad one: 1000400
    r = papi.call(f"{V2}/get_proc_operate_result_v2", {"task_id": "GSEPROC:20000101000000:00"})
    assert r["code"] == 1000115
    r = papi.call(f"{V2}/sync_proc_status", {"meta": {"namespace": NS}, "page": {"start": 0, "limit": 5000}})
    assert r["code"] == 1000400 and "limit" in r["message"]


def test_proc_offline_agent_is_117(pc, papi, tmp_path):
    a = pc.start_agent(procs=PROCS, data=DATA)
    aid = a.info["bk_agent_id"]
    papi.wait_alive([aid])
    name = f"off{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    a.stop()
    papi.wait_alive([aid], alive=False)
    assert codes(result(papi, multi(papi, name, 0, [aid], p.spec()))) == {f"{aid}:{NS}:{name}": 117}


# ---- listing, paging, upgrade, groups ---------------------------------------------------------------

def test_proc_sync_paging_upgrade_and_groups(pc, papi, tmp_path):
    agents = ids(pc)
    ns = f"GSEKIT_BIZ_{uuid.uuid4().hex[:6]}"
    names = [f"app_{i}" for i in range(5)]
    for n in names:
        p = make_plugin(tmp_path, n)
        body = {"meta": {"namespace": ns, "name": n}, "agent_id_list": agents, "spec": p.spec()}
        r = papi.call(f"{V1}/register_proc_info", body)
        assert r["code"] == 0, r
    seen, start = [], 0
    while True:
        r = papi.call(f"{V2}/sync_proc_status", {"meta": {"namespace": ns}, "page": {"start": start, "limit": 4,
                                                                                    "return_total": True}})
        assert r["code"] == 0 and r["data"]["count"] == 15, r
        page = r["data"]["proc_infos"]
        if not page:
            break
        seen += [(i["bk_agent_id"], i["meta"]["name"]) for i in page]
        assert all(i["host"]["ip"] or True for i in page) and all("flag" in i for i in page)
        start += 4
    assert sorted(seen) == sorted((a, n) for a in agents for n in names)
    # registered for a host never seen, then moved under its agent id
    ghost_ip = "127.0.0.240"
    p = make_plugin(tmp_path, "ghost")
    r = papi.call(f"{V1}/register_proc_info", {"meta": {"namespace": ns, "name": "ghost"},
                                                "hosts": [{"ip": ghost_ip, "bk_cloud_id": 0}], "spec": p.spec()})
    assert codes(r["data"]) == {f"0:0:{ghost_ip}:{ns}:ghost": 0}
    new_id = uuid.uuid4().hex
    r = papi.call(f"{V2}/upgrade_to_agent_id", {"hosts": [{"ip": ghost_ip, "bk_cloud_id": 0, "bk_agent_id": new_id},
                                                          {"ip": "127.0.0.241", "bk_cloud_id": 0,
                                                           "bk_agent_id": "bad id"}]})
    assert r["code"] == 0 and r["data"] == {"success": [f"0:{ghost_ip}"], "failed": ["0:127.0.0.241"]}, r
    r = papi.call(f"{V2}/get_proc_status_v2", {"meta": {"namespace": ns, "name": "ghost"}, "agent_id_list": [new_id]})
    assert r["data"]["proc_infos"][0]["status"] == 2      # registered (not running) under the agent id now
    # process groups
    r = papi.call(f"{V2}/set_process_group_info", {"meta": {"namespace": ns}, "agent_id_list": agents[:1], "spec": {
        "process_group": [{"id": 1, "resource": {"cpu_pool_limit": 50, "mem_pool_limit": 20,
                                                 "cpu_pool_weight": 1, "mem_pool_weight": 1}}]}})
    assert r["code"] == 0 and r["data"] == {f"{agents[0]}:{ns}": {"error_code": 0, "error_msg": ""}}, r
    r = papi.call(f"{V2}/get_process_group_info", {"meta": {"namespace": ns}, "agent_id_list": agents[:1]})
    assert r["data"][0]["process_group"][0]["resource"]["cpu_pool_limit"] == 50
    # the operator listing
    r = papi.call(f"{V2}/list_proc", {"agent_id_list": agents[:1]})
    assert {i["meta"]["name"] for i in r["data"]["proc_infos"] if i["meta"]["namespace"] == ns} == set(names)


def test_gse_proc_cli(pc, papi, tmp_path, capsys):
    from gse import cli
    aid = pc.agents[0].info["bk_agent_id"]
    name = f"cli{uuid.uuid4().hex[:6]}"
    p = make_plugin(tmp_path, name)
    r = papi.call(f"{V1}/update_proc_info", {"meta": {"namespace": NS, "name": name}, "agent_id_list": [aid],
                                              "spec": p.spec()})
    assert r["code"] == 0
    flags = ["--api-url", pc.api_url(), "--app-code", pc.app_code, "--app-secret", pc.app_secret]
    assert cli.main(["proc", *flags, aid, "start", name]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and p.alive()
    assert cli.main(["proc", *flags, aid, "status", name]) == 0
    assert str(p.pid()) in capsys.readouterr().out
    assert cli.main(["proc", *flags, aid, "list"]) == 0
    assert name in capsys.readouterr().out
    assert cli.main(["proc", *flags, aid, "stop", name]) == 0
    assert not p.alive()

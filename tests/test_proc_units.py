"""Process management pieces on their own: the alarm record, result precedence, pid checks, plugin descriptors,
the agent's path guard, and the API's spec parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gse.agent import proc_host
from gse.agent.procs import path_problem
from gse.apiserver.proc_endpoints import spec_of, targets_of
from gse.common import alarmrecord
from gse.common.errors import BadRequest, ErrorCode
from gse.common.records import ProcResult, ProcResults
from gse.pb import agent_pb2 as pb
from gse.pb import dbproxy_pb2 as dpb

pytestmark = pytest.mark.timeout(30)


def test_alarm_record_has_exactly_one_value_and_the_section_10_shape():
    host = alarmrecord.AlarmHost("10.0.0.5", 2, "abc")
    rec = alarmrecord.alarm_record(alarmrecord.TYPE_PROCESS, [host], server="10.0.0.5", desc="x failed",
                                   extra={"process": {"name": "x"}, "type": 999}, at=1_700_000_000)
    assert set(rec) == {"server", "time", "timezone", "utctime", "utctime2", "value"}
    assert rec["utctime2"] == "2023-11-14 22:13:20"
    (v,) = rec["value"]
    assert v["event_type"] == "gse_basic_alarm_type" and v["event_source_system"] == "" and v["event_title"] == ""
    assert v["extra"]["type"] == 101 and v["extra"]["count"] == 1         # the builder's, never the caller's
    assert v["extra"]["host"] == [{"bizid": 0, "cloudid": 2, "ip": "10.0.0.5", "agent_id": "abc"}]
    assert json.loads(alarmrecord.encode(rec)) == rec


def test_proc_results_take_the_agents_answer_over_procmgrs():
    write = ProcResults.update("t", {"a:ns:n": ProcResult(), "b:ns:n": ProcResult(ErrorCode.AGENT_OFFLINE, "off")})
    agent = ProcResults.update("t", {"a:ns:n": ProcResult(0, "", "{}")}, agent=True)
    res = dpb.Result(ok=True, found=True, fields={**write.fields, **agent.fields})
    got = ProcResults.decode(res)
    assert got["a:ns:n"].error_code == 0 and got["a:ns:n"].final
    assert got["b:ns:n"].error_code == 117


def test_pid_alive_checks_the_name_and_ignores_zombies(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert proc_host.pid_alive(child.pid)
        assert proc_host.pid_alive(child.pid, os.path.basename(sys.executable))
        assert not proc_host.pid_alive(child.pid, "someotherprog")      # a reused pid is not the plugin
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)         # exited, not reaped: a zombie
        assert not proc_host.pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    pidfile = tmp_path / "p.pid"
    pidfile.write_text("notanumber\n")
    assert proc_host.read_pid(str(pidfile)) is None
    os.mkfifo(tmp_path / "fifo")
    assert proc_host.read_pid(str(tmp_path / "fifo")) is None            # never blocks on a FIFO
    os.symlink(pidfile, tmp_path / "link")
    assert proc_host.read_pid(str(tmp_path / "link")) is None            # a planted symlink is not followed


def test_plugin_descriptor_refused_when_others_may_write_it(tmp_path):
    d = tmp_path / "plug"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    path = d / "project.yaml"
    path.write_text("name: plug\ncontrol:\n  start: ./start.sh\n")
    os.chmod(path, 0o644)
    desc = proc_host.load_descriptor(path)
    assert desc.namespace == "nodeman" and desc.spec.setup_path == str(d) and desc.spec.auto_type == 1
    assert desc.spec.pid_path == "/var/run/gse/plug.pid"
    os.chmod(path, 0o666)
    with pytest.raises(ValueError, match="writable by group or others"):
        proc_host.load_descriptor(path)
    os.chmod(path, 0o644)
    os.chmod(d, 0o777)
    found, problems = proc_host.scan_plugins(str(tmp_path))
    assert found == [] and "writable" in problems[0]


def test_agent_refuses_relative_and_dotdot_paths():
    assert path_problem(pb.ProcSpec(setup_path="/opt/x", pid_path="/var/run/x.pid")) == ""
    assert "setup_path" in path_problem(pb.ProcSpec(setup_path="opt/x", pid_path="/var/run/x.pid"))
    assert "pid_path" in path_problem(pb.ProcSpec(setup_path="/opt/x", pid_path="/var/../x.pid"))


def _spec(**over):
    s = {"identity": {"proc_name": "p", "setup_path": "/opt/p", "pid_path": "/var/run/p.pid", "user": "root"},
         "control": {"start_cmd": "./start.sh"}, "alive_monitor_policy": {"auto_type": 1, "op_timeout": None}}
    s.update(over)
    return {"spec": s}


def test_api_spec_parsing_accepts_both_policy_names_and_nulls():
    spec = spec_of(_spec(), "")
    assert spec.auto_type == 1 and spec.op_timeout == 0 and spec.start_cmd == "./start.sh"
    body = _spec()
    body["spec"]["monitor_policy"] = body["spec"].pop("alive_monitor_policy")
    body["spec"]["monitor_policy"]["start_retries"] = 3
    body["spec"]["resource"] = {"cpu": 10, "mem": None}
    spec = spec_of(body, "")
    assert spec.start_retries == 3 and spec.cpu == 10.0 and spec.mem == 0.0
    with pytest.raises(BadRequest, match="x.spec.identity.user"):
        b = _spec()
        del b["spec"]["identity"]["user"]
        spec_of(b, "x.")
    with pytest.raises(BadRequest, match="crontab_rule"):
        spec_of(_spec(alive_monitor_policy={"auto_type": 0, "crontab_rule": "every day"}), "")
    with pytest.raises(BadRequest, match="auto_type"):
        spec_of(_spec(alive_monitor_policy={"auto_type": 7}), "")


def test_api_targets_name_the_field():
    assert targets_of({"agent_id_list": ["0:10.0.0.1"]}, "", 10)[0].requested == "0:10.0.0.1"
    t = targets_of({"hosts": [{"ip": "10.0.0.2", "bk_cloud_id": 3, "bk_supplier_id": 0}]}, "", 10)[0]
    assert (t.requested, t.by_host, t.cloud_id) == ("3:10.0.0.2", True, 3)
    with pytest.raises(BadRequest, match="proc_operate_req\\[2\\].hosts\\[0\\].ip"):
        targets_of({"hosts": [{"ip": "nope", "bk_cloud_id": 0}]}, "proc_operate_req[2].", 10)
    with pytest.raises(BadRequest, match="agent_id_list"):
        targets_of({}, "", 10)

"""Following a task through the logs: one task_id (and the API request_id) in the log lines of every step,
on the API server, the task servers, the file server and the agents (docs/walkthrough.md), on a real cluster."""

from __future__ import annotations

import json
import re
import uuid

from conftest import api_for

from gse.cli import still_running
from gse.common.address import split_host_port
from gse.devcluster import wait_for


def _post(api, path: str, body: dict, request_id: str) -> dict:
    status, payload = api.raw(path, json.dumps(body).encode(), {
        "Content-Type": "application/json", "X-Request-Id": request_id, **api.auth_header()})
    assert status == 200 and payload["code"] == 0, payload
    assert payload["request_id"] == request_id
    return payload["data"]


def _lines(proc, task_id: str) -> list[str]:
    return [ln for ln in proc.log_path.read_text(errors="replace").splitlines() if task_id in ln]


def _steps(proc, task_id: str) -> list[str]:
    """The messages of the info lines naming the task (text format: `time I service message k=v ...`)."""
    out = []
    for ln in _lines(proc, task_id):
        m = re.match(r"\S+ I \S+ (.*?)(?: [a-z_]+=|$)", ln)
        if m:
            out.append(m.group(1))
    return out


def _has(proc, task_id: str, step: str, request_id: str | None = None) -> bool:
    for ln in _lines(proc, task_id):
        if re.match(rf"\S+ I \S+ {re.escape(step)}( |$)", ln) and f"task_id={task_id}" in ln:
            if request_id is None or f"request_id={request_id}" in ln:
                return True
    return False


def _wait_steps(proc, task_id: str, steps: list[str], request_id: str | None = None) -> None:
    for step in steps:
        wait_for(lambda: _has(proc, task_id, step, request_id), 20,
                 f"{proc.name}: '{step}' naming {task_id}" + (f" and {request_id}" if request_id else "")
                 + f"; its lines naming the task: {_steps(proc, task_id)}")


def test_one_task_and_one_transfer_followed_through_every_log(make_cluster, tmp_path):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_taskserver()
    c.start_fileserver()
    c.start_apiserver()
    # One agent on each task server: the task reaches both, and the transfer's target is told through the
    # coordinator's peer.
    agents = [c.start_agent(servers=[t.info["address"]]) for t in c.taskservers]
    ids = [a.info["bk_agent_id"] for a in agents]
    api = api_for(c)
    api.wait_alive(ids)
    by_id = {a.info["bk_agent_id"]: a for a in agents}
    ts_of = dict(zip(ids, c.taskservers))
    ports = {a: d["parent_port"] for a, d in api.infos(ids).items()}
    assert ports == {a: split_host_port(ts_of[a].info["address"])[1] for a in ids}
    apisrv = c.apiservers[0]

    # ---- a script task on both agents ----
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    task_id = _post(api, "/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": a, "user": "root"} for a in ids],
        "atomic_tasks": [{"atomic_task_id": 0, "command": "echo traced", "timeout_seconds": 30}]}, rid)["result"]["task_id"]
    wait_for(lambda: not still_running(api.call("/api/v2/task/get_execute_script_result", {
        "task_id": task_id, "agent_tasks": [{"bk_agent_id": a} for a in ids]})), 30, "the task done")

    _wait_steps(apisrv, task_id, ["task accepted", "task dispatched"], rid)
    assert "taskservers=2" in next(ln for ln in _lines(apisrv, task_id) if " task dispatched " in ln)
    for aid in ids:
        _wait_steps(ts_of[aid], task_id, ["delivered to agents"], rid)
        _wait_steps(ts_of[aid], task_id, ["results stored"])
        _wait_steps(by_id[aid], task_id, ["task received", "atomic task started", "item finished"], rid)
        _wait_steps(by_id[aid], task_id, ["results stored by the server"])

    # ---- a file from one agent to the other ----
    src_dir, dest = tmp_path / "src", tmp_path / "dest"
    src_dir.mkdir()
    (src_dir / "hello.txt").write_text("followed\n")
    source, target = ids
    rid2 = f"trace-{uuid.uuid4().hex[:12]}"
    file_task = _post(api, "/api/v2/task/async_transfer_file", {"timeout_seconds": 60, "auto_mkdir": True, "tasks": [{
        "source": {"file_name": "hello.txt", "store_dir": str(src_dir), "agent": {"bk_agent_id": source}},
        "target": {"store_dir": str(dest), "agents": [{"bk_agent_id": target, "user": "root"}]}}]},
        rid2)["result"]["task_id"]
    wait_for(lambda: not still_running(api.call("/api/v2/task/get_transfer_file_result", {
        "task_id": file_task, "agents": [{"bk_agent_id": target}]})), 30, "the transfer done")
    assert (dest / "hello.txt").read_text() == "followed\n"

    coordinator = ts_of[source]
    _wait_steps(apisrv, file_task, ["transfer accepted", "transfer dispatched"], rid2)
    _wait_steps(coordinator, file_task, ["transfer started", "source manifest", "targets told", "transfer ended"],
                rid2)
    _wait_steps(ts_of[target], file_task, ["delivered to agents"], rid2)       # FileTarget through the peer
    _wait_steps(ts_of[target], file_task, ["results stored"])
    _wait_steps(c.fileservers[0], file_task, ["transfer created", "transfer ended"], rid2)
    _wait_steps(by_id[source], file_task, ["transfer source", "source ready", "transfer ended"], rid2)
    _wait_steps(by_id[target], file_task, ["transfer target", "entry received", "transfer ended"], rid2)

    # Servers log steps, not agents: no info line naming a task on a server is about one agent.
    for proc in [*c.taskservers, apisrv, *c.fileservers]:
        for t in (task_id, file_task):
            per_agent = [ln for ln in _lines(proc, t) if re.match(r"\S+ I ", ln) and "agent_id=" in ln]
            assert not per_agent, per_agent

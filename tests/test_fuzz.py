"""Fuzzing with Hypothesis: random JSON of every shape, type and size at every API endpoint, random frames at
both plugin sockets of a real agent. Never a 500 (or a crash), every answer within a stated bound, and the
daemons serve normally afterwards.

The default run is modest (FUZZ_EXAMPLES per property, about ten seconds each); the `bench`-marked variants
run the same properties for longer. Task bodies only ever name agents that do not exist (ids and addresses no
agent of the cluster has), so nothing the fuzzer invents is run on a host.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import _new_cluster, api_for, start_agents
from gse.cli import still_running
from gse.devcluster import wait_for
from gse.testing.plugin import MessageClient, ReportClient

FUZZ_EXAMPLES = int(os.environ.get("GSE_FUZZ_EXAMPLES", "150"))
LONG_EXAMPLES = 3000
CALL_BOUND_S = 3.0          # every API answer, however odd the body (generous: the machine is shared)
FRAME_BOUND_S = 2.0         # the agent closes a connection with a bad frame, or answers, within this

V1 = "/api/c/compapi/v2/gse"
PATHS = [f"{V1}/get_agent_status", f"{V1}/get_agent_info", "/api/v2/cluster/list_agent_state",
         "/api/v2/cluster/list_agent_info", "/api/v2/cluster/list_agents", "/api/v2/cluster/dispatch_message",
         "/api/v2/task/async_execute_script", "/api/v2/task/get_execute_script_result",
         "/api/v2/task/async_terminate_execute_script", "/api/v2/task/async_transfer_file",
         "/api/v2/task/get_transfer_file_result", "/api/v2/task/async_terminate_transfer_file",
         "/api/v2/task/extensions/async_execute_script", "/api/v2/task/async/get_transfer_file_result"]
for _op in ("add_streamto", "update_streamto", "delete_streamto", "query_streamto", "add_route", "update_route",
            "delete_route", "query_route"):
    PATHS += [f"{V1}/config_{_op}", f"/api/v2/data/{_op}"]

# Agents that do not exist: random-looking ids and addresses in a range no agent of the test cluster uses.
NO_AGENTS = ["0" * 32, "f" * 32, "0:198.18.0.9", "3:198.18.1.1", "1:::1", "x" * 64]

# ---- strategies -----------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["", "root", "nobody", "/tmp", "..", "regex:(a+)+$", "*.log", "a[1].txt", "GSETASK:1:2",
                     "0:127.0.0.1", "kafka", "redis", "int", "protocol", "\u0000", "😀", "rm -rf /"] + NO_AGENTS),
)
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=12), kids, max_size=6)), max_leaves=30)

FIELDS = ["agents", "agent_id_list", "hosts", "task_id", "atomic_tasks", "scripts", "atomic_tasks_relations",
          "agent_tasks", "tasks", "timeout_seconds", "auto_mkdir", "upload_speed", "download_speed", "slot_id",
          "token", "message_id", "content", "metadata", "stream_to", "route", "stream_filters", "condition",
          "specification", "operation", "bk_agent_id", "bk_cloud_id", "ip", "user", "command", "offset", "limit"]


VALID = {
    "/api/v2/task/async_execute_script": {
        "agents": [{"bk_agent_id": NO_AGENTS[0], "user": "root"}],
        "scripts": [{"script_name": "a.sh", "script_store_dir": "/tmp/gse-fuzz", "script_content": "true"}],
        "atomic_tasks": [{"atomic_task_id": 0, "command": "true", "timeout_seconds": 5}],
        "atomic_tasks_relations": [{"atomic_task_id": 0, "atomic_task_id_idx": []}]},
    "/api/v2/task/async_transfer_file": {
        "timeout_seconds": 5, "auto_mkdir": True, "tasks": [{
            "source": {"file_name": "x", "store_dir": "/tmp", "agent": {"bk_agent_id": NO_AGENTS[1]}},
            "target": {"file_name": "", "store_dir": "/tmp/gse-fuzz", "permission": 644,
                       "agents": [{"bk_agent_id": NO_AGENTS[2]}]}}]},
    "/api/v2/cluster/list_agent_state": {"agent_id_list": NO_AGENTS},
    f"{V1}/get_agent_status": {"hosts": [{"ip": "198.18.0.9", "bk_cloud_id": 0}]},
    "/api/v2/data/add_route": {
        "operation": {"operator_name": "fuzz"}, "metadata": {"plat_name": "fuzz", "label": {}},
        "route": [{"name": "r", "stream_to": {"stream_to_id": 1, "redis": {"channel_name": "c"}}}],
        "stream_filters": []},
    "/api/v2/cluster/dispatch_message": {"slot_id": "1", "token": "t", "message_id": "m",
                                         "agent_id_list": NO_AGENTS[:2], "content": "x"},
}


@st.composite
def mutated(draw, base: dict):
    """A valid body with one value somewhere replaced by random JSON (or removed)."""
    body = json.loads(json.dumps(base))
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + [i])
                walk(v, path + [i])
    walk(body, [])
    path = draw(st.sampled_from(paths))
    parent = body
    for p in path[:-1]:
        parent = parent[p]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return body


def requests(reads: dict[str, dict]):
    """(path, raw body) pairs: a valid request of the path with one value mutated (including reads of real
    tasks), or any path with any body: random objects and values, bytes, pathological JSON."""
    matched = [st.tuples(st.just(path), mutated(body).map(lambda b: json.dumps(b).encode()))
               for path, body in list(VALID.items()) + list(reads.items())]
    bodies = st.one_of(
        st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8),
        st.dictionaries(st.text(max_size=10), json_values, max_size=5),
        *[mutated(b) for b in list(VALID.values()) + list(reads.values())],
    )
    anything = st.one_of(
        bodies.map(lambda b: json.dumps(b).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.sampled_from([b"[" * 5000, b'{"a":' * 3000, b'{"x": NaN}', b'{"x": "\\ud800"}', b"{" + b" " * 70000,
                         b'{"agent_id_list": [' + b'"a",' * 6000 + b'"a"]}', b'{"t": 1e999}', b"\xef\xbb\xbf{}"]),
    )
    return st.one_of(st.one_of(*matched), st.tuples(st.sampled_from(PATHS), anything))

# ---- the API ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fc(infra, tmp_path_factory):
    c = _new_cluster(tmp_path_factory.mktemp("fuzz"), infra)
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    start_agents(c, 1)
    api = api_for(c)
    aid = c.agents[0].info["bk_agent_id"]
    api.wait_alive([aid])
    # Finished tasks whose results the fuzzer reads (reads and terminates of finished work change nothing).
    r = api.call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": aid}], "atomic_tasks": [{"atomic_task_id": 0, "command": "echo 你好; echo x"}]})
    script_tid = r["data"]["result"]["task_id"]
    r = api.call("/api/v2/task/async_transfer_file", VALID["/api/v2/task/async_transfer_file"])
    file_tid = r["data"]["result"]["task_id"]
    c.fuzz_reads = {
        "/api/v2/task/get_execute_script_result": {"task_id": script_tid, "agent_tasks": [{
            "bk_agent_id": aid, "atomic_tasks": [{"atomic_task_id": 0, "offset": 1, "limit": 4}]}]},
        "/api/v2/task/async_terminate_execute_script": {"task_id": script_tid, "agents": [{"bk_agent_id": aid}]},
        "/api/v2/task/get_transfer_file_result": {"task_id": file_tid, "agents": [{"bk_agent_id": NO_AGENTS[2]}],
                                                  "agent_id_list": [NO_AGENTS[2]]},
        "/api/v2/task/async_terminate_transfer_file": {"task_id": file_tid, "agents": [{"bk_agent_id": NO_AGENTS[2]}]},
    }
    wait_for(lambda: not still_running(api.call("/api/v2/task/get_execute_script_result", {
        "task_id": script_tid, "agent_tasks": [{"bk_agent_id": aid}]})), 30, "the seed task")
    yield c
    c.stop()


def _post(api, path: str, raw: bytes, headers: dict) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    status, payload = api.raw(path, raw, headers)
    return status, payload, time.monotonic() - t0


def _api_property(fc, examples: int):
    api = api_for(fc)
    headers = {"Content-Type": "application/json", **api.auth_header()}
    worst = {"s": 0.0}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(req=requests(fc.fuzz_reads), slash=st.booleans())
    def prop(req, slash):
        path, raw = req
        status, payload, took = _post(api, path + ("/" if slash else ""), raw, headers)
        worst["s"] = max(worst["s"], took)
        assert status != 500 and payload.get("code") != 1000500, (path, raw[:300], payload)
        assert set(payload) >= {"result", "code", "message", "data", "request_id"}
        assert payload["result"] is (payload["code"] == 0)
        assert took < CALL_BOUND_S, (path, raw[:200], took)

    prop()
    return worst["s"]


def _still_serves(fc) -> None:
    """After the fuzzing: the agent is alive through the API and a real task runs and reports."""
    api = api_for(fc)
    aid = fc.agents[0].info["bk_agent_id"]
    api.wait_alive([aid], timeout=20)
    r = api.call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": aid}], "atomic_tasks": [{"atomic_task_id": 0, "command": "echo alive"}]})
    assert r["code"] == 0, r
    body = {"task_id": r["data"]["result"]["task_id"],
            "agent_tasks": [{"bk_agent_id": aid, "atomic_tasks": [{"atomic_task_id": 0}]}]}
    res = wait_for(lambda: (x := api.call("/api/v2/task/get_execute_script_result", body)) and
                   not still_running(x) and x, 30, "a task after the fuzzing")
    assert res["data"]["result"][0]["screen"] == "alive\n"
    for p in fc.procs:
        assert p.popen.poll() is None, f"{p.name} exited"


def test_fuzz_api_random_json_never_500_and_bounded(fc):
    worst = _api_property(fc, FUZZ_EXAMPLES)
    print(f"fuzz api: {FUZZ_EXAMPLES} bodies, slowest answer {worst * 1000:.0f} ms")
    _still_serves(fc)


@pytest.mark.bench
def test_fuzz_api_long(fc):
    _api_property(fc, LONG_EXAMPLES)
    _still_serves(fc)


# ---- the plugin sockets ---------------------------------------------------------------------------------------

REPORT_HEADER = struct.Struct(">6I")
MESSAGE_HEADER = struct.Struct(">IHHQIII")

u32 = st.one_of(st.integers(0, 64), st.sampled_from([0x0C01, 0x0A, 0x9006, 0x900A, 0xDEADBEEF, 2 ** 32 - 1, 2 ** 31,
                                                     10 * 1024 * 1024, 10 * 1024 * 1024 + 1]),
                st.integers(0, 2 ** 32 - 1))
report_frames = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda h, body: REPORT_HEADER.pack(*h) + body, st.tuples(u32, u32, u32, u32, u32, u32),
              st.binary(max_size=200)),
    st.builds(lambda t, d, body: REPORT_HEADER.pack(t, d, 0, len(body), 0, 0) + body,
              st.sampled_from([0x0C01, 0x0A]), u32, st.binary(max_size=2000)),
)
message_frames = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda t, v, seq, ln, r0, r1, body: MESSAGE_HEADER.pack(0xDEADBEEF, t, v, seq, ln, r0, r1) + body,
              st.sampled_from([0x9006, 0x900A, 0x9007, 0x9008, 0, 0xFFFF]), st.sampled_from([6, 0, 7]),
              st.integers(0, 2 ** 64 - 1), u32, u32, u32, st.binary(max_size=300)),
    st.builds(lambda meta, payload: MESSAGE_HEADER.pack(0xDEADBEEF, 0x900A, 6, 1, 28 + len(meta) + len(payload),
                                                         len(meta), len(payload)) + meta + payload,
              json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=100)),
    st.builds(lambda body: MESSAGE_HEADER.pack(0xDEADBEEF, 0x9006, 6, 1, 28 + len(body), 0, 0) + body,
              json_values.map(lambda v: json.dumps(v).encode())),
)


def _send_frames(path: str, frames: list[bytes]) -> float:
    """Send the frames on one connection, then half-close; the agent answers or closes within the bound (it may
    also keep waiting for the rest of a frame: then the half-close is the end). Returns the time it took."""
    t0 = time.monotonic()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(FRAME_BOUND_S)
    try:
        s.connect(path)
        for f in frames:
            try:
                s.sendall(f)
            except (BrokenPipeError, ConnectionResetError):
                break               # closed by the agent: a bad frame, as it should
        try:
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError, OSError):
            pass
    finally:
        s.close()
    return time.monotonic() - t0


def _ipc_property(fc, examples: int) -> None:
    run_dir = Path(fc.agents[0].info["run_dir"])
    report, message = str(run_dir / "ipc.state.report"), str(run_dir / "ipc.state.message")

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(which=st.booleans(), rframes=st.lists(report_frames, min_size=1, max_size=4),
           mframes=st.lists(message_frames, min_size=1, max_size=4))
    def prop(which, rframes, mframes):
        took = _send_frames(report, rframes) if which else _send_frames(message, mframes)
        assert took < FRAME_BOUND_S + 0.5, took

    prop()


async def _plugins_still_served(fc) -> None:
    run_dir = Path(fc.agents[0].info["run_dir"])
    aid = fc.agents[0].info["bk_agent_id"]
    rc = await ReportClient().connect(str(run_dir / "ipc.state.report"))
    assert (await rc.keepalive())["bk_agent_id"] == aid
    await rc.close()
    mc = await MessageClient().connect(str(run_dir / "ipc.state.message"))
    assert (await mc.keepalive("fuzz-check"))["agent_id"] == aid
    await mc.close()


def test_fuzz_ipc_sockets_random_frames_agent_survives(fc):
    _ipc_property(fc, FUZZ_EXAMPLES * 2)
    asyncio.run(_plugins_still_served(fc))
    _still_serves(fc)


@pytest.mark.bench
def test_fuzz_ipc_long(fc):
    _ipc_property(fc, LONG_EXAMPLES)
    asyncio.run(_plugins_still_served(fc))
    _still_serves(fc)

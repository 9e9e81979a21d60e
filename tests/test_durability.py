"""Acknowledged means stored: results survive dbproxy and Redis failures, a task is stored before it runs,
and a dispatch that finds the agent gone from its task server is re-routed, not failed.

Unit tests of the batch writer's retry rules (a fake dbproxy client, milliseconds) first, then real clusters.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import HEARTBEAT_S, api_for, start_agents

from gse.common import dbclient as db
from gse.common.address import split_host_port
from gse.common.errors import Unavailable
from gse.common.records import TaskItem
from gse.devcluster import wait_for
from gse.pb import dbproxy_pb2 as dpb
from gse.taskserver.batch_writer import BatchWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

RUN = "/api/v2/task/async_execute_script"
RESULT = "/api/v2/task/get_execute_script_result"


# ---- the batch writer, against a fake dbproxy client ---------------------------------------------------

class FakeDb:
    """Answers each op by a rule: `fail_keys` -> retryable failure (until cleared), `bad_keys` -> refused for
    good, `down` -> the whole call raises Unavailable. Records every op it stored."""

    def __init__(self):
        self.fail_keys: set[str] = set()
        self.bad_keys: set[str] = set()
        self.down = False
        self.stored: list[tuple[str, dict]] = []
        self.block: asyncio.Event | None = None

    async def execute(self, ops):
        if self.block is not None:
            await self.block.wait()
        if self.down:
            raise Unavailable("no dbproxy answered")
        out = []
        for op in ops:
            if op.key in self.bad_keys:
                out.append(dpb.Result(ok=False, error="WRONGTYPE"))
            elif op.key in self.fail_keys:
                out.append(dpb.Result(ok=False, error="no replica of the key is up", retryable=True))
            else:
                self.stored.append((op.key, {k: v.decode() for k, v in op.fields.items()}))
                out.append(dpb.Result(ok=True))
        return out


async def test_writer_acknowledges_only_what_dbproxy_stored():
    fake = FakeDb()
    w = BatchWriter(fake, flush_interval_s=0)
    fake.fail_keys = {"gse:ti:t:a:0"}
    w.put(TaskItem.update("t", "a", 0, status=2))
    w.put(TaskItem.update("t", "b", 0, status=2))
    done = w.written()
    assert await w.flush() is False                 # one op failed: queued again, nobody acknowledged
    assert not done.done() and w.pending == 1
    w.put(TaskItem.update("t", "a", 0, exit_code=3))    # a newer write of the same hash merges over it
    fake.fail_keys = set()
    assert await w.flush() is True
    assert done.done()
    assert ("gse:ti:t:a:0", {"status": "2", "exit_code": "3"}) in fake.stored


async def test_writer_drops_what_dbproxy_refuses_for_good():
    fake = FakeDb()
    w = BatchWriter(fake, flush_interval_s=0)
    fake.bad_keys = {"bad"}
    w.add([db.set_("bad", "x"), db.set_("good", "y")])
    done = w.written()
    assert await w.flush() is True and done.done()  # one bad op does not hold every acknowledgement back
    assert w.pending == 0


async def test_writer_keeps_everything_when_dbproxy_is_unreachable():
    fake = FakeDb()
    w = BatchWriter(fake, flush_interval_s=0)
    fake.down = True
    w.add([db.setrange("out", 0, b"x")])
    w.put(TaskItem.update("t", "a", 0, status=2))
    done = w.written()
    assert await w.flush() is False and not done.done() and w.pending == 2
    fake.down = False
    assert await w.flush() is True and done.done()
    assert [k for k, _f in fake.stored] == ["out", "gse:ti:t:a:0"]     # ordered ops still first


async def test_writer_cancelled_mid_flush_loses_nothing():
    fake = FakeDb()
    fake.block = asyncio.Event()
    w = BatchWriter(fake, flush_interval_s=0)
    w.put(TaskItem.update("t", "a", 0, status=2))
    done = w.written()
    flushing = asyncio.ensure_future(w.flush())
    await asyncio.sleep(0.01)
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert w.pending == 1 and not done.done()
    fake.block = None
    await w.drain(timeout=1)
    assert done.done() and fake.stored == [("gse:ti:t:a:0", {"status": "2"})]


async def test_writer_pushes_back_over_its_bound():
    fake = FakeDb()
    events = []
    w = BatchWriter(fake, flush_interval_s=0, high_water=10, low_water=4, on_pressure=events.append)
    fake.down = True
    for i in range(12):
        w.put(TaskItem.update("t", f"a{i}", 0, status=2))
    assert events == [True] and w.pressure
    assert await w.flush() is False and w.pressure          # still over: still paused
    fake.down = False
    assert await w.flush() is True
    assert events == [True, False] and not w.pressure


# ---- real clusters -------------------------------------------------------------------------------------

def _results(api, task_id, ids, limit=4096):
    return api.call(RESULT, {"task_id": task_id, "agent_tasks": [
        {"bk_agent_id": a, "atomic_tasks": [{"atomic_task_id": 0, "offset": 0, "limit": limit}]} for a in ids]})


def _wait_final(api, task_id, ids, timeout):
    def check():
        out = {}
        for i in range(0, len(ids), 1000):
            r = _results(api, task_id, ids[i:i + 1000])
            if r["code"] != 0:
                return None
            out.update({x["bk_agent_id"]: x for x in r["data"]["result"]})
        return out if all(out[a]["error_code"] != 115 for a in ids) else None
    return wait_for(check, timeout, f"every result of {task_id}", interval=0.5)


def _sim_stats(log_dir: Path) -> dict:
    """The last report line of every simulated-agent worker, summed."""
    total: dict = {}
    for f in log_dir.glob("worker-*.log"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.startswith("{")]
        for k, v in (lines[-1] if lines else {}).items():
            if k != "t" and isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


def test_broadcast_survives_a_killed_dbproxy_and_redis_node(make_cluster, tmp_path):
    """1,000 simulated agents; while their results come in, one of two dbproxies and one of two Redis nodes
    are SIGKILLed. Every result is readable afterwards, none lost, none duplicated, none run twice."""
    from simagents import agent_id, prepare, spawn_workers, stop_workers

    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    r1 = c.start_redis()
    c.start_redis()
    dp1 = c.start_dbproxy(replicas=2, probe_interval_s=0.2, redis_timeout_s=1.0)
    c.start_dbproxy(replicas=2, probe_interval_s=0.2, redis_timeout_s=1.0)
    ts = c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    n, tag = 1000, "d0"
    log_dir = tmp_path / "sim"
    log_dir.mkdir()
    idents = prepare(c, n, 2, tag, str(tmp_path), "issued")     # each agent its own certificate
    procs = spawn_workers(n, 2, ts.info["address"], str(c.certs_dir), tag, str(log_dir), heartbeat=HEARTBEAT_S,
                          identities=idents)
    try:
        ids = [agent_id(tag, i) for i in range(n)]
        wait_for(lambda: _sim_stats(log_dir).get("attached", 0) == n, 90, "1,000 simulated agents attached",
                 interval=0.5)
        wait_for(lambda: all(s["status_code"] == 2 for i in range(0, n, 1000)
                             for s in api.call("/api/v2/cluster/list_agent_state",
                                               {"agent_id_list": ids[i:i + 1000]})["data"]), 30, "all alive")
        r = api.call(RUN, {"agents": [{"bk_agent_id": a, "user": "root"} for a in ids],
                           "atomic_tasks": [{"atomic_task_id": 0, "command": "sleep 1.5; echo durable-7",
                                             "timeout_seconds": 60}]})
        assert r["code"] == 0, r
        task_id = r["data"]["result"]["task_id"]
        time.sleep(0.5)                 # the agents answer at 1.5 s: kill while results are on their way
        dp1.kill()
        r1.kill()
        results = _wait_final(api, task_id, ids, 120)
        assert {(x["status"], x["error_code"], x["screen"]) for x in results.values()} == {(2, 0, "durable-7\n")}
        stats = wait_for(lambda: (s := _sim_stats(log_dir)).get("answered") == n and s, 20, "answer counts")
        assert stats["answered"] == n and stats["duplicates"] == 0
    finally:
        stop_workers(procs)


def test_result_kept_on_the_agent_until_stored(make_cluster, tmp_path):
    """Redis stops answering while a task finishes: the task server cannot store the result, so it does not
    acknowledge it and the agent keeps it (its journal). The task server is then killed (what it had queued
    is gone); Redis comes back; the agent attaches to the other task server, sends the result again, and the
    result is readable."""
    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    rd = c.start_redis()
    c.start_dbproxy(replicas=1, probe_interval_s=0.2, redis_timeout_s=0.5)
    ts1 = c.start_taskserver()
    c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    (agent,) = start_agents(c, 1, servers=[ts1.info["address"], c.taskservers[1].info["address"]])
    aid = agent.info["bk_agent_id"]
    api.wait_alive([aid])
    r = api.call(RUN, {"agents": [{"bk_agent_id": aid, "user": "root"}],
                       "atomic_tasks": [{"atomic_task_id": 0, "command": "sleep 2; echo kept", "timeout_seconds": 30}]})
    task_id = r["data"]["result"]["task_id"]
    journal = Path(agent.info["data_dir"]) / "tasks"
    rd.signal(signal.SIGSTOP)
    try:
        # The item finishes on the agent, is reported, cannot be stored: it stays in the agent's journal.
        wait_for(lambda: any('"items"' in p.read_text() and "null" not in p.read_text()
                             for p in journal.glob("*.json")), 20, "the final result in the agent's journal")
        time.sleep(1.5)         # several flush attempts and acknowledgement rounds later ...
        assert any(p.read_text().count('"0":') == 1 and "null" not in p.read_text() for p in journal.glob("*.json"))
        ts1.kill()
    finally:
        rd.signal(signal.SIGCONT)
    res = _wait_final(api, task_id, [aid], 60)[aid]
    assert (res["status"], res["error_code"], res["screen"]) == (2, 0, "kept\n")
    wait_for(lambda: not list(journal.glob("*.json")), 20, "the agent to drop the result once acknowledged")


def test_dispatch_rerouted_when_the_agent_moved(make_cluster):
    """The task server holding an agent is killed; a task submitted at once still reads the agent as alive
    on it (its session deadline has not passed), finds the server gone, and is re-routed once the agent
    attaches to the other task server: it runs there instead of ending with 117."""
    c = make_cluster()
    c.start_dbproxy()
    ts1 = c.start_taskserver()
    ts2 = c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    (agent,) = start_agents(c, 1, servers=[ts1.info["address"], ts2.info["address"]])
    aid = agent.info["bk_agent_id"]
    api.wait_alive([aid])
    holder = ts1 if api.infos([aid])[aid]["parent_port"] == split_host_port(ts1.info["address"])[1] else ts2
    holder.kill()
    r = api.call(RUN, {"agents": [{"bk_agent_id": aid, "user": "root"}],
                       "atomic_tasks": [{"atomic_task_id": 0, "command": "echo moved", "timeout_seconds": 30}]})
    assert r["code"] == 0, r
    res = _wait_final(api, r["data"]["result"]["task_id"], [aid], 60)[aid]
    assert (res["status"], res["error_code"], res["screen"]) == (2, 0, "moved\n"), res


def test_failed_store_runs_nothing(make_cluster, tmp_path):
    """Redis refuses writes (out of memory) but answers reads: async_execute_script fails, and no agent runs
    the command (the task is stored before it is dispatched)."""
    import redis

    c = make_cluster(own_infra=True)
    c.start_zookeeper()
    rd = c.start_redis()
    c.start_dbproxy(replicas=1)
    c.start_taskserver()
    c.start_apiserver()
    api = api_for(c)
    (agent,) = start_agents(c, 1)
    aid = agent.info["bk_agent_id"]
    api.wait_alive([aid])
    marker = tmp_path / "ran"
    direct = redis.Redis(host="127.0.0.1", port=rd.info["port"])
    direct.config_set("maxmemory-policy", "noeviction")
    direct.config_set("maxmemory", 1)
    try:
        r = api.call(RUN, {"agents": [{"bk_agent_id": aid, "user": "root"}],
                           "atomic_tasks": [{"atomic_task_id": 0, "command": f"touch {marker}",
                                             "timeout_seconds": 30}]}, expect_status=None)
        assert r["result"] is False and "storing task state failed" in r["message"], r
        time.sleep(3 * HEARTBEAT_S)
    finally:
        direct.config_set("maxmemory", 0)
    assert not marker.exists()

"""Request bodies: parsed within bounds (depth, values, numbers, strings), the large ones off the event loop."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gse.apiserver import bodies
from gse.common.errors import BadRequest


@pytest.mark.parametrize("raw,why", [
    (b'{"a": NaN}', "NaN"), (b'{"a": [Infinity]}', "Infinity"), (b'{"a": -Infinity}', "Infinity"),
    (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "nested deeper"),
    (b'{"a": "\\ud800"}', "surrogate"), (b'{"\\udfff": 1}', "surrogate"), (b'{"a": ["x\\udc00y"]}', "surrogate"),
    (b'{"a": ' + b"[" + b"0," * (bodies.MAX_NODES + 1) + b"0]}", "more than"),
    (b"[1, 2]", "object"), (b'"x"', "object"), (b"{", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
])
def test_body_bounds_refused_with_a_clear_message(raw, why):
    with pytest.raises(BadRequest) as exc:
        bodies.parse(raw)
    assert why in exc.value.message


def test_body_valid_shapes_pass():
    assert bodies.parse(b"") == {} and bodies.parse(b"  \n") == {}
    assert bodies.parse(b'{"a": "\\ud83d\\ude00", "b": [1.5, -2, true, null]}') == {"a": "\U0001F600",
                                                                                    "b": [1.5, -2, True, None]}
    deep = b'{"a": ' + b"[" * 62 + b"]" * 62 + b"}"
    assert bodies.parse(deep)["a"]


async def test_large_body_parsed_in_a_worker_while_the_loop_ticks():
    """A 16 MiB script body takes tens of ms in json.loads with the GIL held; parsed in a worker process the
    event loop keeps turning: its longest pause is shorter than parsing the body inline (each the best of
    three, so that a hiccup of a shared machine does not decide)."""
    parser = bodies.BodyParser()
    await parser.start()
    raw = json.dumps({"scripts": [{"script_content": ("true " + "a" * 100 + "\n") * (16 * 1024 * 1024 // 106)}],
                      "n": 1}).encode()
    bad = raw[:-1] + b', "x": "\\ud800"}'
    inline = []
    for _ in range(3):
        t0 = time.perf_counter()
        json.loads(raw)
        inline.append(time.perf_counter() - t0)
    gaps: list[float] = []

    async def ticker():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.ensure_future(ticker())
    worst = []
    try:
        for _ in range(3):
            gaps.clear()
            body = await parser.parse(raw)
            worst.append(max(gaps))
        with pytest.raises(BadRequest, match="surrogate"):
            await parser.parse(bad)
    finally:
        t.cancel()
        parser.close()
    assert body["n"] == 1 and len(body["scripts"][0]["script_content"]) == 16 * 1024 * 1024 // 106 * 106
    assert min(worst) < min(inline), (worst, inline)


def test_dependency_checks_are_iterative_and_linear():
    """A chain of a thousand atomic tasks (the most a request may hold) was a recursion a thousand deep on the
    API server and on the agent; the check is iterative and linear now."""
    from gse.common.taskgraph import dependency_cycle

    n = 200_000
    chain = {i: [i - 1] if i else [] for i in range(n)}
    t0 = time.perf_counter()
    assert dependency_cycle(chain) is None
    chain[0] = [n - 1]
    cycle = dependency_cycle(chain)
    assert time.perf_counter() - t0 < 2.0
    assert cycle[0] == cycle[-1] and len(cycle) == n + 1
    assert dependency_cycle({1: [2], 2: [1], 3: []}) in ([1, 2, 1], [2, 1, 2])
    assert dependency_cycle({1: [1]}) == [1, 1]


def test_task_frame_from_parts_parses_as_the_message_would():
    """Large task frames are assembled from serialized parts (gse/common/wire.py): what a task server and an
    agent parse is exactly the message the classes would have built, and assembling 16 MiB is one copy."""
    from gse.apiserver.task_endpoints import task_frame
    from gse.common import wire
    from gse.pb import agent_pb2 as apb
    from gse.pb import taskserver_pb2 as pb

    req = apb.TaskRequest(task_id="GSETASK:1:2", user="root", created_ms=5, request_id="r",
                          atomic_tasks=[apb.AtomicTask(atomic_task_id=0, command="true", timeout_seconds=3)])
    scripts = [(apb.TaskScript(name="a.sh", store_dir="/tmp"), b"#!/bin/sh\n" * 30),
               (apb.TaskScript(name="b.sh", store_dir="/opt"), "你好".encode() * 70_000), (apb.TaskScript(name="c"), b"")]
    parts = task_frame(req, scripts)
    want = apb.ServerFrame(task=apb.TaskRequest(
        task_id=req.task_id, user="root", created_ms=5, request_id="r", atomic_tasks=req.atomic_tasks,
        scripts=[apb.TaskScript(name=s.name, store_dir=s.store_dir, content=c) for s, c in scripts]))
    assert apb.ServerFrame.FromString(b"".join(parts)) == want
    dispatch = b"".join([*wire.length_delimited(pb.DispatchRequest, "frame", parts),
                         pb.DispatchRequest(agent_ids=["x", "y"]).SerializeToString()])
    assert pb.DispatchRequest.FromString(dispatch) == pb.DispatchRequest(frame=b"".join(parts), agent_ids=["x", "y"])
    assert [wire.varint(n) for n in (0, 1, 127, 128, 300, 2 ** 35)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x80\x80\x01"]

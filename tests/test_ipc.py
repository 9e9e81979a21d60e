"""Agent local IPC sockets (spec section 5): byte layouts, batching, fault isolation, socket file handling.

Frames are built and parsed here with struct from the spec's layouts, independent of gse.agent.ipc's encoders,
so a wrong byte layout in the module fails these tests.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import time

import pytest

from gse.agent.ipc import MessageSocketServer, Record, ReportSocketServer
from gse.testing.plugin import MessageClient, ReportClient

pytestmark = pytest.mark.timeout(30)

MAGIC = 0xDEADBEEF


def report_frame(proto_type: int, data_id: int, body: bytes, utc: int = 0xFFFFFFFF) -> bytes:
    return struct.pack(">IIIIII", proto_type, data_id, utc, len(body), 7, 9) + body


def message_frame(proto_type: int, body: bytes, seq: int = 1, *, magic: int = MAGIC, version: int = 6,
                  length: int | None = None, r0: int = 0, r1: int = 0) -> bytes:
    if length is None:
        length = 28 + len(body)
    return struct.pack(">IHHQIII", magic, proto_type, version, seq, length, r0, r1) + body


def keepalive_body(name: str) -> bytes:
    return json.dumps({"plugin_name": name, "version": "1.2.3", "pid": 4242, "status_code": 0,
                       "status": "ok", "remark": ""}).encode()


async def read_message_frame(reader: asyncio.StreamReader) -> tuple[tuple, bytes]:
    header = await asyncio.wait_for(reader.readexactly(28), 5)
    fields = struct.unpack(">IHHQIII", header)
    body = await asyncio.wait_for(reader.readexactly(fields[4] - 28), 5)
    return fields, body


async def eventually(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def is_closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(65536), 5) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


@pytest.fixture
def run_dir():
    path = tempfile.mkdtemp(dir="/tmp", prefix="ipc")
    yield path
    shutil.rmtree(path, ignore_errors=True)


IDENTITY = {"cloud_id": 3, "bk_agent_id": "0123456789abcdef0123456789abcdef"}


@pytest.fixture
async def report(run_dir):
    batches: list[list[Record]] = []
    identity = dict(IDENTITY)
    server = ReportSocketServer(os.path.join(run_dir, "ipc.state.report"), batches.append, lambda: identity,
                                max_message=64 * 1024)
    server.batches = batches
    server.ident = identity
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def message(run_dir):
    responds: list[tuple[dict, bytes, str]] = []
    server = MessageSocketServer(os.path.join(run_dir, "ipc.state.message"),
                                 lambda meta, payload, name: responds.append((meta, payload, name)),
                                 lambda: dict(IDENTITY, version="2.1.0"), max_message=1024 * 1024,
                                 max_write_buffer=256 * 1024)
    server.responds = responds
    await server.start()
    yield server
    await server.stop()


def records(server) -> list[Record]:
    return [r for batch in server.batches for r in batch]


# ---------------------------------------------------------------------------------------------------------------
# Report socket


async def test_report_data_frame_delivers_record_with_arrival_time(report):
    reader, writer = await asyncio.open_unix_connection(report.path)
    before = time.time_ns() // 1_000_000
    writer.write(report_frame(0x0C01, 1500001, b'{"cpu": 0.5}'))
    await eventually(lambda: report.stats["records"] == 1)
    after = time.time_ns() // 1_000_000
    rec = records(report)[0]
    assert (rec.data_id, rec.body) == (1500001, b'{"cpu": 0.5}')
    assert before <= rec.arrival_ms <= after  # utc_time in the frame (0xFFFFFFFF) is ignored
    assert report.stats["frames"] == 1 and report.stats["bytes"] == 24 + 12
    writer.close()


async def test_report_keepalive_reply_bytes_and_identity_changes(report):
    reader, writer = await asyncio.open_unix_connection(report.path)
    writer.write(report_frame(0x0A, 0, b""))
    proto_type, length = struct.unpack(">II", await asyncio.wait_for(reader.readexactly(8), 5))
    assert proto_type == 0x0A
    assert json.loads(await reader.readexactly(length)) == IDENTITY

    report.ident["cloud_id"] = 7  # identity() is read at reply time
    writer.write(report_frame(0x0A, 0, b""))
    _, length = struct.unpack(">II", await reader.readexactly(8))
    assert json.loads(await reader.readexactly(length))["cloud_id"] == 7
    assert report.stats["keepalives"] == 2 and report.stats["records"] == 0
    writer.close()


async def test_report_frames_from_one_read_arrive_in_one_batch_in_order(report):
    reader, writer = await asyncio.open_unix_connection(report.path)
    writer.write(b"".join(report_frame(0x0C01, 9, str(i).encode()) for i in range(200)))
    await eventually(lambda: report.stats["records"] == 200)
    assert [int(r.body) for r in records(report)] == list(range(200))
    assert max(len(b) for b in report.batches) > 1
    assert all(len({r.arrival_ms for r in batch}) == 1 for batch in report.batches)
    writer.close()


async def test_report_frame_split_across_reads_is_reassembled(report):
    reader, writer = await asyncio.open_unix_connection(report.path)
    frame = report_frame(0x0C01, 5, b"x" * 1000)
    for i in range(0, len(frame), 7):
        writer.write(frame[i:i + 7])
        await writer.drain()
        await asyncio.sleep(0)
    await eventually(lambda: report.stats["records"] == 1)
    assert records(report)[0].body == b"x" * 1000
    writer.close()


async def test_report_many_plugins_concurrently_keep_per_connection_order(report):
    plugins, per_plugin = 10, 1000

    async def plugin(i: int) -> None:
        client = await ReportClient().connect(report.path)
        for chunk in range(0, per_plugin, 100):
            await client.send_many((i, f"{i}:{n}".encode()) for n in range(chunk, chunk + 100))
        await client.send(i, f"{i}:last".encode())
        assert await client.keepalive() == IDENTITY
        await client.close()

    await asyncio.wait_for(asyncio.gather(*(plugin(i) for i in range(plugins))), 20)
    got: dict[int, list[bytes]] = {}
    for rec in records(report):
        got.setdefault(rec.data_id, []).append(rec.body)
    for i in range(plugins):
        assert got[i] == [f"{i}:{n}".encode() for n in range(per_plugin)] + [f"{i}:last".encode()]
    assert report.stats["connections"] == plugins and not report.stats["errors"]


@pytest.mark.parametrize("bad,reason", [
    (report_frame(0x0C02, 1, b"abc"), "unknown_type"),
    (struct.pack(">IIIIII", 0x0C01, 1, 0, 64 * 1024, 0, 0), "oversize"),  # header alone is enough to reject
    (report_frame(0x0C01, 1, b"0123456789")[:30], "truncated"),            # client closes mid-frame
])
async def test_report_bad_frame_closes_only_that_connection(report, bad, reason):
    good = await ReportClient().connect(report.path)
    assert await good.keepalive() == IDENTITY
    reader, writer = await asyncio.open_unix_connection(report.path)
    writer.write(report_frame(0x0C01, 1, b"before") + bad)
    await writer.drain()
    if reason == "truncated":
        writer.close()
    else:
        assert await is_closed_by_peer(reader)
    await eventually(lambda: report.stats["errors"].get(reason) == 1)
    assert report.stats["errors"] == {reason: 1}
    assert [r.body for r in records(report)] == [b"before"]  # good frames ahead of the bad one are kept
    await good.send(2, b"after")
    assert await good.keepalive() == IDENTITY
    await eventually(lambda: report.stats["records"] == 2)
    await good.close()
    writer.close()


async def test_report_callback_error_is_counted_and_connection_survives(run_dir):
    calls = []

    def on_records(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("boom")

    server = ReportSocketServer(os.path.join(run_dir, "r"), on_records, lambda: IDENTITY)
    await server.start()
    try:
        client = await ReportClient().connect(server.path)
        await client.send(1, b"a")
        await eventually(lambda: server.stats["errors"].get("callback") == 1)
        await client.send(1, b"b")
        assert await client.keepalive() == IDENTITY
        await eventually(lambda: len(calls) == 2)
        await client.close()
    finally:
        await server.stop()


async def test_report_pause_reading_holds_records_until_resumed(report):
    report.pause_reading()
    client = await ReportClient().connect(report.path)
    await client.send(1, b"held")
    await asyncio.sleep(0.1)
    assert report.stats["records"] == 0
    report.resume_reading()
    await eventually(lambda: report.stats["records"] == 1)
    await client.close()


# ---------------------------------------------------------------------------------------------------------------
# Message socket


async def test_message_keepalive_response_bytes(message):
    reader, writer = await asyncio.open_unix_connection(message.path)
    writer.write(message_frame(0x9006, keepalive_body("bkmonitorbeat"), seq=0x0102030405060708))
    (magic, ptype, version, seq, length, r0, r1), body = await read_message_frame(reader)
    assert (magic, ptype, version, seq, r0, r1) == (MAGIC, 0x9007, 6, 0x0102030405060708, 0, 0)
    assert length == 28 + len(body)
    assert json.loads(body) == {"agent_id": IDENTITY["bk_agent_id"], "version": "2.1.0", "cloud_id": 3,
                                "run_mode": 1, "status_code": 2, "status": "running"}
    info = message.plugins["bkmonitorbeat"]
    assert (info["version"], info["pid"], info["status"]) == ("1.2.3", 4242, "ok")
    writer.close()
    await eventually(lambda: "bkmonitorbeat" not in message.plugins)


@pytest.mark.parametrize("sdk_length", [False, True], ids=["canonical_length", "sdk_length_without_meta"])
async def test_message_respond_frame_reaches_callback(message, sdk_length):
    reader, writer = await asyncio.open_unix_connection(message.path)
    writer.write(message_frame(0x9006, keepalive_body("plug-a")))
    await read_message_frame(reader)
    meta = json.dumps({"name": "plug-a", "transmit_type": 0, "topic": "", "message_id": "m-1",
                       "session_id": "s-1"}).encode()
    payload = b"\x00\x01result\xff"
    length = 28 + len(payload) if sdk_length else 28 + len(meta) + len(payload)
    writer.write(message_frame(0x900A, meta + payload, length=length, r0=len(meta), r1=len(payload)))
    writer.write(message_frame(0x900A, meta + b"2", r0=len(meta), r1=1))  # next frame parses from the right place
    await eventually(lambda: len(message.responds) == 2)
    got_meta, got_payload, name = message.responds[0]
    assert got_meta["message_id"] == "m-1" and got_meta["session_id"] == "s-1"
    assert (got_payload, name) == (payload, "plug-a")
    assert message.responds[1][1] == b"2"
    assert not message.stats["errors"]
    writer.close()


async def test_message_dispatch_frame_bytes_and_targets(message):
    conns = {}
    for name in ("plug-a", "plug-b"):
        reader, writer = await asyncio.open_unix_connection(message.path)
        writer.write(message_frame(0x9006, keepalive_body(name)))
        await read_message_frame(reader)
        conns[name] = (reader, writer)

    assert message.dispatch("m-9", "s-9", b"do it", plugin="plug-b") == 1
    (magic, ptype, version, seq, length, r0, r1), body = await read_message_frame(conns["plug-b"][0])
    assert (magic, ptype, version) == (MAGIC, 0x9008, 6)
    assert length == 28 + r0 + r1 and r1 == len(b"do it")
    assert json.loads(body[:r0]) == {"message_id": "m-9", "session_id": "s-9"}
    assert body[r0:] == b"do it"

    assert message.dispatch("m-10", "", b"all", plugin=None) == 2
    for reader, _ in conns.values():
        fields, body = await read_message_frame(reader)
        assert fields[3] > seq and body[fields[5]:] == b"all"
    assert message.dispatch("m-11", "", b"x", plugin="nobody") == 0
    for _, writer in conns.values():
        writer.close()


def _respond(meta: bytes, payload: bytes, **kw) -> bytes:
    return message_frame(0x900A, meta + payload, r0=len(meta), r1=len(payload), **kw)


META = b'{"name":"bad","message_id":"m","session_id":""}'


@pytest.mark.parametrize("bad,reason", [
    (message_frame(0x9006, keepalive_body("bad"), magic=0xCAFEBABE), "bad_magic"),
    (message_frame(0x9006, keepalive_body("bad"), version=5), "bad_version"),
    (message_frame(0x9008, META, r0=len(META)), "unknown_type"),
    (_respond(META, b"xyz", length=28 + len(META) + 3 + 5), "bad_length"),
    (message_frame(0x900A, b"xyz", r0=0, r1=3), "bad_length"),
    (message_frame(0x9006, b"", length=28), "bad_length"),
    (struct.pack(">IHHQIII", MAGIC, 0x9006, 6, 1, 1024 * 1024 + 1, 0, 0), "oversize"),
    (message_frame(0x9006, b"{not json"), "bad_json"),
    (message_frame(0x9006, b'{"version": "1"}'), "bad_json"),
    (_respond(b"[1, 2]", b"p"), "bad_json"),
    (message_frame(0x9006, keepalive_body("bad"))[:40], "truncated"),
], ids=["magic", "version", "type", "respond_length", "respond_no_meta", "keepalive_empty", "oversize",
        "keepalive_json", "keepalive_no_name", "meta_not_object", "truncated"])
async def test_message_bad_frame_closes_only_that_connection(message, bad, reason):
    good = await MessageClient().connect(message.path)
    await good.keepalive("good")
    reader, writer = await asyncio.open_unix_connection(message.path)
    writer.write(bad)
    await writer.drain()
    if reason == "truncated":
        writer.close()
    else:
        assert await is_closed_by_peer(reader)
    await eventually(lambda: message.stats["errors"].get(reason) == 1)
    assert message.stats["errors"] == {reason: 1}
    assert not message.responds

    assert (await good.keepalive("good"))["agent_id"] == IDENTITY["bk_agent_id"]
    await good.respond({"name": "good", "transmit_type": 0, "topic": "", "message_id": "m", "session_id": ""}, b"ok")
    await eventually(lambda: len(message.responds) == 1)
    assert message.dispatch("m-2", "s", b"still here", plugin="good") == 1
    assert await good.receive(timeout=5) == ({"message_id": "m-2", "session_id": "s"}, b"still here")
    await good.close()
    writer.close()


async def test_message_plugin_that_never_reads_is_dropped_without_stalling_others(message):
    stuck_reader, stuck_writer = await asyncio.open_unix_connection(message.path)
    stuck_writer.write(message_frame(0x9006, keepalive_body("stuck")))
    await read_message_frame(stuck_reader)  # ...and never reads again
    good = await MessageClient().connect(message.path)
    await good.keepalive("good")

    payload = b"p" * (64 * 1024)
    sent_to = []
    for i in range(40):  # 2.5 MiB: far past the kernel buffer plus the 256 KiB write bound
        sent_to.append(message.dispatch(f"m-{i}", "", payload))
        meta, body = await good.receive(timeout=5)
        assert meta["message_id"] == f"m-{i}" and body == payload
    assert sent_to[0] == 2 and sent_to[-1] == 1
    assert message.stats["errors"] == {"slow_reader": 1}
    assert set(message.plugins) == {"good"}
    await good.close()
    stuck_writer.close()


async def test_message_client_round_trip(message):
    async with await MessageClient().connect(message.path) as client:
        resp = await client.keepalive("bkunifylogbeat", version="7.0")
        assert resp["cloud_id"] == 3 and resp["status_code"] == 2
        assert message.plugins["bkunifylogbeat"]["version"] == "7.0"
        assert message.dispatch("id", "sess", b"\x00" * 10, "bkunifylogbeat") == 1
        assert await client.receive(timeout=5) == ({"message_id": "id", "session_id": "sess"}, b"\x00" * 10)
        await client.respond({"name": "bkunifylogbeat", "transmit_type": 0, "topic": "t", "message_id": "id",
                              "session_id": "sess"}, b"done")
        await eventually(lambda: len(message.responds) == 1)
        assert message.responds[0][1:] == (b"done", "bkunifylogbeat")


async def test_message_client_receive_raises_when_agent_goes_away(message):
    client = await MessageClient().connect(message.path)
    await client.keepalive("p")
    await message.stop()
    with pytest.raises(ConnectionError):
        await client.receive(timeout=5)
    await client.close()


# ---------------------------------------------------------------------------------------------------------------
# Socket file


@pytest.mark.parametrize("mode", [0o660, 0o600])
async def test_socket_file_mode_is_0660_or_tighter(run_dir, mode):
    old_umask = os.umask(0)  # the loosest umask must not leak into the socket's mode
    try:
        server = ReportSocketServer(os.path.join(run_dir, "r"), lambda b: None, lambda: IDENTITY, mode=mode)
        await server.start()
    finally:
        os.umask(old_umask)
    try:
        st = os.stat(server.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode
        assert stat.S_IMODE(st.st_mode) & ~0o660 == 0
        assert [n for n in os.listdir(run_dir) if n != "r"] == []  # no temporary names left behind
    finally:
        await server.stop()


async def test_socket_stale_file_is_replaced_and_parent_created(run_dir):
    path = os.path.join(run_dir, "run", "gse", "ipc.state.message")
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays behind, nobody listens: what a crashed agent leaves
    server = MessageSocketServer(path, lambda *a: None, lambda: IDENTITY)
    await server.start()
    client = await MessageClient().connect(path)
    assert (await client.keepalive("p"))["agent_id"] == IDENTITY["bk_agent_id"]
    await client.close()
    await server.stop()
    assert not os.path.exists(path)
    await server.stop()  # idempotent

    fresh = os.path.join(run_dir, "new", "dir", "r")
    server = ReportSocketServer(fresh, lambda b: None, lambda: IDENTITY)
    await server.start()
    assert stat.S_ISSOCK(os.stat(fresh).st_mode)
    await server.stop()


async def test_socket_live_or_foreign_file_is_not_replaced(report, run_dir):
    other = ReportSocketServer(report.path, lambda b: None, lambda: IDENTITY)
    with pytest.raises(OSError) as exc:
        await other.start()
    assert exc.value.errno == errno.EADDRINUSE
    async with await ReportClient().connect(report.path) as client:
        assert await client.keepalive() == IDENTITY

    plain = os.path.join(run_dir, "plain")
    with open(plain, "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError):
        await ReportSocketServer(plain, lambda b: None, lambda: IDENTITY).start()
    with open(plain) as f:
        assert f.read() == "keep me"


async def test_report_identity_failure_skips_reply_and_keeps_connection(run_dir):
    state = {"fail": True}

    def identity():
        if state["fail"]:
            raise KeyError("bk_agent_id")
        return IDENTITY

    server = ReportSocketServer(os.path.join(run_dir, "r"), lambda b: None, identity)
    await server.start()
    try:
        async with await ReportClient().connect(server.path) as client:
            with pytest.raises(asyncio.TimeoutError):
                await client.keepalive(timeout=0.2)
            assert server.stats["errors"] == {"callback": 1}
            state["fail"] = False
            assert await client.keepalive() == IDENTITY
    finally:
        await server.stop()

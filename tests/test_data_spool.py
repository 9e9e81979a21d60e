"""The agent's data spool, the route filters and the data-server choice: pure logic, no daemons."""

from __future__ import annotations

import os
import random

import pytest

from gse.agent.data import choose_server, should_move
from gse.agent.spool import Spool
from gse.common import dataroutes as dr
from gse.common.errors import BadRequest
from gse.dataserver.route_table import compile_route

pytestmark = pytest.mark.timeout(30)


def payload(n: int, size: int = 100):
    return lambda batch_id: f"{batch_id}:".encode() + bytes([n % 256]) * size


def spool(tmp_path, **kw) -> Spool:
    s = Spool(tmp_path / "spool", max_bytes=kw.pop("max_bytes", 10_000), segment_bytes=kw.pop("segment_bytes", 1_000),
              cache_bytes=kw.pop("cache_bytes", 0))
    s.open()
    return s


def test_spool_append_ack_and_segments_removed_when_all_acked(tmp_path):
    s = spool(tmp_path)
    ids = [s.append(payload(i), 3)[0] for i in range(30)]
    assert ids == list(range(1, 31))
    assert s.unacked == 30 and len(s.segments) > 3
    assert s.read(5).startswith(b"5:")
    for b in ids[:-1]:
        assert s.ack(b)
    assert not s.ack(ids[0])                     # twice: not pending any more
    assert s.unacked == 1
    assert len(s.segments) == 1                 # only the one holding the last batch is left
    assert s.first_pending() == 30
    assert s.ack(30) and s.unacked == 0


def test_spool_survives_restart_and_cuts_a_torn_tail(tmp_path):
    s = spool(tmp_path)
    for i in range(20):
        s.append(payload(i), 2)
    for b in range(1, 6):
        s.ack(b)
    s.close()
    last = sorted((tmp_path / "spool").iterdir())[-1]
    with open(last, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")          # a torn write: the agent died mid-entry
    s2 = spool(tmp_path)
    # Every batch of a segment that was not fully acknowledged comes back (duplicates, never losses).
    assert s2.unacked >= 15
    assert s2.first_pending() <= 6
    assert s2.read(20).startswith(b"20:")
    assert s2.next_id == 21
    assert s2.append(payload(0), 1)[0] == 21    # ids keep growing across restarts
    assert os.path.getsize(last) == next(g for g in s2.segments if g.path == last).bytes   # torn entry cut off


def test_spool_bound_drops_the_oldest_and_counts_them(tmp_path):
    s = spool(tmp_path, max_bytes=3_000, segment_bytes=1_000)
    for i in range(100):
        s.append(payload(i), 5)
    assert s.total_bytes <= 3_000
    assert s.dropped_batches > 0 and s.dropped_records == 5 * s.dropped_batches
    assert s.unacked + s.dropped_batches == 100
    first = s.first_pending()
    assert first is not None and first > 1 and not s.pending(1)
    assert s.read(100) is not None


def test_spool_cache_serves_recent_batches_without_the_disk(tmp_path):
    s = spool(tmp_path, cache_bytes=1_000_000)
    bid, data = s.append(payload(7), 1)
    os.unlink(s.segments[-1].path)                # prove the read comes from memory
    assert s.read(bid) == data


def test_choose_server_prefers_the_least_loaded_and_respread_moves_a_share():
    rng = random.Random(7)
    picks = [choose_server({"a:1": 10, "b:1": 0}, rng) for _ in range(100)]
    assert picks.count("b:1") == 100
    assert choose_server({}, rng) is None
    moves = sum(1 for _ in range(1000) if should_move({"a:1": 4, "b:1": 0}, "a:1", rng) == "b:1")
    assert 400 < moves < 600                     # (4 - 2) / 4 of the agents move: half
    assert should_move({"a:1": 2, "b:1": 2}, "a:1", rng) is None
    assert should_move({"a:1": 3}, "a:1", rng) is None


STREAMTOS = {1: {"stream_to_id": 1, "stream_to": {"report_mode": "redis"}}}


def route_doc(filters, ands=(), ors=()):
    return {"channel_id": 5, "stream_filters": filters,
            "route": [{"name": "r", "stream_to": {"stream_to_id": 1, "redis": {"channel_name": "k"}},
                       "filter_name_and": list(ands), "filter_name_or": list(ors)}]}


def test_route_filters_on_data_and_protocol_fields():
    filters = dr.stream_filters([
        {"name": "second_is_web", "field_index": 1, "field_data_type": "string", "field_data_value": "web",
         "field_separator": "|", "field_in": "data"},
        {"name": "first_is_7", "field_index": 0, "field_data_type": "int", "field_data_value": 7,
         "field_separator": "|", "field_in": "data"},
        {"name": "cloud_0", "field_index": 1, "field_data_type": "int", "field_data_value": "0",
         "field_in": "protocol"},
    ])
    recs = [b"7|web|x", b"8|web|y", b"7|db|z", b"bad"]
    proto = (b"5", b"0", b"127.0.0.1", b"agent")
    (e,) = compile_route(route_doc(filters, ands=["second_is_web"]), STREAMTOS).entries
    assert e.select(recs, proto) == [b"7|web|x", b"8|web|y"]
    (e,) = compile_route(route_doc(filters, ands=["second_is_web", "first_is_7"]), STREAMTOS).entries
    assert e.select(recs, proto) == [b"7|web|x"]
    (e,) = compile_route(route_doc(filters, ors=["second_is_web", "first_is_7"]), STREAMTOS).entries
    assert e.select(recs, proto) == [b"7|web|x", b"8|web|y", b"7|db|z"]
    (e,) = compile_route(route_doc(filters, ands=["cloud_0"]), STREAMTOS).entries
    assert e.select(recs, proto) == recs
    assert e.select(recs, (b"5", b"3", b"", b"")) == []


@pytest.mark.parametrize("st, field", [
    ({"name": "x", "report_mode": "pulsar", "pulsar": {}}, "not supported"),
    ({"name": "x", "report_mode": "kafka"}, "'stream_to.kafka'"),
    ({"name": "x", "report_mode": "kafka", "kafka": {"storage_address": [{"ip": "1.2.3.4"}]}},
     "'stream_to.kafka.storage_address[0].port'"),
    ({"name": "x", "report_mode": "file", "data_log_path": "relative/dir"}, "'stream_to.data_log_path'"),
    ({"report_mode": "redis", "redis": {"storage_address": [{"ip": "h", "port": 1}]}}, "'stream_to.name'"),
    ({"name": "x", "report_mode": "mq"}, "'stream_to.report_mode'"),
])
def test_stream_to_errors_name_the_field(st, field):
    with pytest.raises(BadRequest) as exc:
        dr.stream_to(st)
    assert field in exc.value.message


async def test_file_output_rotates_and_stays_inside_its_roots(tmp_path):
    from gse.dataserver.outputs import FileSink, OutputError, SinkSettings
    settings = SinkSettings(file_roots=(str(tmp_path / "out"),), file_rotate_bytes=1000, file_backups=2)
    doc = {"stream_to": {"report_mode": "file", "data_log_path": str(tmp_path / "out" / "a")}}
    sink = FileSink(1, doc, settings)
    for i in range(30):
        await sink.submit([b"%03d" % i + b"x" * 96], "agent", {"file_name": "c.log"}, 5)
    names = sorted(p.name for p in (tmp_path / "out" / "a").iterdir())
    assert names == ["c.log", "c.log.1", "c.log.2"]
    out = tmp_path / "out" / "a"
    lines = [ln for n in ("c.log.2", "c.log.1", "c.log") for ln in (out / n).read_bytes().splitlines()]
    assert [int(ln[:3]) for ln in lines] == list(range(30 - len(lines), 30))     # the oldest rotated away
    assert all(os.path.getsize(tmp_path / "out" / "a" / n) <= 1000 for n in names)
    await sink.close()
    outside = FileSink(2, {"stream_to": {"report_mode": "file", "data_log_path": "/etc/gse-evil"}}, settings)
    with pytest.raises(OutputError):
        await outside.submit([b"x"], "agent", {}, 5)

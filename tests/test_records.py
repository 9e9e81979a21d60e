"""The shared record layer (gse/common/records/base.py): what a reader makes of what it finds in Redis, and what a
writer may write. Pure units: results built as dbproxy answers them."""

from __future__ import annotations

import dataclasses

import pytest

from gse.common.records import AgentRecord, TaskItem
from gse.common.records.base import hash_record
from gse.pb import dbproxy_pb2 as pb


def test_decode_reads_declared_fields_ignores_unknown_ones_and_defaults_malformed_or_missing_ones():
    r = pb.Result(ok=True, found=True, fields={"status": b"3", "error_code": b"oops", "exit_code": b"2.0",
                                               "truncated": b"1", "error_msg": b"\xffok", "a_newer_field": b"x"})
    item = TaskItem.decode(r)
    assert item.status == 3
    assert item.error_code == TaskItem().error_code          # malformed: the default, never a crash
    assert item.exit_code == 2                               # stored as a float: its integer part
    assert item.truncated is True and item.error_msg == "\ufffdok"
    assert item.start_time == 0                              # missing: the default
    assert TaskItem.decode(pb.Result(ok=True, found=False)) is None
    assert TaskItem.decode(pb.Result(ok=False, found=True, fields={"status": b"3"})) is None


def test_decode_of_a_pick_reads_only_present_names():
    names = ("online", "node", "report_time")
    op = AgentRecord.pick("a1", names=names)
    assert list(op.names) == list(names) and op.key == AgentRecord.key("a1")
    r = pb.Result(ok=True, found=True, values=[b"1", b"", b"bad"], present=[True, False, True])
    rec = AgentRecord.decode(r, names)
    assert rec.online is True and rec.node == AgentRecord().node and rec.report_time == AgentRecord().report_time


def test_unknown_names_are_a_programming_error_on_every_call():
    with pytest.raises(KeyError):
        AgentRecord.pick("a1", names=("online", "no_such_field"))
    with pytest.raises(KeyError):                            # validated once must not mean never again
        AgentRecord.pick("a1", names=("online", "no_such_field"))
    with pytest.raises(KeyError):
        TaskItem.update("t", "a", 0, no_such_field=1)


def test_one_encoding_written_under_many_keys():
    w = TaskItem.update("t", "", 0, ttl_ms=1000, status=5, error_msg="w")
    ops = [w.at(TaskItem.key("t", a, 0)).op() for a in ("a1", "a2")]
    assert [o.key for o in ops] == [TaskItem.key("t", "a1", 0), TaskItem.key("t", "a2", 0)]
    assert all(dict(o.fields) == {"status": b"5", "error_msg": b"w"} and o.ttl_ms == 1000 for o in ops)


def test_a_field_type_without_a_codec_is_refused_when_the_record_is_declared():
    with pytest.raises(TypeError):
        @hash_record(prefix="x:", ttl_ms=0)
        @dataclasses.dataclass
        class Bad:
            when: list = dataclasses.field(default_factory=list)


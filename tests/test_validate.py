"""The API's checks of request bodies (gse/apiserver/validate.py): one rule for what counts as an integer,
used by every endpoint and by the data route parser alike."""

from __future__ import annotations

import math

import pytest

from gse.apiserver import validate as v
from gse.common import dataroutes as dr
from gse.common.errors import BadRequest


@pytest.mark.parametrize("value,expected", [
    (42, 42), (0, 0), (-3, -3),
    (5.0, 5), (-0.0, 0),                      # JSON numbers without a fraction
    ("42", 42), (" 7 ", 7), ("-1", -1), ("+8", 8), ("007", 7),     # ids and settings sent as strings
    (2**63 - 1, 2**63 - 1), (str(-2**63), -2**63),
])
def test_integer_accepts_what_clients_send(value, expected):
    got = v.integer({"n": value}, "n")
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [
    True, False,                              # a boolean is no count
    5.5, math.nan, math.inf, -math.inf,
    "4.0", "0x10", "1_000", "1e3", "--5", "5-", "", " ", "²", "٣",   # int() would take some of these
    [], {}, [1],
])
def test_integer_refuses_the_rest_naming_the_field(value):
    with pytest.raises(BadRequest, match=r"^'spec\.n' must be an integer$"):
        v.integer({"n": value}, "n", where="spec.")


@pytest.mark.parametrize("value,message", [
    (2**63, "must be at most 9223372036854775807"),
    (-2**63 - 1, "must be at least -9223372036854775808"),
    ("9" * 5000, "must be at most 9223372036854775807"),      # never handed to int(): bounded work
    ("-" + "9" * 40, "must be at least -9223372036854775808"),
    (1e300, "must be at most 9223372036854775807"),
])
def test_integer_is_bounded_to_int64_by_default(value, message):
    with pytest.raises(BadRequest, match=message):
        v.integer({"n": value}, "n")


def test_integer_bounds_absence_and_default():
    assert v.integer({"n": "3"}, "n", minimum=1, maximum=3) == 3
    with pytest.raises(BadRequest, match="'n' must be at least 1"):
        v.integer({"n": "0"}, "n", minimum=1)
    with pytest.raises(BadRequest, match="'n' must be at most 3"):
        v.integer({"n": 4.0}, "n", maximum=3)
    with pytest.raises(BadRequest, match="'n' is required"):
        v.integer({"n": None}, "n")
    assert v.integer({}, "n", required=False, default=None) is None
    assert v.integer({}, "n", required=False, default=9) == 9


def test_integer_value_names_list_entries():
    assert v.integer_value("3", "deps[0]") == 3
    with pytest.raises(BadRequest, match=r"^'deps\[1\]' must be an integer$"):
        v.integer_value(True, "deps[1]")


def _stream_to(port) -> dict:
    return {"name": "kafka-1", "report_mode": "kafka",
            "kafka": {"storage_address": [{"ip": "127.0.0.1", "port": port}]}}


def test_data_routes_use_the_same_integer_rule():
    """bkmonitor-datalink and bk-monitor send ports and ids as JSON integers; the parser takes the same
    strings and integral numbers as every other endpoint, and refuses the same booleans and fractions."""
    for port in (9092, "9092", 9092.0):
        assert dr.stream_to(_stream_to(port))["kafka"]["storage_address"] == [
            {"ip": "127.0.0.1", "port": 9092}]
    for port in (True, 9092.5, "9092.0"):
        with pytest.raises(BadRequest, match=r"'stream_to\.kafka\.storage_address\[0\]\.port' must be an integer"):
            dr.stream_to(_stream_to(port))
    with pytest.raises(BadRequest, match="must be at most 65535"):
        dr.stream_to(_stream_to("65536"))

"""The data-route API (spec section 3) on a real API server and ZooKeeper: v1 and v2 paths, clear errors
naming the field, ZooKeeper as the source of truth."""

from __future__ import annotations

import json

import pytest
from kazoo.client import KazooClient

from conftest import _new_cluster, api_for, isolated

pytestmark = pytest.mark.timeout(60)

V1 = "/api/c/compapi/v2/gse/config_"
V2 = "/api/v2/data/"
OP = {"operator_name": "admin"}


@pytest.fixture(scope="module")
def rc(infra, tmp_path_factory):
    c = _new_cluster(tmp_path_factory.mktemp("routes"), infra)
    c.start_dbproxy()
    c.start_apiserver()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def rapi(rc):
    return api_for(rc)


# Each test starts from the same routes and stream_tos in ZooKeeper (conftest.Baseline).
_isolated = isolated("rc")


def kafka_st(name="k1"):
    return {"name": name, "report_mode": "kafka",
            "kafka": {"storage_address": [{"ip": "127.0.0.1", "port": 9092}], "sasl_passwd": "secret"}}


def test_streamto_and_route_lifecycle_on_both_paths(rc, rapi):
    r = rapi.call(f"{V1}add_streamto", {"operation": OP, "metadata": {"plat_name": "p1", "label": {"env": "t"}},
                                         "stream_to": kafka_st()})
    assert r["code"] == 0, r
    sid = r["data"]["stream_to_id"]
    r = rapi.call(f"{V2}add_streamto", {"operation": OP, "metadata": {"plat_name": "p1"},
                                        "stream_to": {"name": "r1", "report_mode": "redis", "redis": {
                                            "storage_address": [{"ip": "127.0.0.1", "port": 6379}]}}})
    rid = r["data"]["stream_to_id"]
    assert rid != sid

    q = rapi.call(f"{V2}query_streamto", {"condition": {"plat_name": "p1", "label": {"env": "t"}}})["data"]
    assert [x["metadata"]["stream_to_id"] for x in q] == [sid]
    assert q[0]["stream_to"]["kafka"]["sasl_passwd"] == "******"         # secrets are not handed out

    route = [{"name": "to-kafka", "stream_to": {"stream_to_id": sid, "kafka": {"topic_name": "t1"}}},
             {"name": "to-redis", "stream_to": {"stream_to_id": rid, "redis": {"channel_name": "c1",
                                                                                "data_type": "list"}},
              "filter_name_and": ["f1"]}]
    filters = [{"name": "f1", "field_index": 0, "field_data_type": "string", "field_data_value": "a",
                "field_separator": "|", "field_in": "data"}]
    r = rapi.call(f"{V1}add_route", {"operation": OP, "metadata": {"plat_name": "p1"}, "route": route,
                                     "stream_filters": filters})
    assert r["code"] == 0, r
    cid = r["data"]["channel_id"]
    assert cid >= 2_000_000
    r = rapi.call(f"{V2}add_route", {"operation": OP, "metadata": {"plat_name": "p1", "channel_id": 1500},
                                     "route": route[:1]})
    assert r["data"]["channel_id"] == 1500
    r = rapi.call(f"{V2}add_route", {"operation": OP, "metadata": {"plat_name": "p1", "channel_id": 1500},
                                     "route": route[:1]})
    assert r["code"] == 1000400 and "already has a route" in r["message"]

    # ZooKeeper holds exactly what the API answers.
    zk = KazooClient(hosts=rc.zookeeper)
    zk.start(10)
    try:
        doc = json.loads(zk.get(f"{rc.zk_root}/config/data/route/{cid}")[0])
    finally:
        zk.stop()
        zk.close()
    q = rapi.call(f"{V1}query_route", {"condition": {"plat_name": "p1", "channel_id": cid}})["data"]
    assert q[0]["route"] == doc["route"] and q[0]["stream_filters"] == doc["stream_filters"]
    assert q[0]["route"][1]["stream_to"]["redis"] == {"channel_name": "c1", "data_type": "list", "data_set": "",
                                                      "biz_id": 0}

    r = rapi.call(f"{V2}update_route", {"operation": OP, "condition": {"channel_id": cid, "plat_name": "p1"},
                                        "specification": {"route": route[:1]}})
    assert r["code"] == 0, r
    q = rapi.call(f"{V2}query_route", {"condition": {"plat_name": "p1"}})["data"]
    assert {x["metadata"]["channel_id"] for x in q} == {cid, 1500}
    assert [e["name"] for e in next(x for x in q if x["metadata"]["channel_id"] == cid)["route"]] == ["to-kafka"]

    # A stream_to in use cannot go away or change its kind; once unused it can.
    r = rapi.call(f"{V2}delete_streamto", {"operation": OP, "condition": {"stream_to_id": sid, "plat_name": "p1"}})
    assert r["code"] == 1000400 and "used by the routes" in r["message"]
    r = rapi.call(f"{V2}update_streamto", {"operation": OP, "condition": {"stream_to_id": sid, "plat_name": "p1"},
                                           "specification": {"stream_to": {"name": "x", "report_mode": "file",
                                                                           "data_log_path": "/var/log/x"}}})
    assert r["code"] == 1000400 and "report_mode" in r["message"]
    for c in (cid, 1500):
        r = rapi.call(f"{V1}delete_route", {"operation": OP, "condition": {"channel_id": c, "plat_name": "p1"}})
        assert r["code"] == 0, r
    r = rapi.call(f"{V1}delete_streamto", {"operation": OP, "condition": {"stream_to_id": sid, "plat_name": "p1"}})
    assert r["code"] == 0, r
    assert rapi.call(f"{V2}query_route", {"condition": {"plat_name": "p1"}})["data"] == []


@pytest.mark.parametrize("path, body, field", [
    ("add_streamto", {"metadata": {"plat_name": "p"}, "stream_to": kafka_st()}, "'operation'"),
    ("add_streamto", {"operation": OP, "stream_to": kafka_st()}, "'metadata'"),
    ("add_streamto", {"operation": OP, "metadata": {"plat_name": "p"},
                      "stream_to": {"name": "x", "report_mode": "pulsar", "pulsar": {}}}, "not supported"),
    ("add_streamto", {"operation": OP, "metadata": {"plat_name": "p"},
                      "stream_to": {"name": "x", "report_mode": "redis", "redis": {"storage_address": []}}},
     "'stream_to.redis.storage_address'"),
    ("add_route", {"operation": OP, "metadata": {"plat_name": "p"}, "route": []}, "'route'"),
    ("add_route", {"operation": OP, "metadata": {"plat_name": "p"},
                   "route": [{"stream_to": {"stream_to_id": 99999}}]}, "'route[0].stream_to.stream_to_id'"),
    ("add_route", {"operation": OP, "metadata": {"plat_name": "p", "channel_id": "x"}, "route": []},
     "'metadata.channel_id'"),
    ("add_route", {"operation": OP, "metadata": {"plat_name": "p"}, "route": [{"stream_to": {"stream_to_id": 1}}],
                   "stream_filters": [{"name": "f", "field_index": 9, "field_data_value": "1",
                                       "field_in": "protocol"}]}, "'stream_filters[0].field_index'"),
    ("update_route", {"operation": OP, "condition": {"plat_name": "p"}, "specification": {"route": []}},
     "'condition.channel_id'"),
    ("delete_route", {"operation": OP, "condition": {"channel_id": 424242, "plat_name": "p"}},
     "'condition.channel_id'"),
    ("query_streamto", {"condition": {}}, "'condition.plat_name'"),
])
def test_bad_definitions_answered_with_the_field(rapi, path, body, field):
    for prefix in (V1, V2):
        r = rapi.call(f"{prefix}{path}", body)
        assert r["code"] == 1000400 and r["result"] is False, r
        assert field in r["message"], r["message"]


def test_route_entry_must_match_its_stream_to_kind(rapi):
    sid = rapi.call(f"{V2}add_streamto", {"operation": OP, "metadata": {"plat_name": "p2"},
                                          "stream_to": kafka_st("k2")})["data"]["stream_to_id"]
    r = rapi.call(f"{V2}add_route", {"operation": OP, "metadata": {"plat_name": "p2"},
                                     "route": [{"stream_to": {"stream_to_id": sid, "redis": {"channel_name": "x"}}}]})
    assert r["code"] == 1000400 and "'route[0].stream_to.kafka'" in r["message"]
    r = rapi.call(f"{V2}add_route", {"operation": OP, "metadata": {"plat_name": "p2"},
                                     "route": [{"stream_to": {"stream_to_id": sid, "kafka": {"topic_name": "t"}},
                                                "filter_name_or": ["nope"]}]})
    assert r["code"] == 1000400 and "'route[0].filter_name_or[0]'" in r["message"]

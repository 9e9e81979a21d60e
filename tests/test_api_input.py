"""The API envelope, auth and bad input: clear codes and messages naming the field, never a 500."""

from __future__ import annotations

import json

import pytest
from conftest import ApiClient, _new_cluster

STATE = "/api/v2/cluster/list_agent_state"
STATUS = "/api/c/compapi/v2/gse/get_agent_status"


@pytest.fixture(scope="module")
def cluster(infra, tmp_path_factory):
    """One cluster for the whole module: these tests only read."""
    c = _new_cluster(tmp_path_factory.mktemp("api"), infra)
    c.start_dbproxy()
    c.start_apiserver()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def api(cluster):
    return ApiClient(cluster.api_url(), cluster.app_code, cluster.app_secret)


def test_auth_header_and_body_forms(api):
    body = {"hosts": [{"ip": "10.0.0.1", "bk_cloud_id": 0}]}
    assert api.call(STATUS, body)["code"] == 0
    status, payload = api.raw(STATUS, json.dumps({**body, "bk_app_code": api.app_code,
                                                   "bk_app_secret": api.app_secret}).encode())
    assert status == 200 and payload["code"] == 0


@pytest.mark.parametrize("headers,body_extra,why", [
    ({}, {}, "no credentials"),
    ({"X-Bkapi-Authorization": "{not json"}, {}, "malformed header"),
    ({"X-Bkapi-Authorization": json.dumps({"bk_app_code": "nobody", "bk_app_secret": "x"})}, {}, "unknown app"),
    ({}, {"bk_app_code": "gse-dev-wrong", "bk_app_secret": "nope"}, "wrong body credentials"),
])
def test_auth_failures_are_401(api, headers, body_extra, why):
    body = {"hosts": [{"ip": "10.0.0.1", "bk_cloud_id": 0}], **body_extra}
    status, payload = api.raw(STATUS, json.dumps(body).encode(), headers)
    assert status == 401, why
    assert payload["code"] == 1000401 and payload["result"] is False and payload["request_id"]


def test_wrong_secret_for_known_app(api):
    headers = {"X-Bkapi-Authorization": json.dumps({"bk_app_code": api.app_code, "bk_app_secret": "wrong"})}
    status, payload = api.raw(STATE, json.dumps({"agent_id_list": ["a" * 32]}).encode(), headers)
    assert status == 401 and payload["code"] == 1000401


def test_malformed_json(api):
    status, payload = api.raw(STATE, b'{"agent_id_list": [', api.auth_header())
    assert status == 200 and payload["code"] == 1000400 and "JSON" in payload["message"]
    status, payload = api.raw(STATE, b'[1, 2]', api.auth_header())
    assert payload["code"] == 1000400 and "object" in payload["message"]


@pytest.mark.parametrize("path,body,field", [
    (STATE, {}, "agent_id_list"),
    (STATE, {"agent_id_list": "abc"}, "agent_id_list"),
    (STATE, {"agent_id_list": [1, 2]}, "agent_id_list[0]"),
    (STATE, {"agent_id_list": ["x" * 65]}, "agent_id_list[0]"),
    (STATUS, {"hosts": [{"ip": 5, "bk_cloud_id": 0}]}, "hosts[0].ip"),
    (STATUS, {"hosts": [{"ip": "10.0.0.1", "bk_cloud_id": "zero"}]}, "hosts[0].bk_cloud_id"),
    (STATUS, {"hosts": [{"ip": "not-an-ip", "bk_cloud_id": 0}]}, "hosts[0].ip"),
    (STATUS, {"hosts": [{"bk_cloud_id": 0}]}, "hosts[0].ip"),
    (STATUS, {"hosts": ["10.0.0.1"]}, "hosts[0]"),
])
def test_wrong_types_name_the_field(api, path, body, field):
    payload = api.call(path, body)
    assert payload["code"] == 1000400 and payload["result"] is False
    assert field in payload["message"], payload["message"]


def test_unknown_fields_ignored(api):
    body = {"agent_id_list": ["a" * 32], "no_request": True, "nodeman_spec": {"x": 1}, "atomicTaskNum": 3}
    assert api.call(STATE, body)["code"] == 1011003     # found nothing, but accepted the request
    body = {"hosts": [{"ip": "10.0.0.1", "bk_cloud_id": 0, "bk_supplier_id": 0, "extra": [1]}],
            "bk_supplier_account": "0"}
    assert api.call(STATUS, body)["code"] == 0


def test_oversized_host_list(api):
    payload = api.call(STATE, {"agent_id_list": [f"{i:032x}" for i in range(5001)]})
    assert payload["code"] == 1000400 and "5000" in payload["message"]
    hosts = [{"ip": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", "bk_cloud_id": 0} for i in range(5001)]
    assert api.call(STATUS, {"hosts": hosts})["code"] == 1000400


def test_trailing_slash_and_unknown_path(api):
    assert api.call(STATE + "/", {"agent_id_list": ["a" * 32]})["code"] == 1011003
    payload = api.call("/api/v2/cluster/no_such_thing", {}, expect_status=404)
    assert payload["code"] == 1000404 and payload["result"] is False


def test_thousand_hosts_constant_round_trips(api, cluster):
    """A query for 1,000 hosts costs two dbproxy batches, not one call per host."""
    import re
    import urllib.request

    port = cluster.dbproxies[0].info["metrics_port"]

    def batches() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        m = re.search(r"^gse_dbproxy_batch_seconds_count (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    hosts = [{"ip": f"10.1.{i // 256}.{i % 256}", "bk_cloud_id": 0} for i in range(1000)]
    before = batches()
    assert api.call(STATUS, {"hosts": hosts})["code"] == 0
    # Other daemons write sessions concurrently, but no agents are attached in this test: only the API's.
    assert batches() - before <= 2


@pytest.mark.parametrize("prefix", ["/prod", "/api/bk-gse/prod", "/api/bk-gse/stag", "/stage-2"])
def test_api_gateway_prefixes_route_v1_and_v2_paths(api, prefix):
    """bk-nodeman and bk-gse-sdk call `<gateway>/api/bk-gse/<stage>/api/v2/...`; through the gateway's own
    host the path is `/<stage>/api/v2/...`; v1 paths travel the same way."""
    r = api.call(prefix + STATE + "/", {"agent_id_list": ["a" * 32]})
    assert r["code"] == 1011003, r          # routed: the endpoint answered "none found"
    r = api.call(prefix + STATUS, {"hosts": [{"ip": "10.0.0.1", "bk_cloud_id": 0}]})
    assert r["code"] == 0 and r["data"]["0:10.0.0.1"]["bk_agent_alive"] == 0
    status, payload = api.raw(prefix + "/api/v2/cluster/no_such_thing", b"{}", api.auth_header())
    assert status == 404 and payload["code"] == 1000404


def test_tenant_header_accepted_and_checked(api):
    """bk-job and bk-cmdb send X-Bk-Tenant-Id on every call (their default tenant is "default")."""
    for tenant in ("default", "tenant-1", "t.x_2"):
        status, payload = api.raw(STATE, json.dumps({"agent_id_list": ["a" * 32]}).encode(),
                                  {**api.auth_header(), "X-Bk-Tenant-Id": tenant})
        assert status == 200 and payload["code"] == 1011003, (tenant, payload)
    status, payload = api.raw(STATE, json.dumps({"agent_id_list": ["a" * 32]}).encode(),
                              {**api.auth_header(), "X-Bk-Tenant-Id": "x" * 65})
    assert status == 200 and payload["code"] == 1000400 and "X-Bk-Tenant-Id" in payload["message"]

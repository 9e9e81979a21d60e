"""Test harness: real ZooKeeper and Redis once per session, real daemons as subprocesses per test.

Each test gets its own ZooKeeper root and Redis key prefix on the shared servers, so tests never see each
other's state. When a test fails, the logs of every process it started are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from gse.devcluster import Cluster, wait_for

HEARTBEAT_S = 1.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def infra_dir():
    d = Path(tempfile.mkdtemp(prefix="gse-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def infra(infra_dir):
    """One ZooKeeper and two Redis nodes for the whole session."""
    c = Cluster(infra_dir / "infra")
    c.start_zookeeper()
    c.start_redis()
    c.start_redis()
    yield c
    c.stop()


def _new_cluster(base: Path, infra: Cluster | None, **kw) -> Cluster:
    tag = uuid.uuid4().hex[:10]
    c = Cluster(base, zk_root=f"/t{tag}/gse", key_prefix=f"t{tag}:", heartbeat_interval_s=HEARTBEAT_S,
                heartbeat_misses=3, zk_session_timeout_s=4.0, **kw)
    if infra is not None:
        c.zookeeper = infra.zookeeper
        c.redis = list(infra.redis)
    return c


@pytest.fixture
def make_cluster(request, infra, tmp_path):
    """Factory: `make_cluster(own_infra=False)`; own_infra=True starts private ZooKeeper/Redis."""
    made: list[Cluster] = []

    def factory(own_infra: bool = False, **kw) -> Cluster:
        c = _new_cluster(tmp_path / f"cluster{len(made)}", None if own_infra else infra, **kw)
        made.append(c)
        return c

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for c in made:
        if failed:
            print(f"\n===== logs of {c.base} =====\n{c.logs(40)}")
        c.stop()


@pytest.fixture
def cluster(make_cluster):
    """A cluster on the shared infrastructure with dbproxy, two task servers and an API server (no agents)."""
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_taskserver()
    c.start_apiserver()
    return c


class ApiClient:
    def __init__(self, url: str, app_code: str, app_secret: str):
        self.url, self.app_code, self.app_secret = url.rstrip("/"), app_code, app_secret

    def raw(self, path: str, data: bytes | None, headers: dict | None = None, method: str = "POST"):
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def auth_header(self) -> dict:
        return {"X-Bkapi-Authorization": json.dumps({"bk_app_code": self.app_code, "bk_app_secret": self.app_secret})}

    def call(self, path: str, body: dict, expect_status: int | None = 200) -> dict:
        status, payload = self.raw(path, json.dumps(body).encode(),
                                   {"Content-Type": "application/json", **self.auth_header()})
        if expect_status is not None:
            assert status == expect_status, payload
        return payload

    def states(self, ids: list[str]) -> dict[str, dict]:
        r = self.call("/api/v2/cluster/list_agent_state", {"agent_id_list": ids})
        return {d["bk_agent_id"]: d for d in (r["data"] or [])}

    def infos(self, ids: list[str]) -> dict[str, dict]:
        r = self.call("/api/v2/cluster/list_agent_info", {"agent_id_list": ids})
        return {d["bk_agent_id"]: d for d in (r["data"] or [])}

    def wait_alive(self, ids: list[str], timeout: float = 30.0, alive: bool = True) -> dict[str, dict]:
        want = 2 if alive else None

        def check():
            s = self.states(ids)
            if alive:
                return s if all(s.get(i, {}).get("status_code") == want for i in ids) else None
            return s if all(s.get(i, {}).get("status_code") != 2 for i in ids) else None

        return wait_for(check, timeout, f"agents {'alive' if alive else 'offline'}: {ids}", interval=0.1)


@pytest.fixture
def api(cluster) -> ApiClient:
    return ApiClient(cluster.api_url(), cluster.app_code, cluster.app_secret)


def api_for(c: Cluster) -> ApiClient:
    return ApiClient(c.api_url(), c.app_code, c.app_secret)


def start_agents(c: Cluster, n: int, **kw) -> list:
    procs = [c.start_agent(wait=False, **kw) for _ in range(n)]
    for p in procs:
        c.wait_healthy(p)
    return procs


@pytest.fixture(autouse=True)
def _no_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

"""Test harness: real ZooKeeper and Redis once per session, real daemons as subprocesses per test.

Each test gets its own ZooKeeper root and Redis key prefix on the shared servers, so tests never see each
other's state. When a test fails, the logs of every process it started are printed.
"""

from __future__ import annotations

import asyncio
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


async def start_callback_server(*names: str):
    """A local HTTP server standing in for a platform's message-slot callback (spec section 9): a POST to
    `<base>/<name>` lands, decoded from JSON, in `posts[name]` and is answered `{"result": true}`. Returns
    (base, posts, runner); the caller ends it with `await runner.cleanup()`."""
    from aiohttp import web
    posts = {n: asyncio.Queue() for n in names}

    async def callback(request):
        await posts[request.match_info["which"]].put(await request.json())
        return web.json_response({"result": True})

    app = web.Application()
    app.router.add_post("/cb/{which}", callback)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}/cb", posts, runner


class FrameInbox:
    """A framelink handler for tests that speak the agent link by hand: keeps every ServerFrame it gets (decoded)
    and sets `lost` when the link ends."""

    def __init__(self):
        self.frames: list = []
        self.lost = asyncio.Event()

    def link_open(self, link):
        pass

    def link_frame(self, link, body):
        from gse.pb import agent_pb2
        self.frames.append(agent_pb2.ServerFrame.FromString(body))

    def link_lost(self, link, exc):
        self.lost.set()

    async def wait(self, pred, timeout=10.0) -> bool:
        """Until `pred(frames)` holds (True) or the link is lost first (False); TimeoutError after `timeout` s."""
        async with asyncio.timeout(timeout):
            while not pred(self.frames):
                if self.lost.is_set():
                    return False
                await asyncio.sleep(0.01)
        return True


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


class Baseline:
    """A module-scoped cluster as it was before a test, put back after it, so that no test sees what another
    left: the cluster-wide configuration in ZooKeeper (`<root>/config`: data routes and stream_tos, message
    slots, high-risk command rules, apps), the processes (a daemon the test killed or stopped is started
    again; one it started is stopped), and work still under way (task runs and transfers on the agents,
    transfers on the file servers, which a test that returns early leaves behind: the next test would share
    their seeds and pool slots). Used as `with Baseline(cluster): yield` in an autouse fixture."""

    QUIET_S = 30.0

    def __init__(self, cluster: Cluster):
        self.c = cluster
        self.groups = {g: [p.name for p in self._group(g)] for g in self.GROUPS}

    GROUPS = ("dbproxies", "taskservers", "apiservers", "fileservers", "dataservers", "agents")

    def _group(self, name: str) -> list:
        return getattr(self.c, name)

    def __enter__(self):
        from kazoo.client import KazooClient
        self.zk = KazooClient(hosts=self.c.zookeeper)
        self.zk.start(10)
        self.config = self._snapshot(f"{self.c.zk_root}/config")
        return self

    def __exit__(self, *exc):
        try:
            self._processes()
            self._restore(f"{self.c.zk_root}/config")
            self._quiet()
        finally:
            self.zk.stop()
            self.zk.close()
        return False

    def _snapshot(self, path: str) -> dict[str, bytes]:
        out = {}
        if self.zk.exists(path):
            out[path] = self.zk.get(path)[0]
            for child in self.zk.get_children(path):
                out.update(self._snapshot(f"{path}/{child}"))
        return out

    def _restore(self, root: str) -> None:
        now = self._snapshot(root)
        # Documents the test made go; directories the daemons made on first use stay (the API server makes
        # its route directories once, and their sequence counters must go on: ids are never reused).
        for path in sorted(set(now) - set(self.config), key=len, reverse=True):     # children first
            if now[path]:
                self.zk.delete(path, recursive=True)
        for path in sorted(self.config, key=len):
            if path not in now:
                self.zk.create(path, self.config[path], makepath=True)
            elif now[path] != self.config[path]:
                self.zk.set(path, self.config[path])

    def _processes(self) -> None:
        for g in self.GROUPS:
            group, names = self._group(g), self.groups[g]
            for p in list(group):
                if p.name not in names:             # started by the test
                    p.stop()
                    group.remove(p)
                    if p in self.c.procs:
                        self.c.procs.remove(p)
                elif not p.alive():                 # killed or stopped by the test
                    self.c.restart(p)

    def _quiet(self) -> None:
        def health(p) -> dict:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p.info['metrics_port']}/healthz", timeout=2) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as exc:       # 503: not healthy (an agent not attached yet)
                return json.loads(exc.read())

        def busy() -> list[str]:
            out = []
            for a in self.c.agents:
                h = health(a)
                if not h.get("ok") or h.get("tasks_running") or h.get("transfers"):
                    out.append(f"{a.name}: {h}")
            out += [f"{f.name}: {health(f)}" for f in self.c.fileservers if health(f).get("transfers")]
            return out

        left: list[str] = []

        def quiet() -> bool:
            left[:] = busy()
            return not left

        try:
            wait_for(quiet, self.QUIET_S, "the shared cluster quiet after the test", interval=0.1)
        except Exception:
            raise AssertionError(f"the test left work under way on the shared cluster: {left}") from None


def isolated(cluster_fixture: str):
    """An autouse fixture for a module whose tests share the cluster fixture named `cluster_fixture`: each of
    its tests finds the cluster as the previous one found it (Baseline). `_isolated = isolated("fc")`."""
    @pytest.fixture(autouse=True)
    def _isolated(request):
        if cluster_fixture not in request.fixturenames:
            yield
            return
        with Baseline(request.getfixturevalue(cluster_fixture)):
            yield
    return _isolated


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

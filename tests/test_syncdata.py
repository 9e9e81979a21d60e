"""syncdata end to end (spec section 11): identities from a CMDB (a fake faithful to bk-cmdb's published
resource-watch API, tests/fakecmdb.py) and from files reach every agent's host identity file, atomically and
within seconds; a collector-like reader watching the mtime only ever sees whole JSON; an offline agent gets
its file when it attaches; a new leader goes on from the CMDB cursor the last one kept (and reads everything
again when the CMDB no longer keeps it); per-host results through the API.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import api_for
from fakecmdb import FakeCmdb

from gse.devcluster import wait_for
from gse.syncdata.identity import IdentityError, make, render
from gse.syncdata.sources import FileSource

pytestmark = pytest.mark.timeout(150)

FAST = {"push_interval_s": 0.2, "offline_check_s": 0.5, "retry_base_s": 1.0, "retry_max_s": 4.0,
        "full_check_s": 30.0}


def hostid_of(agent) -> Path:
    return Path(agent.info["data_dir"]).parent / "host" / "hostid"


def read_identity(agent) -> dict | None:
    try:
        return json.loads(hostid_of(agent).read_bytes())
    except (OSError, ValueError):
        return None


class Collector(threading.Thread):
    """Reads the identity file whenever its mtime changes, as collectors do; counts what it could not parse."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.reads = 0
        self.bad: list[str] = []
        self.running = True

    def run(self):
        last = None
        while self.running:
            try:
                st = self.path.stat()
            except OSError:
                time.sleep(0.002)
                continue
            sig = (st.st_mtime_ns, st.st_ino, st.st_size)
            if sig != last:
                last = sig
                try:
                    data = self.path.read_bytes()
                except FileNotFoundError:
                    continue
                self.reads += 1
                try:
                    doc = json.loads(data)
                    assert isinstance(doc["associations"], dict)
                except (ValueError, KeyError, AssertionError):
                    self.bad.append(data[:200].decode("utf-8", "replace"))
            time.sleep(0.001)


@pytest.fixture
def cmdb():
    fake = FakeCmdb(hold_s=1.0)
    fake.start()
    yield fake
    fake.stop()


def cmdb_source(fake: FakeCmdb) -> dict:
    return {"cmdb": {"url": fake.url, "app_code": fake.app_code, "app_secret": fake.app_secret,
                     "watch_hold_s": fake.hold_s, "timeout_s": 10.0}}


def leader(c):
    for p in c.syncdatas:
        if p.alive():
            try:
                if c.healthz(p).get("leader"):
                    return p
            except OSError:
                pass
    return None


def test_syncdata_follows_the_cmdb_to_every_hosts_file(make_cluster, cmdb):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    a1, a2 = c.start_agent(wait=False), c.start_agent(wait=False)
    for a in (a1, a2):
        c.wait_healthy(a)
    api = api_for(c)
    api.wait_alive([a1.info["bk_agent_id"], a2.info["bk_agent_id"]])
    # Host 1 knows its agent id (CMDB 3.10+); host 2 is known by cloud and inner IP only.
    cmdb.set_host(1, bk_host_innerip=a1.info["ip"] + ",10.9.9.1", bk_agent_id=a1.info["bk_agent_id"])
    cmdb.add_relation(1, biz=2, set_id=5, module=31)
    cmdb.set_host(2, bk_host_innerip=a2.info["ip"], bk_agent_id="")
    cmdb.add_relation(2, biz=3, set_id=6, module=40)
    c.start_syncdata(**cmdb_source(cmdb), **FAST)
    c.start_syncdata(**cmdb_source(cmdb), **FAST)
    wait_for(lambda: leader(c), 20, "a syncdata leader")
    d1 = wait_for(lambda: read_identity(a1), 20, "host 1's identity file", interval=0.1)
    assert d1 == {"bk_host_id": 1, "bk_cloud_id": 0, "bk_host_innerip": f"{a1.info['ip']},10.9.9.1",
                  "bk_os_type": "1", "bk_supplier_account": "0", "process": [],
                  "associations": {"31": {"bk_biz_id": 2, "bk_set_id": 5, "bk_module_id": 31, "layer": None}}}
    d2 = wait_for(lambda: read_identity(a2), 20, "host 2's identity file (by cloud:ip)", interval=0.1)
    assert d2["bk_host_id"] == 2 and list(d2["associations"]) == ["40"]
    st = hostid_of(a1).stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == os.geteuid()
    # What the CMDB asked for is what bk-cmdb documents: host watched with its fields, relations without.
    watched = [b for n, b in cmdb.bodies if n == "resource_watch"]
    assert {b["bk_resource"] for b in watched} == {"host", "host_relation"}
    assert all(b["bk_fields"] for b in watched if b["bk_resource"] == "host")

    # Changes, one after another, each reaching the file; a collector watching the mtime sees whole JSON only.
    reader = Collector(hostid_of(a1))
    reader.start()
    try:
        for i in range(12):
            t0 = time.monotonic()
            cmdb.add_relation(1, biz=2, set_id=5, module=100 + i)
            wait_for(lambda: str(100 + i) in (read_identity(a1) or {}).get("associations", {}), 15,
                     f"change {i} on the host", interval=0.02)
            assert time.monotonic() - t0 < 10
    finally:
        reader.running = False
        reader.join(5)
    assert reader.bad == [] and reader.reads >= 12
    r = api.call("/api/v2/cluster/get_host_identity_result",
                 {"agent_id_list": [a1.info["bk_agent_id"], f"0:{a2.info['ip']}", "0:10.255.0.1"]})
    assert r["code"] == 0, r
    res = {d["bk_agent_id"]: d for d in r["data"]}
    assert res[a1.info["bk_agent_id"]]["status"] == "synced"
    assert res[a1.info["bk_agent_id"]]["md5"] == hashlib.md5(hostid_of(a1).read_bytes()).hexdigest()
    assert res[f"0:{a2.info['ip']}"]["status"] == "synced" and res["0:10.255.0.1"]["status"] == "none"

    # An offline agent: pending while away, its file as soon as it is back.
    a2.stop()
    api.wait_alive([a2.info["bk_agent_id"]], alive=False)
    cmdb.add_relation(2, biz=3, set_id=6, module=41)
    wait_for(lambda: api.call("/api/v2/cluster/get_host_identity_result", {"agent_id_list": [a2.info["bk_agent_id"]]})
             ["data"][0]["status"] == "pending", 15, "host 2 pending while offline", interval=0.2)
    assert "41" not in read_identity(a2)["associations"]
    a2 = c.restart(a2)
    wait_for(lambda: "41" in (read_identity(a2) or {}).get("associations", {}), 20, "host 2's file after reattach",
             interval=0.1)

    # The leader dies; the other goes on from the cursor it kept (a change made meanwhile is not lost) ...
    first = leader(c)
    first.signal(signal.SIGKILL)
    cmdb.set_host(1, bk_os_type="2")
    wait_for(lambda: (read_identity(a1) or {}).get("bk_os_type") == "2", 30, "the change after the leader died",
             interval=0.1)
    # ... and reads everything again when the CMDB no longer keeps its cursor.
    second = leader(c)
    assert second is not None and second is not first
    reads = cmdb.calls.get("list_hosts_without_biz", 0)
    cmdb.expire_events()
    wait_for(lambda: cmdb.gone_answers >= 1, 15, "the leader told its cursor is gone")
    cmdb.set_host(1, bk_os_type="3")
    wait_for(lambda: (read_identity(a1) or {}).get("bk_os_type") == "3", 30, "the change after the cursor expired",
             interval=0.1)
    assert cmdb.calls["list_hosts_without_biz"] > reads


def test_syncdata_file_source_and_a_host_that_cannot_write(make_cluster, tmp_path):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    a1 = c.start_agent()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    a2 = c.start_agent(hostid_path=str(blocker / "hostid"))       # its directory is a file: 123
    api = api_for(c)
    api.wait_alive([a1.info["bk_agent_id"], a2.info["bk_agent_id"]])
    src = tmp_path / "identities"
    src.mkdir()
    doc = {"bk_host_id": 9, "bk_cloud_id": 0, "bk_host_innerip": a1.info["ip"], "bk_os_type": "1",
           "bk_supplier_account": "0", "associations": {"7": {"bk_biz_id": 1, "bk_set_id": 2, "bk_module_id": 7,
                                                            "layer": None}},
           "process": [{"bk_process_id": 1, "bk_process_name": "nginx", "bind_ip": "0.0.0.0", "port": "80",
                        "protocol": "1", "bk_func_name": "nginx", "bk_start_param_regex": "", "bind_info": []}]}
    (src / "h9.json").write_text(json.dumps(doc))
    (src / "bad.json").write_text("{not json")
    (src / "h10.json").write_text(json.dumps({**doc, "bk_host_id": 10, "bk_agent_id": a2.info["bk_agent_id"]}))
    c.start_syncdata(file={"path": str(src), "poll_s": 0.3}, **FAST)
    got = wait_for(lambda: read_identity(a1), 20, "the file source's identity on the host", interval=0.1)
    assert got == doc
    (src / "h9.json").write_text(json.dumps({**doc, "bk_os_type": "2"}))
    wait_for(lambda: (read_identity(a1) or {}).get("bk_os_type") == "2", 20, "the changed file", interval=0.1)

    def failed():
        r = api.call("/api/v2/cluster/get_host_identity_result", {"agent_id_list": [a2.info["bk_agent_id"]]})
        return r["data"][0] if r["data"][0]["status"] == "failed" else None
    res = wait_for(failed, 20, "host 10's failure reported", interval=0.2)
    assert res["error_code"] == 123 and "hostid" in res["error_msg"]
    assert c.healthz(c.syncdatas[0])["source_stats"]["errors"] >= 1          # bad.json, logged and skipped


def test_identity_documents_are_canonical_and_checked():
    host = {"bk_host_id": 5, "bk_cloud_id": 2, "bk_host_innerip": ["10.0.0.5", "10.0.0.6"], "bk_os_type": "1",
            "bk_supplier_account": "0", "bk_agent_id": ""}
    rels = [{"bk_biz_id": 1, "bk_set_id": 2, "bk_module_id": 3, "bk_host_id": 5}]
    a, b = render(host, rels), render(dict(reversed(list(host.items()))), rels)
    assert a.content == b.content and a.md5 == hashlib.md5(a.content).hexdigest()
    assert a.ref == "2:10.0.0.5" and json.loads(a.content)["bk_host_innerip"] == "10.0.0.5,10.0.0.6"
    assert render({**host, "bk_agent_id": "ab" * 16}, rels).ref == "ab" * 16
    with pytest.raises(IdentityError, match="associations"):
        make({"bk_host_id": 1, "bk_host_innerip": "10.0.0.1"}, "file")
    # the project's one integer rule: CMDB ids as numbers or digit strings; fractions and booleans refused
    assert make({"bk_host_id": "7", "bk_cloud_id": 2.0, "bk_host_innerip": "10.0.0.1", "associations": {}},
                "file").cloud_id == 2
    for bad in ("x", 5.5, True, "0x10"):
        with pytest.raises(IdentityError, match="bk_host_id"):
            make({"bk_host_id": bad, "associations": {}}, "file")


def test_file_source_reports_changes_and_removals(tmp_path):
    doc = {"bk_host_id": 1, "bk_host_innerip": "10.0.0.1", "associations": {}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.json").write_text(json.dumps([{**doc, "bk_host_id": 2, "bk_host_innerip": "10.0.0.2"}]))
    src = FileSource(str(tmp_path))
    found, removed = src.scan()
    assert sorted(i.ref for i in found) == ["0:10.0.0.1", "0:10.0.0.2"] and removed == []
    assert src.scan() is None
    (tmp_path / "b.json").unlink()
    found, removed = src.scan()
    assert found == [] and removed == ["0:10.0.0.2"]

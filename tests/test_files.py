"""File distribution end to end: API -> task servers -> file server + tracker -> real agents with libtorrent."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ApiClient, _new_cluster, api_for, start_agents

from gse.cli import still_running
from gse.devcluster import wait_for

SEND = "/api/v2/task/async_transfer_file"
RESULT = "/api/v2/task/get_transfer_file_result"
STOP = "/api/v2/task/async_terminate_transfer_file"


@pytest.fixture(scope="module")
def fc(infra, tmp_path_factory):
    """Two task servers (so targets sit on a server other than the coordinator), a file server, 4 agents."""
    c = _new_cluster(tmp_path_factory.mktemp("files"), infra)
    c.start_dbproxy()
    c.start_taskserver()
    c.start_taskserver()
    c.start_fileserver()
    c.start_apiserver()
    agents = start_agents(c, 4, files={"bt_stall_s": 3.0})
    api_for(c).wait_alive([a.info["bk_agent_id"] for a in agents])
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fapi(fc) -> ApiClient:
    return api_for(fc)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    (d / "small.txt").write_bytes(b"small file\n")
    (d / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024 + 123))
    tree = d / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(tree / "run.sh", 0o750)
    (tree / "sub" / "data.bin").write_bytes(os.urandom(40_000))
    os.chmod(tree / "sub", 0o700)
    for n in ("a.log", "b.log", "c.txt"):
        (d / n).write_text(n)
    return d


def ids(c) -> list[str]:
    return [a.info["bk_agent_id"] for a in c.agents]


def task(source_agent, store_dir, name, targets, dest, **target) -> dict:
    return {"source": {"file_name": name, "store_dir": str(store_dir), "agent": {"bk_agent_id": source_agent}},
            "target": {"file_name": target.pop("file_name", ""), "store_dir": str(dest),
                       "agents": [{"bk_agent_id": t, "user": target.pop("user", "root")} for t in targets], **target}}


def send(api, tasks, **body) -> str:
    r = api.call(SEND, {"timeout_seconds": body.pop("timeout_seconds", 60), "auto_mkdir": body.pop("auto_mkdir", True),
                        "tasks": tasks, **body})
    assert r["code"] == 0, r
    return r["data"]["result"]["task_id"]


def wait_done(api, task_id, agents, timeout=60) -> list[dict]:
    def done():
        r = api.call(RESULT, {"task_id": task_id, "agents": [{"bk_agent_id": a} for a in agents]})
        return r if not still_running(r) else None
    return wait_for(done, timeout, f"transfer {task_id}", interval=0.2)["data"]["result"]


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def leftovers(d) -> list[str]:
    return [os.path.join(r, f) for r, _ds, fs in os.walk(d) for f in fs if f.startswith(".gse-")]


def test_small_file_direct_with_md5(fc, fapi, src, tmp_path):
    a = ids(fc)
    digest = md5(src / "small.txt")
    tid = send(fapi, [task(a[0], src, "small.txt", [a[1], a[2]], tmp_path / "d", file_name="renamed.txt")])
    items = wait_done(fapi, tid, a[1:3])
    assert [i["error_code"] for i in items] == [0, 0], items
    assert {i["content"]["type"] for i in items} == {"direct"}
    assert md5(tmp_path / "d" / "renamed.txt") == digest
    bad = send(fapi, [{"source": {"file_name": "small.txt", "store_dir": str(src), "md5": "0" * 32,
                                  "agent": {"bk_agent_id": a[0]}},
                       "target": {"store_dir": str(tmp_path / "e"), "agents": [{"bk_agent_id": a[1]}]}}])
    (item,) = wait_done(fapi, bad, [a[1]])
    assert item["error_code"] == 127 and not (tmp_path / "e" / "small.txt").exists()


def test_large_file_by_bittorrent_to_several(fc, fapi, src, tmp_path):
    a = ids(fc)
    dests = [tmp_path / f"t{i}" for i in range(3)]
    tid = send(fapi, [task(a[0], src, "big.bin", [t], d) for t, d in zip(a[1:], dests)])
    items = wait_done(fapi, tid, a[1:])
    assert all(i["error_code"] == 0 and i["content"]["type"] == "bt" for i in items), items
    assert all(i["content"]["size"] == (src / "big.bin").stat().st_size for i in items)
    for d in dests:
        assert md5(d / "big.bin") == md5(src / "big.bin")
        assert leftovers(d) == []


def test_finished_target_forgets_its_journal_before_the_transfer_ends(fc, fapi, src, tmp_path):
    """A target whose result is stored has nothing to resume: its journal goes at once, even while another
    target (stopped here) keeps the transfer open. A restart must not take a finished transfer up again."""
    a = ids(fc)
    journal = Path(fc.agents[1].info["data_dir"]) / "files"
    slow = fc.agents[2]
    slow.signal(signal.SIGSTOP)
    try:
        tid = send(fapi, [task(a[0], src, "small.txt", [a[1], a[2]], tmp_path / "j")])
        wait_for(lambda: any(i["bk_agent_id"] == a[1] and i["error_code"] == 0 for i in fapi.call(
            RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 30, "the fast target done")
        wait_for(lambda: not list(journal.glob("*.target")), 10, "the finished target's journal gone")
        r = fapi.call(RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[2]}]})
        assert r["data"]["result"][0]["error_code"] == 115      # the transfer itself is still open
    finally:
        slow.signal(signal.SIGCONT)
    wait_done(fapi, tid, a[1:3])


def test_directory_tree_keeps_modes_and_empty_dirs(fc, fapi, src, tmp_path):
    a = ids(fc)
    tid = send(fapi, [task(a[0], src, "tree", [a[3]], tmp_path)])
    items = wait_done(fapi, tid, [a[3]])
    assert all(i["error_code"] == 0 for i in items) and len(items) == 5   # tree, empty, sub, run.sh, data.bin
    t = tmp_path / "tree"
    assert (t / "empty").is_dir() and (t / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert oct((t / "run.sh").stat().st_mode & 0o777) == oct(0o750)
    assert oct((t / "sub").stat().st_mode & 0o777) == oct(0o700)
    assert md5(t / "sub" / "data.bin") == md5(src / "tree" / "sub" / "data.bin")


def test_wildcard_and_regex_patterns(fc, fapi, src, tmp_path):
    a = ids(fc)
    tid = send(fapi, [task(a[0], src, "*.log", [a[1]], tmp_path / "w"),
                      task(a[0], src, "regex:[bc]\\.(log|txt)", [a[2]], tmp_path / "r")])
    w = wait_done(fapi, tid, [a[1]])
    r = wait_done(fapi, tid, [a[2]])
    assert sorted(os.listdir(tmp_path / "w")) == ["a.log", "b.log"] and len(w) == 2
    assert sorted(os.listdir(tmp_path / "r")) == ["b.log", "c.txt"] and len(r) == 2


def test_owner_permission_and_auto_mkdir(fc, fapi, src, tmp_path):
    name = f"gsefile{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-M", name], check=True)
    try:
        a = ids(fc)
        dest = tmp_path / "deep" / "er"
        tid = send(fapi, [task(a[0], src, "small.txt", [a[1]], dest, owner=name, permission=640)])
        (item,) = wait_done(fapi, tid, [a[1]])
        assert item["error_code"] == 0
        st = (dest / "small.txt").stat()
        assert st.st_uid == pwd.getpwnam(name).pw_uid and oct(st.st_mode & 0o777) == oct(0o640)
        missing = tmp_path / "nope"
        tid = send(fapi, [task(a[0], src, "small.txt", [a[1]], missing)], auto_mkdir=False)
        (item,) = wait_done(fapi, tid, [a[1]])
        assert item["error_code"] == 123 and not missing.exists()
    finally:
        subprocess.run(["userdel", name], check=False)


def test_source_missing_and_not_writable(fc, fapi, src, tmp_path):
    a = ids(fc)
    tid = send(fapi, [task(a[0], src, "no-such-file", [a[1]], tmp_path / "x")])
    (item,) = wait_done(fapi, tid, [a[1]])
    assert item["error_code"] == 104
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o755)                  # root's; a plain user may not write here
    tid = send(fapi, [task(a[0], src, "small.txt", [a[1]], locked, user="nobody")])
    (item,) = wait_done(fapi, tid, [a[1]])
    assert item["error_code"] == 123 and os.listdir(locked) == []


def test_path_escapes_refused(fc, fapi, src, tmp_path):
    a = ids(fc)
    r = fapi.call(SEND, {"tasks": [task(a[0], src, "small.txt", [a[1]], tmp_path, file_name="../evil")]})
    assert r["code"] == 1000400 and "file_name" in r["message"]
    r = fapi.call(SEND, {"tasks": [task(a[0], src, "small.txt", [a[1]], "relative/dir")]})
    assert r["code"] == 1000400 and "store_dir" in r["message"]
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "tree")       # the tree would land through a symlink leaving the target dir
    tid = send(fapi, [task(a[0], src, "tree", [a[1]], dest)])
    items = wait_done(fapi, tid, [a[1]])
    assert all(i["error_code"] == 123 for i in items if i["content"]["source_file_name"] != "tree")
    assert os.listdir(outside) == []


def test_tracker_refuses_strangers(fc):
    url = fc.fileservers[0].info["tracker_url"]
    q = "?info_hash=" + "%01" * 20 + "&peer_id=" + "a" * 20 + "&port=6881&gse_token=bogus"
    body = urllib.request.urlopen(url + q, timeout=5).read()
    assert b"failure reason" in body


def test_terminate_and_timeout_leave_nothing(fc, fapi, src, tmp_path):
    a = ids(fc)
    # Waits are bounds for a loaded machine (they cost nothing when it is not).
    slow = {"download_speed": 0.5}           # MB/s: the 6 MB file takes ~12 s
    tid = send(fapi, [task(a[0], src, "big.bin", [a[1]], tmp_path / "t")], **slow)
    wait_for(lambda: any(i["content"]["progress"] > 0 for i in fapi.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 60, "progress")
    assert fapi.call(STOP, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["code"] == 0
    (item,) = wait_done(fapi, tid, [a[1]], timeout=60)
    assert item["error_code"] == 126
    wait_for(lambda: leftovers(tmp_path / "t") == [], 10, "partial files removed")
    assert not (tmp_path / "t" / "big.bin").exists()

    tid = send(fapi, [task(a[0], src, "big.bin", [a[2]], tmp_path / "o")], timeout_seconds=3, **slow)
    (item,) = wait_done(fapi, tid, [a[2]], timeout=60)
    assert item["error_code"] == 120, item
    wait_for(lambda: leftovers(tmp_path / "o") == [], 10, "partial files removed")
    assert not (tmp_path / "o" / "big.bin").exists()


def test_gse_push_cli(fc, src, tmp_path):
    import sys
    a = fc.agents
    args = [sys.executable, "-m", "gse.cli", "push", "--api-url", fc.api_url(), "--app-code", fc.app_code,
            "--app-secret", fc.app_secret, "--mode", "600"]
    ok = subprocess.run(args + [f"0:{a[0].info['ip']}:{src}/tree", f"{a[2].info['bk_agent_id']}:{tmp_path}/p"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok 1, failed 0" in ok.stdout and "100%" in ok.stdout
    assert oct((tmp_path / "p" / "tree" / "run.sh").stat().st_mode & 0o777) == oct(0o600)
    bad = subprocess.run(args + [f"0:{a[0].info['ip']}:{src}/missing", f"0:{a[2].info['ip']}:{tmp_path}/q"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "failed 1" in bad.stdout and "does not exist" in bad.stdout


# ---- tests with their own cluster ----------------------------------------------------------------------

def _tc(*args) -> None:
    r = subprocess.run(["tc", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"tc {' '.join(args)}: {r.stderr.strip()} (qdiscs on lo: " \
        f"{subprocess.run(['tc', 'qdisc', 'show', 'dev', 'lo'], capture_output=True, text=True).stdout.strip()})"


class BitTorrentCut:
    """Starve every BitTorrent packet to or from one loopback address; its gRPC traffic is untouched.

    This kernel has neither the prio/netem qdiscs nor the drop action, so matching packets are steered
    into an HTB class of 8 bit/s: connections may open, but no data gets through (measured: 0 bytes in
    5 s while the sender queued 3.8 MB). Everything else on lo goes through an unlimited default class.
    """

    def __init__(self):
        self.active = False

    def cut(self, ip: str) -> None:
        if not self.active:
            _tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1", "r2q", "1000000")
            self.active = True
            _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit")
            _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:2", "htb", "rate", "8bit", "ceil", "8bit",
                "burst", "1", "cburst", "1")
            _tc("qdisc", "add", "dev", "lo", "parent", "1:2", "handle", "20:", "pfifo", "limit", "1")
        # To its BitTorrent port (60016-60031), and from it to anyone's BitTorrent port.
        for direction in ("dst", "src"):
            _tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", direction, f"{ip}/32", "match", "ip", "dport", "60016", "0xfff0", "flowid", "1:2")

    def lift(self) -> None:
        if self.active:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)
            self.active = False


@pytest.fixture
def bittorrent_cut():
    cut = BitTorrentCut()
    yield cut
    cut.lift()


def _pair(make_cluster, stall_s: float) -> tuple:
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_fileserver()
    c.start_apiserver()
    agents = [c.start_agent(index=70 + i, ip=f"127.0.0.{70 + i}", wait=False, files={"bt_stall_s": stall_s})
              for i in range(2)]
    for p in agents:
        c.wait_healthy(p)
    api = api_for(c)
    a = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(a)
    return c, api, agents, a


def test_mixed_mode_when_bittorrent_fails(make_cluster, src, tmp_path, bittorrent_cut):
    _c, api, agents, a = _pair(make_cluster, 2.0)
    bittorrent_cut.cut(agents[0].info["ip"])      # the source cannot be reached by BitTorrent at all
    tid = send(api, [task(a[0], src, "big.bin", [a[1]], tmp_path / "m")])
    (item,) = wait_done(api, tid, [a[1]], timeout=60)
    assert item["error_code"] == 0 and item["content"]["type"] == "mixed"
    assert md5(tmp_path / "m" / "big.bin") == md5(src / "big.bin")


def test_back_to_bittorrent_when_it_recovers(make_cluster, src, tmp_path, bittorrent_cut):
    _c, api, agents, a = _pair(make_cluster, 2.0)
    bittorrent_cut.cut(agents[0].info["ip"])
    tid = send(api, [task(a[0], src, "big.bin", [a[1]], tmp_path / "r")], download_speed=0.5)
    log = agents[1].log_path
    wait_for(lambda: "fetching the missing pieces directly" in log.read_text(), 30, "the switch to direct")
    bittorrent_cut.lift()                          # the network heals while the relay is still fetching
    wait_for(lambda: "BitTorrent recovered" in log.read_text(), 30, "BitTorrent to take over again")
    (item,) = wait_done(api, tid, [a[1]], timeout=60)
    assert item["error_code"] == 0 and item["content"]["type"] == "mixed"
    assert md5(tmp_path / "r" / "big.bin") == md5(src / "big.bin")


def test_target_killed_mid_download_resumes(make_cluster, src, tmp_path):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_fileserver()
    c.start_apiserver()
    agents = start_agents(c, 2)
    api = api_for(c)
    a = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(a)
    tid = send(api, [task(a[0], src, "big.bin", [a[1]], tmp_path / "k")], download_speed=1)
    wait_for(lambda: any(i["content"]["progress"] >= 20 for i in api.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 30, "20% progress")
    agents[1].kill()
    assert not (tmp_path / "k" / "big.bin").exists()
    c.restart(agents[1])
    (item,) = wait_done(api, tid, [a[1]], timeout=60)
    assert item["error_code"] == 0
    assert md5(tmp_path / "k" / "big.bin") == md5(src / "big.bin") and leftovers(tmp_path / "k") == []

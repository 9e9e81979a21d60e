"""File distribution end to end: API -> task servers -> file server + tracker -> real agents with libtorrent."""

from __future__ import annotations

import hashlib
import json
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

from conftest import ApiClient, _new_cluster, api_for, isolated, start_agents

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


# Every transfer of a test on the shared cluster ended (seeds removed), agents back (conftest.Baseline).
_isolated = isolated("fc")


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


def wait_done(api, task_id, agents, timeout=60, path=RESULT, body=None) -> list[dict]:
    """The items once every one is final (a running item carries 115, whatever the top-level code says)."""
    def done():
        r = api.call(path, body if body is not None else
                     {"task_id": task_id, "agents": [{"bk_agent_id": a} for a in agents]})
        items = (r.get("data") or {}).get("result") or []
        return items if items and not still_running(r) else None
    return wait_for(done, timeout, f"transfer {task_id}", interval=0.2)


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def leftovers(d) -> list[str]:
    """What the agents' temporary files and private download directories left in `d`."""
    return [os.path.join(r, f) for r, ds, fs in os.walk(d) for f in fs + ds if f.startswith(".gse-")]


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
        # the private download directories go when the transfer ends (they seed on until then)
        wait_for(lambda: leftovers(d) == [], 15, "private download directories removed")


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


def target_journal(c, bk_agent_id, task_id):
    """The FileTarget a target agent journaled for the transfer of `task_id` (what a host holds of it)."""
    from gse.pb import agent_pb2 as apb
    proc = next(p for p in c.agents if p.info["bk_agent_id"] == bk_agent_id)
    for path in (Path(proc.info["data_dir"]) / "files").glob("*.target"):
        ft = apb.FileTarget.FromString(path.read_bytes())
        if ft.task_id == task_id:
            return ft
    return None


def file_service_call(c, address, method, request):
    """Call FileService `method` on `address` as a host would (the agents' certificate); returns the reply, or
    the (status code, details) it failed with."""
    import asyncio

    import grpc

    from gse.common import rpc
    from gse.common.tls import TLSMaterial
    from gse.pb import file_pb2_grpc as fpb_grpc

    async def go():
        ch = rpc.make_channel(TLSMaterial.from_dir(c.certs_dir, "agent"), address)
        try:
            call = getattr(fpb_grpc.FileServiceStub(ch), method)
            if method == "Upload":
                return await call(iter(request), timeout=10)
            return [chunk async for chunk in call(request, timeout=10)]
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        finally:
            await ch.close()
    return asyncio.run(go())


def test_a_target_s_token_cannot_upload_and_the_source_s_still_does(fc, fapi, tmp_path):
    """Only the source uploads a transfer's direct-mode entries: a target host using its own token (read from
    its journal, which holds no other member's token that may upload) is refused PERMISSION_DENIED, counted,
    and nothing it sent reaches the relay; the source's upload of the same entry arrives whole everywhere."""
    import grpc

    from gse.pb import file_pb2 as fpb
    a = ids(fc)
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "small.txt").write_bytes(b"the source's own bytes\n")
    (mix / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    # One transfer (a directory): a direct entry, and a BitTorrent one slow enough to keep it running.
    tid = send(fapi, [task(a[0], tmp_path, "mix", [a[1], a[2]], tmp_path / "dst")], download_speed=0.5)
    ft = wait_for(lambda: target_journal(fc, a[1], tid), 30, "the target's journal")
    assert a[0] not in ft.tokens and set(ft.tokens) == {a[1], a[2]}
    small = next(e.index for e in ft.entries if e.rel_path.endswith("small.txt"))
    big = next(e.index for e in ft.entries if e.rel_path.endswith("big.bin"))
    mine = ft.tokens[a[1]]
    for index in (small, big):
        forged = fpb.Chunk(transfer_id=ft.transfer_id, index=index, offset=0, data=b"forged by a target\n",
                           size=19, last=True, token=mine)
        code, details = file_service_call(fc, ft.fileserver, "Upload", [forged])
        assert code == grpc.StatusCode.PERMISSION_DENIED and "source" in details, (code, details)
    m = urllib.request.urlopen(f"http://127.0.0.1:{fc.fileservers[0].info['metrics_port']}/metrics",
                               timeout=5).read().decode()
    assert any(line.startswith('gse_fileserver_refused_total{reason="not_uploader"}') and float(line.split()[-1]) >= 2
               for line in m.splitlines()), m
    # Nothing was stored for the BitTorrent entry (its source never uploads it) ...
    code, _ = file_service_call(fc, ft.fileserver, "Fetch", fpb.FetchRequest(
        transfer_id=ft.transfer_id, index=big, token=ft.tokens[a[2]], wait_seconds=1))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # ... and the direct entry is the source's upload, fetched by the other target like any fetch.
    chunks = file_service_call(fc, ft.fileserver, "Fetch", fpb.FetchRequest(
        transfer_id=ft.transfer_id, index=small, token=ft.tokens[a[2]], wait_seconds=10))
    assert b"".join(ch.data for ch in chunks) == b"the source's own bytes\n"
    items = wait_done(fapi, tid, a[1:3], timeout=60)
    assert all(i["error_code"] == 0 for i in items), items
    assert (tmp_path / "dst" / "mix" / "small.txt").read_bytes() == b"the source's own bytes\n"
    assert md5(tmp_path / "dst" / "mix" / "big.bin") == md5(mix / "big.bin")


def test_terminate_and_timeout_leave_nothing(fc, fapi, src, tmp_path):
    a = ids(fc)
    # Waits are bounds for a loaded machine (they cost nothing when it is not).
    slow = {"download_speed": 0.5}           # MB/s: the 6 MB file takes ~12 s
    tid = send(fapi, [task(a[0], src, "big.bin", [a[1]], tmp_path / "t")], **slow)
    wait_for(lambda: any(i["content"]["progress"] > 0 for i in fapi.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 60, "progress")
    running = fapi.call(RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})
    # Spec section 4 (correction): a known transfer answers 0 while it runs, its running items 115.
    assert running["code"] == 0 and running["result"] is True
    assert [i["error_code"] for i in running["data"]["result"]] == [115]
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


def test_terminate_named_targets_only_the_others_finish(fc, fapi, src, tmp_path):
    """async_terminate_transfer_file with `agents` naming one target of three: that target's item ends with 126
    (status 4, stopped) and its download stops on the agent (its journal and partial files go), while the other
    two carry on to completion. Then bk-job's stop of a whole task (FileGseTaskStopCommand names the source and
    every target) ends a transfer whole."""
    a = ids(fc)
    dest = tmp_path / "p"
    tid = send(fapi, [task(a[0], src, "big.bin", a[1:4], dest)], download_speed=0.5)
    wait_for(lambda: any(i["content"]["progress"] > 0 for i in fapi.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 60, "progress")
    ft = target_journal(fc, a[1], tid)
    r = fapi.call(STOP, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})
    assert r["code"] == 0 and r["data"]["result"]["task_id"] == tid, r
    (item,) = wait_done(fapi, tid, [a[1]], timeout=30)
    assert (item["error_code"], item["content"]["status"]) == (126, 4), item
    wait_for(lambda: target_journal(fc, a[1], tid) is None, 15, "the stopped target to drop the transfer")
    tag = hashlib.md5(f"{ft.transfer_id}/{a[1]}".encode()).hexdigest()[:12]
    wait_for(lambda: not [p for p in leftovers(dest) if tag in p], 15, "the stopped target's partial files removed")
    others = fapi.call(RESULT, {"task_id": tid, "agents": [{"bk_agent_id": x} for x in a[2:4]]})["data"]["result"]
    assert [i["error_code"] for i in others] == [115, 115], others       # not stopped: still running
    items = wait_done(fapi, tid, a[2:4], timeout=90)
    assert [i["error_code"] for i in items] == [0, 0], items
    assert md5(dest / "big.bin") == md5(src / "big.bin")
    (item,) = wait_done(fapi, tid, [a[1]], timeout=10)
    assert item["error_code"] == 126, item                               # it stays stopped
    wait_for(lambda: leftovers(dest) == [], 15, "partial files removed")

    # bk-job's body: the source and every target of the task -> the whole transfer ends
    tid = send(fapi, [task(a[0], src, "big.bin", a[1:3], tmp_path / "w")], download_speed=0.5)
    wait_for(lambda: any(i["content"]["progress"] > 0 for i in fapi.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 60, "progress")
    stop = {"task_id": tid, "agents": [{"bk_agent_id": x, "bk_container_id": None, "user": None, "pwd": None}
                                       for x in a[0:3]]}
    assert fapi.call(STOP, stop)["code"] == 0
    items = wait_done(fapi, tid, a[1:3], timeout=30)
    assert [i["error_code"] for i in items] == [126, 126], items
    wait_for(lambda: leftovers(tmp_path / "w") == [], 15, "partial files removed")
    assert not (tmp_path / "w" / "big.bin").exists()


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
    assert md5(tmp_path / "k" / "big.bin") == md5(src / "big.bin")
    wait_for(lambda: leftovers(tmp_path / "k") == [], 15, "the private download directory removed")


# ---- real inputs (issue 13): each kind of fault, asserting the right value --------------------------------

PUSH = "/api/v2/task/async_push_file"


def agent_log(c, bk_agent_id) -> str:
    return next(p for p in c.agents if p.info["bk_agent_id"] == bk_agent_id).log_path.read_text()


def test_agent_as_its_own_target_direct_bittorrent_and_push_to_all(fc, fapi, src, tmp_path):
    """An agent that is the source and a target of one transfer gets the file like any target (a local copy)."""
    import sys
    a = ids(fc)
    tid = send(fapi, [task(a[0], src, "small.txt", [a[0]], tmp_path / "self-small"),
                      task(a[0], src, "big.bin", [a[0]], tmp_path / "self-big")], timeout_seconds=30)
    items = wait_done(fapi, tid, [a[0]], timeout=30)
    assert [(i["error_code"], i["content"]["type"]) for i in items] == [(0, "local"), (0, "local")], items
    assert md5(tmp_path / "self-small" / "small.txt") == md5(src / "small.txt")
    assert md5(tmp_path / "self-big" / "big.bin") == md5(src / "big.bin")
    args = [sys.executable, "-m", "gse.cli", "push", "--api-url", fc.api_url(), "--app-code", fc.app_code,
            "--app-secret", fc.app_secret, f"{a[0]}:{src}/big.bin", f"all:{tmp_path}/dst-all"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok {len(a)}, failed 0" in out.stdout
    assert md5(tmp_path / "dst-all" / "big.bin") == md5(src / "big.bin")


def test_symlinks_in_a_sent_tree_arrive_as_links(fc, fapi, tmp_path):
    """Links inside the tree arrive as the same links; links leaving it are refused, each with its reason;
    a loop (`current -> .`) is a link, never a recursion."""
    a = ids(fc)
    pkg = tmp_path / "lnsrc" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "libfoo.so.1").write_bytes(b"\x7fELF library\n")
    os.symlink("libfoo.so.1", pkg / "libfoo.so")
    os.symlink(".", pkg / "current")
    os.symlink("../libfoo.so.1", pkg / "sub" / "up")
    os.symlink("/etc/passwd", pkg / "abs")
    os.symlink("../../outside", pkg / "escape")
    os.mkfifo(pkg / "pipe")                          # not a file, a directory or a link: refused, never read
    dst = tmp_path / "lndst"
    tid = send(fapi, [task(a[0], tmp_path / "lnsrc", "pkg", [a[1]], dst)])
    items = {i["content"]["source_file_name"]: i for i in wait_done(fapi, tid, [a[1]])}
    assert {n: i["error_code"] for n, i in items.items()} == {
        "pkg": 0, "pkg/libfoo.so.1": 0, "pkg/libfoo.so": 0, "pkg/current": 0, "pkg/sub": 0, "pkg/sub/up": 0,
        "pkg/abs": 65535, "pkg/escape": 65535, "pkg/pipe": 65535}
    assert "pkg/abs -> /etc/passwd" in items["pkg/abs"]["error_msg"]
    assert "leaves the sent directory" in items["pkg/escape"]["error_msg"]
    assert "not a regular file" in items["pkg/pipe"]["error_msg"]
    out = dst / "pkg"
    assert sorted(os.listdir(out)) == ["current", "libfoo.so", "libfoo.so.1", "sub"]
    assert os.readlink(out / "libfoo.so") == "libfoo.so.1" and (out / "libfoo.so").read_bytes() == b"\x7fELF library\n"
    assert os.readlink(out / "current") == "." and os.readlink(out / "sub" / "up") == "../libfoo.so.1"
    assert os.listdir(out / "sub") == ["up"]


def test_a_file_named_like_a_pattern_is_that_file(fc, fapi, tmp_path):
    """`a[1].txt` names the file `a[1].txt` when it exists; only a name no file has is a wildcard."""
    a = ids(fc)
    s = tmp_path / "pat"
    s.mkdir()
    (s / "a[1].txt").write_text("bracket\n")
    (s / "a1.txt").write_text("plain\n")
    (s / "a2.txt").write_text("two\n")
    tid = send(fapi, [task(a[0], s, "a[1].txt", [a[1]], tmp_path / "p1"),
                      task(a[0], s, "a[12].txt", [a[2]], tmp_path / "p2")])
    exact = wait_done(fapi, tid, [a[1]])
    pattern = wait_done(fapi, tid, [a[2]])
    assert [i["error_code"] for i in exact] == [0] and [i["error_code"] for i in pattern] == [0, 0]
    assert os.listdir(tmp_path / "p1") == ["a[1].txt"] and (tmp_path / "p1" / "a[1].txt").read_text() == "bracket\n"
    assert sorted(os.listdir(tmp_path / "p2")) == ["a1.txt", "a2.txt"]


def _rewrite_middle(path, size) -> None:
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(1 << 20))


def test_source_changed_mid_transfer_ends_items_with_127(fc, fapi, tmp_path):
    """A 30 MB source rewritten in the middle about 2 s after the start: the source notices (size, mtime,
    inode), every item ends promptly with 127 naming the file, and the targets never flip between modes."""
    a = ids(fc)
    f = tmp_path / "chg" / "big30.bin"
    f.parent.mkdir()
    f.write_bytes(os.urandom(30 << 20))
    switches = ("fetching the missing pieces directly", "BitTorrent recovered")
    before = {t: [agent_log(fc, t).count(w) for w in switches] for t in a[1:3]}
    tid = send(fapi, [task(a[0], f.parent, f.name, [a[1], a[2]], tmp_path / "chgdst")], download_speed=2)
    t0 = time.monotonic()
    wait_for(lambda: any(i["content"]["progress"] > 0 for i in fapi.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 30, "progress")
    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))       # the fault as reported: 2 s after the start
    _rewrite_middle(f, 30 << 20)
    changed = time.monotonic()
    items = wait_done(fapi, tid, a[1:3], timeout=30)
    took = time.monotonic() - changed
    assert [i["error_code"] for i in items] == [127, 127], items
    assert all(str(f) in i["error_msg"] and "changed" in i["error_msg"] for i in items), items
    assert took < 8, f"items ended {took:.1f} s after the change"
    assert not (tmp_path / "chgdst" / "big30.bin").exists()
    # no flip-flopping: at most one switch to direct mode and one back (a stall on a loaded machine), per target
    after = {t: [agent_log(fc, t).count(w) for w in switches] for t in a[1:3]}
    assert all(n - b <= 1 for t in after for n, b in zip(after[t], before[t])), (before, after)


def test_async_push_file_as_the_cmdb_sends_it(fc, fapi, tmp_path):
    """bk-cmdb's host identity push (its exact request shapes): written atomically with the mode and owner
    asked, results by agent_id_list at task/async/get_transfer_file_result."""
    a = ids(fc)
    store = tmp_path / "var" / "lib" / "gse" / "host"
    identity = json.dumps({"bk_host_id": 7, "bk_cloud_id": 0, "bk_host_innerip": "127.0.0.12",
                           "associations": {"3": {"bk_biz_id": 2, "bk_set_id": 2, "bk_module_id": 3}}})
    r = fapi.call(PUSH, {"timeout_seconds": 1000, "auto_mkdir": True, "tasks": [{
        "file_name": "hostid", "store_dir": str(store), "file_content": identity, "owner": "root", "right": 644,
        "agent_id_list": [a[1]]}]})
    assert r["code"] == 0, r
    tid = r["data"]["result"]["task_id"]
    (item,) = wait_done(fapi, tid, [], path="/api/v2/task/async/get_transfer_file_result",
                        body={"task_id": tid, "agent_id_list": [a[1]]})
    assert item["error_code"] == 0 and item["content"]["dest_agent_id"] == a[1], item
    assert item["content"]["dest_file_name"] == "hostid" and item["content"]["size"] == len(identity)
    st = os.stat(store / "hostid")
    assert (store / "hostid").read_text() == identity and (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    assert leftovers(store) == []


def test_async_push_file_agents_form_owner_mode_and_planted_link(fc, fapi, tmp_path):
    a = ids(fc)
    world = tmp_path / "world"
    world.mkdir()
    os.chmod(world, 0o1777)
    marker = tmp_path / "marker"
    marker.write_text("original\n")
    os.symlink(marker, world / "conf.ini")          # planted where the file goes: replaced, never followed
    r = fapi.call("/api/v2/task/extensions/async_push_file", {"auto_mkdir": False, "tasks": [{
        "file_name": "conf.ini", "store_dir": str(world), "file_content": "[a]\nb = 1\n", "owner": "nobody",
        "right": "600", "agents": [{"bk_agent_id": a[2], "user": "root"}, {"bk_agent_id": "0:127.0.0.250"}]}]})
    assert r["code"] == 0, r
    tid = r["data"]["result"]["task_id"]
    items = wait_done(fapi, tid, [], body={"task_id": tid})          # neither agents nor agent_id_list: all
    assert sorted((i["bk_agent_id"], i["error_code"]) for i in items) == sorted([(a[2], 0), ("0:127.0.0.250", 117)])
    st = os.lstat(world / "conf.ini")
    assert not os.path.islink(world / "conf.ini") and (world / "conf.ini").read_text() == "[a]\nb = 1\n"
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam("nobody").pw_uid, 0o600)
    assert marker.read_text() == "original\n" and os.stat(marker).st_uid == 0


def test_async_push_file_refuses_bad_input(fapi, fc):
    a = ids(fc)
    base = {"file_name": "hostid", "file_content": "{}", "agent_id_list": [a[1]]}
    for bad, field in (({**base, "store_dir": "var/lib/gse"}, "store_dir"),
                       ({**base, "store_dir": "/var/lib/../../etc"}, "store_dir"),
                       ({**base, "store_dir": "/tmp", "file_name": "../passwd"}, "file_name"),
                       ({**base, "store_dir": "/tmp", "file_content": "x" * (100 * 1024 + 1)}, "file_content"),
                       ({**base, "store_dir": "/tmp", "right": 999}, "right"),
                       ({"file_name": "hostid", "file_content": "{}", "store_dir": "/tmp"}, "agent_id_list")):
        r = fapi.call(PUSH, {"tasks": [bad]})
        assert r["code"] == 1000400 and field in r["message"], (field, r)


def test_sparse_file_keeps_its_holes(fc, fapi, tmp_path):
    """A VM-image-like file (1 MiB data, a 120 MiB hole, 1 MiB data) arrives with its holes: by BitTorrent and
    by the local copy, the target's allocated size stays near the source's."""
    a = ids(fc)
    f = tmp_path / "vm" / "disk.img"
    f.parent.mkdir()
    with open(f, "wb") as out:
        out.write(os.urandom(1 << 20))
        out.seek(121 << 20)
        out.write(os.urandom(1 << 20))
    allocated = os.stat(f).st_blocks * 512
    assert allocated < 4 << 20                       # the filesystem keeps holes (else the test means nothing)
    tid = send(fapi, [task(a[0], f.parent, f.name, [a[1]], tmp_path / "vm-bt"),
                      task(a[0], f.parent, f.name, [a[0]], tmp_path / "vm-local")])
    items = wait_done(fapi, tid, [a[0], a[1]], timeout=90)
    assert sorted((i["error_code"], i["content"]["type"]) for i in items) == [(0, "bt"), (0, "local")], items
    for d in ("vm-bt", "vm-local"):
        got = tmp_path / d / "disk.img"
        assert md5(got) == md5(f)
        # within a piece or two per hole edge of the source (pieces of this size are at most 1 MiB)
        assert os.stat(got).st_blocks * 512 <= allocated + (3 << 20), (d, os.stat(got).st_blocks * 512, allocated)


def test_targets_bound_hash_failures_and_direct_mode_keeps_holes(make_cluster, tmp_path):
    """With a source that does not check its files (source_check_s 0), the targets still end a changed
    source's items with 127 in bounded time, switching to direct mode once and never back. On the same
    cluster files up to 8 MiB go direct: a sparse one travels as holes through the file server."""
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver(file_direct_max=8 << 20)
    c.start_fileserver()
    c.start_apiserver()
    agents = [c.start_agent(index=80 + i, ip=f"127.0.0.{80 + i}", wait=False,
                            files={"source_check_s": 0, "bt_stall_s": 6.0}) for i in range(2)]
    for p in agents:
        c.wait_healthy(p)
    api = api_for(c)
    a = [p.info["bk_agent_id"] for p in agents]
    api.wait_alive(a)

    sp = tmp_path / "sp" / "small.img"
    sp.parent.mkdir()
    with open(sp, "wb") as out:
        out.write(os.urandom(256 << 10))
        out.seek(7 << 20)
        out.write(os.urandom(256 << 10))
    tid = send(api, [task(a[0], sp.parent, sp.name, [a[1]], tmp_path / "sp-dst")])
    (item,) = wait_done(api, tid, [a[1]])
    got = tmp_path / "sp-dst" / "small.img"
    assert item["error_code"] == 0 and item["content"]["type"] == "direct" and md5(got) == md5(sp)
    assert os.stat(got).st_blocks * 512 <= os.stat(sp).st_blocks * 512 + (128 << 10)

    f = tmp_path / "chg" / "big30.bin"
    f.parent.mkdir()
    f.write_bytes(os.urandom(30 << 20))
    tid = send(api, [task(a[0], f.parent, f.name, [a[1]], tmp_path / "chgdst")], download_speed=4)
    wait_for(lambda: any(i["content"]["progress"] > 0 for i in api.call(
        RESULT, {"task_id": tid, "agents": [{"bk_agent_id": a[1]}]})["data"]["result"]), 30, "progress")
    _rewrite_middle(f, 30 << 20)
    changed = time.monotonic()
    (item,) = wait_done(api, tid, [a[1]], timeout=60)
    assert item["error_code"] == 127 and "changed during the transfer" in item["error_msg"], item
    assert time.monotonic() - changed < 45
    log = agents[1].log_path.read_text()
    assert log.count("fetching the missing pieces directly") <= 1 and "BitTorrent recovered" not in log
    assert not (tmp_path / "chgdst" / "big30.bin").exists()


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's own are root's, mode 0700)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="gse-files-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_source_is_read_with_the_users_permissions(fc, fapi, shared_dir, tmp_path):
    """The agent runs as root, but a source is read as the user the task names: what that user may not read
    is not sent (the item says why), the rest is."""
    a = ids(fc)
    d = shared_dir / "app"
    d.mkdir()
    (d / "public.txt").write_text("for everyone\n")
    (d / "secret.txt").write_text("root only\n")
    os.chmod(d / "secret.txt", 0o600)
    os.chmod(d, 0o755)
    src = {"file_name": "secret.txt", "store_dir": str(d), "agent": {"bk_agent_id": a[0], "user": "nobody"}}
    r = fapi.call(SEND, {"timeout_seconds": 60, "auto_mkdir": True, "tasks": [
        {"source": src, "target": {"store_dir": str(tmp_path / "one"), "agents": [{"bk_agent_id": a[1]}]}},
        {"source": {**src, "file_name": "app", "store_dir": str(shared_dir)},
         "target": {"store_dir": str(tmp_path / "tree"), "agents": [{"bk_agent_id": a[2]}]}}]})
    assert r["code"] == 0, r
    tid = r["data"]["result"]["task_id"]
    (one,) = wait_done(fapi, tid, [a[1]])
    assert one["error_code"] == 104 and "as nobody" in one["error_msg"] and "Permission denied" in one["error_msg"]
    tree = {i["content"]["source_file_name"]: i["error_code"] for i in wait_done(fapi, tid, [a[2]])}
    assert tree == {"app": 0, "app/public.txt": 0, "app/secret.txt": 104}, tree
    assert not (tmp_path / "one" / "secret.txt").exists() and not (tmp_path / "tree" / "app" / "secret.txt").exists()
    assert (tmp_path / "tree" / "app" / "public.txt").read_text() == "for everyone\n"


def test_symlinks_planted_in_a_writable_target_dir_are_never_followed(fc, fapi, src, tmp_path):
    """A world-writable target directory holding links where the files go (direct and BitTorrent) and where
    a directory would be made: the files replace the links, nothing is written through them, the directory is
    refused (123)."""
    a = ids(fc)
    world = tmp_path / "world"
    world.mkdir()
    os.chmod(world, 0o1777)
    marker = tmp_path / "marker"
    marker.mkdir()
    (marker / "victim").write_text("original\n")
    os.symlink(marker / "victim", world / "small.txt")
    os.symlink(marker / "victim", world / "big.bin")
    os.symlink(marker, world / "sub")
    tid = send(fapi, [task(a[0], src, "small.txt", [a[1]], world), task(a[0], src, "big.bin", [a[2]], world),
                      task(a[0], src, "small.txt", [a[3]], world / "sub" / "deeper")])
    small = wait_done(fapi, tid, [a[1]])
    big = wait_done(fapi, tid, [a[2]])
    deep = wait_done(fapi, tid, [a[3]])
    assert [i["error_code"] for i in small + big] == [0, 0], small + big
    assert deep[0]["error_code"] == 123 and "not followed" in deep[0]["error_msg"], deep
    for name in ("small.txt", "big.bin"):
        assert not os.path.islink(world / name) and md5(world / name) == md5(src / name)
    assert sorted(os.listdir(marker)) == ["victim"] and (marker / "victim").read_text() == "original\n"

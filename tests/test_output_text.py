"""Task output as text (issue: pages cut through characters): a client that advances `offset` by the UTF-8 length
of each `screen` rebuilds the output exactly, for every page size and while the command runs; other code pages
are converted; bytes that do not decode are escaped and recoverable (gse/common/screen.py)."""

from __future__ import annotations

import random
import time

import pytest

from conftest import _new_cluster, api_for, start_agents
from gse.cli import still_running
from gse.common.screen import OutputDecoder, original_bytes, whole_chars
from gse.devcluster import wait_for

RUN = "/api/v2/task/async_execute_script"
RESULT = "/api/v2/task/get_execute_script_result"


@pytest.fixture(scope="module")
def oc(infra, tmp_path_factory):
    """One agent on a UTF-8 host, one configured as a GBK host."""
    c = _new_cluster(tmp_path_factory.mktemp("output"), infra)
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    (utf8,) = start_agents(c, 1)
    (gbk,) = start_agents(c, 1, tasks={"host_code_page_name": "gbk"})
    api = api_for(c)
    api.wait_alive([utf8.info["bk_agent_id"], gbk.info["bk_agent_id"]])
    yield c
    c.stop()


@pytest.fixture(scope="module")
def oapi(oc):
    return api_for(oc)


def run(api, agent, command: str, timeout: int = 60) -> str:
    r = api.call(RUN, {"agents": [{"bk_agent_id": agent.info["bk_agent_id"]}],
                       "atomic_tasks": [{"atomic_task_id": 0, "command": command, "timeout_seconds": timeout}]})
    assert r["code"] == 0, r
    return r["data"]["result"]["task_id"]


def page(api, task_id, agent, offset, limit) -> dict:
    r = api.call(RESULT, {"task_id": task_id, "agent_tasks": [{"bk_agent_id": agent.info["bk_agent_id"], "atomic_tasks": [
        {"atomic_task_id": 0, "offset": offset, "limit": limit}]}]})
    assert r["code"] == 0, r
    return r["data"]["result"][0]


def finish(api, task_id, agent) -> dict:
    def done():
        r = api.call(RESULT, {"task_id": task_id, "agent_tasks": [{"bk_agent_id": agent.info["bk_agent_id"],
                                                                   "atomic_tasks": [{"atomic_task_id": 0}]}]})
        return r if not still_running(r) else None
    return wait_for(done, 60, f"task {task_id}", interval=0.1)["data"]["result"][0]


def read_all(api, task_id, agent, limit) -> list[str]:
    """Pages the way bk-job reads them: the next offset is this one plus the UTF-8 length of `screen`."""
    pages, offset = [], 0
    while True:
        screen = page(api, task_id, agent, offset, limit)["screen"]
        if not screen:
            return pages
        pages.append(screen)
        offset += len(screen.encode("utf-8"))


def test_output_pages_of_echo_chinese_end_on_characters(oc, oapi):
    """The issue's case: `echo 你好世界` read with limit 4 gave "你\\ufffd", "\\ufffd\\ufffd\\ufffd", ...;
    now every page is whole characters and the pages are the output."""
    a = oc.agents[0]
    tid = run(oapi, a, "echo 你好世界")
    assert finish(oapi, tid, a)["screen"] == "你好世界\n"
    assert read_all(oapi, tid, a, 4) == ["你", "好", "世", "界\n"]
    assert read_all(oapi, tid, a, 7) == ["你好", "世界\n"]
    assert read_all(oapi, tid, a, 1) == ["你", "好", "世", "界", "\n"]      # a character longer than the page


def test_output_chinese_log_rebuilt_exactly_in_64k_pages_and_other_sizes(oc, oapi, tmp_path):
    """The issue's 368,890-byte Chinese log had five U+FFFD when read in 64 KiB pages."""
    rnd = random.Random(13)
    words = ["日志", "服务启动成功", "连接数据库", "错误：超时", "用户", "完成", "😀", "ok", "é", "数据"]
    text = ""
    while len(text.encode()) < 368_890:
        text += " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) + "\n"
    raw = text.encode()[:368_890]
    raw = raw[:len(raw) - (len(raw) - len(raw.decode("utf-8", "ignore").encode()))]
    log = tmp_path / "app.log"
    log.write_bytes(raw)
    a = oc.agents[0]
    tid = run(oapi, a, f"cat {log}")
    finish(oapi, tid, a)
    want = raw.decode()
    for limit in (65536, 65535, 65534, 10_000, 4097):
        pages = read_all(oapi, tid, a, limit)
        assert "".join(pages) == want, limit
        assert all(len(p.encode()) <= limit for p in pages)
        assert "\ufffd" not in "".join(pages)


def test_output_partial_character_mid_run_waits_for_its_rest(oc, oapi):
    """`printf 'A\\344'; sleep 3; printf '\\275\\240B\\n'`: while the command sleeps, the stored output is "A" (the
    lone lead byte waits); a reader following offsets while it runs rebuilds "A你B\\n"."""
    a = oc.agents[0]
    tid = run(oapi, a, "printf 'A\\344'; sleep 3; printf '\\275\\240B\\n'")
    pages, offset, seen_wait = [], 0, False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        item = page(oapi, tid, a, offset, 65536)
        if item["screen"]:
            pages.append(item["screen"])
            offset += len(item["screen"].encode())
        if item["error_code"] == 115 and "".join(pages) == "A":
            seen_wait = True
        if item["error_code"] != 115 and not item["screen"]:
            break
        time.sleep(0.1)
    assert seen_wait
    assert "".join(pages) == "A你B\n" and all("\ufffd" not in p for p in pages)


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 13])
def test_output_any_page_size_rebuilds_mixed_widths(oc, oapi, limit):
    a = oc.agents[0]
    tid = run(oapi, a, "printf 'a\\303\\251\\344\\275\\240\\360\\237\\230\\200z\\n'")        # a é 你 😀 z
    finish(oapi, tid, a)
    pages = read_all(oapi, tid, a, limit)
    assert "".join(pages) == "aé你😀z\n"
    assert all(len(p.encode()) <= max(limit, 4) for p in pages)


def test_output_gbk_host_converted_to_utf8(oc, oapi):
    a = oc.agents[1]
    tid = run(oapi, a, "printf '\\304\\343\\272\\303\\312\\300\\275\\347\\n'")      # 你好世界 in GBK
    assert finish(oapi, tid, a)["screen"] == "你好世界\n"
    assert read_all(oapi, tid, a, 4) == ["你", "好", "世", "界\n"]


def test_output_undecodable_bytes_escaped_and_recoverable(oc, oapi):
    """Bytes that do not decode are never silently lost: U+FFFD + two hex digits each, a printed U+FFFD doubled,
    and original_bytes() gives back exactly what the command wrote."""
    a, g = oc.agents
    wrote = b"x\xffy\n\xef\xbf\xbd!\n\xe4\xbd"             # a bad byte, a real U+FFFD, an unfinished character
    tid = run(oapi, a, "printf 'x\\377y\\n\\357\\277\\275!\\n\\344\\275'")
    screen = finish(oapi, tid, a)["screen"]
    assert screen == "x\ufffdffy\n\ufffd\ufffd!\n\ufffde4\ufffdbd"
    assert original_bytes(screen) == wrote
    tid = run(oapi, g, "printf '\\201 z\\304\\343\\n'")      # GBK: a lead byte without its trail, then 你
    screen = finish(oapi, tid, g)["screen"]
    assert screen == "\ufffd81 z你\n" and original_bytes(screen, "gbk") == b"\x81 z\xc4\xe3\n"


def test_screen_decoder_and_pages_unit():
    d = OutputDecoder("utf8")
    assert d.feed(b"A\xe4") == b"A" and d.feed(b"\xbd\xa0B") == "你B".encode() and d.feed(b"", final=True) == b""
    rnd = random.Random(5)
    for _ in range(200):
        data = bytes(rnd.choice([0x41, 0xe4, 0xbd, 0xa0, 0xff, 0xef, 0xbf, 0x0a, 0xf0, 0x9f]) for _ in range(40))
        dec = OutputDecoder("utf8")
        cuts = sorted(rnd.sample(range(1, 40), 5))
        stored = b"".join(dec.feed(data[i:j]) for i, j in zip([0] + cuts, cuts + [40])) + dec.feed(b"", True)
        stored.decode("utf-8")                                  # always valid UTF-8
        assert original_bytes(stored.decode()) == data
        limit = rnd.randint(1, 9)
        off, out = 0, b""
        while off < len(stored):
            p = whole_chars(stored[off:off + limit + 3], limit)
            out += p
            off += len(p)
        assert out == stored
    with pytest.raises(ValueError):
        OutputDecoder("utf-16")


def test_host_code_page_setting_checked_at_load():
    from gse.agent.agent import TaskConfig
    from gse.common.config import ConfigError

    TaskConfig(host_code_page_name="gb18030").validate()
    for bad in ("utf-16", "rot13", "klingon"):
        with pytest.raises(ConfigError, match="host_code_page_name"):
            TaskConfig(host_code_page_name=bad).validate()

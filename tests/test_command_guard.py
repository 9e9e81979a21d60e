"""The high-risk command guard and user regular expressions: right verdicts, linear time on hostile input."""

from __future__ import annotations

import asyncio
import time

import pytest

from gse.apiserver.command_guard import CommandGuard
from gse.common import patterns
from gse.common.errors import Unavailable

BLOCKED = [
    ("rm -rf /", "rm-root"), ("rm -rf /*", "rm-root"), ("sudo rm -fr --no-preserve-root /", "rm-root"),
    ("rm --recursive --force /usr/", "rm-root"), ("false && rm -rf /;", "rm-root"), ("rm -r -f '/etc'", "rm-root"),
    ("mkfs.ext4 /dev/sdb1", "mkfs"), ("x; mkfs -t xfs /dev/vdb", "mkfs"),
    ("dd if=/dev/zero of=/dev/sda bs=1M", "dd-block-device"), ("dd if=x.img of=/dev/nvme0n1", "dd-block-device"),
    (":(){ :|:& };:", "fork-bomb"), ("bomb() { bomb | bomb & }; bomb", "fork-bomb"),
    ("shutdown -h now", "shutdown"), ("echo x; reboot", "shutdown"), ("init 0", "shutdown"),
    ("systemctl poweroff", "shutdown"), ("sudo /sbin/halt", "shutdown"),
    ("chmod -R 777 /", "chmod-777-root"), ("chmod --recursive a+rwx /etc", "chmod-777-root"),
    ("echo root::0:0::/:/bin/sh > /etc/passwd", "overwrite-passwd"), ("cp x /etc/shadow", "overwrite-passwd"),
    ("#!/bin/sh\necho start\nrm -rf /var\n", "rm-root"),
]

ALLOWED = [
    "rm -rf /tmp/build", "rm -rf ./bin", "rm -f /etc/app.conf", "ls /dev/sda",
    "dd if=/dev/sda of=/tmp/disk.img", "f() { g | h & }; f", "echo x >> /etc/passwd.bak",
    "echo x >> /etc/passwd", "grep root /etc/passwd", "shutdownd --status", "systemctl restart nginx",
    "chmod -R 755 /opt/app", "chmod 777 /tmp/x", "cat /etc/shadow > /dev/null",
]


@pytest.mark.parametrize("text,rule", BLOCKED)
def test_guard_default_rules_block(text, rule):
    blocked, _ = CommandGuard().check([text])
    assert blocked is not None and blocked.name == rule


@pytest.mark.parametrize("text", ALLOWED)
def test_guard_default_rules_allow(text):
    assert CommandGuard().check([text]) == (None, [])


@pytest.mark.parametrize("shape", ["issue-32k", "one-line-16m", "lines-16m", "rm-flags-16m", "spaces-16m",
                                   "cjk-16m", "bomb-candidates-16m"])
def test_guard_checks_hostile_16_mib_in_well_under_a_second(shape):
    """Backtracking regexes took 5.7 s for `true ` + 32,000 `a` and minutes for longer lines; RE2 in one pass is
    linear: 16 MiB of any shape in well under a second (bound 1 s, for a loaded machine)."""
    n = 16 * 1024 * 1024
    text = {
        "issue-32k": "true " + "a" * 32_000,
        "one-line-16m": "true " + "a" * n,
        "lines-16m": ("true " + "a" * 100 + "\n") * (n // 106),
        "rm-flags-16m": "rm " + "-r " * (n // 3),
        "spaces-16m": "rm -" + " " * n,
        "cjk-16m": "你好世界 rm -rf ./x; echo >> /etc/passwd\n" * (n // 48),
        "bomb-candidates-16m": "a(){ b|c& }\n" * (n // 12),
    }[shape].encode()
    guard = CommandGuard()
    t0 = time.perf_counter()
    blocked, warnings = guard.check([text])
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{shape}: {elapsed:.2f} s"
    assert (blocked.name if blocked else None) == ("fork-bomb" if shape == "bomb-candidates-16m" else None)


async def test_guard_check_async_keeps_the_loop_free_and_is_bounded():
    """The scan runs in a thread (RE2 releases the GIL): the event loop keeps ticking meanwhile; a check past
    its time bound refuses the task instead of waiting."""
    guard = CommandGuard()
    text = ("true " + "a" * 100 + "\n").encode() * (48 * 1024 * 1024 // 106)
    ticks, gaps = 0, []

    async def ticker():
        nonlocal ticks
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            ticks += 1

    t = asyncio.ensure_future(ticker())
    t0 = time.perf_counter()
    try:
        assert await guard.check_async([text]) == (None, [])
    finally:
        t.cancel()
    elapsed = time.perf_counter() - t0
    blocked = sum(g for g in gaps if g > 0.01)          # the loop held up (longer than a tick should take)
    assert ticks > 10 and blocked < 0.5 * elapsed, (ticks, blocked, elapsed)
    guard.time_bound_s = 0.001
    with pytest.raises(Unavailable):
        await guard.check_async([text])
    guard.close()


def test_guard_live_rules_must_be_re2_and_bad_ones_keep_the_previous():
    guard = CommandGuard()
    guard.apply_config({"include_defaults": False, "rules": [
        {"name": "curl-pipe", "pattern": r"curl\s[^|]*\|\s*(?:ba)?sh\b", "severity": "warn", "message": "m"}]})
    assert [r.name for r in guard.rules] == ["curl-pipe"]
    assert guard.check(["curl -s http://x | sh"])[1][0].name == "curl-pipe"
    for bad in [{"name": "lookahead", "pattern": "a(?=b)"}, {"name": "backref", "pattern": r"(a)\1"},
                {"name": "long", "pattern": "a" * 5000}, {"name": "typed", "pattern": 5},
                {"name": "sev", "pattern": "x", "severity": "loud"}]:
        guard.apply_config({"include_defaults": False, "rules": [bad]})
        assert [r.name for r in guard.rules] == ["curl-pipe"], bad
    guard.apply_config({"rules": [{"name": "many", "pattern": "x"}] * 300})
    assert [r.name for r in guard.rules] == ["curl-pipe"]
    guard.apply_config(None)
    assert len(guard.rules) == 7


def test_user_regex_is_linear_time():
    """A classic catastrophic pattern on a hostile name: Python's re takes exponential time, RE2 does not."""
    rx = patterns.compile_user(r"(a+)+$")
    t0 = time.perf_counter()
    assert rx.fullmatch(("a" * 5000 + "!").encode()) is None
    assert time.perf_counter() - t0 < 0.1
    with pytest.raises(ValueError, match="RE2"):
        patterns.compile_user(r"(?<=x)y", what="p")


def test_guard_warnings_collected_once_each_and_a_block_ends_the_check():
    """Every text of a task is checked (commands and script contents, str or bytes); a warning rule is
    reported once however often it matches; the first blocking rule is the verdict."""
    guard = CommandGuard()
    guard.apply_config({"rules": [{"name": "loud", "pattern": r"echo\s+LOUD", "severity": "warn", "message": "m"},
                                  {"name": "curl-sh", "pattern": r"curl[^|]*\|\s*sh", "severity": "warn"}]})
    blocked, warnings = guard.check(["echo LOUD", b"#!/bin/sh\necho  LOUD\ncurl -s x | sh\n", "ls"])
    assert blocked is None and [w.name for w in warnings] == ["loud", "curl-sh"]
    blocked, warnings = guard.check(["echo LOUD", "true", b"rm -rf /", "mkfs.ext4 /dev/sdb"])
    assert blocked.name == "rm-root" and [w.name for w in warnings] == ["loud"]
    assert guard.check([]) == (None, [])
    assert guard.check(["echo \udcff not utf-8"]) == (None, [])       # lone surrogates are text too
    guard.close()

"""The one back-off (gse/common/backoff.py) and the loops that use it. Unit tests: no daemons."""

import asyncio
import random

import pytest

from gse.common.backoff import Backoff


def test_backoff_window_doubles_from_base_to_cap():
    b = Backoff(0.5, 4.0)
    windows = []
    for _ in range(6):
        windows.append(b.window())
        b.next()
    assert windows == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.attempt == 6


def test_backoff_waits_are_full_jitter_within_the_window():
    b = Backoff(1.0, 8.0, rng=random.Random(7))
    waits = []
    for _ in range(2000):
        b.reset()
        b.attempt = 3                          # window 8 s
        waits.append(b.next())
    assert all(0 <= w <= 8.0 for w in waits)
    # full jitter: the whole window is used, not just its upper half
    assert min(waits) < 0.5 and max(waits) > 7.5
    assert 3.5 < sum(waits) / len(waits) < 4.5


def test_backoff_floor_widens_but_never_narrows():
    b = Backoff(1.0, 30.0, floor_s=12.0)
    assert b.window() == 12.0                  # attempt 0 would be 1 s: the floor wins
    b.attempt = 5                              # 32 -> capped at 30, above the floor
    assert b.window() == 30.0
    b.floor_s = 45.0                           # a server may ask for more than the cap
    assert b.window() == 45.0


def test_backoff_reset_starts_over():
    b = Backoff(0.2, 5.0)
    for _ in range(10):
        b.next()
    assert b.window() == 5.0
    b.reset()
    assert b.attempt == 0 and b.window() == 0.2


def test_backoff_huge_attempt_counts_do_not_overflow():
    b = Backoff(1.0, 30.0)
    b.attempt = 10_000
    assert b.window() == 30.0


@pytest.mark.parametrize("base,cap", [(0, 1), (-1, 1), (2, 1)])
def test_backoff_refuses_bad_bounds(base, cap):
    with pytest.raises(ValueError):
        Backoff(base, cap)


def test_backoff_sleep_waits_the_drawn_delay():
    b = Backoff(0.01, 0.02, rng=random.Random(1))

    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        d = await b.sleep()
        return d, loop.time() - t0

    drawn, took = asyncio.run(go())
    assert 0 <= drawn <= 0.01 and took >= drawn - 0.002
    assert b.attempt == 1


def test_agent_reconnect_config_is_checked():
    from gse.agent.agent import ReconnectConfig
    from gse.common.config import ConfigError, build
    assert build(ReconnectConfig, {"base_s": 0.5, "max_s": 10}).max_s == 10
    with pytest.raises(ConfigError, match="reconnect"):
        build(ReconnectConfig, {"base_s": 5, "max_s": 1})

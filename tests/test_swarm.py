"""The swarm benchmark, run small so that it never rots: a few hundred simulated agents on two task servers
of two worker processes each, one of them killed under load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_swarm_small():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "swarm.py"), "--agents", "200",
                        "--taskservers", "2", "--ts-workers", "2", "--rounds", "1", "--heartbeat", "2", "--steady", "2"],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["agents"] == 200 and out["taskservers"] == 2 and out["ts_workers"] == 2
    assert out["lost_results"] == 0
    assert out["broadcast_p50_s"] > 0 and out["attach_s"] > 0 and out["rss_mb_per_1k"] > 0
    assert 0 < out["reconnected_agents"] < 200 and out["reconnect_s"] < 60

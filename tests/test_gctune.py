"""Collector settings shared by every daemon (gse.common.gctune)."""

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from gse.common import gctune


def test_threshold_from_env(monkeypatch):
    monkeypatch.delenv("GSE_GC_THRESHOLD", raising=False)
    assert gctune.threshold_from_env() == gctune.THRESHOLD
    monkeypatch.setenv("GSE_GC_THRESHOLD", "default")
    assert gctune.threshold_from_env() is None
    monkeypatch.setenv("GSE_GC_THRESHOLD", "1000, 5, 5")
    assert gctune.threshold_from_env() == (1000, 5, 5)
    for bad in ("1000", "a,b,c", "0,1,1", "10,-1,1", "1,2,3,4"):
        monkeypatch.setenv("GSE_GC_THRESHOLD", bad)
        with pytest.raises(ValueError):
            gctune.threshold_from_env()


def test_install_sets_thresholds_and_times_collections(monkeypatch):
    old = gc.get_threshold()
    try:
        monkeypatch.setenv("GSE_GC_THRESHOLD", "1234,7,9")
        gctune.install()
        assert gc.get_threshold() == (1234, 7, 9)
        before = gctune.totals[2][0]
        gc.collect()
        assert gctune.totals[2][0] == before + 1
        assert gctune.summary()["gen2"]["collections"] == before + 1
    finally:
        gc.set_threshold(*old)
        if gctune._on_gc in gc.callbacks:
            gc.callbacks.remove(gctune._on_gc)


def test_daemon_refuses_a_malformed_setting():
    cfg = Path(__file__).resolve().parent.parent / "deploy" / "dbproxy.yaml"     # a valid config
    r = subprocess.run([sys.executable, "-m", "gse.dbproxy", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "GSE_GC_THRESHOLD": "lots"})
    assert r.returncode == 2
    assert "GSE_GC_THRESHOLD" in r.stderr

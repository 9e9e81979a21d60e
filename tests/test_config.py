"""The strict config loader, and daemons refusing bad configs with a message naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gse.common.config import ConfigError, load_config
from gse.taskserver.server import TaskServerConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    port: int = 1
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    ratio: float = 0.5
    on: bool = False
    inner: Inner = Inner()


def test_defaults_file_env_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: file\ninner:\n  port: 7\n")
    c = load_config(Outer, f, ["inner.names=[a, b]"], env_prefix="demo",
                    environ={"GSE_DEMO__RATIO": "0.25", "GSE_DEMO__INNER__PORT": "9", "OTHER": "1"})
    assert c == Outer(name="file", ratio=0.25, on=False, inner=Inner(port=9, names=("a", "b")))
    assert load_config(Outer) == Outer()


@pytest.mark.parametrize("text,needle", [
    ("nmae: x\n", "'nmae'"),
    ("inner:\n  prot: 3\n", "'inner.prot'"),
    ("inner:\n  port: '3'\n", "inner.port"),
    ("on: 'yes'\n", "on"),
    ("inner: [1]\n", "inner"),
    ("- a\n", "mapping"),
    ("name: [\n", "YAML"),
])
def test_bad_files_name_the_key(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, f)
    assert needle in str(err.value)


def test_bad_env_override_fails_loudly():
    with pytest.raises(ConfigError, match="inner.bogus"):
        load_config(Outer, None, env_prefix="demo", environ={"GSE_DEMO__INNER__BOGUS": "1"})
    with pytest.raises(ConfigError, match="inner.port"):
        load_config(Outer, None, ["inner.port=abc"])


def test_daemon_refuses_unknown_key(tmp_path):
    f = tmp_path / "ts.yaml"
    f.write_text("tls: {ca: a, cert: b, key: c}\nbalance:\n  slak: 3\n")
    r = subprocess.run([sys.executable, "-m", "gse.taskserver", "--config", str(f)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "balance.slak" in r.stderr and "Traceback" not in r.stderr


def test_daemon_requires_tls(tmp_path):
    f = tmp_path / "ts.yaml"
    f.write_text("agent_port: 1\n")
    with pytest.raises(ConfigError, match="tls.ca"):
        load_config(TaskServerConfig, f)

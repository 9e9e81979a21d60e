"""What ships for real deployments stays true to the code: the sample configs in deploy/, their systemd units,
and the protobuf code generated from proto/."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from gse.agent.agent import AgentConfig
from gse.alarm.server import AlarmConfig
from gse.syncdata.server import SyncDataConfig
from gse.apiserver.server import ApiServerConfig
from gse.common.config import load_config
from gse.dataserver.server import DataServerConfig
from gse.dbproxy.server import DbProxyConfig
from gse.fileserver.server import FileServerConfig
from gse.procmgr.server import ProcMgrConfig
from gse.proxy.server import ProxyConfig
from gse.taskserver.server import TaskServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"

CONFIGS = {
    "agent": AgentConfig,
    "taskserver": TaskServerConfig,
    "dbproxy": DbProxyConfig,
    "apiserver": ApiServerConfig,
    "dataserver": DataServerConfig,
    "fileserver": FileServerConfig,
    "procmgr": ProcMgrConfig,
    "alarm": AlarmConfig,
    "syncdata": SyncDataConfig,
    "proxy": ProxyConfig,
}

# spec section 6
TASKSERVER_AGENT_PORT = 48668
DBPROXY_PORT = 58859
APISERVER_PORT = 50002
DATASERVER_PORT = 58625
PROCMGR_PORT = 50000
PROXY_AGENT_PORT, PROXY_DATA_PORT, PROXY_FILE_PORT = 28668, 28625, 28925      # spec section 12 (GSE 2.0's)


def sample_names() -> list[str]:
    return sorted(p.stem for p in DEPLOY.glob("*.yaml"))


def load_sample(name: str):
    return load_config(CONFIGS[name], DEPLOY / f"{name}.yaml")


def missing_keys(cls: type, tree: dict, path: str = "") -> list[str]:
    """Dotted names of the dataclass fields (recursively) that `tree` does not spell out."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        dotted = f"{path}{f.name}"
        if f.name not in tree:
            out.append(dotted)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += missing_keys(hints[f.name], tree[f.name] or {}, dotted + ".")
    return out


def unit(name: str) -> dict[str, list[str]]:
    """`Key=value` lines of a systemd unit, every value of a key in order."""
    keys: dict[str, list[str]] = {}
    for line in (UNITS / f"gse-{name}.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_deploy_samples_cover_every_daemon_config():
    assert sample_names() == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deploy_sample_loads_with_the_strict_loader(name):
    cfg = load_sample(name)
    assert isinstance(cfg, CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deploy_sample_spells_out_every_key(name):
    tree = yaml.safe_load((DEPLOY / f"{name}.yaml").read_text())
    assert missing_keys(CONFIGS[name], tree) == [], f"deploy/{name}.yaml lacks keys of {CONFIGS[name].__name__}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deploy_sample_uses_the_production_certificates(name):
    tls = load_sample(name).tls
    cert = {"agent": "agent", "apiserver": "api", "proxy": "proxy"}.get(name, "server")
    assert (tls.ca, tls.cert, tls.key) == ("/etc/gse/certs/ca.crt", f"/etc/gse/certs/{cert}.crt",
                                           f"/etc/gse/certs/{cert}.key")
    assert tls.server_name == "gse-server"       # every server.crt made by `gse certs init` carries it


def test_deploy_sample_ports_match_the_spec():
    assert load_sample("taskserver").agent_port == TASKSERVER_AGENT_PORT
    assert load_sample("dbproxy").port == DBPROXY_PORT
    assert load_sample("apiserver").port == APISERVER_PORT
    assert load_sample("dataserver").port == DATASERVER_PORT
    assert load_sample("procmgr").port == PROCMGR_PORT
    proxy = load_sample("proxy")
    assert (proxy.agent_port, proxy.data.port, proxy.files.port) == (PROXY_AGENT_PORT, PROXY_DATA_PORT,
                                                                     PROXY_FILE_PORT)
    assert (proxy.files.tracker_port, proxy.files.bt_port) == (20030, 20020)
    agent = load_sample("agent")
    assert agent.servers and all(s.endswith(f":{TASKSERVER_AGENT_PORT}") for s in agent.servers)


def test_deploy_sample_agent_uses_the_production_dirs():
    agent = load_sample("agent")
    assert (agent.data_dir, agent.run_dir) == ("/var/lib/gse/agent", "/var/run/gse")


def test_deploy_sample_servers_advertise_a_dialable_address():
    for name in ("taskserver", "dbproxy", "apiserver", "dataserver", "procmgr", "proxy"):
        cfg = load_sample(name)
        if cfg.host in ("0.0.0.0", "::"):
            assert cfg.advertise_host not in ("", "0.0.0.0", "::"), name


@pytest.mark.parametrize("name", sample_names())
def test_deploy_sample_has_a_notify_systemd_unit(name):
    assert (UNITS / f"gse-{name}.service").is_file(), f"deploy/{name}.yaml has no deploy/systemd/gse-{name}.service"
    u = unit(name)
    assert u["Type"] == ["notify"]
    assert u["NotifyAccess"] == ["main"]
    assert u["ExecStart"] == [f"/opt/gse/venv/bin/python -m gse.{name} --config /etc/gse/{name}.yaml"]
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["Restart"] == ["on-failure"]
    assert "network-online.target" in " ".join(u["After"])


def test_deploy_units_run_servers_unprivileged_and_the_agent_as_root():
    for name in sample_names():
        u = unit(name)
        if name == "agent":
            assert "User" not in u                     # root: it runs commands as the users tasks name
            assert u["KillMode"] == ["process"]        # a restart of the agent leaves its tasks running
        else:
            assert u["User"] == ["gse"]
            assert u["LimitNOFILE"] == ["65536"]


def test_deploy_units_have_a_sample_config():
    for path in UNITS.glob("gse-*.service"):
        name = path.name[len("gse-"):-len(".service")]
        assert (DEPLOY / f"{name}.yaml").is_file(), f"{path.name} has no deploy/{name}.yaml"


# The tool versions stamped into generated code; they change with grpcio-tools, not with proto/.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
     r"\1 X,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
]


def _normalized(text: str) -> str:
    for pattern, repl in _VERSION_STAMPS:
        text = pattern.sub(repl, text)
    return text


def test_generated_protobuf_code_is_up_to_date(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto" / "gse" / "pb").glob("*.proto"))
    assert protos
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
           f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    fresh = {p.name: p for p in (tmp_path / "gse" / "pb").iterdir()}
    checked_in = {p.name: p for p in (ROOT / "gse" / "pb").iterdir()
                  if p.suffix in (".py", ".pyi") and p.name != "__init__.py"}
    assert sorted(checked_in) == sorted(fresh), "gse/pb does not match proto/: run 'make proto'"
    stale = [n for n in sorted(fresh)
             if _normalized(fresh[n].read_text()) != _normalized(checked_in[n].read_text())]
    assert stale == [], f"gse/pb is stale ({', '.join(stale)}): run 'make proto'"

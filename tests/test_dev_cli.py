"""`gse dev up --detach` and `gse dev down` through the real command, and `gse certs init`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ApiClient

from gse.common.roles import of_pem


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie left for init to reap counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_dev_up_detach_and_down(tmp_path):
    d = tmp_path / "dev"
    up = subprocess.run([sys.executable, "-m", "gse.cli", "dev", "up", "--detach", "--agents", "2", "--dir", str(d),
                         "--heartbeat", "2", "--areas", "1", "--area-agents", "1"], capture_output=True, text=True, timeout=240)
    desc_path = d / "cluster.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        desc = json.loads(desc_path.read_text())
        for key in ("api_url", "app_code", "app_secret", "zookeeper", "redis", "certs_dir", "taskservers", "agents",
                    "fileservers"):
            assert desc[key], key
        # two agents in area 0; area 1: its proxy, the proxy host's agent and one more
        assert [a["bk_cloud_id"] for a in desc["agents"]] == [0, 0, 1, 1]
        assert all(len(a["bk_agent_id"]) == 32 for a in desc["agents"])
        assert [(p["area"], p["node_id"]) for p in desc["proxies"]] == [(1, "proxy-1a")]
        assert "example API call" in up.stdout and '"status_code": 2' in up.stdout
        api = ApiClient(desc["api_url"], desc["app_code"], desc["app_secret"])
        states = api.states([a["bk_agent_id"] for a in desc["agents"]])
        assert {s["status_code"] for s in states.values()} == {2}
        pids = [p["pid"] for p in desc["processes"]]
        assert all(_alive(p) for p in pids)
        # Every agent enrolled with a token and holds a certificate naming its own id.
        for a in desc["agents"]:
            cert = Path(a["data_dir"]).parent / "tls" / "agent.crt"
            assert of_pem(cert.read_bytes()).agent_id == a["bk_agent_id"]
        tok = subprocess.run([sys.executable, "-m", "gse.cli", "certs", "token", "--count", "2", "--dev-dir", str(d)],
                             capture_output=True, text=True, timeout=60)
        assert tok.returncode == 0 and [t[:5] for t in tok.stdout.split()] == ["gse1_", "gse1_"], tok.stderr
    finally:
        down = subprocess.run([sys.executable, "-m", "gse.cli", "dev", "down", "--dir", str(d)],
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not desc_path.exists()
    assert not any(_alive(p) for p in pids)


def test_certs_init(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gse.cli", "certs", "init", "--dir", str(tmp_path / "c"),
                        "--san", "10.9.8.7", "--san", "gse.example"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert {"gse-server", "127.0.0.1", "10.9.8.7", "gse.example"} <= names
    assert oct((tmp_path / "c" / "ca.key").stat().st_mode & 0o777) == oct(0o600)


def test_the_cli_says_plainly_when_the_api_server_is_not_there_or_the_mode_is_not_chmod_digits():
    api = ["--api-url", "http://127.0.0.1:9", "--app-code", "a", "--app-secret", "b"]
    r = subprocess.run([sys.executable, "-m", "gse.cli", "run", *api, "all", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the API server" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "gse.cli", "push", *api, "--mode", "abc", "a:/x", "b:/y"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not chmod digits" in r.stderr and "Traceback" not in r.stderr, r.stderr

"""python -m gse.agent --config FILE (or -f FILE, as node managers call gse_agent), and the agent's command
line of spec section 11, which node managers' install scripts and the package's gsectl call:

    gse-agent [-f FILE] --version        the version, one line
    gse-agent [-f FILE] --healthz [1]    `healthz: {json}` of the running agent; exit 0 when healthy
    gse-agent [-f FILE] --reload         the running agent re-reads its configuration (SIGHUP)
    gse-agent [-f FILE] --quit           the running agent stops; returns once it is gone
    gse-agent [-f FILE] --register       the agent's bk_agent_id, one line, nothing else (scripts keep it)

The running agent is found through `<run_dir>/gse_agent.json`, which it writes when it starts.
"""
import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gse.common.service import main as _main

# The package's launcher sets the runtime up for the agent's own interpreter; none of it may reach the
# commands and plugins the agent starts (their own Python would load our libraries), nor stay wrong after
# an upgrade: it is kept aside for executing the agent again and removed from the environment.
_RUNTIME_ENV = ("PYTHONHOME", "PYTHONPATH", "LD_LIBRARY_PATH", "PYTHONNOUSERSITE", "PYTHONDONTWRITEBYTECODE")


def _scrub_runtime_env() -> None:
    if os.environ.get("GSE_AGENT_HOME"):
        for k in _RUNTIME_ENV:
            os.environ.pop(k, None)


def _config(path: str | None):
    from gse.common.config import ConfigError, load_config

    from .agent import AgentConfig
    try:
        return load_config(AgentConfig, path, env_prefix="agent")
    except ConfigError as exc:
        print(f"gse-agent: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _running(cfg) -> dict | None:
    try:
        info = json.loads((Path(cfg.run_dir) / "gse_agent.json").read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def cmd_healthz(cfg) -> int:
    """`--healthz`: print `healthz: {json}` of the running agent (its /healthz document, or `{"ok": false, "data":
    {...}}` saying it is not running or not answering within 5 s); exit 0 only when healthy (spec section 11)."""
    info = _running(cfg)
    if info is None:
        doc = {"ok": False, "data": {"base": "the agent is not running", "cluster": "unknown", "data": "unknown",
                                     "file": "unknown"}}
    else:
        try:
            with urllib.request.urlopen(f"http://{info['metrics']}/healthz", timeout=5) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            doc = json.loads(exc.read())
        except (OSError, ValueError) as exc:
            doc = {"ok": False, "data": {"base": f"the agent does not answer: {exc}", "cluster": "unknown",
                                         "data": "unknown", "file": "unknown"}}
    print("healthz: " + json.dumps(doc, separators=(",", ":")))
    return 0 if doc.get("ok") else 1


def cmd_signal(cfg, sig: int, wait_gone: bool) -> int:
    """`--reload` (SIGHUP) and `--quit` (SIGTERM, `wait_gone`: wait up to 30 s for the pid to be gone): signal the
    running agent. Exit 0 on success; `--quit` with no agent running is success, `--reload` is not."""
    info = _running(cfg)
    if info is None:
        print("gse-agent: no running agent found (its run_dir holds no live gse_agent.json)", file=sys.stderr)
        return 0 if wait_gone else 1
    pid = int(info["pid"])
    os.kill(pid, sig)
    if not wait_gone:
        return 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.1)
    print(f"gse-agent: pid {pid} did not stop within 30 s", file=sys.stderr)
    return 1


def cmd_register(cfg) -> int:
    """`--register`: print the agent's bk_agent_id, one line: the id its certificate names (adopted into the data dir),
    else the one kept in the data dir, made on first use."""
    from gse.common.roles import of_pem_file

    from .agent import adopt_agent_id, load_or_create_agent_id
    if Path(cfg.tls.cert).exists():
        named = of_pem_file(cfg.tls.cert).agent_id
        agent_id = adopt_agent_id(cfg.data_dir, named) if named else load_or_create_agent_id(cfg.data_dir)
    else:
        agent_id = load_or_create_agent_id(cfg.data_dir)
    print(agent_id)
    return 0


def main(argv=None) -> int:
    """The `gse-agent` entry point: the command-line actions of spec section 11 act on the running agent and return;
    without one, run the agent (config from `-f`/`--config`/`-c`) until it stops. Returns the exit code (2 on a
    configuration error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="gse-agent", add_help=False)
    p.add_argument("-f", "--config", "-c", dest="config")
    p.add_argument("--version", action="store_true")
    p.add_argument("--healthz", nargs="?", const="1")
    p.add_argument("--reload", action="store_true")
    p.add_argument("--quit", action="store_true")
    p.add_argument("--register", action="store_true")
    known, rest = p.parse_known_args(argv)
    if known.version:
        from gse import __version__
        print(__version__)
        return 0
    if known.healthz is not None or known.reload or known.quit or known.register:
        cfg = _config(known.config)
        if known.healthz is not None:
            return cmd_healthz(cfg)
        if known.register:
            return cmd_register(cfg)
        return cmd_signal(cfg, signal.SIGHUP if known.reload else signal.SIGTERM, wait_gone=known.quit)
    _scrub_runtime_env()
    from .agent import Agent, AgentConfig
    return _main(Agent, AgentConfig, (["--config", known.config] if known.config else []) + rest)


if __name__ == "__main__":
    sys.exit(main())

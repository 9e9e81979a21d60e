"""Agent operations (cluster/operate_agent, spec section 11): restart, reload, upgrade.

- **Restart (1)**: the agent stops as on SIGTERM (plugin data spooled, task journal kept, file transfers
  journaled) and executes itself again in place: the same pid (what systemd's Type=notify unit expects: it is
  told RELOADING, then READY again), a new start time and boot id. The processes it started are its
  children and stay so (the unit's KillMode=process leaves them too): supervised plugins keep running, and
  tasks it was running are reported as status 6 (agent restarted) from its journal.
- **Reload (2)**: the configuration file is read again; one that does not load is refused (error 65535 with
  the loader's message) and the running configuration kept. The link to the task server is kept.
- **Upgrade (3)**: see gse/agent/upgrade.py.

Each answers an OperationResult to the task server (a restart before it goes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from gse import __version__
from gse.common.config import ConfigError, load_config
from gse.common.errors import ErrorCode
from gse.pb import agent_pb2 as pb

from .upgrade import Upgrader

log = logging.getLogger("gse.agent.operations")

RESTART, RELOAD, UPGRADE = 1, 2, 3


def self_command() -> list[str]:
    """How this agent process was started, to execute it again: the installed package's launcher when the
    agent runs from one (it sets up the runtime), else the interpreter with its original arguments."""
    launcher = os.environ.get("GSE_AGENT_LAUNCHER")
    if launcher:
        return [launcher, *sys.argv[1:]]
    return [sys.executable, *sys.orig_argv[1:]]


class Operations:
    """The agent's handler of `operate` frames (cluster/operate_agent, spec section 11): restart, reload and upgrade
    (gse/agent/upgrade.py), each answered with an OperationResult frame."""
    def __init__(self, agent):
        self.agent = agent
        self.upgrader = Upgrader(agent)

    def result(self, op: pb.AgentOperation, **kw) -> bool:
        """Send an OperationResult for `op` (`kw`: state, error_code, error_msg) carrying this agent's version; False
        when not attached (the result is then lost: the operation's caller sees the agent's state instead)."""
        return self.agent.send(pb.AgentFrame(operation_result=pb.OperationResult(
            op=op.op, request_id=op.request_id, version=__version__, **kw)))

    def on_operate(self, op: pb.AgentOperation) -> None:
        """Start the operation `op.op` names (1 restart, 2 reload, 3 upgrade); another type answers 65535 at once."""
        log.info("operation received", extra={"op": op.op, "request_id": op.request_id})
        if op.op == RESTART:
            self.restart(op)
        elif op.op == RELOAD:
            self.agent.spawn(self.reload(op))
        elif op.op == UPGRADE:
            self.agent.spawn(self.upgrader.run(op, self.result))
        else:
            self.result(op, error_code=ErrorCode.FAILED, error_msg=f"unknown operation type {op.op}")

    def restart(self, op: pb.AgentOperation | None = None, command: list[str] | None = None) -> None:
        """Stop and execute `command` (default: this agent again) in this process."""
        if op is not None:
            self.result(op, state="restarting")
        self.agent.exec_after_stop = command or self_command()
        # A moment for the result frame to leave before the link closes.
        asyncio.get_running_loop().call_later(0.2, self.agent.stop_soon)

    async def reload(self, op: pb.AgentOperation) -> None:
        """Check that the configuration file still loads (off the event loop), then apply it; answers "reloaded", or
        65535 with the loader's message and the running configuration kept."""
        a = self.agent
        try:
            await asyncio.to_thread(load_config, type(a.config), a.config_path, a.overrides, env_prefix=a.name)
        except ConfigError as exc:
            self.result(op, error_code=ErrorCode.FAILED, error_msg=f"configuration not reloaded: {exc}")
            return
        await a.reload()
        self.result(op, state="reloaded")

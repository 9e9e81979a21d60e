"""Where agent sessions live in Redis (through dbproxy) and how their state is read back.

  gse:agent:<bk_agent_id>          hash: identity, session (online, node, parent), heartbeat figures
  gse:agentip:<bk_cloud_id>:<ip>   string: the bk_agent_id last seen at that address
  gse:agents                       set: every bk_agent_id seen (for "all" targets)

An agent is alive when its hash says online and its heartbeat deadline has not passed: the holding task
server writes `deadline` with every heartbeat, so an agent whose task server died without a word still
turns offline once the deadline is over.
"""

from __future__ import annotations

import ipaddress
import time

AGENT_PREFIX = "gse:agent:"
IP_PREFIX = "gse:agentip:"
AGENTS_SET = "gse:agents"

# Agent state codes of the v2 API.
NOT_FOUND = -2
UNKNOWN = -1
RUNNING = 2
STATUS_TEXT = {-2: "not_found", -1: "unknown", 0: "initial", 1: "starting", 2: "running", 3: "damaged",
               4: "busy", 5: "upgrading", 6: "stopping", 7: "uninstalled"}

MAX_AGENT_ID = 64


def agent_key(agent_id: str) -> str:
    return AGENT_PREFIX + agent_id


def ip_key(cloud_id: int, ip: str) -> str:
    return f"{IP_PREFIX}{cloud_id}:{ip}"


def now_ms() -> int:
    return int(time.time() * 1000)


def is_alive(fields: dict, at_ms: int | None = None) -> bool:
    if fields.get("online") != "1":
        return False
    try:
        deadline = int(fields.get("deadline", "0"))
    except ValueError:
        return False
    return (at_ms or now_ms()) <= deadline


def status_code(fields: dict | None, at_ms: int | None = None) -> int:
    if not fields:
        return NOT_FOUND
    if is_alive(fields, at_ms):
        return RUNNING
    try:
        stored = int(fields.get("status_code", UNKNOWN))
    except ValueError:
        stored = UNKNOWN
    # An agent that is not alive is never reported as running, whatever was stored last.
    return stored if stored != RUNNING else UNKNOWN


def parse_host_id(text: str) -> tuple[int, str] | None:
    """`"{bk_cloud_id}:{ip}"` -> (cloud, ip); None when the text is not of that form."""
    cloud, sep, ip = text.partition(":")
    if not sep or not cloud.isdigit():
        return None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    return int(cloud), ip


def valid_agent_id(text: str) -> bool:
    return 0 < len(text) <= MAX_AGENT_ID and text.isprintable() and ":" not in text and " " not in text

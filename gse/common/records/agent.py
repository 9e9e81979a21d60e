"""Agent records: the session each task server keeps for the agents it holds, and the indexes over them.

  gse:agent:<bk_agent_id>          AgentRecord (hash): identity, session (online, node, parent), heartbeat figures
  gse:agentip:<bk_cloud_id>:<ip>   AgentAddress (string): the bk_agent_id last seen at that address in that area
  gse:agents                       AgentIndex (set): every bk_agent_id seen (for "all" targets)
  gse:snapshot:<bk_agent_id>       HostSnapshotRecord (string, JSON): the latest host snapshot (data path)

Writers: the task server holding the agent (taskserver/agent_access.py) writes the session and indexes; the
data server writes snapshots. Readers: the API server (agent state, task dispatch), operator tools.

An agent is alive when its record says online and its heartbeat deadline has not passed: the holding task
server writes `deadline` with every heartbeat, so an agent whose task server died without a word still
turns offline once the deadline is over.
"""

from __future__ import annotations

import dataclasses
import json
import time

from gse.common import dbclient as db
from gse.common.address import MAX_AGENT_ID, valid_agent_id  # noqa: F401 - one definition, known here too
from gse.common.errors import AgentStatus

from .base import DAY_MS, hash_record

SESSION_TTL_MS = 7 * DAY_MS
SNAPSHOT_TTL_MS = 60_000


def now_ms() -> int:
    """Wall-clock milliseconds: the unit of every time stored in a record."""
    return int(time.time() * 1000)


UPGRADE_ACTIVE = frozenset({"started", "waiting", "installing", "switching"})


@hash_record(prefix="gse:agent:", ttl_ms=SESSION_TTL_MS)
@dataclasses.dataclass(slots=True)
class AgentRecord:
    """The session of one agent, keyed by its bk_agent_id. Times are wall-clock ms; rates are percent."""
    # identity, from the agent's hello
    agent_id: str = ""
    cloud_id: int = 0
    ip: str = ""
    hostname: str = ""
    os: str = ""
    arch: str = ""
    version: str = ""
    run_mode: int = 1               # 1 agent, 0 proxy
    start_time: int = 0             # when the agent process started
    boot_id: int = 0                # changes every time the agent process starts
    # session
    online: bool = False
    node: str = ""                  # node id of the task server holding the agent
    parent_ip: str = ""             # what get_agent_info shows as the agent's parent (task server or proxy)
    parent_port: int = 0
    proxy: str = ""                 # node id of the proxy holding the agent's link ("" = attached directly)
    peer: str = ""                  # the agent's address as the task server (or its proxy) sees it
    connect_time: int = 0
    disconnect_time: int = 0
    report_time: int = 0            # the last heartbeat
    deadline: int = 0               # alive until this time unless another heartbeat comes
    status_code: int = AgentStatus.UNKNOWN
    last_status_code: int = AgentStatus.UNKNOWN
    remark: str = ""
    # the agent process's own figures (every heartbeat)
    cpu_rate: float = 0.0
    mem_rate: float = 0.0
    # the host snapshot (one heartbeat in host_snapshot_every)
    host_cpu_rate: float = 0.0
    host_mem_rate: float = 0.0
    cpu_num: int = 0
    mem_size: int = 0               # bytes
    load1: float = 0.0
    uptime_s: int = 0
    proc_count: int = 0
    disk_total: int = 0             # bytes, root filesystem
    disk_used: int = 0
    # the host identity file (syncdata, spec section 11) as the agent reported it (hello, push results)
    hostid_md5: str = ""
    hostid_version: int = 0         # the pushed version the agent wrote (0: unknown, from a hello)
    hostid_time: int = 0            # when the agent last reported it
    hostid_error_code: int = 0      # of the last push: 0, 123 not writable, 127 md5 mismatch, 65535
    hostid_error: str = ""
    # agent operations (operate_agent, spec section 11): the last upgrade
    upgrade_state: str = ""         # started, waiting, installing, switching, done, rolled_back, failed
    upgrade_version: str = ""       # the version asked for
    upgrade_from: str = ""
    upgrade_until: int = 0          # the upgrade shows (status 5) until it ends or this passes
    upgrade_error: str = ""
    upgrade_time: int = 0           # when upgrade_state last changed

    def upgrading(self, at_ms: int | None = None) -> bool:
        """An upgrade under way (started and neither ended nor past its bound)."""
        return self.upgrade_state in UPGRADE_ACTIVE and (at_ms or now_ms()) < self.upgrade_until

    def alive(self, at_ms: int | None = None) -> bool:
        """Online and within its heartbeat deadline at `at_ms` (default now)."""
        return self.online and (at_ms or now_ms()) <= self.deadline

    def status(self, at_ms: int | None = None) -> int:
        """The v2 `status_code` (spec §4): UPGRADING while an upgrade is under way, else RUNNING only while
        alive; otherwise what was stored, never RUNNING."""
        if self.upgrading(at_ms):
            return AgentStatus.UPGRADING
        if self.alive(at_ms):
            return AgentStatus.RUNNING
        return self.status_code if self.status_code != AgentStatus.RUNNING else AgentStatus.UNKNOWN


# What dispatch and result polling need of a session (an HMGET of these instead of the whole hash);
# connect_time tells a new attach from the one a dispatch was routed by.
SESSION_FIELDS = ("agent_id", "online", "deadline", "node", "connect_time")


class AgentAddress:
    """`gse:agentip:<bk_cloud_id>:<ip>` -> the bk_agent_id last seen there (string key, session TTL)."""
    PREFIX = "gse:agentip:"

    @staticmethod
    def key(cloud_id: int, ip: str) -> str:
        """The key of the address (`bk_cloud_id`, `ip`)."""
        return f"{AgentAddress.PREFIX}{cloud_id}:{ip}"

    @staticmethod
    def write(cloud_id: int, ip: str, agent_id: str, ttl_ms: int = SESSION_TTL_MS) -> db.Op:
        """SET the bk_agent_id last seen at (`cloud_id`, `ip`), with the session TTL unless given (ms)."""
        return db.set_(AgentAddress.key(cloud_id, ip), agent_id, ttl_ms)

    @staticmethod
    def read(cloud_id: int, ip: str) -> db.Op:
        """GET the bk_agent_id at (`cloud_id`, `ip`)."""
        return db.get(AgentAddress.key(cloud_id, ip))

    @staticmethod
    def decode(result) -> str | None:
        """The bk_agent_id from the GET result; None when absent or the read failed."""
        return result.value.decode() if result.ok and result.found else None


class AgentIndex:
    """`gse:agents`: the set of every bk_agent_id seen (what "all" targets and list_agents read)."""
    KEY = "gse:agents"

    @staticmethod
    def add(agent_ids, ttl_ms: int = SESSION_TTL_MS) -> db.Op:
        """SADD `agent_ids` to the index, refreshing its TTL (ms)."""
        return db.sadd(AgentIndex.KEY, agent_ids, ttl_ms)

    @staticmethod
    def read() -> db.Op:
        """SMEMBERS of the index."""
        return db.smembers(AgentIndex.KEY)

    @staticmethod
    def decode(result) -> list[str]:
        """The bk_agent_ids from the SMEMBERS result ([] when the read failed)."""
        return [m.decode() for m in result.values] if result.ok else []


@dataclasses.dataclass(slots=True)
class HostSnapshotRecord:
    """`gse:snapshot:<bk_agent_id>`: the latest host snapshot an agent sent on the data path (JSON as the
    agent sent it, TTL 60 s), read for list_agent_info's cpu/mem figures."""
    cpu_rate: float
    mem_rate: float
    cpu_num: int
    mem_size: int
    time: int

    PREFIX = "gse:snapshot:"

    @staticmethod
    def key(agent_id: str) -> str:
        """The snapshot key of `agent_id`."""
        return HostSnapshotRecord.PREFIX + agent_id

    @staticmethod
    def write(agent_id: str, body: bytes, ttl_ms: int = SNAPSHOT_TTL_MS) -> db.Op:
        """SET the snapshot `body` (the agent's JSON, as sent) with a TTL of `ttl_ms` ms (default 60 s)."""
        return db.set_(HostSnapshotRecord.key(agent_id), body, ttl_ms)

    @staticmethod
    def read(agent_id: str) -> db.Op:
        """GET the snapshot of `agent_id`."""
        return db.get(HostSnapshotRecord.key(agent_id))

    @staticmethod
    def decode(result) -> "HostSnapshotRecord | None":
        """None when absent or not of the snapshot's shape ({cpu: {rate, num}, mem: {rate, total}, time})."""
        if not (result.ok and result.found):
            return None
        try:
            s = json.loads(result.value)
            return HostSnapshotRecord(float(s["cpu"]["rate"]), float(s["mem"]["rate"]), int(s["cpu"]["num"]),
                                      int(s["mem"]["total"]), int(s.get("time", 0)))
        except (ValueError, KeyError, TypeError):
            return None

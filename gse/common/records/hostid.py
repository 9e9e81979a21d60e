"""Host identity (syncdata, spec section 11): what each host's identity file should hold, and what is pending.

  gse:hostid:<bk_agent_id>       HostIdentityRecord (hash): the wanted file (content, md5, version) and the
                                 last push attempt
  gse:syncdata:pending             PendingIdentities (set): agents whose file is not confirmed yet
  gse:syncdata:cursor:<name>     SyncCursor (string): where a source's watch stopped (e.g. the CMDB's
                                 resource-watch cursor of `host`), so a new leader goes on from there

Writers: the syncdata leader (gse/syncdata). What the agent actually has is in its session record
(AgentRecord.hostid_md5 and the other hostid_* fields, written by the task server holding it from the
agent's hello and push results); a host is synced when the two md5s agree. Readers: syncdata, the API's
`cluster/get_host_identity_result`.
"""

from __future__ import annotations

import dataclasses

from gse.common import dbclient as db

from .base import DAY_MS, hash_record

IDENTITY_TTL_MS = 30 * DAY_MS


@hash_record(prefix="gse:hostid:", ttl_ms=IDENTITY_TTL_MS)
@dataclasses.dataclass(slots=True)
class HostIdentityRecord:
    """The identity file one agent should have. Times are wall-clock ms."""
    content: str = ""               # the file's JSON, exactly as written on the host
    md5: str = ""                   # hex md5 of content
    version: int = 0                # when syncdata learnt this content
    bk_host_id: int = 0
    cloud_id: int = 0
    ip: str = ""
    source: str = ""                # cmdb | file
    pushed: int = 0                 # the last push sent to the agent's task server
    attempts: int = 0               # pushes of this version so far
    error: str = ""                 # why the last attempt did not reach the agent ("" = it did)


class PendingIdentities:
    """`gse:syncdata:pending`: agents whose identity file is not confirmed (changed, or the agent offline)."""
    KEY = "gse:syncdata:pending"

    @staticmethod
    def add(agent_ids) -> db.Op:
        """SADD `agent_ids` to the pending set, refreshing its TTL (30 days)."""
        return db.sadd(PendingIdentities.KEY, agent_ids, IDENTITY_TTL_MS)

    @staticmethod
    def remove(agent_ids) -> db.Op:
        """SREM `agent_ids` from the pending set (their files are confirmed)."""
        return db.srem(PendingIdentities.KEY, agent_ids)

    @staticmethod
    def read() -> db.Op:
        """SMEMBERS of the pending set."""
        return db.smembers(PendingIdentities.KEY)

    @staticmethod
    def decode(result) -> list[str]:
        """The pending bk_agent_ids from the SMEMBERS result ([] when the read failed)."""
        return [m.decode() for m in result.values] if result.ok else []


class SyncCursor:
    """`gse:syncdata:cursor:<name>`: a source's resume point (kept 3 h, as long as the CMDB keeps events)."""
    PREFIX = "gse:syncdata:cursor:"
    TTL_MS = 3 * 3600 * 1000

    @staticmethod
    def write(name: str, cursor: str) -> db.Op:
        """SET the resume point of source `name`, kept 3 h."""
        return db.set_(SyncCursor.PREFIX + name, cursor, SyncCursor.TTL_MS)

    @staticmethod
    def read(name: str) -> db.Op:
        """GET the resume point of source `name`."""
        return db.get(SyncCursor.PREFIX + name)

    @staticmethod
    def decode(result) -> str:
        """The resume point from the GET result; "" when there is none (the source reads everything again)."""
        return result.value.decode() if result.ok and result.found else ""

    @staticmethod
    def clear(name: str) -> db.Op:
        """DEL the resume point of source `name` (the next run reads everything again)."""
        return db.delete(SyncCursor.PREFIX + name)

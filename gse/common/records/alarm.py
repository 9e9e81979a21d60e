"""What the alarm leader has reported: kept through dbproxy so that a new leader (or a restarted one) goes on
where the last one stopped, without a storm and without a second record for the same minute.

  gse:alarm:lost    LostReports (hash): bk_agent_id -> "<since_ms>:<slot>"

`since_ms` is when the agent was lost, read from its session record (the disconnect time, or the heartbeat
deadline it missed), so every leader computes the same value; `slot` is the last report sent: report k is
due at `since_ms + k * interval` (k = 0, 1, ... while within 24 h), and a leader sends report k only when
the stored slot is below k. The leader writes a slot *before* sending it (a claim): a leader killed between
the two loses that one report, never doubles it. An agent that is back is removed.

Writer and reader: the alarm leader (gse/alarm/lost.py); it reads the whole hash once when it is elected
and keeps it in memory while it leads.
"""

from __future__ import annotations

from dataclasses import dataclass

from gse.common import dbclient as db

from .base import DAY_MS


@dataclass(frozen=True, slots=True)
class LostReport:
    """One lost agent as reported: lost at `since_ms` (wall-clock ms), reports up to `slot` sent."""
    since_ms: int
    slot: int

    def encode(self) -> bytes:
        """The stored value: "<since_ms>:<slot>"."""
        return f"{self.since_ms}:{self.slot}".encode()

    @staticmethod
    def parse(raw: bytes) -> "LostReport | None":
        """The report from its stored value; None when it is not "<int>:<int>"."""
        try:
            since, slot = raw.split(b":", 1)
            return LostReport(int(since), int(slot))
        except ValueError:
            return None


class LostReports:
    """`gse:alarm:lost`: bk_agent_id -> LostReport. Kept 2 days past its last write (reports end after one)."""
    KEY = "gse:alarm:lost"
    TTL_MS = 2 * DAY_MS

    @staticmethod
    def read() -> db.Op:
        """HGETALL of every stored report (decode with `decode`)."""
        return db.hgetall(LostReports.KEY)

    @staticmethod
    def decode(result) -> dict[str, LostReport]:
        """The reports stored (unreadable entries skipped); {} when there are none."""
        if not (result.ok and result.found):
            return {}
        out = {}
        for agent_id, raw in result.fields.items():
            rep = LostReport.parse(raw)
            if rep is not None:
                out[agent_id] = rep
        return out

    @staticmethod
    def write(reports: dict[str, LostReport]) -> db.Op:
        """HSET the reports of `reports` (bk_agent_id -> LostReport), refreshing the key's TTL (2 days)."""
        return db.Op(kind=db.K.HSET, key=LostReports.KEY, fields={a: r.encode() for a, r in reports.items()},
                     ttl_ms=LostReports.TTL_MS)

    @staticmethod
    def remove(agent_ids) -> db.Op:
        """HDEL the agents in `agent_ids` (they are back)."""
        return db.hdel(LostReports.KEY, agent_ids)

"""The alarm record of the data path (spec section 10): one builder for every sender (the agent's process
supervision, the alarm daemon's lost agents, the proxy's unreachable hosts), so the shape stays one.

A record travels on DataID 1000 as JSON:

    {"server": "<sender ip>", "time": "<local>", "timezone": <hours east of UTC>, "utctime": "<local>",
     "utctime2": "<UTC>", "value": [ {"event_desc", "event_raw_id", "event_time", "event_source_system": "",
     "event_title": "", "event_type": "gse_basic_alarm_type", "extra": {"type": T, "count": n,
     "host": [ {"bizid", "cloudid", "ip", "agent_id"} ], ...}} ]}

Times are "YYYY-MM-DD HH:MM:SS" (what the monitoring platform parses: `time`/`utctime` local, `utctime2`
UTC). Consumers require exactly one element in `value`, so one record is one event.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass

DATAID_ALARM = 1000

TYPE_AGENT_LOST = 2
TYPE_PING_UNREACHABLE = 8
TYPE_CUSTOM = 100
TYPE_PROCESS = 101

EVENT_TYPE = "gse_basic_alarm_type"
_TIME = "%Y-%m-%d %H:%M:%S"
_RAW_IDS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class AlarmHost:
    """A host an alarm is about: `agent_id` is its bk_agent_id (or "cloud:ip" for an old-style agent)."""
    ip: str
    cloud_id: int = 0
    agent_id: str = ""
    biz_id: int = 0

    def to_json(self) -> dict:
        """The host as one element of `extra.host` (spec section 10): `{bizid, cloudid, ip, agent_id}`, the agent id
        falling back to "cloud:ip" when the host has none."""
        return {"bizid": self.biz_id, "cloudid": self.cloud_id, "ip": self.ip,
                "agent_id": self.agent_id or f"{self.cloud_id}:{self.ip}"}


def alarm_record(alarm_type: int, hosts: list[AlarmHost], *, server: str, desc: str = "",
                 extra: dict | None = None, at: float | None = None) -> dict:
    """One alarm record (spec section 10) of `alarm_type` about `hosts`, sent by `server` (its IP), at `at`
    (epoch seconds, default now). `extra` adds keys to `value[0].extra` (e.g. `iplist` for type 8, the
    process for type 101); `type`, `count` and `host` are always the builder's."""
    at = time.time() if at is None else at
    local, utc = time.localtime(at), time.gmtime(at)
    offset_h = int((local.tm_gmtoff or 0) // 3600)
    return {
        "server": server,
        "time": time.strftime(_TIME, local),
        "timezone": offset_h,
        "utctime": time.strftime(_TIME, local),
        "utctime2": time.strftime(_TIME, utc),
        "value": [{
            "event_desc": desc,
            "event_raw_id": next(_RAW_IDS),
            "event_time": time.strftime(_TIME, utc),
            "event_source_system": "",
            "event_title": "",
            "event_type": EVENT_TYPE,
            "extra": {**(extra or {}), "type": alarm_type, "count": len(hosts),
                      "host": [h.to_json() for h in hosts]},
        }],
    }


def encode(record: dict) -> bytes:
    """The record as the bytes sent on DataID 1000."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()

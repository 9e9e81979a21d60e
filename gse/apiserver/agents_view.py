"""The API server's one agent-id resolver and reader of agent state: a constant number of dbproxy round
trips for any number of hosts.

Callers name agents either by bk_agent_id or as "<bk_cloud_id>:<ip>" (spec §2); `resolve` turns both into
bk_agent_ids (one round trip when any host form is present, none otherwise), and the readers return typed
`AgentRecord`s (gse.common.records).
"""

from __future__ import annotations

from gse.common import dbclient as db
from gse.common.address import parse_host_id
from gse.common.errors import Unavailable
from gse.common.records import AgentAddress, AgentRecord, HostSnapshotRecord


class AgentsView:
    """Reads agent sessions through dbproxy (`client`)."""

    def __init__(self, client: db.DbClient):
        self.db = client

    async def resolve_hosts(self, hosts: list[tuple[int, str]]) -> dict[tuple[int, str], str]:
        """(cloud, ip) -> bk_agent_id for the hosts ever seen (one round trip)."""
        uniq = list(dict.fromkeys(hosts))
        if not uniq:
            return {}
        results = await self.db.execute([AgentAddress.read(c, ip) for c, ip in uniq])
        check_reads(results)
        return {h: aid for h, r in zip(uniq, results) if (aid := AgentAddress.decode(r)) is not None}

    async def resolve(self, requested: list[str]) -> dict[str, str]:
        """Requested id (either form) -> bk_agent_id. A bk_agent_id maps to itself (seen or not); a
        "cloud:ip" never seen is absent. One round trip when any host form is present, none otherwise."""
        forms = {a: parse_host_id(a) for a in dict.fromkeys(requested)}
        hosts = await self.resolve_hosts([h for h in forms.values() if h is not None])
        return {a: (a if h is None else hosts[h]) for a, h in forms.items() if h is None or h in hosts}

    async def records(self, agent_ids: list[str], fields: tuple[str, ...] = ()) -> dict[str, AgentRecord]:
        """bk_agent_id -> its session (all fields, or only `fields`), for the agents ever seen (one round trip)."""
        uniq = list(dict.fromkeys(agent_ids))
        if not uniq:
            return {}
        if fields:
            results = await self.db.execute([AgentRecord.pick(a, names=fields) for a in uniq])
            check_reads(results)
            recs = {a: AgentRecord.decode(r, fields) for a, r in zip(uniq, results)}
        else:
            results = await self.db.execute([AgentRecord.read(a) for a in uniq])
            check_reads(results)
            recs = {a: AgentRecord.decode(r) for a, r in zip(uniq, results)}
        out = {}
        for a, rec in recs.items():
            if rec is not None:
                rec.agent_id = a
                out[a] = rec
        return out

    async def by_hosts(self, hosts: list[tuple[int, str]]) -> dict[tuple[int, str], AgentRecord]:
        """(cloud, ip) -> the session of the agent last seen there (two round trips)."""
        ids = await self.resolve_hosts(hosts)
        recs = await self.records(list(ids.values()))
        return {h: recs[a] for h, a in ids.items() if a in recs}

    async def by_ids(self, requested: list[str], fields: tuple[str, ...] = ()) -> dict[str, AgentRecord]:
        """Requested id (either form) -> session (or `fields` of it; `agent_id` is always set); ids never
        seen are absent. Two round trips at most, one when no id is of the cloud:ip form."""
        real = await self.resolve(requested)
        recs = await self.records(list(real.values()), fields)
        return {a: recs[r] for a, r in real.items() if r in recs}

    async def snapshots(self, agent_ids: list[str]) -> dict[str, HostSnapshotRecord]:
        """bk_agent_id -> its latest host snapshot from the data path (60 s TTL), one round trip."""
        uniq = list(dict.fromkeys(agent_ids))
        if not uniq:
            return {}
        results = await self.db.execute([HostSnapshotRecord.read(a) for a in uniq])
        return {a: s for a, r in zip(uniq, results) if (s := HostSnapshotRecord.decode(r)) is not None}


def check_reads(results, what: str = "agent state") -> None:
    """A read dbproxy could not answer (no replica of the key up) is an outage, not an unknown agent or item:
    Unavailable (503, the caller asks again) naming `what`."""
    for r in results:
        if not r.ok and r.retryable:
            raise Unavailable(f"{what} cannot be read now: {r.error}")

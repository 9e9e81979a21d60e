"""Reading agent state for the API: a constant number of dbproxy round trips for any number of hosts."""

from __future__ import annotations

import json

from gse.common import dbclient as db
from gse.common.agentstate import agent_key, ip_key, parse_host_id
from gse.common.datastate import snapshot_key


class AgentsView:
    def __init__(self, client: db.DbClient):
        self.db = client

    async def resolve_hosts(self, hosts: list[tuple[int, str]]) -> dict[tuple[int, str], str]:
        """(cloud, ip) -> bk_agent_id for the hosts ever seen (one round trip)."""
        uniq = list(dict.fromkeys(hosts))
        results = await self.db.execute([db.get(ip_key(c, ip)) for c, ip in uniq])
        return {h: r.value.decode() for h, r in zip(uniq, results) if r.ok and r.found}

    async def records(self, agent_ids: list[str], fields: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
        """bk_agent_id -> its session hash (or just `fields` of it), for the agents ever seen (one round trip)."""
        uniq = list(dict.fromkeys(agent_ids))
        if not fields:
            results = await self.db.execute([db.hgetall(agent_key(a)) for a in uniq])
            return {a: db.text_fields(r) for a, r in zip(uniq, results) if r.ok and r.found}
        results = await self.db.execute([db.hmget(agent_key(a), fields) for a in uniq])
        return {a: {f: v.decode() for f, v, p in zip(fields, r.values, r.present) if p}
                for a, r in zip(uniq, results) if r.ok and r.found}

    async def by_hosts(self, hosts: list[tuple[int, str]]) -> dict[tuple[int, str], dict[str, str]]:
        ids = await self.resolve_hosts(hosts)
        recs = await self.records(list(ids.values()))
        return {h: recs[a] for h, a in ids.items() if a in recs}

    async def by_ids(self, requested: list[str], fields: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
        """Requested id (either form) -> record (or `fields` of it); ids never seen are absent.
        Two round trips at most, one when no id is of the cloud:ip form."""
        host_forms = {a: parse_host_id(a) for a in requested}
        hosts = [h for h in host_forms.values() if h is not None]
        resolved = await self.resolve_hosts(hosts) if hosts else {}
        real = {}
        for a in requested:
            h = host_forms[a]
            if h is None:
                real[a] = a
            elif h in resolved:
                real[a] = resolved[h]
        recs = await self.records(list(real.values()), fields)
        return {a: {**recs[r], "agent_id": r} for a, r in real.items() if r in recs}

    async def snapshots(self, agent_ids: list[str]) -> dict[str, dict]:
        """bk_agent_id -> session-hash-style fields from its latest host snapshot (data path), one round trip."""
        uniq = list(dict.fromkeys(agent_ids))
        if not uniq:
            return {}
        results = await self.db.execute([db.get(snapshot_key(a)) for a in uniq])
        out = {}
        for a, r in zip(uniq, results):
            if not (r.ok and r.found):
                continue
            try:
                s = json.loads(r.value)
                out[a] = {"host_cpu_rate": float(s["cpu"]["rate"]), "host_mem_rate": float(s["mem"]["rate"]),
                          "cpu_num": int(s["cpu"]["num"]), "mem_size": int(s["mem"]["total"]),
                          "snapshot_time": int(s.get("time", 0))}
            except (ValueError, KeyError, TypeError):
                continue
        return out

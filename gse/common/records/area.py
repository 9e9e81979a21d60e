"""Cloud areas and their proxies (spec section 12): which proxies serve which area, how areas cascade.

  gse:proxy:<node_id>      ProxyRecord (hash): one proxy's addresses and session (which task server holds it)
  gse:proxies              ProxyIndex (hash): node_id -> area, every proxy seen
  gse:areas                AreaParents (hash): area -> the area it is cascaded behind (0: the servers' own)
  gse:areahosts:<area>     AreaHosts (set): the IPs of the hosts seen in that area (what its proxies ping)

Writers: the task server holding a proxy's link (taskserver/relay_access.py) writes the proxy's record, the
index and its area's parent when the proxy attaches, and an area's hosts as their agents attach through a
proxy. Readers: the file coordinator (which proxies relay a transfer into an area, and along which region
chain), the data server (what a proxy may claim: gse.common.roles.relay_claim_refusal), operator tools.

A proxy is alive, like an agent, while its record says online and its deadline has not passed.
"""

from __future__ import annotations

import dataclasses

from gse.common import dbclient as db

from .agent import SESSION_TTL_MS, now_ms
from .base import hash_record


PROXY_PREFIX = "proxy:"


def proxy_target(node_id: str) -> str:
    """How a proxy is named where agent ids go: "proxy:<node_id>" in Relay agent_ids and RelayEnd, TaskService
    dispatch targets, and a relayed transfer's swarm members (bk_agent_ids never contain a colon)."""
    return PROXY_PREFIX + node_id


@hash_record(prefix="gse:proxy:", ttl_ms=SESSION_TTL_MS)
@dataclasses.dataclass(slots=True)
class ProxyRecord:
    """One proxy, keyed by its node id. Addresses are host:port as the area's agents dial them."""
    node_id: str = ""
    area: int = 0
    parent_area: int = 0            # the area on the other side of its upstream link
    via: str = ""                   # node id of the proxy it is cascaded behind ("" = a task server's link)
    agent_address: str = ""
    data_address: str = ""
    file_address: str = ""
    tracker_url: str = ""
    ip: str = ""
    hostname: str = ""
    version: str = ""
    boot_id: int = 0
    online: bool = False
    node: str = ""                  # the task server holding its link (or its parent proxy's)
    connect_time: int = 0
    report_time: int = 0
    deadline: int = 0

    def alive(self, at_ms: int | None = None) -> bool:
        """Whether the proxy is alive at `at_ms` (epoch ms; default now): online and its deadline not passed."""
        return self.online and (at_ms or now_ms()) <= self.deadline


class ProxyIndex:
    """`gse:proxies`: node_id -> area of every proxy seen (one HGETALL lists them all)."""
    KEY = "gse:proxies"

    @staticmethod
    def add(node_id: str, area: int, ttl_ms: int = SESSION_TTL_MS) -> db.Op:
        """The op recording proxy `node_id` as serving `area` (the index's TTL renewed to `ttl_ms`)."""
        return db.hset(ProxyIndex.KEY, {node_id: str(area)}, ttl_ms)

    @staticmethod
    def read() -> db.Op:
        """The op reading the whole index (one HGETALL)."""
        return db.hgetall(ProxyIndex.KEY)

    @staticmethod
    def decode(result) -> dict[str, int]:
        """node_id -> area from the result of read(); {} when absent or failed; entries whose area is not an integer
        are skipped."""
        if not (result.ok and result.found):
            return {}
        out = {}
        for k, v in result.fields.items():
            try:
                out[k] = int(v)
            except ValueError:
                continue
        return out


class AreaParents:
    """`gse:areas`: area -> the area it is cascaded behind (0 for an area whose proxies reach the servers)."""
    KEY = "gse:areas"

    @staticmethod
    def set(area: int, parent: int) -> db.Op:
        """The op recording that `area` is cascaded behind `parent` (0: its proxies reach the servers)."""
        return db.hset(AreaParents.KEY, {str(area): str(parent)})

    @staticmethod
    def read() -> db.Op:
        """The op reading the whole cascade (one HGETALL)."""
        return db.hgetall(AreaParents.KEY)

    @staticmethod
    def decode(result) -> dict[int, int]:
        """area -> parent area from the result of read(); {} when absent or failed; malformed entries are skipped."""
        if not (result.ok and result.found):
            return {}
        out = {}
        for k, v in result.fields.items():
            try:
                out[int(k)] = int(v)
            except ValueError:
                continue
        return out


def region_chain(parents: dict[int, int], source_area: int, target_area: int) -> list[int] | None:
    """The areas a file crosses into on its way from `source_area` to `target_area`, in order (each is
    entered through a proxy of that area, which relays it on); [] when both are one area; None when the
    areas are not connected in `parents` (or loop). Up from the source to the nearest common area the
    file leaves areas through their own proxies (which the chain names too: they relay it outwards)."""
    def up(area: int) -> list[int] | None:
        path, seen = [area], {area}
        while area != 0:
            area = parents.get(area, -1)
            if area < 0 or area in seen:
                return None
            path.append(area)
            seen.add(area)
        return path
    a, b = up(source_area), up(target_area)
    if a is None or b is None:
        return None
    common = next(x for x in a if x in b)
    leaving = a[:a.index(common)]           # the source's side: relayed outwards by their proxies
    entering = b[:b.index(common)][::-1]    # the target's side, outermost first
    return leaving + entering


class AreaHosts:
    """`gse:areahosts:<area>`: the IPs of the hosts seen in that area (the proxies ping them)."""
    PREFIX = "gse:areahosts:"

    @staticmethod
    def key(area: int) -> str:
        """The Redis key of `area`'s host set: gse:areahosts:<area>."""
        return f"{AreaHosts.PREFIX}{area}"

    @staticmethod
    def add(area: int, ips, ttl_ms: int = SESSION_TTL_MS) -> db.Op:
        """The op adding `ips` (an iterable of str) to `area`'s hosts (the set's TTL renewed to `ttl_ms`)."""
        return db.sadd(AreaHosts.key(area), ips, ttl_ms)

    @staticmethod
    def read(area: int) -> db.Op:
        """The op reading `area`'s hosts (SMEMBERS)."""
        return db.smembers(AreaHosts.key(area))

    @staticmethod
    def decode(result) -> list[str]:
        """The sorted IPs from the result of read(); [] when it failed."""
        return sorted(m.decode() for m in result.values) if result.ok else []

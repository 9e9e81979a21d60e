"""How a file transfer crosses cloud areas (spec section 12): one swarm per area, joined by the areas' proxies.

Hosts of an area reach only their proxies, so a transfer whose members are not all of area 0 is planned as
one BitTorrent swarm per area it touches, each tracked by the area's own tracker: the file server's for
area 0, a proxy's of that area for the others (gse/proxy/files.py). One proxy per area, its **relay**, is a
member of two swarms: its area's, and the one of the area its upstream link leads to (its parent area's). It
fetches every piece once from the outer side and seeds it inside (or the other way round, for a source inside
an area), and caches the file: a file crosses into an area once. Direct-mode entries follow the same chain
(each relay fetches from the one above it and serves its area; uploads are forwarded up). The areas touched
are those on the paths from the source's and every target's area up to the nearest area they all have in
common (the region chain: `gse.common.records.region_chain`); that area's relay (if not area 0) tracks its
swarm but has nothing above it.

With cross-area penetration (the transfer's `cross_area`), none of this: one swarm at the file server where
every member meets every other.
"""

from __future__ import annotations

import dataclasses
import logging

from gse.common import dbclient as db
from gse.common.records import AgentRecord, AreaParents, ProxyIndex, ProxyRecord, now_ms, proxy_target, region_chain

log = logging.getLogger("gse.taskserver.area_files")

@dataclasses.dataclass
class AreaPlan:
    """The swarms of one transfer and the proxies joining them."""
    source_area: int
    top: int                                    # the nearest area every member's path reaches
    target_area: dict[str, int]                 # target -> its area
    parents: dict[int, int]
    relays: dict[int, ProxyRecord]              # area -> its relay (every touched area but 0)
    unreachable: dict[str, str]                 # target -> why it cannot be reached (no proxy of an area on its way)
    fileserver: str = ""                        # area 0's direct relay and tracker
    tracker_url: str = ""

    @staticmethod
    def member(node_id: str) -> str:
        """The member name of the relay proxy `node_id` in a transfer: "proxy:<node_id>"."""
        return proxy_target(node_id)

    def relay_members(self) -> list[str]:
        """The member names of every area's relay proxy in this plan."""
        return [self.member(p.node_id) for p in self.relays.values()]

    def endpoint(self, area: int) -> tuple[str, str]:
        """(file relay address, tracker announce URL) of the swarm of `area`."""
        if area == 0:
            return self.fileserver, self.tracker_url
        p = self.relays[area]
        return p.file_address, p.tracker_url

    def member_areas(self, source: str) -> dict[str, int]:
        """Each member's swarm at the file server: a relay is in the swarm of the area above it."""
        out = {source: self.source_area, **self.target_area}
        for area, p in self.relays.items():
            out[self.member(p.node_id)] = area if area == self.top else self.parents[area]
        return out

    def swarm_members(self, area: int, source: str, targets: list[str]) -> list[str]:
        """The members announcing to the tracker of `area`'s swarm."""
        out = [t for t in targets if self.target_area.get(t) == area and t not in self.unreachable]
        if self.source_area == area:
            out.append(source)
        if area != 0:
            out.append(self.member(self.relays[area].node_id))
        out += [self.member(p.node_id) for a, p in self.relays.items() if a != self.top and a != area
                and self.parents.get(a) == area]
        return out

    def _source_way(self) -> list[int]:
        """The areas the file leaves on its way from the source's area up to the top (not the top)."""
        return region_chain(self.parents, self.source_area, self.top) or []

    def on_source_way(self, area: int) -> bool:
        """The source is in `area` or below it: the relay of `area` gets the file from below, never from above."""
        return area == self.source_area or area in self._source_way()

    def uploaders(self, source: str) -> list[str]:
        """The members that may upload the transfer's direct-mode entries (spec section 12): the source, and the
        relay of every area on its way up below the top (each forwards the source's uploads to the swarm above)."""
        return [source] + [self.member(self.relays[a].node_id) for a in self._source_way() if a in self.relays]

    def upstream(self, area: int) -> tuple[str, str]:
        """Where the relay of `area` fetches from: ("", "") for the top of the chain."""
        return ("", "") if area == self.top else self.endpoint(self.parents[area])

    def route(self, target: str) -> list[str]:
        """The relays (node ids) a file follows to `target`, in order."""
        chain = region_chain(self.parents, self.source_area, self.target_area.get(target, 0)) or []
        return [self.relays[a].node_id for a in chain if a in self.relays]


def _path_up(parents: dict[int, int], area: int) -> list[int] | None:
    path, seen = [area], {area}
    while area != 0:
        area = parents.get(area, -1)
        if area < 0 or area in seen:
            return None
        path.append(area)
        seen.add(area)
    return path


async def plan(client: db.DbClient, source: str, source_area: int, targets: list[str],
               fileserver: str, tracker_url: str) -> AreaPlan | None:
    """The swarms of a transfer (None: every member is of area 0, one plain swarm). Three dbproxy round trips
    at most, whatever the number of targets."""
    names = ("cloud_id", "proxy")
    res = await client.execute([AgentRecord.pick(t, names=names) for t in targets] + [AreaParents.read(),
                                                                                       ProxyIndex.read()])
    areas: dict[str, int] = {}
    holder: dict[str, str] = {}
    for t, r in zip(targets, res):
        rec = AgentRecord.decode(r, names)
        areas[t] = rec.cloud_id if rec is not None else 0
        holder[t] = rec.proxy if rec is not None else ""
    if source_area == 0 and not any(areas.values()):
        return None
    parents = AreaParents.decode(res[-2])
    index = ProxyIndex.decode(res[-1])
    paths = {a: _path_up(parents, a) for a in {source_area, *areas.values()}}
    unreachable: dict[str, str] = {}
    for t, a in areas.items():
        if paths[a] is None:
            unreachable[t] = f"area {a} is not known to the cluster: no proxy of it ever attached"
    if paths[source_area] is None:
        unreachable.update({t: f"the source's area {source_area} is not known to the cluster" for t in targets})
        return AreaPlan(source_area, 0, areas, parents, {}, unreachable, fileserver, tracker_url)
    usable = [p for a, p in paths.items() if p is not None and (a == source_area or a in
                                                              {areas[t] for t in targets if t not in unreachable})]
    # the nearest area on every path (paths end at 0, so there is one)
    common = [a for a in usable[0] if all(a in p for p in usable)]
    top = common[0]
    touched = {a for p in usable for a in p[:p.index(top) + 1]}
    candidates = [n for n, a in index.items() if a in touched]
    recs = await client.execute([ProxyRecord.read(n) for n in candidates]) if candidates else []
    at = now_ms()
    alive: dict[int, list[ProxyRecord]] = {}
    for n, r in zip(candidates, recs):
        rec = ProxyRecord.decode(r)
        if rec is not None and rec.alive(at) and rec.file_address and rec.tracker_url:
            rec.node_id = rec.node_id or n
            alive.setdefault(rec.area, []).append(rec)
    relays: dict[int, ProxyRecord] = {}
    for area in sorted(touched - {0}):
        options = alive.get(area, [])
        if not options:
            continue
        # the proxy already holding most of the area's targets relays (their links are on it), else the first
        held = {p.node_id: sum(1 for t, a in areas.items() if a == area and holder[t] == p.node_id) for p in options}
        relays[area] = max(sorted(options, key=lambda p: p.node_id), key=lambda p: held[p.node_id])
    missing = set(touched - {0} - set(relays))
    source_way = paths[source_area][:paths[source_area].index(top) + 1]
    for t, a in areas.items():
        if t in unreachable:
            continue
        way = paths[a][:paths[a].index(top) + 1] + source_way
        gone = [m for m in way if m in missing]
        if gone:
            unreachable[t] = f"no proxy of area {gone[0]} is attached: the file cannot cross into it"
    p = AreaPlan(source_area, top, areas, parents, relays, unreachable, fileserver, tracker_url)
    log.info("transfer across areas", extra={"source_area": source_area, "top": top,
                                             "relays": {a: r.node_id for a, r in relays.items()},
                                             "unreachable": len(unreachable)})
    return p

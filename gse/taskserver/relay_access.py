"""Agents of cloud areas, relayed by their proxies (spec section 12) onto the agent port.

A proxy (gse/proxy) holds the links of its area's agents and opens a few links of its own to task servers,
showing a proxy certificate that names its area. Its first frame is a ProxyHello; then every frame of one of
its agents comes up in a Relay envelope naming the agent and the proxy holding the agent's link (`via`),
and frames for its agents go down the same way, one envelope for every agent a frame is for. A proxy of a
cascaded area (area 2 behind area 1) is relayed the same way by the proxy it dials: its ProxyHello comes
up inside a Relay naming it "proxy:<node_id>".

Here every relayed agent is an ordinary `AgentSession` whose link is a `RelayedLink`: tasks, results and
their acknowledgements, files, plugin messages and process operations work as for direct agents, and
`get_agent_info` shows the agent's proxy as its parent. What a proxy may claim is decided by
gse.common.roles (`proxy_link_refusal`, `relay_claim_refusal`): its link must show a proxy certificate
naming its area; an agent may be claimed only by the proxy of its own area that holds its link (and that
proxy must be on this link); a cascaded proxy only for another area, never one on its own way up.

Faults: an agent that leaves its proxy (RelayEnd up) is written offline at once, as a direct agent whose
link closed. A proxy link that is lost takes its agents' sessions here with it but writes nothing: its
agents stay attached to their proxy, which attaches them again when it is back upstream (here or on a
peer), and they read offline only once their heartbeat deadline passed, as agents whose task server died.

A broadcast costs one frame per proxy link: `RelayedLink.write` queues the agent under the frame it was
given, and the queue is flushed once per event-loop turn as one Relay per distinct frame (keeping every
agent's frames in the order they were sent).
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from gse.common import roles
from gse.common.address import split_host_port
from gse.common.errors import GseError
from gse.common.records import (PROXY_PREFIX, AreaHosts, AreaParents, ProxyIndex, ProxyRecord,
                                now_ms, proxy_target, valid_agent_id)
from gse.pb import agent_pb2 as pb

log = logging.getLogger("gse.taskserver.relay")

PROXIES = Gauge("gse_taskserver_proxies", "Proxies attached (directly or cascaded behind another)")
RELAYED = Gauge("gse_taskserver_relayed_agents", "Agents attached through proxies")
RELAY_FRAMES = Counter("gse_taskserver_relay_frames_total", "Relay envelopes", ["direction"])
RELAY_REFUSED = Counter("gse_taskserver_relay_refused_total", "Relayed hellos refused", ["reason"])



class RelayedLink:
    """One relayed agent's link as its session sees it (the interface of framelink.FrameLink it uses)."""

    __slots__ = ("mux", "agent_id", "peer", "identity", "session", "_closed")
    relayed = True
    ready = True

    def __init__(self, mux: "ProxySession", agent_id: str, peer: str, identity: roles.Identity):
        self.mux = mux
        self.agent_id = agent_id
        self.peer = peer
        self.identity = identity
        self.session = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once this agent's relayed session ended here, or its proxy's link is gone."""
        return self._closed or self.mux.link.closed

    @property
    def transport(self):
        """The asyncio transport of the proxy's physical link, shared by all of that proxy's agents (part of the
        FrameLink interface; pausing it pauses them all)."""
        return self.mux.link.transport

    @property
    def physical(self):
        """The proxy's FrameLink this agent's frames travel on (the sweep looks there for a paused link)."""
        return self.mux.link

    def write(self, body: bytes) -> bool:
        """Queue a serialized ServerFrame for this agent on its proxy's link (sent in the next flush, grouped with the
        same frame for other agents); False once the link is closed. Never blocks."""
        if self.closed:
            return False
        return self.mux.queue(self.agent_id, body)

    def close(self) -> None:
        """End this agent's session here; its proxy ends the agent's link unless a newer hello of the same
        agent on this proxy link replaced it (then the link the proxy holds is the new one)."""
        if self._closed:
            return
        self._closed = True
        current = self.mux.agents.get(self.agent_id) is self
        if current:
            del self.mux.agents[self.agent_id]
            if not self.mux.link.closed:
                self.mux.queue_end(self.agent_id)
        self.mux.relays.access.link_lost(self, None)

    abort = close


class ProxyPeer:
    """A proxy reachable through one proxy link: the one holding it, or one cascaded behind it."""

    __slots__ = ("node_id", "hello", "parent", "mux", "serial", "last_seen")

    def __init__(self, hello: pb.ProxyHello, parent: "ProxyPeer | None", mux: "ProxySession", serial: str = ""):
        self.node_id = hello.node_id
        self.hello = hello
        self.parent = parent
        self.mux = mux
        self.serial = serial
        self.last_seen = time.monotonic()

    @property
    def area(self) -> int:
        """The bk_cloud_id this proxy serves (from its ProxyHello, checked against its certificate)."""
        return self.hello.area

    def chain(self) -> list["ProxyPeer"]:
        """This proxy and those it is cascaded behind, up to the one holding the link."""
        out, p = [], self
        while p is not None:
            out.append(p)
            p = p.parent
        return out

    def send(self, body: bytes) -> bool:
        """Send a serialized ServerFrame to this proxy itself: straight on the link for the proxy holding it, wrapped
        in a Relay naming "proxy:<node_id>" for a cascaded one; False when the link is closed."""
        if self.parent is None:
            return self.mux.link.write(body)
        return self.mux.queue(proxy_target(self.node_id), body)

    @property
    def closed(self) -> bool:
        """True when its link is gone or it has been reached through another link since."""
        return self.mux.link.closed or self.mux.peers.get(self.node_id) is not self


class ProxySession:
    """The state of one proxy's link to this task server (`link.session` of that link)."""

    __slots__ = ("relays", "link", "root", "peers", "agents", "last_seen", "_groups", "_by_frame", "_last",
                 "_ends", "_scheduled")

    def __init__(self, relays: "Relays", link, root_hello: pb.ProxyHello):
        self.relays = relays
        self.link = link
        self.peers: dict[str, ProxyPeer] = {}
        self.root = ProxyPeer(root_hello, None, self, link.identity.serial)
        self.peers[self.root.node_id] = self.root
        self.agents: dict[str, RelayedLink] = {}
        self.last_seen = time.monotonic()
        self._groups: list[tuple[bytes, list[str]]] = []    # (frame, targets), in the order first queued
        self._by_frame: dict[int, int] = {}                  # id(frame) -> index of its latest group
        self._last: dict[str, int] = {}                      # target -> index of the group of its last frame
        self._ends: list[str] = []
        self._scheduled = False

    @property
    def agent_id(self) -> str:      # what logs and counters name a session by
        """"proxy:<node_id>" of the proxy holding the link."""
        return proxy_target(self.root.node_id)

    @property
    def closed(self) -> bool:
        """True once the proxy's link is closed."""
        return self.link.closed

    def send(self, body: bytes) -> bool:
        """Write a serialized ServerFrame on the proxy's link as it is (no Relay); False when closed."""
        return self.link.write(body)

    def close(self) -> None:
        """Close the proxy's link; its agents' sessions end through Relays.lost, without an offline write."""
        self.link.close()

    # ---- frames down ------------------------------------------------------------------------------------

    def queue(self, target: str, body: bytes) -> bool:
        """Send `body` (a serialized ServerFrame) to `target` with the next flush. Frames given as the same
        object are grouped into one Relay, unless that would put a frame for a target ahead of one queued
        for it earlier."""
        groups = self._groups
        at = self._by_frame.get(id(body))
        # (the pending groups hold their frames, so an id seen here is still that object's)
        if at is not None and self._last.get(target, -1) <= at:
            groups[at][1].append(target)
        else:
            at = len(groups)
            groups.append((body, [target]))
            self._by_frame[id(body)] = at
        self._last[target] = at
        self._schedule()
        return True

    def queue_end(self, target: str) -> None:
        """Tell the proxy, with the next flush, that `target` (an agent id or "proxy:<node_id>") no longer has a
        session here (one RelayEnd for all of a turn's ends)."""
        self._ends.append(target)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what was queued this event-loop turn: one Relay per group of targets sharing a frame, in queue order,
        then one RelayEnd for the ended targets."""
        self._scheduled = False
        groups, self._groups = self._groups, []
        self._by_frame, self._last = {}, {}
        ends, self._ends = self._ends, []
        link = self.link
        for body, ids in groups:
            link.write(pb.ServerFrame(relay=pb.Relay(agent_ids=ids, frame=body)).SerializeToString())
        RELAY_FRAMES.labels("down").inc(len(groups))
        if ends:
            link.write(pb.ServerFrame(relay_end=pb.RelayEnd(agent_ids=ends)).SerializeToString())


class Relays:
    """Proxy links of one task server's agent port (AgentAccess calls in for proxy hellos, frames arriving
    on proxy links and lost proxy links)."""

    def __init__(self, access, area: int):
        self.access = access
        self.area = area
        self.muxes: dict[int, ProxySession] = {}        # id(link) -> the state of a proxy's link (a proxy may
                                                        # hold several links to one task server)
        self.proxies: dict[str, ProxyPeer] = {}         # every proxy reachable here, by node id
        self.on_proxy_attach = None                     # (ProxyPeer) -> None: e.g. send it the data servers
        self._attached = asyncio.Event()                # a proxy attached: tell it its area's hosts soon

    # ---- a proxy's own link -------------------------------------------------------------------------

    def hello(self, link, hello: pb.ProxyHello) -> None:
        """The first frame of a link showing a proxy certificate: a ProxyHello."""
        access = self.access
        why = roles.proxy_link_refusal(link.identity, hello.area, access.identity.deny)
        code = "role" if link.identity.role != roles.PROXY else ("revoked" if "revoked" in why else "area")
        if not why and not valid_agent_id(hello.node_id):
            why, code = "a proxy's node id must be 1-64 printable characters without ':' or ' '", "bad_hello"
        if not why and hello.area == self.area:
            why, code = (f"a proxy of area {hello.area} relays into another area; this task server serves "
                         f"area {self.area} itself"), "area"
        if why:
            RELAY_REFUSED.labels(code).inc()
            access.refuse(link, why, "proxy", code)
            return
        mux = ProxySession(self, link, hello)
        link.session = mux
        link.coalesce = True            # many agents' frames on one link: small ones go out together
        self.muxes[id(link)] = mux
        self._add_proxy(mux.root, parent_area=self.area)
        log.info("proxy attached", extra={"proxy": hello.node_id, "area": hello.area, "peer": link.peer})
        link.write(self._welcome())
        if self.on_proxy_attach is not None:
            self.on_proxy_attach(mux.root)

    def _welcome(self) -> bytes:
        a = self.access
        return pb.ServerFrame(welcome=pb.Welcome(
            node_id=a.node_id, heartbeat_interval_ms=int(a.hb_interval_s * 1000), parent_ip=a.parent_ip,
            parent_port=a.parent_port, reconnect_spread_ms=max(a.spread_ms(), a.told_spread_ms),
            host_snapshot_every=a.host_snapshot_every)).SerializeToString()

    def _add_proxy(self, peer: ProxyPeer, parent_area: int) -> None:
        old = self.proxies.get(peer.node_id)
        if old is not None and old.parent is not None and old.mux is not peer.mux:
            # A cascaded proxy now reached through another link: forget the old way (its agents stay until
            # their own hellos come through the new one). A proxy's own links each keep their root.
            old.mux.peers.pop(peer.node_id, None)
        self.proxies[peer.node_id] = peer
        peer.mux.peers[peer.node_id] = peer
        PROXIES.set(len(self.proxies))
        self._attached.set()
        h, at = peer.hello, now_ms()
        a = self.access
        a.writer.add([ProxyIndex.add(h.node_id, h.area), AreaParents.set(h.area, parent_area)])
        a.writer.put(ProxyRecord.update(
            h.node_id, node_id=h.node_id, area=h.area, parent_area=parent_area,
            via=peer.parent.node_id if peer.parent else "", agent_address=h.agent_address,
            data_address=h.data_address, file_address=h.file_address, tracker_url=h.tracker_url, ip=h.ip,
            hostname=h.hostname, version=h.version, boot_id=h.boot_id, online=True, node=a.node_id,
            connect_time=at, report_time=at, deadline=a.deadline_ms(at)))

    def _proxy_heartbeat(self, peer: ProxyPeer) -> None:
        peer.last_seen = time.monotonic()
        at = now_ms()
        self.access.writer.put(ProxyRecord.update(peer.node_id, report_time=at, online=True,
                                                  deadline=self.access.deadline_ms(at)), lazy=True)

    def target(self, name: str):
        """What TaskService dispatches to for "proxy:<node_id>" (None when that proxy is not here)."""
        peer = self.proxies.get(name[len(PROXY_PREFIX):]) if name.startswith(PROXY_PREFIX) else None
        return None if peer is None or peer.closed else peer

    # ---- frames arriving on a proxy link ----------------------------------------------------------------

    def on_frame(self, link, mux: ProxySession, frame: pb.AgentFrame) -> str:
        """One frame of a proxy link; returns the kind of what it carried (for the write-queue throttle)."""
        now = time.monotonic()
        mux.last_seen = now
        kind = frame.WhichOneof("body")
        if kind == "relay":
            RELAY_FRAMES.labels("up").inc()
            return self._relayed(mux, frame.relay, now)
        if kind == "heartbeat":
            self._proxy_heartbeat(mux.root)
        elif kind == "relay_end":
            for name in frame.relay_end.agent_ids:
                self._ended(mux, name)
        return kind or ""

    def _relayed(self, mux: ProxySession, relay: pb.Relay, now: float) -> str:
        if len(relay.agent_ids) != 1:
            log.warning("relay frame naming other than one sender; closing the proxy link",
                        extra={"proxy": mux.root.node_id})
            mux.close()
            return ""
        sender = relay.agent_ids[0]
        try:
            inner = pb.AgentFrame.FromString(relay.frame)
        except DecodeError:
            log.warning("undecodable relayed frame; ending that peer", extra={"proxy": mux.root.node_id,
                                                                         "agent_id": sender})
            mux.queue_end(sender)
            return ""
        kind = inner.WhichOneof("body")
        if sender.startswith(PROXY_PREFIX):
            peer = mux.peers.get(sender[len(PROXY_PREFIX):])
            if kind == "proxy_hello":
                self._cascaded_hello(mux, relay, inner.proxy_hello)
            elif peer is None:
                mux.queue_end(sender)
            elif kind == "heartbeat":
                self._proxy_heartbeat(peer)
            return kind or ""
        if kind == "hello":
            self._agent_hello(mux, relay, inner.hello)
            return kind
        if kind == "enroll":
            self._enroll(mux, relay, inner)
            return kind
        rl = mux.agents.get(sender)
        if rl is None or rl.session is None:
            mux.queue_end(sender)       # the proxy thinks it attached: tell it otherwise
            return kind or ""
        rl.session.last_seen = now
        self.access.on_session_frame(rl.session, inner, kind)
        return kind or ""

    def _refuse(self, mux: ProxySession, target: str, why: str, code: str) -> None:
        RELAY_REFUSED.labels(code).inc()
        log.warning("relayed hello refused", extra={"proxy": mux.root.node_id, "agent_id": target, "reason": why})
        mux.queue(target, pb.ServerFrame(refused=pb.Refused(reason=why, code=code)).SerializeToString())
        mux.queue_end(target)

    def _cascaded_hello(self, mux: ProxySession, relay: pb.Relay, hello: pb.ProxyHello) -> None:
        sender = relay.agent_ids[0]
        via = mux.peers.get(relay.via)
        why, code = "", "area"
        if via is None:
            why, code = f"proxy {relay.via} is not attached through this link", "bad_hello"
        elif sender != proxy_target(hello.node_id) or not valid_agent_id(hello.node_id):
            why, code = "a relayed proxy hello must name the proxy it comes from", "bad_hello"
        elif hello.area == self.area or hello.area in {p.area for p in via.chain()}:
            why = (f"a proxy of area {hello.area} cannot be cascaded behind the proxy of area {via.area}: "
                   f"that area is on its own way up")
        elif self.access.identity.deny.revoked(roles.Identity(serial=relay.serial)):
            why, code = f"certificate {relay.serial} is revoked", "revoked"
        if why:
            self._refuse(mux, sender, why, code)
            return
        peer = ProxyPeer(hello, via, mux, relay.serial)
        self._add_proxy(peer, parent_area=via.area)
        log.info("cascaded proxy attached", extra={"proxy": hello.node_id, "area": hello.area, "via": via.node_id})
        mux.queue(sender, self._welcome())
        if self.on_proxy_attach is not None:
            self.on_proxy_attach(peer)

    def _agent_hello(self, mux: ProxySession, relay: pb.Relay, hello: pb.AgentHello) -> None:
        access = self.access
        sender = relay.agent_ids[0]
        via = mux.peers.get(relay.via)
        ident = roles.Identity(roles.AGENT, hello.agent_id, relay.serial.upper())
        why, code = "", ""
        if via is None:
            why, code = f"proxy {relay.via} is not attached through this link", "bad_hello"
        elif sender != hello.agent_id or not valid_agent_id(hello.agent_id):
            why, code = "bk_agent_id must be 1-64 printable characters (and the relay must name it)", "bad_agent_id"
        else:
            why = roles.relay_claim_refusal(via.area, hello.cloud_id, what=f"agent {hello.agent_id}")
            code = "area" if why else ""
            if not why:
                why = access.identity.deny.revoked(ident)
                code = "revoked" if why else ""
        if why:
            self._refuse(mux, sender, why, code)
            return
        rl = RelayedLink(mux, hello.agent_id, relay.peer or f"via:{via.node_id}", ident)
        old = mux.agents.get(hello.agent_id)
        mux.agents[hello.agent_id] = rl
        if old is not None:
            old.close()             # superseded on this very link: the proxy holds the new one
        RELAYED.set(sum(len(m.agents) for m in self.muxes.values()))
        try:
            host, port = split_host_port(via.hello.agent_address)
        except ValueError:
            host, port = via.hello.ip, 0
        access.writer.add([AreaHosts.add(hello.cloud_id, [hello.ip])])
        access.attach(rl, hello, parent_ip=host, parent_port=port, proxy=via.node_id, peer=rl.peer)

    def _enroll(self, mux: ProxySession, relay: pb.Relay, inner: pb.AgentFrame) -> None:
        """An agent without a certificate of its own enrolls through its proxy: one Enroll, one answer."""
        sender = relay.agent_ids[0]
        enroller = self.access.enroller
        if enroller is None or mux.peers.get(relay.via) is None:
            self._refuse(mux, sender, "this task server does not enroll agents", "enroll_off")
            return

        async def answer():
            try:
                body = await enroller.answer(relay.peer or f"via:{relay.via}", inner.enroll)
            except GseError as exc:
                body = pb.ServerFrame(refused=pb.Refused(reason=str(exc), code="enroll_off")).SerializeToString()
            if not mux.closed:
                mux.queue(sender, body)
                mux.queue_end(sender)
        self.access.spawn(answer())

    def _ended(self, mux: ProxySession, name: str) -> None:
        """The proxy says this agent (or proxy) left it."""
        if name.startswith(PROXY_PREFIX):
            peer = mux.peers.get(name[len(PROXY_PREFIX):])
            if peer is not None and peer.parent is not None:
                self._drop_peer(mux, peer, offline=False)
            return
        rl = mux.agents.get(name)
        if rl is not None:
            rl._closed = True
            del mux.agents[name]
            self.access.link_lost(rl, None)
            RELAYED.set(sum(len(m.agents) for m in self.muxes.values()))

    def _drop_peer(self, mux: ProxySession, peer: ProxyPeer, offline: bool) -> None:
        """A cascaded proxy left: it, the proxies behind it and their agents leave this link (agents without
        an offline write: they are still attached to their proxy, which comes back)."""
        gone = {p.node_id for p in mux.peers.values() if peer in p.chain()}
        for node in gone:
            mux.peers.pop(node, None)
            if self.proxies.get(node) is not None and self.proxies[node].mux is mux:
                del self.proxies[node]
        for aid, rl in list(mux.agents.items()):
            sess = rl.session
            if sess is not None and sess.proxy in gone:
                rl._closed = True
                del mux.agents[aid]
                self.access.detach(sess, offline=offline)
        PROXIES.set(len(self.proxies))
        RELAYED.set(sum(len(m.agents) for m in self.muxes.values()))

    def lost(self, mux: ProxySession) -> None:
        """A proxy link is gone: its agents' sessions here end without an offline write (see the module)."""
        self.muxes.pop(id(mux.link), None)
        for node, peer in list(mux.peers.items()):
            if self.proxies.get(node) is peer:
                del self.proxies[node]
        mux.peers.clear()
        for rl in list(mux.agents.values()):
            rl._closed = True
            if rl.session is not None:
                self.access.detach(rl.session, offline=False)
        mux.agents.clear()
        PROXIES.set(len(self.proxies))
        RELAYED.set(sum(len(m.agents) for m in self.muxes.values()))
        log.info("proxy link lost", extra={"proxy": mux.root.node_id})

    # ---- housekeeping ---------------------------------------------------------------------------------

    def sweep(self, limit: float) -> None:
        """Close proxy links silent since before `limit` (monotonic); end cascaded proxies likewise."""
        for mux in list(self.muxes.values()):
            if mux.last_seen < limit and mux.link not in self.access.paused:
                log.info("proxy silent; closing its link", extra={"proxy": mux.root.node_id})
                mux.close()
                continue
            for peer in [p for p in mux.peers.values() if p.parent is not None and p.last_seen < limit]:
                log.info("cascaded proxy silent; ending it", extra={"proxy": peer.node_id})
                self._drop_peer(mux, peer, offline=False)
                mux.queue_end(proxy_target(peer.node_id))

    def cut_revoked(self) -> None:
        """After the deny list changed: refuse (code 'revoked') and close every proxy link whose certificate is now
        revoked."""
        deny = self.access.identity.deny
        for mux in list(self.muxes.values()):
            why = deny.revoked(mux.link.identity)
            if why:
                log.warning("revoked proxy cut", extra={"proxy": mux.root.node_id, "reason": why})
                mux.link.write(pb.ServerFrame(refused=pb.Refused(reason=why, code="revoked")).SerializeToString())
                mux.close()

    async def area_hosts_loop(self, db, interval: float) -> None:
        """Tell the proxies held here the hosts of their areas (they ping them, spec section 12) every
        `interval` seconds, and a moment after a proxy attached: one dbproxy round trip for the hosts of
        every area, one for the area's proxies alive now (they share the pinging)."""
        while True:
            try:
                await asyncio.wait_for(self._attached.wait(), interval)
                await asyncio.sleep(1.0)        # the area's other proxies attach about now too
            except asyncio.TimeoutError:
                pass
            self._attached.clear()
            peers = [p for p in self.proxies.values() if not p.closed]
            if not peers:
                continue
            areas = sorted({p.area for p in peers})
            try:
                res = await db.execute([AreaHosts.read(a) for a in areas] + [ProxyIndex.read()])
                index = ProxyIndex.decode(res[-1])
                nodes = [n for n, a in index.items() if a in areas]
                names = ("area", "online", "deadline")
                recs = await db.execute([ProxyRecord.pick(n, names=names) for n in nodes]) if nodes else []
            except GseError as exc:
                log.warning("area hosts not read; told later", extra={"error": str(exc)})
                continue
            now = now_ms()
            alive: dict[int, list[str]] = {}
            for node, r in zip(nodes, recs):
                rec = ProxyRecord.decode(r, names)
                if rec is not None and rec.alive(now):
                    alive.setdefault(rec.area, []).append(node)
            for area, r in zip(areas, res):
                here = [p for p in peers if p.area == area]
                proxies = sorted(set(alive.get(area, [])) | {p.node_id for p in here})
                frame = pb.ServerFrame(area_hosts=pb.AreaHosts(area=area, ips=AreaHosts.decode(r),
                                                               proxies=proxies)).SerializeToString()
                for p in here:
                    p.send(frame)

    def close_all(self) -> None:
        """Close every proxy link (the task server is stopping; the proxies reconnect to a peer)."""
        for mux in list(self.muxes.values()):
            mux.close()

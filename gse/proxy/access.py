"""The proxy's agent access (spec section 12): its area's agent links in, a few links upstream.

Downstream, the agents of the area dial the proxy's agent port (default 28668) exactly as they would a task
server: the same frame link over mutual TLS (gse/common/framelink.py). The proxy checks what only it can
see, the certificate each agent shows, and what it may claim for it (gse.common.roles, the one place):

- an agent link must show a certificate of role agent naming the bk_agent_id its hello names, and say the
  proxy's own area (an agent of area 2 dialling area 1's proxy is refused, code `area`, saying why);
- a link showing no certificate may send one Enroll frame, relayed up to a task server (enrollment);
- a link showing a proxy certificate of another area is a cascaded proxy (its area behind this one); it
  opens with its ProxyHello and relays its own agents (and any proxies behind it) through this proxy.

Upstream, the proxy holds `upstream.links` links (to task servers, or to the proxy of its parent area), each
opened with a ProxyHello and multiplexing the frames of the agents given to it in Relay envelopes (up: one
agent's frame; down: one frame for many agents, which the proxy writes to each). Agents are given to the
live link holding the fewest; a cascaded proxy and everything behind it share one link.

Faults:
- An upstream link lost: its agents are attached again through another live link at once (their hellos
  sent again; the Welcome that comes back makes each agent send again what was not acknowledged). With no
  live link, the agents stay attached here and what they send (but heartbeats) is kept, bounded, until a
  link is back; upstream they read offline only once their heartbeat deadline passed.
- An agent that leaves (link closed, silent for `heartbeat_misses` intervals): upstream hears RelayEnd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from gse import __version__
from gse.common import framelink, roles
from gse.common.address import split_host_port
from gse.common.backoff import Backoff
from gse.common.config import ConfigError, check_addresses
from gse.common.records import proxy_target, valid_agent_id
from gse.pb import agent_pb2 as pb

log = logging.getLogger("gse.proxy.access")

AGENTS = Gauge("gse_proxy_agents", "Agent links held (this proxy's own area)")
CHILDREN = Gauge("gse_proxy_cascaded_proxies", "Proxies of cascaded areas attached to this proxy")
UPLINKS = Gauge("gse_proxy_upstream_links", "Upstream links up")
REFUSED = Counter("gse_proxy_refused_total", "Links refused", ["code"])
FRAMES = Counter("gse_proxy_frames_total", "Frames relayed", ["direction"])
HELD = Gauge("gse_proxy_held_frames", "Agent frames held while no upstream link is up")
HELD_DROPPED = Counter("gse_proxy_held_dropped_total", "Held agent frames dropped (over the bound)")
REATTACHED = Counter("gse_proxy_reattached_total", "Agents attached again through another upstream link")


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """The proxy's `upstream` section: the task servers' agent ports (or the parent area's proxies, host:port) it
    dials, how many links it holds, connect timeout and reconnect back-off (s), and how much of its agents' traffic it
    keeps while no link is up (frames, bytes; the oldest go first)."""
    servers: tuple[str, ...] = ("127.0.0.1:48668",)   # task servers' agent ports, or the parent area's proxies
    links: int = 2                  # links held at once (to different servers when there are several)
    connect_timeout_s: float = 10.0
    reconnect_base_s: float = 1.0   # full-jitter back-off of a link's reconnects (gse.common.backoff)
    reconnect_max_s: float = 30.0
    hold_max_frames: int = 100_000  # agent frames kept while no link is up (beyond: the oldest are dropped)
    hold_max_bytes: int = 256 * 1024 * 1024

    def validate(self) -> None:
        """ConfigError when there is no server or one is not host:port, links is not 1..16, or the back-off is not 0 <
        reconnect_base_s <= reconnect_max_s."""
        if not self.servers:
            raise ConfigError("upstream.servers: at least one task server (or parent proxy) address is required")
        check_addresses("upstream.servers", self.servers)
        if not 1 <= self.links <= 16:
            raise ConfigError("upstream.links must be 1..16")
        if not 0 < self.reconnect_base_s <= self.reconnect_max_s:
            raise ConfigError("upstream: need 0 < reconnect_base_s <= reconnect_max_s")


class Down:
    """One link on the agent port: an agent of this area, a cascaded proxy, or an enrolling agent."""

    __slots__ = ("link", "kind", "name", "hello", "uplink", "welcomed", "last_seen", "superseded", "proxies",
                 "area")

    def __init__(self, link, kind: str, name: str, hello: bytes, area: int):
        self.link = link
        self.kind = kind            # "agent", "proxy" (a cascaded proxy) or "enroll"
        self.name = name            # the agent id, or "proxy:<node_id>"
        self.hello = hello          # the serialized Relay of its hello (sent again on another upstream link)
        self.area = area
        self.uplink: Uplink | None = None
        self.welcomed = False
        self.last_seen = time.monotonic()
        self.superseded = False
        self.proxies: dict[str, int] = {}   # cascaded proxy: node ids (and areas) announced through it


class Uplink:
    """One upstream link slot: reconnects forever; `live` between Welcome and loss."""

    def __init__(self, access: "AreaAccess", index: int):
        self.access = access
        self.index = index
        self.link = None
        self.live = False
        self.server = ""
        self.node = ""              # the task server's node id (from its Welcome)
        self.members: set[str] = set()      # Down names given to this link
        self.welcome: asyncio.Future | None = None     # the first frame upstream answers (None: link lost)
        self.ended: asyncio.Future | None = None       # resolved when the link is lost
        self.paused: set = set()            # downstream links not read until this link drains
        self.draining: asyncio.Task | None = None

    # framelink handler (the upstream side of this link)
    def link_open(self, link) -> None:
        """framelink's callback when the upstream link is up: it carries many agents' frames, so small frames
        written in one turn of the event loop go out together (FrameLink.coalesce); the rest waits for the
        Welcome."""
        link.coalesce = True

    def link_frame(self, link, body) -> None:
        """One ServerFrame from upstream: the first answers the ProxyHello (Welcome or Refused); the rest go to
        AreaAccess.from_upstream. An undecodable frame closes the link."""
        try:
            frame = pb.ServerFrame.FromString(body)
        except DecodeError:
            log.warning("undecodable frame from upstream; closing the link", extra={"server": self.server})
            link.close()
            return
        if self.welcome is not None and not self.welcome.done():
            self.welcome.set_result(frame)
            return
        self.access.from_upstream(self, frame)

    def link_lost(self, link, exc) -> None:
        """The upstream link closed (`exc` the error or None): wake whoever waits for its Welcome or end, and move its
        agents to another live link."""
        for f in (self.welcome, self.ended):
            if f is not None and not f.done():
                f.set_result(None)
        if self.live:
            self.live = False
            self.access.uplink_lost(self)

    def write(self, body: bytes, source=None) -> None:
        """Send a frame up; when the link's buffer is over its mark, stop reading `source` (a downstream
        link) until it drains."""
        link = self.link
        if link is None or not link.write(body):
            return
        if link.paused and source is not None and source not in self.paused:
            self.paused.add(source)
            source.transport.pause_reading()
            if self.draining is None:
                self.draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.link.drain()
        except (ConnectionError, AttributeError):
            pass
        finally:
            self.draining = None
            for src in self.paused:
                if not src.closed:
                    src.transport.resume_reading()
            self.paused.clear()


class AreaAccess:
    """The agent port of one proxy and its upstream links."""

    def __init__(self, *, node_id: str, area: int, tls, server_name: str, upstream: UpstreamConfig,
                 hello: pb.ProxyHello, hello_timeout_s: float = 10.0, enroll: bool = True,
                 deny: roles.DenyList | None = None):
        self.node_id = node_id
        self.area = area
        self.tls = tls
        self.server_name = server_name
        self.cfg = upstream
        self.proxy_hello = hello
        self.hello_timeout_s = hello_timeout_s
        self.enroll = enroll
        self.deny = deny            # revocations, when this proxy reaches ZooKeeper (the task servers check too)
        self.uplinks = [Uplink(self, i) for i in range(upstream.links)]
        self.down: dict[str, Down] = {}         # name -> the downstream link it is behind (agents, proxies)
        self.routes: dict[str, Down] = {}       # any relayed name -> the downstream link to write it to
        self.children: set[str] = set()         # the names in `down` that are cascaded proxies (a few)
        self.enrolling: dict[str, Down] = {}
        self.unattached: dict = {}              # link -> when it connected, until its first frame
        self.held: deque[tuple[str, bytes]] = deque()  # (name, Relay body) while no upstream link is up
        self.held_bytes = 0
        self.hb_interval_s = 10.0               # told by the task server's Welcome
        self.hb_misses = 3
        self.data_view: bytes | None = None     # the DataServerView frame agents get (our data relay)
        self.upstream_view = None               # the data servers upstream told us (pb.DataServerView)
        self.on_upstream_view = None            # (pb.DataServerView) -> None
        self.on_area_hosts = None               # (pb.AreaHosts) -> None
        self.on_control = None                  # (pb.ServerFrame) -> None: other frames addressed to us
        self.parents: dict[int, int] = {}       # area -> the area it is cascaded behind (those behind us)
        self.server = None
        self.attached = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---- state ------------------------------------------------------------------------------------------

    @property
    def live(self) -> list[Uplink]:
        """The upstream links that are up now (between their Welcome and their loss)."""
        return [u for u in self.uplinks if u.live]

    @property
    def agent_count(self) -> int:
        """How many agents of this area hold a link here (cascaded proxies not counted)."""
        return len(self.down) - len(self.children)

    def health(self) -> dict:
        """The agent access in the proxy's /healthz: area, agents, cascaded proxies, each upstream link (server, node,
        live, agents on it) and the frames held while no link is up."""
        return {"area": self.area, "agents": self.agent_count, "cascaded_proxies": len(self.down) - self.agent_count,
                "upstream": [{"server": u.server, "node": u.node, "live": u.live, "agents": len(u.members)}
                             for u in self.uplinks], "held_frames": len(self.held)}

    # ---- serving -----------------------------------------------------------------------------------------

    async def listen(self, sock) -> None:
        """Serve the area's links on the bound agent port `sock` (mutual TLS; a client without a certificate is let in
        only to enroll, when `enroll` is on)."""
        ctx = framelink.server_context(self.tls, certificate_optional=self.enroll)
        self.server = await framelink.listen(ctx, self, sock)

    def start(self) -> None:
        """Start the upstream link loops (one per `upstream.links`, each reconnecting for ever), the sweep of silent
        and hello-less links, and this proxy's heartbeat upstream."""
        self._tasks = [asyncio.ensure_future(u_loop) for u_loop in
                       [self._uplink_loop(u) for u in self.uplinks] + [self._sweep_loop(), self._beat_loop()]]

    async def stop(self) -> None:
        """Stop accepting, cancel the loops, and close every downstream and upstream link; the task servers keep the
        agents until their heartbeat deadline passes."""
        if self.server is not None:
            self.server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for d in list(self.down.values()):
            d.link.close()
        for u in self.uplinks:
            if u.link is not None:
                u.link.close()

    # ---- upstream links ----------------------------------------------------------------------------------

    async def _uplink_loop(self, u: Uplink) -> None:
        cfg = self.cfg
        servers = list(cfg.servers)
        backoff = Backoff(cfg.reconnect_base_s, cfg.reconnect_max_s)
        idx = u.index
        ctx = framelink.client_context(self.tls)
        while True:
            address = servers[idx % len(servers)]
            started = await self._uplink_session(u, ctx, address)
            if started >= 10.0:
                backoff.reset()
            idx += 1
            await backoff.sleep()

    async def _uplink_session(self, u: Uplink, ctx, address: str) -> float:
        host, port = split_host_port(address)
        loop = asyncio.get_running_loop()
        u.server = address
        u.welcome = loop.create_future()
        u.ended = loop.create_future()
        started = 0.0
        try:
            u.link = await framelink.dial(ctx, host, port, u, server_hostname=self.server_name or host,
                                          timeout=self.cfg.connect_timeout_s)
            u.link.write(pb.AgentFrame(proxy_hello=self.proxy_hello).SerializeToString())
            first = await asyncio.wait_for(u.welcome, self.cfg.connect_timeout_s)
            if first is None:
                log.warning("upstream link closed before its welcome", extra={"server": address,
                                                                             "error": u.link.error})
                return 0.0
            kind = first.WhichOneof("body")
            if kind != "welcome":
                why = first.refused.reason if kind == "refused" else kind
                log.error("upstream refused this proxy", extra={"server": address, "reason": why,
                                                                "code": first.refused.code if kind == "refused" else ""})
                return 0.0
            w = first.welcome
            self.hb_interval_s = (w.heartbeat_interval_ms / 1000) or self.hb_interval_s
            u.node = w.node_id
            u.live = True
            started = time.monotonic()
            UPLINKS.set(len(self.live))
            self.attached.set()
            log.info("upstream link up", extra={"server": address, "node": w.node_id, "slot": u.index})
            self._adopt_waiting(u)
            await u.ended
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("upstream link failed", extra={"server": address, "error": str(exc) or repr(exc)})
        finally:
            if u.live:
                u.live = False
                self.uplink_lost(u)
            if u.link is not None:
                u.link.close()
                u.link = None
            UPLINKS.set(len(self.live))
        return time.monotonic() - started if started else 0.0

    def _pick(self) -> Uplink | None:
        live = self.live
        return min(live, key=lambda u: len(u.members)) if live else None

    def _assign(self, d: Down, u: Uplink | None) -> None:
        if d.uplink is not None:
            d.uplink.members.discard(d.name)
        d.uplink = u
        if u is not None:
            u.members.add(d.name)

    def _adopt_waiting(self, u: Uplink) -> None:
        """A link came up: agents (and cascaded proxies) without a live link attach through it, then what
        was held while no link was up goes out."""
        waiting = [d for d in self.down.values() if d.uplink is None or not d.uplink.live]
        for d in sorted(waiting, key=lambda d: d.kind != "proxy"):     # proxies first: their agents follow
            self._reattach(d, u)
        held, self.held = self.held, deque()
        self.held_bytes = 0
        HELD.set(0)
        for name, body in held:
            d = self.down.get(name) or self.routes.get(name)
            if d is not None and d.uplink is not None and d.uplink.live:
                d.uplink.write(body)

    def _reattach(self, d: Down, u: Uplink) -> None:
        self._assign(d, u)
        d.welcomed = False
        u.write(d.hello)
        REATTACHED.inc()
        # (the agents behind a cascaded proxy follow it: it hears another Welcome on its link and sends their
        # hellos again, see from_upstream)

    def uplink_lost(self, u: Uplink) -> None:
        """An upstream link is gone: give its agents (cascaded proxies first) to the live link holding the fewest,
        their hellos sent again; with none live they wait here and what they send is held."""
        UPLINKS.set(len(self.live))
        members = [self.down[n] for n in list(u.members) if n in self.down]
        u.members.clear()
        log.warning("upstream link lost", extra={"server": u.server, "agents": len(members)})
        if not self.live:
            self.attached.clear()
        for d in sorted(members, key=lambda d: d.kind != "proxy"):
            nxt = self._pick()
            if nxt is None:
                d.uplink = None
                continue
            self._reattach(d, nxt)

    # ---- frames from upstream ---------------------------------------------------------------------------

    def from_upstream(self, u: Uplink | None, frame: pb.ServerFrame) -> None:
        """A ServerFrame from upstream link `u` (None: a frame relayed to this proxy itself): Relay and RelayEnd go
        down to the agents they name, data_servers and area_hosts to their callbacks, a second Welcome (the parent
        proxy re-attached) sends every hello of this link again, other kinds to `on_control` (the file relay)."""
        kind = frame.WhichOneof("body")
        if kind == "relay":
            FRAMES.labels("down").inc()
            self._relay_down(frame.relay)
        elif kind == "relay_end":
            self._end_down(frame.relay_end.agent_ids)
        elif kind == "data_servers":
            self.upstream_view = frame.data_servers
            if self.on_upstream_view is not None:
                self.on_upstream_view(frame.data_servers)
        elif kind == "area_hosts":
            if self.on_area_hosts is not None:
                self.on_area_hosts(frame.area_hosts)
        elif kind == "refused":
            log.error("upstream refused this proxy", extra={"server": u.server if u is not None else "relayed",
                                                              "reason": frame.refused.reason})
        elif kind == "welcome" and u is not None:
            # Our parent proxy attached us again upstream (it lost its own link): the task server there
            # knows none of ours yet, so their hellos go again.
            log.info("attached again through the parent proxy", extra={"server": u.server})
            for name in list(u.members):
                d = self.down.get(name)
                if d is not None:
                    d.welcomed = False
                    u.write(d.hello)
        elif self.on_control is not None:
            self.on_control(frame)

    def _relay_down(self, relay: pb.Relay) -> None:
        body = relay.frame
        by_child: dict[int, tuple[Down, list[str]]] = {}
        for name in relay.agent_ids:
            d = self.enrolling.get(name) or self.routes.get(name)
            if d is None:
                if name == proxy_target(self.node_id):
                    self._to_self(body)
                continue
            if d.kind == "proxy" and d.name != name:
                entry = by_child.get(id(d))
                if entry is None:
                    by_child[id(d)] = (d, [name])
                else:
                    entry[1].append(name)
                continue
            if d.kind == "proxy":
                # the cascaded proxy itself: its frames go to it unwrapped
                self._first_down(d, body)
                d.link.write(body)
                continue
            if not d.welcomed:
                self._first_down(d, body)
            d.link.write(body)
        for d, names in by_child.values():
            d.link.write(pb.ServerFrame(relay=pb.Relay(agent_ids=names, frame=body)).SerializeToString())

    def _first_down(self, d: Down, body: bytes) -> None:
        """Before the first frame to an agent since its hello: a Welcome is followed by our data view."""
        if d.welcomed:
            return
        try:
            kind = pb.ServerFrame.FromString(body).WhichOneof("body")
        except DecodeError:
            return
        if kind == "welcome":
            d.welcomed = True
            if self.data_view is not None:      # agents and cascaded proxies send their data through us
                asyncio.get_running_loop().call_soon(self._send_view, d)

    def _send_view(self, d: Down) -> None:
        if self.down.get(d.name) is d and self.data_view is not None:
            d.link.write(self.data_view)

    def set_data_view(self, frame: bytes) -> None:
        """Our data relay's view (what agents use instead of the data servers), sent to every agent now."""
        self.data_view = frame
        for d in self.down.values():
            if d.kind != "enroll" and d.welcomed:
                d.link.write(frame)

    def _to_self(self, body: bytes) -> None:
        try:
            frame = pb.ServerFrame.FromString(body)
        except DecodeError:
            return
        self.from_upstream(None, frame)

    def _end_down(self, names) -> None:
        by_child: dict[int, tuple[Down, list[str]]] = {}
        for name in names:
            d = self.enrolling.pop(name, None)
            if d is not None:
                d.link.close()
                continue
            d = self.routes.get(name)
            if d is None:
                continue
            if d.kind == "proxy" and d.name != name:
                by_child.setdefault(id(d), (d, []))[1].append(name)
                self.routes.pop(name, None)
                continue
            log.info("upstream ended a link", extra={"agent_id": name})
            self._forget(d)
            d.superseded = True         # upstream knows: no RelayEnd back
            d.link.close()
        for d, sub in by_child.values():
            d.link.write(pb.ServerFrame(relay_end=pb.RelayEnd(agent_ids=sub)).SerializeToString())

    # ---- downstream links (framelink handler of the agent port) -----------------------------------------

    def link_open(self, link) -> None:
        """A downstream link was accepted: it must send its first frame within `hello_timeout_s`."""
        self.unattached[link] = time.monotonic()

    def link_frame(self, link, body) -> None:
        """One frame of a downstream link: the first is checked (hello, cascaded ProxyHello or Enroll; refused with a
        code otherwise); an agent's later frames go up wrapped in a Relay, a cascaded proxy's relays go up as they
        are."""
        d = link.session
        if d is None:
            self._first(link, body)
            return
        d.last_seen = time.monotonic()
        if d.kind == "agent":
            self._up(d, d.name, pb.AgentFrame(relay=pb.Relay(agent_ids=[d.name], via=self.node_id,
                                                            frame=bytes(body))).SerializeToString(),
                     heartbeat=len(body) < 256 and _is_heartbeat(body))
        elif d.kind == "proxy":
            self._from_child(d, body)

    def _up(self, d: Down, name: str, relay_body: bytes, heartbeat: bool = False) -> None:
        FRAMES.labels("up").inc()
        u = d.uplink
        if u is not None and u.live:
            u.write(relay_body, d.link)
            return
        if heartbeat:
            return              # nothing to keep: liveness is told again
        self.held.append((name, relay_body))
        self.held_bytes += len(relay_body)
        while self.held and (len(self.held) > self.cfg.hold_max_frames or self.held_bytes > self.cfg.hold_max_bytes):
            _n, old = self.held.popleft()
            self.held_bytes -= len(old)
            HELD_DROPPED.inc()
        HELD.set(len(self.held))

    def _refuse(self, link, code: str, reason: str) -> None:
        REFUSED.labels(code).inc()
        log.warning("link refused", extra={"peer": link.peer, "code": code, "reason": reason})
        link.write(pb.ServerFrame(refused=pb.Refused(reason=reason, code=code)).SerializeToString())
        link.close()

    def _first(self, link, body) -> None:
        self.unattached.pop(link, None)
        try:
            frame = pb.AgentFrame.FromString(body)
        except DecodeError:
            self._refuse(link, "bad_hello", "the first frame is not an AgentFrame")
            return
        kind = frame.WhichOneof("body")
        ident = link.identity
        if not ident.certified:
            self._enroll(link, frame, kind)
            return
        if kind == "hello":
            self._agent_hello(link, frame.hello, body)
        elif kind == "proxy_hello":
            self._child_hello(link, frame.proxy_hello, body)
        else:
            self._refuse(link, "bad_hello", "the first frame must be a hello")

    def _agent_hello(self, link, hello: pb.AgentHello, body) -> None:
        ident = link.identity
        why = roles.refusal(ident, frozenset({roles.AGENT}), self.deny, "this proxy's agent port")
        code = "role"
        if not why and not valid_agent_id(hello.agent_id):
            why, code = "bk_agent_id must be 1-64 printable characters", "bad_agent_id"
        if not why and not ident.agent_id:
            why, code = "a proxy relays only agents whose certificate names them (enroll, or gse certs issue)", \
                "shared_off"
        if not why and ident.agent_id != hello.agent_id:
            why, code = (f"the hello names agent {hello.agent_id} but the certificate is agent {ident.agent_id}",
                         "identity")
        if not why:
            why = roles.relay_claim_refusal(self.area, hello.cloud_id, what=f"agent {hello.agent_id}")
            code = "area"
        if why:
            self._refuse(link, code, why)
            return
        name = hello.agent_id
        relay = pb.AgentFrame(relay=pb.Relay(agent_ids=[name], via=self.node_id, peer=link.peer,
                                             serial=ident.serial, frame=bytes(body))).SerializeToString()
        d = Down(link, "agent", name, relay, hello.cloud_id)
        self._take(d)
        AGENTS.set(self.agent_count)

    def _take(self, d: Down) -> None:
        """Hold a new downstream link (a newer one of the same name replaces the old silently) and attach it
        upstream."""
        d.link.session = d
        old = self.down.get(d.name)
        if old is not None:
            old.superseded = True
            self._forget(old)
            old.link.close()
        self.down[d.name] = d
        self.routes[d.name] = d
        if d.kind == "proxy":
            self.children.add(d.name)
        u = self._pick()
        self._assign(d, u)
        if u is not None:
            u.write(d.hello, d.link)

    def _child_hello(self, link, hello: pb.ProxyHello, body) -> None:
        ident = link.identity
        why = roles.proxy_link_refusal(ident, hello.area, self.deny)
        code = "role" if ident.role != roles.PROXY else "area"
        if not why and (hello.area == self.area or not valid_agent_id(hello.node_id)):
            why = f"a proxy of area {hello.area} cannot be cascaded behind this proxy of area {self.area}"
        if why:
            self._refuse(link, code, why)
            return
        name = proxy_target(hello.node_id)
        relay = pb.AgentFrame(relay=pb.Relay(agent_ids=[name], via=self.node_id, peer=link.peer,
                                             serial=ident.serial, frame=bytes(body))).SerializeToString()
        d = Down(link, "proxy", name, relay, hello.area)
        link.coalesce = True            # the cascaded area's agents' frames go down this one link
        d.proxies[hello.node_id] = hello.area
        self.parents[hello.area] = self.area
        self._take(d)
        CHILDREN.set(len(self.down) - self.agent_count)
        log.info("cascaded proxy attached", extra={"proxy": hello.node_id, "area": hello.area})

    def _from_child(self, d: Down, body) -> None:
        """A frame of a cascaded proxy: its own (heartbeats) wrapped here; its relays passed on as they are,
        after checking who they speak for the first time a name is seen."""
        try:
            frame = pb.AgentFrame.FromString(body)
        except DecodeError:
            log.warning("undecodable frame from a cascaded proxy; closing it", extra={"proxy": d.name})
            d.link.close()
            return
        kind = frame.WhichOneof("body")
        if kind == "relay":
            r = frame.relay
            if len(r.agent_ids) != 1:
                d.link.close()
                return
            name = r.agent_ids[0]
            if self.routes.get(name) is not d and not self._claim(d, r, name):
                return
            self._up(d, name, bytes(body))
        elif kind == "relay_end":
            for name in frame.relay_end.agent_ids:
                if self.routes.get(name) is d and name != d.name:
                    del self.routes[name]
            self._up(d, d.name, bytes(body))
        elif kind == "heartbeat":
            self._up(d, d.name, pb.AgentFrame(relay=pb.Relay(agent_ids=[d.name], via=self.node_id,
                                                             frame=bytes(body))).SerializeToString(), heartbeat=True)

    def _claim(self, d: Down, r: pb.Relay, name: str) -> bool:
        """The first frame relayed by cascaded proxy `d` for `name`: it must be a hello `d` may speak for (an
        agent of the area of the proxy holding its link, which is `d` or one behind it; or a proxy of another
        area behind it)."""
        why = ""
        try:
            inner = pb.AgentFrame.FromString(r.frame)
        except DecodeError:
            inner = None
        kind = inner.WhichOneof("body") if inner is not None else None
        via_area = d.proxies.get(r.via)
        if via_area is None:
            why = f"proxy {r.via} is not behind the cascaded proxy {d.name}"
        elif kind == "hello":
            why = roles.relay_claim_refusal(via_area, inner.hello.cloud_id, what=f"agent {name}")
            if not why and name != inner.hello.agent_id:
                why = "a relayed hello must name its agent"
        elif kind == "proxy_hello":
            h = inner.proxy_hello
            if name != proxy_target(h.node_id) or h.area in (self.area, via_area):
                why = f"a relayed proxy hello for {name} of area {h.area} is not acceptable here"
            else:
                d.proxies[h.node_id] = h.area
                self.parents[h.area] = via_area
        elif kind == "enroll":
            pass
        else:
            # a frame for a name not attached here (its hello was refused, or it was ended): tell the child
            d.link.write(pb.ServerFrame(relay_end=pb.RelayEnd(agent_ids=[name])).SerializeToString())
            return False
        if why:
            REFUSED.labels("area").inc()
            log.warning("cascaded proxy claim refused", extra={"proxy": d.name, "agent_id": name, "reason": why})
            d.link.write(pb.ServerFrame(relay=pb.Relay(agent_ids=[name], frame=pb.ServerFrame(
                refused=pb.Refused(reason=why, code="area")).SerializeToString())).SerializeToString())
            d.link.write(pb.ServerFrame(relay_end=pb.RelayEnd(agent_ids=[name])).SerializeToString())
            return False
        self.routes[name] = d
        return True

    def _enroll(self, link, frame: pb.AgentFrame, kind: str) -> None:
        if not self.enroll or kind != "enroll":
            self._refuse(link, "role", "a certificate is required" + (" (or an Enroll frame)" if self.enroll else ""))
            return
        name = frame.enroll.agent_id
        if not valid_agent_id(name) or name in self.down or name in self.enrolling:
            self._refuse(link, "bad_request", f"agent {name} cannot enroll through this link now")
            return
        u = self._pick()
        if u is None:
            self._refuse(link, "busy", "no task server is reachable from this proxy now; try again later")
            return
        d = Down(link, "enroll", name, b"", self.area)
        link.session = d
        self.enrolling[name] = d
        u.write(pb.AgentFrame(relay=pb.Relay(agent_ids=[name], via=self.node_id, peer=link.peer,
                                             frame=frame.SerializeToString())).SerializeToString())

    def link_lost(self, link, exc) -> None:
        """A downstream link closed: forget the agent (or cascaded proxy) and tell upstream with a RelayEnd, unless a
        newer link of the same name replaced it or upstream ended it."""
        self.unattached.pop(link, None)
        d = link.session
        if d is None:
            return
        link.session = None
        if d.kind == "enroll":
            if self.enrolling.get(d.name) is d:
                del self.enrolling[d.name]
            return
        if d.superseded or self.down.get(d.name) is not d:
            return
        self._forget(d)
        u = d.uplink
        names = [d.name]
        if u is not None and u.live:
            u.write(pb.AgentFrame(relay_end=pb.RelayEnd(agent_ids=names, reason="left its proxy")).SerializeToString())
        log.info("downstream link gone", extra={"agent_id": d.name})

    def _forget(self, d: Down) -> None:
        if self.down.get(d.name) is d:
            del self.down[d.name]
            self.children.discard(d.name)
        if d.kind == "proxy":           # a cascaded proxy routes the names of its areas too: a few links, a scan
            for name in [n for n, r in self.routes.items() if r is d]:
                del self.routes[name]
        elif self.routes.get(d.name) is d:     # an agent routes its own name only (thousands of links: no scan)
            del self.routes[d.name]
        self._assign(d, None)
        AGENTS.set(self.agent_count)
        CHILDREN.set(len(self.down) - self.agent_count)

    # ---- housekeeping -------------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        """Cut links without a hello after `hello_timeout_s`, and agents silent for `heartbeat_misses`
        intervals of the upstream's heartbeat pace."""
        while True:
            await asyncio.sleep(max(0.2, min(self.hb_interval_s, self.hello_timeout_s) / 2))
            now = time.monotonic()
            for link in [k for k, at in self.unattached.items() if now - at > self.hello_timeout_s]:
                del self.unattached[link]
                REFUSED.labels("no_hello").inc()
                link.abort()
            limit = now - self.hb_interval_s * self.hb_misses
            for d in [d for d in self.down.values() if d.last_seen < limit and d.link not in self._paused()]:
                log.info("downstream silent; closing its link", extra={"agent_id": d.name})
                d.link.close()

    def _paused(self) -> set:
        out = set()
        for u in self.uplinks:
            out |= u.paused
        return out

    async def _beat_loop(self) -> None:
        """Our own heartbeat on every live upstream link (the task server cuts silent links)."""
        seq, last = 0, 0.0
        while True:
            await asyncio.sleep(min(1.0, self.hb_interval_s))      # the pace is told (and may change) later
            now = time.monotonic()
            if now - last < self.hb_interval_s:
                continue
            last = now
            seq += 1
            body = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=seq)).SerializeToString()
            for u in self.live:
                u.write(body)


_HEARTBEAT_TAG = (2 << 3) | 2       # AgentFrame field 2 (heartbeat), length-delimited


def _is_heartbeat(body) -> bool:
    """Whether a serialized AgentFrame is a heartbeat (its only field is field 2), without parsing it."""
    return len(body) > 0 and body[0] == _HEARTBEAT_TAG


__all__ = ["AreaAccess", "UpstreamConfig", "proxy_target", "__version__"]

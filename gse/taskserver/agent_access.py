"""Agent access (48668): one long-lived link per agent (gse/common/framelink.py).

The agent opens the link with its hello; the server answers Welcome (or Redirect to a less loaded peer,
or Refused), then the agent heartbeats. Who may attach as which agent is decided in identity.py (role,
revocation, the certificate's agent id, shared-certificate mode); a link showing no certificate may only
enroll (enroll.py), when this server enrolls. There is no coroutine per agent: frames are handled as they
are decrypted, and outgoing frames are serialized once by whoever sends them and written as bytes, so a
broadcast costs one serialization for all targets. A disconnected agent is written offline at once; a
silent one is cut after `heartbeat_misses` intervals, a link without a hello after `hello_timeout_s`.
Agents of other areas are not taken here directly: they come through their proxies (relay_access.py),
whose links show a proxy certificate and open with a ProxyHello.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from gse.common import framelink, roles
from gse.common.errors import AgentStatus
from gse.common.records import AgentAddress, AgentIndex, AgentRecord, now_ms, valid_agent_id
from gse.pb import agent_pb2 as pb

from .batch_writer import BatchWriter
from .identity import AgentIdentity, area_refusal
from .relay_access import ProxySession, Relays

log = logging.getLogger("gse.taskserver.access")

SESSIONS = Gauge("gse_taskserver_agent_sessions", "Agent links held")
ATTACHES = Counter("gse_taskserver_agent_attach_total", "Agent hellos accepted")
REDIRECTS = Counter("gse_taskserver_agent_redirect_total", "Agents sent to a less loaded peer")
REFUSED = Counter("gse_taskserver_agent_refused_total", "Agent links refused", ["reason"])
HEARTBEATS = Counter("gse_taskserver_heartbeat_total", "Heartbeats received")

MAX_SPREAD_S = 120.0
# Frames whose handling queues writes: not read from an agent while the write queue is over its bound.
WRITING_KINDS = frozenset({"report", "file_report", "file_manifest", "plugin_reply"})


class AgentSession:
    """One attached agent and its link."""

    __slots__ = ("agent_id", "cloud_id", "ip", "boot_id", "peer", "connected_at", "last_seen", "link", "proxy")

    def __init__(self, agent_id: str, cloud_id: int, ip: str, boot_id: int, peer: str, connected_at: float,
                 last_seen: float, link, proxy: str = ""):
        self.agent_id, self.cloud_id, self.ip, self.boot_id = agent_id, cloud_id, ip, boot_id
        self.peer, self.connected_at, self.last_seen = peer, connected_at, last_seen
        self.link = link
        self.proxy = proxy          # node id of the proxy relaying this agent ("" = its own link)

    @property
    def relayed(self) -> bool:
        """True when the agent reaches this server through a proxy (spec section 12)."""
        return bool(self.proxy)

    @property
    def closed(self) -> bool:
        """True once the agent's link (or, relayed, its session on the proxy's link) is closed."""
        return self.link.closed

    def send(self, frame_bytes: bytes) -> bool:
        """Send a serialized ServerFrame to this agent (never blocks); False once the link is closed."""
        return self.link.write(frame_bytes)

    def close(self) -> None:
        """End the link once what was sent (a redirect, say) has gone out."""
        self.link.close()


class AgentAccess:
    """The link handler of the agent port (framelink calls link_open / link_frame / link_lost)."""

    def __init__(self, node_id: str, parent_ip: str, parent_port: int, writer: BatchWriter, *,
                 session_ttl_ms: int, heartbeat_interval_s: float, heartbeat_misses: int, hello_timeout_s: float,
                 balancer=None, on_report=None, on_attach=None, reconnect_rate: float = 1000.0,
                 host_snapshot_every: int = 1, identity: AgentIdentity | None = None, enroller=None,
                 area: int = 0):
        self.node_id = node_id
        self.area = area                    # the bk_cloud_id of the agents attaching here directly
        self.parent_ip = parent_ip
        self.parent_port = parent_port
        self.writer = writer
        self.ttl_ms = session_ttl_ms
        # Frame kind (the AgentFrame oneof name) -> handler(session, message); one place to add kinds.
        self.handlers: dict = {}
        if on_report is not None:
            self.handlers["report"] = on_report
        self.on_attach = on_attach          # (session) -> None
        self.hb_interval_s = heartbeat_interval_s
        self.hb_misses = heartbeat_misses
        self.hello_timeout_s = hello_timeout_s
        self.balancer = balancer
        self.sessions: dict[str, AgentSession] = {}
        self.reconnect_rate = reconnect_rate
        self.host_snapshot_every = host_snapshot_every
        self.told_spread_ms = 0             # the reconnect spread the attached agents were last told
        self.unattached: dict = {}          # link -> when it connected, until its hello
        self.pending: set = set()           # links whose hello or enrollment is being checked (async)
        self.identity = identity or AgentIdentity(node_id, roles.DenyList())
        self.identity.deny.listeners.append(self.cut_revoked)
        self.enroller = enroller            # enroll.Enroller, or None: links must show a certificate
        self._checks: set[asyncio.Task] = set()
        self.throttled = False              # the write queue is over its bound (BatchWriter.on_pressure)
        self.paused: set = set()            # links not read until the write queue drains
        self.server = None
        self.relays = Relays(self, area)    # proxies and the agents of other areas they relay

    async def listen(self, tls, sock) -> None:
        """Serve agent links on a bound socket (framelink.bind), mutual TLS with `tls` (a TLSMaterial); with
        an enroller, a client may also come without a certificate (to enroll, nothing else)."""
        ctx = framelink.server_context(tls, certificate_optional=self.enroller is not None)
        self.server = await framelink.listen(ctx, self, sock)

    @property
    def load(self) -> int:
        """How many agents are attached here (direct and relayed): what the balancer compares."""
        return len(self.sessions)

    def spread_ms(self) -> int:
        """How long the agents held here should spread their reconnects over if this server goes away: its
        load over the rate at which a peer can take agents (TLS handshakes, hellos, session writes),
        at most MAX_SPREAD_S. Without it, thousands of agents come back within the first second of
        their backoff and most handshakes time out and are retried: the storm feeds itself."""
        if self.reconnect_rate <= 0:
            return 0
        return int(1000 * min(MAX_SPREAD_S, self.load / self.reconnect_rate))

    def retune(self) -> None:
        """Tell every attached agent the reconnect spread when the load has moved it by half or more."""
        now = self.spread_ms()
        told = self.told_spread_ms
        if (now >= 2 * told or 2 * now <= told) and abs(now - told) >= 1000:
            frame = pb.ServerFrame(tune=pb.Tune(reconnect_spread_ms=now)).SerializeToString()
            for s in list(self.sessions.values()):
                s.send(frame)
            self.told_spread_ms = now

    def deadline_ms(self, at_ms: int) -> int:
        """When an agent last heard at `at_ms` (epoch ms) counts as offline: `heartbeat_misses` intervals later, plus
        1 s of slack; epoch ms."""
        return at_ms + int(self.hb_interval_s * 1000 * self.hb_misses) + 1000

    # ---- one agent link ---------------------------------------------------------------------------

    def link_open(self, link) -> None:
        """A TLS link was accepted: it must send its hello within `hello_timeout_s` (sweep_loop)."""
        self.unattached[link] = time.monotonic()

    def link_frame(self, link, body) -> None:
        """One frame (a serialized AgentFrame) from a link: before the hello, the hello or an enrollment; then the
        attached agent's frames or a proxy's (relay_access). An undecodable frame closes the link. While the write
        queue is over its bound, a frame that queues writes pauses reading that link."""
        try:
            frame = pb.AgentFrame.FromString(body)
        except DecodeError:
            session = link.session
            log.warning("undecodable frame from agent; closing its link",
                        extra={"peer": link.peer, "agent_id": session.agent_id if session else ""})
            REFUSED.labels("bad_frame").inc()
            link.close()
            return
        session = link.session
        if session is None:
            if link in self.pending:        # its hello or enrollment is being checked: nothing else is read
                return
            if link.identity.certified:
                self._hello(link, frame)
            else:
                self._enroll(link, frame)
            return
        if session.__class__ is ProxySession:
            kind = self.relays.on_frame(link, session, frame)
        else:
            session.last_seen = time.monotonic()
            kind = frame.WhichOneof("body")
            if not self.on_session_frame(session, frame, kind):
                return
        if self.throttled and kind in WRITING_KINDS:
            # The write queue is over its bound: read no more from this agent until it drains. The agent
            # keeps what it has not had acknowledged; TCP flow control holds it back meanwhile.
            self.paused.add(link)
            link.transport.pause_reading()

    def on_session_frame(self, session: AgentSession, frame, kind: str | None) -> bool:
        """A frame of an attached agent (its own link's or relayed by its proxy); False when its link was
        closed for it."""
        if kind == "heartbeat":
            self._heartbeat(session, frame.heartbeat)
            return True
        handler = self.handlers.get(kind)
        if handler is None:
            return True
        try:
            handler(session, getattr(frame, kind))
        except Exception:  # noqa: BLE001 - end this agent's link (it resends what was not acknowledged), never the server
            log.exception("agent frame failed; closing its link", extra={"agent_id": session.agent_id, "kind": kind})
            session.close()
            return False
        return True

    def on_pressure(self, over: bool) -> None:
        """The batch writer's queue crossed its high-water mark (True) or fell back under its low one."""
        self.throttled = over
        if over:
            return
        now = time.monotonic()
        for link in self.paused:
            if not link.closed:
                link.transport.resume_reading()
                if link.session is not None:
                    link.session.last_seen = now        # it was silent because we did not read it
                    for rl in getattr(link.session, "agents", {}).values():     # a proxy's: its agents too
                        if rl.session is not None:
                            rl.session.last_seen = now
        self.paused.clear()

    def refuse(self, link, reason: str, label: str, code: str = "") -> None:
        """Refuse an agent link (or a proxy's, gse/taskserver/relay_access.py): counted under `label`
        (gse_taskserver_agent_refused_total), logged, then a Refused frame with `reason` and `code` (what the
        agent shows and acts on) and the link closed."""
        REFUSED.labels(label).inc()
        log.warning("agent link refused", extra={"peer": link.peer, "reason": reason})
        link.write(pb.ServerFrame(refused=pb.Refused(reason=reason, code=code)).SerializeToString())
        link.close()

    def spawn(self, coro) -> None:
        """Run `coro` (a check or an answer that must not hold up the links' reader) in the background, held
        until done."""
        t = asyncio.ensure_future(coro)
        self._checks.add(t)
        t.add_done_callback(self._checks.discard)

    def _enroll(self, link, first) -> None:
        """A link without a certificate: one Enroll frame, answered, then the link closes."""
        self.unattached.pop(link, None)
        if self.enroller is None or first.WhichOneof("body") != "enroll":
            why = "a certificate is required" + (" (or an Enroll frame)" if self.enroller is not None else "")
            roles.REFUSED.labels("agent_link", link.identity.label).inc()
            self.refuse(link, why, "role", "role")
            return
        self.pending.add(link)

        async def answer():
            try:
                link.write(await self.enroller.answer(link.peer, first.enroll))
            finally:
                self.pending.discard(link)
                link.close()
        self.spawn(answer())

    def _hello(self, link, first, checked: bool = False) -> None:
        self.unattached.pop(link, None)
        kind = first.WhichOneof("body")
        if kind == "proxy_hello":
            self.relays.hello(link, first.proxy_hello)
            return
        if kind != "hello":
            self.refuse(link, "the first frame must be a hello", "bad_hello")
            return
        hello = first.hello
        if not valid_agent_id(hello.agent_id):
            self.refuse(link, "bk_agent_id must be 1-64 printable characters", "bad_agent_id")
            return
        refused = area_refusal(hello.agent_id, hello.cloud_id, self.area)
        if refused is not None:
            self.refuse(link, refused[1], refused[0], refused[0])
            return
        refused = self.identity.check(link, hello.agent_id, self.sessions)
        if refused is not None:
            if refused[0] == "role":
                roles.REFUSED.labels("agent_link", link.identity.label).inc()
            self.refuse(link, refused[1], refused[0], refused[0])
            return
        if not checked and self.identity.needs_remote_check(link):
            self.pending.add(link)
            self.spawn(self._hello_checked(link, first))
            return
        if self.balancer is not None and hello.redirects == 0:
            target = self.balancer.redirect_target(hello.cloud_id, self.load + 1)
            if target is not None:
                REDIRECTS.inc()
                link.write(pb.ServerFrame(redirect=pb.Redirect(address=target, reason="balance")).SerializeToString())
                link.close()
                return
        self.attach(link, hello, parent_ip=self.parent_ip, parent_port=self.parent_port)

    def attach(self, link, hello, *, parent_ip: str, parent_port: int, proxy: str = "", peer: str = "") -> AgentSession:
        """Hold an agent whose hello passed its checks (on its own link, or relayed by `proxy`): session,
        records, Welcome."""
        now = time.monotonic()
        session = AgentSession(hello.agent_id, hello.cloud_id, hello.ip, hello.boot_id, peer or link.peer, now, now,
                               link, proxy)
        link.session = session
        old = self.sessions.get(hello.agent_id)
        if old is not None:
            old.close()     # the same agent reconnected: the newer link wins
        self.sessions[hello.agent_id] = session
        SESSIONS.set(len(self.sessions))
        ATTACHES.inc()
        at = now_ms()
        self.writer.add([AgentAddress.write(hello.cloud_id, hello.ip, hello.agent_id, self.ttl_ms),
                         AgentIndex.add([hello.agent_id], self.ttl_ms)])
        self.writer.put(AgentRecord.update(
            hello.agent_id, ttl_ms=self.ttl_ms,
            agent_id=hello.agent_id, cloud_id=hello.cloud_id, ip=hello.ip, hostname=hello.hostname,
            os=hello.os, arch=hello.arch, version=hello.version, run_mode=hello.run_mode,
            start_time=hello.start_time_ms, boot_id=hello.boot_id, online=True, node=self.node_id,
            parent_ip=parent_ip, parent_port=parent_port, proxy=proxy, connect_time=at,
            report_time=at, deadline=self.deadline_ms(at), status_code=AgentStatus.RUNNING, peer=session.peer,
            hostid_md5=hello.hostid_md5, hostid_time=at))
        session.send(pb.ServerFrame(welcome=pb.Welcome(
            node_id=self.node_id, heartbeat_interval_ms=int(self.hb_interval_s * 1000),
            parent_ip=parent_ip, parent_port=parent_port,
            reconnect_spread_ms=max(self.spread_ms(), self.told_spread_ms),
            host_snapshot_every=self.host_snapshot_every)).SerializeToString())
        if self.on_attach is not None:
            self.on_attach(session)
        return session

    async def _hello_checked(self, link, first) -> None:
        """Shared-certificate mode: the hello goes on only if no other task server holds the id from another
        address."""
        try:
            refused = await self.identity.check_elsewhere(link, first.hello.agent_id)
        finally:
            self.pending.discard(link)
        if link.closed:
            return
        if refused is not None:
            self.refuse(link, refused[1], refused[0], refused[0])
            return
        self._hello(link, first, checked=True)

    def cut_revoked(self, added_ids) -> None:
        """The revocation list changed: end the links of revoked agents (ids or certificate serials)."""
        deny = self.identity.deny
        cut = [s for s in self.sessions.values()
               if s.agent_id in deny.agents or (s.link.identity.serial and s.link.identity.serial in deny.serials)]
        for s in cut:
            why = deny.revoked(roles.Identity(agent_id=s.agent_id, serial=s.link.identity.serial)) or "revoked"
            REFUSED.labels("revoked").inc()
            log.warning("revoked agent cut", extra={"agent_id": s.agent_id, "reason": why})
            s.send(pb.ServerFrame(refused=pb.Refused(reason=why, code="revoked")).SerializeToString())
            s.close()
        self.relays.cut_revoked()

    def link_lost(self, link, exc) -> None:
        """A link closed (`exc` the error, or None): a proxy's takes its relayed sessions with it (no offline write);
        an agent's session is detached and written offline at once."""
        self.pending.discard(link)
        if self.unattached.pop(link, None) is not None and not link.ready:
            REFUSED.labels("tls").inc()
        self.paused.discard(link)
        session = link.session
        if session is None:
            return
        link.session = None
        if session.__class__ is ProxySession:
            self.relays.lost(session)
            return
        self.detach(session)

    def detach(self, session: AgentSession, offline: bool = True) -> None:
        """The agent's session here ends; `offline`: write it offline now (else its deadline decides: its
        proxy lost this server but still holds the agent)."""
        if self.sessions.get(session.agent_id) is session:
            del self.sessions[session.agent_id]
            SESSIONS.set(len(self.sessions))
            if offline:
                self.writer.put(AgentRecord.update(
                    session.agent_id, ttl_ms=self.ttl_ms, online=False, status_code=AgentStatus.UNKNOWN,
                    disconnect_time=now_ms(), last_status_code=AgentStatus.RUNNING))

    def _heartbeat(self, session: AgentSession, hb) -> None:
        HEARTBEATS.inc()
        at = now_ms()
        if hb.HasField("host"):     # on one heartbeat in host_snapshot_every; the others carry liveness only
            h = hb.host
            write = AgentRecord.update(
                session.agent_id, ttl_ms=self.ttl_ms, report_time=at, deadline=self.deadline_ms(at), online=True,
                cpu_rate=round(hb.cpu_rate, 2), mem_rate=round(hb.mem_rate, 2),
                host_cpu_rate=round(h.cpu_rate, 2), host_mem_rate=round(h.mem_rate, 2), cpu_num=h.cpu_num,
                mem_size=h.mem_size, load1=round(h.load1, 2), uptime_s=h.uptime_s, proc_count=h.proc_count,
                disk_total=h.disk_total, disk_used=h.disk_used)
        else:
            write = AgentRecord.update(
                session.agent_id, ttl_ms=self.ttl_ms, report_time=at, deadline=self.deadline_ms(at), online=True,
                cpu_rate=round(hb.cpu_rate, 2), mem_rate=round(hb.mem_rate, 2))
        self.writer.put(write, lazy=True)

    # ---- housekeeping -----------------------------------------------------------------------------

    async def sweep_loop(self) -> None:
        """Cut agents that stayed silent for `heartbeat_misses` intervals, and links that sent no hello (or
        did not finish TLS) within `hello_timeout_s`."""
        while True:
            await asyncio.sleep(max(0.2, min(self.hb_interval_s, self.hello_timeout_s) / 2))
            now = time.monotonic()
            limit = now - self.hb_interval_s * self.hb_misses
            for s in [s for s in self.sessions.values()
                      if s.last_seen < limit and getattr(s.link, "physical", s.link) not in self.paused]:
                log.info("agent silent; closing its session", extra={"agent_id": s.agent_id})
                s.close()
            self.relays.sweep(limit)
            limit = now - self.hello_timeout_s
            for link in [k for k, at in self.unattached.items() if at < limit]:
                del self.unattached[link]
                REFUSED.labels("no_hello" if link.ready else "tls").inc()
                link.abort()

    def redirect(self, sessions: list[AgentSession], address: str, reason: str) -> None:
        """Send each of `sessions` a Redirect to `address` (host:port of a less loaded peer) with `reason`, then close
        its link once that went out."""
        frame = pb.ServerFrame(redirect=pb.Redirect(address=address, reason=reason)).SerializeToString()
        for s in sessions:
            s.send(frame)
            s.close()
        REDIRECTS.inc(len(sessions))

    def close_all(self) -> None:
        """Stop accepting and end every link (agents reconnect to a peer)."""
        if self.server is not None:
            self.server.close()
        for s in list(self.sessions.values()):
            s.close()
        self.relays.close_all()
        for link in list(self.unattached):
            link.abort()
        self.unattached.clear()

"""The task server's part of the data path.

- **Data server view.** The task server follows the data servers registered in ZooKeeper (address and load)
  and tells its agents: on attach, at once when membership changes, and when only loads changed at most
  every `view_interval_s` (one serialized frame for all agents). Agents never talk to ZooKeeper.
- **Plugin messages.** cluster/dispatch_message reaches a plugin through this stream; what a plugin sends on
  the message socket (0x900a) comes back as a PluginReply and is POSTed as `{message_id, bk_agent_id,
  content}` to a callback registered in the ZooKeeper document `<root>/config/message_slots`
  (`{"<slot_id>": {"callback_url": "http://...", "token": "...", "plugin_name": "..."}}`, applied live):
  a reply to a dispatched message to the dispatching slot (the agent names it), a message the plugin sent
  on its own (spec section 9: no dispatch before it, `session_id` "") to every slot registered for that
  plugin name.
  Posts run beside the stream (bounded concurrency and queue), with three tries and backoff; a reply for a
  slot without a callback, or one that could not be posted, is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from prometheus_client import Counter

from gse.common.backoff import Backoff
from gse.pb import agent_pb2 as apb
from gse.pb import data_pb2 as pb

from .agent_access import AgentAccess, AgentSession

log = logging.getLogger("gse.taskserver.data")

VIEW_PUSHES = Counter("gse_taskserver_dataserver_view_pushes_total", "Data server views sent to all agents")
REPLIES = Counter("gse_taskserver_plugin_replies_total", "Plugin replies to dispatch_message", ["outcome"])

MAX_QUEUED = 10_000
CONCURRENCY = 32
POST_TRIES = 3              # a callback post is tried this many times,
POST_BACKOFF_BASE_S = 0.5   # with a full-jitter back-off between tries (gse.common.backoff)
POST_BACKOFF_CAP_S = 2.0


class DataRelay:
    """The task server's part of the data path (see the module docstring): tells its agents the data servers of its
    area, and posts what plugins send on the message socket to the callbacks of the message slots."""

    def __init__(self, access: AgentAccess, area: int, view_interval_s: float = 30.0):
        self.access = access
        self.area = area
        self.view_interval_s = view_interval_s
        self.frame: bytes | None = None
        self._members: frozenset = frozenset()
        self._last_push = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.slots: dict = {}
        self._queue: asyncio.Queue | None = None
        self._workers: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None

    # ---- data server view -------------------------------------------------------------------------

    def on_view(self, view: dict[str, dict]) -> None:
        """ZooKeeper view of the data servers: build the DataServerView frame of our area and send it to every agent
        at once when membership changed, else at most every `view_interval_s`."""
        servers = sorted((nid, info) for nid, info in view.items()
                         if info.get("address") and int(info.get("area", 0)) == self.area)
        msg = pb.DataServerView(servers=[
            pb.DataServerInfo(node_id=nid, address=info["address"], load=int(info.get("load", 0)),
                              records_per_s=float(info.get("records_per_s", 0.0))) for nid, info in servers])
        self.frame = apb.ServerFrame(data_servers=msg).SerializeToString()
        members = frozenset(info["address"] for _nid, info in servers)
        now = time.monotonic()
        if members != self._members or now - self._last_push >= self.view_interval_s:
            self._members = members
            self._push()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._last_push + self.view_interval_s - now,
                                                                self._push)

    def _push(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_push = time.monotonic()
        if self.frame is None:
            return
        # Agents relayed by a proxy send their data through it (it tells them its own data relay); the
        # proxies are told the data servers instead.
        for s in list(self.access.sessions.values()):
            if not s.relayed:
                s.send(self.frame)
        for p in list(self.access.relays.proxies.values()):
            if p.parent is None:        # a cascaded proxy sends through its parent proxy's data relay
                p.send(self.frame)
        VIEW_PUSHES.inc()

    def on_attach(self, session) -> None:
        """A new agent session, or a proxy (relay_access.ProxyPeer): the data servers, unless it sends its data
        through a proxy (a relayed agent, a cascaded proxy)."""
        if self.frame is not None and not getattr(session, "relayed", False) \
                and getattr(session, "parent", None) is None:
            session.send(self.frame)

    # ---- plugin replies ---------------------------------------------------------------------------

    def on_slots(self, value) -> None:
        """ZooKeeper watch of config/message_slots: replace the slots (anything but an object means none)."""
        self.slots = value if isinstance(value, dict) else {}

    def callbacks(self, reply: pb.PluginReply) -> list[str]:
        """Where a plugin's message goes: the slot the agent named (a reply to its dispatch) when that slot is
        configured, else every slot whose `plugin_name` is the plugin's (a message it sent on its own)."""
        slot = self.slots.get(reply.slot_id) if reply.slot_id else None
        if isinstance(slot, dict):
            chosen = [slot]
        elif reply.plugin_name:
            chosen = [s for _sid, s in sorted(self.slots.items(), key=lambda kv: str(kv[0]))
                      if isinstance(s, dict) and s.get("plugin_name") == reply.plugin_name]
        else:
            chosen = []
        urls = [s.get("callback_url") for s in chosen]
        return [u for u in urls if isinstance(u, str) and u.startswith(("http://", "https://"))]

    def on_plugin_reply(self, session: AgentSession, reply: pb.PluginReply) -> None:
        """The `plugin_reply` frame handler: queue a POST of `{message_id, bk_agent_id, content}` to each callback of
        the reply's slot (or of every slot of its plugin); dropped and counted when there is none or the queue
        (10,000) is full."""
        if self._queue is None:
            self._queue = asyncio.Queue(MAX_QUEUED)
            self._workers = [asyncio.ensure_future(self._worker()) for _ in range(CONCURRENCY)]
        urls = self.callbacks(reply)
        if not urls:
            REPLIES.labels("no_callback").inc()
            log.warning("plugin message without a slot callback dropped",
                        extra={"slot_id": reply.slot_id, "plugin": reply.plugin_name, "message_id": reply.message_id,
                               "agent_id": session.agent_id})
            return
        body = {"message_id": reply.message_id, "bk_agent_id": session.agent_id,
                "content": reply.content.decode("utf-8", "replace")}
        for url in urls:
            try:
                self._queue.put_nowait((url, body))
            except asyncio.QueueFull:
                REPLIES.labels("queue_full").inc()
                log.warning("plugin message dropped: callback queue full",
                            extra={"slot_id": reply.slot_id, "plugin": reply.plugin_name})

    async def _worker(self) -> None:
        while True:
            url, body = await self._queue.get()
            if self._http is None:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            backoff = Backoff(POST_BACKOFF_BASE_S, POST_BACKOFF_CAP_S)
            for attempt in range(POST_TRIES):
                if attempt:
                    await backoff.sleep()
                try:
                    async with self._http.post(url, json=body) as resp:
                        if resp.status < 300:
                            REPLIES.labels("posted").inc()
                            break
                        error = f"HTTP {resp.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    error = repr(exc)
            else:
                REPLIES.labels("failed").inc()
                log.warning("plugin reply not posted", extra={"url": url, "message_id": body["message_id"],
                                                              "error": error})

    async def close(self) -> None:
        """Stop the view timer and the posting workers, and close the HTTP session."""
        if self._timer is not None:
            self._timer.cancel()
        for w in self._workers:
            w.cancel()
        if self._http is not None:
            await self._http.close()

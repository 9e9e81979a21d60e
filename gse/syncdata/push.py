"""Keeping every agent's identity file current: what should be there, what is, and pushing the difference.

- **What should be there** (`apply`): the sources hand identities over; each names its agent by bk_agent_id
  or "cloud:ip" (resolved through the agents' address index in batches; a host whose agent the cluster has
  not seen yet is kept aside and resolved again every `resolve_s`). An identity whose md5 differs from the
  stored one is written (`HostIdentityRecord`) and its agent marked pending (`PendingIdentities`); the same
  identity again changes nothing.
- **What is there**: each agent's session record says the md5 of its file (from its hello and from push
  results, written by its task server).
- **Pushing** (`run`): every `push_interval_s`, the pending agents that are due are read in batches (the
  wanted md5 and their session); those whose file matches are done, those offline are looked at again after
  `offline_check_s` (an agent that attaches gets its file at the next look: a reattach resets the back-off),
  the others get their file: grouped by the task server holding them, one `DispatchBatch` call per task
  server per batch (a frame of its own per agent), the content read only for them. A push not confirmed is sent again after a back-off of
  `retry_base_s` doubling to `retry_max_s` (jittered), for as long as the identity stays pending.
- Every `full_check_s` every identity syncdata holds is marked pending again: a host whose file was lost or
  changed by hand gets it back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time

from prometheus_client import Counter, Gauge

from gse.common import dbclient as db
from gse.common.address import parse_host_id
from gse.common.errors import Unavailable
from gse.common.peers import Peers
from gse.common.records import AgentAddress, AgentRecord, now_ms
from gse.common.records.hostid import HostIdentityRecord, PendingIdentities
from gse.pb import agent_pb2 as apb
from gse.pb import taskserver_pb2 as tpb

from .identity import Identity

log = logging.getLogger("gse.syncdata.push")

SESSION = ("online", "deadline", "node", "hostid_md5", "connect_time")
WANTED = ("md5", "version")

PENDING = Gauge("gse_syncdata_pending_hosts", "Agents whose identity file is not confirmed yet")
KNOWN = Gauge("gse_syncdata_hosts", "Identities syncdata holds")
UNRESOLVED = Gauge("gse_syncdata_unresolved_hosts", "Identities whose agent the cluster has not seen")
CHANGES = Counter("gse_syncdata_changes_total", "Identities that changed (written and made pending)")
PUSHES = Counter("gse_syncdata_pushes_total", "Identity files sent to agents", ["outcome"])
CONFIRMED = Counter("gse_syncdata_confirmed_total", "Identity files agents confirmed")


@dataclasses.dataclass(frozen=True)
class PushPolicy:
    """The pusher's timings, in seconds: how often pending agents are looked at, when an offline agent is looked at
    again, the retry back-off of an unconfirmed push (base doubling to max), how often every identity is checked again
    and unresolved hosts are resolved again; and the agents per dbproxy or task server call and the task server call
    timeout."""
    push_interval_s: float = 1.0
    offline_check_s: float = 5.0
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    full_check_s: float = 300.0
    resolve_s: float = 10.0
    batch_size: int = 2000
    rpc_timeout_s: float = 30.0


@dataclasses.dataclass
class _Due:
    at: float = 0.0               # monotonic time of the next look
    attempts: int = 0
    connect_time: int = 0         # the session pushed to (a new one: push again at once)


class Pusher:
    """What every agent's identity file should be, and pushing the difference (see the module): `apply` takes what the
    sources learn, `run` pushes while syncdata leads. Raises nothing for a task server or dbproxy that is away: the
    round is retried."""
    def __init__(self, dbc: db.DbClient, peers: Peers, policy: PushPolicy):
        self.db = dbc
        self.peers = peers
        self.policy = policy
        self.known: dict[str, str] = {}                  # agent id -> md5 of the identity syncdata holds
        self.unresolved: dict[str, Identity] = {}        # "cloud:ip" -> identity waiting for its agent
        self.due: dict[str, _Due] = {}                   # pending agent -> when to look again
        self.stats = {"changes": 0, "pushed": 0, "confirmed": 0, "push_failures": 0}
        self._changed = asyncio.Event()

    # ---- what should be there ---------------------------------------------------------------------

    async def _resolve(self, identities: list[Identity]) -> list[tuple[str, Identity]]:
        """(agent id, identity) for those whose agent is known; the others wait in `unresolved`."""
        out, hosts = [], []
        for ident in identities:
            host = parse_host_id(ident.ref)
            if host is None:
                out.append((ident.ref, ident))
            else:
                hosts.append((host, ident))
        for i in range(0, len(hosts), self.policy.batch_size):
            chunk = hosts[i:i + self.policy.batch_size]
            results = await self.db.execute([AgentAddress.read(c, ip) for (c, ip), _ in chunk])
            for ((_host, ident), r) in zip(chunk, results):
                agent_id = AgentAddress.decode(r)
                if agent_id is None:
                    self.unresolved[ident.ref] = ident
                else:
                    self.unresolved.pop(ident.ref, None)
                    out.append((agent_id, ident))
        UNRESOLVED.set(len(self.unresolved))
        return out

    async def apply(self, identities: list[Identity], removed: list[str] = ()) -> int:
        """Take what a source learnt: new or changed identities (written, made pending) and refs whose host
        is gone (forgotten: the file stays on the host). Returns how many changed."""
        for ref in removed:
            self.unresolved.pop(ref, None)
        gone = [r for r in removed if parse_host_id(r) is None]
        pairs = await self._resolve(identities)
        unknown = [a for a, _i in pairs if a not in self.known]
        for i in range(0, len(unknown), self.policy.batch_size):
            chunk = unknown[i:i + self.policy.batch_size]
            results = await self.db.execute([HostIdentityRecord.pick(a, names=("md5",)) for a in chunk])
            for a, r in zip(chunk, results):
                rec = HostIdentityRecord.decode(r, ("md5",))
                if rec is not None:
                    self.known[a] = rec.md5
        at = now_ms()
        changed = [(a, ident) for a, ident in pairs if self.known.get(a) != ident.md5]
        for i in range(0, len(changed), self.policy.batch_size):
            chunk = changed[i:i + self.policy.batch_size]
            ops = [HostIdentityRecord(content=ident.content.decode(), md5=ident.md5, version=at,
                                      bk_host_id=ident.bk_host_id, cloud_id=ident.cloud_id, ip=ident.ip,
                                      source=ident.source).write_all(a).op() for a, ident in chunk]
            ops.append(PendingIdentities.add([a for a, _ in chunk]))
            results = await self.db.execute(ops)
            bad = [r.error for r in results if not r.ok]
            if bad:
                raise Unavailable(f"identities not stored: {bad[0]}")
            for a, ident in chunk:
                self.known[a] = ident.md5
                self.due[a] = _Due()
        if gone:
            await self.db.execute([PendingIdentities.remove(gone), *(db.delete(HostIdentityRecord.key(a))
                                                                     for a in gone)])
            for a in gone:
                self.known.pop(a, None)
                self.due.pop(a, None)
        if changed:
            CHANGES.inc(len(changed))
            self.stats["changes"] += len(changed)
            log.info("identities changed", extra={"hosts": len(changed)})
            self._changed.set()
        KNOWN.set(len(self.known))
        PENDING.set(len(self.due))
        return len(changed)

    # ---- pushing ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """While leading: load what is pending, then push, check and resolve for ever."""
        await self._load()
        last_full = time.monotonic()
        last_resolve = time.monotonic()
        while True:
            try:
                await self.push_due()
                now = time.monotonic()
                if now - last_full >= self.policy.full_check_s:
                    last_full = now
                    await self._full_check()
                if self.unresolved and now - last_resolve >= self.policy.resolve_s:
                    last_resolve = now
                    await self.apply(list(self.unresolved.values()))
            except Unavailable as exc:
                log.warning("push round failed; next round", extra={"error": str(exc)})
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.policy.push_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _load(self) -> None:
        delay = 0.5
        while True:
            try:
                (res,) = await self.db.execute([PendingIdentities.read()])
                if res.ok:
                    for a in PendingIdentities.decode(res):
                        self.due.setdefault(a, _Due())
                    PENDING.set(len(self.due))
                    log.info("leading: pending identities loaded", extra={"pending": len(self.due)})
                    return
            except Unavailable as exc:
                log.warning("pending identities unreadable; retrying", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _full_check(self) -> None:
        ids = [a for a in self.known if a not in self.due]
        for i in range(0, len(ids), self.policy.batch_size):
            chunk = ids[i:i + self.policy.batch_size]
            await self.db.execute([PendingIdentities.add(chunk)])
            for a in chunk:
                self.due[a] = _Due()

    def _retry_in(self, attempts: int) -> float:
        p = self.policy
        window = min(p.retry_max_s, p.retry_base_s * 2 ** min(attempts - 1, 30))
        return window * random.uniform(0.5, 1.0)      # never at once: the agent's answer is on its way

    async def push_due(self) -> int:
        """One round over the pending agents that are due; returns how many files were sent."""
        now = time.monotonic()
        due = [a for a, d in self.due.items() if d.at <= now]
        sent = 0
        for i in range(0, len(due), self.policy.batch_size):
            sent += await self._round(due[i:i + self.policy.batch_size])
        PENDING.set(len(self.due))
        return sent

    async def _round(self, ids: list[str]) -> int:
        p = self.policy
        ops = [HostIdentityRecord.pick(a, names=WANTED) for a in ids] + [AgentRecord.pick(a, names=SESSION)
                                                                         for a in ids]
        results = await self.db.execute(ops)
        now = time.monotonic()
        at = now_ms()
        done, push = [], []
        for k, a in enumerate(ids):
            wanted = HostIdentityRecord.decode(results[k], WANTED)
            session = AgentRecord.decode(results[len(ids) + k], SESSION)
            d = self.due.get(a)
            if d is None:
                continue
            if wanted is None:                       # no identity for it (any more)
                done.append(a)
                continue
            if session is not None and session.hostid_md5 == wanted.md5:
                done.append(a)
                continue
            if session is None or not session.alive(at):
                d.at = now + p.offline_check_s
                continue
            push.append((a, wanted, session))
        if done:
            await self.db.execute([PendingIdentities.remove(done)])
            for a in done:
                if self.due.pop(a, None) is not None and a in self.known:
                    CONFIRMED.inc()
                    self.stats["confirmed"] += 1
        if not push:
            return 0
        contents = await self.db.execute([HostIdentityRecord.pick(a, names=("content",)) for a, _w, _s in push])
        by_node: dict[str, list[tpb.DispatchRequest]] = {}
        for (a, wanted, session), r in zip(push, contents):
            rec = HostIdentityRecord.decode(r, ("content",))
            if rec is None:
                continue
            frame = apb.ServerFrame(host_identity=apb.HostIdentity(content=rec.content.encode(), md5=wanted.md5,
                                                                  version=wanted.version))
            by_node.setdefault(session.node, []).append(tpb.DispatchRequest(frame=frame.SerializeToString(),
                                                                            agent_ids=[a]))
        failed: dict[str, str] = {}
        calls = [self._push_node(node, items) for node, items in by_node.items()]
        for result in await asyncio.gather(*calls):
            failed.update(result)
        writes = []
        sent = 0
        for a, wanted, session in push:
            d = self.due.get(a)
            if d is None:
                continue
            d.attempts += 1
            d.connect_time = session.connect_time
            d.at = now + self._retry_in(d.attempts)
            error = failed.get(a, "")
            if not error:
                sent += 1
            writes.append(HostIdentityRecord.update(a, pushed=at, attempts=d.attempts, error=error).op())
        if writes:
            await self.db.execute(writes)
        PUSHES.labels("sent").inc(sent)
        PUSHES.labels("failed").inc(len(push) - sent)
        self.stats["pushed"] += sent
        self.stats["push_failures"] += len(push) - sent
        return sent

    async def _push_node(self, node: str, parts: list[tpb.DispatchRequest]) -> dict[str, str]:
        """agent id -> why it was not sent, for the agents not reached."""
        stub = self.peers.task(node)
        if stub is None:
            return {p.agent_ids[0]: f"task server {node} is gone" for p in parts}
        try:
            reply = await stub.DispatchBatch(tpb.DispatchBatchRequest(parts=parts), timeout=self.policy.rpc_timeout_s)
        except Exception as exc:  # noqa: BLE001 - grpc errors: these agents are tried again later
            why = f"task server {node}: {getattr(exc, 'code', lambda: exc)()}"
            log.warning("identity push failed", extra={"node": node, "agents": len(parts), "error": why})
            return {p.agent_ids[0]: why for p in parts}
        return {f.agent_id: f.message for f in reply.failures}

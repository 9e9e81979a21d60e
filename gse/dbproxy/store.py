"""Sharded, replicated execution of operation batches over several Redis nodes, and the repair of a node that
was away.

Keys are placed on a consistent-hash ring (virtual nodes per Redis node); each key lives on the first R
distinct nodes clockwise from its hash. A batch is split by node and sent as one pipeline per node, all
nodes at once. Writes go to every replica that is UP and succeed when at least one took them; reads go to the
first UP replica and fall back to the next one if that node fails mid-batch or does not have the key.

A node is UP (in sync: read and written), DOWN (does not answer) or SYNCING (answers, but may lack writes:
neither read nor written until it has caught up). Repair is hinted handoff plus a full copy when needed:
- A write that skips a replica (DOWN or SYNCING), or that failed on it mid-batch, leaves a hint on the
  replicas that took it: the key's name in the set `<prefix>__gse:hints:<node>` (kept HINT_TTL_MS). Hints live
  in Redis, so every dbproxy of the cluster sees them and a restarted dbproxy knows what a node missed.
- Every node holds a marker `<prefix>__gse:node`. A node that answers without it lost its data (a Redis
  restarted without persistence): it first gets a full copy of every key it replicates from the UP nodes.
- A node that answers again is SYNCING until its hints are drained: each hinted key is copied from an UP
  replica with DUMP/PTTL and RESTORE ... REPLACE (or deleted when the replica no longer has it). Then it is
  UP. Several dbproxies drain one node's hints together; copies are idempotent.
What is left open: a write reaching a node that another dbproxy already counts UP while this one still
counts it SYNCING leaves a hint that the draining dbproxy may see only after it flipped the node UP; such
keys are copied by the next drain, and a read that finds nothing on a replica falls back to the next one and
repairs the first (read repair).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field

from gse.common.address import split_host_port
from gse.common.dbclient import K      # op kinds as plain ints (fast attribute access)
from gse.common.resp import ConnectionLost, RedisReplyError, RespConnection, encode
from gse.pb import dbproxy_pb2 as pb

log = logging.getLogger("gse.dbproxy")

READS = frozenset({K.GET, K.HGETALL, K.HMGET, K.SMEMBERS, K.LRANGE, K.GETRANGE, K.STRLEN, K.EXISTS})
TRANSIENT = (ConnectionLost, OSError, asyncio.TimeoutError)

UP, SYNCING, DOWN = "up", "syncing", "down"
INTERNAL = "__gse:"                     # our own keys (hints, markers) under the key prefix
HINT_TTL_MS = 30 * 24 * 3600 * 1000
SYNC_CHUNK = 500                        # keys copied per pipeline while repairing a node
REPAIR_QUEUE_MAX = 10_000               # read repairs waiting per node (more are dropped: the next read retries)


def _hash(s: str) -> int:
    # blake2b spreads near-identical names (vnodes "host:port#i", keys "prefix:N") evenly; crc32 did not.
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


class Ring:
    """The consistent-hash ring: `vnodes` points per node (blake2b of "node#i"); `replicas(key, r)` is the tuple of
    the first r distinct nodes clockwise from the key's hash, the first being the preferred reader."""

    def __init__(self, nodes: list[str], vnodes: int = 160):
        points = sorted((_hash(f"{n}#{i}"), n) for n in nodes for i in range(vnodes))
        self._keys = [p[0] for p in points]
        self._nodes = [p[1] for p in points]
        self.size = len(set(nodes))
        # Agent keys are written at every heartbeat: their placement is remembered (the ring never changes).
        self.replicas = functools.lru_cache(maxsize=1 << 16)(self._replicas)

    def _replicas(self, key: str, r: int) -> tuple[str, ...]:
        r = min(r, self.size)
        i = bisect.bisect(self._keys, _hash(key))
        out: list[str] = []
        n = len(self._nodes)
        while len(out) < r:
            node = self._nodes[i % n]
            if node not in out:
                out.append(node)
            i += 1
        return tuple(out)



@dataclass(eq=False)
class Node:
    """One Redis node as this dbproxy sees it."""
    address: str
    client: RespConnection
    state: str = DOWN           # until the first probe
    has_data: bool = False      # its marker is there (it did not lose what it held)
    failures: int = 0
    sync: asyncio.Task | None = None
    repairs: set = field(default_factory=set)     # keys a read found missing here (read repair)

    @property
    def healthy(self) -> bool:
        """UP: read and written."""
        return self.state == UP


@dataclass
class _Plan:
    """Commands queued for one node, with where each result goes."""
    node: Node
    pipe: list = field(default_factory=list)    # encoded commands
    slots: list = field(default_factory=list)   # (op index, commands queued for it, is_read)


def _missing(kind: int, reply) -> bool:
    """Whether a read's reply says the key is not on that node (so another replica may have it)."""
    if kind in (K.GET,):
        return reply is None
    if kind in (K.HGETALL, K.SMEMBERS, K.LRANGE, K.GETRANGE):
        return not reply
    if kind == K.HMGET:
        return all(v is None for v in reply)
    if kind in (K.STRLEN, K.EXISTS):
        return not reply
    return False


class ShardedStore:
    """The Redis nodes behind one dbproxy: `execute` batches, `probe` health and repair."""

    def __init__(self, addresses: list[str], replicas: int = 2, key_prefix: str = "", password: str = "",
                 timeout_s: float = 2.0):
        if not addresses:
            raise ValueError("at least one redis node is required")
        self.replicas = max(1, replicas)
        self.prefix = key_prefix
        self.marker = (key_prefix + INTERNAL + "node").encode()
        self.nodes: dict[str, Node] = {}
        for addr in addresses:
            host, port = split_host_port(addr)
            # Fail fast: a dead node is skipped and probed, never retried inline (retrying would stall
            # every batch that touches it).
            self.nodes[addr] = Node(addr, RespConnection(host, port, password, timeout_s))
        self.ring = Ring(list(self.nodes))
        self.ops_total = 0
        self.copied_total = 0
        self.hints_total = 0
        self._started = False

    def hint_key(self, node: Node | str) -> bytes:
        """The Redis key (under the key prefix) of the set of key names, unprefixed, that `node` missed."""
        address = node if isinstance(node, str) else node.address
        return f"{self.prefix}{INTERNAL}hints:{address}".encode()

    async def close(self) -> None:
        """Stop the repairs under way and close every node's connection."""
        for node in self.nodes.values():
            if node.sync is not None:
                node.sync.cancel()
            await node.client.close()

    # ---- health -----------------------------------------------------------------------------------

    def _mark_down(self, node: Node, exc: Exception) -> None:
        if node.state != DOWN:
            log.warning("redis node down", extra={"node": node.address, "error": repr(exc)})
        node.state = DOWN
        node.failures += 1
        if node.sync is not None:
            node.sync.cancel()
            node.sync = None

    async def probe(self) -> None:
        """Ping every node and read its marker. A node that answers again, or that lost its data, is repaired
        (SYNCING) before it is UP again."""
        async def one(node: Node):
            """PING and read the marker of one node: the marker's value (None when it lost its data), or the exception
            that marked it DOWN."""
            try:
                pong, marker = await node.client.pipeline([PING, encode(b"GET", self.marker)])
                if isinstance(pong, RedisReplyError):
                    raise ConnectionLost(f"PING answered {pong}")
                return marker
            except TRANSIENT as exc:
                self._mark_down(node, exc)
                return exc
        nodes = list(self.nodes.values())
        answers = await asyncio.gather(*(one(n) for n in nodes))
        for node, marker in zip(nodes, answers):
            if isinstance(marker, Exception):
                continue
            if node.state == UP and marker is None:
                log.warning("redis node lost its data; copying it back", extra={"node": node.address})
                node.has_data = False
                self._start_sync(node)
            elif node.state == DOWN:
                node.has_data = marker is not None
                self._start_sync(node)
        await self._repair_reads()

    async def settle(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until no node that answers is still being repaired (at start-up)."""
        pending = [n.sync for n in self.nodes.values() if n.sync is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def _start_sync(self, node: Node) -> None:
        node.state = SYNCING
        if node.sync is not None:
            node.sync.cancel()
        node.sync = asyncio.ensure_future(self._sync(node))

    def healthy_count(self) -> int:
        """How many nodes are UP."""
        return sum(1 for n in self.nodes.values() if n.healthy)

    def state(self) -> dict[str, str]:
        """Node address -> up | syncing | down."""
        return {a: n.state for a, n in self.nodes.items()}

    # ---- repair -----------------------------------------------------------------------------------

    def _sources(self, node: Node) -> list[Node]:
        """Nodes a repair of `node` may copy from: they answer and hold their data."""
        return [n for n in self.nodes.values() if n is not node and n.state != DOWN and n.has_data]

    async def _sync(self, node: Node) -> None:
        """Bring a node that answers back in line: a full copy if it lost its data, then the keys hinted for
        it; then it is UP, and the hints it holds for other nodes are applied to them."""
        t0 = time.monotonic()
        full = not node.has_data
        copied = 0
        try:
            await asyncio.sleep(0)          # let the same probe round mark the other nodes first
            sources = self._sources(node)
            if full:
                for src in sources:
                    copied += await self._copy_all(node, src)
                await node.client.pipeline([encode(b"SET", self.marker, node.address)])
                node.has_data = True
            for src in sources:
                copied += await self._drain(src, node)
            node.state = UP
            # What this node holds for others is the newest they missed (its own misses are applied above).
            for other in [n for n in self.nodes.values() if n.healthy and n is not node]:
                copied += await self._drain(node, other)
        except asyncio.CancelledError:
            raise
        except TRANSIENT as exc:
            self._mark_down(node, exc)
            return
        except Exception:  # noqa: BLE001 - a repair that fails leaves the node out of service, never dbproxy down
            log.exception("redis node repair failed; retrying at the next probe", extra={"node": node.address})
            node.state = DOWN
            node.sync = None
            return
        node.sync = None
        if copied or full:
            log.info("redis node in sync", extra={"node": node.address, "copied_keys": copied, "full": full,
                                                  "seconds": round(time.monotonic() - t0, 3)})

    async def _copy(self, dst: Node, src: Node, keys: list[bytes], replace: bool = True) -> int:
        """Copy `keys` (prefixed) from `src` to `dst` as they are on `src` now (value and TTL), deleting on
        `dst` those `src` does not have. Without `replace`, a key `dst` has meanwhile is left as it is (a
        write since is newer than the copy). A failure of `src` raises _SourceFailed; of `dst`, TRANSIENT."""
        if not keys:
            return 0
        cmds = []
        for k in keys:
            cmds.append(encode(b"PTTL", k))
            cmds.append(encode(b"DUMP", k))
        try:
            replies = await src.client.pipeline(cmds)
        except TRANSIENT as exc:
            self._mark_down(src, exc)
            raise _SourceFailed(src.address) from exc
        out = []
        for n, k in enumerate(keys):
            ttl, dump = replies[2 * n], replies[2 * n + 1]
            if dump is None or isinstance(dump, RedisReplyError) or isinstance(ttl, RedisReplyError) or ttl == -2:
                if replace:
                    out.append(encode(b"DEL", k))
            elif replace:
                out.append(encode(b"RESTORE", k, max(0, ttl), dump, b"REPLACE"))
            else:
                out.append(encode(b"RESTORE", k, max(0, ttl), dump))
        replies = await dst.client.pipeline(out)
        bad = [r for r in replies if isinstance(r, RedisReplyError) and not str(r).startswith("BUSYKEY")]
        if bad:
            raise RuntimeError(f"RESTORE on {dst.address} refused: {bad[0]}")
        self.copied_total += len(keys)
        return len(keys)

    async def _drain(self, src: Node, dst: Node) -> int:
        """Apply the hints `src` holds for `dst`: copy each hinted key from `src`, then forget the hint."""
        hkey = self.hint_key(dst)
        copied = 0
        while True:
            try:
                (members,) = await src.client.pipeline([encode(b"SRANDMEMBER", hkey, SYNC_CHUNK)])
            except TRANSIENT as exc:
                self._mark_down(src, exc)
                return copied
            if not members:
                return copied
            try:
                copied += await self._copy(dst, src, [self.prefix.encode() + m for m in members])
            except _SourceFailed:
                return copied
            try:
                await src.client.pipeline([encode(b"SREM", hkey, *members)])
            except TRANSIENT as exc:
                self._mark_down(src, exc)
                return copied

    async def _copy_all(self, dst: Node, src: Node) -> int:
        """Copy every key of `src` that `dst` replicates (after `dst` lost its data)."""
        pattern = _glob_escape(self.prefix.encode()) + b"*"
        internal = (self.prefix + INTERNAL).encode()
        plen = len(self.prefix.encode())
        cursor = b"0"
        copied = 0
        while True:
            try:
                cursor, keys = (await src.client.pipeline([encode(b"SCAN", cursor, b"MATCH", pattern,
                                                                  b"COUNT", 1000)]))[0]
            except TRANSIENT as exc:
                self._mark_down(src, exc)
                return copied
            mine = [k for k in keys if not k.startswith(internal)
                    and dst.address in self.ring.replicas(k[plen:].decode("utf-8", "replace"), self.replicas)]
            for i in range(0, len(mine), SYNC_CHUNK):
                try:
                    copied += await self._copy(dst, src, mine[i:i + SYNC_CHUNK])
                except _SourceFailed:
                    return copied
            if cursor in (b"0", 0):
                return copied

    def _note_repair(self, node: Node, key: str) -> None:
        if len(node.repairs) < REPAIR_QUEUE_MAX:
            node.repairs.add(key)

    async def _repair_reads(self) -> None:
        """Copy keys a read found missing on an UP replica (and present on another) to it (read repair)."""
        for node in self.nodes.values():
            if not node.repairs or not node.healthy:
                continue
            keys, node.repairs = list(node.repairs), set()
            for key in keys:
                src = next((self.nodes[a] for a in self.ring.replicas(key, self.replicas)
                            if self.nodes[a] is not node and self.nodes[a].healthy), None)
                if src is None:
                    continue
                try:
                    # Without REPLACE: a write since the read created it, and that write is newer than a copy.
                    await self._copy(node, src, [(self.prefix + key).encode()], replace=False)
                except (_SourceFailed, *TRANSIENT):
                    continue
                except RuntimeError as exc:
                    log.warning("read repair failed", extra={"node": node.address, "error": str(exc)})

    # ---- execution --------------------------------------------------------------------------------
    async def execute(self, ops, into=None) -> list[pb.Result]:
        """Results in the order of `ops`; with `into` (a repeated Result field, e.g. a reply's `results`)
        they are made in place there instead of being built apart and copied in. A result that is not ok
        because no replica could take or answer it now is marked `retryable`."""
        self.ops_total += len(ops)
        results = [pb.Result() for _ in ops] if into is None else [into.add() for _ in ops]
        acked: dict[int, list[Node]] = {}          # write op -> the replicas that took it
        lost: dict[int, list[Node]] = {}           # write op -> replicas it failed on mid-batch
        write_errors: dict[int, str] = {}
        pending_reads: dict[int, list[Node]] = {}
        first_read: dict[int, Node] = {}
        plans: dict[str, _Plan] = {}

        def plan_for(node: Node) -> _Plan:
            """The plan of commands for `node` in this round, made on first use."""
            p = plans.get(node.address)
            if p is None:
                p = plans[node.address] = _Plan(node)
            return p

        replicas_of, prefix, r, nodes = self.ring.replicas, self.prefix, self.replicas, self.nodes
        for i, op in enumerate(ops):
            try:
                _check(op)
                cmds = _commands(op, prefix)     # encoded once, whichever replicas take them
            except ValueError as exc:
                results[i].error = str(exc)
                continue
            replicas = [nodes[a] for a in replicas_of(op.key, r)]
            if op.kind in READS:
                order = [n for n in replicas if n.state == UP]
                if not order:
                    results[i].error = "no replica of the key is up"
                    results[i].retryable = True
                    continue
                pending_reads[i] = order[1:]
                first_read[i] = order[0]
                p = plan_for(order[0])
                p.pipe.extend(cmds)
                p.slots.append((i, len(cmds), True))
            else:
                targets = [n for n in replicas if n.state == UP]
                if not targets:
                    results[i].error = "no replica of the key is up"
                    results[i].retryable = True
                    continue
                if len(targets) < len(replicas):
                    # Those that take it remember for those that miss it (hinted handoff).
                    key = op.key.encode()
                    hints = []
                    for n in replicas:
                        if n.state != UP:
                            hk = self.hint_key(n)
                            hints += [encode(b"SADD", hk, key), encode(b"PEXPIRE", hk, HINT_TTL_MS)]
                    self.hints_total += 1
                    cmds = (*cmds, *hints)
                for node in targets:
                    p = plan_for(node)
                    p.pipe.extend(cmds)
                    p.slots.append((i, len(cmds), False))

        while plans:
            outcomes = await asyncio.gather(*(self._run(p) for p in plans.values()))
            retry: dict[str, _Plan] = {}

            def again(i: int) -> bool:
                """Send read `i` to its next replica; False when there is none."""
                fallback = [n for n in pending_reads.get(i, []) if n.state == UP]
                if not fallback:
                    return False
                pending_reads[i] = fallback[1:]
                node = fallback[0]
                rp = retry.get(node.address)
                if rp is None:
                    rp = retry[node.address] = _Plan(node)
                cmds = _commands(ops[i], prefix)
                rp.pipe.extend(cmds)
                rp.slots.append((i, len(cmds), True))
                return True

            for plan, replies in zip(plans.values(), outcomes):
                if isinstance(replies, Exception):
                    for i, _n, is_read in plan.slots:
                        if is_read:
                            if not again(i):
                                results[i].error = f"redis unavailable: {replies!r}"
                                results[i].retryable = True
                        else:
                            lost.setdefault(i, []).append(plan.node)
                            write_errors.setdefault(i, f"redis unavailable: {replies!r}")
                    continue
                pos = 0
                for i, n, is_read in plan.slots:
                    chunk = replies[pos:pos + n]
                    pos += n
                    err = next((c for c in chunk if isinstance(c, RedisReplyError)), None)
                    if err is not None:
                        if is_read:
                            results[i].error = str(err)
                        else:
                            write_errors.setdefault(i, str(err))
                        continue
                    if is_read:
                        if _missing(ops[i].kind, chunk[0]) and again(i):
                            continue            # another replica may have it (and then this one is repaired)
                        _fill(results[i], ops[i], chunk[0])
                        results[i].ok = True
                        if plan.node is not first_read[i] and results[i].found:
                            self._note_repair(first_read[i], ops[i].key)
                    else:
                        took = acked.setdefault(i, [])
                        if not took:
                            _fill(results[i], ops[i], chunk[0])
                        took.append(plan.node)
            plans = retry

        late_hints: dict[str, _Plan] = {}
        for i, op in enumerate(ops):
            if op.kind in READS or results[i].error:
                continue
            took = acked.get(i)
            if took:
                results[i].ok = True
                if i in lost:           # failed on a replica mid-batch: those that took it remember
                    for node in took:
                        p = late_hints.get(node.address) or late_hints.setdefault(node.address, _Plan(node))
                        for gone in lost[i]:
                            hk = self.hint_key(gone)
                            p.pipe += [encode(b"SADD", hk, op.key.encode()), encode(b"PEXPIRE", hk, HINT_TTL_MS)]
            else:
                results[i].error = write_errors.get(i, "write not applied")
                results[i].retryable = i in lost or i not in write_errors
        if late_hints:
            await asyncio.gather(*(self._run(p) for p in late_hints.values()))
        return results

    async def _run(self, plan: _Plan):
        try:
            return await plan.node.client.pipeline(plan.pipe)
        except TRANSIENT as exc:
            self._mark_down(plan.node, exc)
            return exc


class _SourceFailed(Exception):
    """The node a repair copies from stopped answering (it is marked down; the repair stops there)."""


def _glob_escape(b: bytes) -> bytes:
    out = bytearray()
    for c in b:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)


def _check(op) -> None:
    if not op.key:
        raise ValueError("op has no key")
    if op.kind == K.HSET and not op.fields:
        raise ValueError("HSET needs fields")
    if op.kind in (K.SADD, K.SREM, K.RPUSH) and not op.members:
        raise ValueError(f"{pb.Op.Kind.Name(op.kind)} needs members")
    if op.kind in (K.HMGET, K.HDEL) and not op.names:
        raise ValueError(f"{pb.Op.Kind.Name(op.kind)} needs names")
    if op.kind == K.SETRANGE and op.start < 0:
        raise ValueError("SETRANGE needs start >= 0")
    if op.kind == K.EXPIRE and op.ttl_ms <= 0:
        raise ValueError("EXPIRE needs ttl_ms > 0")


PING = encode(b"PING")
_NAMES = {k: pb.Op.Kind.Name(k).encode() for k in pb.Op.Kind.values()}


def _commands(op, prefix: str) -> tuple[bytes, ...]:
    """The Redis commands for one op, RESP-encoded."""
    key = (prefix + op.key).encode()
    k = op.kind
    ttl = op.ttl_ms
    if k == K.SET:
        return (encode(b"SET", key, op.value, b"PX", ttl) if ttl > 0 else encode(b"SET", key, op.value),)
    if k == K.EXPIRE:
        return (encode(b"PEXPIRE", key, ttl),)
    if k in (K.GET, K.DEL, K.HGETALL, K.SMEMBERS, K.STRLEN, K.EXISTS):
        cmd = encode(_NAMES[k], key)
    elif k == K.HSET:
        args = [b"HSET", key]
        for name, value in op.fields.items():
            args.append(name.encode())
            args.append(value)
        cmd = encode(*args)
    elif k in (K.HMGET, K.HDEL):
        cmd = encode(_NAMES[k], key, *(n.encode() for n in op.names))
    elif k in (K.SADD, K.SREM, K.RPUSH):
        cmd = encode(_NAMES[k], key, *op.members)
    elif k in (K.LRANGE, K.GETRANGE):
        cmd = encode(_NAMES[k], key, op.start, op.stop)
    elif k == K.INCRBY:
        cmd = encode(b"INCRBY", key, op.integer)
    elif k == K.APPEND:
        cmd = encode(b"APPEND", key, op.value)
    elif k == K.SETRANGE:
        cmd = encode(b"SETRANGE", key, op.start, op.value)
    else:
        raise ValueError(f"unknown op kind {k}")
    if ttl > 0 and k in _EXPIRING:
        return cmd, encode(b"PEXPIRE", key, ttl)
    return (cmd,)


_EXPIRING = frozenset({K.HSET, K.SADD, K.RPUSH, K.INCRBY, K.APPEND, K.SETRANGE})


def _fill(result: pb.Result, op, reply) -> None:
    k = op.kind
    if k in (K.GET, K.GETRANGE):
        if reply is not None:
            result.found = True
            result.value = reply
    elif k == K.HGETALL:
        if reply:
            result.found = True
            fields = result.fields
            for i in range(0, len(reply), 2):
                fields[reply[i].decode()] = reply[i + 1]
    elif k == K.HMGET:
        for v in reply:
            result.present.append(v is not None)
            result.values.append(v if v is not None else b"")
        result.found = any(result.present)
    elif k == K.SMEMBERS:
        result.values.extend(sorted(reply))
        result.found = bool(reply)
    elif k == K.LRANGE:
        result.values.extend(reply)
        result.found = bool(reply)
    elif k in (K.DEL, K.HDEL, K.SADD, K.SREM, K.RPUSH, K.INCRBY, K.APPEND, K.STRLEN, K.EXISTS, K.SETRANGE):
        result.integer = int(reply)
        result.found = bool(reply) if k in (K.EXISTS, K.STRLEN) else True
    elif k == K.HSET:
        result.integer = int(reply)

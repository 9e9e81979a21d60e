"""Sharded, replicated execution of operation batches over several Redis nodes.

Keys are placed on a consistent-hash ring (virtual nodes per Redis node); each key lives on the first R
distinct nodes clockwise from its hash. A batch is split by node and sent as one pipeline per node, all
nodes at once. Writes go to every healthy replica and succeed when at least one took them; reads go to the
first healthy, warmed-up replica and fall back to the next one if that node fails mid-batch. A node that
comes back takes writes at once but serves reads only after `warmup_s`, so that it is not read while it
still lacks what was written during its absence.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field

from gse.common.dbclient import K      # op kinds as plain ints (fast attribute access)
from gse.pb import dbproxy_pb2 as pb

from .resp import ConnectionLost, RedisReplyError, RespConnection, encode

log = logging.getLogger("gse.dbproxy")

READS = frozenset({K.GET, K.HGETALL, K.HMGET, K.SMEMBERS, K.LRANGE, K.GETRANGE, K.STRLEN, K.EXISTS})
TRANSIENT = (ConnectionLost, OSError, asyncio.TimeoutError)


def _hash(s: str) -> int:
    # blake2b spreads near-identical names (vnodes "host:port#i", keys "prefix:N") evenly; crc32 did not.
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


class Ring:
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


@dataclass
class Node:
    address: str
    client: RespConnection
    healthy: bool = True
    readable_at: float = 0.0   # monotonic time from which reads may go here
    failures: int = 0

    @property
    def readable(self) -> bool:
        return self.healthy and time.monotonic() >= self.readable_at


@dataclass
class _Plan:
    """Commands queued for one node, with where each result goes."""
    node: Node
    pipe: list = field(default_factory=list)    # encoded commands
    slots: list = field(default_factory=list)   # (op index, commands queued for it, is_read)


class ShardedStore:
    def __init__(self, addresses: list[str], replicas: int = 2, key_prefix: str = "", warmup_s: float = 30.0,
                 password: str = "", timeout_s: float = 2.0):
        if not addresses:
            raise ValueError("at least one redis node is required")
        self.replicas = max(1, replicas)
        self.prefix = key_prefix
        self.warmup_s = warmup_s
        self.nodes: dict[str, Node] = {}
        for addr in addresses:
            host, _, port = addr.rpartition(":")
            # Fail fast: a dead node is skipped and probed, never retried inline (retrying would stall
            # every batch that touches it).
            self.nodes[addr] = Node(addr, RespConnection(host or "127.0.0.1", int(port), password, timeout_s))
        self.ring = Ring(list(self.nodes))
        self.ops_total = 0

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.client.close()

    # ---- health -----------------------------------------------------------------------------------

    def _mark_down(self, node: Node, exc: Exception) -> None:
        if node.healthy:
            log.warning("redis node down", extra={"node": node.address, "error": repr(exc)})
        node.healthy = False
        node.failures += 1

    async def probe(self) -> None:
        """Ping every node; a node that answers again becomes writable now and readable after warm-up."""
        async def one(node: Node):
            try:
                (reply,) = await node.client.pipeline([PING])
                if isinstance(reply, RedisReplyError):
                    raise ConnectionLost(f"PING answered {reply}")
            except TRANSIENT as exc:
                self._mark_down(node, exc)
                return
            if not node.healthy:
                node.healthy = True
                node.readable_at = time.monotonic() + self.warmup_s
                log.info("redis node back; reads resume after warm-up",
                         extra={"node": node.address, "warmup_s": self.warmup_s})
        await asyncio.gather(*(one(n) for n in self.nodes.values()))

    def healthy_count(self) -> int:
        return sum(1 for n in self.nodes.values() if n.healthy)

    # ---- execution --------------------------------------------------------------------------------

    def _read_order(self, replicas: list[str]) -> list[Node]:
        nodes = [self.nodes[a] for a in replicas]
        ready = [n for n in nodes if n.readable]
        warming = [n for n in nodes if n.healthy and not n.readable]
        return ready + warming

    async def execute(self, ops, into=None) -> list[pb.Result]:
        """Results in the order of `ops`; with `into` (a repeated Result field, e.g. a reply's `results`)
        they are made in place there instead of being built apart and copied in."""
        self.ops_total += len(ops)
        results = [pb.Result() for _ in ops] if into is None else [into.add() for _ in ops]
        write_acks = [0] * len(ops)
        write_errors: dict[int, str] = {}
        pending_reads: dict[int, list[Node]] = {}
        plans: dict[str, _Plan] = {}

        def plan_for(node: Node) -> _Plan:
            p = plans.get(node.address)
            if p is None:
                p = plans[node.address] = _Plan(node)
            return p

        replicas_of, prefix, r = self.ring.replicas, self.prefix, self.replicas
        for i, op in enumerate(ops):
            try:
                _check(op)
                cmds = _commands(op, prefix)     # encoded once, whichever replicas take them
            except ValueError as exc:
                results[i].error = str(exc)
                continue
            replicas = replicas_of(op.key, r)
            if op.kind in READS:
                order = self._read_order(replicas)
                if not order:
                    results[i].error = "no healthy replica for key"
                    continue
                pending_reads[i] = order[1:]
                p = plan_for(order[0])
                p.pipe.extend(cmds)
                p.slots.append((i, len(cmds), True))
            else:
                targets = [node for a in replicas if (node := self.nodes[a]).healthy]
                if not targets:
                    results[i].error = "no healthy replica for key"
                    continue
                for node in targets:
                    p = plan_for(node)
                    p.pipe.extend(cmds)
                    p.slots.append((i, len(cmds), False))

        while plans:
            outcomes = await asyncio.gather(*(self._run(p) for p in plans.values()))
            retry: dict[str, _Plan] = {}
            for plan, replies in zip(plans.values(), outcomes):
                if isinstance(replies, Exception):
                    for i, _n, is_read in plan.slots:
                        if is_read:
                            fallback = [n for n in pending_reads.get(i, []) if n.healthy]
                            if fallback:
                                pending_reads[i] = fallback[1:]
                                node = fallback[0]
                                rp = retry.get(node.address)
                                if rp is None:
                                    rp = retry[node.address] = _Plan(node)
                                cmds = _commands(ops[i], prefix)
                                rp.pipe.extend(cmds)
                                rp.slots.append((i, len(cmds), True))
                            else:
                                results[i].error = f"redis unavailable: {replies!r}"
                        else:
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
                        _fill(results[i], ops[i], chunk[0])
                        results[i].ok = True
                    else:
                        if write_acks[i] == 0:
                            _fill(results[i], ops[i], chunk[0])
                        write_acks[i] += 1
            plans = retry

        for i, op in enumerate(ops):
            if op.kind not in READS and not results[i].error:
                if write_acks[i] > 0:
                    results[i].ok = True
                else:
                    results[i].error = write_errors.get(i, "write not applied")
        return results

    async def _run(self, plan: _Plan):
        try:
            return await plan.node.client.pipeline(plan.pipe)
        except TRANSIENT as exc:
            self._mark_down(plan.node, exc)
            return exc


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

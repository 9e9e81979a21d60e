"""The dbproxy client: the only way daemons reach Redis.

A call carries a whole batch of operations (one round trip for any number of keys). Op builders keep call
sites short: `await db.execute([hset(k, {...}, ttl_ms=...), hgetall(k2)])`.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Iterable, Mapping

import grpc

from gse.pb import dbproxy_pb2 as pb
from gse.pb import dbproxy_pb2_grpc as pb_grpc

from .errors import Unavailable
from .rpc import ChannelPool
from .tls import TLSMaterial

log = logging.getLogger("gse.dbclient")

Op = pb.Op


class K:
    """Op kinds as plain ints (protobuf's enum wrapper resolves attributes slowly, per call)."""
    GET = pb.Op.Kind.Value("GET")
    SET = pb.Op.Kind.Value("SET")
    DEL = pb.Op.Kind.Value("DEL")
    HSET = pb.Op.Kind.Value("HSET")
    HGETALL = pb.Op.Kind.Value("HGETALL")
    HMGET = pb.Op.Kind.Value("HMGET")
    HDEL = pb.Op.Kind.Value("HDEL")
    EXPIRE = pb.Op.Kind.Value("EXPIRE")
    SADD = pb.Op.Kind.Value("SADD")
    SREM = pb.Op.Kind.Value("SREM")
    SMEMBERS = pb.Op.Kind.Value("SMEMBERS")
    RPUSH = pb.Op.Kind.Value("RPUSH")
    LRANGE = pb.Op.Kind.Value("LRANGE")
    INCRBY = pb.Op.Kind.Value("INCRBY")
    APPEND = pb.Op.Kind.Value("APPEND")
    GETRANGE = pb.Op.Kind.Value("GETRANGE")
    STRLEN = pb.Op.Kind.Value("STRLEN")
    EXISTS = pb.Op.Kind.Value("EXISTS")
    SETRANGE = pb.Op.Kind.Value("SETRANGE")


def _b(v) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, bool):
        return b"1" if v else b"0"
    return str(v).encode()


def get(key: str) -> Op:
    """GET `key`: the Result has `found` and `value` (bytes) when the key exists."""
    return Op(kind=K.GET, key=key)


def set_(key: str, value, ttl_ms: int = 0) -> Op:
    """SET `key` to `value` (bytes; str as UTF-8, bool as b"1"/b"0", anything else as its str), expiring after
    `ttl_ms` milliseconds when > 0."""
    return Op(kind=K.SET, key=key, value=_b(value), ttl_ms=ttl_ms)


def delete(key: str) -> Op:
    """DEL `key`: Result.integer is 1 when the key existed, else 0."""
    return Op(kind=K.DEL, key=key)


def hset(key: str, fields: Mapping[str, object], ttl_ms: int = 0) -> Op:
    """HSET `fields` (name -> value, values converted as for `set_`) into the hash `key`; with `ttl_ms` > 0 the whole
    key's TTL is set to it as well. Result.integer counts the fields that were new."""
    return Op(kind=K.HSET, key=key, fields={k: _b(v) for k, v in fields.items()}, ttl_ms=ttl_ms)


def hgetall(key: str) -> Op:
    """HGETALL `key`: Result.fields (name -> bytes; `text_fields` decodes them), `found` when the hash has any field."""
    return Op(kind=K.HGETALL, key=key)


def hmget(key: str, names: Iterable[str]) -> Op:
    """HMGET `names` of the hash `key`: Result.values and Result.present in the order of `names` (a missing field
    reads b"" with present False); `found` when any was present."""
    return Op(kind=K.HMGET, key=key, names=list(names))


def hdel(key: str, names: Iterable[str]) -> Op:
    """HDEL `names` from the hash `key`: Result.integer counts the fields removed."""
    return Op(kind=K.HDEL, key=key, names=list(names))


def expire(key: str, ttl_ms: int) -> Op:
    """PEXPIRE `key` after `ttl_ms` milliseconds (must be > 0: dbproxy answers other values with an error in the
    Result)."""
    return Op(kind=K.EXPIRE, key=key, ttl_ms=ttl_ms)


def sadd(key: str, members: Iterable, ttl_ms: int = 0) -> Op:
    """SADD `members` (converted as for `set_`) to the set `key`, its TTL set to `ttl_ms` ms when > 0; Result.integer
    counts the new members."""
    return Op(kind=K.SADD, key=key, members=[_b(m) for m in members], ttl_ms=ttl_ms)


def srem(key: str, members: Iterable) -> Op:
    """SREM `members` from the set `key`: Result.integer counts the members removed."""
    return Op(kind=K.SREM, key=key, members=[_b(m) for m in members])


def smembers(key: str) -> Op:
    """SMEMBERS `key`: Result.values (bytes, sorted), `found` when the set is not empty."""
    return Op(kind=K.SMEMBERS, key=key)


def rpush(key: str, members: Iterable, ttl_ms: int = 0) -> Op:
    """RPUSH `members` onto the list `key`, its TTL set to `ttl_ms` ms when > 0; Result.integer is the list's new
    length."""
    return Op(kind=K.RPUSH, key=key, members=[_b(m) for m in members], ttl_ms=ttl_ms)


def lrange(key: str, start: int = 0, stop: int = -1) -> Op:
    """LRANGE `key` from `start` to `stop`, both inclusive and negative counting from the end (Redis's rules):
    Result.values."""
    return Op(kind=K.LRANGE, key=key, start=start, stop=stop)


def incrby(key: str, amount: int = 1, ttl_ms: int = 0) -> Op:
    """INCRBY `key` by `amount`, its TTL set to `ttl_ms` ms when > 0: Result.integer is the new value."""
    return Op(kind=K.INCRBY, key=key, integer=amount, ttl_ms=ttl_ms)


def append(key: str, value, ttl_ms: int = 0) -> Op:
    """APPEND `value` to the string `key`, its TTL set to `ttl_ms` ms when > 0: Result.integer is the new length in
    bytes."""
    return Op(kind=K.APPEND, key=key, value=_b(value), ttl_ms=ttl_ms)


def getrange(key: str, start: int, stop: int) -> Op:
    """GETRANGE of the string `key`, bytes `start` to `stop` inclusive (negative from the end): Result.value. `found`
    is set even for a missing key: an empty value is the only sign of one."""
    return Op(kind=K.GETRANGE, key=key, start=start, stop=stop)


def setrange(key: str, offset: int, value, ttl_ms: int = 0) -> Op:
    """SETRANGE: write `value` at byte `offset` (>= 0) of the string `key` (Redis pads a gap with zero bytes), its TTL
    set to `ttl_ms` ms when > 0: Result.integer is the new length in bytes."""
    return Op(kind=K.SETRANGE, key=key, start=offset, value=_b(value), ttl_ms=ttl_ms)


def strlen(key: str) -> Op:
    """STRLEN `key`: Result.integer is the length in bytes (0 for a missing key), `found` when it is > 0."""
    return Op(kind=K.STRLEN, key=key)


def exists(key: str) -> Op:
    """EXISTS `key`: Result.integer 1 and `found` when it exists."""
    return Op(kind=K.EXISTS, key=key)


def text_fields(result: pb.Result) -> dict[str, str]:
    """The fields of an HGETALL Result as text (UTF-8, undecodable bytes replaced)."""
    return {k: v.decode("utf-8", "replace") for k, v in result.fields.items()}


# Ops that change the result when applied twice (a counter, an append): a batch holding one is not resent
# unless its caller declares it idempotent (execute(..., idempotent=True)). Every other kind lands the same.
ACCUMULATING_KINDS = frozenset({K.INCRBY, K.APPEND, K.RPUSH})


def broken_channel(exc: grpc.aio.AioRpcError) -> bool:
    """The call failed because its connection broke (reset, TLS record that did not decrypt, transport gone),
    not because of what was asked: a fresh channel may succeed. gRPC reports a broken transport as
    UNAVAILABLE, or as UNKNOWN/INTERNAL "Stream removed" (e.g. `Unwrap failed (TSI_DATA_CORRUPTED)`)."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = exc.details() or ""
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and (
        "Stream removed" in details or "TSI_" in details or "Unwrap failed" in details)


class DbClient:
    """Talks to any dbproxy of the cluster; fails over between them on transport errors.

    A batch that fails on a broken channel (see `broken_channel`) is sent once more on a fresh channel (the
    broken one is closed and replaced), and a batch that failed on one dbproxy (UNAVAILABLE, deadline,
    cancelled) is sent to the next, when it is idempotent: it holds no INCRBY, APPEND or RPUSH (everything
    else lands the same twice), or the caller declares it so. A batch that is not is sent to another dbproxy
    only when the first refused the connection (UNAVAILABLE) and never twice on a broken channel: its caller
    is told (Unavailable) instead, since the first attempt may have been applied."""

    RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

    def __init__(self, tls: TLSMaterial, addresses: Iterable[str] = (), timeout_s: float = 5.0):
        self.tls = tls
        self.timeout_s = timeout_s
        self._addresses: list[str] = list(addresses)
        self.pool = ChannelPool(tls)
        self._rr = itertools.count(random.randrange(1000))
        self.renewed = 0            # channels replaced after they broke (for tests and logs)

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """Call these dbproxies (`host:port` each) from now on; channels to any other address are closed."""
        new = list(addresses)
        self.pool.retain(new)
        self._addresses = new

    def on_view(self, view: Mapping[str, dict]) -> None:
        """Discovery callback: use the dbproxies registered in ZooKeeper."""
        addrs = sorted(info["address"] for info in view.values() if info.get("address"))
        if addrs:
            self.set_addresses(addrs)

    @property
    def addresses(self) -> list[str]:
        """The dbproxy addresses in use (a copy)."""
        return list(self._addresses)

    def _stub(self, addr: str) -> pb_grpc.DbProxyStub:
        return pb_grpc.DbProxyStub(self.pool.get(addr))

    async def execute(self, ops: list[Op], idempotent: bool = False) -> list[pb.Result]:
        """Run a batch on some dbproxy. `idempotent`: the batch may be applied twice (e.g. HSETs of the same
        values); read-only batches are idempotent anyway. Raises Unavailable."""
        if not ops:
            return []
        addrs = self._addresses
        if not addrs:
            raise Unavailable("no dbproxy is known")
        again = idempotent or not any(op.kind in ACCUMULATING_KINDS for op in ops)
        start = next(self._rr)
        last: Exception | None = None
        req = pb.BatchRequest(ops=ops)
        for i in range(len(addrs)):
            addr = addrs[(start + i) % len(addrs)]
            try:
                reply = await self._stub(addr).Execute(req, timeout=self.timeout_s)
                return list(reply.results)
            except grpc.aio.AioRpcError as exc:
                last = exc
                if broken_channel(exc):
                    self.pool.renew(addr)           # never reuse a connection that broke
                    self.renewed += 1
                    if again:
                        log.warning("dbproxy channel broke; retrying once on a fresh one",
                                    extra={"address": addr, "code": exc.code().name, "error": exc.details()})
                        try:
                            reply = await self._stub(addr).Execute(req, timeout=self.timeout_s)
                            return list(reply.results)
                        except grpc.aio.AioRpcError as exc2:
                            last = exc = exc2
                if exc.code() not in self.RETRYABLE or (not again and exc.code() != grpc.StatusCode.UNAVAILABLE):
                    raise Unavailable(f"dbproxy {addr}: {exc.code().name}: {exc.details()}") from None
                log.warning("dbproxy call failed; trying another", extra={"address": addr, "code": exc.code().name})
        raise Unavailable(f"no dbproxy answered: {last.code().name if isinstance(last, grpc.aio.AioRpcError) else last}")

    async def close(self) -> None:
        """Close every channel to dbproxy."""
        await self.pool.close()

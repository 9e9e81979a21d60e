"""The machinery under every shared record: typed fields in a Redis hash, and the dbproxy ops to and from it.

A hash record is a dataclass whose fields are the hash's fields, declared with their types (`int`, `float`,
`str`, `bool`, or `Json` for a JSON document). `@hash_record(prefix=..., ttl_ms=...)` makes it one:

    @hash_record(prefix="gse:agent:", ttl_ms=7 * DAY_MS)
    @dataclasses.dataclass(slots=True)
    class AgentRecord:
        agent_id: str = ""
        online: bool = False

    AgentRecord.update("3f2c...", online=True)  -> HashWrite (key, encoded fields, TTL); .op() is the HSET
    AgentRecord.read("3f2c...")                 -> HGETALL op; AgentRecord.pick(id, ("online",)) an HMGET
    AgentRecord.decode(result)                  -> AgentRecord | None (None: no such key)

Writes are partial on purpose: a writer sets only the fields it owns (a heartbeat never touches the
identity), and `BatchWriter` merges writes to the same key while they wait. A field name a record does not
declare is a programming error (`KeyError`), never a silently new field. Reading tolerates fields it does not
know (a newer daemon wrote them) and missing ones (they read as the field's default).

The key of a record is its prefix followed by its identity parts joined with ":" (`key(*parts)`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, NamedTuple

from gse.common import dbclient as db

DAY_MS = 24 * 3600 * 1000


class Json:
    """Field type marker: the field holds a JSON document (dict or list), stored as compact JSON text."""


def _enc_text(v) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def _enc_int(v) -> bytes:
    return str(int(v)).encode()


def _enc_float(v) -> bytes:
    return repr(float(v)).encode()


def _enc_bool(v) -> bytes:
    return b"1" if v else b"0"


def _enc_json(v) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()


def _dec_text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _dec_int(b: bytes) -> int:
    try:
        return int(b)
    except ValueError:
        return int(float(b))     # a value stored as a float ("3.0") reads as its integer part


def _dec_float(b: bytes) -> float:
    return float(b)


def _dec_bool(b: bytes) -> bool:
    return b not in (b"", b"0", b"false")


def _dec_json(b: bytes):
    return json.loads(b)


_CODECS: dict[str, tuple[Callable, Callable]] = {
    "str": (_enc_text, _dec_text),
    "bytes": (bytes, bytes),
    "int": (_enc_int, _dec_int),
    "float": (_enc_float, _dec_float),
    "bool": (_enc_bool, _dec_bool),
    "Json": (_enc_json, _dec_json),
}


class HashWrite(NamedTuple):
    """Fields to set on one hash record: what `BatchWriter.put` queues (merged per key) or `.op()` sends."""
    key: str
    fields: dict[str, bytes]
    ttl_ms: int

    def op(self) -> db.Op:
        """The dbproxy HSET (it also refreshes the key's TTL when `ttl_ms` > 0)."""
        return db.Op(kind=db.K.HSET, key=self.key, fields=self.fields, ttl_ms=self.ttl_ms)

    def at(self, key: str) -> "HashWrite":
        """The same fields and TTL under another key: one encoding for many records written alike (the 117 items of
        a task's offline targets). The fields dict is shared: do not change it afterwards."""
        return HashWrite(key, self.fields, self.ttl_ms)


def _codec(field: dataclasses.Field) -> tuple[Callable, Callable]:
    name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    try:
        return _CODECS[name]
    except KeyError:
        raise TypeError(f"record field {field.name}: type {field.type!r} is not one of {sorted(_CODECS)}") from None


def hash_record(*, prefix: str, ttl_ms: int):
    """Class decorator (above `@dataclasses.dataclass`): make the dataclass a hash record with this key prefix
    and default TTL (ms; 0 = none). Adds `key`, `update`, `write_all`, `read`, `pick`, `decode` and
    `FIELDS` (the declared field names)."""

    def wrap(cls):
        """Attach the record methods to the dataclass `cls`; TypeError when it is not a dataclass or a field has a
        type without a codec."""
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__}: put @hash_record above @dataclasses.dataclass")
        codecs = {f.name: _codec(f) for f in dataclasses.fields(cls)}
        encoders = {n: c[0] for n, c in codecs.items()}
        decoders = {n: c[1] for n, c in codecs.items()}
        field_decoders = tuple(decoders.items())
        checked: set[tuple[str, ...]] = set()          # name lists `pick` has validated already
        cls.PREFIX = prefix
        cls.TTL_MS = ttl_ms
        cls.FIELDS = tuple(codecs)

        def key(*parts) -> str:
            """The record's key: the prefix followed by `parts` joined with ":"."""
            return prefix + ":".join(map(str, parts))

        def encode(values: dict[str, Any]) -> dict[str, bytes]:
            """Field values -> their stored bytes; KeyError for a field the record does not declare."""
            try:
                return {n: encoders[n](v) for n, v in values.items()}
            except KeyError as exc:
                raise KeyError(f"{cls.__name__} has no field {exc.args[0]!r}") from None

        def update(*parts, ttl_ms: int | None = None, **values) -> HashWrite:
            """A partial write: only the fields given, under the key of `parts`, with the record's TTL unless `ttl_ms`
            says otherwise (ms; 0 = none). KeyError for an unknown field."""
            return HashWrite(key(*parts), encode(values), cls.TTL_MS if ttl_ms is None else ttl_ms)

        def read(*parts) -> db.Op:
            """The HGETALL op for the record at `parts`; decode its Result with `decode`."""
            return db.Op(kind=db.K.HGETALL, key=key(*parts))

        def pick(*parts, names: Iterable[str]) -> db.Op:
            """The HMGET op for `names` of the record at `parts` (decode with `decode(result, names)`); KeyError for
            an unknown field."""
            names = names if isinstance(names, tuple) else tuple(names)
            if names not in checked:
                unknown = [n for n in names if n not in decoders]
                if unknown:
                    raise KeyError(f"{cls.__name__} has no field {unknown[0]!r}")
                if len(checked) < 64:           # the name lists of the code: a few; never grows without bound
                    checked.add(names)
            return db.Op(kind=db.K.HMGET, key=key(*parts), names=names)

        def decode(result, names: Iterable[str] | None = None):
            """The record from an HGETALL result, or from an HMGET of `names`; None when the key is absent
            (or the read failed: `result.ok` false)."""
            if not (result.ok and result.found):
                return None
            values = {}
            if names is None:
                # Declared fields looked up in the result's map: no copy of the map, unknown fields never visited
                # (measured 5.3 -> 3.3 us for a TaskItem against iterating the map's items).
                get = result.fields.get
                for n, dec in field_decoders:
                    b = get(n)
                    if b is not None:
                        try:
                            values[n] = dec(b)
                        except ValueError:
                            pass        # a malformed value reads as the default, never as a crash of the reader
            else:
                for n, b, present in zip(names, result.values, result.present):
                    dec = decoders.get(n) if present else None
                    if dec is not None:
                        try:
                            values[n] = dec(b)
                        except ValueError:
                            pass
            return cls(**values)

        def write_all(self, *parts, ttl_ms: int | None = None) -> HashWrite:
            """A write of every field of this record (defaults included) under the key of `parts`."""
            return update(*parts, ttl_ms=ttl_ms, **dataclasses.asdict(self))

        cls.key = staticmethod(key)
        cls.encode = staticmethod(encode)
        cls.update = staticmethod(update)
        cls.read = staticmethod(read)
        cls.pick = staticmethod(pick)
        cls.decode = staticmethod(decode)
        cls.write_all = write_all
        return cls

    return wrap


def json_document(cls):
    """Class decorator (above `@dataclasses.dataclass`): a record kept as one JSON object (a hash field, a
    string key). `to_json(obj, sparse=True)` leaves out fields that are None (a partial update: a reader
    merges documents in order, later ones over earlier); `from_json(bytes)` ignores unknown keys."""

    names = tuple(f.name for f in dataclasses.fields(cls))

    def to_json(self, sparse: bool = True) -> bytes:
        """The document as compact JSON bytes; with `sparse`, fields that are None are left out."""
        d = {n: getattr(self, n) for n in names}
        if sparse:
            d = {n: v for n, v in d.items() if v is not None}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()

    def from_json(raw: bytes | str):
        """The document from JSON text; unknown keys are ignored, missing ones take their defaults. ValueError when it is not a
        JSON object."""
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: not a JSON object")
        return cls(**{n: d[n] for n in names if n in d})

    def merge(self, other):
        """A copy of self with every field that is not None in `other` taken from `other`."""
        return dataclasses.replace(self, **{n: v for n in names if (v := getattr(other, n)) is not None})

    cls.FIELDS = names
    cls.to_json = to_json
    cls.from_json = staticmethod(from_json)
    cls.merge = merge
    return cls

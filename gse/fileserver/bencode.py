"""Bencoding (BEP 3): the encoding of .torrent files and of tracker responses.

`encode` takes int, bytes, str (UTF-8), list/tuple and dict (str or bytes keys, written sorted by their bytes);
`decode` returns int, bytes, list and dict with bytes keys, and refuses trailing data or malformed input.
"""

from __future__ import annotations

from typing import Any


class BencodeError(ValueError):
    """Input that is not valid bencoding, or a value that cannot be bencoded."""


def encode(value: Any) -> bytes:
    """The bencoding of `value` (int, bytes-like, str as UTF-8, list/tuple, dict with str or bytes keys, sorted by
    their bytes). BencodeError for a bool or any other type."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bool):  # bool is an int subclass; a silent 0/1 would hide a caller's bug
        raise BencodeError("cannot bencode a bool")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.append(b"%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, str):
        _encode(value.encode("utf-8"), out)
    elif isinstance(value, (list, tuple)):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(value, dict):
        items = []
        for key, item in value.items():
            if isinstance(key, str):
                key = key.encode("utf-8")
            elif not isinstance(key, bytes):
                raise BencodeError(f"dictionary key must be str or bytes, not {type(key).__name__}")
            items.append((key, item))
        items.sort(key=lambda kv: kv[0])
        out.append(b"d")
        for key, item in items:
            _encode(key, out)
            _encode(item, out)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot bencode {type(value).__name__}")


def decode(data: bytes) -> Any:
    """The value bencoded in `data` (ints, bytes, lists, dicts with bytes keys). BencodeError for input that is not
    bytes, malformed or non-canonical input, duplicate keys, nesting deeper than 100, or trailing data."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BencodeError("bencoded input must be bytes")
    data = bytes(data)
    value, end = _decode(data, 0, depth=0)
    if end != len(data):
        raise BencodeError(f"trailing data at offset {end}")
    return value


_MAX_DEPTH = 100


def _decode(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise BencodeError("nesting too deep")
    if pos >= len(data):
        raise BencodeError("unexpected end of input")
    lead = data[pos:pos + 1]
    if lead == b"i":
        end = data.find(b"e", pos + 1)
        if end < 0:
            raise BencodeError("unterminated integer")
        return _parse_int(data[pos + 1:end], pos), end + 1
    if lead == b"l":
        pos += 1
        items = []
        while data[pos:pos + 1] != b"e":
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos + 1
    if lead == b"d":
        pos += 1
        result: dict[bytes, Any] = {}
        while data[pos:pos + 1] != b"e":
            if pos >= len(data):
                raise BencodeError("unterminated dictionary")
            if not data[pos:pos + 1].isdigit():
                raise BencodeError(f"dictionary key at offset {pos} is not a byte string")
            key, pos = _decode(data, pos, depth + 1)
            if key in result:
                raise BencodeError(f"duplicate dictionary key {key!r}")
            result[key], pos = _decode(data, pos, depth + 1)
        return result, pos + 1
    if lead.isdigit():
        colon = data.find(b":", pos)
        if colon < 0:
            raise BencodeError("byte string without ':'")
        length = _parse_int(data[pos:colon], pos)
        if length < 0:
            raise BencodeError(f"negative length at offset {pos}")
        start = colon + 1
        if start + length > len(data):
            raise BencodeError("byte string runs past the end of input")
        return data[start:start + length], start + length
    raise BencodeError(f"unexpected byte {lead!r} at offset {pos}")


def _parse_int(digits: bytes, pos: int) -> int:
    body = digits[1:] if digits.startswith(b"-") else digits
    if not body or not body.isdigit():
        raise BencodeError(f"bad integer {digits!r} at offset {pos}")
    if (body.startswith(b"0") and len(body) > 1) or digits == b"-0":
        raise BencodeError(f"non-canonical integer {digits!r} at offset {pos}")
    return int(digits)

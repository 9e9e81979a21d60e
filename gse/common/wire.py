"""Protobuf messages assembled from serialized parts, for the few that carry tens of MiB.

A task with a 16 MiB script went through the message classes four times on the API server (the script into
a TaskScript, that into a TaskRequest, the frame into a DispatchRequest, each serialized): about 80-120 ms of
the event loop's time per task on this project's test machine, 40-55 ms of it in one deep copy (measured in
docs/benchmarks.md, "API latency"). The protobuf wire format is a concatenation of fields, so a message can be
written as the serialization of its small fields followed by its large length-delimited fields, each a tag,
a length and the bytes: `length_delimited` gives those as a list of parts, nested parts stay a list, and the
whole message is joined once, by the caller, where it is sent. Field numbers come from the descriptors.

Everything else is built with the message classes as usual.
"""

from __future__ import annotations

from google.protobuf.message import Message

_LENGTH_DELIMITED = 2


def varint(n: int) -> bytes:
    """The protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(message: type[Message], field: str, parts: list[bytes]) -> list[bytes]:
    """Field `field` of `message` (a bytes, string or message field) holding the concatenation of `parts`,
    as parts: `[tag and length, *parts]`. Raises KeyError for a field `message` does not have."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    size = sum(len(p) for p in parts)
    return [varint(number << 3 | _LENGTH_DELIMITED) + varint(size), *parts]

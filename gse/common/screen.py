"""Task output as text: how the agent turns a command's bytes into the UTF-8 that `screen` pages, and how a
caller gets the command's exact bytes back.

A job platform reads output in pages: `get_execute_script_result` with `offset`/`limit` in bytes, the next
offset being the previous one plus the UTF-8 length of the `screen` it got (bk-job does exactly that). For
such a reader to rebuild the output exactly, for any page size and while the command still runs:

1. **What is stored is UTF-8, and only whole characters.** The agent decodes the command's output with the
   host's code page (the agent's `tasks.host_code_page_name`, as in the original agent's configuration;
   default `utf8`, e.g. `gbk` on many Chinese hosts) incrementally: a character whose bytes arrive in two
   writes is held until its rest arrives (or the command ends), never stored in halves.
2. **A page never ends inside a character** (`whole_chars`): the API cuts a page back to the last character
   boundary at or before `limit`; a page that would then be empty holds its first character whole, even when
   that is longer than `limit` (up to 3 bytes more).
3. **Bytes that do not decode are kept, escaped.** Each undecodable byte *b* is stored as U+FFFD followed by
   the two lowercase hex digits of *b* (the byte 0xff reads `"\\ufffdff"`); a U+FFFD that the command itself
   printed is stored doubled (`"\\ufffd\\ufffd"`), so the escape is never ambiguous. `original_bytes(screen,
   code_page)` undoes both and re-encodes to the code page: for a UTF-8 host the result is exactly the bytes
   the command wrote; for other code pages, exactly those bytes whenever the code page round-trips (GBK does
   for every character it can decode).
"""

from __future__ import annotations

import codecs
import re

_ESCAPE_HANDLER = "gse-screen-escape"
# Undecodable bytes travel from the codec's error handler to `OutputDecoder.feed` as U+DC00 + byte: Python's
# decoders never produce lone surrogates from valid input, so they mark exactly the bytes that did not decode.
_MARKED = re.compile("[\udc00-\udcff]+")
_ESCAPED = re.compile("\ufffd(\ufffd|[0-9a-f]{2})")


def _mark_undecodable(exc: UnicodeError):
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(chr(0xDC00 + b) for b in exc.object[exc.start:exc.end]), exc.end


codecs.register_error(_ESCAPE_HANDLER, _mark_undecodable)


def check_code_page(name: str) -> str:
    """The codec name for a host code page setting (`utf8`, `gbk`, `gb18030`, `big5`, `cp1252`, ...).
    ValueError for a name Python does not know, or a code page that is not a superset of ASCII (UTF-16 and
    the like cannot be a host's terminal encoding)."""
    try:
        info = codecs.lookup(name)
    except (LookupError, TypeError):
        raise ValueError(f"unknown code page {name!r}") from None
    try:
        ascii_ok = "Az09 \n".encode(info.name) == b"Az09 \n"      # LookupError: not a text encoding (rot13)
    except (UnicodeError, LookupError):
        ascii_ok = False
    if not ascii_ok:
        raise ValueError(f"{name!r} is not a code page that encodes ASCII as itself")
    return info.name


class OutputDecoder:
    """Incremental conversion of a command's output to stored UTF-8 (see the module docstring).

    `feed(data)` returns the UTF-8 bytes of every whole character `data` completes; `feed(b"", final=True)`
    at the end of the command returns what was held back, with its bytes escaped. Linear in the input."""

    def __init__(self, code_page: str = "utf8"):
        self.code_page = check_code_page(code_page)
        self._decoder = codecs.getincrementaldecoder(self.code_page)(_ESCAPE_HANDLER)
        self.escaped = 0          # undecodable bytes escaped so far

    def feed(self, data: bytes, final: bool = False) -> bytes:
        """The UTF-8 bytes of the characters `data` completes (held-back bytes of an unfinished character come first);
        with `final`, the rest flushed with undecodable bytes escaped."""
        text = self._decoder.decode(data, final)
        if "\ufffd" in text:
            text = text.replace("\ufffd", "\ufffd\ufffd")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return _MARKED.sub(self._escape, text).encode("utf-8")

    def _escape(self, m: re.Match) -> str:
        run = m.group()
        self.escaped += len(run)
        return "".join(f"\ufffd{ord(c) - 0xDC00:02x}" for c in run)


def original_bytes(screen: str, code_page: str = "utf8") -> bytes:
    """The bytes the command wrote, from the concatenated `screen` pages of an item (the inverse of
    `OutputDecoder`): escapes become their bytes, doubled U+FFFD one U+FFFD, the rest is encoded to
    `code_page`."""
    code_page = check_code_page(code_page)
    out = bytearray()
    pos = 0
    for m in _ESCAPED.finditer(screen):
        out += screen[pos:m.start()].encode(code_page)
        tail = m.group(1)
        out += "\ufffd".encode(code_page, "replace") if tail == "\ufffd" else bytes([int(tail, 16)])
        pos = m.end()
    out += screen[pos:].encode(code_page)
    return bytes(out)


def whole_chars(data: bytes, limit: int) -> bytes:
    """The page of stored UTF-8 `data` (read from the page's offset, with up to 3 bytes beyond `limit`) that
    holds at most `limit` bytes of whole characters; when no whole character fits in `limit`, the first
    character whole. A character not yet stored whole (its bytes travel in two writes) waits for the next
    read. `limit` 0 means no limit."""
    if limit > 0 and len(data) > limit:
        end = limit
        while end > 0 and (data[end] & 0xC0) == 0x80:     # data[end] continues a character: cut before it
            end -= 1
        if end > 0:
            return data[:end]
        first = _char_len(data[0])
        return data[:first] if len(data) >= first else b""
    return data[:utf8_prefix_len(data)]


def _char_len(lead: int) -> int:
    return 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1


def utf8_prefix_len(data: bytes) -> int:
    """How many bytes of `data` form whole UTF-8 characters: `data` minus an unfinished character at its end."""
    n = len(data)
    i = n - 1
    while i >= 0 and n - i < 4 and (data[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0 or data[i] < 0x80:
        return n
    return i if n - i < _char_len(data[i]) else n

"""Request bodies: JSON parsed within bounds, the large ones away from the event loop.

A body is a JSON object (spec section 1). What any caller may send is bounded before a handler sees it:

- size: `max_body_bytes` of the API server (aiohttp refuses more while reading);
- nesting: at most MAX_DEPTH levels of objects and arrays;
- values: at most MAX_NODES objects, arrays and scalars in all (a 64 MiB `[{},{},...]` would otherwise be
  twenty million dicts);
- numbers: `NaN`, `Infinity` and `-Infinity` (which Python's parser accepts and JSON does not) are refused, and
  integers of more than 4,300 digits (Python's own limit);
- strings: valid Unicode; an escaped lone surrogate (`"\\ud800"`) is refused, because it cannot be encoded to
  UTF-8 and would fail whatever touched it later.

Every refusal is a BadRequest (1000400) saying what was wrong.

Parsing is CPU work that holds the GIL: a 16 MiB script body takes 25-60 ms in `json.loads` on this
project's test machine, longer than every other caller should wait. Bodies up to INLINE_MAX_BYTES are parsed
on the event loop (a few ms at most); larger ones in a worker process (`BodyParser`), so the event loop only
pays for receiving the parsed value (unpickling 16 MiB: about 10-17 ms, in the pool's receiving thread).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import re
import resource
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from gse.common.errors import BadRequest, Unavailable

log = logging.getLogger("gse.apiserver.bodies")

MAX_DEPTH = 64
MAX_NODES = 2_000_000
INLINE_MAX_BYTES = 256 * 1024
WORKER_MEMORY_BYTES = 4 << 30        # address space of a parsing worker: a body that needs more is refused

# A JSON escape of a UTF-16 surrogate: only bodies that have one can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(raw: bytes) -> dict:
    """The JSON object in `raw` (empty or blank: {}), checked against the bounds above; BadRequest otherwise."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _check_shape(body, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return body


def _check_shape(body: dict, strings: bool) -> None:
    """Depth and value count of `body` (one pass, no recursion); with `strings`, also that every string
    (key or value) encodes to UTF-8."""
    nodes = 0
    stack: list[tuple[object, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            nodes += len(value)
            if nodes > MAX_NODES:
                break
            for k, v in value.items():
                if strings:
                    _check_string(k)
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
                elif strings and isinstance(v, str):
                    _check_string(v)
        elif isinstance(value, list):
            nodes += len(value)
            if nodes > MAX_NODES:
                break
            for v in value:
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
                elif strings and isinstance(v, str):
                    _check_string(v)
    if nodes > MAX_NODES:
        raise BadRequest(f"request body holds more than {MAX_NODES} values")


def _check_string(s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("request body has a string with an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)") \
            from None


def _parse_in_worker(raw: bytes) -> tuple[bool, object]:
    """Worker-process side: (True, body) or (False, message of the BadRequest)."""
    try:
        return True, parse(raw)
    except BadRequest as exc:
        return False, exc.message
    except MemoryError:
        return False, "request body needs more memory to parse than a request may use"


def _limit_worker_memory() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass


class BodyParser:
    """Parses request bodies: small ones inline, large ones in a worker process (created on first use,
    `spawn`ed: the API server has threads, so it never forks). Call `close()` at shutdown."""

    def __init__(self, workers: int = 1, inline_max: int = INLINE_MAX_BYTES):
        self.workers = workers
        self.inline_max = inline_max
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_limit_worker_memory, max_tasks_per_child=200)
        return self._pool

    async def start(self) -> None:
        """Start the worker now, so that the first large body does not pay for its start."""
        await self.parse(b"{}" + b" " * self.inline_max)

    async def parse(self, raw: bytes) -> dict:
        """The JSON object of a request body: parsed inline up to `inline_max` bytes, in the worker process beyond.
        BadRequest for a body that is not a JSON object (the message says why); Unavailable when the worker died on it
        (a new one serves the next request)."""
        if len(raw) <= self.inline_max:
            return parse(raw)
        loop = asyncio.get_running_loop()
        try:
            ok, value = await loop.run_in_executor(self._executor(), _parse_in_worker, raw)
        except BrokenProcessPool:
            # A worker died (killed, or out of memory beyond the rlimit's reach): a new pool next time.
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            log.error("body parsing worker died; starting a new one for the next request")
            raise Unavailable("the request body could not be parsed (worker restarted); try again") from None
        if not ok:
            raise BadRequest(str(value))
        return value

    def close(self) -> None:
        """Shut the worker process down without waiting (parses in progress are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

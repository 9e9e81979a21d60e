"""Structured logging: one JSON object (or one key=value line) per record, and the trace that follows a task.

Call sites pass structured fields through `extra`: `log.info("agent attached", extra={"agent_id": aid})`.

A task is followed through the logs by its `task_id` and the `request_id` of the API call that made it. The
current trace lives in a context variable: `with trace(task_id=..., request_id=...):` (or `set_trace`) puts
both into every line logged inside it, including from asyncio tasks started there (they copy the context).
It crosses processes in gRPC metadata (`gse.common.rpc` adds it to every call and restores it in every
handler) and in the agent frames (`TaskRequest.request_id`, `FileSource`/`FileTarget`), so that
`grep <task_id>` over the logs of every daemon and agent shows the task's whole path (docs/walkthrough.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}

# The current trace: {"task_id": ..., "request_id": ...} (either may be absent), or None.
TRACE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gse_trace", default=None)


def current_trace() -> dict:
    """The trace of the current context ({} when none)."""
    return TRACE.get() or {}


def set_trace(task_id: str = "", request_id: str = "") -> contextvars.Token:
    """Set the trace for the rest of the current context (a request handler, a task's coroutine); empty
    values keep what the enclosing trace had. Returns the token for `TRACE.reset`."""
    t = dict(TRACE.get() or {})
    if task_id:
        t["task_id"] = task_id
    if request_id:
        t["request_id"] = request_id
    return TRACE.set(t or None)


@contextlib.contextmanager
def trace(task_id: str = "", request_id: str = ""):
    """`with trace(task_id=...):` every line logged inside names the task (and request)."""
    token = set_trace(task_id, request_id)
    try:
        yield
    finally:
        TRACE.reset(token)


def _fields(record: logging.LogRecord) -> dict:
    out = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
    t = TRACE.get()
    if t:
        for k, v in t.items():
            out.setdefault(k, v)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, service, logger, msg, then the record's `extra` fields and the
    current trace (task_id, request_id), and `exc` with the traceback."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (values that are not JSON become their str)."""
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One `HH:MM:SS.mmm L service message key=value ...` line (local time) with the `extra` fields and the trace, for
    people at a terminal."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one text line, followed by the traceback when there is one."""
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname[0]} {self.service} {record.getMessage()}" + (f" {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(service: str, level: str = "info", fmt: str = "json", stream=None) -> None:
    """Route every logger to `stream` (default stderr) in `fmt` ("json" or "text") at `level`, naming `service` in
    each line; kazoo and aiohttp's access log are held at WARNING."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kazoo is chatty at INFO about every reconnect attempt; its state changes are logged by our adapter.
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

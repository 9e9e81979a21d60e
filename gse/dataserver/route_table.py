"""The route table: channel (DataID) -> outputs, read from ZooKeeper and applied live.

Definitions live as one JSON document per stream_to and per route under <root>/config/data/ (written by the
API server after checking them, gse.common.dataroutes). `DocDir` follows one such directory with kazoo
watches, hopping onto the event loop for every change; `RouteTable` compiles the documents into `Route`s
whose filters are plain closures, rebuilt whole (a new table is swapped in at once) on every change.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Callable

from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from gse.common.datastate import DATA_CONFIG, ROUTE_DIR, STREAMTO_DIR
from gse.common.discovery import Discovery

log = logging.getLogger("gse.dataserver.routes")


class DocDir:
    """Every JSON document under one ZooKeeper directory, kept current; `on_change()` after each change."""

    def __init__(self, discovery: Discovery, path: str, on_change: Callable[[], None]):
        self.discovery = discovery
        self.path = path
        self.on_change = on_change
        self.docs: dict[str, dict] = {}
        self._watching: set[str] = set()
        self._stopping = False
        self._pending: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Read every document once (the table is complete before the server takes traffic), then follow the
        directory's children with a kazoo watch."""
        zk = self.discovery.zk
        await asyncio.to_thread(zk.ensure_path, self.path)
        # A first full read, so that the table is complete before the server takes traffic.
        children = await asyncio.to_thread(zk.get_children, self.path)
        for c in children:
            try:
                data, _ = await asyncio.to_thread(zk.get, f"{self.path}/{c}")
            except Exception:  # noqa: BLE001 - deleted in between
                continue
            self._store(c, data)
        loop = asyncio.get_running_loop()

        def on_children(names):
            """kazoo ChildrenWatch callback (kazoo thread): apply the names on the loop; returning False ends the
            watch once stopping."""
            if self._stopping or loop.is_closed():
                return False
            loop.call_soon_threadsafe(self._children, list(names))
            return True

        ChildrenWatch(zk, self.path, on_children)

    def stop(self) -> None:
        """Stop following: the kazoo watches end at their next event."""
        self._stopping = True

    def _children(self, names: list[str]) -> None:
        zk = self.discovery.zk
        loop = asyncio.get_running_loop()
        for name in set(self.docs) - set(names):
            self.docs.pop(name, None)
            self._changed()
        for name in names:
            if name in self._watching:
                continue
            self._watching.add(name)
            DataWatch(zk, f"{self.path}/{name}", self._watcher(loop, name))

    def _watcher(self, loop: asyncio.AbstractEventLoop, name: str):
        # Exactly two parameters: kazoo passes the event too to a function that takes a third.
        def on_data(data, stat):
            """kazoo DataWatch callback (kazoo thread): apply the document on the loop; the watch ends when the node
            is gone or the table stops."""
            if self._stopping or loop.is_closed():
                return False
            loop.call_soon_threadsafe(self._data, name, data, stat is None)
            return stat is not None
        return on_data

    def _data(self, name: str, data: bytes | None, gone: bool) -> None:
        if gone:
            self._watching.discard(name)
            if self.docs.pop(name, None) is not None:
                self._changed()
            return
        if self._store(name, data):
            self._changed()

    def _store(self, name: str, data: bytes | None) -> bool:
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            log.error("route document is not valid JSON; ignored", extra={"path": f"{self.path}/{name}"})
            return False
        if not isinstance(doc, dict):
            return False
        if self.docs.get(name) == doc:
            return False
        self.docs[name] = doc
        return True

    def _changed(self) -> None:
        # Coalesce a burst of changes (one API call can touch several nodes) into one rebuild.
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(0.02, self._fire)

    def _fire(self) -> None:
        self._pending = None
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a bad document must not stop the watch
            log.exception("applying route documents failed")


# ---- compiled routes ------------------------------------------------------------------------------------

RecordFilter = Callable[[bytes], bool]


def _compare(dtype: str, value: str):
    if dtype == "int":
        want = int(value)

        def cmp(field: bytes) -> bool:
            """The field equals the wanted integer (a field that is not an integer does not match)."""
            try:
                return int(field) == want
            except ValueError:
                return False
        return cmp
    want_b = value.encode()
    return lambda field: field == want_b


def compile_filter(f: dict):
    """-> ("protocol", fn(fields tuple) -> bool) or ("data", fn(body) -> bool)."""
    idx = int(f["field_index"])
    cmp = _compare(f["field_data_type"], f["field_data_value"])
    if f.get("field_in") == "protocol":
        return "protocol", lambda fields: idx < len(fields) and cmp(fields[idx])
    sep = f.get("field_separator", "").encode()
    if not sep:
        if idx != 0:
            return "data", lambda body: False
        return "data", lambda body: cmp(body.strip())
    limit = idx + 1

    def on_body(body: bytes) -> bool:
        """Split the record at most `idx + 1` times on the separator; field `idx`, stripped, must match."""
        parts = body.split(sep, limit)
        return idx < len(parts) and cmp(parts[idx].strip())
    return "data", on_body


@dataclass
class RouteEntry:
    """One entry of a channel's route, compiled: the stream_to it writes to, that stream_to's report mode, the route's
    target part for it, and its filters split by what they look at (protocol fields of the batch, or each record's
    body) and how they combine (all of `and_*`, any of `or_*`)."""
    name: str
    stream_to_id: int
    mode: str                   # kafka | redis | file
    target: dict                # the route's kafka / redis / file part
    and_proto: list
    and_data: list
    or_proto: list
    or_data: list

    @property
    def filtered(self) -> bool:
        """Whether the entry has any filter (without one it takes every record)."""
        return bool(self.and_proto or self.and_data or self.or_proto or self.or_data)

    def select(self, records, proto_fields: tuple) -> list:
        """The records of one batch this entry takes (all of them when it has no filters)."""
        if not self.filtered:
            return records
        if not all(fn(proto_fields) for fn in self.and_proto):
            return []
        or_proto_ok = any(fn(proto_fields) for fn in self.or_proto)
        and_data, or_data = self.and_data, self.or_data
        if not and_data and (or_proto_ok or not (self.or_proto or or_data)):
            return records
        out = []
        for r in records:
            if and_data and not all(fn(r) for fn in and_data):
                continue
            if (self.or_proto or or_data) and not or_proto_ok and not any(fn(r) for fn in or_data):
                continue
            out.append(r)
        return out


@dataclass
class Route:
    """The compiled route of one channel (DataID): its entries, each sending what it selects to one stream_to."""
    channel_id: int
    entries: list[RouteEntry]


def compile_route(doc: dict, streamtos: dict[int, dict]) -> Route:
    """Compile a stored route document (gse.common.dataroutes form) against the stream_to documents by id; a filter
    name the route does not define is ignored; an entry naming a stream_to that does not exist is kept (its mode
    taken from its own target part) and its batches fail in the router. KeyError/ValueError for a document without
    channel_id or stream_to_id."""
    filters = {f["name"]: compile_filter(f) for f in doc.get("stream_filters", [])}
    entries = []
    for e in doc.get("route", []):
        st = e["stream_to"]
        sid = int(st["stream_to_id"])
        sdoc = streamtos.get(sid)
        mode = sdoc["stream_to"]["report_mode"] if sdoc else next((m for m in ("kafka", "redis", "file") if m in st),
                                                                  "missing")
        ands = [filters[n] for n in e.get("filter_name_and", []) if n in filters]
        ors = [filters[n] for n in e.get("filter_name_or", []) if n in filters]
        entries.append(RouteEntry(
            e.get("name", ""), sid, mode, st.get(mode, {}),
            [fn for kind, fn in ands if kind == "protocol"], [fn for kind, fn in ands if kind == "data"],
            [fn for kind, fn in ors if kind == "protocol"], [fn for kind, fn in ors if kind == "data"]))
    return Route(int(doc["channel_id"]), entries)


class RouteTable:
    """Follows the stream_to and route documents; `routes` and `streamtos` are replaced whole on change."""

    def __init__(self, discovery: Discovery, on_streamtos: Callable[[dict[int, dict]], None] | None = None):
        self.discovery = discovery
        base = discovery.path("config", DATA_CONFIG)
        self.streamto_dir = DocDir(discovery, f"{base}/{STREAMTO_DIR}", self._rebuild)
        self.route_dir = DocDir(discovery, f"{base}/{ROUTE_DIR}", self._rebuild)
        self.on_streamtos = on_streamtos
        self.routes: dict[int, Route] = {}
        self.streamtos: dict[int, dict] = {}
        self.version = 0

    async def start(self) -> None:
        """Read both directories and build the first table before the server takes traffic."""
        await self.streamto_dir.start()
        await self.route_dir.start()
        self._rebuild()

    def stop(self) -> None:
        """Stop following both directories."""
        self.streamto_dir.stop()
        self.route_dir.stop()

    def _rebuild(self) -> None:
        streamtos = {}
        for name, doc in self.streamto_dir.docs.items():
            try:
                streamtos[int(doc["stream_to_id"])] = doc
            except (KeyError, TypeError, ValueError):
                log.error("bad stream_to document ignored", extra={"node": name})
        routes = {}
        for name, doc in self.route_dir.docs.items():
            try:
                route = compile_route(doc, streamtos)
            except Exception as exc:  # noqa: BLE001 - one bad document must not take the others down
                log.error("bad route document ignored", extra={"node": name, "error": repr(exc)})
                continue
            routes[route.channel_id] = route
        if streamtos != self.streamtos and self.on_streamtos is not None:
            self.on_streamtos(streamtos)        # outputs first, so that the new routes find them
        self.streamtos = streamtos
        self.routes = routes
        self.version += 1
        log.info("route table applied", extra={"routes": len(routes), "stream_tos": len(streamtos),
                                                "version": self.version})

    def get(self, channel_id: int) -> Route | None:
        """The route of `channel_id` (the DataID), None when it has none."""
        return self.routes.get(channel_id)

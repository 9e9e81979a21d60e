"""Data route endpoints (spec section 3) and cluster/dispatch_message (spec section 4).

Routes: add/update/delete/query_streamto and add/update/delete/query_route, served at the v1 paths
`/api/c/compapi/v2/gse/config_<op>` and the v2 paths `/api/v2/data/<op>`. ZooKeeper is the source of truth:
every definition is one JSON node under <root>/config/data/ (gse.common.datastate); this module checks a
request (gse.common.dataroutes), then writes the node with a version check, so two API servers changing the
same definition never lose an update silently; queries read ZooKeeper directly, so every API server answers
what the data servers apply. A stream_to still used by a route cannot be deleted or change its report_mode.

dispatch_message: `content` goes to the plugins on the message socket of each target agent through the task
server holding it; the plugin's reply is posted by that task server to the callback registered for the slot
in <root>/config/message_slots (see gse.taskserver.data_relay). `token` must match the slot's token when the
slot has one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import defaultdict

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from gse.common import dataroutes as dr
from gse.common.datastate import (CHANNEL_ALLOC_BASE, DATA_CONFIG, MAX_CHANNEL_ID, MESSAGE_SLOTS, ROUTE_DIR,
                                  SEQ_DIR, STREAMTO_DIR)
from gse.common.discovery import Discovery
from gse.common.errors import ApiCode, BadRequest, Conflict, ErrorCode, Unauthorized, Unavailable
from gse.common.records import SESSION_FIELDS, now_ms
from gse.pb import agent_pb2 as apb
from gse.pb import data_pb2 as dpb

from . import validate as v
from .agents_view import AgentsView
from .app import Api
from .taskservers import TaskServers

V1 = "/api/c/compapi/v2/gse"
V2 = "/api/v2/data"
OPS = ("add_streamto", "update_streamto", "delete_streamto", "query_streamto",
       "add_route", "update_route", "delete_route", "query_route")
SECRET_KEYS = ("sasl_passwd", "passwd")
MAX_CONTENT = 8 * 1024 * 1024


class RouteStore:
    """The stream_to and route documents in ZooKeeper, read and written without blocking the loop."""

    def __init__(self, discovery: Discovery):
        self.d = discovery
        self.base = discovery.path("config", DATA_CONFIG)

    def _path(self, kind: str, ident: int | None = None) -> str:
        return f"{self.base}/{kind}" + (f"/{ident}" if ident is not None else "")

    async def ensure(self) -> None:
        """Create the stream_to, route and allocation-counter directories if they are missing (idempotent)."""
        for kind in (STREAMTO_DIR, ROUTE_DIR, f"{SEQ_DIR}/{STREAMTO_DIR}", f"{SEQ_DIR}/{ROUTE_DIR}"):
            await asyncio.to_thread(self.d.zk.ensure_path, self._path(kind))

    async def all(self, kind: str) -> dict[int, dict]:
        """Every stored document of `kind` (STREAMTO_DIR or ROUTE_DIR) by its id; nodes that are not JSON or carry no
        integer id are skipped. Unavailable when ZooKeeper fails a read."""
        zk = self.d.zk
        try:
            names = await self.d.aio(zk.get_children_async(self._path(kind)))
        except NoNodeError:
            return {}
        results = await asyncio.gather(*[self.d.aio(zk.get_async(self._path(kind, n))) for n in names
                                         if n.isdigit()], return_exceptions=True)
        out = {}
        for res in results:
            if isinstance(res, NoNodeError):
                continue
            if isinstance(res, Exception):
                raise Unavailable(f"zookeeper read failed: {res!r}")
            try:
                doc = json.loads(res[0])
            except ValueError:
                continue
            key = doc.get("stream_to_id") if kind == STREAMTO_DIR else doc.get("channel_id")
            if isinstance(key, int):
                out[key] = doc
        return out

    async def get(self, kind: str, ident: int) -> tuple[dict, int] | None:
        """(the document, its ZooKeeper version) of `kind`/`ident`, None when there is none."""
        try:
            data, stat = await self.d.aio(self.d.zk.get_async(self._path(kind, ident)))
        except NoNodeError:
            return None
        return json.loads(data), stat.version

    async def create(self, kind: str, ident: int, doc: dict) -> bool:
        """Create the document; False when `ident` is taken already."""
        try:
            await self.d.aio(self.d.zk.create_async(self._path(kind, ident), _dump(doc)))
            return True
        except NodeExistsError:
            return False

    async def set(self, kind: str, ident: int, doc: dict, version: int) -> None:
        """Replace the document if it is still at `version`. Conflict when another request changed or deleted it
        meanwhile."""
        try:
            await self.d.aio(self.d.zk.set_async(self._path(kind, ident), _dump(doc), version=version))
        except BadVersionError:
            raise Conflict("the definition was changed by another request at the same time; try again") from None
        except NoNodeError:
            raise Conflict("the definition was deleted by another request at the same time") from None

    async def delete(self, kind: str, ident: int, version: int) -> None:
        """Delete the document if it is still at `version` (one already gone is fine). Conflict when another request
        changed it meanwhile."""
        try:
            await self.d.aio(self.d.zk.delete_async(self._path(kind, ident), version=version))
        except BadVersionError:
            raise Conflict("the definition was changed by another request at the same time; try again") from None
        except NoNodeError:
            pass

    async def allocate(self, kind: str) -> int:
        """A fresh number from a ZooKeeper sequential node (unique across API servers)."""
        path = await self.d.aio(self.d.zk.create_async(f"{self._path(SEQ_DIR)}/{kind}/n-", b"", sequence=True))
        await self.d.aio(self.d.zk.delete_async(path))
        return int(path.rsplit("-", 1)[1])


def _dump(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()


def _masked(st: dict) -> dict:
    out = json.loads(json.dumps(st))
    for part in ("kafka", "redis"):
        for key in SECRET_KEYS:
            if out.get(part, {}).get(key):
                out[part][key] = "******"
    return out


def _condition(body: dict) -> dict:
    return v.obj(body, "condition")


def _plat(cond: dict) -> str:
    return v.string(cond, "plat_name", where="condition.", max_len=128)


class DataEndpoints:
    """The data route endpoints (spec §3: add/update/delete/query of stream_to and route, at the v1 `config_<op>` and
    the v2 `/api/v2/data/<op>` paths) and cluster/dispatch_message (spec §4). Definitions are checked with
    gse.common.dataroutes and stored in ZooKeeper through `RouteStore`."""

    def __init__(self, view: AgentsView, servers: TaskServers, discovery: Discovery, *, max_hosts: int):
        self.view = view
        self.servers = servers
        self.discovery = discovery
        self.store = RouteStore(discovery)
        self.max_hosts = max_hosts
        self._ready = False

    def register(self, api: Api) -> None:
        """Serve every data-route op at its v1 and v2 path, and /api/v2/cluster/dispatch_message."""
        for op in OPS:
            handler = getattr(self, op)
            api.route(f"{V1}/config_{op}", handler, f"config_{op}")
            api.route(f"{V2}/{op}", handler, op)
        api.route("/api/v2/cluster/dispatch_message", self.dispatch_message)

    async def _store(self) -> RouteStore:
        if not self._ready:
            await self.store.ensure()
            self._ready = True
        return self.store

    # ---- stream_to ----------------------------------------------------------------------------------

    async def add_streamto(self, body: dict, _req):
        """add_streamto: `{operation, metadata {plat_name, label?}, stream_to {...}}` -> `{stream_to_id}` (a fresh id
        from ZooKeeper's sequence). BadRequest naming the field."""
        operator = dr.operator(body)
        md = dr.metadata(body)
        st = dr.stream_to(body.get("stream_to"))
        store = await self._store()
        for _ in range(100):
            sid = await store.allocate(STREAMTO_DIR) + 1
            doc = {"stream_to_id": sid, "metadata": md, "stream_to": st, "operator": operator,
                   "updated_ms": now_ms()}
            if await store.create(STREAMTO_DIR, sid, doc):
                return {"stream_to_id": sid}
        raise Conflict("could not allocate a stream_to_id (others were allocating at the same time); try again")

    async def update_streamto(self, body: dict, _req):
        """update_streamto: `{operation, condition {stream_to_id, plat_name}, specification {stream_to, metadata
        {label}?}}` -> `{stream_to_id}`. BadRequest when the id does not exist, belongs to another plat_name, or the
        report_mode would change while routes use it."""
        operator = dr.operator(body)
        cond = _condition(body)
        plat = _plat(cond)
        sid = v.integer(cond, "stream_to_id", where="condition.", minimum=1)
        spec = v.obj(body, "specification")
        st = dr.stream_to(spec.get("stream_to"), "specification.stream_to")
        store = await self._store()
        doc, version = await self._streamto(store, sid, plat)
        if st["report_mode"] != doc["stream_to"]["report_mode"]:
            users = await self._routes_using(store, sid)
            if users:
                raise BadRequest(f"'specification.stream_to.report_mode' cannot change from "
                                 f"{doc['stream_to']['report_mode']} to {st['report_mode']}: stream_to {sid} is used "
                                 f"by the routes of channels {users[:20]}")
        md = doc["metadata"]
        if "label" in (spec.get("metadata") or {}):
            md = {**md, "label": dr.label(spec["metadata"], "specification.metadata.")}
        await store.set(STREAMTO_DIR, sid, {**doc, "metadata": md, "stream_to": st, "operator": operator,
                                            "updated_ms": now_ms()}, version)
        return {"stream_to_id": sid}

    async def delete_streamto(self, body: dict, _req):
        """delete_streamto: `{operation, condition {stream_to_id, plat_name}}` -> `{stream_to_id}`. BadRequest while a
        route still uses it (the message lists up to 20 channels)."""
        dr.operator(body)
        cond = _condition(body)
        plat = _plat(cond)
        sid = v.integer(cond, "stream_to_id", where="condition.", minimum=1)
        store = await self._store()
        _doc, version = await self._streamto(store, sid, plat)
        users = await self._routes_using(store, sid)
        if users:
            raise BadRequest(f"'condition.stream_to_id' {sid} is used by the routes of channels {users[:20]}; "
                             "change or delete those routes first")
        await store.delete(STREAMTO_DIR, sid, version)
        return {"stream_to_id": sid}

    async def query_streamto(self, body: dict, _req):
        """query_streamto: `{condition {plat_name, stream_to_id?, label?}}` -> `[{metadata (+ stream_to_id),
        stream_to, operator, updated_ms}]` sorted by id, with passwords masked."""
        cond = _condition(body)
        plat = _plat(cond)
        sid = v.integer(cond, "stream_to_id", where="condition.", required=False, default=None, minimum=1)
        wanted = dr.label(cond, "condition.")
        docs = await (await self._store()).all(STREAMTO_DIR)
        out = []
        for i in sorted(docs):
            doc = docs[i]
            if doc["metadata"]["plat_name"] != plat or (sid is not None and i != sid) or \
                    not dr.labels_match(doc["metadata"].get("label", {}), wanted):
                continue
            out.append({"metadata": {**doc["metadata"], "stream_to_id": i}, "stream_to": _masked(doc["stream_to"]),
                        "operator": doc.get("operator", ""), "updated_ms": doc.get("updated_ms", 0)})
        return out

    async def _streamto(self, store: RouteStore, sid: int, plat: str) -> tuple[dict, int]:
        found = await store.get(STREAMTO_DIR, sid)
        if found is None:
            raise BadRequest(f"'condition.stream_to_id' {sid} does not exist")
        doc, version = found
        if doc["metadata"]["plat_name"] != plat:
            raise BadRequest(f"'condition.plat_name' {plat!r} is not the platform of stream_to {sid}")
        return doc, version

    async def _routes_using(self, store: RouteStore, sid: int) -> list[int]:
        routes = await store.all(ROUTE_DIR)
        return sorted(c for c, doc in routes.items()
                      if any(int(e["stream_to"]["stream_to_id"]) == sid for e in doc.get("route", [])))

    # ---- routes -------------------------------------------------------------------------------------

    async def add_route(self, body: dict, _req):
        """add_route: `{operation, metadata {plat_name, label?, channel_id?}, route [...], stream_filters [...]}` ->
        `{channel_id}`. Without a channel_id (or 0) one is allocated from CHANNEL_ALLOC_BASE up; a channel_id that
        already has a route is BadRequest, and so is a route entry naming a stream_to that does not exist."""
        operator = dr.operator(body)
        md = dr.metadata(body)
        channel = v.integer(body["metadata"], "channel_id", where="metadata.", required=False, minimum=0,
                            maximum=MAX_CHANNEL_ID, default=0)
        filters = dr.stream_filters(body.get("stream_filters"))
        store = await self._store()
        entries = dr.route_entries(body.get("route"), filters, await store.all(STREAMTO_DIR))

        def doc_for(cid: int) -> dict:
            """The stored route document for channel `cid`."""
            return {"channel_id": cid, "metadata": {**md, "channel_id": cid}, "route": entries,
                    "stream_filters": filters, "operator": operator, "updated_ms": now_ms()}

        if channel:
            if not await store.create(ROUTE_DIR, channel, doc_for(channel)):
                raise BadRequest(f"'metadata.channel_id' {channel} already has a route; use update_route")
            return {"channel_id": channel}
        for _ in range(1000):
            cid = CHANNEL_ALLOC_BASE + await store.allocate(ROUTE_DIR)
            if await store.create(ROUTE_DIR, cid, doc_for(cid)):
                return {"channel_id": cid}
        raise Conflict("could not allocate a channel_id (others were allocating at the same time); try again")

    async def update_route(self, body: dict, _req):
        """update_route: `{operation, condition {channel_id, plat_name}, specification {route, stream_filters,
        metadata {label}?}}` -> `{channel_id}`; the route and filters are replaced whole. BadRequest when the channel
        has no route or belongs to another plat_name."""
        operator = dr.operator(body)
        cond = _condition(body)
        plat = _plat(cond)
        cid = v.integer(cond, "channel_id", where="condition.", minimum=1, maximum=MAX_CHANNEL_ID)
        spec = v.obj(body, "specification")
        filters = dr.stream_filters(spec.get("stream_filters"), "specification.stream_filters")
        store = await self._store()
        entries = dr.route_entries(spec.get("route"), filters, await store.all(STREAMTO_DIR), "specification.route")
        doc, version = await self._route(store, cid, plat)
        md = doc["metadata"]
        if "label" in (spec.get("metadata") or {}):
            md = {**md, "label": dr.label(spec["metadata"], "specification.metadata.")}
        await store.set(ROUTE_DIR, cid, {**doc, "metadata": md, "route": entries, "stream_filters": filters,
                                         "operator": operator, "updated_ms": now_ms()}, version)
        return {"channel_id": cid}

    async def delete_route(self, body: dict, _req):
        """delete_route: `{operation, condition {channel_id, plat_name}}` -> `{channel_id}`. BadRequest when the
        channel has no route or belongs to another plat_name."""
        dr.operator(body)
        cond = _condition(body)
        plat = _plat(cond)
        cid = v.integer(cond, "channel_id", where="condition.", minimum=1, maximum=MAX_CHANNEL_ID)
        store = await self._store()
        _doc, version = await self._route(store, cid, plat)
        await store.delete(ROUTE_DIR, cid, version)
        return {"channel_id": cid}

    async def query_route(self, body: dict, _req):
        """query_route: `{condition {plat_name, channel_id?, label?}}` -> `[{metadata, route, stream_filters,
        operator, updated_ms}]` sorted by channel_id."""
        cond = _condition(body)
        plat = _plat(cond)
        cid = v.integer(cond, "channel_id", where="condition.", required=False, default=None, minimum=1,
                        maximum=MAX_CHANNEL_ID)
        wanted = dr.label(cond, "condition.")
        store = await self._store()
        if cid is not None:
            found = await store.get(ROUTE_DIR, cid)
            docs = {cid: found[0]} if found else {}
        else:
            docs = await store.all(ROUTE_DIR)
        out = []
        for c in sorted(docs):
            doc = docs[c]
            if doc["metadata"]["plat_name"] != plat or not dr.labels_match(doc["metadata"].get("label", {}), wanted):
                continue
            out.append({"metadata": doc["metadata"], "route": doc["route"], "stream_filters": doc["stream_filters"],
                        "operator": doc.get("operator", ""), "updated_ms": doc.get("updated_ms", 0)})
        return out

    async def _route(self, store: RouteStore, cid: int, plat: str) -> tuple[dict, int]:
        found = await store.get(ROUTE_DIR, cid)
        if found is None:
            raise BadRequest(f"'condition.channel_id' {cid} has no route")
        doc, version = found
        if doc["metadata"]["plat_name"] != plat:
            raise BadRequest(f"'condition.plat_name' {plat!r} is not the platform of channel {cid}")
        return doc, version

    # ---- dispatch_message ---------------------------------------------------------------------------

    async def dispatch_message(self, body: dict, _req):
        """cluster/dispatch_message (spec §4): `{slot_id, token?, message_id, agent_id_list, content (str, at most 8
        MiB)}` -> `{results: [{bk_agent_id, code, message}] (failures only), time (s)}`. The slot must be registered
        in ZooKeeper config/message_slots with a callback_url (BadRequest otherwise) and its token must match when it
        has one (Unauthorized). Agents never seen are reported with 1011003, offline ones with 117; the rest get a
        PluginMessage through the task servers holding them."""
        slot_raw = body.get("slot_id")
        if isinstance(slot_raw, bool) or not isinstance(slot_raw, (str, int)) or slot_raw == "":
            raise BadRequest("'slot_id' is required (a string or an integer)")
        slot_id = str(slot_raw)
        message_id = v.string(body, "message_id", max_len=256)
        token = v.string(body, "token", required=False, max_len=1024)
        content = body.get("content")
        if not isinstance(content, str):
            raise BadRequest("'content' is required and must be a string")
        raw = content.encode()
        if len(raw) > MAX_CONTENT:
            raise BadRequest(f"'content' is larger than {MAX_CONTENT} bytes")
        ids = v.agent_ids(body, max_len=self.max_hosts)
        slots = await self.discovery.watch_config(MESSAGE_SLOTS) or {}
        slot = slots.get(slot_id) if isinstance(slots, dict) else None
        if not isinstance(slot, dict) or not slot.get("callback_url"):
            raise BadRequest(f"'slot_id' {slot_id} has no callback registered (ZooKeeper config/{MESSAGE_SLOTS})")
        if slot.get("token") and not hmac.compare_digest(str(slot["token"]).encode(), token.encode()):
            raise Unauthorized(f"'token' does not match slot {slot_id}")
        records = await self.view.by_ids(ids, SESSION_FIELDS)
        at = now_ms()
        results = []
        by_node: dict[str, list[str]] = defaultdict(list)
        requested: dict[str, str] = {}
        for a in dict.fromkeys(ids):
            rec = records.get(a)
            if rec is None:
                results.append({"bk_agent_id": a, "code": ApiCode.AGENT_NOT_FOUND, "message": "agent not found"})
            elif not rec.alive(at):
                results.append({"bk_agent_id": a, "code": ErrorCode.AGENT_OFFLINE, "message": "agent is offline"})
            else:
                by_node[rec.node].append(rec.agent_id)
                requested[rec.agent_id] = a
        if by_node:
            frame = apb.ServerFrame(plugin_message=dpb.PluginMessage(
                message_id=message_id, slot_id=slot_id, content=raw,
                plugin_name=str(slot.get("plugin_name", "") or ""))).SerializeToString()
            for aid, code, msg in await self.servers.dispatch(frame, by_node):
                results.append({"bk_agent_id": requested.get(aid, aid), "code": code, "message": msg})
        return {"results": results, "time": int(time.time())}

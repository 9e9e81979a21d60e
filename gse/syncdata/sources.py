"""Where host identities come from: the CMDB (its resource-watch API) or files.

A source runs while syncdata leads and hands what it learns to `sink.apply(identities, removed)` (the
pusher, gse/syncdata/push.py), which writes only what changed.

- `CmdbSource` keeps a model of the CMDB's hosts and their topology relations. On start it reads every host
  and relation (list_hosts_without_biz, find_host_biz_relations), then follows the `host` and
  `host_relation` resources with resource_watch from the cursors kept in Redis (so a new leader loses no
  event; without one, from the moment the read began). Every event re-renders the identity of the host it
  touches. A cursor the CMDB no longer keeps starts the read over. Every `full_sync_s` the whole read is done
  again, healing anything a missed event left behind.
- `FileSource` is for sites without a CMDB: a JSON file holding a list of identity documents (or
  `{"hosts": [...]}`), or a directory whose every `*.json` file holds one. Polled every `poll_s` by size and
  mtime; a file that does not parse is logged and its previous content kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from gse.common import dbclient as db
from gse.common.errors import Unavailable
from gse.common.records.hostid import SyncCursor

from .cmdb import CURSOR_GONE, CmdbClient, CmdbError
from .identity import Identity, IdentityError, make, render

log = logging.getLogger("gse.syncdata.sources")

HOST_FIELDS = ["bk_host_id", "bk_cloud_id", "bk_host_innerip", "bk_os_type", "bk_supplier_account", "bk_agent_id"]
RESOURCES = ("host", "host_relation")


class CmdbSource:
    """Host identities from the CMDB (see the module): a full read, then resource_watch on `host` and `host_relation`
    from the cursors kept in Redis, every change rendered and handed to the pusher."""
    name = "cmdb"

    def __init__(self, client: CmdbClient, dbc: db.DbClient, full_sync_s: float = 3600.0, hold_s: float = 25.0):
        self.client = client
        self.db = dbc
        self.full_sync_s = full_sync_s
        self.hold_s = hold_s
        self.hosts: dict[int, dict] = {}
        self.relations: dict[int, dict[int, dict]] = {}     # host id -> module id -> relation
        self.refs: dict[int, str] = {}                      # host id -> the agent its identity went to
        self.stats = {"full_syncs": 0, "events": 0, "hosts": 0}

    async def run(self, sink) -> None:
        """While leading, for ever: read every host and relation, then follow both watches for `full_sync_s` seconds,
        and start over (at once when the CMDB no longer keeps a cursor). A CMDB error other than a lost cursor is
        raised (the leadership loop starts the source again)."""
        while True:
            started = int(time.time())
            cursors = await self._cursors()
            await self._full(sink)
            watchers = [asyncio.ensure_future(self._watch(sink, r, cursors.get(r, ""), started)) for r in RESOURCES]
            done, pending = await asyncio.wait(watchers, timeout=self.full_sync_s,
                                               return_when=asyncio.FIRST_EXCEPTION)
            for t in pending:
                t.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            for t in done:
                if not t.cancelled() and isinstance(t.exception(), _CursorGone):
                    log.warning("the CMDB no longer keeps our cursor; reading every host again",
                                extra={"resource": t.exception().args[0]})
                elif not t.cancelled() and t.exception() is not None:
                    raise t.exception()

    async def _cursors(self) -> dict[str, str]:
        while True:
            try:
                res = await self.db.execute([SyncCursor.read(f"cmdb:{r}") for r in RESOURCES])
                return {r: SyncCursor.decode(x) for r, x in zip(RESOURCES, res)}
            except Unavailable as exc:
                log.warning("cursors unreadable; retrying", extra={"error": str(exc)})
                await asyncio.sleep(2.0)

    async def _full(self, sink) -> None:
        """Read every host and relation; render them all (the pusher keeps only what changed)."""
        delay = 1.0
        while True:
            try:
                hosts = await self.client.hosts(HOST_FIELDS)
                rels = await self.client.relations([int(h["bk_host_id"]) for h in hosts])
                break
            except (Unavailable, CmdbError, KeyError, ValueError, TypeError) as exc:
                log.warning("reading the CMDB failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)
        self.hosts = {int(h["bk_host_id"]): h for h in hosts}
        self.relations = {}
        for r in rels:
            self.relations.setdefault(int(r["bk_host_id"]), {})[int(r["bk_module_id"])] = r
        gone = [self.refs.pop(h) for h in list(self.refs) if h not in self.hosts]
        await sink.apply(self._render(list(self.hosts)), gone)
        self.stats["full_syncs"] += 1
        self.stats["hosts"] = len(self.hosts)
        log.info("CMDB read", extra={"hosts": len(self.hosts), "relations": len(rels)})

    def _render(self, host_ids) -> list[Identity]:
        out = []
        for hid in host_ids:
            host = self.hosts.get(hid)
            if host is None:
                continue
            try:
                ident = render(host, self.relations.get(hid, {}).values())
            except IdentityError as exc:
                log.warning("CMDB host skipped", extra={"bk_host_id": hid, "error": str(exc)})
                continue
            self.refs[hid] = ident.ref
            out.append(ident)
        return out

    async def _watch(self, sink, resource: str, cursor: str, started: int) -> None:
        fields = HOST_FIELDS if resource == "host" else None
        delay = 1.0
        while True:
            try:
                watched, events = await self.client.watch(resource, cursor=cursor, start_from=0 if cursor else started,
                                                          fields=fields, hold_s=self.hold_s)
            except CmdbError as exc:
                if exc.code == CURSOR_GONE:
                    await self.db.execute([SyncCursor.clear(f"cmdb:{resource}")])
                    raise _CursorGone(resource) from None
                log.warning("resource_watch failed; retrying", extra={"resource": resource, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            except Unavailable as exc:
                log.warning("CMDB unreachable; retrying", extra={"resource": resource, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            delay = 1.0
            if not events:
                await asyncio.sleep(0.5)        # (the CMDB always names a cursor; never spin if one does not)
                continue
            last = str(events[-1].get("bk_cursor") or cursor)
            if watched:
                await self._apply(sink, resource, events)
                self.stats["events"] += len(events)
            if last != cursor:
                cursor = last
                try:
                    await self.db.execute([SyncCursor.write(f"cmdb:{resource}", cursor)])
                except Unavailable as exc:
                    log.warning("cursor not kept", extra={"resource": resource, "error": str(exc)})

    async def _apply(self, sink, resource: str, events: list[dict]) -> None:
        touched: set[int] = set()
        gone: list[str] = []
        for ev in events:
            d = ev.get("bk_detail") or {}
            kind = ev.get("bk_event_type")
            try:
                hid = int(d["bk_host_id"])
            except (KeyError, TypeError, ValueError):
                continue
            if resource == "host":
                if kind == "delete":
                    self.hosts.pop(hid, None)
                    self.relations.pop(hid, None)
                    touched.discard(hid)
                    if hid in self.refs:
                        gone.append(self.refs.pop(hid))
                    continue
                self.hosts[hid] = {**self.hosts.get(hid, {}), **d}
            else:
                try:
                    module = int(d["bk_module_id"])
                except (KeyError, TypeError, ValueError):
                    continue
                if kind == "delete":
                    self.relations.get(hid, {}).pop(module, None)
                else:
                    self.relations.setdefault(hid, {})[module] = d
            touched.add(hid)
        # A host whose agent changed (a new bk_agent_id, a new first IP) leaves its old one.
        before = {h: self.refs.get(h) for h in touched}
        identities = self._render(sorted(touched))
        gone += [old for h, old in before.items() if old and self.refs.get(h) != old]
        await sink.apply(identities, gone)


class _CursorGone(Exception):
    pass


class FileSource:
    """Identities from a JSON file or a directory of them (see the module)."""
    name = "file"

    def __init__(self, path: str, poll_s: float = 2.0):
        self.path = Path(path)
        self.poll_s = poll_s
        self.seen: dict[str, tuple[float, int]] = {}        # file -> (mtime, size) as last read
        self.docs: dict[str, list[Identity]] = {}           # file -> what it held
        self.held: set[str] = set()                          # refs the files held at the last change
        self.stats = {"files": 0, "errors": 0}

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.glob("*.json") if p.is_file())
        return [self.path] if self.path.exists() else []

    def _read(self, path: Path) -> list[Identity]:
        doc = json.loads(path.read_bytes())
        items = doc.get("hosts") if isinstance(doc, dict) and "hosts" in doc else doc
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise IdentityError("expected an identity object, a list of them, or {\"hosts\": [...]}")
        return [make(d, self.name) for d in items]

    def scan(self) -> tuple[list[Identity], list[str]] | None:
        """What changed since the last scan: (identities of changed files, refs no file holds any more);
        None when nothing changed."""
        files = {str(p): p for p in self._files()}
        changed = False
        for name in list(self.seen):
            if name not in files:
                del self.seen[name]
                changed = True
        out: list[Identity] = []
        for name, p in files.items():
            try:
                st = p.stat()
            except OSError:
                continue
            sig = (st.st_mtime, st.st_size)
            if self.seen.get(name) == sig:
                continue
            self.seen[name] = sig
            try:
                self.docs[name] = self._read(p)
            except (OSError, ValueError, IdentityError) as exc:
                self.stats["errors"] += 1
                log.warning("identity file not used; keeping what it held before",
                            extra={"path": name, "error": str(exc)})
                continue
            out.extend(self.docs[name])
            changed = True
        if not changed:
            return None
        held = {i.ref for name in self.seen for i in self.docs.get(name, [])}
        for name in list(self.docs):
            if name not in self.seen:
                del self.docs[name]
        before, self.held = self.held, held
        self.stats["files"] = len(self.seen)
        return out, sorted(before - held)

    async def run(self, sink) -> None:
        """While leading, for ever: read every identity file again (a new leader starts from nothing), then poll every
        `poll_s` seconds and hand the pusher what changed and the refs that disappeared."""
        self.seen.clear()           # a new leader re-reads everything (the pusher keeps only what changed)
        while True:
            found = await asyncio.to_thread(self.scan)
            if found is not None:
                await sink.apply(*found)
            await asyncio.sleep(self.poll_s)

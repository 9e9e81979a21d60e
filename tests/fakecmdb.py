"""A CMDB for the tests and benchmarks: the part of bk-cmdb's published API syncdata calls, faithful to its
documentation (the CMDB itself cannot run here).

ESB paths `/api/c/compapi/v2/cc/<name>/` (trailing slash optional), credentials in `X-Bkapi-Authorization`
or the body, answers in the envelope `{result, code, message, permission, request_id, data}`:

- `resource_watch` `{bk_resource, bk_event_types?, bk_fields?, bk_start_from?, bk_cursor?,
  bk_supplier_account}`: events of `host` or `host_relation` after the cursor (or since `bk_start_from`, or
  from now), oldest first, at most 200, `bk_detail` holding the whole resource (for `host` only the
  `bk_fields`, which are required and must not be empty). No event yet: the call is held up to `hold_s`
  (the CMDB holds ~20 s), then `bk_watched` false with one event carrying the latest cursor. A cursor older
  than the retained events (the CMDB keeps ~3 h; `retention_s` here) is answered code 1103007.
- `list_hosts_without_biz` `{page {start, limit <= 500, sort}, fields}` -> `{count, info}`.
- `find_host_biz_relations` `{bk_host_id: [1..500 ids]}` -> `[{bk_biz_id, bk_host_id, bk_module_id,
  bk_set_id, bk_supplier_account}]`.

The test side changes hosts and relations with `set_host`, `delete_host`, `add_relation`, `remove_relation`,
each making the event the CMDB would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid

from aiohttp import web

ESB = "/api/c/compapi/v2/cc"
CURSOR_GONE = 1103007
PARAM_ERROR = 1199006
AUTH_ERROR = 1306000
RESOURCES = ("host", "host_relation")
MAX_EVENTS = 200


class FakeCmdb:
    def __init__(self, app_code: str = "gse", app_secret: str = "cmdb-secret", hold_s: float = 2.0,
                 retention_s: float = 3 * 3600):
        self.app_code, self.app_secret = app_code, app_secret
        self.hold_s = hold_s
        self.retention_s = retention_s
        self.hosts: dict[int, dict] = {}
        self.relations: dict[int, dict[int, dict]] = {}
        self.events: dict[str, list[tuple[int, float, str, dict]]] = {r: [] for r in RESOURCES}   # (seq, t, type, detail)
        self.seq = 0
        self.epoch = uuid.uuid4().hex[:8]           # a cursor of another CMDB run is not ours
        self.calls: dict[str, int] = {}
        self.bodies: list[tuple[str, dict]] = []    # every call's body, for tests of what was sent
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Condition | None = None
        self.thread: threading.Thread | None = None
        self.url = ""
        self._stop: asyncio.Event | None = None

    # ---- the test side ----------------------------------------------------------------------------

    def _event(self, resource: str, kind: str, detail: dict) -> None:
        self.seq += 1
        self.events[resource].append((self.seq, time.time(), kind, dict(detail)))
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

    async def _notify(self) -> None:
        async with self.wake:
            self.wake.notify_all()

    def set_host(self, host_id: int, **fields) -> None:
        with self.lock:
            created = host_id not in self.hosts
            host = self.hosts.setdefault(host_id, {"bk_host_id": host_id, "bk_cloud_id": 0, "bk_os_type": "1",
                                                   "bk_supplier_account": "0", "bk_host_name": f"host-{host_id}",
                                                   "operator": "admin"})
            host.update(fields)
            self._event("host", "create" if created else "update", host)

    def delete_host(self, host_id: int) -> None:
        with self.lock:
            host = self.hosts.pop(host_id)
            for module in list(self.relations.get(host_id, {})):
                self._event("host_relation", "delete", self.relations[host_id].pop(module))
            self._event("host", "delete", host)

    def add_relation(self, host_id: int, biz: int, set_id: int, module: int) -> None:
        with self.lock:
            rel = {"bk_biz_id": biz, "bk_host_id": host_id, "bk_module_id": module, "bk_set_id": set_id,
                   "bk_supplier_account": "0"}
            self.relations.setdefault(host_id, {})[module] = rel
            self._event("host_relation", "create", rel)

    def remove_relation(self, host_id: int, module: int) -> None:
        with self.lock:
            self._event("host_relation", "delete", self.relations[host_id].pop(module))

    def expire_events(self) -> None:
        """Drop every event kept so far (as the CMDB does after its retention): every cursor handed out so far
        is answered 1103007 from now on."""
        with self.lock:
            for r in RESOURCES:
                self.events[r] = []
            self.floor = self.seq
            self.generation += 1

    floor = 0                                       # events up to this are no longer kept
    generation = 0                                  # cursors of an older generation are no longer kept
    gone_answers = 0                                # calls answered 1103007

    # ---- serving ----------------------------------------------------------------------------------

    def start(self) -> str:
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="fake-cmdb")
        self.thread.start()
        ready.wait(10)
        return self.url

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.wake = asyncio.Condition()
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_post("/api/c/compapi/v2/cc/{name}", self._dispatch)
            app.router.add_post("/api/c/compapi/v2/cc/{name}/", self._dispatch)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            ready.set()
            await self._stop.wait()
            await runner.cleanup()
        asyncio.run(main())

    @staticmethod
    def _reply(data=None, code: int = 0, message: str = "success") -> web.Response:
        return web.json_response({"result": code == 0, "code": code, "message": message, "permission": None,
                                  "request_id": uuid.uuid4().hex, "data": data})

    async def _dispatch(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = await request.json()
        except ValueError:
            return self._reply(code=PARAM_ERROR, message="the body is not JSON")
        if not isinstance(body, dict):
            return self._reply(code=PARAM_ERROR, message="the body must be an object")
        auth = {}
        if "X-Bkapi-Authorization" in request.headers:
            try:
                auth = json.loads(request.headers["X-Bkapi-Authorization"])
            except ValueError:
                auth = {}
        else:
            auth = body
        if auth.get("bk_app_code") != self.app_code or auth.get("bk_app_secret") != self.app_secret:
            return self._reply(code=AUTH_ERROR, message="app code or app secret is not correct")
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.bodies.append((name, body))
        handler = {"resource_watch": self._watch, "list_hosts_without_biz": self._list_hosts,
                   "find_host_biz_relations": self._relations}.get(name)
        if handler is None:
            return web.json_response({"result": False, "code": 1306404, "message": f"no api {name}"}, status=404)
        return await handler(body)

    def _cursor(self, resource: str, seq: int) -> str:
        return base64.b64encode(f"{self.epoch}.{self.generation}\r{resource}\r{seq}".encode()).decode()

    def _parse_cursor(self, resource: str, cursor: str) -> int | None:
        try:
            epoch, res, seq = base64.b64decode(cursor.encode(), validate=True).decode().split("\r")
            if epoch != f"{self.epoch}.{self.generation}" or res != resource:
                return None
            return int(seq)
        except (ValueError, UnicodeDecodeError):
            return None

    async def _watch(self, body: dict) -> web.Response:
        resource = body.get("bk_resource")
        if resource not in RESOURCES:
            return self._reply(code=PARAM_ERROR, message=f"bk_resource {resource!r} is not supported here")
        fields = body.get("bk_fields")
        if resource == "host" and (not isinstance(fields, list) or not fields):
            return self._reply(code=PARAM_ERROR, message="bk_fields is required for host and must not be empty")
        types = body.get("bk_event_types") or ["create", "update", "delete"]
        cursor = body.get("bk_cursor") or ""
        with self.lock:
            generation = self.generation
            if cursor:
                after = self._parse_cursor(resource, cursor)
                if after is None:
                    self.gone_answers += 1
                    return self._reply(code=CURSOR_GONE, message="event chain node not exist")
            elif body.get("bk_start_from"):
                start = float(body["bk_start_from"])
                earlier = [e[0] for e in self.events[resource] if e[1] < start]
                after = max(earlier) if earlier else self.floor
            else:
                after = self.seq
        deadline = time.monotonic() + self.hold_s
        while True:
            with self.lock:
                if self.generation != generation:       # the events this call stood on were dropped
                    self.gone_answers += 1
                    return self._reply(code=CURSOR_GONE, message="event chain node not exist")
                found = [e for e in self.events[resource] if e[0] > after and e[2] in types][:MAX_EVENTS]
                head = self.seq
            if found or time.monotonic() >= deadline:
                break
            async with self.wake:
                try:
                    await asyncio.wait_for(self.wake.wait(), max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        if not found:
            return self._reply({"bk_watched": False, "bk_events": [{
                "bk_cursor": self._cursor(resource, head), "bk_resource": resource, "bk_event_type": "",
                "bk_detail": None}]})
        events = []
        for seq, _t, kind, detail in found:
            if resource == "host":
                detail = {k: detail.get(k) for k in fields}
            events.append({"bk_cursor": self._cursor(resource, seq), "bk_resource": resource,
                           "bk_event_type": kind, "bk_detail": detail})
        return self._reply({"bk_watched": True, "bk_events": events})

    async def _list_hosts(self, body: dict) -> web.Response:
        page = body.get("page")
        if not isinstance(page, dict):
            return self._reply(code=PARAM_ERROR, message="page is required")
        start, limit = int(page.get("start", 0)), int(page.get("limit", 0))
        if not 0 < limit <= 500:
            return self._reply(code=PARAM_ERROR, message="page.limit must be 1-500")
        fields = body.get("fields") or []
        with self.lock:
            hosts = [self.hosts[h] for h in sorted(self.hosts)]
            info = [{k: h.get(k) for k in fields} if fields else dict(h) for h in hosts[start:start + limit]]
        return self._reply({"count": len(hosts), "info": info})

    async def _relations(self, body: dict) -> web.Response:
        ids = body.get("bk_host_id")
        if not isinstance(ids, list) or not ids or len(ids) > 500:
            return self._reply(code=PARAM_ERROR, message="bk_host_id must hold 1-500 host ids")
        with self.lock:
            out = [dict(r) for h in ids for r in self.relations.get(int(h), {}).values()]
        return self._reply(out)

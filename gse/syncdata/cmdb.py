"""The CMDB's published API as syncdata calls it (bk-cmdb, ESB v2 paths `/api/c/compapi/v2/cc/<name>/`).

- `resource_watch` `{bk_resource, bk_event_types?, bk_fields?, bk_cursor? | bk_start_from?,
  bk_supplier_account}` -> `data {bk_watched, bk_events: [{bk_cursor, bk_resource, bk_event_type, bk_detail}]}`:
  events after the cursor, oldest first (at most 200); when there are none (the CMDB holds the call up to
  ~20 s first), `bk_watched` is false and `bk_events[0].bk_cursor` is the cursor to go on from. A cursor the
  CMDB no longer keeps (it keeps about 3 hours) is answered with code 1103007: start over from now, after a
  full read.
- `list_hosts_without_biz` `{page {start, limit <= 500, sort}, fields}` -> `data {count, info: [host]}`.
- `find_host_biz_relations` `{bk_host_id: [ids <= 500]}` -> `data: [{bk_biz_id, bk_host_id, bk_module_id,
  bk_set_id, bk_supplier_account}]`.

Auth as every BlueKing app: `X-Bkapi-Authorization: {"bk_app_code", "bk_app_secret", "bk_username"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from gse.common.errors import Unavailable

log = logging.getLogger("gse.syncdata.cmdb")

ESB = "/api/c/compapi/v2/cc"
CURSOR_GONE = 1103007          # CCErrEventChainNodeNotExist
PAGE = 500                     # what the CMDB allows per page / per relation query


class CmdbError(Exception):
    """The CMDB answered with a non-zero code."""

    def __init__(self, code: int, message: str):
        super().__init__(f"CMDB code {code}: {message}")
        self.code = code


class CmdbClient:
    """Calls of one CMDB (`url` is its ESB or API gateway base, e.g. http://paas.example.com)."""

    def __init__(self, url: str, app_code: str, app_secret: str, username: str = "admin",
                 supplier_account: str = "0", timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.supplier_account = supplier_account
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json",
                        "X-Bkapi-Authorization": json.dumps({"bk_app_code": app_code, "bk_app_secret": app_secret,
                                                             "bk_username": username})}
        self._session: aiohttp.ClientSession | None = None

    async def call(self, name: str, body: dict, timeout_s: float | None = None):
        """POST `body` to the CMDB's ESB API `name` (`/api/c/compapi/v2/cc/<name>/`) and return the envelope's `data`.
        Raises Unavailable when the CMDB cannot be reached, times out (`timeout_s`, default the client's) or does not
        answer an envelope, and CmdbError(code) when it answers a non-zero code or result false."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(f"{self.url}{ESB}/{name}/", json=body, headers=self.headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)) as r:
                payload = await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise Unavailable(f"CMDB {name}: {exc!r}") from None
        if not isinstance(payload, dict):
            raise Unavailable(f"CMDB {name}: not an envelope")
        code = int(payload.get("code") or 0)
        if code != 0 or payload.get("result") is False:
            raise CmdbError(code, str(payload.get("message", "")))
        return payload.get("data")

    async def watch(self, resource: str, cursor: str = "", start_from: int = 0, fields: list[str] | None = None,
                    hold_s: float = 25.0) -> tuple[bool, list[dict]]:
        """One resource_watch call: (watched, events)."""
        body: dict = {"bk_resource": resource, "bk_supplier_account": self.supplier_account,
                      "bk_event_types": ["create", "update", "delete"]}
        if fields:
            body["bk_fields"] = fields
        if cursor:
            body["bk_cursor"] = cursor
        elif start_from:
            body["bk_start_from"] = start_from
        data = await self.call("resource_watch", body, timeout_s=hold_s + self.timeout_s)
        data = data or {}
        return bool(data.get("bk_watched")), list(data.get("bk_events") or [])

    async def hosts(self, fields: list[str]) -> list[dict]:
        """Every host (paged)."""
        out: list[dict] = []
        start = 0
        while True:
            data = await self.call("list_hosts_without_biz", {
                "page": {"start": start, "limit": PAGE, "sort": "bk_host_id"}, "fields": fields,
                "bk_supplier_account": self.supplier_account})
            info = list((data or {}).get("info") or [])
            out.extend(info)
            start += PAGE
            if not info or start >= int((data or {}).get("count") or 0):
                return out

    async def relations(self, host_ids: list[int]) -> list[dict]:
        """The topology relations of `host_ids` (in calls of 500)."""
        out: list[dict] = []
        for i in range(0, len(host_ids), PAGE):
            data = await self.call("find_host_biz_relations", {"bk_host_id": host_ids[i:i + PAGE],
                                                               "bk_supplier_account": self.supplier_account})
            out.extend(data or [])
        return out

    async def close(self) -> None:
        """Close the HTTP session (idempotent; the next call opens another)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

"""The HTTP API (v1 ESB and v2): envelope, auth, routing; endpoint modules register their handlers here.

Every answer is the envelope `{result, code, message, data, request_id}`. Bad input is code 1000400 with a
message naming the field; missing or wrong credentials HTTP 401 with code 1000401; a dependency that is
down 503 with 1000503; nothing ever answers with a traceback.

Auth is decided before the body is read beyond a small bound: credentials in the X-Bkapi-Authorization
header are checked before any of the body is read; without it (the legacy form: `bk_app_code` and
`bk_app_secret` in the body) only `max_auth_body` bytes are read and parsed to find them. Secrets are
compared in constant time (SHA-256 digests with hmac.compare_digest, the same work for an unknown app).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import Counter, Histogram

from gse.common.errors import ApiCode, BadRequest, GseError, NotFound, Unauthorized
from gse.common.logs import set_trace

from .bodies import BodyParser

log = logging.getLogger("gse.apiserver")

REQUESTS = Counter("gse_api_requests_total", "API requests", ["endpoint", "code"])
LATENCY = Histogram("gse_api_request_seconds", "API request time", ["endpoint"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

Handler = Callable[[dict, "Request"], Awaitable[object]]


class Reply:
    """A handler result with a non-zero envelope code and data, e.g. 1011003 'none of the agents was found'."""

    def __init__(self, data, code: int, message: str):
        self.data, self.code, self.message = data, code, message


DEFAULT_TENANT = "default"


class Request:
    """What a handler knows about the call besides its body. `tenant_id` is the `X-Bk-Tenant-Id` header the
    BlueKing API gateway and its clients send (bk-job, bk-cmdb): "default" when absent."""

    def __init__(self, app_code: str, username: str, request_id: str, path: str, tenant_id: str = DEFAULT_TENANT):
        self.app_code, self.username, self.request_id, self.path = app_code, username, request_id, path
        self.tenant_id = tenant_id


_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What the BlueKing API gateway puts before a resource path: `/api/bk-gse/<stage>` when the gateway is reached
# through the shared host (bk-nodeman's BKAPP_BK_GSE_APIGATEWAY, bk-gse-sdk's base URL), `/<stage>` when
# through the gateway's own host (`/prod/api/v2/...`). Stripped before routing, for v1 and v2 paths alike.
_GATEWAY_PREFIX = re.compile(r"^(?:/api/bk-gse/[A-Za-z0-9][\w-]{0,31}|/[A-Za-z0-9][\w-]{0,31})(?=/api/)")


def route_path(path: str) -> str:
    """The routing key of a request path: trailing slashes and an API-gateway stage prefix removed."""
    path = path.rstrip("/")
    return _GATEWAY_PREFIX.sub("", path, count=1)


def tenant_of(headers) -> str:
    """The caller's tenant (`X-Bk-Tenant-Id`); BadRequest for a value that is not a tenant id."""
    value = headers.get("X-Bk-Tenant-Id")
    if value is None or value == "":
        return DEFAULT_TENANT
    if not _TENANT.fullmatch(value):
        raise BadRequest("header X-Bk-Tenant-Id is not a tenant id (letters, digits, '_', '.', '-'; at most 64)")
    return value


def envelope(code: int, message: str, data, request_id: str) -> dict:
    """The answer envelope of spec section 1: `{result, code, message, data, request_id}`, `result` true only for code
    0."""
    return {"result": code == ApiCode.OK, "code": code, "message": message, "data": data, "request_id": request_id}


class BodyTooLarge(Exception):
    """The request body is over the limit being read with; the reader stops at the limit (1000400, or 1000401 when the
    credentials were to be found in that body)."""
    pass


_UNKNOWN_APP = hashlib.sha256(b"no such app").digest()


def secret_matches(expected: str | None, given: str) -> bool:
    """Constant time in the secret's content and length, and the same work when the app is unknown."""
    want = hashlib.sha256(expected.encode()).digest() if expected is not None else _UNKNOWN_APP
    ok = hmac.compare_digest(want, hashlib.sha256(given.encode()).digest())
    return ok and expected is not None


class Api:
    """The HTTP API as one aiohttp catch-all handler: a route table by path (without trailing slash or gateway prefix),
    credential checks against `apps()` (app code -> secret, read per request so changes apply live), body limits in
    bytes (`max_body`, and `max_auth_body` for a body that carries its own credentials), and the envelope."""
    def __init__(self, apps: Callable[[], dict[str, str]], max_body: int = 64 * 1024 * 1024,
                 max_auth_body: int = 1024 * 1024):
        self.apps = apps
        self.routes: dict[str, tuple[str, Handler]] = {}
        self.max_body = max_body
        self.max_auth_body = min(max_auth_body, max_body)
        self.bodies = BodyParser()

    def route(self, path: str, handler: Handler, name: str | None = None) -> None:
        """Serve `handler` at `path` (with and without a trailing slash); `name` labels its metrics and logs (default:
        the last path segment)."""
        self.routes[path.rstrip("/")] = (name or path.rstrip("/").rsplit("/", 1)[-1], handler)

    def make_app(self) -> web.Application:
        """The aiohttp application: every method and path goes to the dispatcher, which answers unknown paths with the
        envelope (1000404) rather than aiohttp's own page."""
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    @staticmethod
    def _header_creds(request: web.Request) -> dict | None:
        header = request.headers.get("X-Bkapi-Authorization")
        if not header:
            return None
        try:
            creds = json.loads(header)
        except (ValueError, RecursionError):
            raise Unauthorized("X-Bkapi-Authorization is not valid JSON") from None
        if not isinstance(creds, dict):
            raise Unauthorized("X-Bkapi-Authorization must be a JSON object")
        return creds

    def _check(self, creds: dict) -> str:
        """The app code of valid credentials; Unauthorized otherwise."""
        code, secret = creds.get("bk_app_code"), creds.get("bk_app_secret")
        if not isinstance(code, str) or not isinstance(secret, str) or not code:
            raise Unauthorized("bk_app_code and bk_app_secret are required (X-Bkapi-Authorization header or body)")
        if not secret_matches(self.apps().get(code), secret):
            raise Unauthorized(f"app '{code}' is unknown or its secret is wrong")
        return code

    async def _authed_body(self, request: web.Request) -> tuple[dict, str, str]:
        """(body, app code, username): header credentials are checked before the body is read; body
        credentials are looked for only within max_auth_body bytes."""
        creds = self._header_creds(request)
        if creds is not None:
            code = self._check(creds)
            body = await self._body(request, self.max_body)
        else:
            try:
                body = await self._body(request, self.max_auth_body)
            except BodyTooLarge:
                raise Unauthorized(f"a request body over {self.max_auth_body} bytes needs its credentials in the "
                                   f"X-Bkapi-Authorization header") from None
            except GseError:        # not JSON: there are no body credentials either
                body = {}
            creds = body
            code = self._check(creds)
        user = creds.get("bk_username") or body.get("bk_username") or ""
        return body, code, user if isinstance(user, str) else ""

    async def _dispatch(self, request: web.Request) -> web.Response:
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        path = request.path.rstrip("/")
        entry = self.routes.get(path)
        if entry is None:
            path = route_path(path)
            entry = self.routes.get(path)
        name = entry[0] if entry else "unknown"
        t0 = time.perf_counter()
        status, code = 200, ApiCode.OK
        set_trace(request_id=request_id)     # this request's task: every line it logs names the request
        try:
            if entry is None:
                raise NotFound(f"no such endpoint: {request.path}")
            if request.method not in ("POST", "GET"):
                raise BadRequest(f"method {request.method} is not allowed; use POST")
            tenant = tenant_of(request.headers)
            body, app_code, user = await self._authed_body(request)
            data = await entry[1](body, Request(app_code, user, request_id, path, tenant))
            if isinstance(data, Reply):
                code = data.code
                payload = envelope(data.code, data.message, data.data, request_id)
            else:
                payload = envelope(ApiCode.OK, "success", data, request_id)
        except GseError as exc:
            code, status = exc.code, exc.http_status
            payload = envelope(exc.code, exc.message, None, request_id)
        except BodyTooLarge:
            code = ApiCode.BAD_REQUEST
            payload = envelope(code, f"request body larger than {self.max_body} bytes", None, request_id)
        except Exception:  # noqa: BLE001 - logged here, never shown to the caller
            log.exception("endpoint failed", extra={"endpoint": name, "request_id": request_id})
            code, status = ApiCode.INTERNAL, 500
            payload = envelope(code, f"internal error; see the server log for request {request_id}", None,
                               request_id)
        LATENCY.labels(name).observe(time.perf_counter() - t0)
        REQUESTS.labels(name, str(code)).inc()
        return web.json_response(payload, status=status, dumps=_dumps)

    @staticmethod
    async def _read(request: web.Request, limit: int) -> bytes:
        """The body, at most `limit` bytes (BodyTooLarge beyond: nothing more is read)."""
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge()
        chunks, n = [], 0
        while True:
            chunk = await request.content.read(256 * 1024)
            if not chunk:
                return b"".join(chunks)
            n += len(chunk)
            if n > limit:
                raise BodyTooLarge()
            chunks.append(chunk)

    async def _body(self, request: web.Request, limit: int) -> dict:
        return await self.bodies.parse(await self._read(request, limit))


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

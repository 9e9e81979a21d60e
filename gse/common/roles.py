"""Who may call what: the role every certificate carries, and the one place every service checks it.

Where the role is: the certificate's subjectAltName carries URIs (gse/common/tls.py writes them)
    gse://role/<role>            server, api, agent, proxy or operator
    gse://agent/<bk_agent_id>    an agent certificate made for one agent (enrolled, or issued with --agent-id)
    gse://area/<bk_cloud_id>     a proxy certificate: the cloud area the proxy serves
A certificate without a role URI (one another tool made, say) has role "" and is refused everywhere.

What each role reaches is one table, ACCESS, keyed by gRPC method ("/package.Service/Method") or by a whole
service ("/package.Service/"); a method in no entry is refused (default deny). Every gRPC server gets it
through `RoleInterceptor` (gse/common/rpc.py installs it); the agent link (gse/common/framelink.py) is
checked with `refusal(identity, AGENT_LINK, deny)` at the hello. Handlers never check roles themselves.

Proxies (spec section 12) speak for other peers, so what they may claim is decided here too:
`proxy_link_refusal` (a proxy's upstream link: role proxy, a certificate naming the area it says it serves)
and `relay_claim_refusal` (an agent, or a proxy further down, claimed through a proxy: only of the area of
the proxy holding its link, or of an area cascaded behind it). The task server and the proxies check relayed
hellos with them, the data server relayed batches.

Revocation: `DenyList` (ZooKeeper `<root>/config/revoked`, applied live) names agent ids and certificate
serials; a peer it names is refused by the same check, whatever its role.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

from .lazymetrics import Counter

log = logging.getLogger("gse.roles")

SERVER = "server"        # every server daemon (they also dial each other with it)
API = "api"              # the API server as a client of dbproxy and the task servers
AGENT = "agent"          # an agent on a managed host
PROXY = "proxy"          # the cloud-area proxy: relays agents' links, data and files
OPERATOR = "operator"    # operator tools
ROLES = (SERVER, API, AGENT, PROXY, OPERATOR)

ROLE_URI = "gse://role/"
AGENT_URI = "gse://agent/"
AREA_URI = "gse://area/"
NO_AREA = -1

ANY = frozenset(ROLES)
AGENT_LINK = frozenset({AGENT, PROXY})     # who may hold a link on the task server's agent port

# The one access table. Keys: a method, or a service prefix ending in "/" (a method entry wins).
ACCESS: Mapping[str, frozenset] = {
    # Redis, through dbproxy: only the cluster's own daemons and the API server.
    "/gse.pb.DbProxy/": frozenset({SERVER, API}),
    # The task servers' internal task API (dispatch, terminate, transfers): the API server and peers.
    "/gse.pb.TaskService/": frozenset({SERVER, API}),
    # File management: a transfer exists only because a task server made it.
    "/gse.pb.FileService/CreateTransfer": frozenset({SERVER}),
    "/gse.pb.FileService/AddTorrents": frozenset({SERVER}),
    "/gse.pb.FileService/EndTransfer": frozenset({SERVER}),
    # What agents need (and a proxy relaying for them): direct-mode file data (token-scoped per transfer)...
    "/gse.pb.FileService/Upload": frozenset({AGENT, PROXY}),
    "/gse.pb.FileService/Fetch": frozenset({AGENT, PROXY}),
    # ... and the data path (servers too: the alarm leader's records, spec section 10).
    "/gse.pb.DataIngest/Stream": frozenset({AGENT, PROXY, SERVER}),
    # procmgr (process registrations and operations): the API server, and peers.
    "/gse.pb.ProcService/": frozenset({SERVER, API}),
    # Health checks answer anyone of the cluster.
    "/grpc.health.v1.Health/": ANY,
}

REFUSED = Counter("gse_role_refused_total", "Calls and links refused for the peer's role or revocation",
                  ["method", "role"])


@dataclass(frozen=True, slots=True)
class Identity:
    """What a peer's certificate says: its role ("" if none), the bk_agent_id it was made for ("" if none),
    its serial (upper-case hex, "" when not known), whether a certificate was shown at all, and for a proxy
    the area (bk_cloud_id) it serves (NO_AREA when the certificate names none)."""
    role: str = ""
    agent_id: str = ""
    serial: str = ""
    certified: bool = True
    area: int = NO_AREA

    @property
    def label(self) -> str:
        """The role as metrics and logs name it: the role, else "none" (a certificate without one) or "no certificate".
        """
        return self.role or ("none" if self.certified else "no certificate")


NO_CERTIFICATE = Identity(certified=False)


def from_uris(uris: Iterable[str], serial: str = "") -> Identity:
    """An Identity from a certificate's subjectAltName URIs. Several role URIs: the certificate is refused
    (role "" ): a certificate names one role."""
    roles, agent_id, areas = [], "", []
    for u in uris:
        if u.startswith(ROLE_URI):
            roles.append(u[len(ROLE_URI):])
        elif u.startswith(AGENT_URI) and not agent_id:
            agent_id = u[len(AGENT_URI):]
        elif u.startswith(AREA_URI):
            areas.append(u[len(AREA_URI):])
    role = roles[0] if len(roles) == 1 and roles[0] in ROLES else ""
    # One area, a plain non-negative number; anything else names none (and a proxy link is then refused).
    area = int(areas[0]) if len(areas) == 1 and areas[0].isdigit() and len(areas[0]) < 10 else NO_AREA
    return Identity(role, agent_id, serial.upper(), area=area)


def from_peercert(cert: dict | None) -> Identity:
    """From Python's `SSLObject.getpeercert()` (the agent link); {} or None: no certificate was shown."""
    if not cert:
        return NO_CERTIFICATE
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return from_uris(uris, cert.get("serialNumber", ""))


def of_certificate(cert) -> Identity:
    """From a `cryptography` certificate (tools, tests, the agent reading its own certificate)."""
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return from_uris(uris, f"{cert.serial_number:X}")


def of_pem_file(path) -> Identity:
    """From a PEM certificate file, read with the ssl module's own decoder (CPython's, used for its
    self-tests), so that an agent learns its id without loading cryptography; cryptography when that decoder
    is not there."""
    import ssl
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is not None:
        try:
            return from_peercert(decode(str(path)))
        except (ssl.SSLError, ValueError):
            pass
    with open(path, "rb") as f:
        return of_pem(f.read())


def of_pem(pem: bytes) -> Identity:
    """From one PEM-encoded certificate; raises ValueError when `pem` is not one."""
    from cryptography import x509
    return of_certificate(x509.load_pem_x509_certificate(pem))


_SERIALS: dict[bytes, str] = {}     # PEM -> serial, for deny lists naming serials (bounded below)


def from_auth_context(ctx: Mapping[str, list]) -> Identity:
    """From a gRPC `context.auth_context()`."""
    uris = ctx.get("peer_uri")
    if uris is None:        # older gRPC cores: URIs only among the SAN entries
        uris = [u for u in ctx.get("x509_subject_alternative_name", ()) if u.startswith(b"gse://")]
    if not ctx.get("x509_pem_cert"):
        return NO_CERTIFICATE
    return from_uris(u.decode("utf-8", "replace") for u in uris)


def serial_of(ctx: Mapping[str, list]) -> str:
    """The peer certificate's serial from a gRPC auth context (parsed once per certificate)."""
    pem = (ctx.get("x509_pem_cert") or [b""])[0]
    s = _SERIALS.get(pem)
    if s is None:
        try:
            s = of_pem(pem).serial
        except ValueError:
            s = ""
        if len(_SERIALS) >= 4096:
            _SERIALS.clear()
        _SERIALS[pem] = s
    return s


class DenyList:
    """Revoked agents and certificates (ZooKeeper `<root>/config/revoked`, applied live).

    Document: `{"agents": {"<bk_agent_id>": {"at": <ms>, "reason": "..."}}, "serials": {"<HEX>": {...}}}`
    (lists of ids or serials are read too). `gse certs revoke` writes it."""

    def __init__(self):
        self.agents: frozenset[str] = frozenset()
        self.serials: frozenset[str] = frozenset()
        self.listeners: list = []       # called with the newly revoked agent ids after every change

    def apply(self, doc) -> None:
        """Discovery callback for the `revoked` config document (None: nothing revoked)."""
        doc = doc if isinstance(doc, dict) else {}
        agents = frozenset(str(a) for a in (doc.get("agents") or ()))
        serials = frozenset(str(s).upper().replace(":", "") for s in (doc.get("serials") or ()))
        added = agents - self.agents
        self.agents, self.serials = agents, serials
        if agents or serials:
            log.info("revocation list applied", extra={"agents": len(agents), "serials": len(serials)})
        for cb in self.listeners:
            cb(added)

    def revoked(self, ident: Identity) -> str:
        """Why `ident` is revoked ("" if it is not)."""
        if ident.agent_id and ident.agent_id in self.agents:
            return f"agent {ident.agent_id} is revoked"
        if ident.serial and ident.serial in self.serials:
            return f"certificate {ident.serial} is revoked"
        return ""


def refusal(ident: Identity, allowed: frozenset, deny: DenyList | None = None, what: str = "this service") -> str:
    """Why a peer with `ident` may not use what `allowed` guards ("" if it may). The one role check."""
    if ident.role not in allowed:
        shown = ident.role or ("no role" if ident.certified else "no certificate")
        return f"{what} requires a certificate of role {' or '.join(sorted(allowed))}; the peer showed {shown}"
    if deny is not None:
        why = deny.revoked(ident)
        if why:
            return why
    return ""


def proxy_link_refusal(ident: Identity, area: int, deny: DenyList | None = None) -> str:
    """Why a peer may not hold an upstream link as the proxy of `area` ("" if it may): it must show a
    certificate of role proxy naming that area (`gse certs issue --role proxy --area N`), not revoked."""
    why = refusal(ident, frozenset({PROXY}), deny, "a proxy's upstream link")
    if why:
        return why
    if ident.area == NO_AREA:
        return "the proxy certificate names no area (issue it with --area)"
    if ident.area != area:
        return f"the proxy says it serves area {area} but its certificate is for area {ident.area}"
    return ""


def relay_claim_refusal(proxy_area: int, claimed_area: int, parents: Mapping[int, int] | None = None,
                        what: str = "the agent") -> str:
    """Why a proxy serving `proxy_area` may not speak for a peer of `claimed_area` ("" if it may). A proxy
    speaks for the agents of its own area; with `parents` (area -> the area it is cascaded behind, as the
    proxies of those areas attached) also for those of areas cascaded behind it, at any depth."""
    if claimed_area == proxy_area:
        return ""
    seen = set()
    area = claimed_area
    while parents is not None and area in parents and area not in seen:
        seen.add(area)
        area = parents[area]
        if area == proxy_area:
            return ""
    return (f"{what} is of area {claimed_area} but its proxy serves area {proxy_area}: agents attach "
            f"through a proxy of their own area")


def allowed_roles(table: Mapping[str, frozenset], method: str) -> frozenset:
    """The roles that may call `method` ("/package.Service/Method"); empty: nobody."""
    roles = table.get(method)
    if roles is None:
        roles = table.get(method[:method.rfind("/") + 1], frozenset())
    return roles


def _interceptor_class():
    """RoleInterceptor, made on first use: gRPC is imported only by processes that serve gRPC (the agent,
    which uses this module for its link's identities, does not carry it)."""
    import grpc

    class RoleInterceptor(grpc.aio.ServerInterceptor):
        """Checks every call's peer certificate against `table` before the handler runs; a refusal is
        PERMISSION_DENIED naming the role required and the role shown. `deny` adds revocation."""

        def __init__(self, table: Mapping[str, frozenset] = ACCESS, deny: DenyList | None = None):
            self.table = table
            self.deny = deny
            self._cache: dict[str, tuple] = {}      # method -> (handler, guarded handler)

        async def intercept_service(self, continuation, details):
            """Wrap the handler of `details.method` in the role check (the wrapped handler is cached per
            method); unknown methods pass through as None."""
            handler = await continuation(details)
            if handler is None:
                return None
            method = details.method
            hit = self._cache.get(method)
            if hit is not None and hit[0] is handler:
                return hit[1]
            guarded = _guard(handler, method, allowed_roles(self.table, method), self)
            self._cache[method] = (handler, guarded)
            return guarded

        async def check(self, context, method: str, allowed: frozenset) -> None:
            """Abort the call with PERMISSION_DENIED (counted, logged with the peer) unless the peer's role is in
            `allowed` and it is not revoked; the certificate serial is read only when the deny list names
            serials."""
            ctx = context.auth_context()
            ident = from_auth_context(ctx)
            deny = self.deny
            if deny is not None and deny.serials and ident.certified:
                ident = Identity(ident.role, ident.agent_id, serial_of(ctx))
            why = refusal(ident, allowed, deny, method)
            if why:
                REFUSED.labels(method, ident.label).inc()
                log.warning("call refused", extra={"method": method, "peer": context.peer(), "reason": why})
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    return RoleInterceptor


def __getattr__(name: str):
    if name == "RoleInterceptor":
        cls = globals()["RoleInterceptor"] = _interceptor_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def peer_identity(context) -> Identity:
    """The calling peer's identity inside a handler (e.g. to compare a named agent with its certificate)."""
    return from_auth_context(context.auth_context())


def _guard(handler, method: str, allowed: frozenset, icpt: "RoleInterceptor"):
    import inspect

    import grpc

    check = icpt.check
    req_stream, resp_stream = handler.request_streaming, handler.response_streaming
    inner = (handler.stream_stream if req_stream else handler.unary_stream) if resp_stream else \
        (handler.stream_unary if req_stream else handler.unary_unary)
    if resp_stream and inspect.isasyncgenfunction(inner):
        async def _behavior(request, context):
            await check(context, method, allowed)
            async for item in inner(request, context):
                yield item
    else:
        async def _behavior(request, context):
            await check(context, method, allowed)
            result = inner(request, context)
            return (await result) if inspect.isawaitable(result) else result
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(req_stream, resp_stream)]
    return make(_behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

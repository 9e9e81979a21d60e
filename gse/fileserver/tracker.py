"""The BitTorrent HTTP tracker of the file server, scoped per transfer.

A transfer is one torrent (info_hash) moving to a known set of members (agents) of one area. Every member gets its
own announce URL carrying a secret token, `http://HOST:PORT/announce?gse_token=<token>`; the token names the
transfer and the member, because libtorrent's peer_id is random and says nothing about who is asking. A peer only
ever learns the peers of its own transfer, and of its own cloud area: every member has an area (a transfer's
default), and the tracker never introduces members of different areas to each other, unless the transfer was
registered as one allowed to cross areas (cross-area penetration, spec section 12). A file that enters an area
does so through the area's proxy, a member of the swarm on each side.

Why a `gse_token` query parameter: libtorrent appends its own parameters to a tracker URL that already has a query
string (with `&`) and always sends its own `key`, and its SSRF mitigation refuses a URL whose query string
pre-bakes any of `info_hash, event, port, left, key, uploaded, downloaded, corrupt, peer_id`, and, for a tracker on
a loopback address, any path that does not start with `/announce` (libtorrent 2.1; 2.0 wants exactly `/announce`).
So the path stays `/announce` and the token rides in a parameter name libtorrent never uses.

Refusals are tracker-style: HTTP 200 with a bencoded `failure reason`.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from aiohttp import web

from gse.common.address import join_host_port
from gse.fileserver import bencode

log = logging.getLogger(__name__)

ANNOUNCE_PATH = "/announce"
TOKEN_PARAM = "gse_token"
DEFAULT_NUMWANT = 50


@dataclass
class PeerStats:
    """What one member last told the tracker about itself."""

    member: str
    ip: str
    port: int
    peer_id: bytes
    uploaded: int = 0
    downloaded: int = 0
    left: int = 0
    completed: bool = False
    last_seen: float = 0.0


@dataclass
class TransferStats:
    """Tracker figures of one transfer: the live peers and the sums of what they reported."""

    transfer_id: str
    area: int
    seeders: int
    leechers: int
    completed: int
    uploaded: int
    downloaded: int
    left: int
    peers: dict[str, PeerStats]


@dataclass
class _Member:
    member: str
    token: str
    address: str | None = None
    area: int = 0


@dataclass
class _Transfer:
    transfer_id: str
    info_hash: bytes
    area: int
    max_peers_returned: int
    cross_area: bool = False
    members: dict[str, _Member] = field(default_factory=dict)
    peers: dict[str, PeerStats] = field(default_factory=dict)  # by member: one live peer per member
    completed: int = 0


class AnnounceRefused(Exception):
    """An announce the tracker will not answer with peers; the message is the bencoded `failure reason`."""


class Tracker:
    """An HTTP BitTorrent tracker whose swarms are the registered transfers, each limited to its members."""

    def __init__(self, *, interval: int = 30, min_interval: int = 5, peer_ttl: float | None = None,
                 public_url: str | None = None):
        if interval <= 0 or min_interval <= 0 or min_interval > interval:
            raise ValueError("need 0 < min_interval <= interval")
        self.interval = interval
        self.min_interval = min_interval
        # A peer that missed about three announces is gone (crashed, or its stop announce was lost).
        self.peer_ttl = peer_ttl if peer_ttl is not None else 3 * interval + 10
        self.public_url = public_url  # the announce base URL handed to members, e.g. http://10.0.0.1:10030/announce
        self.refusals: Counter[str] = Counter()
        self._transfers: dict[str, _Transfer] = {}
        # (token, info_hash) -> (transfer_id, member): a member may hold one token for every torrent of a
        # file transfer (one tracker transfer per torrent), and it is valid only for those info_hashes.
        self._tokens: dict[tuple[str, bytes], tuple[str, str]] = {}
        self._by_hash: dict[bytes, set[str]] = {}  # info_hash -> transfer ids
        self._runner: web.AppRunner | None = None

    # ---- transfers and members -------------------------------------------------------------------------------

    def register_transfer(self, transfer_id: str, info_hash: bytes, area: int, members: Iterable[str],
                          max_peers_returned: int = DEFAULT_NUMWANT,
                          addresses: Mapping[str, str] | None = None,
                          tokens: Mapping[str, str] | None = None, areas: Mapping[str, int] | None = None,
                          cross_area: bool = False) -> dict[str, str]:
        """Opens a transfer to `members`; returns each member's token. `addresses` pins a member's peer IP;
        `areas` gives a member another area than `area` (its swarm's); `cross_area` lets areas meet."""
        if transfer_id in self._transfers:
            raise ValueError(f"transfer {transfer_id} is already registered")
        if not isinstance(info_hash, bytes) or len(info_hash) != 20:
            raise ValueError("info_hash must be 20 bytes")
        if max_peers_returned <= 0:
            raise ValueError("max_peers_returned must be positive")
        self._transfers[transfer_id] = _Transfer(transfer_id, info_hash, area, max_peers_returned, cross_area)
        self._by_hash.setdefault(info_hash, set()).add(transfer_id)
        addresses = addresses or {}
        given = tokens or {}
        areas = areas or {}
        tokens = {m: self.add_member(transfer_id, m, addresses.get(m), given.get(m), areas.get(m)) for m in members}
        log.info("transfer registered", extra={"transfer_id": transfer_id, "info_hash": info_hash.hex(),
                                               "area": area, "members": len(tokens)})
        return tokens

    def unregister_transfer(self, transfer_id: str) -> None:
        """Close a transfer: its tokens stop working and its peers are forgotten at once (nothing when it is not
        registered)."""
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is None:
            return
        for m in transfer.members.values():
            self._tokens.pop((m.token, transfer.info_hash), None)
        ids = self._by_hash.get(transfer.info_hash)
        if ids is not None:
            ids.discard(transfer_id)
            if not ids:
                del self._by_hash[transfer.info_hash]
        log.info("transfer unregistered", extra={"transfer_id": transfer_id})

    def add_member(self, transfer_id: str, member: str, address: str | None = None, token: str | None = None,
                   area: int | None = None) -> str:
        """Admits `member` to the transfer (idempotent) and returns its token (`token` = use this one); `area`:
        its swarm's area (default: the transfer's)."""
        transfer = self._transfer(transfer_id)
        if address is not None:
            ipaddress.ip_address(address)  # a bad pinned address is the caller's error, said now
        existing = transfer.members.get(member)
        if existing is not None:
            existing.address = address if address is not None else existing.address
            return existing.token
        token = token or secrets.token_urlsafe(24)
        transfer.members[member] = _Member(member, token, address, transfer.area if area is None else area)
        self._tokens[(token, transfer.info_hash)] = (transfer_id, member)
        return token

    def remove_member(self, transfer_id: str, member: str) -> None:
        """Take `member` out of a transfer: its token stops working and other members no longer learn of it (nothing
        when either is unknown)."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return
        m = transfer.members.pop(member, None)
        if m is not None:
            self._tokens.pop((m.token, transfer.info_hash), None)
        transfer.peers.pop(member, None)

    def token(self, transfer_id: str, member: str) -> str:
        """The announce token of `member` in the transfer; KeyError naming what is unknown."""
        transfer = self._transfer(transfer_id)
        try:
            return transfer.members[member].token
        except KeyError:
            raise KeyError(f"{member} is not a member of transfer {transfer_id}") from None

    def announce_url(self, transfer_id: str, member: str, base_url: str | None = None) -> str:
        """The tracker URL to put in `member`'s torrent: the announce base plus its token."""
        base = base_url or self.public_url
        if not base:
            raise ValueError("no announce base URL: start() the tracker or pass base_url/public_url")
        return f"{base}?{TOKEN_PARAM}={self.token(transfer_id, member)}"

    def transfer_stats(self, transfer_id: str) -> TransferStats:
        """The swarm of one transfer now (stale peers dropped first): seeders, leechers, completions, the bytes its
        peers reported uploaded, downloaded and left, and each peer's figures; KeyError for an unknown transfer."""
        transfer = self._transfer(transfer_id)
        self._expire(transfer, time.monotonic())
        peers = {k: PeerStats(**vars(p)) for k, p in transfer.peers.items()}
        seeders = sum(1 for p in peers.values() if p.left == 0)
        return TransferStats(transfer_id=transfer_id, area=transfer.area, seeders=seeders,
                             leechers=len(peers) - seeders, completed=transfer.completed,
                             uploaded=sum(p.uploaded for p in peers.values()),
                             downloaded=sum(p.downloaded for p in peers.values()),
                             left=sum(p.left for p in peers.values()), peers=peers)

    def transfers(self) -> list[str]:
        """The ids of the transfers registered now."""
        return list(self._transfers)

    def _transfer(self, transfer_id: str) -> _Transfer:
        try:
            return self._transfers[transfer_id]
        except KeyError:
            raise KeyError(f"no transfer {transfer_id}") from None

    # ---- announce --------------------------------------------------------------------------------------------

    async def handle_announce(self, request: web.Request) -> web.Response:
        """aiohttp handler for `GET /announce`."""
        try:
            params = _parse_query(request.rel_url.raw_query_string)
            body = self.announce(params, request.remote or "")
        except AnnounceRefused as e:
            reason = str(e)
            self.refusals[reason.split(":")[0]] += 1
            log.debug("announce refused", extra={"reason": reason, "remote": request.remote})
            body = {"failure reason": reason}
        return web.Response(body=bencode.encode(body), content_type="text/plain")

    def announce(self, params: Mapping[bytes, bytes], remote_ip: str) -> dict:
        """Answers one announce (query parameters as raw bytes); raises AnnounceRefused."""
        info_hash = params.get(b"info_hash")
        if info_hash is None or len(info_hash) != 20:
            raise AnnounceRefused("invalid info_hash")
        if info_hash not in self._by_hash:
            raise AnnounceRefused("unknown info_hash: no live transfer owns this torrent")
        owner = self._tokens.get((params.get(TOKEN_PARAM.encode(), b"").decode("ascii", "replace"), info_hash))
        if owner is None:
            raise AnnounceRefused("unauthorized: missing or unknown token")
        transfer_id, member_id = owner
        transfer = self._transfers[transfer_id]
        if transfer.info_hash != info_hash:
            raise AnnounceRefused("unauthorized: token is not valid for this torrent")
        peer_id = params.get(b"peer_id", b"")
        port = _int_param(params, b"port")
        if port is None or not 0 < port < 65536:
            raise AnnounceRefused("invalid port")
        member = transfer.members[member_id]
        ip = member.address or _plain_ip(remote_ip)
        if not ip:
            raise AnnounceRefused("cannot tell the peer's address")

        now = time.monotonic()
        event = params.get(b"event", b"").decode("ascii", "replace")
        if event == "stopped":
            transfer.peers.pop(member_id, None)
            return {"interval": self.interval, "min interval": self.min_interval, "peers": b""}

        peer = transfer.peers.get(member_id)
        if peer is None:
            peer = transfer.peers[member_id] = PeerStats(member=member_id, ip=ip, port=port, peer_id=peer_id)
        peer.ip, peer.port, peer.peer_id, peer.last_seen = ip, port, peer_id, now
        for name in ("uploaded", "downloaded", "left"):
            value = _int_param(params, name.encode())
            if value is not None and value >= 0:
                setattr(peer, name, value)
        if event == "completed" and not peer.completed:
            transfer.completed += 1
        if event == "completed" or peer.left == 0:
            peer.completed = True

        self._expire(transfer, now)
        numwant = _int_param(params, b"numwant")
        if numwant is None or numwant < 0:
            numwant = DEFAULT_NUMWANT
        numwant = min(numwant, transfer.max_peers_returned)
        others = [p for k, p in transfer.peers.items() if k != member_id]
        if not transfer.cross_area:
            # Peers of different areas never meet (they could not reach each other, and the file enters an area
            # once, through its proxy), unless the transfer may cross areas.
            others = [p for p in others if transfer.members[p.member].area == member.area]
        if peer.left == 0:  # a seed has no use for other seeds
            others = [p for p in others if p.left != 0]
        chosen = random.sample(others, numwant) if len(others) > numwant else others

        seeders = sum(1 for p in transfer.peers.values() if p.left == 0)
        reply: dict = {"interval": self.interval, "min interval": self.min_interval,
                       "complete": seeders, "incomplete": len(transfer.peers) - seeders}
        if params.get(b"compact", b"1") == b"0":
            reply["peers"] = [{"ip": p.ip, "port": p.port, "peer id": p.peer_id} for p in chosen]
        else:
            v4, v6 = [], []
            for p in chosen:
                addr = ipaddress.ip_address(p.ip)
                (v4 if addr.version == 4 else v6).append(addr.packed + p.port.to_bytes(2, "big"))
            reply["peers"] = b"".join(v4)
            if v6:
                reply["peers6"] = b"".join(v6)
        return reply

    def _expire(self, transfer: _Transfer, now: float) -> None:
        stale = [k for k, p in transfer.peers.items() if now - p.last_seen > self.peer_ttl]
        for k in stale:
            del transfer.peers[k]

    # ---- serving ---------------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application, path: str = ANNOUNCE_PATH) -> None:
        """Mounts the announce handler into an existing aiohttp app (keep the path /announce, see module doc)."""
        app.router.add_get(path, self.handle_announce)

    async def start(self, host: str, port: int) -> int:
        """Serves the tracker on its own aiohttp site; returns the bound port (useful with port 0).

        Unless `public_url` was given, members are told `http://host:port/announce`: give a public_url when host
        is a wildcard address.
        """
        if self._runner is not None:
            raise RuntimeError("tracker already started")
        app = web.Application()
        self.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0][1] if runner.addresses else port
        if self.public_url is None:
            self.public_url = f"http://{join_host_port(host, bound)}{ANNOUNCE_PATH}"
        log.info("tracker listening", extra={"host": host, "port": bound})
        return bound

    async def stop(self) -> None:
        """Stop the tracker's own site if start() made one (idempotent); a tracker mounted with add_routes stops with
        its app."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def _parse_query(raw: str) -> dict[bytes, bytes]:
    """Query parameters as raw bytes: info_hash and peer_id are binary, so no text decoding (and no '+' rule)."""
    params: dict[bytes, bytes] = {}
    for part in raw.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        params.setdefault(unquote_to_bytes(name), unquote_to_bytes(value))
    return params


def _int_param(params: Mapping[bytes, bytes], name: bytes) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise AnnounceRefused(f"invalid {name.decode()}") from None


def _plain_ip(remote: str) -> str:
    """The peer's IP as a plain address (an IPv4-mapped IPv6 address becomes IPv4)."""
    try:
        addr = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


__all__ = ["Tracker", "TransferStats", "PeerStats", "AnnounceRefused", "ANNOUNCE_PATH", "TOKEN_PARAM"]

"""One-time enrollment tokens and the record of enrolled agents, in ZooKeeper.

An agent without a certificate of its own enrolls once with a token a node manager gave it at install
time (gse/taskserver/enroll.py serves it on the agent port). Tokens live where every task server can check
and consume them, and where consuming is atomic: ZooKeeper, which orders every write.

    <root>/enroll/tokens/<sha256 of the token>   JSON {"created_ms", "expires_ms", "agent_id", "note",
                                                       "used_ms", "used_by", "used_from", "used_key"}
    <root>/enroll/agents/<bk_agent_id>           JSON {"serial", "at_ms", "peer", "token"}  (one per agent)

Only the token's SHA-256 is stored: reading ZooKeeper does not give anyone a token. A token is consumed by
a conditional write (`set` with the version just read): of two task servers presenting one token at the
same moment, exactly one write succeeds, the other is told the token was used. A used token stays (marked)
until it expires, so that its reuse is refused as "used", not "unknown"; except for the agent that used
it asking again with the same key (its answer was lost on the way): it gets its certificate again. A token
may name the agent it is for (`--agent-id`); an id that is already enrolled enrolls again only with a token
naming it (a host reinstalled), never by accident with any token.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

TOKEN_PREFIX = "gse1_"
TOKENS = "enroll/tokens"
AGENTS = "enroll/agents"
MAX_TOKEN_LEN = 256


class EnrollError(Exception):
    """An enrollment refused; `code` is the Refused frame's code, `reason` what the agent is told."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def new_token() -> str:
    """A fresh enrollment token: "gse1_" and 32 random bytes in URL-safe base64 (48 characters in all); shown once
    to the operator, only its hash is stored."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The hex SHA-256 of `token`: the name of its node under `<root>/enroll/tokens`."""
    return hashlib.sha256(token.encode()).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def token_record(ttl_s: float, agent_id: str = "", note: str = "") -> bytes:
    """The JSON bytes of a new, unused token's node: valid for `ttl_s` seconds from now, bound to `agent_id` when given
    ("" = any agent), with the operator's `note`."""
    now = _now_ms()
    return json.dumps({"created_ms": now, "expires_ms": now + int(ttl_s * 1000), "agent_id": agent_id,
                       "note": note, "used_ms": 0, "used_by": "", "used_from": ""}, sort_keys=True).encode()


# ---- operator side (synchronous kazoo: `gse certs token`, the dev tooling) ------------------------------

def make_tokens(zk, root: str, count: int = 1, ttl_s: float = 86400.0, agent_ids: list[str] | None = None,
                note: str = "") -> list[str]:
    """Create tokens in ZooKeeper (one per agent id given, else `count` unbound ones); returns the tokens.
    Written in transactions of 200 nodes."""
    from .records import valid_agent_id
    ids = list(agent_ids or [])
    for a in ids:
        if not valid_agent_id(a):
            raise ValueError(f"bk_agent_id {a!r} is not 1-64 printable characters")
    wanted = ids or [""] * count
    base = f"{root.rstrip('/')}/{TOKENS}"
    zk.ensure_path(base)
    tokens = []
    for i in range(0, len(wanted), 200):
        tx = zk.transaction()
        for agent_id in wanted[i:i + 200]:
            t = new_token()
            tokens.append(t)
            tx.create(f"{base}/{token_hash(t)}", token_record(ttl_s, agent_id, note))
        for r in tx.commit():
            if isinstance(r, Exception):
                raise r
    return tokens


def prune_tokens(zk, root: str) -> int:
    """Delete expired tokens (used or not); returns how many."""
    base = f"{root.rstrip('/')}/{TOKENS}"
    try:
        children = zk.get_children(base)
    except NoNodeError:
        return 0
    now, n = _now_ms(), 0
    for c in children:
        try:
            data, _ = zk.get(f"{base}/{c}")
            if json.loads(data or b"{}").get("expires_ms", 0) < now:
                zk.delete(f"{base}/{c}")
                n += 1
        except (NoNodeError, ValueError):
            continue
    return n


# ---- server side (asyncio over gse.common.discovery.Discovery) ------------------------------------------

class TokenStore:
    """Checks and consumes tokens, records enrolled agents; `discovery` is a started Discovery."""

    def __init__(self, discovery):
        self.d = discovery

    async def check_agent(self, agent_id: str) -> bool:
        """True when `agent_id` is already enrolled."""
        return await self.d.aio(self.d.zk.exists_async(self.d.path(AGENTS, agent_id))) is not None

    async def consume(self, token: str, agent_id: str, peer: str, enrolled: bool, key_id: str = "") -> dict:
        """Consume `token` for `agent_id` (atomically, once in the whole cluster); returns its record.
        `enrolled`: the id already has a certificate (then the token must name it). `key_id`: the SHA-256 of
        the requested public key: the same agent asking again with the same key (its first answer was lost)
        gets the same outcome, anyone else finds the token used. Raises EnrollError."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LEN:
            raise EnrollError("token_unknown", "the enrollment token is not one `gse certs token` made")
        path = self.d.path(TOKENS, token_hash(token))
        try:
            data, stat = await self.d.aio(self.d.zk.get_async(path))
        except NoNodeError:
            raise EnrollError("token_unknown", "the enrollment token is unknown (never made, or pruned)") from None
        try:
            rec = json.loads(data)
        except ValueError:
            raise EnrollError("token_unknown", "the enrollment token's record is unreadable") from None
        now = _now_ms()
        if rec.get("expires_ms", 0) < now:
            raise EnrollError("token_expired", "the enrollment token has expired; make a new one")
        if rec.get("used_ms"):
            if key_id and rec.get("used_by") == agent_id and rec.get("used_key") == key_id:
                return rec          # a retry of the enrollment that used it: only that key's holder can ask
            raise EnrollError("token_used", f"the enrollment token was already used (by agent {rec.get('used_by')})")
        bound = rec.get("agent_id", "")
        if bound and bound != agent_id:
            raise EnrollError("token_agent", f"the enrollment token is for agent {bound}, not {agent_id}")
        if enrolled and bound != agent_id:
            raise EnrollError("enrolled", f"agent {agent_id} is already enrolled; enrolling it again needs a token "
                                          f"made for it (gse certs token --agent-id {agent_id})")
        rec.update(used_ms=now, used_by=agent_id, used_from=peer, used_key=key_id)
        try:
            await self.d.aio(self.d.zk.set_async(path, json.dumps(rec, sort_keys=True).encode(), stat.version))
        except (BadVersionError, NoNodeError):
            raise EnrollError("token_used", "the enrollment token was used at the same moment elsewhere") from None
        return rec

    async def record(self, agent_id: str, serial: str, peer: str, token: str) -> None:
        """Remember that `agent_id` holds the certificate `serial` (replacing an earlier one)."""
        path = self.d.path(AGENTS, agent_id)
        data = json.dumps({"serial": serial, "at_ms": _now_ms(), "peer": peer,
                           "token": token_hash(token)[:12]}, sort_keys=True).encode()
        try:
            await self.d.aio(self.d.zk.create_async(path, data, makepath=True))
        except NodeExistsError:
            await self.d.aio(self.d.zk.set_async(path, data))

"""Who may attach as which agent: the checks of a hello on the agent port.

- The link's certificate must be of role agent or proxy and not revoked (gse/common/roles.py `refusal`,
  the one role check; revocation by agent id or certificate serial).
- A per-agent certificate names its bk_agent_id: a hello naming another id is refused.
- A certificate naming no agent (the original's one certificate on every host) is taken only in
  shared-certificate mode, a cluster switch in ZooKeeper (`<root>/config/agent_auth`:
  `{"shared_certificate": true}`, applied live, off by default). Then anyone holding that certificate may
  claim any id, so a second link claiming an attached agent's id from another address is refused and
  counted, here and on the other task servers (read from the agent's session record); a reconnect from the
  same address replaces the old link.

Refusals are (code, reason): the Refused frame carries both and the task server counts them by code.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from gse.common import roles
from gse.common.address import split_host_port
from gse.common.errors import GseError
from gse.common.records import AgentRecord

log = logging.getLogger("gse.taskserver.identity")

Refusal = tuple[str, str]


def area_refusal(agent_id: str, cloud_id: int, area: int) -> Refusal | None:
    """An agent's own link: it must be of the area this task server serves; agents of other areas attach
    through a proxy of their area (gse/proxy), which relays them (relay_access.py)."""
    if cloud_id == area:
        return None
    return "area", (f"agent {agent_id} says area {cloud_id} but this task server serves area {area}: agents of "
                    f"area {cloud_id} attach through a proxy of that area")


def peer_host(peer: str) -> str:
    """The host of a link's peer name (framelink.peer_name: "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")."""
    _family, _, address = peer.partition(":")
    try:
        return split_host_port(address)[0]
    except ValueError:
        return peer


class AgentIdentity:
    """The hello checks of one task server. `deny` is the cluster's revocation list; `live_nodes()` the
    node ids of the task servers registered now (for the shared-mode check across servers)."""

    def __init__(self, node_id: str, deny: roles.DenyList, db_client=None,
                 live_nodes: Callable[[], object] = lambda: ()):
        self.node_id = node_id
        self.deny = deny
        self.db = db_client
        self.live_nodes = live_nodes
        self.shared = False

    def apply_config(self, doc) -> None:
        """Discovery callback for `<root>/config/agent_auth`."""
        shared = bool(isinstance(doc, dict) and doc.get("shared_certificate") is True)
        if shared != self.shared:
            log.warning("shared-certificate mode %s", "on" if shared else "off")
        self.shared = shared

    def check(self, link, agent_id: str, sessions: dict) -> Refusal | None:
        """The checks that need nothing but this server's state (None: go on)."""
        ident = link.identity
        why = roles.refusal(ident, roles.AGENT_LINK, self.deny, "the agent port")
        if why:
            return ("role" if ident.role not in roles.AGENT_LINK else "revoked"), why
        if ident.agent_id:
            if agent_id != ident.agent_id:
                return "identity", f"the hello names agent {agent_id} but the certificate is agent {ident.agent_id}"
            return None
        if not self.shared:
            return "shared_off", ("this cluster takes only per-agent certificates (enroll with a token from "
                                  "`gse certs token`); shared-certificate mode is off")
        if agent_id in self.deny.agents:
            return "revoked", f"agent {agent_id} is revoked"
        old = sessions.get(agent_id)
        if old is not None and not old.closed and peer_host(old.peer) != peer_host(link.peer):
            return "takeover", (f"agent {agent_id} is attached from another address; a second link claiming it "
                                f"is refused")
        return None

    def needs_remote_check(self, link) -> bool:
        """Shared-certificate links are also checked against the other task servers (an async read)."""
        return not link.identity.agent_id and self.db is not None

    async def check_elsewhere(self, link, agent_id: str) -> Refusal | None:
        """Shared mode: refuse when another live task server holds `agent_id` from another address."""
        names = ("online", "node", "peer", "deadline")
        try:
            (result,) = await self.db.execute([AgentRecord.pick(agent_id, names=names)])
        except GseError as exc:
            log.warning("session record unreadable; taking the hello", extra={"agent_id": agent_id,
                                                                            "error": str(exc)})
            return None
        rec = AgentRecord.decode(result, names)
        if rec is None:
            return None
        live = (rec.online and rec.node and rec.node != self.node_id and rec.node in set(self.live_nodes())
                and rec.deadline > time.time() * 1000)
        if live and peer_host(rec.peer) != peer_host(link.peer):
            return "takeover", (f"agent {agent_id} is attached to task server {rec.node} from another address; "
                                f"a second link claiming it is refused")
        return None

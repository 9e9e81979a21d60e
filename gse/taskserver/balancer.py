"""Balancing agents across task servers by connection count, within an area.

Every task server publishes its load (agents held) in its ZooKeeper node. A hello arriving at a server
that holds clearly more than its least loaded peer is redirected there; a server that holds clearly more
than the average sheds some agents every round (a peer that just joined fills up this way). Redirects
issued since the last load figure of a peer count towards that peer's load, so a burst of hellos does not
all land on the same peer.

The workers of a task server run as several processes (`workers` > 1) share one agent address: sending
an agent to a sibling worker means nothing (the kernel picks the worker of every new connection), so peers
with our own agent address are never redirect or shed targets. Their load still counts in the average a
server sheds down to: every process is balanced to the same share, whichever machine it runs on.
"""

from __future__ import annotations

import logging

log = logging.getLogger("gse.taskserver.balance")


class Balancer:
    """Decides redirects and sheds for one task server from the loads its peers of the same area publish in ZooKeeper;
    a difference counts only when it exceeds `slack` agents and `ratio` of the local load."""

    def __init__(self, node_id: str, area: int, *, slack: int, ratio: float, enabled: bool = True,
                 agent_address: str = ""):
        self.node_id = node_id
        self.area = area
        self.agent_address = agent_address      # ours, shared with our sibling workers
        self.slack = slack
        self.ratio = ratio
        self.enabled = enabled
        self.peers: dict[str, dict] = {}
        self.siblings: dict[str, int] = {}      # node id -> load of the workers sharing our agent address
        self._sent: dict[str, int] = {}     # redirects to a peer since its last load figure

    def on_view(self, view: dict[str, dict]) -> None:
        """ZooKeeper view of the task servers: keep the peers of our area, apart from the sibling workers sharing our
        agent address; a peer whose load figure changed forgets the redirects counted towards it."""
        for node_id, info in view.items():
            old = self.peers.get(node_id)
            if old is None or old.get("load") != info.get("load"):
                self._sent.pop(node_id, None)
        others = {k: v for k, v in view.items() if k != self.node_id and v.get("area", 0) == self.area}
        self.siblings = {k: int(v.get("load", 0)) for k, v in others.items()
                         if self.agent_address and v.get("agent_address") == self.agent_address}
        self.peers = {k: v for k, v in others.items() if k not in self.siblings}

    def _margin(self, load: int) -> float:
        return max(self.slack, load * self.ratio)

    def _estimated(self) -> list[tuple[int, str, str]]:
        return sorted((int(info.get("load", 0)) + self._sent.get(nid, 0), nid, info["agent_address"])
                      for nid, info in self.peers.items() if info.get("agent_address"))

    def redirect_target(self, cloud_id: int, my_load: int) -> str | None:
        """The agent address a new agent of area `cloud_id` should go to instead of us (holding `my_load`): the least
        loaded peer, when it holds clearly fewer agents; None to keep it here (or when balancing is off or the agent
        is of another area)."""
        if not self.enabled or cloud_id != self.area:
            return None
        peers = self._estimated()
        if not peers:
            return None
        load, nid, address = peers[0]
        if load + self._margin(my_load) < my_load:
            self._sent[nid] = self._sent.get(nid, 0) + 1
            return address
        return None

    def shed_plan(self, my_load: int, max_shed: int) -> list[tuple[str, int]]:
        """How many agents to send to which peers this round: [(address, count)]."""
        if not self.enabled:
            return []
        peers = self._estimated()
        if not peers:
            return []
        total = my_load + sum(p[0] for p in peers) + sum(self.siblings.values())
        avg = total / (len(peers) + len(self.siblings) + 1)
        excess = int(my_load - avg - self._margin(my_load) / 2)
        if excess <= 0 or my_load - peers[0][0] <= self._margin(my_load):
            return []
        excess = min(excess, max_shed)
        plan = []
        for load, nid, address in peers:
            room = int(avg - load)
            if room <= 0 or excess <= 0:
                continue
            n = min(room, excess)
            plan.append((address, n))
            self._sent[nid] = self._sent.get(nid, 0) + n
            excess -= n
        return plan

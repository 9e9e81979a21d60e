"""Network namespaces on this machine, for tests and benchmarks that need real separate hosts and links.

Everything made here is named with one prefix and removed by `close()` (also on failure), and by
`cleanup_stale()` for what a killed run left. Addresses are in 198.18.0.0/15 (reserved for benchmarking).

    with Topology("gsetest") as net:            # a server bridge, 198.18.0.1/24 on it in the root namespace
        area = net.add_area(1)                  # a bridge of its own with no root address: not routed anywhere
        proxy = net.add_proxy(1)                # a namespace with a link up (server bridge) and down (area 1)
        host = net.add_host(1)                  # a namespace on area 1's bridge only
        subprocess.run(net.run(host, ["ping", "-c1", proxy.down_ip]))

The root namespace (where the servers run) has an address only on the server bridge, and no namespace
forwards, so a host of an area reaches its proxy (and its area's other hosts) and nothing else: no direct
path to the servers exists. An area cascaded behind area 1 (`add_area(2, parent=1)`) has its proxy's link up
on area 1's bridge. Links can be capped with `tc tbf` in both directions (`rate_mbit`).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

SERVER_IP = "198.18.0.1"


def sh(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command (argv, no shell) and return its CompletedProcess with text output captured; CalledProcessError
    on a non-zero exit when `check`."""
    return subprocess.run(args, check=check, capture_output=True, text=True)


def tbf(rate_mbit: float) -> list[str]:
    """The `tc qdisc` arguments of a token bucket at `rate_mbit` (burst and latency as the file bench uses)."""
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", "256kb", "latency", "50ms"]


def in_namespace(ns: str, cmd: list[str], private_mount: str = "") -> list[str]:
    """The command line that runs `cmd` in namespace `ns`; with `private_mount`, a private tmpfs is mounted at
    that path first (its own mount namespace: several hosts of one machine writing to the same path)."""
    if not private_mount:
        return ["ip", "netns", "exec", ns, *cmd]
    script = f"mount -t tmpfs -o size=1g gsenet {private_mount} && exec \"$@\""
    return ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


@dataclass
class Link:
    """One veth pair: `outer` in the root namespace (on a bridge), `inner` in `ns`."""
    ns: str
    outer: str
    inner: str
    ip: str

    def counters(self) -> tuple[int, int]:
        """(bytes the namespace sent, bytes it received) through this link, read on the root side."""
        def read(name: str) -> int:
            with open(f"/sys/class/net/{self.outer}/statistics/{name}") as f:
                return int(f.read())
        return read("rx_bytes"), read("tx_bytes")


@dataclass
class Node:
    """A namespace: a host of an area, or a proxy (with a link up and a link down)."""
    ns: str
    area: int
    links: dict[str, Link] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        """The node's address in its own area: its link down for a proxy, its one link for a host."""
        return (self.links.get("down") or self.links.get("eth")).ip

    @property
    def up_ip(self) -> str:
        """A proxy's address on its parent area's bridge (KeyError for a host)."""
        return self.links["up"].ip

    @property
    def down_ip(self) -> str:
        """A proxy's address on its own area's bridge (KeyError for a host)."""
        return self.links["down"].ip


class Topology:
    """A server bridge, area bridges, proxies and hosts in namespaces (see the module)."""

    def __init__(self, prefix: str = "gsenet", mtu: int = 1500):
        if not prefix.isalnum() or len(prefix) > 8:
            raise ValueError("prefix: at most 8 letters or digits (interface names are short)")
        self.prefix = prefix
        self.mtu = mtu
        self.bridges: dict[int, str] = {}           # area -> bridge (area 0: the servers' bridge)
        self.parents: dict[int, int] = {}
        self.nodes: list[Node] = []
        self._n = 0
        self._ips: dict[tuple[int, int], int] = {}     # (area, first address of a range) -> last given

    # ---- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> "Topology":
        self.cleanup_stale(self.prefix)
        self._bridge(0)
        sh("ip", "addr", "add", f"{SERVER_IP}/24", "dev", self.bridges[0])
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def cleanup_stale(prefix: str) -> None:
        """Delete every namespace and interface whose name starts with `prefix` (what a killed run left); errors are
        ignored."""
        out = sh("ip", "netns", "list", check=False).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(prefix):
                sh("ip", "netns", "del", name, check=False)
        links = sh("ip", "-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(prefix):
                sh("ip", "link", "del", name, check=False)

    def close(self) -> None:
        """Delete this topology's namespaces, veth pairs and bridges (errors ignored, so it also cleans up after a
        half-built topology); idempotent."""
        for node in self.nodes:
            sh("ip", "netns", "del", node.ns, check=False)
            for link in node.links.values():
                sh("ip", "link", "del", link.outer, check=False)
        for br in self.bridges.values():
            sh("ip", "link", "del", br, check=False)
        self.nodes.clear()
        self.bridges.clear()

    # ---- building ---------------------------------------------------------------------------------------

    def _bridge(self, area: int) -> str:
        name = f"{self.prefix}b{area}"
        sh("ip", "link", "add", name, "type", "bridge")
        self.bridges[area] = name
        sh("ip", "link", "set", name, "mtu", str(self.mtu))
        sh("ip", "link", "set", name, "up")
        return name

    def subnet(self, area: int) -> str:
        """The first three octets of an area's /24: 198.18.0 for the servers' side, 198.19.<area> else."""
        return "198.18.0" if area == 0 else f"198.19.{area}"

    def _next_ip(self, area: int, first: int) -> str:
        """Proxies' links up take .100 on, proxies' links down .1 on, hosts .10 on (.20 beside the servers)."""
        n = self._ips.get((area, first), first - 1) + 1
        if n > 254:
            raise ValueError(f"area {area}: no address left")
        self._ips[(area, first)] = n
        return f"{self.subnet(area)}.{n}"

    def add_area(self, area: int, parent: int = 0) -> str:
        """An area's bridge: nothing on it is routed anywhere but through its proxies."""
        if area <= 0 or area in self.bridges or parent not in self.bridges:
            raise ValueError(f"area {area} (parent {parent}): exists, or the parent does not")
        self.parents[area] = parent
        return self._bridge(area)

    def _ns(self, area: int) -> Node:
        self._n += 1
        ns = f"{self.prefix}{self._n}"
        sh("ip", "netns", "add", ns)
        node = Node(ns, area)
        self.nodes.append(node)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return node

    def _link(self, node: Node, role: str, area: int, ip: str, rate_mbit: float | None) -> Link:
        outer = f"{self.prefix}v{self._n}{role[0]}"
        inner = {"up": "up0", "down": "dn0", "eth": "eth0"}[role]
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", node.ns)
        sh("ip", "link", "set", outer, "master", self.bridges[area])
        sh("ip", "link", "set", outer, "mtu", str(self.mtu))
        sh("ip", "link", "set", outer, "up")
        ex = ["ip", "netns", "exec", node.ns]
        sh(*ex, "ip", "link", "set", inner, "mtu", str(self.mtu))
        sh(*ex, "ip", "addr", "add", f"{ip}/24", "dev", inner)
        sh(*ex, "ip", "link", "set", inner, "up")
        if rate_mbit:
            sh(*ex, "tc", "qdisc", "add", "dev", inner, "root", *tbf(rate_mbit))     # what the namespace sends
            sh("tc", "qdisc", "add", "dev", outer, "root", *tbf(rate_mbit))          # what it receives
        link = node.links[role] = Link(node.ns, outer, inner, ip)
        return link

    def add_proxy(self, area: int, uplink_mbit: float | None = None, downlink_mbit: float | None = None) -> Node:
        """A proxy host of `area`: its link up on the parent area's bridge (the servers' for area 0), its link
        down on the area's own."""
        parent = self.parents[area]
        node = self._ns(area)
        self._link(node, "up", parent, self._next_ip(parent, 100), uplink_mbit)
        self._link(node, "down", area, self._next_ip(area, 1), downlink_mbit)
        return node

    def add_host(self, area: int, rate_mbit: float | None = None) -> Node:
        """A host of `area` (0: beside the servers), on that area's bridge only."""
        node = self._ns(area)
        self._link(node, "eth", area, self._next_ip(area, 10 if area else 20), rate_mbit)
        return node

    def run(self, node: Node, cmd: list[str], private_mount: str = "") -> list[str]:
        """The command line that runs `cmd` inside `node`'s namespace (see in_namespace); it runs nothing."""
        return in_namespace(node.ns, cmd, private_mount)

    def reaches(self, node: Node, ip: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from `node` to ip:port succeeds (the topology's own check)."""
        code = ("import socket,sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                "timeout=float(sys.argv[3])).close()\nexcept OSError:\n    sys.exit(1)\n")
        import sys
        r = subprocess.run(self.run(node, [sys.executable, "-c", code, ip, str(port), str(timeout)]),
                           capture_output=True, timeout=timeout + 5)
        return r.returncode == 0

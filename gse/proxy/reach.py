"""Reachability of the area's hosts (spec section 12): the proxy pings them and reports the unreachable ones.

The task server holding the proxy tells it the hosts of its area (every IP an agent of the area attached
from: gse.common.records.AreaHosts) and the area's proxies alive now. Each proxy pings its share (a host
belongs to the proxy its IP hashes highest with: rendezvous hashing, so a proxy that leaves moves only its
own hosts), every `interval_s`, in chunks of `chunk` hosts at once, each chunk bounded by `timeout_s`
(defaults 50 and 20 s, as the original). Each host gets `count` echo requests; it is unreachable when none
is answered. Every chunk with unreachable hosts makes one type-8 alarm record (gse/common/alarmrecord.py:
exactly one element in `value`, the hosts in `extra.host` and their IPs in `extra.iplist`) sent on DataID
1000 through the proxy's own data relay, like any data.

ICMP needs a raw socket (root, or CAP_NET_RAW: the unit grants it) or the kernel's unprivileged ICMP sockets
(`net.ipv4.ping_group_range` including the proxy's group); `privileged: auto` takes the first that works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time

from prometheus_client import Counter, Gauge

from gse.common import alarmrecord
from gse.common.config import ConfigError

log = logging.getLogger("gse.proxy.reach")

PINGED = Counter("gse_proxy_ping_hosts_total", "Hosts pinged", ["outcome"])
UNREACHABLE = Gauge("gse_proxy_unreachable_hosts", "Hosts of this proxy's share unreachable at the last round")
ALARMS = Counter("gse_proxy_ping_alarms_total", "Type-8 alarm records sent")
SHARE = Gauge("gse_proxy_ping_share", "Hosts of the area this proxy pings")


@dataclasses.dataclass(frozen=True)
class PingConfig:
    """The proxy's `ping` section (spec section 12): one round over its share of the area's hosts every `interval_s`,
    `chunk` hosts at once, each chunk within `timeout_s`, `count` echo requests per host, and which ICMP socket to
    use."""
    enabled: bool = True
    interval_s: float = 60.0        # one round over this proxy's share of the area's hosts
    chunk: int = 50                 # hosts pinged at once
    timeout_s: float = 20.0         # a chunk is over within this
    count: int = 3                  # echo requests per host (one answer is enough)
    privileged: str = "auto"        # auto | raw | unprivileged

    def validate(self) -> None:
        """ConfigError unless interval_s and timeout_s are positive, chunk is 1..1000, count 1..10 and privileged is
        auto, raw or unprivileged."""
        if self.interval_s <= 0 or self.timeout_s <= 0 or not 1 <= self.chunk <= 1000 or not 1 <= self.count <= 10:
            raise ConfigError("ping: interval_s and timeout_s positive, chunk 1..1000, count 1..10")
        if self.privileged not in ("auto", "raw", "unprivileged"):
            raise ConfigError("ping.privileged must be auto, raw or unprivileged")


def share(ips: list[str], proxies: list[str], me: str) -> list[str]:
    """The IPs `me` pings among `proxies` (rendezvous hashing; all of them when `me` is the only one)."""
    if not proxies or proxies == [me]:
        return list(ips)
    mine = []
    for ip in ips:
        best = max(proxies, key=lambda p: hashlib.blake2b(f"{p}|{ip}".encode(), digest_size=8).digest())
        if best == me:
            mine.append(ip)
    return mine


class Reachability:
    """Pings this proxy's share of its area's hosts and reports the unreachable (see the module)."""

    def __init__(self, cfg: PingConfig, *, node_id: str, area: int, ip: str, submit):
        self.cfg = cfg
        self.node_id = node_id
        self.area = area
        self.ip = ip
        self.submit = submit                    # (data_id, [record bytes]) -> None: the data relay
        self.hosts: list[str] = []
        self.proxies: list[str] = []
        self.mine: list[str] = []
        self.unreachable: list[str] = []
        self.rounds = 0
        self._privileged: bool | None = {"raw": True, "unprivileged": False}.get(cfg.privileged)
        self._changed = asyncio.Event()

    def on_area_hosts(self, msg) -> None:
        """The task server's AreaHosts frame."""
        if msg.area != self.area:
            return
        self.hosts, self.proxies = sorted(set(msg.ips)), sorted(set(msg.proxies))
        self.mine = share(self.hosts, self.proxies, self.node_id)
        SHARE.set(len(self.mine))
        self._changed.set()

    def health(self) -> dict:
        """Pinging in the proxy's /healthz: the area's hosts, this proxy's share, how many were unreachable in the
        last round, rounds done."""
        return {"hosts": len(self.hosts), "share": len(self.mine), "unreachable": len(self.unreachable),
                "rounds": self.rounds}

    async def run(self) -> None:
        """Wait for the first list of the area's hosts, then ping this proxy's share every `interval_s` seconds for
        ever (a failing round is logged); returns at once when disabled."""
        if not self.cfg.enabled:
            return
        await self._changed.wait()          # nothing to ping before the first list
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - a failing round must not stop the next
                log.exception("ping round failed")
            await asyncio.sleep(max(0.0, self.cfg.interval_s - (time.monotonic() - started)))

    async def round(self) -> list[str]:
        """One round over the share; returns the unreachable IPs (and reports them)."""
        cfg = self.cfg
        down: list[str] = []
        targets = list(self.mine)
        for i in range(0, len(targets), cfg.chunk):
            chunk = targets[i:i + cfg.chunk]
            alive = await self.ping_chunk(chunk)
            lost = [ip for ip, ok in zip(chunk, alive) if not ok]
            PINGED.labels("reachable").inc(len(chunk) - len(lost))
            PINGED.labels("unreachable").inc(len(lost))
            if lost:
                self.report(lost)
            down += lost
        self.unreachable = down
        self.rounds += 1
        UNREACHABLE.set(len(down))
        if down:
            log.warning("hosts of the area unreachable", extra={"area": self.area, "hosts": len(down)})
        return down

    async def ping_chunk(self, ips: list[str]) -> list[bool]:
        """Whether each host answered, the whole chunk within timeout_s."""
        cfg = self.cfg
        per_reply = max(0.5, (cfg.timeout_s - (cfg.count - 1)) / cfg.count)
        try:
            async with asyncio.timeout(cfg.timeout_s + 1):
                return list(await asyncio.gather(*(self._ping(ip, per_reply) for ip in ips)))
        except TimeoutError:
            return [False] * len(ips)

    async def _ping(self, ip: str, per_reply: float) -> bool:
        import icmplib
        tries = [self._privileged] if self._privileged is not None else [os.geteuid() == 0, False, True]
        for privileged in dict.fromkeys(tries):
            try:
                host = await icmplib.async_ping(ip, count=self.cfg.count, interval=1, timeout=per_reply,
                                                privileged=privileged)
            except icmplib.SocketPermissionError:
                continue
            except (icmplib.ICMPLibError, OSError) as exc:
                log.debug("ping failed", extra={"ip": ip, "error": str(exc)})
                return False
            self._privileged = privileged
            return host.is_alive
        log.error("cannot send ICMP echo: neither a raw socket (CAP_NET_RAW) nor an unprivileged ICMP socket "
                  "(net.ipv4.ping_group_range) is allowed")
        return False

    def report(self, ips: list[str]) -> None:
        """One type-8 alarm record (spec section 10: the hosts in `extra.host`, their IPs in `extra.iplist`) for the
        unreachable `ips`, submitted on DataID 1000 through the data relay."""
        hosts = [alarmrecord.AlarmHost(ip=ip, cloud_id=self.area) for ip in ips]
        record = alarmrecord.alarm_record(
            alarmrecord.TYPE_PING_UNREACHABLE, hosts, server=self.ip,
            desc=f"{len(ips)} host(s) of area {self.area} do not answer ping from proxy {self.node_id}",
            extra={"iplist": list(ips), "proxy": self.node_id, "bk_cloud_id": self.area})
        self.submit(alarmrecord.DATAID_ALARM, [alarmrecord.encode(record)])
        ALARMS.inc()

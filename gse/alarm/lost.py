"""Lost agents: found from the session records in batches, reported once a minute for a day (spec section 10).

What the leader does every `scan_interval_s`:

1. Read every agent's session fields it needs: the index of agents (one SMEMBERS), then their records in
   chunks of `batch_size` (one dbproxy call per chunk, HMGET of a few fields each). Never one call per agent.
2. An agent is lost when its session says offline (since its disconnect time) or its heartbeat deadline
   passed (since the deadline), for longer than `lost_grace_s`: a task server that restarts, or hands its
   agents to a peer, sees them back within seconds, and they are not reported at all (no storm).
3. Report k of a lost agent is due at `since + lost_grace + k * report_interval` while that is within
   `report_for_s` of the loss (24 h: 1,440 reports once a minute). Reports already sent are kept in
   `LostReports` through dbproxy: claimed there before they are sent, so a new leader neither repeats one
   nor starts a storm (gse/common/records/alarm.py).
4. Every due report is one record of DataID 1000 with exactly one element in `value` and one host in it
   (gse/common/alarmrecord.py), sent through a data server (gse/common/datasend.py) in batches; whatever a
   route says then delivers it (Kafka for the monitoring platform). A report the data path did not take is
   tried again at the next scans while its minute lasts.
5. An agent that is back is forgotten (its entry removed): a later loss starts a new series.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from gse.common import alarmrecord
from gse.common.datasend import DataSender
from gse.common.dbclient import DbClient
from gse.common.errors import AgentStatus, Unavailable
from gse.common.records import AgentIndex, AgentRecord, now_ms
from gse.common.records.alarm import LostReport, LostReports

log = logging.getLogger("gse.alarm.lost")

SCAN_FIELDS = ("online", "deadline", "disconnect_time", "report_time", "cloud_id", "ip", "status_code")

LEADER = Gauge("gse_alarm_leader", "1 while this alarm daemon is the elected leader")
LOST = Gauge("gse_alarm_lost_agents", "Agents lost (past the grace) and still within their reporting day")
SCANNED = Gauge("gse_alarm_scanned_agents", "Agents whose session the last scan read")
SCAN_SECONDS = Histogram("gse_alarm_scan_seconds", "One scan: read every session, claim, send",
                         buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
RECORDS = Counter("gse_alarm_records_total", "Agent-lost records", ["outcome"])
SENT, UNSENT = RECORDS.labels("sent"), RECORDS.labels("failed")


@dataclasses.dataclass(frozen=True)
class LostPolicy:
    """Timing of agent-lost reports; all in ms."""
    grace_ms: int = 30_000
    interval_ms: int = 60_000
    report_for_ms: int = 86_400_000

    def since(self, rec: AgentRecord, at_ms: int) -> int | None:
        """When the agent was lost, from its session (the same value for every reader); None while it is
        alive or never attached, or uninstalled on purpose."""
        if rec.online and at_ms <= rec.deadline:
            return None
        if rec.status_code == AgentStatus.UNINSTALLED:
            return None
        if not rec.online:
            since = rec.disconnect_time or rec.deadline or rec.report_time
        else:
            since = rec.deadline
        return since or None

    def due_slot(self, since: int, at_ms: int) -> int | None:
        """The report due at `at_ms` for a loss at `since` (0 first); None within the grace or after the
        reporting day."""
        elapsed = at_ms - since - self.grace_ms
        if elapsed < 0 or at_ms - since >= self.report_for_ms + self.grace_ms:
            return None
        return elapsed // self.interval_ms


class LostAgents:
    """The leader's work (`lead`): scan, claim, send, for as long as it leads."""

    def __init__(self, db: DbClient, sender: DataSender, policy: LostPolicy, *, server_ip: str,
                 scan_interval_s: float = 10.0, batch_size: int = 2000, records_per_batch: int = 500,
                 data_id: int = alarmrecord.DATAID_ALARM):
        self.db = db
        self.sender = sender
        self.policy = policy
        self.server_ip = server_ip
        self.scan_interval_s = scan_interval_s
        self.batch_size = batch_size
        self.records_per_batch = records_per_batch
        self.data_id = data_id
        self.reports: dict[str, LostReport] = {}
        self.unsent: dict[str, tuple[int, bytes]] = {}      # agent -> (slot, record) the data path did not take
        self.stats = {"scans": 0, "sent": 0, "failed": 0, "lost": 0, "scanned": 0, "last_scan_s": 0.0}

    async def lead(self) -> None:
        """Runs while elected (cancelled when the leadership pauses or ends)."""
        LEADER.set(1)
        try:
            await self._load()
            while True:
                started = time.monotonic()
                try:
                    await self.scan()
                except Unavailable as exc:
                    log.warning("scan failed; trying again at the next one", extra={"error": str(exc)})
                elapsed = time.monotonic() - started
                SCAN_SECONDS.observe(elapsed)
                self.stats["last_scan_s"] = round(elapsed, 3)
                await asyncio.sleep(max(0.0, self.scan_interval_s - elapsed))
        finally:
            LEADER.set(0)

    async def _load(self) -> None:
        """What earlier leaders reported, until dbproxy answers."""
        delay = 0.5
        while True:
            try:
                (res,) = await self.db.execute([LostReports.read()])
                if res.ok:
                    self.reports = LostReports.decode(res)
                    self.unsent.clear()
                    log.info("leading: reports of earlier leaders loaded", extra={"lost_agents": len(self.reports)})
                    return
                log.warning("reading the reported agents failed", extra={"error": res.error})
            except Unavailable as exc:
                log.warning("reading the reported agents failed", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _sessions(self) -> dict[str, AgentRecord]:
        (members,) = await self.db.execute([AgentIndex.read()])
        if not members.ok:
            raise Unavailable(f"agent index: {members.error}")
        ids = AgentIndex.decode(members)
        out: dict[str, AgentRecord] = {}
        for i in range(0, len(ids), self.batch_size):
            chunk = ids[i:i + self.batch_size]
            results = await self.db.execute([AgentRecord.pick(a, names=SCAN_FIELDS) for a in chunk])
            for a, r in zip(chunk, results):
                if not r.ok:
                    raise Unavailable(f"session of {a}: {r.error}")
                rec = AgentRecord.decode(r, SCAN_FIELDS)
                if rec is not None:
                    out[a] = rec
        return out

    async def scan(self, at_ms: int | None = None) -> int:
        """One round; returns how many reports went out."""
        sessions = await self._sessions()
        at = at_ms or now_ms()
        p = self.policy
        claims: dict[str, LostReport] = {}
        records: dict[str, tuple[int, bytes]] = {}
        gone: list[str] = []
        lost = 0
        for agent_id, rec in sessions.items():
            rep = self.reports.get(agent_id)
            since = p.since(rec, at)
            if since is None:
                if rep is not None and rec.online:
                    gone.append(agent_id)           # back: a later loss is a new series
                continue
            slot = p.due_slot(since, at)
            if slot is None:
                if rep is not None and at - since >= p.report_for_ms + p.grace_ms:
                    gone.append(agent_id)           # its reporting day is over
                continue
            lost += 1
            if rep is not None and rep.since_ms == since and rep.slot >= slot:
                pending = self.unsent.get(agent_id)
                if pending is not None and pending[0] == slot:
                    records[agent_id] = pending     # claimed, not delivered yet: its minute still lasts
                continue
            claims[agent_id] = LostReport(since, slot)
            records[agent_id] = (slot, self._record(agent_id, rec, since, slot, at))
        for agent_id in list(self.reports):
            if agent_id not in sessions:
                gone.append(agent_id)               # its session expired
        ops = []
        if claims:
            ops.append(LostReports.write(claims))
        if gone:
            ops.append(LostReports.remove(gone))
        if ops:
            results = await self.db.execute(ops)
            bad = [r.error for r in results if not r.ok]
            if bad:
                raise Unavailable(f"reports not claimed: {bad[0]}")
        self.reports.update(claims)
        for agent_id in gone:
            self.reports.pop(agent_id, None)
            self.unsent.pop(agent_id, None)
        LOST.set(lost)
        SCANNED.set(len(sessions))
        self.stats.update(scans=self.stats["scans"] + 1, lost=lost, scanned=len(sessions))
        return await self._send(records)

    def _record(self, agent_id: str, rec: AgentRecord, since: int, slot: int, at: int) -> bytes:
        lost_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since / 1000))
        host = alarmrecord.AlarmHost(rec.ip, rec.cloud_id, agent_id)
        doc = alarmrecord.alarm_record(alarmrecord.TYPE_AGENT_LOST, [host], server=self.server_ip, at=at / 1000,
                                       desc=f"agent {agent_id} ({rec.cloud_id}:{rec.ip}) lost since {lost_at} UTC"
                                            f" (report {slot + 1})")
        return alarmrecord.encode(doc)

    async def _send(self, records: dict[str, tuple[int, bytes]]) -> int:
        items = list(records.items())
        sent = 0
        for i in range(0, len(items), self.records_per_batch):
            chunk = items[i:i + self.records_per_batch]
            try:
                await self.sender.send(self.data_id, [body for _a, (_s, body) in chunk])
            except Unavailable as exc:
                UNSENT.inc(len(chunk))
                self.stats["failed"] += len(chunk)
                for agent_id, item in chunk:
                    self.unsent[agent_id] = item
                log.warning("agent-lost records not delivered; tried again while their minute lasts",
                            extra={"records": len(chunk), "error": str(exc)})
                continue
            for agent_id, _item in chunk:
                self.unsent.pop(agent_id, None)
            sent += len(chunk)
        if sent:
            SENT.inc(sent)
            self.stats["sent"] += sent
            log.info("agent-lost records sent", extra={"records": sent})
        return sent

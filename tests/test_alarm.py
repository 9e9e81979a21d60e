"""The alarm daemon end to end (spec section 10): agents killed -> agent-lost records read back from a real
Kafka route (tansu) with the shape the monitoring platform parses and the timing asked; the leader killed ->
the other instance takes over within the ZooKeeper session timeout without a second record for the same
report; a task server restart -> no storm. Minutes are scaled down (report_interval_s) so that the test
sees several reports per agent.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import signal
import time
import uuid

import pytest

from conftest import api_for
from test_data_flow import add_route, add_streamto, health, to_kafka, wait_routes

from gse.common.alarmrecord import DATAID_ALARM
from gse.devcluster import wait_for

pytestmark = pytest.mark.timeout(150)

GRACE_S = 6.0
INTERVAL_S = 3.0
SCAN_S = 0.5
ALARM = {"scan_interval_s": SCAN_S, "lost_grace_s": GRACE_S, "report_interval_s": INTERVAL_S,
         "send_timeout_s": 5.0}


class KafkaTap:
    """Reads a topic from its start for as long as it runs, noting when each record arrived."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self.records: list[tuple[float, dict]] = []      # (wall-clock s when read, record)
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        from aiokafka import AIOKafkaConsumer
        self.consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                         enable_auto_commit=False, group_id=None)
        await self.consumer.start()
        self.task = asyncio.ensure_future(self._run())
        return self

    async def _run(self):
        while True:
            batch = await self.consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.time()
            for tp in batch:
                self.records.extend((now, json.loads(m.value)) for m in batch[tp])

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()

    def of(self, agent_id: str) -> list[tuple[float, dict]]:
        return [(t, r) for t, r in self.records if r["value"][0]["extra"]["host"][0]["agent_id"] == agent_id]


def check_shape(rec: dict, agent) -> None:
    """What the monitoring platform's consumers read (bkmonitor-datalink's gse_system_event processor and
    bk-monitor's agent-gse event): one element in `value`, type 2, its host, times it can parse."""
    assert set(rec) >= {"server", "time", "timezone", "utctime", "utctime2", "value"}
    assert len(rec["value"]) == 1
    v = rec["value"][0]
    assert v["event_type"] == "gse_basic_alarm_type"
    assert v["event_source_system"] == "" and v["event_title"] == ""
    assert isinstance(v["event_raw_id"], int)
    extra = v["extra"]
    assert extra["type"] == 2 and extra["count"] == 1 and len(extra["host"]) == 1
    host = extra["host"][0]
    assert host == {"bizid": 0, "cloudid": 0, "ip": agent.info["ip"], "agent_id": agent.info["bk_agent_id"]}
    for text in (v["event_time"], rec["utctime2"], rec["time"], rec["utctime"]):
        datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    utc = datetime.datetime.strptime(v["event_time"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    assert abs(utc.timestamp() - time.time()) < 120
    assert rec["server"] == "127.0.0.1"


def report_numbers(records) -> list[int]:
    return [int(re.search(r"\(report (\d+)\)", r["value"][0]["event_desc"]).group(1)) for _t, r in records]


def leader(c) -> object | None:
    for p in c.alarms:
        if p.alive():
            try:
                if health(p).get("leader"):
                    return p
            except OSError:
                pass
    return None


@pytest.fixture
def ac(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    c.start_kafka()
    c.start_dataserver(load_report_interval_s=0.5)
    c.start_alarm(**ALARM)
    c.start_alarm(**ALARM)
    return c


def route_alarms(c, api) -> str:
    topic = f"alarm{uuid.uuid4().hex[:8]}"
    sid = add_streamto(api, "kafka", c)
    add_route(api, [to_kafka(sid, topic)], channel_id=DATAID_ALARM)
    wait_routes(c, [DATAID_ALARM])
    return topic


async def test_alarm_killed_agents_are_reported_once_per_interval_through_kafka(ac):
    api = api_for(ac)
    topic = route_alarms(ac, api)
    agents = [ac.start_agent(wait=False) for _ in range(3)]
    for a in agents:
        ac.wait_healthy(a)
    ids = [a.info["bk_agent_id"] for a in agents]
    api.wait_alive(ids)
    wait_for(lambda: leader(ac), 15, "an alarm leader")
    async with KafkaTap(ac.kafka, topic) as tap:
        killed, alive = agents[:2], agents[2]
        kill_at = time.time()
        for a in killed:
            a.signal(signal.SIGKILL)
        await asyncio.to_thread(wait_for, lambda: all(len(tap.of(a.info["bk_agent_id"])) >= 3 for a in killed),
                                GRACE_S + 3 * INTERVAL_S + 15, "three reports of each killed agent", 0.1)
        # A task server restart: its agent comes back within the grace and is never reported.
        ts = ac.taskservers[0]
        ac.restart(ts)
        api.wait_alive([alive.info["bk_agent_id"]], timeout=30)
        await asyncio.sleep(GRACE_S + 2 * SCAN_S + 1)
        assert tap.of(alive.info["bk_agent_id"]) == []
        for a in killed:
            got = tap.of(a.info["bk_agent_id"])
            for _t, rec in got:
                check_shape(rec, a)
            first = got[0][0] - kill_at
            assert GRACE_S - 0.5 <= first <= GRACE_S + SCAN_S + 3, f"first report {first:.1f}s after the kill"
            # One a report interval: never two at once (a report the data path delayed is followed by the next
            # on time, so single gaps vary on a loaded machine; their mean does not).
            gaps = [t2 - t1 for (t1, _), (t2, _) in zip(got, got[1:])]
            assert min(gaps) >= 0.3 and abs(sum(gaps) / len(gaps) - INTERVAL_S) <= 0.8, gaps
            nums = report_numbers(got)
            assert nums == list(range(1, len(nums) + 1)), nums
        # Back again: no more reports for it; the next loss would start a new series.
        back = ac.restart(killed[0])
        api.wait_alive([back.info["bk_agent_id"]])
        # a scan that read the session just before the agent came back may still send one report: let two
        # more scans pass (the leader counts them) before counting
        lead = leader(ac)
        scans = health(lead)["scans"]
        await asyncio.to_thread(wait_for, lambda: health(lead)["scans"] >= scans + 2, 10, "two more scans", 0.1)
        await asyncio.sleep(0.5)            # (the last scan's records on their way through Kafka)
        n_before = len(tap.of(back.info["bk_agent_id"]))
        await asyncio.sleep(INTERVAL_S + 1)
        assert len(tap.of(back.info["bk_agent_id"])) == n_before


async def test_alarm_leader_killed_the_other_takes_over_without_duplicates(ac):
    api = api_for(ac)
    topic = route_alarms(ac, api)
    agents = [ac.start_agent(wait=False) for _ in range(2)]
    for a in agents:
        ac.wait_healthy(a)
    api.wait_alive([a.info["bk_agent_id"] for a in agents])
    first = wait_for(lambda: leader(ac), 15, "an alarm leader")
    other = next(p for p in ac.alarms if p is not first)
    assert health(other)["leader"] is False
    async with KafkaTap(ac.kafka, topic) as tap:
        for a in agents:
            a.signal(signal.SIGKILL)
        await asyncio.to_thread(wait_for, lambda: all(len(tap.of(a.info["bk_agent_id"])) >= 2 for a in agents),
                                GRACE_S + 2 * INTERVAL_S + 15, "two reports of each agent", 0.1)
        killed_at = time.monotonic()
        first.signal(signal.SIGKILL)
        await asyncio.to_thread(wait_for, lambda: health(other).get("leader"), 20, "the other alarm to lead", 0.1)
        took = time.monotonic() - killed_at
        assert took <= ac.zk_session_timeout_s + 3, f"takeover after {took:.1f}s"
        n = {a.info["bk_agent_id"]: len(tap.of(a.info["bk_agent_id"])) for a in agents}
        await asyncio.to_thread(wait_for, lambda: all(len(tap.of(a)) >= n[a] + 2 for a in n),
                                3 * INTERVAL_S + 10, "reports from the new leader", 0.1)
    for a in agents:
        nums = report_numbers(tap.of(a.info["bk_agent_id"]))
        assert len(nums) == len(set(nums)), f"a report sent twice: {nums}"
        assert nums == sorted(nums)
        # what the new leader sent follows on from what the old one claimed (at most the minute of the
        # handover is lost, none is repeated)
        assert max(b - a for a, b in zip(nums, nums[1:])) <= 1 + int((took + 2) // INTERVAL_S) + 1, nums


def test_lost_policy_reads_the_loss_from_the_session_and_spaces_reports():
    from gse.alarm.lost import LostPolicy
    from gse.common.records import AgentRecord
    p = LostPolicy(grace_ms=30_000, interval_ms=60_000, report_for_ms=86_400_000)
    t = 1_700_000_000_000
    assert p.since(AgentRecord(online=True, deadline=t + 1), t) is None                  # alive
    assert p.since(AgentRecord(online=True, deadline=t - 5), t) == t - 5                 # heartbeat stopped
    assert p.since(AgentRecord(online=False, disconnect_time=t - 9, deadline=t + 99), t) == t - 9
    assert p.since(AgentRecord(online=False, status_code=7, disconnect_time=t - 9), t) is None   # uninstalled
    assert p.since(AgentRecord(), t) is None                                              # never attached
    assert p.due_slot(t, t + 29_999) is None                                              # within the grace
    assert [p.due_slot(t, t + 30_000 + d) for d in (0, 59_999, 60_000, 125_000)] == [0, 0, 1, 2]
    assert p.due_slot(t, t + 30_000 + 86_400_000 - 1) == 1439                             # the last of the day
    assert p.due_slot(t, t + 30_000 + 86_400_000) is None

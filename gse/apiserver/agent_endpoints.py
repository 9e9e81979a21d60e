"""Agent state endpoints: v1 get_agent_status / get_agent_info, v2 cluster/list_agent_state / list_agent_info."""

from __future__ import annotations

from gse.common.errors import AGENT_STATUS_TEXT, AgentStatus, ApiCode
from gse.common.records import AgentIndex, now_ms

from . import validate as v
from .agents_view import AgentsView
from .app import Api, Reply

V1 = "/api/c/compapi/v2/gse"
V2 = "/api/v2/cluster"


class AgentEndpoints:
    """The agent state endpoints (spec §3 get_agent_status/get_agent_info, §4 list_agent_state/list_agent_info)
    and the operator extension list_agents."""

    def __init__(self, view: AgentsView, max_hosts: int):
        self.view = view
        self.max_hosts = max_hosts

    def register(self, api: Api) -> None:
        """Serve the v1 paths under /api/c/compapi/v2/gse and the v2 paths under /api/v2/cluster."""
        api.route(f"{V1}/get_agent_status", self.get_agent_status)
        api.route(f"{V1}/get_agent_info", self.get_agent_info)
        api.route(f"{V2}/list_agent_state", self.list_agent_state)
        api.route(f"{V2}/list_agent_info", self.list_agent_info)
        api.route(f"{V2}/list_agents", self.list_agents)

    async def get_agent_status(self, body: dict, _req) -> dict:
        """v1: `{hosts: [{ip, bk_cloud_id}]}` -> {"cloud:ip": {ip, bk_cloud_id, bk_agent_alive 0|1}}."""
        hosts = v.hosts(body, max_len=self.max_hosts)
        found = await self.view.by_hosts(hosts)
        at = now_ms()
        return {f"{c}:{ip}": {"ip": ip, "bk_cloud_id": c,
                              "bk_agent_alive": 1 if (c, ip) in found and found[(c, ip)].alive(at) else 0}
                for c, ip in hosts}

    async def get_agent_info(self, body: dict, _req) -> dict:
        """v1: `{hosts}` -> {"cloud:ip": {ip, bk_cloud_id, bk_agent_id, version, parent_ip, parent_port}}."""
        hosts = v.hosts(body, max_len=self.max_hosts)
        found = await self.view.by_hosts(hosts)
        out = {}
        for c, ip in hosts:
            f = found.get((c, ip))
            out[f"{c}:{ip}"] = {"ip": ip, "bk_cloud_id": c, "bk_agent_id": f.agent_id if f else "",
                                "version": f.version if f else "", "parent_ip": f.parent_ip if f else "",
                                "parent_port": f.parent_port if f else 0}
        return out

    async def list_agent_state(self, body: dict, _req):
        """v2: `{agent_id_list}` -> [{bk_agent_id, bk_cloud_id, version, run_mode, status_code, report_time}];
        1011003 when none was found."""
        ids = v.agent_ids(body, max_len=self.max_hosts)
        found = await self.view.by_ids(ids)
        at = now_ms()
        data = [{"bk_agent_id": a, "bk_cloud_id": f.cloud_id, "version": f.version, "run_mode": f.run_mode,
                 "status_code": int(f.status(at)), "report_time": f.report_time}
                for a in dict.fromkeys(ids) if (f := found.get(a))]
        if not data:
            return Reply([], ApiCode.AGENT_NOT_FOUND, "none of the agents was found")
        return data

    async def list_agent_info(self, body: dict, _req):
        """v2: `{agent_id_list}` -> one entry per id (spec §4 list_agent_info), code 1011003 for ids never seen."""
        ids = v.agent_ids(body, max_len=self.max_hosts)
        found = await self.view.by_ids(ids)
        at = now_ms()
        data = []
        # The latest host snapshot of the data path (60 s TTL) is fresher than the last heartbeat's figures.
        snapshots = await self.view.snapshots([f.agent_id for f in found.values()])
        for a in dict.fromkeys(ids):
            f = found.get(a)
            if f is None:
                data.append({"code": ApiCode.AGENT_NOT_FOUND, "message": "agent not found", "bk_agent_id": a,
                             "status_code": AgentStatus.NOT_FOUND,
                             "status": AGENT_STATUS_TEXT[AgentStatus.NOT_FOUND]})
                continue
            code = f.status(at)
            snap = snapshots.get(f.agent_id)
            data.append({
                "code": 0, "message": "", "bk_agent_id": a, "bk_cloud_id": f.cloud_id,
                "bk_host_ip": f.ip, "bk_os_type": f.os, "bk_cpu_architecture": f.arch,
                "report_time": f.report_time, "parent_ip": f.parent_ip, "parent_port": f.parent_port,
                "version": f.version, "cpu_rate": snap.cpu_rate if snap else f.host_cpu_rate,
                "mem_rate": snap.mem_rate if snap else f.host_mem_rate,
                "cpu_num": snap.cpu_num if snap else f.cpu_num, "mem_size": snap.mem_size if snap else f.mem_size,
                "start_time": f.start_time, "last_work_time": f.report_time,
                "conn_cycle_time": max(0, (at - f.connect_time) // 1000)
                if f.connect_time and code == AgentStatus.RUNNING else 0,
                "run_mode": f.run_mode, "status_code": int(code), "status": AGENT_STATUS_TEXT.get(code, "unknown"),
                "last_status_code": int(f.last_status_code),
                "last_status": AGENT_STATUS_TEXT.get(f.last_status_code, "unknown"), "remark": f.remark,
            })
        if all(d["code"] == ApiCode.AGENT_NOT_FOUND for d in data):
            return Reply(data, ApiCode.AGENT_NOT_FOUND, "none of the agents was found")
        return data

    async def list_agents(self, body: dict, _req):
        """Extension (not in the published API): every agent the cluster knows, for operator tools.
        Optional `only_alive` (bool). Two dbproxy round trips whatever the count."""
        only_alive = body.get("only_alive", False) is True
        (members,) = await self.view.db.execute([AgentIndex.read()])
        ids = AgentIndex.decode(members)
        records = await self.view.records(ids)
        at = now_ms()
        out = []
        for a in ids:
            f = records.get(a)
            if f is None:
                continue
            code = f.status(at)
            if only_alive and code != AgentStatus.RUNNING:
                continue
            out.append({"bk_agent_id": a, "bk_cloud_id": f.cloud_id, "bk_host_ip": f.ip, "hostname": f.hostname,
                        "status_code": int(code), "parent_ip": f.parent_ip, "parent_port": f.parent_port})
        return sorted(out, key=lambda d: (d["bk_cloud_id"], d["bk_host_ip"], d["bk_agent_id"]))

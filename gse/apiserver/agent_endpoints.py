"""Agent state endpoints: v1 get_agent_status / get_agent_info, v2 cluster/list_agent_state / list_agent_info."""

from __future__ import annotations

from gse.common import dbclient as db
from gse.common.agentstate import AGENTS_SET, STATUS_TEXT, UNKNOWN, is_alive, now_ms, status_code
from gse.common.errors import AGENT_NOT_FOUND

from . import validate as v
from .agents_view import AgentsView
from .app import Api, Reply

V1 = "/api/c/compapi/v2/gse"
V2 = "/api/v2/cluster"


def _int(fields: dict, name: str, default: int = 0) -> int:
    try:
        return int(float(fields.get(name, default)))
    except (TypeError, ValueError):
        return default


def _float(fields: dict, name: str) -> float:
    try:
        return float(fields.get(name, 0.0))
    except (TypeError, ValueError):
        return 0.0


class AgentEndpoints:
    def __init__(self, view: AgentsView, max_hosts: int):
        self.view = view
        self.max_hosts = max_hosts

    def register(self, api: Api) -> None:
        api.route(f"{V1}/get_agent_status", self.get_agent_status)
        api.route(f"{V1}/get_agent_info", self.get_agent_info)
        api.route(f"{V2}/list_agent_state", self.list_agent_state)
        api.route(f"{V2}/list_agent_info", self.list_agent_info)
        api.route(f"{V2}/list_agents", self.list_agents)

    async def get_agent_status(self, body: dict, _req) -> dict:
        hosts = v.hosts(body, max_len=self.max_hosts)
        found = await self.view.by_hosts(hosts)
        at = now_ms()
        return {f"{c}:{ip}": {"ip": ip, "bk_cloud_id": c,
                              "bk_agent_alive": 1 if (c, ip) in found and is_alive(found[(c, ip)], at) else 0}
                for c, ip in hosts}

    async def get_agent_info(self, body: dict, _req) -> dict:
        hosts = v.hosts(body, max_len=self.max_hosts)
        found = await self.view.by_hosts(hosts)
        out = {}
        for c, ip in hosts:
            f = found.get((c, ip), {})
            out[f"{c}:{ip}"] = {"ip": ip, "bk_cloud_id": c, "bk_agent_id": f.get("agent_id", ""),
                                "version": f.get("version", ""), "parent_ip": f.get("parent_ip", ""),
                                "parent_port": _int(f, "parent_port")}
        return out

    async def list_agent_state(self, body: dict, _req):
        ids = v.agent_ids(body, max_len=self.max_hosts)
        found = await self.view.by_ids(ids)
        at = now_ms()
        data = [{"bk_agent_id": a, "bk_cloud_id": _int(f, "cloud_id"), "version": f.get("version", ""),
                 "run_mode": _int(f, "run_mode", 1), "status_code": status_code(f, at),
                 "report_time": _int(f, "report_time")}
                for a in dict.fromkeys(ids) if (f := found.get(a))]
        if not data:
            return Reply([], AGENT_NOT_FOUND, "none of the agents was found")
        return data

    async def list_agent_info(self, body: dict, _req):
        ids = v.agent_ids(body, max_len=self.max_hosts)
        found = await self.view.by_ids(ids)
        at = now_ms()
        data = []
        # The latest host snapshot of the data path (60 s TTL) is fresher than the last heartbeat's figures.
        snapshots = await self.view.snapshots([f["agent_id"] for f in found.values()])
        for a in dict.fromkeys(ids):
            f = found.get(a)
            if f is None:
                data.append({"code": AGENT_NOT_FOUND, "message": "agent not found", "bk_agent_id": a,
                             "status_code": -2, "status": STATUS_TEXT[-2]})
                continue
            code = status_code(f, at)
            last = _int(f, "last_status_code", UNKNOWN)
            connect = _int(f, "connect_time")
            f = {**f, **snapshots.get(f["agent_id"], {})}
            data.append({
                "code": 0, "message": "", "bk_agent_id": a, "bk_cloud_id": _int(f, "cloud_id"),
                "bk_host_ip": f.get("ip", ""), "bk_os_type": f.get("os", ""),
                "bk_cpu_architecture": f.get("arch", ""), "report_time": _int(f, "report_time"),
                "parent_ip": f.get("parent_ip", ""), "parent_port": _int(f, "parent_port"),
                "version": f.get("version", ""), "cpu_rate": _float(f, "host_cpu_rate"),
                "mem_rate": _float(f, "host_mem_rate"), "cpu_num": _int(f, "cpu_num"),
                "mem_size": _int(f, "mem_size"), "start_time": _int(f, "start_time"),
                "last_work_time": _int(f, "report_time"),
                "conn_cycle_time": max(0, (at - connect) // 1000) if connect and code == 2 else 0,
                "run_mode": _int(f, "run_mode", 1), "status_code": code, "status": STATUS_TEXT.get(code, "unknown"),
                "last_status_code": last, "last_status": STATUS_TEXT.get(last, "unknown"),
                "remark": f.get("remark", ""),
            })
        if all(d["code"] == AGENT_NOT_FOUND for d in data):
            return Reply(data, AGENT_NOT_FOUND, "none of the agents was found")
        return data

    async def list_agents(self, body: dict, _req):
        """Extension (not in the published API): every agent the cluster knows, for operator tools.
        Optional `only_alive` (bool). Two dbproxy round trips whatever the count."""
        only_alive = body.get("only_alive", False) is True
        (members,) = await self.view.db.execute([db.smembers(AGENTS_SET)])
        ids = [m.decode() for m in members.values] if members.ok else []
        records = await self.view.records(ids)
        at = now_ms()
        out = []
        for a in ids:
            f = records.get(a)
            if f is None:
                continue
            code = status_code(f, at)
            if only_alive and code != 2:
                continue
            out.append({"bk_agent_id": a, "bk_cloud_id": _int(f, "cloud_id"), "bk_host_ip": f.get("ip", ""),
                        "hostname": f.get("hostname", ""), "status_code": code,
                        "parent_ip": f.get("parent_ip", ""), "parent_port": _int(f, "parent_port")})
        return sorted(out, key=lambda d: (d["bk_cloud_id"], d["bk_host_ip"], d["bk_agent_id"]))

"""File distribution endpoints (v2): async_transfer_file, get_transfer_file_result (also under task/async/),
async_terminate_transfer_file; at /api/v2/task/<name> and /api/v2/task/extensions/<name>.

Each `tasks[]` item is one transfer, started on the task server that holds its source agent, which
coordinates it with a file server. Targets that are offline are answered 117 at once.
"""

from __future__ import annotations

import json
import os

from gse.common import dbclient as db
from gse.common import filestate as fs
from gse.common import patterns
from gse.common import taskstate as ts
from gse.common.agentstate import is_alive, now_ms
from gse.common.errors import BadRequest, TaskNotKnown
from gse.pb import taskserver_pb2 as pb

from . import validate as v
from .app import Api
from .task_endpoints import SESSION_FIELDS, TaskEndpoints

MB = 1024 * 1024


class FileEndpoints:
    def __init__(self, tasks: TaskEndpoints):
        self.t = tasks          # shares agent resolution, storage and the task server stubs
        self.db = tasks.db

    def register(self, api: Api) -> None:
        for prefix in ("/api/v2/task", "/api/v2/task/extensions"):
            api.route(f"{prefix}/async_transfer_file", self.async_transfer_file)
            api.route(f"{prefix}/get_transfer_file_result", self.get_transfer_file_result)
            api.route(f"{prefix}/async_terminate_transfer_file", self.async_terminate_transfer_file)
        api.route("/api/v2/task/async/get_transfer_file_result", self.get_transfer_file_result)

    # ---- parsing ----------------------------------------------------------------------------------

    @staticmethod
    def _dir(d: dict, field: str, where: str) -> str:
        value = v.string(d, field, where=where)
        if not os.path.isabs(value) or ".." in value.split("/"):
            raise BadRequest(f"'{where}{field}' must be an absolute path without '..'")
        return os.path.normpath(value)

    @staticmethod
    def _speed(body: dict, field: str) -> int:
        value = body.get(field, 0) or 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise BadRequest(f"'{field}' must be a number of MB/s (0 = unlimited)")
        return int(value * MB)

    def _tasks(self, body: dict) -> list[dict]:
        out = []
        for i, t in enumerate(v.lst(body, "tasks", max_len=100)):
            w = f"tasks[{i}]."
            if not isinstance(t, dict):
                raise BadRequest(f"'tasks[{i}]' must be an object with source and target")
            src, dst = v.obj(t, "source"), v.obj(t, "target")
            sa = v.obj(src, "agent")
            name = v.string(src, "file_name", where=f"{w}source.", max_len=1024)
            if name.startswith("regex:"):       # matched on the agent in linear time (RE2): refuse what it cannot
                try:
                    patterns.compile_user(name[6:], what=f"'{w}source.file_name'")
                except ValueError as exc:
                    raise BadRequest(str(exc)) from None
            tgt_name = v.string(dst, "file_name", required=False, where=f"{w}target.", max_len=255)
            if "/" in tgt_name or tgt_name in (".", ".."):
                raise BadRequest(f"'{w}target.file_name' must be a plain file name")
            perm = dst.get("permission", 0) or 0
            if isinstance(perm, str) and perm.isdigit():
                perm = int(perm)
            if isinstance(perm, bool) or not isinstance(perm, int) or any(c not in "01234567" for c in str(perm)) \
                    or len(str(perm)) > 4:
                raise BadRequest(f"'{w}target.permission' must be chmod digits such as 644")
            agents = []
            for j, a in enumerate(v.lst(dst, "agents", max_len=self.t.max_hosts)):
                if not isinstance(a, dict):
                    raise BadRequest(f"'{w}target.agents[{j}]' must be an object with bk_agent_id")
                aid = v.agent_ids({"x": [v.string(a, "bk_agent_id", where=f"{w}target.agents[{j}].")]}, "x")[0]
                agents.append((aid, v.string(a, "user", required=False, default="root",
                                             where=f"{w}target.agents[{j}].") or "root"))
            out.append({
                "source_agent": v.agent_ids({"x": [v.string(sa, "bk_agent_id", where=f"{w}source.agent.")]}, "x")[0],
                "source_user": v.string(sa, "user", required=False, default="root", where=f"{w}source.agent.") or "root",
                "source_dir": self._dir(src, "store_dir", f"{w}source."),
                "source_name": name, "md5": v.string(src, "md5", required=False, where=f"{w}source.", max_len=64),
                "dest_dir": self._dir(dst, "store_dir", f"{w}target."), "dest_name": tgt_name,
                "owner": v.string(dst, "owner", required=False, where=f"{w}target.", max_len=64),
                "permission": perm, "agents": agents,
            })
        return out

    # ---- endpoints --------------------------------------------------------------------------------

    async def async_transfer_file(self, body: dict, _req):
        tasks = self._tasks(body)
        timeout = v.integer(body, "timeout_seconds", required=False, default=3600, minimum=0, maximum=7 * 86400)
        auto_mkdir = body.get("auto_mkdir", False) is True
        keep_seeding = body.get("keep_source_seeding", False) is True   # extension: the source seeds on after the end
        up, down = self._speed(body, "upload_speed"), self._speed(body, "download_speed")
        task_id = ts.new_task_id("GSEFILE")
        ids = list(dict.fromkeys([t["source_agent"] for t in tasks] + [a for t in tasks for a, _u in t["agents"]]))
        records = await self.t.view.by_ids(ids, SESSION_FIELDS)
        at = now_ms()
        alive = {r: rec for r, rec in records.items() if is_alive(rec, at)}
        coordinators: dict[int, str] = {}
        initial_ops = []
        specs = []
        for i, t in enumerate(tasks):
            src = alive.get(t["source_agent"])
            targets: list[tuple[str, str, str]] = []
            for requested, user in t["agents"]:
                rec = alive.get(requested)
                item = {"mode": 1, "source_agent_id": t["source_agent"], "source_file_dir": t["source_dir"],
                        "source_file_name": t["source_name"], "dest_agent_id": requested,
                        "dest_file_dir": t["dest_dir"], "dest_file_name": t["dest_name"] or t["source_name"],
                        "progress": 0, "speed": 0, "size": 0, "status": ts.FAILED, "status_info": "", "type": "",
                        "start_time": 0, "end_time": at}
                if src is None or rec is None:
                    msg = "target agent is offline" if rec is None else "source agent is offline"
                    item.update(error_code=ts.E_AGENT_OFFLINE, error_msg=msg)
                    real = rec["agent_id"] if rec else requested
                    initial_ops.append(db.hset(fs.result_key(task_id, real), {
                        fs.item_field(i, -1): fs.encode(item),
                        fs.PROGRESS + fs.item_field(i, -1): fs.encode(item)}, self.t.ttl))
                else:
                    targets.append((rec["agent_id"], user, rec.get("node", "")))
                    # A placeholder until the source's manifest names the entries (then those replace it).
                    item.update(status=ts.DISPATCHED, error_code=ts.E_RUNNING, error_msg="", end_time=0)
                    initial_ops.append(db.hset(fs.result_key(task_id, rec["agent_id"]),
                                               {fs.item_field(i, -1): fs.encode(item)}, self.t.ttl))
            if src is None or not targets:
                continue
            coordinators[i] = src.get("node", "")
            specs.append((i, coordinators[i], pb.TransferSpec(
                task_id=task_id, task_index=i, transfer_id=f"{task_id}/{i}", source_agent=src["agent_id"],
                source_user=t["source_user"], source_dir=t["source_dir"], source_name=t["source_name"],
                md5=t["md5"], dest_dir=t["dest_dir"], dest_name=t["dest_name"], owner=t["owner"],
                permission=t["permission"], target_agents=[a for a, _u, _n in targets],
                target_users=[u for _a, u, _n in targets], target_nodes={a: n for a, _u, n in targets},
                timeout_seconds=timeout, auto_mkdir=auto_mkdir, upload_rate=up, download_rate=down,
                keep_seeding=keep_seeding)))
        agents_all = sorted({(alive.get(a) or {}).get("agent_id", a) for a in ids})
        meta = {"kind": "file", "created": at, "coordinators": json.dumps(coordinators),
                "agents": json.dumps(agents_all), "tasks": len(tasks)}
        await self.t._write([db.hset(ts.task_key(task_id), meta, self.t.ttl), *initial_ops])
        for i, node, spec in specs:
            failures = await self.t.servers.start_transfer(node, spec)
            if failures:
                _aid, code, msg = failures[0]
                ops = []
                for target in spec.target_agents:
                    item = {"mode": 1, "source_agent_id": spec.source_agent, "dest_agent_id": target,
                            "source_file_dir": spec.source_dir, "source_file_name": spec.source_name,
                            "dest_file_dir": spec.dest_dir, "dest_file_name": spec.dest_name or spec.source_name,
                            "status": ts.FAILED, "error_code": code, "error_msg": msg, "end_time": now_ms()}
                    ops.append(db.hset(fs.result_key(task_id, target), {
                        fs.item_field(i, -1): fs.encode(item), fs.PROGRESS + fs.item_field(i, -1): fs.encode(item)},
                        self.t.ttl))
                await self.t._write(ops)
        return {"result": {"task_id": task_id}}

    async def get_transfer_file_result(self, body: dict, _req):
        task_id = self.t._task_id(body)
        meta = await self.t._meta(task_id, TaskNotKnown)
        requested = []
        for i, a in enumerate(v.lst(body, "agents", required=False, non_empty=False, max_len=self.t.max_hosts)):
            if not isinstance(a, dict):
                raise BadRequest(f"'agents[{i}]' must be an object with bk_agent_id")
            requested.append(v.agent_ids({"x": [v.string(a, "bk_agent_id", where=f"agents[{i}].")]}, "x")[0])
        if not requested:
            requested = json.loads(meta.get("agents", "[]"))
        real = await self.t._real_ids(requested)
        res = await self.db.execute([db.hgetall(fs.result_key(task_id, real[r])) for r in requested])
        out = []
        for r, reply in zip(requested, res):
            items = fs.entry_items(fs.merged(dict(reply.fields))) if reply.ok and reply.found else {}
            for name in sorted(items, key=_order):
                item = items[name]
                status = item.get("status", ts.DISPATCHED)
                code = ts.item_error_code(status, item.get("error_code", ts.E_RUNNING))
                content = {k: item.get(k, d) for k, d in (
                    ("mode", 1), ("source_agent_id", ""), ("source_file_dir", ""), ("source_file_name", ""),
                    ("dest_agent_id", r), ("dest_file_dir", ""), ("dest_file_name", ""), ("progress", 0),
                    ("speed", 0), ("size", 0), ("status", status), ("status_info", ""), ("type", ""),
                    ("start_time", 0), ("end_time", 0))}
                content["status"] = status
                if item.get("dest_path"):
                    content["dest_path"] = item["dest_path"]
                out.append({"bk_agent_id": r, "error_code": code, "error_msg": item.get("error_msg", ""),
                            "content": content})
        return {"result": out}

    async def async_terminate_transfer_file(self, body: dict, _req):
        task_id = self.t._task_id(body)
        meta = await self.t._meta(task_id)
        if meta.get("kind") != "file":
            raise BadRequest(f"'task_id' {task_id} is not a file transfer")
        for index, node in json.loads(meta.get("coordinators", "{}")).items():
            await self.t.servers.terminate_transfer(node, f"{task_id}/{index}")
        return {"result": {"task_id": task_id}}


def _order(name: str) -> tuple:
    parts = name.split(":")
    return (int(parts[0]), int(parts[1]), len(parts))

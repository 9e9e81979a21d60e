"""File distribution endpoints (v2): async_transfer_file, async_push_file, get_transfer_file_result (also
under task/async/), async_terminate_transfer_file; at /api/v2/task/<name> and /api/v2/task/extensions/<name>.

Each `tasks[]` item is one transfer, started on the task server that holds its source agent, which
coordinates it with a file server. A pushed file (async_push_file, spec section 4) has its content in the
request: the task server holding its first target coordinates it and the content travels with the request to
each target. Targets that are offline are answered 117 at once.
"""

from __future__ import annotations

import hashlib
import logging

from gse.common import patterns
from gse.common.errors import BadRequest, ErrorCode, ScriptStatus, TaskNotKnown, item_error_code
from gse.common.logs import set_trace
from gse.common.records import SESSION_FIELDS, FileItem, FileResults, TaskRecord, item_name, new_task_id, now_ms
from gse.pb import taskserver_pb2 as pb

from . import validate as v
from .app import Api
from .task_endpoints import TaskEndpoints

log = logging.getLogger("gse.apiserver.files")

MB = 1024 * 1024
MAX_SPEED_MB = 1_000_000       # MB/s: beyond any link, and bytes/s of it fit the int64 of the wire
PUSH_MAX_BYTES = 100 * 1024    # async_push_file: file_content up to 100 KB (spec section 4)


class FileEndpoints:
    """File transfers (spec §4): each tasks[] item is started on the task server holding its source."""

    def __init__(self, tasks: TaskEndpoints):
        self.t = tasks          # shares agent resolution, storage and the task server stubs
        self.db = tasks.db

    def register(self, api: Api) -> None:
        """Serve the file endpoints at /api/v2/task/<name> and /api/v2/task/extensions/<name>, and
        get_transfer_file_result also at /api/v2/task/async/."""
        for prefix in ("/api/v2/task", "/api/v2/task/extensions"):
            api.route(f"{prefix}/async_transfer_file", self.async_transfer_file)
            api.route(f"{prefix}/get_transfer_file_result", self.get_transfer_file_result)
            api.route(f"{prefix}/async_terminate_transfer_file", self.async_terminate_transfer_file)
            api.route(f"{prefix}/async_push_file", self.async_push_file)
        api.route("/api/v2/task/async/get_transfer_file_result", self.get_transfer_file_result)

    # ---- parsing ----------------------------------------------------------------------------------

    def _agents(self, body: dict) -> list[str]:
        """The optional `agents: [{bk_agent_id, ...}]` of a result or terminate request (spec §4), as the
        bk_agent_ids named (an id or "cloud:ip"), in order; other keys of each object are not used."""
        out = []
        for i, a in enumerate(v.lst(body, "agents", required=False, non_empty=False, max_len=self.t.max_hosts)):
            if not isinstance(a, dict):
                raise BadRequest(f"'agents[{i}]' must be an object with bk_agent_id")
            out.append(v.agent_ids({"x": [v.string(a, "bk_agent_id", where=f"agents[{i}].")]}, "x")[0])
        return out

    @staticmethod
    def _permission(d: dict, field: str, where: str) -> int:
        perm = d.get(field, 0) or 0         # absent, null, "" or 0: the source's mode
        try:
            perm = v.integer_value(perm, f"{where}{field}", minimum=0, maximum=7777)
        except BadRequest:
            perm = -1
        if perm < 0 or any(c not in "01234567" for c in str(perm)):
            raise BadRequest(f"'{where}{field}' must be chmod digits such as 644")
        return perm

    @staticmethod
    def _speed(body: dict, field: str) -> int:
        value = body.get(field, 0) or 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SPEED_MB:
            raise BadRequest(f"'{field}' must be a number of MB/s from 0 (unlimited) to {MAX_SPEED_MB}")
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
            perm = self._permission(dst, "permission", f"{w}target.")
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
                "source_dir": v.abs_dir(src, "store_dir", where=f"{w}source."),
                "source_name": name, "md5": v.string(src, "md5", required=False, where=f"{w}source.", max_len=64),
                "dest_dir": v.abs_dir(dst, "store_dir", where=f"{w}target."), "dest_name": tgt_name,
                "owner": v.string(dst, "owner", required=False, where=f"{w}target.", max_len=64),
                "permission": perm, "agents": agents,
            })
        return out

    def _push_tasks(self, body: dict) -> list[dict]:
        """async_push_file's tasks: {file_name, store_dir, file_content, md5?, owner?, right?,
        agent_id_list | agents}."""
        out = []
        for i, t in enumerate(v.lst(body, "tasks", max_len=100)):
            w = f"tasks[{i}]."
            if not isinstance(t, dict):
                raise BadRequest(f"'tasks[{i}]' must be an object")
            name = v.string(t, "file_name", where=w, max_len=255)
            if "/" in name or name in ("", ".", "..") or "\0" in name:
                raise BadRequest(f"'{w}file_name' must be a plain file name")
            content = t.get("file_content")
            if not isinstance(content, str):
                raise BadRequest(f"'{w}file_content' is required and must be a string")
            data = content.encode("utf-8", "surrogatepass")
            if len(data) > PUSH_MAX_BYTES:
                raise BadRequest(f"'{w}file_content' is {len(data)} bytes; at most {PUSH_MAX_BYTES} are accepted")
            md5 = v.string(t, "md5", required=False, where=w, max_len=64).lower()
            if md5 and md5 != hashlib.md5(data).hexdigest():
                raise BadRequest(f"'{w}md5' does not match file_content")
            agents: list[tuple[str, str]] = []
            if t.get("agents") is not None:
                for j, a in enumerate(v.lst(t, "agents", max_len=self.t.max_hosts)):
                    if not isinstance(a, dict):
                        raise BadRequest(f"'{w}agents[{j}]' must be an object with bk_agent_id")
                    aid = v.agent_ids({"x": [v.string(a, "bk_agent_id", where=f"{w}agents[{j}].")]}, "x")[0]
                    agents.append((aid, v.string(a, "user", required=False, default="root",
                                                 where=f"{w}agents[{j}].") or "root"))
            if t.get("agent_id_list") is not None or not agents:
                try:
                    ids = v.agent_ids(t, "agent_id_list", max_len=self.t.max_hosts)
                except BadRequest as exc:
                    raise BadRequest(f"'{w}agent_id_list' or '{w}agents': {exc}") from None
                agents += [(a, "root") for a in ids]
            out.append({"file_name": name, "store_dir": v.abs_dir(t, "store_dir", where=w), "content": data,
                        "md5": md5,
                        "owner": v.string(t, "owner", required=False, where=w, max_len=64),
                        "permission": self._permission(t, "right", w),
                        "agents": list(dict.fromkeys(agents))})
        return out

    # ---- endpoints --------------------------------------------------------------------------------

    async def async_transfer_file(self, body: dict, req):
        """`{timeout_seconds, auto_mkdir, upload_speed, download_speed, tasks: [{source, target}]}` ->
        `{result: {task_id}}` (spec §4)."""
        tasks = self._tasks(body)
        timeout = v.integer(body, "timeout_seconds", required=False, default=3600, minimum=0, maximum=7 * 86400)
        auto_mkdir = body.get("auto_mkdir", False) is True
        keep_seeding = body.get("keep_source_seeding", False) is True   # extension: the source seeds on after the end
        # extension (spec section 12): peers of different cloud areas may meet (they reach each other directly)
        cross_area = body.get("cross_area", False) is True
        up, down = self._speed(body, "upload_speed"), self._speed(body, "download_speed")
        task_id = new_task_id("GSEFILE")
        set_trace(task_id=task_id)
        ids = list(dict.fromkeys([t["source_agent"] for t in tasks] + [a for t in tasks for a, _u in t["agents"]]))
        records = await self.t.view.by_ids(ids, SESSION_FIELDS)
        at = now_ms()
        alive = {r: rec for r, rec in records.items() if rec.alive(at)}
        coordinators: dict[int, str] = {}
        initial_ops = []
        specs = []
        for i, t in enumerate(tasks):
            src = alive.get(t["source_agent"])
            targets: list[tuple[str, str, str]] = []
            placeholder = item_name(i, -1)
            for requested, user in t["agents"]:
                rec = alive.get(requested)
                item = FileItem(mode=1, source_agent_id=t["source_agent"], source_file_dir=t["source_dir"],
                                source_file_name=t["source_name"], dest_agent_id=requested,
                                dest_file_dir=t["dest_dir"], dest_file_name=t["dest_name"] or t["source_name"],
                                progress=0, speed=0, size=0, status=ScriptStatus.FAILED, status_info="", type="",
                                start_time=0, end_time=at)
                if src is None or rec is None:
                    item.error_code = ErrorCode.AGENT_OFFLINE
                    item.error_msg = "target agent is offline" if rec is None else "source agent is offline"
                    real = rec.agent_id if rec else requested
                    initial_ops.append(FileResults.update(task_id, real, {
                        placeholder: item, item_name(i, -1, progress=True): item}, self.t.ttl).op())
                else:
                    targets.append((rec.agent_id, user, rec.node))
                    # A placeholder until the source's manifest names the entries (then those replace it).
                    item.status, item.error_code, item.error_msg, item.end_time = \
                        ScriptStatus.DISPATCHED, ErrorCode.RUNNING, "", 0
                    initial_ops.append(FileResults.update(task_id, rec.agent_id, {placeholder: item},
                                                          self.t.ttl).op())
            if src is None or not targets:
                continue
            coordinators[i] = src.node
            specs.append((i, coordinators[i], pb.TransferSpec(
                task_id=task_id, task_index=i, transfer_id=f"{task_id}/{i}", source_agent=src.agent_id,
                source_user=t["source_user"], source_dir=t["source_dir"], source_name=t["source_name"],
                md5=t["md5"], dest_dir=t["dest_dir"], dest_name=t["dest_name"], owner=t["owner"],
                permission=t["permission"], target_agents=[a for a, _u, _n in targets],
                target_users=[u for _a, u, _n in targets], target_nodes={a: n for a, _u, n in targets},
                timeout_seconds=timeout, auto_mkdir=auto_mkdir, upload_rate=up, download_rate=down,
                keep_seeding=keep_seeding, cross_area=cross_area)))
        await self._start(task_id, "file", req, len(tasks), coordinators,
                          sorted({alive[a].agent_id if a in alive else a for a in ids}), initial_ops, specs)
        return {"result": {"task_id": task_id}}

    async def _start(self, task_id: str, kind: str, req, n_tasks: int, coordinators: dict[int, str],
                     targets: list[str], initial_ops: list, specs: list[tuple[int, str, pb.TransferSpec]]) -> None:
        """Store the task (kind file or push) and its initial items, then start each transfer on its
        coordinating task server; a transfer that cannot start ends its targets' items with the reason."""
        await self.t.store([TaskRecord.update(task_id, ttl_ms=self.t.ttl, kind=kind, created=now_ms(),
                                               request_id=req.request_id, coordinators=coordinators,
                                               targets=targets, tasks=n_tasks).op(), *initial_ops])
        log.info("transfer accepted", extra={"kind": kind, "tasks": n_tasks, "transfers": len(specs)})
        for i, node, spec in specs:
            failures = await self.t.servers.start_transfer(node, spec)
            if not failures:
                continue
            _aid, code, msg = failures[0]
            log.warning("transfer not started", extra={"task_index": i, "node": node, "error": msg})
            ops = []
            for target in spec.target_agents:
                item = FileItem(mode=1, source_agent_id=spec.source_agent, dest_agent_id=target,
                                source_file_dir=spec.source_dir, source_file_name=spec.source_name or spec.dest_name,
                                dest_file_dir=spec.dest_dir, dest_file_name=spec.dest_name or spec.source_name,
                                status=ScriptStatus.FAILED, error_code=code, error_msg=msg, end_time=now_ms())
                ops.append(FileResults.update(task_id, target, {
                    item_name(i, -1): item, item_name(i, -1, progress=True): item}, self.t.ttl).op())
            await self.t.store(ops)

    async def async_push_file(self, body: dict, req):
        """`{timeout_seconds, auto_mkdir, tasks: [{file_name, store_dir, file_content, md5?, owner, right,
        agent_id_list | agents}]}` -> `{result: {task_id}}` (spec §4): files whose content the caller gives
        (the CMDB's host identity), written on every target atomically with the owner and mode asked; results
        through get_transfer_file_result."""
        tasks = self._push_tasks(body)
        timeout = v.integer(body, "timeout_seconds", required=False, default=3600, minimum=0, maximum=7 * 86400)
        auto_mkdir = body.get("auto_mkdir", False) is True
        task_id = new_task_id("GSEFILE")
        set_trace(task_id=task_id)
        ids = list(dict.fromkeys(a for t in tasks for a, _u in t["agents"]))
        records = await self.t.view.by_ids(ids, SESSION_FIELDS)
        at = now_ms()
        alive = {r: rec for r, rec in records.items() if rec.alive(at)}
        coordinators: dict[int, str] = {}
        initial_ops, specs = [], []
        for i, t in enumerate(tasks):
            targets: list[tuple[str, str, str]] = []
            placeholder = item_name(i, -1)
            for requested, user in t["agents"]:
                rec = alive.get(requested)
                item = FileItem(mode=1, source_agent_id="", source_file_dir="", source_file_name=t["file_name"],
                                dest_agent_id=requested, dest_file_dir=t["store_dir"], dest_file_name=t["file_name"],
                                progress=0, speed=0, size=len(t["content"]), status=ScriptStatus.DISPATCHED,
                                status_info="", type="", start_time=0, end_time=0, error_code=ErrorCode.RUNNING,
                                error_msg="")
                if rec is None:
                    item.status, item.error_code, item.error_msg, item.end_time = \
                        ScriptStatus.FAILED, ErrorCode.AGENT_OFFLINE, "target agent is offline", at
                    initial_ops.append(FileResults.update(task_id, requested, {
                        placeholder: item, item_name(i, -1, progress=True): item}, self.t.ttl).op())
                else:
                    targets.append((rec.agent_id, user, rec.node))
                    initial_ops.append(FileResults.update(task_id, rec.agent_id, {placeholder: item},
                                                          self.t.ttl).op())
            if not targets:
                continue
            coordinators[i] = targets[0][2]
            specs.append((i, coordinators[i], pb.TransferSpec(
                task_id=task_id, task_index=i, transfer_id=f"{task_id}/{i}", dest_dir=t["store_dir"],
                dest_name=t["file_name"], owner=t["owner"], permission=t["permission"], md5=t["md5"],
                target_agents=[a for a, _u, _n in targets], target_users=[u for _a, u, _n in targets],
                target_nodes={a: n for a, _u, n in targets}, timeout_seconds=timeout, auto_mkdir=auto_mkdir,
                from_caller=True, content=t["content"])))
        await self._start(task_id, "push", req, len(tasks), coordinators,
                          sorted({alive[a].agent_id if a in alive else a for a in ids}), initial_ops, specs)
        return {"result": {"task_id": task_id}}

    async def get_transfer_file_result(self, body: dict, _req):
        """`{task_id, agents?: [{bk_agent_id}] | agent_id_list?: [ids]}` -> `{result: [{bk_agent_id, error_code,
        error_msg, content}]}` (spec §4); `agent_id_list` is the CMDB's form; neither: every target."""
        task_id = self.t.task_id_of(body)
        meta = await self.t.task_record(task_id, TaskNotKnown)
        if meta.kind not in ("file", "push"):
            raise BadRequest(f"'task_id' {task_id} is not a file transfer")
        requested = self._agents(body)
        if body.get("agent_id_list"):
            requested += v.agent_ids(body, "agent_id_list", max_len=self.t.max_hosts)
        requested = list(dict.fromkeys(requested))
        if not requested:
            requested = list(meta.targets or [])
        real = await self.t.view.resolve(requested)
        res = await self.db.execute([FileResults.read(task_id, real.get(r, r)) for r in requested])
        out = []
        for r, reply in zip(requested, res):
            items = FileResults.decode(reply)
            for name in sorted(items, key=FileResults.order):
                item = items[name]
                status = ScriptStatus.DISPATCHED if item.status is None else item.status
                code = item_error_code(status, item.error_code)
                content = {k: d if (x := getattr(item, k)) is None else x for k, d in (
                    ("mode", 1), ("source_agent_id", ""), ("source_file_dir", ""), ("source_file_name", ""),
                    ("dest_agent_id", r), ("dest_file_dir", ""), ("dest_file_name", ""), ("progress", 0),
                    ("speed", 0), ("size", 0), ("status_info", ""), ("type", ""), ("start_time", 0),
                    ("end_time", 0))}
                content["status"] = int(status)
                if item.dest_path:
                    content["dest_path"] = item.dest_path
                out.append({"bk_agent_id": r, "error_code": code, "error_msg": item.error_msg or "",
                            "content": content})
        return {"result": out}

    async def async_terminate_transfer_file(self, body: dict, _req):
        """async_terminate_transfer_file (spec §4): `{task_id, agents?: [{bk_agent_id}]}` -> `{result: {task_id}}`.
        With `agents` naming some targets, only their items end (126, ScriptStatus STOPPED) and their downloads
        stop on the agents; the other targets carry on to completion. With no `agents`, or with the source or
        every target of a transfer among them (bk-job names the source and every target of the task), that whole
        transfer ends: its unfinished items end with 126. Each transfer of the task is terminated on its
        coordinating task server; agents that are not in a transfer change nothing of it. BadRequest for an
        unknown task id, one that is not a transfer, or a bad agent id."""
        task_id = self.t.task_id_of(body)
        meta = await self.t.task_record(task_id)
        if meta.kind not in ("file", "push"):
            raise BadRequest(f"'task_id' {task_id} is not a file transfer")
        requested = self._agents(body)
        real = await self.t.view.resolve(requested) if requested else {}
        agent_ids = list(dict.fromkeys(real.get(r, r) for r in requested))
        for index, node in (meta.coordinators or {}).items():
            await self.t.servers.terminate_transfer(node, f"{task_id}/{index}", agent_ids)
        return {"result": {"task_id": task_id}}


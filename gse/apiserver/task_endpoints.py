"""Script execution endpoints (v2 task API): async_execute_script, get_execute_script_result,
async_terminate_execute_script, served at both /api/v2/task/<name> and /api/v2/task/extensions/<name>.

Dispatch is one call per task server holding targets (agents grouped by server and run-as user), never one
per agent; agents that are offline get error 117 at once.

What is stored before the dispatch is one write, whatever the number of targets: the task record naming every
target (and the 117 items of offline targets). Items are written by the task servers from the agents' reports;
a target's item not written yet reads as dispatched (its dispatch time is the task's creation, its warning the
task's). A store that fails answers an error and dispatches nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from gse.common.errors import (BadRequest, Blocked, ErrorCode, GseError, ScriptStatus, TaskNotKnown,
                               Unavailable, item_error_code)
from gse.common.logs import set_trace
from gse.common.records import SESSION_FIELDS, AgentRecord, TaskItem, TaskOutput, TaskRecord, new_task_id, now_ms
from gse.common import wire
from gse.common.screen import whole_chars
from gse.common.taskgraph import dependency_cycle
from gse.pb import agent_pb2 as apb
from gse.pb import dbproxy_pb2 as dpb

from . import validate as v
from .agents_view import AgentsView, check_reads
from .app import Api
from .command_guard import CommandGuard
from .taskservers import TaskServers

log = logging.getLogger("gse.apiserver.tasks")

REROUTE_INTERVAL_S = 0.5    # how often the sessions of agents that moved are read again while re-routing

NO_OUTPUT = dpb.Result(ok=True)        # what an item without output reads as
MAX_ITEMS_PER_READ = 100_000
READ_BUDGET = 64 * 1024 * 1024
MAX_OFFSET = 2 ** 40     # output offsets and limits: far beyond any item's output, well inside Redis' int64
# What a script result read takes of the task record: not the targets (a broadcast's are hundreds of KB), which
# are read only when some item asked for is not written yet.
SCRIPT_META = ("kind", "created", "atomic_ids", "warnings")
# Target sets a result reader keeps (a task's never change), bounded by their agents in all (~110 bytes each):
# many big tasks with items not written yet (chained steps, agents' busy script slots) polled in turn must not
# read their target lists on every poll.
TARGET_CACHE_AGENTS = 300_000


@dataclass
class Target:
    """One agent a task names: as the caller wrote it, its bk_agent_id, and its session (None: never seen)."""
    requested: str         # the id as the caller wrote it
    agent_id: str          # the real bk_agent_id ("" when never seen)
    container: str
    user: str
    record: AgentRecord | None


class TaskEndpoints:
    """Script tasks (spec §4): dispatch to the task servers holding the targets, results from Redis."""

    def __init__(self, view: AgentsView, servers: TaskServers, guard: CommandGuard, *, max_hosts: int,
                 result_ttl_ms: int, offline_grace_ms: int, default_limit: int = 10 * 1024 * 1024):
        self.view = view
        self.db = view.db
        self.servers = servers
        self.guard = guard
        self.max_hosts = max_hosts
        self.ttl = result_ttl_ms
        self.offline_grace_ms = offline_grace_ms
        self.default_limit = default_limit
        self._background: set[asyncio.Task] = set()
        self._targets: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._targets_size = 0

    def register(self, api: Api) -> None:
        """Serve the script endpoints at /api/v2/task/<name> and /api/v2/task/extensions/<name>."""
        for prefix in ("/api/v2/task", "/api/v2/task/extensions"):
            api.route(f"{prefix}/async_execute_script", self.async_execute_script)
            api.route(f"{prefix}/get_execute_script_result", self.get_execute_script_result)
            api.route(f"{prefix}/async_terminate_execute_script", self.async_terminate_execute_script)

    # ---- request parsing --------------------------------------------------------------------------

    def _agents(self, body: dict) -> list[tuple[str, str, str]]:
        out, seen = [], set()
        for i, a in enumerate(v.lst(body, "agents", max_len=self.max_hosts)):
            where = f"agents[{i}]."
            if not isinstance(a, dict):
                raise BadRequest(f"'agents[{i}]' must be an object with bk_agent_id and user")
            aid = v.agent_ids({"bk_agent_id": [v.string(a, "bk_agent_id", where=where, max_len=64)]}, "bk_agent_id")[0]
            user = v.string(a, "user", required=False, default="root", where=where, max_len=64) or "root"
            container = v.string(a, "bk_container_id", required=False, where=where, max_len=128)
            if (aid, container) in seen:
                raise BadRequest(f"'agents[{i}].bk_agent_id' {aid} is listed twice")
            seen.add((aid, container))
            out.append((aid, container, user))
        return out

    def _scripts(self, body: dict) -> list[tuple[apb.TaskScript, bytes]]:
        """Each script as (TaskScript without its content, the content as UTF-8): the content, up to 16 MiB,
        travels into the frame as serialized parts (`gse.common.wire`), never through the message classes."""
        out = []
        for i, s in enumerate(v.lst(body, "scripts", required=False, non_empty=False)):
            where = f"scripts[{i}]."
            if not isinstance(s, dict):
                raise BadRequest(f"'scripts[{i}]' must be an object")
            name = v.string(s, "script_name", where=where, max_len=255)
            if "/" in name or name in (".", ".."):
                raise BadRequest(f"'{where}script_name' must be a plain file name, not a path")
            store = v.string(s, "script_store_dir", where=where)
            if not os.path.isabs(store) or ".." in store.split("/"):
                raise BadRequest(f"'{where}script_store_dir' must be an absolute path without '..'")
            content = v.string(s, "script_content", required=False, where=where, max_len=16 * 1024 * 1024)
            out.append((apb.TaskScript(name=name, store_dir=store), content.encode()))
        return out

    def _atomic(self, body: dict) -> list[apb.AtomicTask]:
        tasks: dict[int, apb.AtomicTask] = {}
        for i, t in enumerate(v.lst(body, "atomic_tasks", max_len=1000)):
            where = f"atomic_tasks[{i}]."
            if not isinstance(t, dict):
                raise BadRequest(f"'atomic_tasks[{i}]' must be an object")
            tid = v.integer(t, "atomic_task_id", where=where, minimum=0, maximum=2**31 - 1)
            if tid in tasks:
                raise BadRequest(f"'{where}atomic_task_id' {tid} is used twice")
            cmd = v.string(t, "command", where=where, max_len=1024 * 1024)
            timeout = v.integer(t, "timeout_seconds", required=False, default=0, where=where, minimum=0,
                                maximum=30 * 86400)
            tasks[tid] = apb.AtomicTask(atomic_task_id=tid, command=cmd, timeout_seconds=timeout)
        relations = v.lst(body, "atomic_tasks_relations", required=False, non_empty=False, max_len=10_000)
        for i, r in enumerate(relations):
            where = f"atomic_tasks_relations[{i}]."
            if not isinstance(r, dict):
                raise BadRequest(f"'atomic_tasks_relations[{i}]' must be an object")
            tid = v.integer(r, "atomic_task_id", where=where)
            if tid not in tasks:
                raise BadRequest(f"'{where}atomic_task_id' {tid} is not one of the atomic_tasks")
            deps = v.lst(r, "atomic_task_id_idx", required=False, non_empty=False, max_len=1000)
            dep_ids = []
            for j, d in enumerate(deps):
                d = v.integer_value(d, f"{where}atomic_task_id_idx[{j}]")
                dep_ids.append(d)
                if d not in tasks:
                    raise BadRequest(f"'{where}atomic_task_id_idx[{j}]' is not one of the atomic_tasks")
                if d == tid:
                    raise BadRequest(f"'{where}atomic_task_id_idx[{j}]': a task cannot depend on itself")
            known = set(tasks[tid].depends_on)
            tasks[tid].depends_on.extend(d for d in dict.fromkeys(dep_ids) if d not in known)
        cycle = dependency_cycle({t: list(a.depends_on) for t, a in tasks.items()})
        if cycle:
            raise BadRequest(f"'atomic_tasks_relations' has a cycle: {' -> '.join(map(str, cycle))}")
        return list(tasks.values())

    # ---- endpoints --------------------------------------------------------------------------------

    async def async_execute_script(self, body: dict, req):
        """`{agents, scripts?, atomic_tasks, atomic_tasks_relations?}` -> `{result: {task_id}}` (spec §4)."""
        agents = self._agents(body)
        scripts = self._scripts(body)
        atomic = self._atomic(body)
        texts = [t.command for t in atomic] + [content for _s, content in scripts]
        blocked, warnings = await self.guard.check_async(texts)
        if blocked is not None:
            raise Blocked(f"refused by high-risk command rule '{blocked.name}' ({blocked.severity}): "
                          f"{blocked.message}")
        task_id = new_task_id()
        set_trace(task_id=task_id)
        targets = await self._resolve([a for a, _c, _u in agents], agents)
        _refuse_aliases(targets)
        at = now_ms()
        warning_text = "; ".join(f"{w.name}: {w.message}" for w in warnings)
        ops = [TaskRecord.update(task_id, ttl_ms=self.ttl, kind="script", created=at, request_id=req.request_id,
                                 atomic_ids=[t.atomic_task_id for t in atomic], agent_count=len(targets),
                                 warnings=warning_text, targets=[t.agent_id or t.requested for t in targets]).op()]
        by_node_user: dict[tuple[str, str], list[str]] = defaultdict(list)
        offline: set[int] = set()
        for n, t in enumerate(targets):
            if t.record is not None and t.record.alive(at):
                by_node_user[(t.record.node, t.user)].append(t.agent_id)
            else:
                offline.add(n)
        # Items of reachable agents are not written here: the task record names them, and their results write
        # them. Offline ones end at once (encoded once, written under each item's key).
        unreachable = TaskItem.update(task_id, "", 0, ttl_ms=self.ttl, status=ScriptStatus.FAILED,
                                      error_code=ErrorCode.AGENT_OFFLINE, error_msg="agent is offline", end_time=at)
        item_key = TaskItem.key
        for n in offline:
            t = targets[n]
            for a in atomic:
                ops.append(unreachable.at(item_key(task_id, t.agent_id or t.requested, a.atomic_task_id)).op())
        by_user: dict[str, dict[str, list[str]]] = defaultdict(dict)
        for (node, user), ids in by_node_user.items():
            by_user[user][node] = ids
        # Stored before it is dispatched: a store that fails answers an error and no agent runs anything.
        await self.store(ops)
        log.info("task accepted", extra={"kind": "script", "targets": len(targets), "offline": len(offline),
                                         "atomic_tasks": len(atomic), "warnings": len(warnings)})
        frames = {user: task_frame(apb.TaskRequest(task_id=task_id, user=user, atomic_tasks=atomic, created_ms=at,
                                                   request_id=req.request_id), scripts) for user in by_user}
        sessions = {t.agent_id: t.record for t in targets if t.record is not None}
        moved = await self._dispatch(task_id, frames, by_user, sessions, [a.atomic_task_id for a in atomic])
        if moved:
            self._spawn(self._reroute(task_id, frames, moved, [a.atomic_task_id for a in atomic],
                                      time.monotonic() + self.offline_grace_ms / 1000))
        return {"result": {"task_id": task_id}}

    async def _dispatch(self, task_id: str, frames: dict[str, list[bytes]], by_user: dict[str, dict[str, list[str]]],
                        sessions: dict[str, AgentRecord], atomic_ids: list[int]) -> dict[str, tuple]:
        """Send the task's frame (one per run-as user) to the task servers holding the agents. Agents a task
        server no longer holds (it restarted, the agent moved) are returned as {bk_agent_id: (user, node,
        connect_time)} to be re-routed; any other failure ends the agent's items with its code."""
        results = await asyncio.gather(*(self.servers.dispatch(frames[user], by_node)
                                         for user, by_node in by_user.items()))
        moved: dict[str, tuple] = {}
        failed = []
        for (user, by_node), failures in zip(by_user.items(), results):
            node_of = {a: n for n, ids in by_node.items() for a in ids}
            for aid, code, msg in failures:
                if code == ErrorCode.AGENT_OFFLINE:
                    rec = sessions.get(aid)
                    moved[aid] = (user, node_of.get(aid, ""), rec.connect_time if rec else 0)
                else:
                    failed.append((aid, code, msg))
        if failed:
            log.warning("task refused by some agents' task servers", extra={"count": len(failed),
                                                                          "first": failed[0][2]})
            await self._fail_items(task_id, atomic_ids, failed)
        return moved

    async def _reroute(self, task_id: str, frames: dict[str, list[bytes]], pending: dict[str, tuple],
                       atomic_ids: list[int], deadline: float) -> None:
        """Deliver the task to agents whose task server did not hold them any more, once their session shows
        them attached again (to another task server, or anew to the same one), until `deadline`
        (offline_grace_s after the dispatch); what is still undelivered then ends with 117."""
        log.info("re-routing task to agents that moved", extra={"agents": len(pending)})
        rerouted = 0
        try:
            while pending and time.monotonic() < deadline:
                await asyncio.sleep(REROUTE_INTERVAL_S)
                records = await self.view.records(list(pending), SESSION_FIELDS)
                at = now_ms()
                by_user: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
                for aid, (user, node, connected) in pending.items():
                    rec = records.get(aid)
                    if rec is not None and rec.alive(at) and (rec.node != node or rec.connect_time > connected):
                        by_user[user][rec.node].append(aid)
                if not by_user:
                    continue
                sessions = {aid: records[aid] for by_node in by_user.values() for ids in by_node.values()
                            for aid in ids}
                tried = set(sessions)
                moved = await self._dispatch(task_id, frames, by_user, sessions, atomic_ids)
                for aid in tried:
                    pending.pop(aid, None)
                pending.update(moved)
                rerouted += len(tried) - len(moved)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - what is left ends with 117 below, never silently running
            log.exception("re-routing failed")
        if pending:
            await self._fail_items(task_id, atomic_ids, [
                (aid, ErrorCode.AGENT_OFFLINE, "agent was not reachable on any task server") for aid in pending])
        log.info("task re-routed", extra={"delivered": rerouted, "undelivered": len(pending)})

    async def _fail_items(self, task_id: str, atomic_ids: list[int], failures: list[tuple[str, int, str]]) -> None:
        end = now_ms()
        await self.store([TaskItem.update(task_id, aid, tid, ttl_ms=self.ttl, status=ScriptStatus.FAILED,
                                           error_code=code, error_msg=msg, end_time=end).op()
                           for aid, code, msg in failures for tid in atomic_ids])

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop re-routing (at shutdown)."""
        for t in list(self._background):
            t.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=2)

    async def get_execute_script_result(self, body: dict, _req):
        """`{task_id, agent_tasks: [{bk_agent_id, atomic_tasks: [{atomic_task_id, offset, limit}]}]}` ->
        `{result: [...]}` (spec §4); `offset`/`limit` page the output in bytes."""
        task_id = self.task_id_of(body)
        wanted = []
        for i, at in enumerate(v.lst(body, "agent_tasks", max_len=self.max_hosts)):
            where = f"agent_tasks[{i}]."
            if not isinstance(at, dict):
                raise BadRequest(f"'agent_tasks[{i}]' must be an object")
            aid = v.agent_ids({"x": [v.string(at, "bk_agent_id", where=where, max_len=64)]}, "x")[0]
            container = v.string(at, "bk_container_id", required=False, where=where, max_len=128)
            for j, item in enumerate(v.lst(at, "atomic_tasks", required=False, non_empty=False)):
                w2 = f"{where}atomic_tasks[{j}]."
                if not isinstance(item, dict):
                    raise BadRequest(f"'{where}atomic_tasks[{j}]' must be an object")
                wanted.append((aid, container, v.integer(item, "atomic_task_id", where=w2, minimum=0),
                               v.integer(item, "offset", required=False, default=0, where=w2, minimum=0,
                                         maximum=MAX_OFFSET),
                               v.integer(item, "limit", required=False, default=0, where=w2, minimum=0,
                                         maximum=MAX_OFFSET)))
        meta = await self.task_record(task_id, TaskNotKnown, names=SCRIPT_META)
        if meta.kind not in ("", "script"):
            raise BadRequest(f"'task_id' {task_id} is not a script task")
        if not wanted:      # no atomic tasks named: every atomic task of the task, whole output
            for i, at in enumerate(body["agent_tasks"]):
                aid = at["bk_agent_id"]
                for tid in meta.atomic_ids or []:
                    wanted.append((aid, at.get("bk_container_id", "") or "", tid, 0, 0))
                if len(wanted) > MAX_ITEMS_PER_READ:
                    break
        if len(wanted) > MAX_ITEMS_PER_READ:
            raise BadRequest(f"'agent_tasks' names more than {MAX_ITEMS_PER_READ} items; read them in several calls")
        # Output per item: `limit` (0 = the whole output, up to default_limit), but no more than READ_BUDGET for
        # the call in all (at least 64 KiB per item): one read must not fetch gigabytes. A shorter page is
        # what a paging client expects anyway (it advances by what it got).
        share = max(64 * 1024, READ_BUDGET // max(1, len(wanted)))
        wanted = [(a, c, t, off, min(limit or self.default_limit, share)) for a, c, t, off, limit in wanted]
        requested = list(dict.fromkeys(w[0] for w in wanted))
        real = await self.view.resolve(requested)
        real = {r: real.get(r, r) for r in requested}
        res = await self.db.execute([TaskItem.read(task_id, real[aid], tid) for aid, _c, tid, _o, _l in wanted])
        check_reads(res, "task results")
        items = [TaskItem.decode(r) for r in res]
        if any(f is None for f in items):
            # Not written yet: dispatched when the agent is a target (its result has not come), else not the task's.
            targets, atomic_ids = await self._target_set(task_id), set(meta.atomic_ids or [])
            items = [f if f is not None or real[w[0]] not in targets or w[2] not in atomic_ids else TaskItem()
                     for w, f in zip(wanted, items)]
        # Output is read only for items that have some past the offset (`out_end`, written with every chunk,
        # or the final `output_size`) and do not hold it themselves (`output`): most items of a big task that is
        # being polled have none yet, most finished ones of short commands hold theirs.
        need = [n for n, f in enumerate(items) if f is not None and f.output_known > wanted[n][3] and not f.output]

        async def outputs() -> dict:
            """The output pages of the items in `need`, read in one batch: item index -> the GETRANGE result."""
            if not need:
                return {}
            ops = []
            for n in need:
                aid, _c, tid, off, limit = wanted[n]
                # 3 bytes beyond the page: a first character longer than `limit` still fits whole.
                ops.append(TaskOutput.read(task_id, real[aid], tid, off, (limit or self.default_limit) + 3))
            return dict(zip(need, await self.db.execute(ops)))

        # Only agents with unfinished items are looked up: an agent gone for good must not keep a caller
        # polling forever. Not those dispatched within the offline grace, either: they were alive at dispatch
        # (deadline >= dispatch time), so none of them can have been gone longer than the grace yet. A
        # broadcast being polled reads no session records at all in its first `offline_grace_s`.
        at_ms = now_ms()
        unfinished = {real[w[0]] for w, f in zip(wanted, items)
                      if f is not None and not f.final and not self._within_grace(meta, at_ms)}

        async def session_records() -> dict:
            """The session fields of the agents with unfinished items, in one batch."""
            return await self.view.records(list(unfinished), SESSION_FIELDS) if unfinished else {}

        screens, records = await asyncio.gather(outputs(), session_records())
        for n, f in enumerate(items):
            if f is not None and f.output:
                off, limit = wanted[n][3], wanted[n][4] or self.default_limit
                screens[n] = dpb.Result(ok=True, found=True, value=f.output[off:off + limit + 3])
        out = []
        for n, (aid, container, tid, off, limit) in enumerate(wanted):
            f, screen = items[n], screens.get(n, NO_OUTPUT)
            entry = {"bk_agent_id": aid, "bk_container_id": container, "atomic_task_id": tid}
            if f is None:
                entry.update(status=ScriptStatus.FAILED, error_code=ErrorCode.FAILED,
                             error_msg="this agent and atomic task are not part of the task", start_time=0,
                             end_time=0, script_exit_code=0, tag="", screen="")
                out.append(entry)
                continue
            status, code, msg = f.status, f.error_code, f.error_msg
            if f.final and not self._output_landed(f, screen, off, limit or self.default_limit, at_ms):
                # The result is stored but its output not yet (replicas are written in parallel): the caller
                # must not take the item as finished with a short screen; it will read it whole next time.
                status, msg = ScriptStatus.RUNNING, ""
            elif not f.final:
                record = records.get(real[aid])
                gone = not self._within_grace(meta, at_ms) and (
                    record is None or (not record.alive(at_ms) and at_ms - record.deadline > self.offline_grace_ms))
                if gone:
                    status, code, msg = (ScriptStatus.FAILED, ErrorCode.AGENT_OFFLINE,
                                         "agent went offline before reporting a result")
            entry.update(status=int(status), error_code=item_error_code(status, code), error_msg=msg,
                         start_time=f.start_time,
                         end_time=f.end_time, script_exit_code=f.exit_code, tag="",
                         screen=page_text(screen, limit or self.default_limit))
            if meta.warnings:
                entry["warning"] = meta.warnings
            if f.truncated:
                entry["truncated"] = True
            out.append(entry)
        return {"result": out}

    async def async_terminate_execute_script(self, body: dict, _req):
        """async_terminate_execute_script (spec §4): `{task_id, agents: [{bk_agent_id}]}` -> `{result: {task_id}}`.
        The terminate goes to the task servers holding those of the agents that are alive (their running items end
        with 126); offline agents are skipped. BadRequest for an unknown task id or a bad agent id."""
        task_id = self.task_id_of(body)
        await self.task_record(task_id, names=("kind",))
        ids = []
        for i, a in enumerate(v.lst(body, "agents", max_len=self.max_hosts)):
            if not isinstance(a, dict):
                raise BadRequest(f"'agents[{i}]' must be an object with bk_agent_id")
            ids.append(v.agent_ids({"x": [v.string(a, "bk_agent_id", where=f"agents[{i}].", max_len=64)]}, "x")[0])
        by_node: dict[str, list[str]] = defaultdict(list)
        at = now_ms()
        for t in await self._resolve(ids):
            if t.record is not None and t.record.alive(at):
                by_node[t.record.node].append(t.agent_id)
        await self.servers.terminate(task_id, by_node)
        return {"result": {"task_id": task_id}}

    # ---- helpers ----------------------------------------------------------------------------------

    OUTPUT_LAG_MS = 30_000

    def _output_landed(self, f: TaskItem, screen, off: int, limit: int, at_ms: int) -> bool:
        """Whether the output read for a finished item is all the agent reported (`output_size`). A read
        that came up short is only waited for `OUTPUT_LAG_MS` after the item ended: output that never
        arrives (a write lost on every replica) must not keep a caller polling forever."""
        expected = max(0, min(f.output_size - off, limit))
        if expected == 0:
            return True
        got = min(len(screen.value), limit) if screen.ok else 0
        if got >= expected:
            return True
        return f.end_time > 0 and at_ms - f.end_time > self.OUTPUT_LAG_MS

    def _within_grace(self, meta: TaskRecord, at_ms: int) -> bool:
        """The task was dispatched (to agents that were alive) no longer than offline_grace ago, so none of its
        targets can read as gone yet."""
        return meta.created > 0 and at_ms - meta.created <= self.offline_grace_ms

    async def _target_set(self, task_id: str) -> frozenset[str]:
        """The bk_agent_ids a script task was sent to (its record's `targets`; empty for a task stored without
        them), kept for the tasks read last up to TARGET_CACHE_AGENTS agents in all: a task's targets never
        change. Unavailable when dbproxy cannot read the record now (nothing is kept then)."""
        got = self._targets.get(task_id)
        if got is not None:
            self._targets.move_to_end(task_id)
            return got
        names = ("targets",)
        (r,) = await self.db.execute([TaskRecord.pick(task_id, names=names)])
        if not r.ok:
            raise Unavailable(f"the task's targets cannot be read now: {r.error}")
        rec = TaskRecord.decode(r, names)
        got = frozenset(rec.targets or []) if rec is not None else frozenset()
        if rec is not None:
            self._targets[task_id] = got
            self._targets_size += len(got)
            while self._targets_size > TARGET_CACHE_AGENTS and len(self._targets) > 1:
                self._targets_size -= len(self._targets.popitem(last=False)[1])
        return got

    def task_id_of(self, body: dict) -> str:
        """The `task_id` of a result or terminate request (spec §4; script and file tasks alike), put in the
        request's trace; BadRequest when it is missing or not a task id."""
        task_id = v.task_id(body)
        set_trace(task_id=task_id)
        return task_id

    async def task_record(self, task_id: str, unknown: type[GseError] | None = None,
                          names: tuple[str, ...] | None = None) -> TaskRecord:
        """The task's record (kind, coordinators, targets...; only `names` when given); an unknown id raises
        `unknown(task_id)` (result reads: TaskNotKnown) or, for operations on a task, a BadRequest."""
        op = TaskRecord.read(task_id) if names is None else TaskRecord.pick(task_id, names=names)
        (r,) = await self.db.execute([op])
        meta = TaskRecord.decode(r, names)
        if meta is None:
            if unknown is not None:
                raise unknown(task_id)
            raise BadRequest(f"'task_id' {task_id} is unknown (or its results expired)")
        return meta

    async def _resolve(self, requested: list[str], agents=None) -> list[Target]:
        records = await self.view.by_ids(requested, SESSION_FIELDS)
        users = {a: (c, u) for a, c, u in agents} if agents else {}
        out = []
        for r in requested:
            rec = records.get(r)
            c, u = users.get(r, ("", "root"))
            out.append(Target(r, rec.agent_id if rec else "", c, u, rec))
        return out

    async def store(self, ops) -> None:
        """Store dbproxy `ops` (task records and items, in batches of 20,000); Unavailable (503) when dbproxy could
        not reach a replica, GseError when it refused."""
        for i in range(0, len(ops), 20_000):
            res = await self.db.execute(ops[i:i + 20_000])
            bad = [r for r in res if not r.ok]
            if bad:
                if all(r.retryable for r in bad):
                    raise Unavailable(f"storing task state failed: {bad[0].error}")
                raise GseError(f"storing task state failed: {bad[0].error}")


def task_frame(request: apb.TaskRequest, scripts: list[tuple[apb.TaskScript, bytes]]) -> list[bytes]:
    """The ServerFrame carrying `request` with `scripts` (each a TaskScript without content, and the content),
    as serialized parts to be joined once where it is sent (`gse.common.wire`: a 16 MiB script copied
    through the message classes cost 60-80 ms of the event loop)."""
    body = [request.SerializeToString()]
    for script, content in scripts:
        body += wire.length_delimited(apb.TaskRequest, "scripts", [
            script.SerializeToString(), *wire.length_delimited(apb.TaskScript, "content", [content])])
    return wire.length_delimited(apb.ServerFrame, "task", body)


def page_text(screen, limit: int) -> str:
    """An item's `screen` page from the bytes read at its offset: whole characters only, at most `limit` bytes
    unless its first character alone is longer (gse/common/screen.py). Stored output is UTF-8 the agent
    converted; anything else (an offset inside a character) reads as U+FFFD rather than failing."""
    if not screen.ok:
        return ""
    return whole_chars(screen.value, limit).decode("utf-8", "replace")


def _refuse_aliases(targets: list[Target]) -> None:
    """One agent named twice in one task (by bk_agent_id and as cloud:ip, or as two cloud:ip forms) is refused
    like a duplicate id: its items would be one record, and two run-as users on one host cannot share it."""
    first: dict[tuple[str, str], int] = {}
    for n, t in enumerate(targets):
        if not t.agent_id:
            continue
        seen = first.setdefault((t.agent_id, t.container), n)
        if seen != n:
            raise BadRequest(f"'agents[{n}].bk_agent_id' {t.requested} names the same agent as "
                             f"'agents[{seen}].bk_agent_id' {targets[seen].requested}")

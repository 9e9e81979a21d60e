"""Tasks on the agent: run what the task server sends, stream output back, keep results until acknowledged.

Every item's output is kept (bounded by the executor) until its final result is acknowledged; output goes
up as chunks at byte offsets, so after a reconnect the whole output can be sent again and lands on the same
bytes. A journal in the data dir records the tasks in flight: after a restart, finished but unacknowledged
results are sent again and items that were still running are reported as status 6 (agent restarted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gse.common.lazymetrics import Counter

from gse.common.errors import FINAL_STATUSES, ErrorCode, ScriptStatus
from gse.common.logs import trace
from gse.pb import agent_pb2 as pb

from .executor import AtomicTask, Busy, ItemUpdate, LoginEnvironments, Pools, Script, TaskRun

log = logging.getLogger("gse.agent.tasks")

TASKS = Counter("gse_agent_tasks_total", "Tasks received", ["outcome"])
CHUNK = 1024 * 1024
SEEN_MAX = 10_000           # task ids remembered against a second delivery of the same task


@dataclass
class Item:
    """One atomic task of a task on this agent: its output so far (bytes, capped by the executor), how much of it was
    sent since the last attach, and its latest result (`dirty`: not sent since it changed)."""
    task_id: str
    atomic_id: int
    out: bytearray = field(default_factory=bytearray)
    sent: int = 0
    result: pb.TaskItemResult | None = None
    dirty: bool = False

    @property
    def final(self) -> bool:
        """The item has a final result (kept until the server acknowledges it)."""
        return self.result is not None and self.result.final


class TaskManager:
    """The agent's task handler (spec section 4, async_execute_script): runs the TaskRequest frames the task server
    sends, one executor slot ("script" pool) per task, streams output in 1 MiB chunks at byte offsets and results in
    TaskReport frames (coalesced for `flush_s` seconds, a final result at once), and keeps each item until its result is
    acknowledged, journaled in `<data_dir>/tasks/`."""
    def __init__(self, data_dir: str, send: Callable[[pb.AgentFrame], bool], pools: Pools,
                 max_output_bytes: int = 10 * 1024 * 1024, kill_grace_s: float = 3.0, flush_s: float = 0.05,
                 code_page: str = "utf8", login_env_max_age_s: float = 600.0):
        self.journal_dir = Path(data_dir) / "tasks"
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.send = send                    # returns False while not attached
        self.pools = pools
        self.max_output = max_output_bytes
        self.kill_grace_s = kill_grace_s
        self.code_page = code_page
        self.login = LoginEnvironments(login_env_max_age_s)
        self.flush_s = flush_s
        self.items: dict[tuple[str, int], Item] = {}
        self.runs: dict[str, TaskRun] = {}
        self.seen: OrderedDict[str, None] = OrderedDict()     # task ids received lately (newest last)
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- journal ----------------------------------------------------------------------------------

    def _journal_path(self, task_id: str) -> Path:
        return self.journal_dir / (task_id.replace("/", "_").replace(":", "_") + ".json")

    def _journal(self, task_id: str) -> None:
        items = {str(a): (it.result.SerializeToString().hex() if it.final else None)
                 for (t, a), it in self.items.items() if t == task_id}
        path = self._journal_path(task_id)
        if not items:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"task_id": task_id, "items": items}))
        os.replace(tmp, path)

    def recover(self) -> int:
        """After a restart: resend finished results, report unfinished items as lost to the restart."""
        n = 0
        now = int(time.time() * 1000)
        for path in self.journal_dir.glob("*.json"):
            try:
                doc = json.loads(path.read_text())
                task_id = doc["task_id"]
                for atomic, blob in doc["items"].items():
                    item = Item(task_id, int(atomic))
                    if blob:
                        item.result = pb.TaskItemResult.FromString(bytes.fromhex(blob))
                    else:
                        item.result = pb.TaskItemResult(
                            task_id=task_id, atomic_task_id=int(atomic), status=ScriptStatus.AGENT_RESTARTED,
                            error_code=ErrorCode.FAILED, error_msg="the agent restarted while this ran",
                            end_time_ms=now, final=True)
                    item.dirty = True
                    self.items[(task_id, int(atomic))] = item
                    n += 1
                self._journal(task_id)
            except (OSError, ValueError, KeyError) as exc:
                log.error("unreadable task journal; dropped", extra={"path": str(path), "error": repr(exc)})
                path.unlink(missing_ok=True)
        return n

    def prewarm(self, user: str = "root") -> None:
        """Capture `user`'s login environment now (in the background), so the first task does not pay for it."""
        t = asyncio.ensure_future(self.login.prewarm(user))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- from the server --------------------------------------------------------------------------

    def on_task(self, req: pb.TaskRequest) -> None:
        """Run a task the server sent; a task id seen before (a dispatch re-routed or retried) is not run again."""
        if req.task_id in self.seen or any(t == req.task_id for t, _a in self.items):
            log.info("task received again; not run twice", extra={"task_id": req.task_id})
            return
        self.seen[req.task_id] = None
        while len(self.seen) > SEEN_MAX:
            self.seen.popitem(last=False)
        atomic = [AtomicTask(t.atomic_task_id, t.command, t.timeout_seconds) for t in req.atomic_tasks]
        for a in atomic:
            self.items.setdefault((req.task_id, a.atomic_task_id), Item(req.task_id, a.atomic_task_id))
        self._journal(req.task_id)
        scripts = [Script(s.name, s.store_dir, s.content.decode("utf-8", "surrogateescape")) for s in req.scripts]
        relations = {t.atomic_task_id: list(t.depends_on) for t in req.atomic_tasks if t.depends_on}
        try:
            run = TaskRun(req.task_id, req.user or "root", scripts, atomic, relations,
                          on_update=lambda u, tid=req.task_id: self._on_update(tid, u),
                          max_output_bytes=req.max_output_bytes or self.max_output, kill_grace_s=self.kill_grace_s,
                          code_page=self.code_page, login=self.login)
        except ValueError as exc:
            self._fail_all(req.task_id, atomic, str(exc))
            TASKS.labels("refused").inc()
            return
        self.runs[req.task_id] = run
        with trace(task_id=req.task_id, request_id=req.request_id):   # the run's log lines name the task
            log.info("task received", extra={"user": req.user or "root", "atomic_tasks": len(atomic),
                                             "scripts": len(scripts)})
            t = asyncio.ensure_future(self._run(req.task_id, run, atomic))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self, task_id: str, run: TaskRun, atomic) -> None:
        try:
            async with self.pools.slot("script"):
                await run.run()
            TASKS.labels("ran").inc()
        except Busy as exc:
            TASKS.labels("busy").inc()
            self._fail_all(task_id, atomic, f"agent busy: {exc}")
        except Exception as exc:  # noqa: BLE001 - a failed run must end its items, never the agent
            log.exception("task run failed", extra={"task_id": task_id})
            self._fail_all(task_id, atomic, f"agent error: {exc!r}")
        finally:
            self.runs.pop(task_id, None)

    def on_terminate(self, task_id: str) -> None:
        """The `terminate` frame handler: stop the run of `task_id` if it runs here (its items end 126 terminated); an
        unknown id is ignored."""
        run = self.runs.get(task_id)
        if run is not None:
            run.terminate()

    def on_ack(self, ack: pb.ResultAck) -> None:
        """The `ack` frame handler: drop the acknowledged items that are final and update their tasks' journals.
        """
        touched: dict[str, int] = {}
        for ref in ack.items:
            item = self.items.get((ref.task_id, ref.atomic_task_id))
            if item is not None and item.final:
                del self.items[(ref.task_id, ref.atomic_task_id)]
                touched[ref.task_id] = touched.get(ref.task_id, 0) + 1
        for task_id, n in touched.items():
            self._journal(task_id)
            with trace(task_id=task_id):
                log.info("results stored by the server", extra={"items": n})

    def on_attach(self) -> None:
        """A new session: send every kept output from the start and every kept result again."""
        for item in self.items.values():
            item.sent = 0
            item.dirty = item.result is not None
        self._schedule()

    # ---- to the server ----------------------------------------------------------------------------

    def _fail_all(self, task_id: str, atomic, message: str) -> None:
        now = int(time.time() * 1000)
        for a in atomic:
            self._on_update(task_id, ItemUpdate(a.atomic_task_id, ScriptStatus.FAILED, ErrorCode.FAILED, message,
                                                now, now, None, b"", False))

    def _on_update(self, task_id: str, u: ItemUpdate) -> None:
        item = self.items.get((task_id, u.atomic_task_id))
        if item is None:
            item = self.items[(task_id, u.atomic_task_id)] = Item(task_id, u.atomic_task_id)
        if u.output_chunk:
            item.out += u.output_chunk
        final = u.status in FINAL_STATUSES
        item.result = pb.TaskItemResult(
            task_id=task_id, atomic_task_id=u.atomic_task_id, status=u.status, error_code=u.error_code,
            error_msg=u.error_msg, start_time_ms=u.start_time_ms or 0, end_time_ms=u.end_time_ms or 0,
            exit_code=u.exit_code if u.exit_code is not None else 0, has_exit_code=u.exit_code is not None,
            output_size=len(item.out), truncated=u.truncated, final=final)
        item.dirty = True
        if final:
            log.info("item finished", extra={"task_id": task_id, "atomic_task_id": u.atomic_task_id,
                                             "status": int(u.status), "error_code": int(u.error_code),
                                             "exit_code": u.exit_code, "output_bytes": len(item.out)})
            self._journal(task_id)
        self._schedule(now=final)

    def _schedule(self, now: bool = False) -> None:
        """Output is coalesced for `flush_s`; a final result goes on the next loop turn."""
        loop = asyncio.get_running_loop()
        if now:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = loop.call_soon(self.flush)
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        """Send one TaskReport of unsent output (up to 4 MiB per call, 1 MiB chunks) and changed results, a result only
        after all of its item's output; schedules itself again while anything is left. Not attached: nothing is sent and
        everything goes again on the next attach."""
        self._flush_handle = None
        report = pb.TaskReport()
        size = 0
        for item in self.items.values():
            while item.sent < len(item.out) and size < 4 * CHUNK:
                data = bytes(item.out[item.sent:item.sent + CHUNK])
                report.outputs.append(pb.TaskOutput(task_id=item.task_id, atomic_task_id=item.atomic_id,
                                                    offset=item.sent, data=data))
                item.sent += len(data)
                size += len(data)
            if item.dirty and item.result is not None and item.sent >= len(item.out):
                report.results.append(item.result)
                item.dirty = False
        if not report.outputs and not report.results:
            return
        if not self.send(pb.AgentFrame(report=report)):
            # Not attached: everything goes again from the start on the next attach.
            return
        if any(it.sent < len(it.out) or it.dirty for it in self.items.values()):
            self._schedule()

    async def stop(self) -> None:
        """Terminate every run and wait up to 10 s for their tasks to end."""
        for run in self.runs.values():
            run.terminate()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

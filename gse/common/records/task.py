"""Task records: what a task is, what each (agent, atomic task) item did, and its output.

  gse:task:<task_id>                          TaskRecord (hash): kind, creation, atomic ids, targets
  gse:ti:<task_id>:<bk_agent_id>:<atomic_id>  TaskItem (hash): one item's status, codes, times, output size
  gse:to:<task_id>:<bk_agent_id>:<atomic_id>  TaskOutput (string): the item's output, written at offsets (none
                                              when the item holds its whole output itself, `TaskItem.output`)

Writers: the API server writes the task (naming every target) before dispatching it, and the items of
targets that are offline (117); the task server holding an agent writes its items' results and output from
the agent's reports. A target's item not written yet reads as dispatched, with the task's creation as its
dispatch time and the task's warnings. Readers: get_execute_script_result, get_transfer_file_result, the file
coordinator.
"""

from __future__ import annotations

import dataclasses
import os
import time

from gse.common import dbclient as db
from gse.common.errors import FINAL_STATUSES, ErrorCode, ScriptStatus

from .base import DAY_MS, Json, hash_record

RESULT_TTL_MS = DAY_MS
# An output of at most this many bytes that arrives whole with its item's final result is kept in the item
# (`TaskItem.output`): one write and one read per item instead of two each (most commands print a line or two).
INLINE_OUTPUT_MAX = 4096


def new_task_id(kind: str = "GSETASK") -> str:
    """`<kind>:<UTC yyyymmddHHMMSS>:<16 hex>`; kind GSETASK (scripts), GSEFILE (files), GSEPROC (processes)."""
    return f"{kind}:{time.strftime('%Y%m%d%H%M%S', time.gmtime())}:{os.urandom(8).hex()}"


def valid_task_id(text: str) -> bool:
    """What the API accepts as a task id: 1-128 printable characters without spaces."""
    return 0 < len(text) <= 128 and text.isprintable() and " " not in text


@hash_record(prefix="gse:task:", ttl_ms=RESULT_TTL_MS)
@dataclasses.dataclass(slots=True)
class TaskRecord:
    """One task as the API server stored it before dispatching it. `kind` is script, file or push."""
    kind: str = ""
    created: int = 0                # ms
    request_id: str = ""            # the API request that made it (for following it through the logs)
    # scripts
    atomic_ids: Json = None         # [atomic_task_id, ...] in request order
    agent_count: int = 0
    warnings: str = ""              # high-risk rule warnings, "; "-joined
    # files
    coordinators: Json = None       # {"<tasks[] index>": node id of the task server coordinating it}
    targets: Json = None            # [bk_agent_id, ...]: every target (files: what a result read without agents
                                    # reads; scripts: whose unwritten items read as dispatched)
    tasks: int = 0                  # how many tasks[] items


@hash_record(prefix="gse:ti:", ttl_ms=RESULT_TTL_MS)
@dataclasses.dataclass(slots=True)
class TaskItem:
    """One atomic task on one agent (key parts: task_id, bk_agent_id, atomic_task_id). Times in ms. Written by
    the task server from the agent's reports, or by the API server (117: the agent was offline at dispatch, or
    no task server took it)."""
    status: int = ScriptStatus.DISPATCHED
    error_code: int = ErrorCode.RUNNING
    error_msg: str = ""
    start_time: int = 0
    end_time: int = 0
    exit_code: int = 0
    output_size: int = 0            # bytes of output the agent produced, when final
    truncated: bool = False         # the output went past the task's limit
    out_end: int = 0                # output bytes stored so far (readers skip the output read when 0)
    output: bytes = b""             # the whole output, when it came with the final result (INLINE_OUTPUT_MAX)

    @property
    def final(self) -> bool:
        """The item's status is final (success, timeout, stopped, failed, agent restarted): it will not change any
        more."""
        return self.status in FINAL_STATUSES

    @property
    def output_known(self) -> int:
        """The output bytes known to exist (stored so far, or the final size)."""
        return max(self.out_end, self.output_size)



class TaskOutput:
    """`gse:to:<task_id>:<bk_agent_id>:<atomic_id>`: an item's output bytes. Chunks are written at their
    offset (SETRANGE), so a chunk sent twice lands on the same bytes."""
    PREFIX = "gse:to:"

    @staticmethod
    def key(task_id: str, agent_id: str, atomic_id: int) -> str:
        """The output key of (`task_id`, `agent_id`, `atomic_id`)."""
        return f"{TaskOutput.PREFIX}{task_id}:{agent_id}:{atomic_id}"

    @staticmethod
    def write(task_id: str, agent_id: str, atomic_id: int, offset: int, data: bytes,
              ttl_ms: int = RESULT_TTL_MS) -> db.Op:
        """SETRANGE `data` at byte `offset` of the item's output, with the result TTL unless given (ms); the same
        chunk written twice lands on the same bytes."""
        return db.setrange(TaskOutput.key(task_id, agent_id, atomic_id), offset, data, ttl_ms)

    @staticmethod
    def read(task_id: str, agent_id: str, atomic_id: int, offset: int, limit: int) -> db.Op:
        """Bytes [offset, offset + limit) (limit > 0)."""
        return db.getrange(TaskOutput.key(task_id, agent_id, atomic_id), offset, offset + limit - 1)

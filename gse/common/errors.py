"""The code table and the error tree: every code GSE answers with is named here, once.

- `ApiCode`: the envelope `code` of the HTTP API (spec §1, §4). 0 is success; the HTTP status a code is
  answered with is in `HTTP_STATUS`.
- `ErrorCode`: the per-item `error_code` of task, file and process results (spec §3, §4, §8). One table for
  all three kinds because the clients read them as one (115 running, 117 agent offline, ... 65535 failed).
- `ScriptStatus`: the `status` of a script item (spec §4).
- `AgentStatus`: the `status_code` of an agent in the state APIs (spec §4); 2 is the only alive value.

Domain errors carry an `ApiCode`; the API server turns them into envelopes in one place (`apiserver/app.py`),
and gRPC servicers into statuses.
"""

from __future__ import annotations

from enum import IntEnum


class ApiCode(IntEnum):
    """Envelope codes of the HTTP API (spec §1, §4)."""
    OK = 0
    BAD_REQUEST = 1000400           # wrong type, missing field, too many hosts; the message names the field
    UNAUTHORIZED = 1000401          # missing or wrong app credentials (HTTP 401)
    BLOCKED = 1000403               # refused by a high-risk command rule (the message names the rule)
    NOT_FOUND = 1000404             # no such endpoint (HTTP 404)
    CONFLICT = 1000409              # changed by another request at the same time: try again
    INTERNAL = 1000500              # a bug; the message points at the server log (HTTP 500)
    UNAVAILABLE = 1000503           # a dependency (dbproxy, task servers) cannot be reached (HTTP 503)
    NOT_READY = 1000115             # the task id is not known (yet): poll again (spec §4 correction)
    AGENT_NOT_FOUND = 1011003       # list_agent_state / list_agent_info: none of the agents was found


HTTP_STATUS = {ApiCode.UNAUTHORIZED: 401, ApiCode.NOT_FOUND: 404, ApiCode.INTERNAL: 500,
               ApiCode.UNAVAILABLE: 503}


class ErrorCode(IntEnum):
    """Per-item `error_code` of task, file and process results (spec §3, §4, §8)."""
    OK = 0
    SOURCE_MISSING = 104            # file: the source file does not exist
    RUNNING = 115                   # not final yet: poll again
    AGENT_OFFLINE = 117             # the agent is offline or went away before reporting
    TOO_LARGE = 119                 # file: larger than the cluster allows
    TIMEOUT = 120                   # task or transfer timed out
    USER_NOT_FOUND = 122            # the run-as user does not exist on the host
    NOT_WRITABLE = 123              # file: the target cannot be written
    TERMINATED = 126                # ended by a terminate call
    CHECKSUM = 127                  # file: checksum mismatch, or the source changed during the transfer
    PROC_ALREADY_RUNNING = 828      # process start: it was running already (clients count it as success)
    PROC_NOT_RUNNING = 829          # process stop: it was not running (clients count it as success)
    PROC_BAD_OP = 832               # process: unknown op_type
    PROC_CHECK_FAILED = 836         # process: the post-check (pid alive after start_check_secs) failed
    PROC_ALREADY_REGISTERED = 850   # process: already registered
    FAILED = 65535                  # anything else; the message says what


class ScriptStatus(IntEnum):
    """`status` of a script item (spec §4)."""
    DISPATCHED = 0
    RUNNING = 1
    SUCCESS = 2
    TIMEOUT = 3
    STOPPED = 4
    FAILED = 5
    AGENT_RESTARTED = 6             # the agent restarted and lost the item


FINAL_STATUSES = frozenset({ScriptStatus.SUCCESS, ScriptStatus.TIMEOUT, ScriptStatus.STOPPED,
                            ScriptStatus.FAILED, ScriptStatus.AGENT_RESTARTED})


def item_error_code(status: int | None, error_code: int | None) -> int:
    """The `error_code` a result read shows for an item: 115 while it has not ended, else its own code.

    With `TaskNotKnown` this is the whole rule of result reads (spec §4 correction): the top-level code is 0
    for a known task however many items still run; script, file and process results all follow it."""
    if status in FINAL_STATUSES and error_code is not None:
        return int(error_code)
    return int(ErrorCode.RUNNING)


class AgentStatus(IntEnum):
    """`status_code` of an agent in the state APIs (spec §4); RUNNING is the only alive value."""
    NOT_FOUND = -2
    UNKNOWN = -1
    INITIAL = 0
    STARTING = 1
    RUNNING = 2
    DAMAGED = 3
    BUSY = 4
    UPGRADING = 5
    STOPPING = 6
    UNINSTALLED = 7


AGENT_STATUS_TEXT = {AgentStatus.NOT_FOUND: "not_found", AgentStatus.UNKNOWN: "unknown",
                     AgentStatus.INITIAL: "initial", AgentStatus.STARTING: "starting",
                     AgentStatus.RUNNING: "running", AgentStatus.DAMAGED: "damaged", AgentStatus.BUSY: "busy",
                     AgentStatus.UPGRADING: "upgrading", AgentStatus.STOPPING: "stopping",
                     AgentStatus.UNINSTALLED: "uninstalled"}


class GseError(Exception):
    """A failure with an envelope code; `message` is what a caller is shown (never a secret, never a
    traceback)."""

    code: int = ApiCode.INTERNAL

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def http_status(self) -> int:
        """The HTTP status the API answers this error with (200 for most codes: the envelope says it)."""
        return HTTP_STATUS.get(self.code, 200)


class BadRequest(GseError):
    """Bad input: the message names the field (1000400)."""
    code = ApiCode.BAD_REQUEST


class Unauthorized(GseError):
    """Missing or wrong credentials (1000401, HTTP 401)."""
    code = ApiCode.UNAUTHORIZED


class TaskNotKnown(GseError):
    """A result read for a task id that is not known (yet, or any more): the top-level 1000115, "poll again".

    The one rule of result reads (spec section 4, correction): once a task is known, its result answers
    top-level code 0 and every item that has not ended carries 115 (`item_error_code`); job
    platforms treat any other top-level code as a failed call, so 1000115 is never "still running"."""
    code = ApiCode.NOT_READY

    def __init__(self, task_id: str):
        super().__init__(f"task {task_id} is not known yet (or its results expired); poll again")


class NotFound(GseError):
    """No such endpoint (1000404, HTTP 404)."""
    code = ApiCode.NOT_FOUND


class Blocked(GseError):
    """A task refused by a high-risk command rule (1000403)."""
    code = ApiCode.BLOCKED


class Conflict(GseError):
    """A definition changed (or an id was taken) by another request at the same moment: the caller may try
    again (1000409; HTTP 200, the envelope says it)."""
    code = ApiCode.CONFLICT


class Unavailable(GseError):
    """A dependency (dbproxy, a task server) cannot be reached right now (1000503, HTTP 503)."""
    code = ApiCode.UNAVAILABLE

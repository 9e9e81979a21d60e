"""One error tree with the GSE codes; API envelopes and gRPC statuses are mapped from it in one place."""

from __future__ import annotations

# Envelope codes of the HTTP API (spec section 1 and 4).
OK = 0
API_BAD_REQUEST = 1000400
API_UNAUTHORIZED = 1000401
API_NOT_FOUND = 1000404
API_INTERNAL = 1000500
API_UNAVAILABLE = 1000503
API_RUNNING = 1000115
AGENT_NOT_FOUND = 1011003


class GseError(Exception):
    """A failure with a GSE code; `message` is what a caller is shown."""

    code = API_INTERNAL
    http_status = 200

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(GseError):
    code = API_BAD_REQUEST


class Unauthorized(GseError):
    code = API_UNAUTHORIZED
    http_status = 401


class TaskNotKnown(GseError):
    """A result read for a task id that is not known (yet, or any more): the top-level 1000115, "poll again".

    The one rule of result reads (spec section 4, correction): once a task is known, its result answers
    top-level code 0 and every item that has not ended carries 115 (`taskstate.item_error_code`); job
    platforms treat any other top-level code as a failed call, so 1000115 is never "still running"."""
    code = API_RUNNING

    def __init__(self, task_id: str):
        super().__init__(f"task {task_id} is not known yet (or its results expired); poll again")


class NotFound(GseError):
    code = API_NOT_FOUND


class Unavailable(GseError):
    """A dependency (dbproxy, a task server) cannot be reached right now."""
    code = API_UNAVAILABLE
    http_status = 503

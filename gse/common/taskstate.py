"""Where task results live in Redis (through dbproxy).

  gse:task:<task_id>                          hash: kind, created, atomic ids, warnings, agents count
  gse:ti:<task_id>:<bk_agent_id>:<atomic_id>  hash: one item (status, error_code, times, exit code, out_end:
                                              output bytes stored so far, output_size when final, ...)
  gse:to:<task_id>:<bk_agent_id>:<atomic_id>  string: the item's output (written at offsets)
"""

from __future__ import annotations

import os
import time

# Script status codes.
DISPATCHED, RUNNING, SUCCESS, TIMEOUT, STOPPED, FAILED, AGENT_RESTARTED = range(7)
FINAL_STATUSES = {SUCCESS, TIMEOUT, STOPPED, FAILED, AGENT_RESTARTED}

# Item error codes.
E_DONE = 0
E_RUNNING = 115
E_AGENT_OFFLINE = 117
E_TIMEOUT = 120
E_USER_NOT_FOUND = 122
E_TERMINATED = 126
E_FAILED = 65535

DEFAULT_TTL_MS = 24 * 3600 * 1000


def item_error_code(status: int, error_code: int) -> int:
    """The `error_code` a result read shows for an item: 115 while it has not ended, else its own code.

    With `errors.TaskNotKnown` this is the whole rule of result reads (spec section 4, correction): the
    top-level code is 0 for a known task however many items still run."""
    return error_code if status in FINAL_STATUSES else E_RUNNING


def task_key(task_id: str) -> str:
    return f"gse:task:{task_id}"


def item_key(task_id: str, agent_id: str, atomic_id: int) -> str:
    return f"gse:ti:{task_id}:{agent_id}:{atomic_id}"


def output_key(task_id: str, agent_id: str, atomic_id: int) -> str:
    return f"gse:to:{task_id}:{agent_id}:{atomic_id}"


def new_task_id(kind: str = "GSETASK") -> str:
    return f"{kind}:{time.strftime('%Y%m%d%H%M%S', time.gmtime())}:{os.urandom(8).hex()}"


def valid_task_id(text: str) -> bool:
    return 0 < len(text) <= 128 and text.isprintable() and " " not in text


def find_cycle(depends_on: dict[int, list[int]]) -> list[int] | None:
    """A dependency cycle among atomic tasks as [a, b, ..., a], or None. Every dependency must be a key.

    Iterative and linear in tasks plus dependencies: a chain of a thousand tasks is neither a deep recursion
    nor a quadratic walk."""
    state: dict[int, int] = {}          # 1 on the current path, 2 done
    for root in depends_on:
        if root in state:
            continue
        path: list[int] = [root]
        its = [iter(depends_on[root])]
        state[root] = 1
        while its:
            dep = next(its[-1], None)
            if dep is None:
                state[path.pop()] = 2
                its.pop()
            elif state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                its.append(iter(depends_on[dep]))
    return None

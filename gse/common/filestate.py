"""Where file-transfer results live in Redis (through dbproxy).

  gse:task:<task_id>                hash: kind=file, created, per tasks[] item its coordinator node
  gse:fr:<task_id>:<bk_agent_id>    hash, per file this agent moves ("<task_index>:<entry index>"):
      "<ti>:<i>"      what the coordinator knows (names, dirs, size, initial status)
      "p:<ti>:<i>"    progress and outcome (from the agent's reports; the coordinator writes timeouts,
                      terminations and unreachable targets here too)
      "p:<ti>:<i>:up" the source's own upload item
  A reader merges the two JSON objects, progress over the static part.
"""

from __future__ import annotations

import json

DIRECT_MAX = 10 * 1024          # files up to 10 KB go direct

E_SOURCE_MISSING = 104
E_TOO_LARGE = 119
E_NOT_WRITABLE = 123
E_CHECKSUM = 127
E_TIMEOUT = 120


def result_key(task_id: str, agent_id: str) -> str:
    return f"gse:fr:{task_id}:{agent_id}"


def item_field(task_index: int, index: int) -> str:
    return f"{task_index}:{index}"


def encode(item: dict) -> bytes:
    return json.dumps(item, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict:
    return json.loads(raw)


PROGRESS = "p:"


def merged(fields: dict[str, bytes], task_index: int | None = None) -> dict[str, dict]:
    """Field name "<ti>:<i>" (or "<ti>:<i>:up") -> the merged item, for one agent's result hash."""
    static: dict[str, dict] = {}
    progress: dict[str, dict] = {}
    for name, raw in fields.items():
        if name.startswith(PROGRESS):
            progress[name[len(PROGRESS):]] = decode(raw)
        else:
            static[name] = decode(raw)
    out = {}
    for name in set(static) | set(progress):
        if task_index is not None and not name.startswith(f"{task_index}:"):
            continue
        item = dict(static.get(name.removesuffix(":up"), {})) if name.endswith(":up") else dict(static.get(name, {}))
        item.update(progress.get(name, {}))
        out[name] = item
    return out


def entry_items(items: dict[str, dict]) -> dict[str, dict]:
    """Drop the placeholder ("<ti>:-1", written before the source named its files) of every tasks[]
    item whose entries are known."""
    known = {n.split(":")[0] for n in items if n.split(":")[1] != "-1"}
    return {n: i for n, i in items.items() if not (n.split(":")[1] == "-1" and n.split(":")[0] in known)}

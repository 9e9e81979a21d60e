"""File-transfer records: one hash per (task, agent) holding an item per file that agent moves.

  gse:fr:<task_id>:<bk_agent_id>   FileResults (hash) of FileItem JSON documents, per file:
      "<ti>:<i>"        what the coordinator knows (names, dirs, size, initial status): written by the API
                        server (placeholders, offline targets) and the coordinating task server
      "p:<ti>:<i>"      progress and outcome: from the agent's reports (the coordinator writes timeouts,
                        terminations and unreachable targets here too)
      "p:<ti>:<i>:up"   the source's own upload item
  `ti` is the index of the request's tasks[] item, `i` the entry index in the source's manifest; entry -1 is
  the placeholder written before the source named its files.

A reader merges the two documents of an item, progress over the static part (`FileResults.decode`).
"""

from __future__ import annotations

import dataclasses

from gse.common import dbclient as db

from .base import HashWrite, json_document
from .task import RESULT_TTL_MS

DIRECT_MAX = 10 * 1024          # files up to 10 KB go direct through the file server
PROGRESS = "p:"
UPLOAD = ":up"
PLACEHOLDER = -1


@json_document
@dataclasses.dataclass(slots=True)
class FileItem:
    """One file of a transfer as one agent sees it (the `content` of get_transfer_file_result, spec §4).
    Every field may be None: a document sets only what its writer knows; readers merge and default."""
    mode: int | None = None                 # 0 upload (the source), 1 download (a target)
    source_agent_id: str | None = None
    source_file_dir: str | None = None
    source_file_name: str | None = None
    dest_agent_id: str | None = None
    dest_file_dir: str | None = None
    dest_file_name: str | None = None
    progress: int | None = None             # 0-100
    speed: int | None = None                # KB/s
    size: int | None = None                 # bytes
    status: int | None = None               # ScriptStatus values
    status_info: str | None = None
    type: str | None = None                 # direct, bt, mixed
    start_time: int | None = None           # ms
    end_time: int | None = None
    error_code: int | None = None
    error_msg: str | None = None
    dest_path: str | None = None            # where the file landed (extension)
    source_path: str | None = None


def item_name(task_index: int, index: int, *, progress: bool = False, upload: bool = False) -> str:
    """The hash field of one item: "<ti>:<i>", "p:<ti>:<i>" or "p:<ti>:<i>:up"."""
    return f"{PROGRESS if progress else ''}{task_index}:{index}{UPLOAD if upload else ''}"


class FileResults:
    """`gse:fr:<task_id>:<bk_agent_id>`: every file item of one agent in one transfer task."""
    PREFIX = "gse:fr:"

    @staticmethod
    def key(task_id: str, agent_id: str) -> str:
        """The results key of (`task_id`, `agent_id`)."""
        return f"{FileResults.PREFIX}{task_id}:{agent_id}"

    @staticmethod
    def update(task_id: str, agent_id: str, items: dict[str, FileItem], ttl_ms: int = RESULT_TTL_MS) -> HashWrite:
        """Set items by field name (see `item_name`): for `BatchWriter.put`, or `.op()`."""
        return HashWrite(FileResults.key(task_id, agent_id), {n: i.to_json() for n, i in items.items()}, ttl_ms)

    @staticmethod
    def read(task_id: str, agent_id: str) -> db.Op:
        """HGETALL of every item of the agent in the task; decode with `decode`."""
        return db.hgetall(FileResults.key(task_id, agent_id))

    @staticmethod
    def decode(result, task_index: int | None = None) -> dict[str, FileItem]:
        """Item name ("<ti>:<i>" or "<ti>:<i>:up") -> the merged item (progress over static), of one
        tasks[] item when `task_index` is given. The placeholder of a tasks[] item is left out once the
        source named that item's entries."""
        if not (result.ok and result.found):
            return {}
        static: dict[str, FileItem] = {}
        progress: dict[str, FileItem] = {}
        for name, raw in result.fields.items():
            try:
                if name.startswith(PROGRESS):
                    progress[name[len(PROGRESS):]] = FileItem.from_json(raw)
                else:
                    static[name] = FileItem.from_json(raw)
            except (ValueError, TypeError):
                continue            # a malformed document is skipped, never a crash of the reader
        out: dict[str, FileItem] = {}
        for name in static.keys() | progress.keys():
            ti, _, rest = name.partition(":")
            if task_index is not None and ti != str(task_index):
                continue
            base = static.get(name.removesuffix(UPLOAD)) or FileItem()
            out[name] = base.merge(progress[name]) if name in progress else base
        named = {n.partition(":")[0] for n in out if n.split(":")[1] != str(PLACEHOLDER)}
        return {n: i for n, i in out.items() if not (n.split(":")[1] == str(PLACEHOLDER)
                                                     and n.partition(":")[0] in named)}

    @staticmethod
    def order(name: str) -> tuple:
        """Sort key of item names: by tasks[] index, entry index, then the target item before ":up"."""
        parts = name.split(":")
        return int(parts[0]), int(parts[1]), len(parts)

"""Process management records: registrations with their wanted and reported state, operation tasks and their
per-target results, the indexes that page and list them, and process groups (spec sections 3 and 8).

  gse:proc:<bk_agent_id>:<namespace>:<name>  ProcRecord (hash, no TTL): the registration (procmgr) and the
                                             state the agent reported (task server): one hash, two writers,
                                             disjoint fields
  gse:procns:<namespace>                     ProcIndex (hash): field "<bk_agent_id>:<name>" per registration
  gse:procagent:<bk_agent_id>                ProcIndex (hash): field "<namespace>:<name>" per registration
  gse:ptask:<task_id>                        ProcTask (hash, 1 day): targets, frames sent, deadline
  gse:pres:<task_id>                         ProcResults (hash of JSON, 1 day): per target "<t>" (written by
                                             procmgr: running placeholder, or its own answer: 117, 832, ...)
                                             and "r:<t>" (the agent's result, written by the task server);
                                             t = "<bk_agent_id>:<namespace>:<name>"
  gse:ptasks:open                            ProcOpenTasks (set): task ids procmgr still watches
  gse:procgroups:<bk_agent_id>:<namespace>   ProcGroups (string, JSON): set_process_group_info

An agent that was never seen is keyed by the "cloud:ip" it was named as (upgrade_to_agent_id moves such
registrations under its bk_agent_id). Namespaces and names never hold ':' (the API refuses them), so keys
and index members split unambiguously; bk_agent_ids never hold ':' either (records.agent.valid_agent_id).

Registrations live until unregistered; unregistering leaves a tombstone (`registered` false,
`unregistered_at`, no TTL: a TTL set on it would outlive a later registration of the same key, since a
hash write never clears a key's TTL) so that an agent that was offline at the time drops the definition
when it comes back, while an absent record (Redis lost) never makes an agent drop anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple

from gse.common import dbclient as db
from gse.common.errors import ErrorCode

from .base import DAY_MS, HashWrite, Json, hash_record

PROC_TASK_TTL_MS = DAY_MS

# ProcStatus values of proc_infos[].status (spec section 3).
UNREGISTERED, RUNNING, STOPPED = 0, 1, 2
# ProcRecord.flag: the wanted state.
WANT_NONE, WANT_RUNNING, WANT_STOPPED = 0, 1, 2
# Sources of a registration: the API (procmgr), or the agent's plugin directory (auto-load).
SOURCE_API, SOURCE_PLUGIN = "api", "plugin"


@hash_record(prefix="gse:proc:", ttl_ms=0)
@dataclasses.dataclass(slots=True)
class ProcRecord:
    """One process on one agent (key parts: bk_agent_id, namespace, name). Times: `*_time` in s, `*_at` in ms."""
    # written by procmgr: the registration and the wanted state
    registered: bool = False
    spec: bytes = b""               # the serialized ProcSpec (gse/pb/agent.proto)
    spec_digest: str = ""           # of `spec`: what a changed definition is told by (without reading the spec)
    labels: str = ""                # the caller's labels, JSON text
    register_time: int = 0
    registered_at: int = 0
    unregistered_at: int = 0        # a tombstone: agents that still hold it drop it
    flag: int = WANT_NONE
    want_auto: bool = False
    # written by the task server from what the agent reported
    agent_registered: bool = False
    source: str = ""
    status: int = UNREGISTERED
    isauto: bool = False
    pid: int = -1
    version: str = ""
    message: str = ""
    last_start_time: int = 0
    report_time: int = 0
    cpu_usage: float = 0.0
    mem_usage: float = 0.0
    fd: int = 0
    agent_labels: str = ""          # JSON text
    agent_registered_at: int = 0
    cloud_id: int = 0
    ip: str = ""

    @property
    def known(self) -> bool:
        """Registered through the API, or held by the agent."""
        return self.registered or self.agent_registered

    @property
    def proc_status(self) -> int:
        """proc_infos[].status: 0 unregistered, 1 running, 2 stopped."""
        if not self.known:
            return UNREGISTERED
        return RUNNING if self.status == RUNNING else STOPPED


# What the task server writes from one ProcState an agent reported (the agent's side of the record).
AGENT_FIELDS = ("agent_registered", "source", "status", "isauto", "pid", "version", "message", "last_start_time",
                "report_time", "cpu_usage", "mem_usage", "fd", "agent_labels", "agent_registered_at", "cloud_id",
                "ip")


def spec_digest(spec: bytes) -> str:
    """ProcRecord.spec_digest of a serialized ProcSpec."""
    return hashlib.blake2b(spec, digest_size=12).hexdigest()


class ProcIndex:
    """The indexes that list registrations, kept as hashes (field = member, value "1") so that the task
    server's batch writer merges the writes of thousands of agents into one HSET per namespace: per namespace
    (fields "<bk_agent_id>:<name>") and per agent (fields "<namespace>:<name>")."""
    NS = "gse:procns:"
    AGENT = "gse:procagent:"

    @staticmethod
    def add(agent_id: str, namespace: str, name: str) -> list[HashWrite]:
        """The two index writes (for `BatchWriter.put`, or `.op()` each)."""
        return [HashWrite(ProcIndex.NS + namespace, {f"{agent_id}:{name}": b"1"}, 0),
                HashWrite(ProcIndex.AGENT + agent_id, {f"{namespace}:{name}": b"1"}, 0)]

    @staticmethod
    def add_ops(agent_id: str, namespace: str, name: str) -> list[db.Op]:
        """The two index writes as dbproxy ops (HSET each, no TTL), for a caller that sends them itself."""
        return [w.op() for w in ProcIndex.add(agent_id, namespace, name)]

    @staticmethod
    def remove(agent_id: str, namespace: str, name: str) -> list[db.Op]:
        """The two HDELs that take a registration out of both indexes."""
        return [db.hdel(ProcIndex.NS + namespace, [f"{agent_id}:{name}"]),
                db.hdel(ProcIndex.AGENT + agent_id, [f"{namespace}:{name}"])]

    @staticmethod
    def read_namespace(namespace: str) -> db.Op:
        """HGETALL of a namespace's index; decode with `decode` into (bk_agent_id, name) pairs."""
        return db.hgetall(ProcIndex.NS + namespace)

    @staticmethod
    def read_agent(agent_id: str) -> db.Op:
        """HGETALL of an agent's index; decode with `decode` into (namespace, name) pairs."""
        return db.hgetall(ProcIndex.AGENT + agent_id)

    @staticmethod
    def decode(result) -> list[tuple[str, str]]:
        """Members split at their first ':' (namespace index: (bk_agent_id, name); agent index:
        (namespace, name))."""
        if not (result.ok and result.found):
            return []
        out = []
        for m in result.fields:
            a, sep, b = m.partition(":")
            if sep:
                out.append((a, b))
        return out


class TaskTarget(NamedTuple):
    """One (host, process) of a task, as the caller named it and as it resolved."""
    requested: str          # the id as the caller wrote it ("" for a v1 host: then cloud:ip)
    agent_id: str           # the bk_agent_id (the requested id when it never resolved)
    cloud_id: int
    ip: str
    supplier_id: int
    by_host: bool
    namespace: str
    name: str

    @property
    def field(self) -> str:
        """The target's field in ProcResults: "<bk_agent_id>:<namespace>:<name>"."""
        return f"{self.agent_id}:{self.namespace}:{self.name}"


@hash_record(prefix="gse:ptask:", ttl_ms=PROC_TASK_TTL_MS)
@dataclasses.dataclass(slots=True)
class ProcTask:
    """One operation task (key part: task_id)."""
    created: int = 0                # ms
    request_id: str = ""
    targets: Json = None            # [TaskTarget as a list, ...] in request order
    frames: Json = None             # [[base64 of a serialized ServerFrame, [bk_agent_id, ...]], ...]
    deadline: int = 0               # ms: a target without a result by then fails (65535)
    internal: bool = False          # made by procmgr itself (definitions pushed to agents): nobody polls it

    def task_targets(self) -> list[TaskTarget]:
        """The task's targets as TaskTarget values, in request order (empty when none were recorded)."""
        return [TaskTarget(*t) for t in (self.targets or [])]


@dataclasses.dataclass(slots=True)
class ProcResult:
    """A target's result (spec section 8): `content` is a JSON text once final ("" while running)."""
    error_code: int = ErrorCode.RUNNING
    error_msg: str = ""
    content: str = ""

    @property
    def final(self) -> bool:
        """The target is done (any code but 115 running)."""
        return self.error_code != ErrorCode.RUNNING

    def to_json(self) -> bytes:
        """The result as the JSON bytes stored in ProcResults: `{error_code, error_msg, content}`."""
        if self.error_code == ErrorCode.RUNNING and not self.error_msg and not self.content:
            return _RUNNING_JSON        # the placeholder of every dispatched target: encoded once
        return json.dumps({"error_code": self.error_code, "error_msg": self.error_msg, "content": self.content},
                          separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def from_json(raw: bytes) -> "ProcResult":
        """A result from its stored JSON; missing keys read as a failure (65535) with no message. Raises ValueError on
        text that is not JSON and AttributeError when it is not an object."""
        d = json.loads(raw)
        return ProcResult(int(d.get("error_code", ErrorCode.FAILED)), str(d.get("error_msg", "")),
                          str(d.get("content", "")))


AGENT_RESULT = "r:"
_RUNNING_JSON = b'{"error_code":115,"error_msg":"","content":""}'


class ProcResults:
    """`gse:pres:<task_id>`: every target's result of one task. procmgr writes "<t>" (the placeholder, or its
    own final answer), the task server "r:<t>" from the agent: a reader takes the agent's over procmgr's, so
    the two writes may land in any order."""
    PREFIX = "gse:pres:"

    @staticmethod
    def key(task_id: str) -> str:
        """The results key of `task_id`."""
        return ProcResults.PREFIX + task_id

    @staticmethod
    def update(task_id: str, results: dict[str, ProcResult], *, agent: bool = False,
               ttl_ms: int = PROC_TASK_TTL_MS) -> HashWrite:
        """Set results by target field (TaskTarget.field); `agent`: as reported by the agent."""
        head = AGENT_RESULT if agent else ""
        return HashWrite(ProcResults.key(task_id), {head + f: r.to_json() for f, r in results.items()}, ttl_ms)

    @staticmethod
    def read(task_id: str) -> db.Op:
        """HGETALL of every result of `task_id`; decode with `decode`."""
        return db.hgetall(ProcResults.key(task_id))

    @staticmethod
    def decode(result) -> dict[str, ProcResult]:
        """Target field -> its result (the agent's when there is one)."""
        if not (result.ok and result.found):
            return {}
        own: dict[str, ProcResult] = {}
        agent: dict[str, ProcResult] = {}
        for name, raw in result.fields.items():
            try:
                r = ProcResult.from_json(raw)
            except (ValueError, TypeError, AttributeError):
                continue
            if name.startswith(AGENT_RESULT):
                agent[name[len(AGENT_RESULT):]] = r
            else:
                own[name] = r
        return {**own, **agent}


class ProcOpenTasks:
    """`gse:ptasks:open`: the tasks procmgr still watches (sends again to agents that did not answer, ends
    targets at the deadline)."""
    KEY = "gse:ptasks:open"

    @staticmethod
    def add(task_id: str) -> db.Op:
        """SADD `task_id` to the open set (no TTL: procmgr removes it when the task ends)."""
        return db.sadd(ProcOpenTasks.KEY, [task_id])

    @staticmethod
    def remove(task_ids) -> db.Op:
        """SREM the given task ids from the open set."""
        return db.srem(ProcOpenTasks.KEY, list(task_ids))

    @staticmethod
    def read() -> db.Op:
        """SMEMBERS of the open set; decode with `decode`."""
        return db.smembers(ProcOpenTasks.KEY)

    @staticmethod
    def decode(result) -> list[str]:
        """The open task ids (empty when the read failed)."""
        return [m.decode() for m in result.values] if result.ok else []


class ProcGroups:
    """`gse:procgroups:<bk_agent_id>:<namespace>`: the process groups of set_process_group_info, as a JSON list
    of `{id, resource {cpu_pool_limit, mem_pool_limit, cpu_pool_weight, mem_pool_weight}}`."""
    PREFIX = "gse:procgroups:"

    @staticmethod
    def key(agent_id: str, namespace: str) -> str:
        """The groups key of (`agent_id`, `namespace`)."""
        return f"{ProcGroups.PREFIX}{agent_id}:{namespace}"

    @staticmethod
    def write(agent_id: str, namespace: str, groups: list[dict]) -> db.Op:
        """SET the groups (a list of `{id, resource {...}}`) as compact JSON, no TTL: they last until replaced."""
        return db.set_(ProcGroups.key(agent_id, namespace), json.dumps(groups, separators=(",", ":")))

    @staticmethod
    def read(agent_id: str, namespace: str) -> db.Op:
        """GET the groups of (`agent_id`, `namespace`); decode with `decode`."""
        return db.get(ProcGroups.key(agent_id, namespace))

    @staticmethod
    def decode(result) -> list[dict]:
        """The list of groups; empty when absent, unreadable or not a JSON list."""
        if not (result.ok and result.found):
            return []
        try:
            groups = json.loads(result.value)
        except ValueError:
            return []
        return groups if isinstance(groups, list) else []

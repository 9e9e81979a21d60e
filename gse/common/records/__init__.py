"""Every record the daemons share through Redis (always through dbproxy), one class each.

A class names its key, its fields with their types, its TTL, and is the only code that turns it into
dbproxy ops and back: writers build writes with it, readers decode with it. `base` holds the machinery;
each module documents its keys, writers and readers.

| record | key | kind | module |
|---|---|---|---|
| AgentRecord | gse:agent:<bk_agent_id> | hash | agent |
| AgentAddress | gse:agentip:<bk_cloud_id>:<ip> | string | agent |
| AgentIndex | gse:agents | set | agent |
| HostSnapshotRecord | gse:snapshot:<bk_agent_id> | string (JSON) | agent |
| TaskRecord | gse:task:<task_id> | hash | task |
| TaskItem | gse:ti:<task_id>:<bk_agent_id>:<atomic_id> | hash | task |
| TaskOutput | gse:to:<task_id>:<bk_agent_id>:<atomic_id> | string | task |
| FileResults / FileItem | gse:fr:<task_id>:<bk_agent_id> | hash of JSON | file |
| ProcRecord | gse:proc:<bk_agent_id>:<namespace>:<name> | hash | proc |
| ProcIndex | gse:procns:<namespace>, gse:procagent:<bk_agent_id> | hash | proc |
| ProcTask | gse:ptask:<task_id> | hash | proc |
| ProcResults / ProcResult | gse:pres:<task_id> | hash of JSON | proc |
| ProcOpenTasks | gse:ptasks:open | set | proc |
| ProcGroups | gse:procgroups:<bk_agent_id>:<namespace> | string (JSON) | proc |
| LostReports | gse:alarm:lost | hash | alarm |
| HostIdentityRecord | gse:hostid:<bk_agent_id> | hash | hostid |
| PendingIdentities | gse:syncdata:pending | set | hostid |
| SyncCursor | gse:syncdata:cursor:<name> | string | hostid |
| ProxyRecord | gse:proxy:<node_id> | hash | area |
| ProxyIndex | gse:proxies | hash | area |
| AreaParents | gse:areas | hash | area |
| AreaHosts | gse:areahosts:<bk_cloud_id> | set | area |
"""

from .agent import (SESSION_FIELDS, AgentAddress, AgentIndex, AgentRecord, HostSnapshotRecord, now_ms,
                    valid_agent_id)
from .area import PROXY_PREFIX, AreaHosts, AreaParents, ProxyIndex, ProxyRecord, proxy_target, region_chain
from .base import DAY_MS, HashWrite, Json, hash_record, json_document
from .file import DIRECT_MAX, FileItem, FileResults, item_name
from .proc import (ProcGroups, ProcIndex, ProcOpenTasks, ProcRecord, ProcResult, ProcResults, ProcTask,
                   TaskTarget)
from .task import RESULT_TTL_MS, TaskItem, TaskOutput, TaskRecord, new_task_id, valid_task_id

__all__ = ["PROXY_PREFIX", "AreaHosts", "AreaParents", "ProxyIndex", "ProxyRecord", "proxy_target", "region_chain", "AgentAddress", "AgentIndex", "AgentRecord", "DAY_MS", "DIRECT_MAX", "FileItem", "FileResults",
           "HashWrite", "HostSnapshotRecord", "ProcGroups", "ProcIndex", "ProcOpenTasks",
           "ProcRecord", "ProcResult", "ProcResults", "ProcTask", "TaskTarget", "Json", "RESULT_TTL_MS", "SESSION_FIELDS", "TaskItem", "TaskOutput",
           "TaskRecord", "hash_record", "item_name", "json_document", "new_task_id", "now_ms", "valid_agent_id",
           "valid_task_id"]

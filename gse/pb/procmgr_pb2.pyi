from gse.pb import agent_pb2 as _agent_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Target(_message.Message):
    __slots__ = ("requested", "cloud_id", "ip", "supplier_id", "by_host", "agent_id")
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    SUPPLIER_ID_FIELD_NUMBER: _ClassVar[int]
    BY_HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    requested: str
    cloud_id: int
    ip: str
    supplier_id: int
    by_host: bool
    agent_id: str
    def __init__(self, requested: _Optional[str] = ..., cloud_id: _Optional[int] = ..., ip: _Optional[str] = ..., supplier_id: _Optional[int] = ..., by_host: _Optional[bool] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ProcEntry(_message.Message):
    __slots__ = ("namespace", "name", "labels_json", "op_type", "has_spec", "spec", "targets")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_JSON_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    HAS_SPEC_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    labels_json: str
    op_type: int
    has_spec: bool
    spec: _agent_pb2.ProcSpec
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., labels_json: _Optional[str] = ..., op_type: _Optional[int] = ..., has_spec: _Optional[bool] = ..., spec: _Optional[_Union[_agent_pb2.ProcSpec, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class OperateRequest(_message.Message):
    __slots__ = ("entries", "request_id")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ProcEntry]
    request_id: str
    def __init__(self, entries: _Optional[_Iterable[_Union[ProcEntry, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class OperateReply(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class DefineRequest(_message.Message):
    __slots__ = ("action", "entries")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    action: int
    entries: _containers.RepeatedCompositeFieldContainer[ProcEntry]
    def __init__(self, action: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[ProcEntry, _Mapping]]] = ...) -> None: ...

class TargetResult(_message.Message):
    __slots__ = ("target", "namespace", "name", "error_code", "error_msg", "content")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    namespace: str
    name: str
    error_code: int
    error_msg: str
    content: str
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TargetResults(_message.Message):
    __slots__ = ("results", "known")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TargetResult]
    known: bool
    def __init__(self, results: _Optional[_Iterable[_Union[TargetResult, _Mapping]]] = ..., known: _Optional[bool] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ProcInfo(_message.Message):
    __slots__ = ("namespace", "name", "labels_json", "target", "bk_agent_id", "status", "isauto", "message", "pid", "version", "register_time", "last_start_time", "report_time", "cpu_usage", "mem_usage", "fd", "flag", "cloud_id", "ip")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_JSON_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BK_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ISAUTO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REGISTER_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_START_TIME_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEM_USAGE_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    labels_json: str
    target: Target
    bk_agent_id: str
    status: int
    isauto: bool
    message: str
    pid: int
    version: str
    register_time: int
    last_start_time: int
    report_time: int
    cpu_usage: float
    mem_usage: float
    fd: int
    flag: int
    cloud_id: int
    ip: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., labels_json: _Optional[str] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., bk_agent_id: _Optional[str] = ..., status: _Optional[int] = ..., isauto: _Optional[bool] = ..., message: _Optional[str] = ..., pid: _Optional[int] = ..., version: _Optional[str] = ..., register_time: _Optional[int] = ..., last_start_time: _Optional[int] = ..., report_time: _Optional[int] = ..., cpu_usage: _Optional[float] = ..., mem_usage: _Optional[float] = ..., fd: _Optional[int] = ..., flag: _Optional[int] = ..., cloud_id: _Optional[int] = ..., ip: _Optional[str] = ...) -> None: ...

class ProcInfos(_message.Message):
    __slots__ = ("infos", "count")
    INFOS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    infos: _containers.RepeatedCompositeFieldContainer[ProcInfo]
    count: int
    def __init__(self, infos: _Optional[_Iterable[_Union[ProcInfo, _Mapping]]] = ..., count: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("namespace", "name", "targets")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("namespace", "offset", "limit")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    offset: int
    limit: int
    def __init__(self, namespace: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class UpgradeHost(_message.Message):
    __slots__ = ("cloud_id", "ip", "agent_id")
    CLOUD_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    cloud_id: int
    ip: str
    agent_id: str
    def __init__(self, cloud_id: _Optional[int] = ..., ip: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class UpgradeRequest(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[UpgradeHost]
    def __init__(self, hosts: _Optional[_Iterable[_Union[UpgradeHost, _Mapping]]] = ...) -> None: ...

class UpgradeReply(_message.Message):
    __slots__ = ("success", "failed")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    success: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, success: _Optional[_Iterable[str]] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class ProcGroup(_message.Message):
    __slots__ = ("id", "cpu_pool_limit", "mem_pool_limit", "cpu_pool_weight", "mem_pool_weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    CPU_POOL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MEM_POOL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CPU_POOL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MEM_POOL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    cpu_pool_limit: float
    mem_pool_limit: float
    cpu_pool_weight: float
    mem_pool_weight: float
    def __init__(self, id: _Optional[str] = ..., cpu_pool_limit: _Optional[float] = ..., mem_pool_limit: _Optional[float] = ..., cpu_pool_weight: _Optional[float] = ..., mem_pool_weight: _Optional[float] = ...) -> None: ...

class GroupsRequest(_message.Message):
    __slots__ = ("namespace", "targets", "groups")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    groups: _containers.RepeatedCompositeFieldContainer[ProcGroup]
    def __init__(self, namespace: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[ProcGroup, _Mapping]]] = ...) -> None: ...

class GroupsQuery(_message.Message):
    __slots__ = ("namespace", "targets")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, namespace: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class HostGroups(_message.Message):
    __slots__ = ("target", "groups")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    target: Target
    groups: _containers.RepeatedCompositeFieldContainer[ProcGroup]
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[ProcGroup, _Mapping]]] = ...) -> None: ...

class GroupsReply(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostGroups]
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostGroups, _Mapping]]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DispatchBatchRequest(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[DispatchRequest]
    def __init__(self, parts: _Optional[_Iterable[_Union[DispatchRequest, _Mapping]]] = ...) -> None: ...

class TransferSpec(_message.Message):
    __slots__ = ("task_id", "task_index", "transfer_id", "source_agent", "source_user", "source_dir", "source_name", "md5", "dest_dir", "dest_name", "owner", "permission", "target_agents", "target_users", "target_nodes", "timeout_seconds", "auto_mkdir", "upload_rate", "download_rate", "area", "keep_seeding", "from_caller", "content", "cross_area")
    class TargetNodesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_AGENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_USER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    MD5_FIELD_NUMBER: _ClassVar[int]
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    DEST_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_AGENTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_USERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTO_MKDIR_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_RATE_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_RATE_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    KEEP_SEEDING_FIELD_NUMBER: _ClassVar[int]
    FROM_CALLER_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CROSS_AREA_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_index: int
    transfer_id: str
    source_agent: str
    source_user: str
    source_dir: str
    source_name: str
    md5: str
    dest_dir: str
    dest_name: str
    owner: str
    permission: int
    target_agents: _containers.RepeatedScalarFieldContainer[str]
    target_users: _containers.RepeatedScalarFieldContainer[str]
    target_nodes: _containers.ScalarMap[str, str]
    timeout_seconds: int
    auto_mkdir: bool
    upload_rate: int
    download_rate: int
    area: int
    keep_seeding: bool
    from_caller: bool
    content: bytes
    cross_area: bool
    def __init__(self, task_id: _Optional[str] = ..., task_index: _Optional[int] = ..., transfer_id: _Optional[str] = ..., source_agent: _Optional[str] = ..., source_user: _Optional[str] = ..., source_dir: _Optional[str] = ..., source_name: _Optional[str] = ..., md5: _Optional[str] = ..., dest_dir: _Optional[str] = ..., dest_name: _Optional[str] = ..., owner: _Optional[str] = ..., permission: _Optional[int] = ..., target_agents: _Optional[_Iterable[str]] = ..., target_users: _Optional[_Iterable[str]] = ..., target_nodes: _Optional[_Mapping[str, str]] = ..., timeout_seconds: _Optional[int] = ..., auto_mkdir: _Optional[bool] = ..., upload_rate: _Optional[int] = ..., download_rate: _Optional[int] = ..., area: _Optional[int] = ..., keep_seeding: _Optional[bool] = ..., from_caller: _Optional[bool] = ..., content: _Optional[bytes] = ..., cross_area: _Optional[bool] = ...) -> None: ...

class NeedDirectRequest(_message.Message):
    __slots__ = ("transfer_id", "index", "agent_id")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    index: int
    agent_id: str
    def __init__(self, transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., agent_id: _Optional[str] = ...) -> None: ...

class SourceChangedRequest(_message.Message):
    __slots__ = ("transfer_id", "index", "agent_id", "error_msg")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    index: int
    agent_id: str
    error_msg: str
    def __init__(self, transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., agent_id: _Optional[str] = ..., error_msg: _Optional[str] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("frame", "agent_ids")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, frame: _Optional[bytes] = ..., agent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentFailure(_message.Message):
    __slots__ = ("agent_id", "code", "message")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    code: int
    message: str
    def __init__(self, agent_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DispatchReply(_message.Message):
    __slots__ = ("failures",)
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    failures: _containers.RepeatedCompositeFieldContainer[AgentFailure]
    def __init__(self, failures: _Optional[_Iterable[_Union[AgentFailure, _Mapping]]] = ...) -> None: ...

class TerminateRequest(_message.Message):
    __slots__ = ("task_id", "agent_ids")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., agent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

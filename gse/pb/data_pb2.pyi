from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataBatch(_message.Message):
    __slots__ = ("batch_id", "data_id", "records", "arrival_ms", "agent_id", "cloud_id", "ip", "origin_batch_id")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    data_id: int
    records: _containers.RepeatedScalarFieldContainer[bytes]
    arrival_ms: int
    agent_id: str
    cloud_id: int
    ip: str
    origin_batch_id: int
    def __init__(self, batch_id: _Optional[int] = ..., data_id: _Optional[int] = ..., records: _Optional[_Iterable[bytes]] = ..., arrival_ms: _Optional[int] = ..., agent_id: _Optional[str] = ..., cloud_id: _Optional[int] = ..., ip: _Optional[str] = ..., origin_batch_id: _Optional[int] = ...) -> None: ...

class DataAck(_message.Message):
    __slots__ = ("ok", "failed", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: _containers.RepeatedScalarFieldContainer[int]
    failed: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, ok: _Optional[_Iterable[int]] = ..., failed: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class DataServerInfo(_message.Message):
    __slots__ = ("node_id", "address", "load", "records_per_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PER_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    load: int
    records_per_s: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., load: _Optional[int] = ..., records_per_s: _Optional[float] = ...) -> None: ...

class DataServerView(_message.Message):
    __slots__ = ("servers",)
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[DataServerInfo]
    def __init__(self, servers: _Optional[_Iterable[_Union[DataServerInfo, _Mapping]]] = ...) -> None: ...

class PluginMessage(_message.Message):
    __slots__ = ("message_id", "slot_id", "content", "plugin_name")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_NAME_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    slot_id: str
    content: bytes
    plugin_name: str
    def __init__(self, message_id: _Optional[str] = ..., slot_id: _Optional[str] = ..., content: _Optional[bytes] = ..., plugin_name: _Optional[str] = ...) -> None: ...

class PluginReply(_message.Message):
    __slots__ = ("message_id", "slot_id", "plugin_name", "content", "meta_json")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    slot_id: str
    plugin_name: str
    content: bytes
    meta_json: str
    def __init__(self, message_id: _Optional[str] = ..., slot_id: _Optional[str] = ..., plugin_name: _Optional[str] = ..., content: _Optional[bytes] = ..., meta_json: _Optional[str] = ...) -> None: ...

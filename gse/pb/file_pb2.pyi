from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CreateTransferRequest(_message.Message):
    __slots__ = ("transfer_id", "area", "members", "timeout_seconds", "max_rate", "member_areas", "cross_area", "uploaders")
    class MemberAreasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_RATE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_AREAS_FIELD_NUMBER: _ClassVar[int]
    CROSS_AREA_FIELD_NUMBER: _ClassVar[int]
    UPLOADERS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    area: int
    members: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: int
    max_rate: int
    member_areas: _containers.ScalarMap[str, int]
    cross_area: bool
    uploaders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, transfer_id: _Optional[str] = ..., area: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[int] = ..., max_rate: _Optional[int] = ..., member_areas: _Optional[_Mapping[str, int]] = ..., cross_area: _Optional[bool] = ..., uploaders: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTransferReply(_message.Message):
    __slots__ = ("tokens", "tracker_url", "rate_limit", "max_connections")
    class TokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRACKER_URL_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.ScalarMap[str, str]
    tracker_url: str
    rate_limit: int
    max_connections: int
    def __init__(self, tokens: _Optional[_Mapping[str, str]] = ..., tracker_url: _Optional[str] = ..., rate_limit: _Optional[int] = ..., max_connections: _Optional[int] = ...) -> None: ...

class AddTorrentsRequest(_message.Message):
    __slots__ = ("transfer_id", "info_hashes")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_HASHES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    info_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, transfer_id: _Optional[str] = ..., info_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AddTorrentsReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndTransferRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class EndTransferReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("transfer_id", "index", "offset", "data", "token", "size", "last", "zeros")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ZEROS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    index: int
    offset: int
    data: bytes
    token: str
    size: int
    last: bool
    zeros: int
    def __init__(self, transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., token: _Optional[str] = ..., size: _Optional[int] = ..., last: _Optional[bool] = ..., zeros: _Optional[int] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("transfer_id", "index", "offset", "token", "wait_seconds")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    index: int
    offset: int
    token: str
    wait_seconds: int
    def __init__(self, transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., offset: _Optional[int] = ..., token: _Optional[str] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Op(_message.Message):
    __slots__ = ("kind", "key", "value", "fields", "names", "members", "ttl_ms", "start", "stop", "integer")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GET: _ClassVar[Op.Kind]
        SET: _ClassVar[Op.Kind]
        DEL: _ClassVar[Op.Kind]
        HSET: _ClassVar[Op.Kind]
        HGETALL: _ClassVar[Op.Kind]
        HMGET: _ClassVar[Op.Kind]
        HDEL: _ClassVar[Op.Kind]
        EXPIRE: _ClassVar[Op.Kind]
        SADD: _ClassVar[Op.Kind]
        SREM: _ClassVar[Op.Kind]
        SMEMBERS: _ClassVar[Op.Kind]
        RPUSH: _ClassVar[Op.Kind]
        LRANGE: _ClassVar[Op.Kind]
        INCRBY: _ClassVar[Op.Kind]
        APPEND: _ClassVar[Op.Kind]
        GETRANGE: _ClassVar[Op.Kind]
        STRLEN: _ClassVar[Op.Kind]
        EXISTS: _ClassVar[Op.Kind]
        SETRANGE: _ClassVar[Op.Kind]
    GET: Op.Kind
    SET: Op.Kind
    DEL: Op.Kind
    HSET: Op.Kind
    HGETALL: Op.Kind
    HMGET: Op.Kind
    HDEL: Op.Kind
    EXPIRE: Op.Kind
    SADD: Op.Kind
    SREM: Op.Kind
    SMEMBERS: Op.Kind
    RPUSH: Op.Kind
    LRANGE: Op.Kind
    INCRBY: Op.Kind
    APPEND: Op.Kind
    GETRANGE: Op.Kind
    STRLEN: Op.Kind
    EXISTS: Op.Kind
    SETRANGE: Op.Kind
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    kind: Op.Kind
    key: str
    value: bytes
    fields: _containers.ScalarMap[str, bytes]
    names: _containers.RepeatedScalarFieldContainer[str]
    members: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_ms: int
    start: int
    stop: int
    integer: int
    def __init__(self, kind: _Optional[_Union[Op.Kind, str]] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., fields: _Optional[_Mapping[str, bytes]] = ..., names: _Optional[_Iterable[str]] = ..., members: _Optional[_Iterable[bytes]] = ..., ttl_ms: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., integer: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("ok", "error", "found", "value", "fields", "values", "present", "integer", "retryable")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    found: bool
    value: bytes
    fields: _containers.ScalarMap[str, bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    present: _containers.RepeatedScalarFieldContainer[bool]
    integer: int
    retryable: bool
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., found: _Optional[bool] = ..., value: _Optional[bytes] = ..., fields: _Optional[_Mapping[str, bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., present: _Optional[_Iterable[bool]] = ..., integer: _Optional[int] = ..., retryable: _Optional[bool] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[Op]
    def __init__(self, ops: _Optional[_Iterable[_Union[Op, _Mapping]]] = ...) -> None: ...

class BatchReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...

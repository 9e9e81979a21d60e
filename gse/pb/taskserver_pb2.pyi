from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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

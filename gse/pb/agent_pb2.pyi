from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostSnapshot(_message.Message):
    __slots__ = ("cpu_num", "mem_size", "cpu_rate", "mem_rate", "load1", "uptime_s", "proc_count", "disk_total", "disk_used")
    CPU_NUM_FIELD_NUMBER: _ClassVar[int]
    MEM_SIZE_FIELD_NUMBER: _ClassVar[int]
    CPU_RATE_FIELD_NUMBER: _ClassVar[int]
    MEM_RATE_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PROC_COUNT_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_FIELD_NUMBER: _ClassVar[int]
    cpu_num: int
    mem_size: int
    cpu_rate: float
    mem_rate: float
    load1: float
    uptime_s: int
    proc_count: int
    disk_total: int
    disk_used: int
    def __init__(self, cpu_num: _Optional[int] = ..., mem_size: _Optional[int] = ..., cpu_rate: _Optional[float] = ..., mem_rate: _Optional[float] = ..., load1: _Optional[float] = ..., uptime_s: _Optional[int] = ..., proc_count: _Optional[int] = ..., disk_total: _Optional[int] = ..., disk_used: _Optional[int] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("agent_id", "cloud_id", "ip", "hostname", "os", "arch", "version", "run_mode", "start_time_ms", "redirects", "boot_id")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_MODE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    cloud_id: int
    ip: str
    hostname: str
    os: str
    arch: str
    version: str
    run_mode: int
    start_time_ms: int
    redirects: int
    boot_id: int
    def __init__(self, agent_id: _Optional[str] = ..., cloud_id: _Optional[int] = ..., ip: _Optional[str] = ..., hostname: _Optional[str] = ..., os: _Optional[str] = ..., arch: _Optional[str] = ..., version: _Optional[str] = ..., run_mode: _Optional[int] = ..., start_time_ms: _Optional[int] = ..., redirects: _Optional[int] = ..., boot_id: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "cpu_rate", "mem_rate", "host")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CPU_RATE_FIELD_NUMBER: _ClassVar[int]
    MEM_RATE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    seq: int
    cpu_rate: float
    mem_rate: float
    host: HostSnapshot
    def __init__(self, seq: _Optional[int] = ..., cpu_rate: _Optional[float] = ..., mem_rate: _Optional[float] = ..., host: _Optional[_Union[HostSnapshot, _Mapping]] = ...) -> None: ...

class AgentFrame(_message.Message):
    __slots__ = ("hello", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_ms", "parent_ip", "parent_port")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PARENT_IP_FIELD_NUMBER: _ClassVar[int]
    PARENT_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_ms: int
    parent_ip: str
    parent_port: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., parent_ip: _Optional[str] = ..., parent_port: _Optional[int] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("address", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    reason: str
    def __init__(self, address: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "redirect")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    redirect: Redirect
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., redirect: _Optional[_Union[Redirect, _Mapping]] = ...) -> None: ...

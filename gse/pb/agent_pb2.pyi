from gse.pb import data_pb2 as _data_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
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
    __slots__ = ("agent_id", "cloud_id", "ip", "hostname", "os", "arch", "version", "run_mode", "start_time_ms", "redirects", "boot_id", "hostid_md5")
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
    HOSTID_MD5_FIELD_NUMBER: _ClassVar[int]
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
    hostid_md5: str
    def __init__(self, agent_id: _Optional[str] = ..., cloud_id: _Optional[int] = ..., ip: _Optional[str] = ..., hostname: _Optional[str] = ..., os: _Optional[str] = ..., arch: _Optional[str] = ..., version: _Optional[str] = ..., run_mode: _Optional[int] = ..., start_time_ms: _Optional[int] = ..., redirects: _Optional[int] = ..., boot_id: _Optional[int] = ..., hostid_md5: _Optional[str] = ...) -> None: ...

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

class TaskScript(_message.Message):
    __slots__ = ("name", "store_dir", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORE_DIR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    store_dir: str
    content: bytes
    def __init__(self, name: _Optional[str] = ..., store_dir: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class AtomicTask(_message.Message):
    __slots__ = ("atomic_task_id", "command", "timeout_seconds", "depends_on")
    ATOMIC_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    atomic_task_id: int
    command: str
    timeout_seconds: int
    depends_on: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, atomic_task_id: _Optional[int] = ..., command: _Optional[str] = ..., timeout_seconds: _Optional[int] = ..., depends_on: _Optional[_Iterable[int]] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("task_id", "user", "scripts", "atomic_tasks", "created_ms", "max_output_bytes", "request_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    SCRIPTS_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_TASKS_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    user: str
    scripts: _containers.RepeatedCompositeFieldContainer[TaskScript]
    atomic_tasks: _containers.RepeatedCompositeFieldContainer[AtomicTask]
    created_ms: int
    max_output_bytes: int
    request_id: str
    def __init__(self, task_id: _Optional[str] = ..., user: _Optional[str] = ..., scripts: _Optional[_Iterable[_Union[TaskScript, _Mapping]]] = ..., atomic_tasks: _Optional[_Iterable[_Union[AtomicTask, _Mapping]]] = ..., created_ms: _Optional[int] = ..., max_output_bytes: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class TerminateTask(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskOutput(_message.Message):
    __slots__ = ("task_id", "atomic_task_id", "offset", "data")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    atomic_task_id: int
    offset: int
    data: bytes
    def __init__(self, task_id: _Optional[str] = ..., atomic_task_id: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TaskItemResult(_message.Message):
    __slots__ = ("task_id", "atomic_task_id", "status", "error_code", "error_msg", "start_time_ms", "end_time_ms", "exit_code", "has_exit_code", "output_size", "truncated", "final")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    START_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    END_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    atomic_task_id: int
    status: int
    error_code: int
    error_msg: str
    start_time_ms: int
    end_time_ms: int
    exit_code: int
    has_exit_code: bool
    output_size: int
    truncated: bool
    final: bool
    def __init__(self, task_id: _Optional[str] = ..., atomic_task_id: _Optional[int] = ..., status: _Optional[int] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., start_time_ms: _Optional[int] = ..., end_time_ms: _Optional[int] = ..., exit_code: _Optional[int] = ..., has_exit_code: _Optional[bool] = ..., output_size: _Optional[int] = ..., truncated: _Optional[bool] = ..., final: _Optional[bool] = ...) -> None: ...

class TaskReport(_message.Message):
    __slots__ = ("outputs", "results")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[TaskOutput]
    results: _containers.RepeatedCompositeFieldContainer[TaskItemResult]
    def __init__(self, outputs: _Optional[_Iterable[_Union[TaskOutput, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[TaskItemResult, _Mapping]]] = ...) -> None: ...

class ItemRef(_message.Message):
    __slots__ = ("task_id", "atomic_task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    atomic_task_id: int
    def __init__(self, task_id: _Optional[str] = ..., atomic_task_id: _Optional[int] = ...) -> None: ...

class ResultAck(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemRef]
    def __init__(self, items: _Optional[_Iterable[_Union[ItemRef, _Mapping]]] = ...) -> None: ...

class Enroll(_message.Message):
    __slots__ = ("token", "agent_id", "csr")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    token: str
    agent_id: str
    csr: bytes
    def __init__(self, token: _Optional[str] = ..., agent_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class Enrolled(_message.Message):
    __slots__ = ("certificate", "ca")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CA_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    ca: bytes
    def __init__(self, certificate: _Optional[bytes] = ..., ca: _Optional[bytes] = ...) -> None: ...

class AgentFrame(_message.Message):
    __slots__ = ("hello", "heartbeat", "report", "plugin_reply", "file_manifest", "file_report", "need_direct", "enroll", "host_identity_result", "operation_result", "source_changed", "proc_report", "proxy_hello", "relay", "relay_end")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_REPLY_FIELD_NUMBER: _ClassVar[int]
    FILE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILE_REPORT_FIELD_NUMBER: _ClassVar[int]
    NEED_DIRECT_FIELD_NUMBER: _ClassVar[int]
    ENROLL_FIELD_NUMBER: _ClassVar[int]
    HOST_IDENTITY_RESULT_FIELD_NUMBER: _ClassVar[int]
    OPERATION_RESULT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PROC_REPORT_FIELD_NUMBER: _ClassVar[int]
    PROXY_HELLO_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    RELAY_END_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    heartbeat: Heartbeat
    report: TaskReport
    plugin_reply: _data_pb2.PluginReply
    file_manifest: FileManifest
    file_report: FileReport
    need_direct: NeedDirect
    enroll: Enroll
    host_identity_result: HostIdentityResult
    operation_result: OperationResult
    source_changed: FileSourceChanged
    proc_report: ProcReport
    proxy_hello: ProxyHello
    relay: Relay
    relay_end: RelayEnd
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., report: _Optional[_Union[TaskReport, _Mapping]] = ..., plugin_reply: _Optional[_Union[_data_pb2.PluginReply, _Mapping]] = ..., file_manifest: _Optional[_Union[FileManifest, _Mapping]] = ..., file_report: _Optional[_Union[FileReport, _Mapping]] = ..., need_direct: _Optional[_Union[NeedDirect, _Mapping]] = ..., enroll: _Optional[_Union[Enroll, _Mapping]] = ..., host_identity_result: _Optional[_Union[HostIdentityResult, _Mapping]] = ..., operation_result: _Optional[_Union[OperationResult, _Mapping]] = ..., source_changed: _Optional[_Union[FileSourceChanged, _Mapping]] = ..., proc_report: _Optional[_Union[ProcReport, _Mapping]] = ..., proxy_hello: _Optional[_Union[ProxyHello, _Mapping]] = ..., relay: _Optional[_Union[Relay, _Mapping]] = ..., relay_end: _Optional[_Union[RelayEnd, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_ms", "parent_ip", "parent_port", "reconnect_spread_ms", "host_snapshot_every")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PARENT_IP_FIELD_NUMBER: _ClassVar[int]
    PARENT_PORT_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_SPREAD_MS_FIELD_NUMBER: _ClassVar[int]
    HOST_SNAPSHOT_EVERY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_ms: int
    parent_ip: str
    parent_port: int
    reconnect_spread_ms: int
    host_snapshot_every: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., parent_ip: _Optional[str] = ..., parent_port: _Optional[int] = ..., reconnect_spread_ms: _Optional[int] = ..., host_snapshot_every: _Optional[int] = ...) -> None: ...

class Tune(_message.Message):
    __slots__ = ("reconnect_spread_ms",)
    RECONNECT_SPREAD_MS_FIELD_NUMBER: _ClassVar[int]
    reconnect_spread_ms: int
    def __init__(self, reconnect_spread_ms: _Optional[int] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("address", "reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    reason: str
    def __init__(self, address: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("reason", "code")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    code: str
    def __init__(self, reason: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "redirect", "task", "terminate", "ack", "data_servers", "plugin_message", "file_source", "file_target", "upload_request", "end_transfer", "tune", "proc_ops", "proc_ack", "relay", "relay_end", "area_hosts", "relay_transfer", "refused", "enrolled", "host_identity", "operate", "end_entry")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TERMINATE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    DATA_SERVERS_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FILE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILE_TARGET_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_REQUEST_FIELD_NUMBER: _ClassVar[int]
    END_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    TUNE_FIELD_NUMBER: _ClassVar[int]
    PROC_OPS_FIELD_NUMBER: _ClassVar[int]
    PROC_ACK_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    RELAY_END_FIELD_NUMBER: _ClassVar[int]
    AREA_HOSTS_FIELD_NUMBER: _ClassVar[int]
    RELAY_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    HOST_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    OPERATE_FIELD_NUMBER: _ClassVar[int]
    END_ENTRY_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    redirect: Redirect
    task: TaskRequest
    terminate: TerminateTask
    ack: ResultAck
    data_servers: _data_pb2.DataServerView
    plugin_message: _data_pb2.PluginMessage
    file_source: FileSource
    file_target: FileTarget
    upload_request: UploadRequest
    end_transfer: EndTransfer
    tune: Tune
    proc_ops: ProcOperations
    proc_ack: ProcAck
    relay: Relay
    relay_end: RelayEnd
    area_hosts: AreaHosts
    relay_transfer: RelayTransfer
    refused: Refused
    enrolled: Enrolled
    host_identity: HostIdentity
    operate: AgentOperation
    end_entry: EndEntry
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., redirect: _Optional[_Union[Redirect, _Mapping]] = ..., task: _Optional[_Union[TaskRequest, _Mapping]] = ..., terminate: _Optional[_Union[TerminateTask, _Mapping]] = ..., ack: _Optional[_Union[ResultAck, _Mapping]] = ..., data_servers: _Optional[_Union[_data_pb2.DataServerView, _Mapping]] = ..., plugin_message: _Optional[_Union[_data_pb2.PluginMessage, _Mapping]] = ..., file_source: _Optional[_Union[FileSource, _Mapping]] = ..., file_target: _Optional[_Union[FileTarget, _Mapping]] = ..., upload_request: _Optional[_Union[UploadRequest, _Mapping]] = ..., end_transfer: _Optional[_Union[EndTransfer, _Mapping]] = ..., tune: _Optional[_Union[Tune, _Mapping]] = ..., proc_ops: _Optional[_Union[ProcOperations, _Mapping]] = ..., proc_ack: _Optional[_Union[ProcAck, _Mapping]] = ..., relay: _Optional[_Union[Relay, _Mapping]] = ..., relay_end: _Optional[_Union[RelayEnd, _Mapping]] = ..., area_hosts: _Optional[_Union[AreaHosts, _Mapping]] = ..., relay_transfer: _Optional[_Union[RelayTransfer, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., enrolled: _Optional[_Union[Enrolled, _Mapping]] = ..., host_identity: _Optional[_Union[HostIdentity, _Mapping]] = ..., operate: _Optional[_Union[AgentOperation, _Mapping]] = ..., end_entry: _Optional[_Union[EndEntry, _Mapping]] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("index", "rel_path", "is_dir", "size", "mode", "md5", "torrent", "info_hash", "link_target", "holes", "error_code", "error_msg", "content")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REL_PATH_FIELD_NUMBER: _ClassVar[int]
    IS_DIR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MD5_FIELD_NUMBER: _ClassVar[int]
    TORRENT_FIELD_NUMBER: _ClassVar[int]
    INFO_HASH_FIELD_NUMBER: _ClassVar[int]
    LINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    rel_path: str
    is_dir: bool
    size: int
    mode: int
    md5: str
    torrent: bytes
    info_hash: bytes
    link_target: str
    holes: _containers.RepeatedScalarFieldContainer[int]
    error_code: int
    error_msg: str
    content: bytes
    def __init__(self, index: _Optional[int] = ..., rel_path: _Optional[str] = ..., is_dir: _Optional[bool] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., md5: _Optional[str] = ..., torrent: _Optional[bytes] = ..., info_hash: _Optional[bytes] = ..., link_target: _Optional[str] = ..., holes: _Optional[_Iterable[int]] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class FileSource(_message.Message):
    __slots__ = ("task_id", "transfer_id", "store_dir", "file_name", "md5", "user", "fileserver", "token", "tracker_url", "direct_max", "max_file_size", "upload_rate", "timeout_seconds", "keep_seeding", "targets", "request_id", "coordinator")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_DIR_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    MD5_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    FILESERVER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRACKER_URL_FIELD_NUMBER: _ClassVar[int]
    DIRECT_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_RATE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SEEDING_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    transfer_id: str
    store_dir: str
    file_name: str
    md5: str
    user: str
    fileserver: str
    token: str
    tracker_url: str
    direct_max: int
    max_file_size: int
    upload_rate: int
    timeout_seconds: int
    keep_seeding: bool
    targets: int
    request_id: str
    coordinator: str
    def __init__(self, task_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., store_dir: _Optional[str] = ..., file_name: _Optional[str] = ..., md5: _Optional[str] = ..., user: _Optional[str] = ..., fileserver: _Optional[str] = ..., token: _Optional[str] = ..., tracker_url: _Optional[str] = ..., direct_max: _Optional[int] = ..., max_file_size: _Optional[int] = ..., upload_rate: _Optional[int] = ..., timeout_seconds: _Optional[int] = ..., keep_seeding: _Optional[bool] = ..., targets: _Optional[int] = ..., request_id: _Optional[str] = ..., coordinator: _Optional[str] = ...) -> None: ...

class FileManifest(_message.Message):
    __slots__ = ("task_id", "transfer_id", "entries", "error_code", "error_msg", "source_dir")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    transfer_id: str
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    error_code: int
    error_msg: str
    source_dir: str
    def __init__(self, task_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., source_dir: _Optional[str] = ...) -> None: ...

class FileTarget(_message.Message):
    __slots__ = ("task_id", "transfer_id", "coordinator", "dest_dir", "dest_name", "owner", "permission", "auto_mkdir", "entries", "fileserver", "tracker_url", "tokens", "download_rate", "upload_rate", "timeout_seconds", "source_agent_id", "source_dir", "max_connections", "user", "task_index", "request_id")
    class TokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    DEST_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    AUTO_MKDIR_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FILESERVER_FIELD_NUMBER: _ClassVar[int]
    TRACKER_URL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_RATE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_RATE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIR_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    transfer_id: str
    coordinator: str
    dest_dir: str
    dest_name: str
    owner: str
    permission: int
    auto_mkdir: bool
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    fileserver: str
    tracker_url: str
    tokens: _containers.ScalarMap[str, str]
    download_rate: int
    upload_rate: int
    timeout_seconds: int
    source_agent_id: str
    source_dir: str
    max_connections: int
    user: str
    task_index: int
    request_id: str
    def __init__(self, task_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., coordinator: _Optional[str] = ..., dest_dir: _Optional[str] = ..., dest_name: _Optional[str] = ..., owner: _Optional[str] = ..., permission: _Optional[int] = ..., auto_mkdir: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., fileserver: _Optional[str] = ..., tracker_url: _Optional[str] = ..., tokens: _Optional[_Mapping[str, str]] = ..., download_rate: _Optional[int] = ..., upload_rate: _Optional[int] = ..., timeout_seconds: _Optional[int] = ..., source_agent_id: _Optional[str] = ..., source_dir: _Optional[str] = ..., max_connections: _Optional[int] = ..., user: _Optional[str] = ..., task_index: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class FileProgress(_message.Message):
    __slots__ = ("task_id", "transfer_id", "index", "status", "error_code", "error_msg", "progress", "speed", "size", "type", "start_time_ms", "end_time_ms", "final", "dest_path", "mode", "task_index", "source_path")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    END_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    DEST_PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PATH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    transfer_id: str
    index: int
    status: int
    error_code: int
    error_msg: str
    progress: int
    speed: int
    size: int
    type: str
    start_time_ms: int
    end_time_ms: int
    final: bool
    dest_path: str
    mode: int
    task_index: int
    source_path: str
    def __init__(self, task_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., status: _Optional[int] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., progress: _Optional[int] = ..., speed: _Optional[int] = ..., size: _Optional[int] = ..., type: _Optional[str] = ..., start_time_ms: _Optional[int] = ..., end_time_ms: _Optional[int] = ..., final: _Optional[bool] = ..., dest_path: _Optional[str] = ..., mode: _Optional[int] = ..., task_index: _Optional[int] = ..., source_path: _Optional[str] = ...) -> None: ...

class FileReport(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FileProgress]
    def __init__(self, items: _Optional[_Iterable[_Union[FileProgress, _Mapping]]] = ...) -> None: ...

class NeedDirect(_message.Message):
    __slots__ = ("transfer_id", "coordinator", "index")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    coordinator: str
    index: int
    def __init__(self, transfer_id: _Optional[str] = ..., coordinator: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class FileSourceChanged(_message.Message):
    __slots__ = ("transfer_id", "coordinator", "index", "error_msg")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    coordinator: str
    index: int
    error_msg: str
    def __init__(self, transfer_id: _Optional[str] = ..., coordinator: _Optional[str] = ..., index: _Optional[int] = ..., error_msg: _Optional[str] = ...) -> None: ...

class EndEntry(_message.Message):
    __slots__ = ("transfer_id", "index", "error_code", "error_msg")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    index: int
    error_code: int
    error_msg: str
    def __init__(self, transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("transfer_id", "indexes", "announce")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    indexes: _containers.RepeatedScalarFieldContainer[int]
    announce: bool
    def __init__(self, transfer_id: _Optional[str] = ..., indexes: _Optional[_Iterable[int]] = ..., announce: _Optional[bool] = ...) -> None: ...

class EndTransfer(_message.Message):
    __slots__ = ("transfer_id", "task_id", "terminated")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    task_id: str
    terminated: bool
    def __init__(self, transfer_id: _Optional[str] = ..., task_id: _Optional[str] = ..., terminated: _Optional[bool] = ...) -> None: ...

class ProcSpec(_message.Message):
    __slots__ = ("proc_name", "setup_path", "pid_path", "user", "config_path", "log_path", "index_key", "start_cmd", "stop_cmd", "restart_cmd", "reload_cmd", "kill_cmd", "version_cmd", "health_cmd", "cpu", "mem", "auto_type", "start_check_secs", "stop_check_secs", "start_retries", "start_interval", "op_timeout", "crontab_rule", "health_check_secs")
    PROC_NAME_FIELD_NUMBER: _ClassVar[int]
    SETUP_PATH_FIELD_NUMBER: _ClassVar[int]
    PID_PATH_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    INDEX_KEY_FIELD_NUMBER: _ClassVar[int]
    START_CMD_FIELD_NUMBER: _ClassVar[int]
    STOP_CMD_FIELD_NUMBER: _ClassVar[int]
    RESTART_CMD_FIELD_NUMBER: _ClassVar[int]
    RELOAD_CMD_FIELD_NUMBER: _ClassVar[int]
    KILL_CMD_FIELD_NUMBER: _ClassVar[int]
    VERSION_CMD_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CMD_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEM_FIELD_NUMBER: _ClassVar[int]
    AUTO_TYPE_FIELD_NUMBER: _ClassVar[int]
    START_CHECK_SECS_FIELD_NUMBER: _ClassVar[int]
    STOP_CHECK_SECS_FIELD_NUMBER: _ClassVar[int]
    START_RETRIES_FIELD_NUMBER: _ClassVar[int]
    START_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    OP_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CRONTAB_RULE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_SECS_FIELD_NUMBER: _ClassVar[int]
    proc_name: str
    setup_path: str
    pid_path: str
    user: str
    config_path: str
    log_path: str
    index_key: str
    start_cmd: str
    stop_cmd: str
    restart_cmd: str
    reload_cmd: str
    kill_cmd: str
    version_cmd: str
    health_cmd: str
    cpu: float
    mem: float
    auto_type: int
    start_check_secs: int
    stop_check_secs: int
    start_retries: int
    start_interval: int
    op_timeout: int
    crontab_rule: str
    health_check_secs: int
    def __init__(self, proc_name: _Optional[str] = ..., setup_path: _Optional[str] = ..., pid_path: _Optional[str] = ..., user: _Optional[str] = ..., config_path: _Optional[str] = ..., log_path: _Optional[str] = ..., index_key: _Optional[str] = ..., start_cmd: _Optional[str] = ..., stop_cmd: _Optional[str] = ..., restart_cmd: _Optional[str] = ..., reload_cmd: _Optional[str] = ..., kill_cmd: _Optional[str] = ..., version_cmd: _Optional[str] = ..., health_cmd: _Optional[str] = ..., cpu: _Optional[float] = ..., mem: _Optional[float] = ..., auto_type: _Optional[int] = ..., start_check_secs: _Optional[int] = ..., stop_check_secs: _Optional[int] = ..., start_retries: _Optional[int] = ..., start_interval: _Optional[int] = ..., op_timeout: _Optional[int] = ..., crontab_rule: _Optional[str] = ..., health_check_secs: _Optional[int] = ...) -> None: ...

class ProcOperation(_message.Message):
    __slots__ = ("namespace", "name", "op_type", "spec", "labels_json", "registered_at")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LABELS_JSON_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    op_type: int
    spec: ProcSpec
    labels_json: str
    registered_at: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., op_type: _Optional[int] = ..., spec: _Optional[_Union[ProcSpec, _Mapping]] = ..., labels_json: _Optional[str] = ..., registered_at: _Optional[int] = ...) -> None: ...

class ProcOperations(_message.Message):
    __slots__ = ("task_id", "ops", "request_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    ops: _containers.RepeatedCompositeFieldContainer[ProcOperation]
    request_id: str
    def __init__(self, task_id: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[ProcOperation, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ProcOpResult(_message.Message):
    __slots__ = ("task_id", "namespace", "name", "error_code", "error_msg", "content")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    namespace: str
    name: str
    error_code: int
    error_msg: str
    content: str
    def __init__(self, task_id: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ProcState(_message.Message):
    __slots__ = ("namespace", "name", "registered", "status", "isauto", "pid", "version", "cpu_usage", "mem_usage", "fd", "last_start_time", "report_time", "message", "source", "registered_at", "labels_json", "mem_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ISAUTO_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEM_USAGE_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    LAST_START_TIME_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LABELS_JSON_FIELD_NUMBER: _ClassVar[int]
    MEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    registered: bool
    status: int
    isauto: bool
    pid: int
    version: str
    cpu_usage: float
    mem_usage: float
    fd: int
    last_start_time: int
    report_time: int
    message: str
    source: str
    registered_at: int
    labels_json: str
    mem_bytes: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., registered: _Optional[bool] = ..., status: _Optional[int] = ..., isauto: _Optional[bool] = ..., pid: _Optional[int] = ..., version: _Optional[str] = ..., cpu_usage: _Optional[float] = ..., mem_usage: _Optional[float] = ..., fd: _Optional[int] = ..., last_start_time: _Optional[int] = ..., report_time: _Optional[int] = ..., message: _Optional[str] = ..., source: _Optional[str] = ..., registered_at: _Optional[int] = ..., labels_json: _Optional[str] = ..., mem_bytes: _Optional[int] = ...) -> None: ...

class ProcReport(_message.Message):
    __slots__ = ("results", "states", "full")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProcOpResult]
    states: _containers.RepeatedCompositeFieldContainer[ProcState]
    full: bool
    def __init__(self, results: _Optional[_Iterable[_Union[ProcOpResult, _Mapping]]] = ..., states: _Optional[_Iterable[_Union[ProcState, _Mapping]]] = ..., full: _Optional[bool] = ...) -> None: ...

class ProcResultRef(_message.Message):
    __slots__ = ("task_id", "namespace", "name")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    namespace: str
    name: str
    def __init__(self, task_id: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ProcAck(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ProcResultRef]
    def __init__(self, items: _Optional[_Iterable[_Union[ProcResultRef, _Mapping]]] = ...) -> None: ...

class HostIdentity(_message.Message):
    __slots__ = ("content", "md5", "version")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MD5_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    md5: str
    version: int
    def __init__(self, content: _Optional[bytes] = ..., md5: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class HostIdentityResult(_message.Message):
    __slots__ = ("md5", "version", "error_code", "error_msg")
    MD5_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    md5: str
    version: int
    error_code: int
    error_msg: str
    def __init__(self, md5: _Optional[str] = ..., version: _Optional[int] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ...) -> None: ...

class AgentOperation(_message.Message):
    __slots__ = ("op", "request_id", "version", "package_path", "sha256", "size", "timeout_seconds")
    OP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    op: int
    request_id: str
    version: str
    package_path: str
    sha256: str
    size: int
    timeout_seconds: int
    def __init__(self, op: _Optional[int] = ..., request_id: _Optional[str] = ..., version: _Optional[str] = ..., package_path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class OperationResult(_message.Message):
    __slots__ = ("op", "request_id", "error_code", "error_msg", "state", "version", "from_version")
    OP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MSG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    op: int
    request_id: str
    error_code: int
    error_msg: str
    state: str
    version: str
    from_version: str
    def __init__(self, op: _Optional[int] = ..., request_id: _Optional[str] = ..., error_code: _Optional[int] = ..., error_msg: _Optional[str] = ..., state: _Optional[str] = ..., version: _Optional[str] = ..., from_version: _Optional[str] = ...) -> None: ...

class ProxyHello(_message.Message):
    __slots__ = ("node_id", "area", "agent_address", "data_address", "file_address", "tracker_url", "version", "boot_id", "ip", "hostname")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FILE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRACKER_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    area: int
    agent_address: str
    data_address: str
    file_address: str
    tracker_url: str
    version: str
    boot_id: int
    ip: str
    hostname: str
    def __init__(self, node_id: _Optional[str] = ..., area: _Optional[int] = ..., agent_address: _Optional[str] = ..., data_address: _Optional[str] = ..., file_address: _Optional[str] = ..., tracker_url: _Optional[str] = ..., version: _Optional[str] = ..., boot_id: _Optional[int] = ..., ip: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class Relay(_message.Message):
    __slots__ = ("agent_ids", "frame", "via", "peer", "serial")
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    frame: bytes
    via: str
    peer: str
    serial: str
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ..., frame: _Optional[bytes] = ..., via: _Optional[str] = ..., peer: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...

class RelayEnd(_message.Message):
    __slots__ = ("agent_ids", "reason")
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class AreaHosts(_message.Message):
    __slots__ = ("area", "ips", "proxies")
    AREA_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    area: int
    ips: _containers.RepeatedScalarFieldContainer[str]
    proxies: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, area: _Optional[int] = ..., ips: _Optional[_Iterable[str]] = ..., proxies: _Optional[_Iterable[str]] = ...) -> None: ...

class RelayTransfer(_message.Message):
    __slots__ = ("transfer_id", "area", "member", "members", "entries", "upstream_fileserver", "upstream_tracker_url", "timeout_seconds", "rate", "max_connections", "task_id", "source_inside", "uploaders")
    class MembersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FILESERVER_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_TRACKER_URL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSIDE_FIELD_NUMBER: _ClassVar[int]
    UPLOADERS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    area: int
    member: str
    members: _containers.ScalarMap[str, str]
    entries: _containers.RepeatedCompositeFieldContainer[FileEntry]
    upstream_fileserver: str
    upstream_tracker_url: str
    timeout_seconds: int
    rate: int
    max_connections: int
    task_id: str
    source_inside: bool
    uploaders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, transfer_id: _Optional[str] = ..., area: _Optional[int] = ..., member: _Optional[str] = ..., members: _Optional[_Mapping[str, str]] = ..., entries: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., upstream_fileserver: _Optional[str] = ..., upstream_tracker_url: _Optional[str] = ..., timeout_seconds: _Optional[int] = ..., rate: _Optional[int] = ..., max_connections: _Optional[int] = ..., task_id: _Optional[str] = ..., source_inside: _Optional[bool] = ..., uploaders: _Optional[_Iterable[str]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_KIND_UNSPECIFIED: _ClassVar[RequestKind]
    GET_EXECUTOR: _ClassVar[RequestKind]
    CREATE_VALUE: _ClassVar[RequestKind]
    CREATE_CALL: _ClassVar[RequestKind]
    CREATE_STRUCT: _ClassVar[RequestKind]
    CREATE_SELECTION: _ClassVar[RequestKind]
    COMPUTE: _ClassVar[RequestKind]
    DISPOSE: _ClassVar[RequestKind]
    DISPOSE_EXECUTOR: _ClassVar[RequestKind]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    EXECUTOR_ERROR: _ClassVar[ErrorCode]
    MALFORMED_TASK: _ClassVar[ErrorCode]
    UNSUPPORTED_PROTOCOL: _ClassVar[ErrorCode]
    EXECUTOR_UNAVAILABLE: _ClassVar[ErrorCode]
    STATE_LOST: _ClassVar[ErrorCode]
    DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    WRONG_SILO: _ClassVar[ErrorCode]
    CHUNK_INVALID: _ClassVar[ErrorCode]
REQUEST_KIND_UNSPECIFIED: RequestKind
GET_EXECUTOR: RequestKind
CREATE_VALUE: RequestKind
CREATE_CALL: RequestKind
CREATE_STRUCT: RequestKind
CREATE_SELECTION: RequestKind
COMPUTE: RequestKind
DISPOSE: RequestKind
DISPOSE_EXECUTOR: RequestKind
ERROR_CODE_UNSPECIFIED: ErrorCode
EXECUTOR_ERROR: ErrorCode
MALFORMED_TASK: ErrorCode
UNSUPPORTED_PROTOCOL: ErrorCode
EXECUTOR_UNAVAILABLE: ErrorCode
STATE_LOST: ErrorCode
DEADLINE_EXCEEDED: ErrorCode
WRONG_SILO: ErrorCode
CHUNK_INVALID: ErrorCode

class Chunk(_message.Message):
    __slots__ = ("index", "count", "sha256", "total_size")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    sha256: bytes
    total_size: int
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., sha256: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("protocol_version", "task_id", "job_id", "silo_id", "deadline_unix_ms", "kind", "request", "chunk", "incarnation")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    job_id: str
    silo_id: str
    deadline_unix_ms: int
    kind: RequestKind
    request: bytes
    chunk: Chunk
    incarnation: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., silo_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., kind: _Optional[_Union[RequestKind, str]] = ..., request: _Optional[bytes] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., incarnation: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retryable")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    retryable: bool
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., retryable: bool = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("protocol_version", "task_id", "silo_id", "kind", "response", "error", "chunk", "worker_incarnation", "duration_us")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    WORKER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    silo_id: str
    kind: RequestKind
    response: bytes
    error: Error
    chunk: Chunk
    worker_incarnation: str
    duration_us: int
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ..., silo_id: _Optional[str] = ..., kind: _Optional[_Union[RequestKind, str]] = ..., response: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., worker_incarnation: _Optional[str] = ..., duration_us: _Optional[int] = ...) -> None: ...

class TaskBatch(_message.Message):
    __slots__ = ("protocol_version", "tasks")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    tasks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, protocol_version: _Optional[int] = ..., tasks: _Optional[_Iterable[bytes]] = ...) -> None: ...

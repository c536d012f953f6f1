from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "codec", "scales", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        DTYPE_FLOAT32: _ClassVar[Tensor.DType]
        DTYPE_FLOAT16: _ClassVar[Tensor.DType]
        DTYPE_BFLOAT16: _ClassVar[Tensor.DType]
        DTYPE_UINT8: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    DTYPE_FLOAT32: Tensor.DType
    DTYPE_FLOAT16: Tensor.DType
    DTYPE_BFLOAT16: Tensor.DType
    DTYPE_UINT8: Tensor.DType
    class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODEC_UNSPECIFIED: _ClassVar[Tensor.Codec]
        CODEC_FP32: _ClassVar[Tensor.Codec]
        CODEC_FP16: _ClassVar[Tensor.Codec]
        CODEC_INT8: _ClassVar[Tensor.Codec]
        CODEC_UINT8: _ClassVar[Tensor.Codec]
    CODEC_UNSPECIFIED: Tensor.Codec
    CODEC_FP32: Tensor.Codec
    CODEC_FP16: Tensor.Codec
    CODEC_INT8: Tensor.Codec
    CODEC_UINT8: Tensor.Codec
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Tensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: Tensor.Codec
    scales: bytes
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Tensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[_Union[Tensor.Codec, str]] = ..., scales: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("session_id", "step", "layer", "direction", "src", "dst", "tensor", "error", "stalled_node", "control", "sub_channel", "missing_nodes", "sent_at_ns")
    class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DIRECTION_UNSPECIFIED: _ClassVar[Frame.Direction]
        FORWARD: _ClassVar[Frame.Direction]
        BACKWARD: _ClassVar[Frame.Direction]
        INPUT: _ClassVar[Frame.Direction]
        OUTPUT: _ClassVar[Frame.Direction]
        NORMS: _ClassVar[Frame.Direction]
        CONTROL: _ClassVar[Frame.Direction]
        PROBE: _ClassVar[Frame.Direction]
        PROBE_ACK: _ClassVar[Frame.Direction]
    DIRECTION_UNSPECIFIED: Frame.Direction
    FORWARD: Frame.Direction
    BACKWARD: Frame.Direction
    INPUT: Frame.Direction
    OUTPUT: Frame.Direction
    NORMS: Frame.Direction
    CONTROL: Frame.Direction
    PROBE: Frame.Direction
    PROBE_ACK: Frame.Direction
    class SubChannel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SUB_CHANNEL_DATA: _ClassVar[Frame.SubChannel]
        SUB_CHANNEL_SELECTION: _ClassVar[Frame.SubChannel]
        SUB_CHANNEL_NORMS: _ClassVar[Frame.SubChannel]
        SUB_CHANNEL_COMMIT: _ClassVar[Frame.SubChannel]
        SUB_CHANNEL_ABORT: _ClassVar[Frame.SubChannel]
        SUB_CHANNEL_MEMBERSHIP: _ClassVar[Frame.SubChannel]
    SUB_CHANNEL_DATA: Frame.SubChannel
    SUB_CHANNEL_SELECTION: Frame.SubChannel
    SUB_CHANNEL_NORMS: Frame.SubChannel
    SUB_CHANNEL_COMMIT: Frame.SubChannel
    SUB_CHANNEL_ABORT: Frame.SubChannel
    SUB_CHANNEL_MEMBERSHIP: Frame.SubChannel
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STALLED_NODE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    SUB_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MISSING_NODES_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_NS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    layer: int
    direction: Frame.Direction
    src: int
    dst: int
    tensor: Tensor
    error: str
    stalled_node: int
    control: Control
    sub_channel: Frame.SubChannel
    missing_nodes: _containers.RepeatedScalarFieldContainer[int]
    sent_at_ns: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., layer: _Optional[int] = ..., direction: _Optional[_Union[Frame.Direction, str]] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[str] = ..., stalled_node: _Optional[int] = ..., control: _Optional[_Union[Control, _Mapping]] = ..., sub_channel: _Optional[_Union[Frame.SubChannel, str]] = ..., missing_nodes: _Optional[_Iterable[int]] = ..., sent_at_ns: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("vote", "abort", "selection", "missing")
    VOTE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    vote: Vote
    abort: Abort
    selection: ChannelSelection
    missing: MissingSet
    def __init__(self, vote: _Optional[_Union[Vote, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., selection: _Optional[_Union[ChannelSelection, _Mapping]] = ..., missing: _Optional[_Union[MissingSet, _Mapping]] = ...) -> None: ...

class Vote(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("failed_node", "cause")
    FAILED_NODE_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    failed_node: int
    cause: str
    def __init__(self, failed_node: _Optional[int] = ..., cause: _Optional[str] = ...) -> None: ...

class ChannelSelection(_message.Message):
    __slots__ = ("channels",)
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, channels: _Optional[_Iterable[int]] = ...) -> None: ...

class MissingSet(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, nodes: _Optional[_Iterable[int]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("plan_hash", "node", "household_token", "expected_node", "protocol_version", "round", "data_socket")
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    HOUSEHOLD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NODE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DATA_SOCKET_FIELD_NUMBER: _ClassVar[int]
    plan_hash: str
    node: int
    household_token: str
    expected_node: int
    protocol_version: int
    round: int
    data_socket: bool
    def __init__(self, plan_hash: _Optional[str] = ..., node: _Optional[int] = ..., household_token: _Optional[str] = ..., expected_node: _Optional[int] = ..., protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., data_socket: _Optional[bool] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("plan_hash", "node", "protocol_version", "round", "data_ticket", "data_port")
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DATA_TICKET_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    plan_hash: str
    node: int
    protocol_version: int
    round: int
    data_ticket: bytes
    data_port: int
    def __init__(self, plan_hash: _Optional[str] = ..., node: _Optional[int] = ..., protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., data_ticket: _Optional[bytes] = ..., data_port: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "plan_hash", "node", "num_nodes")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[HealthReply.Status]
        SERVING: _ClassVar[HealthReply.Status]
        NOT_SERVING: _ClassVar[HealthReply.Status]
    STATUS_UNSPECIFIED: HealthReply.Status
    SERVING: HealthReply.Status
    NOT_SERVING: HealthReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    status: HealthReply.Status
    plan_hash: str
    node: int
    num_nodes: int
    def __init__(self, status: _Optional[_Union[HealthReply.Status, str]] = ..., plan_hash: _Optional[str] = ..., node: _Optional[int] = ..., num_nodes: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("input", "request_id", "deadline_s", "plan_hash")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    request_id: str
    deadline_s: float
    plan_hash: str
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., deadline_s: _Optional[float] = ..., plan_hash: _Optional[str] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("output", "session_id", "server_ms", "degraded", "missing_nodes", "plan_hash")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MISSING_NODES_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    session_id: str
    server_ms: float
    degraded: bool
    missing_nodes: _containers.RepeatedScalarFieldContainer[int]
    plan_hash: str
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., session_id: _Optional[str] = ..., server_ms: _Optional[float] = ..., degraded: _Optional[bool] = ..., missing_nodes: _Optional[_Iterable[int]] = ..., plan_hash: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

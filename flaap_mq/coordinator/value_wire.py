"""TFF values serialized straight from their numpy buffers, byte for byte as TFF would.

TFF 0.87's `serialize_value` copies a tensor three times on its way into an
`executor_pb2.Value` (`tobytes`, into an `Array`, and protobuf's copy of that
`Array` into the `Value`), and `SerializeToString` copies it a fourth time:
0.6 s per 64 MiB here (docs/benchmarks.md, "Profile of the data path"). A
dense tensor's serialized `Value` is a few header bytes (its dtype and
shape) before the array's raw bytes in C order, so `serialize_value` writes
it as those header bytes and a view of the array's own memory
(`chunking.Gathered`): nothing is copied until each message is cut from it
(`envelope.encode_task`).

Only what can be written exactly as TFF writes it takes this path: a
C-contiguous `numpy.ndarray` of at least `MIN_DIRECT_BYTES`, of a plain
numeric or boolean dtype in native byte order, whose dtype is the tensor
type's and whose shape fits it, that TFF would serialize as `Array.content`
(not a scalar); and the structs and federated values around such arrays,
written field by field as TFF builds them. Anything else (a value of
another kind, a type it does not fit, which TFF refuses with its own
error) is TFF's `serialize_value`, its `Value` embedded as TFF serialized
it. tests/unit/test_value_wire.py checks the bytes against TFF's for many
dtypes, shapes and structures.
"""

from __future__ import annotations

import functools

import numpy as np
from tensorflow_federated.proto.v0 import array_pb2, executor_pb2

from flaap_mq.protocol import chunking, wire
from flaap_mq.tff_internals import computation_types, structure, value_serialization

# Smaller arrays go through TFF: the copies cost nothing worth the detour.
MIN_DIRECT_BYTES = 64 * 1024

# The dtypes whose `tobytes()` is their memory as it is (no object, string
# or non-native types).
DIRECT_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
    )
)

_VALUE = executor_pb2.Value.DESCRIPTOR.fields_by_name
_VALUE_ARRAY = _VALUE["array"].number
_VALUE_STRUCT = _VALUE["struct"].number
_VALUE_FEDERATED = _VALUE["federated"].number
_ARRAY_CONTENT = array_pb2.Array.DESCRIPTOR.fields_by_name["content"].number
_FEDERATED = executor_pb2.Value.Federated.DESCRIPTOR.fields_by_name
_FEDERATED_TYPE = _FEDERATED["type"].number
_FEDERATED_VALUE = _FEDERATED["value"].number
_STRUCT_ELEMENT = executor_pb2.Value.Struct.DESCRIPTOR.fields_by_name["element"].number
_ELEMENT = executor_pb2.Value.Struct.Element.DESCRIPTOR.fields_by_name
_ELEMENT_NAME = _ELEMENT["name"].number
_ELEMENT_VALUE = _ELEMENT["value"].number

Pieces = list[chunking.Buffer]


def serialize_value(
    value: object, type_spec: computation_types.Type | None
) -> tuple[executor_pb2.Value | chunking.Gathered, computation_types.Type]:
    """TFF's `value_serialization.serialize_value`, its arrays written from their memory.

    Returns the serialized `Value` as pieces (the same bytes TFF's `Value`
    serializes to) when any array in it is written directly, else TFF's own
    `Value`. The type returned is TFF's.
    """
    if not _has_direct_array(value, type_spec):
        return value_serialization.serialize_value(value, type_spec)
    assert type_spec is not None  # `_has_direct_array` says so
    pieces, value_type = _serialize(value, type_spec)
    return chunking.Gathered(pieces), value_type


def _direct(value: object, type_spec: computation_types.Type) -> bool:
    """Whether TFF would write `value` as `Array.content` equal to its memory as it is."""
    if not isinstance(type_spec, computation_types.TensorType) or type(value) is not np.ndarray:
        return False
    shape = type_spec.shape
    return (
        value.nbytes >= MIN_DIRECT_BYTES
        and value.dtype in DIRECT_DTYPES
        and value.dtype == type_spec.dtype
        and value.dtype.type is type_spec.dtype.type
        and value.flags.c_contiguous
        and shape is not None
        and len(shape) > 0  # TFF writes a scalar as a repeated field
        and len(shape) == value.ndim
        and all(d is None or d == n for d, n in zip(shape, value.shape, strict=True))
    )


def _has_direct_array(value: object, type_spec: computation_types.Type | None) -> bool:
    """Whether `value` holds an array `_direct` writes, where `_serialize` reaches it."""
    if type_spec is None:
        return False
    if isinstance(type_spec, computation_types.TensorType):
        return _direct(value, type_spec)
    if isinstance(type_spec, computation_types.FederatedType):
        members = [value] if type_spec.all_equal else value
        return isinstance(members, list) and any(
            _has_direct_array(v, type_spec.member) for v in members
        )
    if isinstance(type_spec, computation_types.StructType):
        try:
            elements = structure.from_container(value)
        except Exception:  # TFF refuses it, with its own error
            return False
        if len(elements) != len(type_spec):
            return False
        return any(
            _has_direct_array(v, t)
            for (_, t), (_, v) in zip(
                structure.iter_elements(type_spec), structure.iter_elements(elements), strict=True
            )
        )
    return False


def _field(number: int, pieces: Pieces) -> Pieces:
    """A length-delimited field around `pieces`."""
    return [wire.field_head(number, sum(len(memoryview(p)) for p in pieces)), *pieces]


def _serialize(
    value: object, type_spec: computation_types.Type
) -> tuple[Pieces, computation_types.Type]:
    """`value`'s serialized `Value` as pieces, as TFF's `serialize_value` writes it."""
    if not _has_direct_array(value, type_spec):
        proto, value_type = value_serialization.serialize_value(value, type_spec)
        return [proto.SerializeToString()], value_type
    if isinstance(type_spec, computation_types.TensorType):
        assert isinstance(value, np.ndarray)
        return _field(_VALUE_ARRAY, _array(value)), type_spec
    if isinstance(type_spec, computation_types.FederatedType):
        return _field(_VALUE_FEDERATED, _federated(value, type_spec)), type_spec
    assert isinstance(type_spec, computation_types.StructType)
    return _field(_VALUE_STRUCT, _struct(value, type_spec)), type_spec


def _array(value: np.ndarray) -> Pieces:
    """An `Array` as `array.to_proto_content` makes it: dtype, shape, then the raw bytes."""
    header = array_pb2.Array(
        dtype=dtype_enum(value.dtype), shape=array_pb2.ArrayShape(dim=list(value.shape))
    ).SerializeToString()
    memory = memoryview(value.reshape(-1).view(np.uint8))
    return [header, wire.field_head(_ARRAY_CONTENT, memory.nbytes), memory]


@functools.cache
def dtype_enum(dtype: np.dtype) -> int:
    """TFF's `DataType` for `dtype`, as TFF itself writes it."""
    tiny = np.zeros([1], dtype)
    proto, _ = value_serialization.serialize_value(
        tiny, computation_types.TensorType(dtype.type, [1])
    )
    return proto.array.dtype


def _federated(value: object, type_spec: computation_types.FederatedType) -> Pieces:
    """A `Value.Federated` as TFF's `_serialize_federated_value` builds it."""
    members = [value] if type_spec.all_equal else value
    assert isinstance(members, list)  # `_has_direct_array` says so
    pieces = _field(_FEDERATED_TYPE, [_federated_type(type_spec)])
    for member in members:
        member_pieces, member_type = _serialize(member, type_spec.member)
        type_spec.member.check_assignable_from(member_type)
        pieces.extend(_field(_FEDERATED_VALUE, member_pieces))
    return pieces


@functools.lru_cache(maxsize=256)
def _federated_type(type_spec: computation_types.FederatedType) -> bytes:
    """The serialized `FederatedType` TFF puts in a federated value, made by TFF.

    TFF writes it for a federated value with no members as for any other;
    only a value that is not `all_equal` may have none, and the flag is its
    one field that differs.
    """
    members_apart = computation_types.FederatedType(
        type_spec.member, type_spec.placement, all_equal=False
    )
    proto, _ = value_serialization.serialize_value([], members_apart)
    federated_type = proto.federated.type
    federated_type.all_equal = type_spec.all_equal
    return federated_type.SerializeToString()


def _struct(value: object, type_spec: computation_types.StructType) -> Pieces:
    """A `Value.Struct` as TFF's `_serialize_struct_type` builds it."""
    elements = structure.from_container(value)
    pieces: Pieces = []
    for (name, element_type), (_, element) in zip(
        structure.iter_elements(type_spec), structure.iter_elements(elements), strict=True
    ):
        element_pieces, _ = _serialize(element, element_type)
        fields: Pieces = _field(_ELEMENT_NAME, [name.encode()]) if name else []
        fields.extend(_field(_ELEMENT_VALUE, element_pieces))
        pieces.extend(_field(_STRUCT_ELEMENT, fields))
    return pieces

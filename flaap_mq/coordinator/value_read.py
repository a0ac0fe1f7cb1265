"""A silo's answer read where it arrived, its arrays not copied, as TFF would read it.

TFF's `deserialize_value` takes an `executor_pb2.Value`: the answer joined
into `bytes` (a copy of it), parsed (protobuf copies each array's content
into a `bytes` of its own), then `np.frombuffer` over that content. For a
1 GiB model that was the coordinator's peak: the buffer the answer's slices
were written into, its `bytes` and the parsed content, at once
(docs/benchmarks.md). A dense array's `Array.content` is its memory as it
is, so `deserialize_compute_response` reads such an array with
`np.frombuffer` over the answer's own buffer.

What `value_wire` writes directly is what is read directly: an `Array`
whose fields are its dtype, shape and `content` of at least
`MIN_DIRECT_BYTES`, of a dtype `value_wire` writes, where TFF would read
`content` (a non-scalar tensor type); and the structs and federated values
around such arrays, read field by field as TFF reads them. Any other part
is TFF's `deserialize_value`, on that part parsed from its own bytes, so it
is read, or refused, as TFF would. The answer comes from a silo, which is
not trusted to write it as TFF does: a part is read directly only when it
is written the one way protobuf and TFF would read as this does (each
field once, of its own wire type, no other field, a few fields scanned at
most), and otherwise handed to TFF whole. tests/unit/test_value_read.py
checks the results against TFF's for the cases `value_wire`'s tests write,
and for answers written otherwise.
"""

from __future__ import annotations

import functools

import numpy as np
from google.protobuf import message as protobuf_message
from tensorflow_federated.proto.v0 import array_pb2, computation_pb2, executor_pb2

from flaap_mq.coordinator.value_wire import DIRECT_DTYPES, MIN_DIRECT_BYTES, dtype_enum
from flaap_mq.protocol import chunking, wire
from flaap_mq.tff_internals import (
    computation_types,
    placements,
    structure,
    value_serialization,
)

_VARINT, _LENGTH_DELIMITED = 0, 2
_RESPONSE_VALUE = executor_pb2.ComputeResponse.DESCRIPTOR.fields_by_name["value"].number
_VALUE = executor_pb2.Value.DESCRIPTOR.fields_by_name
_ARRAY = array_pb2.Array.DESCRIPTOR.fields_by_name
_FEDERATED = executor_pb2.Value.Federated.DESCRIPTOR.fields_by_name
_STRUCT_ELEMENT = executor_pb2.Value.Struct.DESCRIPTOR.fields_by_name["element"].number
_ELEMENT = executor_pb2.Value.Struct.Element.DESCRIPTOR.fields_by_name
_ELEMENT_FIELDS = {
    _ELEMENT["name"].number: _LENGTH_DELIMITED,
    _ELEMENT["value"].number: _LENGTH_DELIMITED,
}
# Members of a federated value read directly; more go to TFF whole.
MAX_MEMBERS = 10_000

Fields = list[tuple[int, int, memoryview]]  # (number, wire type, value) per field


def deserialize_compute_response(
    answer: chunking.Buffer, type_spec: computation_types.Type
) -> object:
    """The value of a serialized `ComputeResponse`, as TFF's `deserialize_value` gives it.

    Large dense arrays in it are read-only views of `answer`, which they
    keep alive.
    """
    view = memoryview(answer)
    fields = _fields(view, 1)
    if fields is not None and len(fields) == 1:
        number, wire_type, value = fields[0]
        if number == _RESPONSE_VALUE and wire_type == _LENGTH_DELIMITED:
            return _value(value, type_spec)
    response = executor_pb2.ComputeResponse.FromString(view)
    return value_serialization.deserialize_value(response.value, type_spec)[0]


def _value(view: memoryview, type_spec: computation_types.Type) -> object:
    """A serialized `Value`, read directly where it holds an array worth it."""
    found = _direct_value(view, type_spec) if len(view) >= MIN_DIRECT_BYTES else None
    if found is not None:
        return found[0]
    proto = executor_pb2.Value.FromString(view)
    return value_serialization.deserialize_value(proto, type_spec)[0]


def _direct_value(view: memoryview, type_spec: computation_types.Type) -> tuple[object] | None:
    """`(value,)` read directly, or None where TFF must read it."""
    fields = _fields(view, 1)
    if fields is None or len(fields) != 1 or fields[0][1] != _LENGTH_DELIMITED:
        return None
    number, _, body = fields[0]
    if number == _VALUE["array"].number:
        return _array(body, type_spec)
    if number == _VALUE["federated"].number:
        return _federated(body, type_spec)
    if number == _VALUE["struct"].number:
        return _struct(body, type_spec)
    return None


def _array(body: memoryview, type_spec: computation_types.Type) -> tuple[object] | None:
    """The array over its content, if TFF would read `content` and it is written as is."""
    if not isinstance(type_spec, computation_types.TensorType):
        return None
    if type_spec.shape is not None and len(type_spec.shape) == 0:
        return None  # TFF reads a scalar from its repeated fields
    fields = _once(
        body,
        {
            _ARRAY["dtype"].number: _VARINT,
            _ARRAY["shape"].number: _LENGTH_DELIMITED,
            _ARRAY["content"].number: _LENGTH_DELIMITED,
        },
    )
    if fields is None or len(fields) != 3:
        return None
    dtype = _dtype_by_enum().get(wire.read_varint(fields[_ARRAY["dtype"].number], 0)[0])
    content = fields[_ARRAY["content"].number]
    if dtype is None or len(content) < MIN_DIRECT_BYTES:
        return None
    try:
        shape = array_pb2.ArrayShape.FromString(fields[_ARRAY["shape"].number])
    except protobuf_message.DecodeError:
        return None  # TFF refuses it, with its own error
    dims = tuple(shape.dim)
    if shape.unknown_rank or not dims or min(dims) < 0:
        return None
    if int(np.prod(dims, dtype=object)) * dtype.itemsize != len(content):
        return None
    array = np.frombuffer(content, dtype).reshape(dims)
    array.flags.writeable = False  # as TFF's, over `bytes`
    return (array,)


def _federated(body: memoryview, type_spec: computation_types.Type) -> tuple[object] | None:
    """As TFF's `_deserialize_federated_value`, where its members are tensors."""
    if not isinstance(type_spec, computation_types.FederatedType):
        return None
    if not isinstance(type_spec.member, computation_types.TensorType):
        return None  # TFF checks its members' types against each other
    fields = _fields(body, MAX_MEMBERS + 1)
    if fields is None or any(wire_type != _LENGTH_DELIMITED for _, wire_type, _ in fields):
        return None
    types = [view for number, _, view in fields if number == _FEDERATED["type"].number]
    members = [view for number, _, view in fields if number == _FEDERATED["value"].number]
    if len(types) != 1 or len(types) + len(members) != len(fields) or not members:
        return None
    try:  # what TFF reads of the type: its placement
        federated_type = computation_pb2.FederatedType.FromString(types[0])
        placements.uri_to_placement_literal(federated_type.placement.value.uri)
    except Exception:  # TFF refuses it, with its own error
        return None
    if type_spec.all_equal:
        if len(members) != 1:
            return None  # TFF reads the first, having parsed them all
        return (_value(members[0], type_spec.member),)
    return ([_value(member, type_spec.member) for member in members],)


def _struct(body: memoryview, type_spec: computation_types.Type) -> tuple[object] | None:
    """As TFF's `_deserialize_struct_value`: a `Struct`, its elements named as sent."""
    if not isinstance(type_spec, computation_types.StructType):
        return None
    fields = _fields(body, len(type_spec))
    if fields is None or len(fields) != len(type_spec):
        return None  # TFF pairs them as it pairs them
    if any(n != _STRUCT_ELEMENT or w != _LENGTH_DELIMITED for n, w, _ in fields):
        return None
    parts = []
    for _, _, element in fields:
        named = _once(
            element,
            {
                _ELEMENT["name"].number: _LENGTH_DELIMITED,
                _ELEMENT["value"].number: _LENGTH_DELIMITED,
            },
        )
        if named is None or _ELEMENT["value"].number not in named:
            return None
        try:
            name = bytes(named.get(_ELEMENT["name"].number, b"")).decode() or None
        except UnicodeDecodeError:
            return None  # TFF refuses it, with its own error
        parts.append((name, named[_ELEMENT["value"].number]))
    elements = [
        (name, _value(value, element_type))
        for (name, value), element_type in zip(parts, type_spec, strict=True)
    ]
    return (structure.Struct(elements),)


def _once(view: memoryview, expected: dict[int, int]) -> dict[int, memoryview] | None:
    """Each field by number, if every one is expected, of its wire type, and there once."""
    fields = _fields(view, len(expected))
    if fields is None:
        return None
    found = {number: value for number, _, value in fields}
    if len(found) != len(fields):
        return None  # a field twice: protobuf would merge or keep the last
    if any(expected.get(number) != wire_type for number, wire_type, _ in fields):
        return None
    return found


def _fields(view: memoryview, most: int) -> Fields | None:
    """The top-level fields of `view`; None past `most` of them, or if it does not parse."""
    found: Fields = []
    try:
        for number, start, value_start, end in wire.fields(view, max_fields=most):
            found.append((number, view[start] & 7, view[value_start:end]))
    except wire.WireError:
        return None
    return found


@functools.cache
def _dtype_by_enum() -> dict[int, np.dtype]:
    return {dtype_enum(dtype): dtype for dtype in DIRECT_DTYPES}

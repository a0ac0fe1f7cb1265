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
is read, or refused, as TFF would. tests/unit/test_value_read.py checks
the results against TFF's for the cases `value_wire`'s tests write.
"""

from __future__ import annotations

import functools

import numpy as np
from tensorflow_federated.proto.v0 import array_pb2, executor_pb2

from flaap_mq.coordinator.value_wire import DIRECT_DTYPES, MIN_DIRECT_BYTES, dtype_enum
from flaap_mq.protocol import chunking, wire
from flaap_mq.tff_internals import computation_types, structure, value_serialization

_LENGTH_DELIMITED = 2
_RESPONSE_VALUE = executor_pb2.ComputeResponse.DESCRIPTOR.fields_by_name["value"].number
_VALUE = executor_pb2.Value.DESCRIPTOR.fields_by_name
_ARRAY = array_pb2.Array.DESCRIPTOR.fields_by_name
_FEDERATED = executor_pb2.Value.Federated.DESCRIPTOR.fields_by_name
_STRUCT_ELEMENT = executor_pb2.Value.Struct.DESCRIPTOR.fields_by_name["element"].number
_ELEMENT = executor_pb2.Value.Struct.Element.DESCRIPTOR.fields_by_name


def deserialize_compute_response(
    answer: chunking.Buffer, type_spec: computation_types.Type
) -> object:
    """The value of a serialized `ComputeResponse`, as TFF's `deserialize_value` gives it.

    Large dense arrays in it are views of `answer` (read-only if it is),
    which they keep alive.
    """
    view = memoryview(answer)
    fields = _fields(view)
    if fields is None or [number for number, _ in fields] != [_RESPONSE_VALUE]:
        response = executor_pb2.ComputeResponse.FromString(view)
        return value_serialization.deserialize_value(response.value, type_spec)[0]
    return _value(fields[0][1], type_spec)


def _value(view: memoryview, type_spec: computation_types.Type) -> object:
    """A serialized `Value`, read directly where it holds an array worth it."""
    fields = _fields(view) if len(view) >= MIN_DIRECT_BYTES else None
    if fields is not None and len(fields) == 1:
        (number, body), found = fields[0], None
        if number == _VALUE["array"].number:
            found = _array(body, type_spec)
        elif number == _VALUE["federated"].number:
            found = _federated(body, type_spec)
        elif number == _VALUE["struct"].number:
            found = _struct(body, type_spec)
        if found is not None:
            return found[0]
    proto = executor_pb2.Value.FromString(view)
    return value_serialization.deserialize_value(proto, type_spec)[0]


def _array(body: memoryview, type_spec: computation_types.Type) -> tuple[np.ndarray] | None:
    """The array over its content, if TFF would read `content` and it is written as is."""
    if not isinstance(type_spec, computation_types.TensorType):
        return None
    if type_spec.shape is not None and len(type_spec.shape) == 0:
        return None  # TFF reads a scalar from its repeated fields
    fields = dict(_fields(body) or ())
    if set(fields) != {_ARRAY["dtype"].number, _ARRAY["shape"].number, _ARRAY["content"].number}:
        return None
    dtype = _dtype_by_enum().get(_varint(fields[_ARRAY["dtype"].number]))
    shape = array_pb2.ArrayShape.FromString(fields[_ARRAY["shape"].number])
    content = fields[_ARRAY["content"].number]
    if dtype is None or shape.unknown_rank or not shape.dim or len(content) < MIN_DIRECT_BYTES:
        return None
    if int(np.prod(shape.dim)) * dtype.itemsize != len(content):
        return None  # TFF refuses it, with its own error
    return (np.frombuffer(content, dtype).reshape(tuple(shape.dim)),)


def _federated(body: memoryview, type_spec: computation_types.Type) -> tuple[object] | None:
    """As TFF's `_deserialize_federated_value`: one member if all equal, else a list."""
    if not isinstance(type_spec, computation_types.FederatedType):
        return None
    fields = _fields(body)
    if fields is None:
        return None
    members = [view for number, view in fields if number == _FEDERATED["value"].number]
    if not members:
        return None  # TFF refuses it
    if type_spec.all_equal:
        return (_value(members[0], type_spec.member),)
    return ([_value(member, type_spec.member) for member in members],)


def _struct(body: memoryview, type_spec: computation_types.Type) -> tuple[object] | None:
    """As TFF's `_deserialize_struct_value`: a `Struct`, its elements named as sent."""
    if not isinstance(type_spec, computation_types.StructType):
        return None
    fields = _fields(body)
    if fields is None or any(number != _STRUCT_ELEMENT for number, _ in fields):
        return None
    if len(fields) != len(type_spec):
        return None  # TFF pairs them as it pairs them
    elements = []
    for (_, element), element_type in zip(fields, type_spec, strict=True):
        parts = _fields(element)
        if parts is None:
            return None
        named = dict(parts)
        if len(named) != len(parts) or _ELEMENT["value"].number not in named:
            return None
        name = bytes(named.get(_ELEMENT["name"].number, b"")).decode() or None
        elements.append((name, _value(named[_ELEMENT["value"].number], element_type)))
    return (structure.Struct(elements),)


def _fields(view: memoryview) -> list[tuple[int, memoryview]] | None:
    """Each top-level field's number and value; None unless all are length-delimited
    (a varint field is read with `_varint` from its own view)."""
    found = []
    try:
        # As many fields as the bytes allow: a struct may have hundreds of tensors.
        for number, start, value_start, end in wire.fields(view, max_fields=len(view)):
            if view[start] & 7 == _LENGTH_DELIMITED:
                found.append((number, view[value_start:end]))
            elif view[start] & 7 == 0:
                found.append((number, view[value_start:end]))  # a varint, as its bytes
            else:
                return None
    except wire.WireError:
        return None
    return found


def _varint(view: memoryview) -> int:
    value = 0
    for shift, byte in enumerate(view):
        value |= (byte & 0x7F) << (7 * shift)
    return value


@functools.cache
def _dtype_by_enum() -> dict[int, np.dtype]:
    return {dtype_enum(dtype): dtype for dtype in DIRECT_DTYPES}

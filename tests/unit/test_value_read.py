"""A silo's answer read where it arrived (`coordinator.value_read`) is what TFF reads,
and its large arrays are views of the answer's buffer, not copies."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from hypothesis import given, settings
from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2

from flaap_mq.coordinator import value_read, value_wire
from flaap_mq.protocol import wire
from flaap_mq.tff_internals import structure, value_serialization
from tests.unit.arrays import BIG, DTYPES, any_array, random_array


def _answer(value, type_spec) -> memoryview:
    """A ComputeResponse as a worker forwards it, in a read-only buffer of its own."""
    proto, _ = value_serialization.serialize_value(value, type_spec)
    response = executor_pb2.ComputeResponse(value=proto).SerializeToString()
    return memoryview(bytearray(response)).toreadonly()


def _tffs(answer: memoryview, type_spec):
    response = executor_pb2.ComputeResponse.FromString(answer.tobytes())
    return value_serialization.deserialize_value(response.value, type_spec)[0]


def _assert_equal(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    if isinstance(theirs, np.ndarray):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert ours.tobytes() == theirs.tobytes()  # bit for bit, NaNs too
    elif isinstance(theirs, structure.Struct):
        assert structure.name_list_with_nones(ours) == structure.name_list_with_nones(theirs)
        for a, b in zip(structure.flatten(ours), structure.flatten(theirs), strict=True):
            _assert_equal(a, b)
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _assert_equal(a, b)
    else:
        assert ours == theirs


def _arrays(value) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, structure.Struct):
        return [a for v in structure.flatten(value) for a in _arrays(v)]
    if isinstance(value, list):
        return [a for v in value for a in _arrays(v)]
    return []


def _check(value, type_spec, *, views: int) -> None:
    """Ours equals TFF's, and `views` of its arrays are views of the answer."""
    answer = _answer(value, type_spec)
    ours = value_read.deserialize_compute_response(answer, type_spec)
    _assert_equal(ours, _tffs(answer, type_spec))
    buffer = np.frombuffer(answer, np.uint8)
    shared = [a for a in _arrays(ours) if np.shares_memory(a, buffer)]
    assert len(shared) == views
    assert all(not a.flags.writeable for a in shared)  # as TFF's, read-only


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(BIG,), (BIG // 8, 8), (3, 5, BIG // 15 + 1)])
def test_a_large_tensor_is_read_as_tff_reads_it_without_a_copy(dtype, shape):
    value = random_array(dtype, shape)
    _check(value, tff.TensorType(dtype, shape), views=1)
    _check(value, tff.TensorType(dtype, [None] * len(shape)), views=1)


@settings(max_examples=60, deadline=None)
@given(value=any_array())
def test_any_shape_and_dtype_is_read_as_tff_reads_it(value):
    _check(value, tff.TensorType(value.dtype.type, value.shape), views=int(value.nbytes >= BIG))


def test_structs_and_federated_values_are_read_as_tff_reads_them():
    big = random_array(np.float32, (BIG // 4 + 3,))
    other = random_array(np.int64, (4, BIG // 32 + 1), seed=1)
    big_type = tff.TensorType(np.float32, big.shape)
    member = tff.StructType([("w", big_type), ("n", np.int32)])
    named = collections.OrderedDict(w=big, n=np.int32(7))
    cases = [
        # a round's model, one per client, CLIENTS-placed
        ([big, big], tff.FederatedType(big_type, tff.CLIENTS), 2),
        (big, tff.FederatedType(big_type, tff.SERVER), 1),
        (big, tff.FederatedType(big_type, tff.CLIENTS, True), 1),
        (named, member, 1),
        # members that are structs: TFF checks their types against each other, so TFF reads them
        ([named], tff.FederatedType(member, tff.CLIENTS), 0),
        (
            [big, [other, np.float64(2.5)]],
            tff.StructType(
                [
                    big_type,
                    tff.StructType([("x", tff.TensorType(np.int64, other.shape)), np.float64]),
                ]
            ),
            2,
        ),
        ([[big], []], tff.StructType([tff.StructType([big_type]), tff.StructType([])]), 1),
        ([big] * 70, tff.StructType([big_type] * 70), 70),  # more fields than a task has
    ]
    for value, type_spec, views in cases:
        _check(value, type_spec, views=views)


@pytest.mark.parametrize(
    ("value", "type_spec"),
    [
        (np.float32(1.5), tff.TensorType(np.float32)),
        (np.arange(10, dtype=np.float32), tff.TensorType(np.float32, [10])),
        (np.array(["a", "b"]), tff.TensorType(np.str_, [2])),
        ([np.float32(1)], tff.FederatedType(np.float32, tff.CLIENTS)),
        ([1.0, 2.0], tff.StructType([np.float64, np.float64])),
    ],
    ids=["scalar", "small", "str", "federated-scalar", "struct-of-scalars"],
)
def test_what_holds_no_large_array_is_tffs(value, type_spec):
    _check(value, type_spec, views=0)


def test_what_tff_refuses_it_refuses_with_tffs_error():
    big = random_array(np.float32, (BIG,))
    answer = _answer(big, tff.TensorType(np.float32, [BIG]))
    # A federated answer read as a tensor, a tensor as a federated value.
    for wrong in (
        tff.StructType([tff.TensorType(np.float32, [BIG])]),
        tff.FederatedType(tff.TensorType(np.float32, [BIG]), tff.CLIENTS),
    ):
        with pytest.raises(Exception) as theirs:
            _tffs(answer, wrong)
        with pytest.raises(type(theirs.value)):
            value_read.deserialize_compute_response(answer, wrong)
    truncated = memoryview(answer.tobytes()[:-4])  # content shorter than its field says
    with pytest.raises(Exception) as theirs:
        _tffs(truncated, tff.TensorType(np.float32, [BIG]))
    with pytest.raises(type(theirs.value)):
        value_read.deserialize_compute_response(truncated, tff.TensorType(np.float32, [BIG]))


# --- answers a silo wrote otherwise than TFF does --------------------------
# A silo is not trusted to write its answer as TFF would; whatever it sends,
# the coordinator must read what TFF reads, or fail as TFF fails.


def _ld(number: int, body: bytes) -> bytes:
    return wire.field_head(number, len(body)) + body


def _vi(number: int, value: int) -> bytes:
    return wire.varint(number << 3) + wire.varint(value & (2**64 - 1))


N = BIG // 4 * 2  # float32 elements: 2x BIG bytes
_CONTENT = np.arange(N, dtype=np.float32).tobytes()
_TENSOR = tff.TensorType(np.float32, [N])
_DTYPE = _vi(1, value_wire.dtype_enum(np.dtype(np.float32)))


def _dims(*dims: int) -> bytes:
    return _ld(2, b"".join(_vi(1, d) for d in dims))


def _arr(*fields: bytes) -> bytes:
    return _ld(6, b"".join(fields))  # Value.array


_GOOD = _arr(_DTYPE, _dims(N), _ld(18, _CONTENT))


def _element(name: bytes | None, value: bytes) -> bytes:
    return _ld(1, (_ld(1, name) if name is not None else b"") + _ld(2, value))


def _fed(*fields: bytes) -> bytes:
    return _ld(5, b"".join(fields))  # Value.federated


def _fed_type(uri: str, all_equal: bool = False) -> bytes:
    federated = computation_pb2.FederatedType(all_equal=all_equal)
    federated.placement.value.uri = uri
    return _ld(1, federated.SerializeToString())


_CLIENTS = tff.FederatedType(_TENSOR, tff.CLIENTS)
_ALL_EQUAL = tff.FederatedType(_TENSOR, tff.CLIENTS, all_equal=True)
_STRUCT = tff.StructType([("a", _TENSOR)])
OTHERWISE = {
    "shape-twice": (_arr(_DTYPE, _dims(1), _dims(N), _ld(18, _CONTENT)), _TENSOR),
    "dtype-length-delimited": (_arr(_ld(1, _DTYPE[1:]), _dims(N), _ld(18, _CONTENT)), _TENSOR),
    "shape-varint": (_arr(_DTYPE, _vi(2, 5), _ld(18, _CONTENT)), _TENSOR),
    "negative-dims": (_arr(_DTYPE, _dims(-1, -N), _ld(18, _CONTENT)), _TENSOR),
    "dims-overflowing": (_arr(_DTYPE, _dims(1 << 62, 4, N), _ld(18, _CONTENT)), _TENSOR),
    "fields-out-of-order": (_arr(_ld(18, _CONTENT), _dims(N), _DTYPE), _TENSOR),
    "content-short": (_arr(_DTYPE, _dims(N + 1), _ld(18, _CONTENT)), _TENSOR),
    "oneof-twice": (_ld(3, _element(b"a", _GOOD)) + _GOOD, _TENSOR),
    "name-not-utf8": (_ld(3, _element(b"\xff", _GOOD)), _STRUCT),
    "name-varint": (_ld(3, _ld(1, _vi(1, 7) + _ld(2, _GOOD))), _STRUCT),
    "federated-no-type": (_fed(_ld(2, _GOOD), _ld(2, _GOOD)), _CLIENTS),
    "federated-bad-placement": (_fed(_fed_type("bogus"), _ld(2, _GOOD)), _CLIENTS),
    "federated-type-twice": (
        _fed(_fed_type("bogus"), _ld(2, _GOOD), _fed_type("clients")),
        _CLIENTS,
    ),
    "federated-member-varint": (_fed(_fed_type("clients"), _ld(2, _GOOD), _vi(2, 0)), _CLIENTS),
    "all-equal-junk-second": (
        _fed(_fed_type("clients", True), _ld(2, _GOOD), _ld(2, b"\xff\xff")),
        _ALL_EQUAL,
    ),
    "federated-structs-named-apart": (
        _fed(
            _fed_type("clients"),
            _ld(2, _ld(3, _element(b"a", _GOOD))),
            _ld(2, _ld(3, _element(b"b", _GOOD))),
        ),
        tff.FederatedType(tff.StructType([_TENSOR]), tff.CLIENTS),
    ),
    "two-million-unknown-fields": (_GOOD + _vi(9, 1) * 2_000_000, _TENSOR),
    "well-formed": (_fed(_fed_type("clients"), _ld(2, _GOOD), _ld(2, _GOOD)), _CLIENTS),
}


@pytest.mark.parametrize("case", OTHERWISE, ids=list(OTHERWISE))
def test_an_answer_written_otherwise_is_read_or_refused_as_tff_does(case):
    value, type_spec = OTHERWISE[case]
    answer = memoryview(_ld(1, value)).toreadonly()  # ComputeResponse.value
    try:
        theirs = _tffs(answer, type_spec)
    except Exception as e:
        with pytest.raises(type(e)):
            value_read.deserialize_compute_response(answer, type_spec)
        return
    _assert_equal(value_read.deserialize_compute_response(answer, type_spec), theirs)

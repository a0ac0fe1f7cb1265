"""A silo's answer read where it arrived (`coordinator.value_read`) is what TFF reads,
and its large arrays are views of the answer's buffer, not copies."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from hypothesis import given, settings
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.coordinator import value_read
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
        ([named], tff.FederatedType(member, tff.CLIENTS), 1),
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

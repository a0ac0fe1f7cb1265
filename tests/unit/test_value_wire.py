"""Values written from their numpy buffers are, byte for byte, what TFF writes."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from hypothesis import given, settings
from tensorflow_federated.proto.v0 import executor_pb2

from flaap_mq.coordinator import value_wire
from flaap_mq.protocol import chunking, envelope
from flaap_mq.tff_internals import value_serialization
from tests.unit.arrays import BIG, DTYPES, any_array, random_array


def _tff_bytes(value, type_spec) -> bytes:
    proto, _ = value_serialization.serialize_value(value, type_spec)
    return proto.SerializeToString()


def _ours(value, type_spec):
    serialized, value_type = value_wire.serialize_value(value, type_spec)
    if isinstance(serialized, chunking.Gathered):
        return bytes(serialized), value_type, True
    return serialized.SerializeToString(), value_type, False


def _assert_same(value, type_spec, *, direct=True):
    ours, value_type, was_direct = _ours(value, type_spec)
    assert ours == _tff_bytes(value, type_spec)
    assert value_type == value_serialization.serialize_value(value, type_spec)[1]
    assert was_direct is direct


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(BIG,), (BIG // 8, 8), (3, 5, BIG // 15 + 1), (1, BIG)])
def test_a_tensor_is_written_as_tff_writes_it(dtype, shape):
    value = random_array(dtype, shape)
    _assert_same(value, tff.TensorType(dtype, shape))
    # A type with unknown dimensions takes the same value.
    _assert_same(value, tff.TensorType(dtype, [None] * len(shape)))


@settings(max_examples=60, deadline=None)
@given(value=any_array())
def test_any_shape_and_dtype_is_written_as_tff_writes_it(value):
    dtype, shape = value.dtype.type, value.shape
    ours, _, was_direct = _ours(value, tff.TensorType(dtype, shape))
    assert ours == _tff_bytes(value, tff.TensorType(dtype, shape))
    assert was_direct == (value.nbytes >= BIG)


def test_structs_and_federated_values_are_written_as_tff_writes_them():
    big = random_array(np.float32, (BIG // 4 + 3,))
    other = random_array(np.int64, (4, BIG // 32 + 1), seed=1)
    member = tff.StructType([("w", tff.TensorType(np.float32, big.shape)), ("n", np.int32)])
    named = collections.OrderedDict(w=big, n=np.int32(7))
    cases = [
        # the shape a round's model has: one per client, CLIENTS-placed
        ([big, big], tff.FederatedType(tff.TensorType(np.float32, big.shape), tff.CLIENTS)),
        (big, tff.FederatedType(tff.TensorType(np.float32, big.shape), tff.SERVER)),
        (big, tff.FederatedType(tff.TensorType(np.float32, big.shape), tff.CLIENTS, True)),
        (named, member),
        ([named], tff.FederatedType(member, tff.CLIENTS)),
        (
            [big, [other, np.float64(2.5)]],
            tff.StructType(
                [
                    tff.TensorType(np.float32, big.shape),
                    tff.StructType(
                        [("x", tff.TensorType(np.int64, other.shape)), ("y", np.float64)]
                    ),
                ]
            ),
        ),
        (
            [[big], []],
            tff.StructType(
                [tff.StructType([tff.TensorType(np.float32, big.shape)]), tff.StructType([])]
            ),
        ),
    ]
    for value, type_spec in cases:
        _assert_same(value, type_spec)


@pytest.mark.parametrize(
    ("value", "type_spec"),
    [
        # scalars, small arrays, strings: TFF's own path
        (np.float32(1.5), tff.TensorType(np.float32)),
        (np.arange(10, dtype=np.float32), tff.TensorType(np.float32, [10])),
        (np.array(["a", "b"]), tff.TensorType(np.str_, [2])),
        # a big array in the wrong byte order, not contiguous, of another
        # dtype than its type, or a list: TFF converts it, so TFF writes it
        (random_array(np.float32, (BIG,)).astype(">f4"), tff.TensorType(np.float32, [BIG])),
        (random_array(np.float32, (2, BIG))[:, ::2], tff.TensorType(np.float32, [2, BIG // 2])),
        (random_array(np.float32, (2, BIG)).T, tff.TensorType(np.float32, [BIG, 2])),
        (random_array(np.int32, (BIG,)), tff.TensorType(np.int64, [BIG])),
        (list(range(BIG)), tff.TensorType(np.int64, [BIG])),
        ([np.float32(1)], tff.FederatedType(np.float32, tff.CLIENTS)),
    ],
    ids=["scalar", "small", "str", "big-endian", "strided", "transposed", "cast", "list", "fed"],
)
def test_what_it_cannot_write_exactly_is_tffs(value, type_spec):
    _assert_same(value, type_spec, direct=False)


def test_what_tff_refuses_it_refuses_with_tffs_error():
    big = random_array(np.float32, (BIG,))
    for value, type_spec in [
        (big, tff.TensorType(np.float32, [BIG + 1])),
        (big, tff.TensorType(np.float32, [BIG, 1])),
        ([big, big], tff.StructType([tff.TensorType(np.float32, [BIG])])),
        (big, tff.FederatedType(tff.TensorType(np.float32, [BIG]), tff.CLIENTS)),
    ]:
        with pytest.raises(Exception) as theirs:
            value_serialization.serialize_value(value, type_spec)
        with pytest.raises(type(theirs.value)):
            value_wire.serialize_value(value, type_spec)


def test_the_array_is_not_copied_until_the_messages_are_made():
    big = random_array(np.float32, (BIG,))
    serialized, _ = value_wire.serialize_value(big, tff.TensorType(np.float32, [BIG]))
    assert isinstance(serialized, chunking.Gathered)
    assert any(np.shares_memory(np.asarray(piece), big) for piece in serialized.pieces)
    request = envelope.create_value_request(executor_pb2.ExecutorId(id="e"), serialized)
    assert (
        bytes(request.payload)
        == executor_pb2.CreateValueRequest(
            executor=executor_pb2.ExecutorId(id="e"),
            value=value_serialization.serialize_value(big, tff.TensorType(np.float32, [BIG]))[0],
        ).SerializeToString()
    )

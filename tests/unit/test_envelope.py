"""The Task / TaskResult envelope and the mapping of worker errors to exceptions."""

from __future__ import annotations

import itertools
import time

import pytest
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import executors_errors

from flaap_mq.coordinator import errors
from flaap_mq.protocol import chunking, envelope, wire
from flaap_mq.protocol.v1 import task_pb2
from flaap_mq.testing import messages


def _task(**overrides):
    task = messages.build_task(
        request=executor_pb2.ComputeRequest(executor=executor_pb2.ExecutorId(id="x")),
        job_id="job-1",
        silo_id="a",
        task_id="t1",
        deadline_unix_ms=envelope.deadline_after(60),
    )
    for key, value in overrides.items():
        setattr(task, key, value)
    return task


def test_every_tff_request_kind_round_trips():
    assert len(envelope.KINDS) == 8
    for spec in envelope.KINDS.values():
        task = messages.build_task(
            request=spec.request_type(), job_id="j", silo_id="s", task_id="t"
        )
        parsed = messages.parse_task(task.SerializeToString())
        assert parsed.kind == spec.kind
        assert isinstance(envelope.decode_request(parsed), spec.request_type)


def test_build_task_fills_the_envelope():
    task = _task()
    assert task.protocol_version == envelope.PROTOCOL_VERSION
    assert (task.task_id, task.job_id, task.silo_id) == ("t1", "job-1", "a")
    assert task.kind == envelope.RequestKind.COMPUTE
    assert executor_pb2.ComputeRequest.FromString(task.request).executor.id == "x"


def test_a_task_from_an_older_coordinator_with_an_attempt_reads_the_same():
    """Field 5 (`attempt`, always 1) is reserved now; a worker ignores it in an older task."""
    body = _task().SerializeToString()
    older = body + b"\x28\x01"  # attempt = 1, as coordinators sent it before
    task, payload = envelope.read_task(older)
    expected, expected_payload = envelope.read_task(body)
    assert task.ListFields() == expected.ListFields()
    assert bytes(payload) == bytes(expected_payload)


def test_build_task_refuses_what_is_not_an_executor_request():
    with pytest.raises(TypeError, match="ComputeResponse is not a TFF executor request"):
        messages.build_task(
            request=executor_pb2.ComputeResponse(), job_id="j", silo_id="s", task_id="t"
        )


def test_garbage_is_malformed_with_a_reason():
    with pytest.raises(envelope.MalformedEnvelope, match=r"not a flaap_mq\.v1\.Task"):
        messages.parse_task(b"\xff\xff\xff garbage")


@pytest.mark.parametrize("field", ["task_id", "job_id", "silo_id"])
def test_missing_fields_are_named(field):
    task = _task()
    task.ClearField(field)
    with pytest.raises(envelope.MalformedEnvelope, match=f"missing {field}"):
        messages.parse_task(task.SerializeToString())


def test_unknown_kind_is_malformed():
    with pytest.raises(envelope.MalformedEnvelope, match="unknown request kind 42"):
        messages.parse_task(_task(kind=42).SerializeToString())


def test_unknown_protocol_version_is_returned_for_an_error_reply():
    parsed = messages.parse_task(_task(protocol_version=99).SerializeToString())
    assert parsed.protocol_version == 99


def test_request_that_does_not_decode_is_malformed():
    task = _task(request=b"\xff\xff\xff\xff")
    with pytest.raises(envelope.MalformedEnvelope, match="not a valid ComputeRequest"):
        envelope.decode_request(task)


def test_deadlines():
    assert envelope.deadline_after(None) == 0
    assert not envelope.deadline_passed(_task(deadline_unix_ms=0))
    now = int(time.time() * 1000)
    assert envelope.deadline_passed(_task(deadline_unix_ms=now - 1))
    assert not envelope.deadline_passed(_task(deadline_unix_ms=now + 60_000))


def test_results_round_trip():
    ok = envelope.result_ok(_task(), b"resp", incarnation="i1", duration_us=5)
    parsed = messages.parse_result(ok.SerializeToString())
    assert parsed.response == b"resp" and parsed.worker_incarnation == "i1"
    error = envelope.result_error(
        task_id="t1",
        silo_id="a",
        kind=envelope.RequestKind.COMPUTE,
        failure=envelope.Failure.STATE_LOST,
        message="gone",
        incarnation="i2",
    )
    parsed = messages.parse_result(error.SerializeToString())
    assert parsed.error.retryable and parsed.error.code == envelope.ErrorCode.STATE_LOST


def test_result_with_neither_outcome_is_malformed():
    with pytest.raises(envelope.MalformedEnvelope, match="neither response nor error"):
        messages.parse_result(task_pb2.TaskResult(task_id="t").SerializeToString())


@pytest.mark.parametrize(
    ("failure", "exception", "retryable"),
    [
        (envelope.Failure.EXECUTOR_ERROR, errors.SiloExecutionError, False),
        (envelope.Failure.STATE_LOST, errors.SiloRetryableError, True),
        (envelope.Failure.EXECUTOR_UNAVAILABLE, errors.SiloRetryableError, True),
        (envelope.Failure.DEADLINE_EXCEEDED, errors.SiloTimeoutError, False),
        (envelope.Failure.MALFORMED_TASK, errors.SiloProtocolError, False),
        (envelope.Failure.UNSUPPORTED_PROTOCOL, errors.SiloProtocolError, False),
        (envelope.Failure.WRONG_SILO, errors.SiloProtocolError, False),
    ],
)
def test_error_mapping(failure, exception, retryable):
    error = task_pb2.Error(code=failure.code, message="boom", retryable=failure.retryable)
    raised = errors.error_from_result("silo-7", "CreateCall", error)
    assert type(raised) is exception
    assert isinstance(raised, executors_errors.RetryableError) is retryable
    assert str(raised).startswith("silo 'silo-7', CreateCall: boom")
    assert raised.silo_id == "silo-7" and raised.request == "CreateCall"


def _executor_request(spec: envelope.KindSpec) -> object:
    request = spec.request_type()
    request.executor.id = "clients=3/1"
    return request


def test_executor_id_is_read_from_every_request_kind_that_has_one():
    for spec in envelope.KINDS.values():
        if spec.kind == envelope.RequestKind.GET_EXECUTOR:
            continue
        request = _executor_request(spec)
        for ref in spec.value_refs(request):
            ref.id = "some-value"
        assert envelope.executor_id_of(spec, request.SerializeToString()) == "clients=3/1"


def test_executor_id_skips_a_large_value_without_decoding_it():
    spec = envelope.KINDS[envelope.RequestKind.CREATE_VALUE]
    request = _executor_request(spec)
    request.value.array.content = b"\x00" * (8 * 1024 * 1024)
    assert envelope.executor_id_of(spec, request.SerializeToString()) == "clients=3/1"


def test_executor_id_of_a_truncated_request_is_malformed():
    spec = envelope.KINDS[envelope.RequestKind.CREATE_VALUE]
    request = _executor_request(spec)
    request.value.array.content = b"\x01" * 1000
    with pytest.raises(envelope.MalformedEnvelope):
        envelope.executor_id_of(spec, request.SerializeToString()[:-10])


def test_value_refs_are_the_fields_naming_values():
    call = executor_pb2.CreateCallRequest(
        function_ref=executor_pb2.ValueRef(id="f"), argument_ref=executor_pb2.ValueRef(id="a")
    )
    spec = envelope.KINDS[envelope.RequestKind.CREATE_CALL]
    assert [r.id for r in spec.value_refs(call)] == ["f", "a"]
    no_arg = executor_pb2.CreateCallRequest(function_ref=executor_pb2.ValueRef(id="f"))
    assert [r.id for r in spec.value_refs(no_arg)] == ["f"]
    assert not envelope.KINDS[envelope.RequestKind.CREATE_VALUE].names_values
    creates = {s.name for s in envelope.KINDS.values() if s.creates_value}
    assert creates == {"CreateValue", "CreateCall", "CreateStruct", "CreateSelection"}
    assert {s.name for s in envelope.KINDS.values() if s.answers_with_data} == {
        "GetExecutor",
        "Compute",
    }


def test_create_value_request_is_the_same_message_without_the_copy():
    value = executor_pb2.Value()
    value.array.content = b"\x01\x02" * 1000
    executor = executor_pb2.ExecutorId(id="clients=1")
    serialized = envelope.create_value_request(executor, value)
    assert serialized.spec.kind == envelope.RequestKind.CREATE_VALUE
    assert executor_pb2.CreateValueRequest.FromString(
        bytes(serialized.payload)
    ) == executor_pb2.CreateValueRequest(executor=executor, value=value)
    assert envelope.serialized(serialized) is serialized
    plain = envelope.serialized(executor_pb2.CreateValueRequest(executor=executor, value=value))
    assert plain.spec is serialized.spec
    # Byte for byte what protobuf writes, from a Value or from its pieces.
    assert bytes(serialized.payload) == plain.payload
    pieces = chunking.Gathered([b"", value.SerializeToString()[:7], value.SerializeToString()[7:]])
    assert bytes(envelope.create_value_request(executor, pieces).payload) == plain.payload


def test_a_gathered_payload_is_sent_as_the_same_messages_as_its_bytes():
    task = envelope.task_envelope(
        kind=envelope.RequestKind.CREATE_VALUE, job_id="j", silo_id="s", task_id="t"
    )
    payload = bytes(range(256)) * 40
    cuts = [0, 1, 1, 700, 701, 5000, 10239, 10240]
    gathered = chunking.Gathered(payload[a:b] for a, b in itertools.pairwise(cuts))
    for chunk_bytes in (1, 7, 700, 1000, 10240, 20000):
        assert list(envelope.encode_task(task, gathered, chunk_bytes)) == list(
            envelope.encode_task(task, payload, chunk_bytes)
        )


# ------------------------------------------ the light messages (no TensorFlow)

_TFF_VALUE = "tensorflow_federated.v0.Value"


def _assert_same_fields(tff_type, light_type):
    """Same field names, numbers, labels and types, nested messages compared too.

    TFF's `Value` is `bytes` in the light messages: its serialized form.
    """
    tff_fields = {f.number: f for f in tff_type.fields}
    light_fields = {f.number: f for f in light_type.fields}
    assert set(light_fields) == set(tff_fields), tff_type.full_name
    for number, theirs in tff_fields.items():
        ours = light_fields[number]
        where = f"{tff_type.full_name}.{theirs.name}"
        assert (ours.name, ours.label) == (theirs.name, theirs.label), where
        if theirs.message_type is not None and theirs.message_type.full_name == _TFF_VALUE:
            assert ours.type == ours.TYPE_BYTES, where
        elif theirs.message_type is not None:
            assert ours.message_type is not None, where
            _assert_same_fields(theirs.message_type, ours.message_type)
        else:
            assert ours.type == theirs.type, where


@pytest.mark.parametrize("spec", envelope.KINDS.values(), ids=lambda s: s.name)
def test_the_light_messages_are_tffs_field_by_field(spec):
    _assert_same_fields(spec.request_type.DESCRIPTOR, spec.light_request_type.DESCRIPTOR)
    _assert_same_fields(spec.response_type.DESCRIPTOR, spec.light_response_type.DESCRIPTOR)


def _requests_of_every_kind():
    executor = executor_pb2.ExecutorId(id="clients=2/1")
    value = executor_pb2.Value()
    value.array.content = b"\x01\x02" * 100
    return [
        executor_pb2.GetExecutorRequest(cardinalities=[executor_pb2.Cardinality(cardinality=2)]),
        executor_pb2.CreateValueRequest(executor=executor, value=value),
        executor_pb2.CreateCallRequest(
            executor=executor,
            function_ref=executor_pb2.ValueRef(id="f"),
            argument_ref=executor_pb2.ValueRef(id="a"),
        ),
        executor_pb2.CreateStructRequest(
            executor=executor,
            element=[
                executor_pb2.CreateStructRequest.Element(
                    name="x", value_ref=executor_pb2.ValueRef(id="v")
                )
            ],
        ),
        executor_pb2.CreateSelectionRequest(
            executor=executor, source_ref=executor_pb2.ValueRef(id="s"), index=3
        ),
        executor_pb2.ComputeRequest(executor=executor, value_ref=executor_pb2.ValueRef(id="c")),
        executor_pb2.DisposeRequest(
            executor=executor, value_ref=[executor_pb2.ValueRef(id=i) for i in "abc"]
        ),
        executor_pb2.DisposeExecutorRequest(executor=executor),
    ]


@pytest.mark.parametrize("request_", _requests_of_every_kind(), ids=lambda r: type(r).__name__)
def test_a_light_request_rewritten_is_tffs_request_rewritten(request_):
    """The worker's rewrite of value names, on the light message, as on TFF's."""
    spec = envelope.spec_for_request(request_)
    task = messages.build_task(request=request_, job_id="j", silo_id="s", task_id="t")
    light = envelope.decode_request(task, light=True)
    assert isinstance(light, spec.light_request_type)
    assert envelope.spec_for_request(light) is spec
    for ref in spec.value_refs(light):
        ref.id = "service-" + ref.id
    for ref in spec.value_refs(request_):
        ref.id = "service-" + ref.id
    assert spec.request_type.FromString(light.SerializeToString()) == request_


def test_fields_the_light_messages_do_not_declare_travel_untouched():
    """A field TFF adds later is kept as an unknown field, through a rewrite."""
    later = executor_pb2.ValueRef(id="later").SerializeToString()
    request = (
        executor_pb2.ComputeRequest(
            executor=executor_pb2.ExecutorId(id="e"), value_ref=executor_pb2.ValueRef(id="v")
        ).SerializeToString()
        + wire.field_head(15, len(later))
        + later
    )
    light = envelope.KINDS[envelope.RequestKind.COMPUTE].light_request_type.FromString(request)
    light.value_ref.id = "w"
    assert wire.split_off(light.SerializeToString(), 15)[1] == later


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",
        b"\x0a\x05ab",  # a ValueRef longer than the message
        b"\x0a\x02\x0a\x80",  # ValueRef.id: a length that does not end
        b"\x12\x03\x0a\x01\xff",  # ExecutorId.id: not UTF-8
        b"\x0a\x03\x0a\x01\xc3",  # ValueRef.id: not UTF-8
    ],
)
def test_a_request_tff_refuses_the_light_message_refuses(garbage):
    task = _task(request=garbage)
    with pytest.raises(envelope.MalformedEnvelope, match="not a valid ComputeRequest"):
        envelope.decode_request(task)
    with pytest.raises(envelope.MalformedEnvelope, match="not a valid ComputeRequest"):
        envelope.decode_request(task, light=True)


def test_slices_are_made_when_asked_for_and_hold_only_the_payload():
    """A sender publishing a few at a time never holds a large payload twice."""
    result = envelope.result_ok(_task(), None, incarnation="i", duration_us=1)
    payload = bytearray(b"x" * 10_000)
    messages = envelope.encode_result(result, payload, 1000)
    assert len(messages) == 10
    assert envelope.messages_size(messages) == 10_000  # measured without slicing
    payload[0:1] = b"y"  # views of the payload, not copies of it
    first, _ = envelope.read_result(messages[0])
    assert bytes(envelope.read_result(messages[0])[1])[:1] == b"y"
    assert first.chunk.count == 10
    assert [envelope.read_result(m)[0].chunk.index for m in messages] == list(range(10))
    assert envelope.messages_size(envelope.encode_result(result, b"small", 1000)) > 5

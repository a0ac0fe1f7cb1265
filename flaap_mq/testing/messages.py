"""Whole Task and TaskResult messages in one call: for tests that write or read them by hand.

The product builds and reads messages slice by slice without copying
(`flaap_mq.protocol.envelope`); a test wants a small whole message, and to
read one back with its payload in place.
"""

from __future__ import annotations

from google.protobuf import message as protobuf_message

from flaap_mq.protocol.envelope import read_result, read_task, spec_for_request, task_envelope
from flaap_mq.protocol.v1 import task_pb2

__all__ = ["build_task", "parse_result", "parse_task"]


def build_task(*, request: protobuf_message.Message, **fields: object) -> task_pb2.Task:
    """A whole Task for `request`, with `task_envelope`'s arguments."""
    task = task_envelope(kind=spec_for_request(request).kind, **fields)  # type: ignore[arg-type]
    task.request = request.SerializeToString()
    return task


def parse_task(body: bytes) -> task_pb2.Task:
    """`read_task`, with the request put back in the Task (a copy: for small tasks)."""
    task, request = read_task(body)
    task.request = bytes(request)
    return task


def parse_result(body: bytes) -> task_pb2.TaskResult:
    """`read_result`, with the response put back in the TaskResult (a copy)."""
    result, response = read_result(body)
    if result.WhichOneof("outcome") is None:
        result.response = bytes(response)
    return result

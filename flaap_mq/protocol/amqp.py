"""The AMQP contract: the properties a Task message and a TaskResult message carry.

Both sides build their messages' properties here, and read them by these
names. The body is the protobuf (`task.proto`); a large one travels in
several messages (slices), each labelled by `chunking.headers`.

A Task (coordinator -> `flaap.tasks`, routing key = silo id):
- `message_id`: the task id; the value a Create* task makes is named by it;
- `correlation_id`: the task id;
- `reply_to`: the job id, the routing key of the coordinator's reply queue;
  absent for one-way tasks (disposals);
- `type`: the request kind (`CreateValue`, ...); `app_id`, `timestamp`;
- `expiration`: the task's timeout in ms: the broker dead-letters it at its
  deadline;
- `content_type`: `TASK_CONTENT_TYPE`.

A TaskBatch (the same exchange and routing key) carries several Tasks:
- `type`: `envelope.BATCH_TYPE`; `content_type`: `BATCH_CONTENT_TYPE`;
- `message_id` and `correlation_id`: the last task's id; `reply_to`: the job
  id if the last task is awaited (the others are one-way);
- `expiration`: the longest of its tasks' timeouts (each task still carries
  its own deadline, which the worker checks).

A TaskResult (worker -> `flaap.replies`, routing key = the task's `reply_to`):
- `message_id`: the task id it answers (absent when the task was unreadable);
- `correlation_id`: the task's; the coordinator matches on it and checks
  that the body's task id equals it;
- `user_id`: the silo's broker login, which the broker checks, so the
  coordinator can trust which silo a result came from;
- `content_type`: `RESULT_CONTENT_TYPE`.

Both: `headers` `x-flaap-chunk: i/n` on slices (`chunking.CHUNK_HEADER`);
persistent (`broker.link.default_properties` sets `delivery_mode`).
The broker adds `x-delivery-count` (quorum queues) and, on dead letters,
`x-death`; the link adds `x-flaap-publish-id` (`broker.confirms`) to match
returns to publishes.
"""

from __future__ import annotations

import time
from typing import Any

from flaap_mq.protocol import chunking

# The AMQP `type` of a TaskBatch message (a Task's is its kind's name).
BATCH_TYPE = "TaskBatch"

TASK_CONTENT_TYPE = "application/x-protobuf; proto=flaap_mq.v1.Task"
BATCH_CONTENT_TYPE = "application/x-protobuf; proto=flaap_mq.v1.TaskBatch"
RESULT_CONTENT_TYPE = "application/x-protobuf; proto=flaap_mq.v1.TaskResult"
APP_ID = "flaap-mq"


def task_properties(
    *,
    task_id: str,
    kind_name: str,
    reply_to: str | None,
    timeout_s: float,
    index: int = 0,
    count: int = 1,
) -> dict[str, Any]:
    """The properties of slice `index` of `count` of a Task message."""
    return {
        # The worker announces the value a Create* task makes by this id.
        "message_id": task_id,
        "correlation_id": task_id,
        "reply_to": reply_to,
        # The broker drops (dead-letters) the task at its deadline, so a silo
        # that comes back late does not run work nobody awaits.
        "expiration": str(max(1, int(timeout_s * 1000))),
        "content_type": TASK_CONTENT_TYPE,
        "type": kind_name,
        "app_id": APP_ID,
        "timestamp": int(time.time()),
        "headers": chunking.headers(index, count),
    }


def batch_properties(
    *, last_task_id: str, reply_to: str | None, timeout_s: float
) -> dict[str, Any]:
    """The properties of a TaskBatch message (see the module docstring)."""
    return {
        **task_properties(
            task_id=last_task_id, kind_name=BATCH_TYPE, reply_to=reply_to, timeout_s=timeout_s
        ),
        "content_type": BATCH_CONTENT_TYPE,
    }


def result_properties(
    *,
    task_id: str | None,
    correlation_id: str | None,
    user_id: str | None,
    index: int = 0,
    count: int = 1,
) -> dict[str, Any]:
    """The properties of slice `index` of `count` of a TaskResult message."""
    return {
        "message_id": task_id or None,
        "correlation_id": correlation_id,
        "content_type": RESULT_CONTENT_TYPE,
        # The broker refuses a user_id other than the login: the coordinator
        # can trust which silo a result came from.
        "user_id": user_id,
        "headers": chunking.headers(index, count),
    }

"""`flaap-mq status`: is each silo online, how much waits for it, what went wrong.

Two sources, so that it works on any broker:

* AMQP (always): each silo queue's depth and consumer count, the dead-letter
  queue's depth and its most common reasons (sampled and requeued).
* RabbitMQ's management API, when `--management-url` is given (or
  `FLAAP_MQ_MANAGEMENT_URL`): which worker of a silo is active and which are
  standby, the age of the oldest task where the broker tells it, and the
  coordinators' reply queues. AMQP alone cannot list queues or consumers.

With no `--silo` named, the silos are every queue `PREFIX.silo.*` the
management API lists; without the API, AMQP cannot list queues, and the
report says to name the silos. A management API that does not answer (or
refuses the login) does not fail the command: the report holds what AMQP
tells, with a note saying what is missing and why.

A silo is online when at least one worker consumes its queue. The command
exits 1 when a silo it reports on is offline, so scripts and health checks
can use it.

Gathered here (AMQP first, then the management API); the management API's
client is `management_api.py`, the report and its rendering
`status_report.py`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import pika

from flaap_mq.admin.dead_letter import reason_of
from flaap_mq.admin.management_api import ManagementApi, ManagementUnavailable
from flaap_mq.admin.queues import get_each, queue_counts
from flaap_mq.admin.status_report import SiloStatus, Status

# Re-exported: the CLI renders the report with these, from here.
from flaap_mq.admin.status_report import render_json as render_json
from flaap_mq.admin.status_report import render_text as render_text
from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.connect import open_connection
from flaap_mq.protocol import topology

_DEAD_LETTER_SAMPLE = 200


def collect_status(
    broker_url: str,
    silo_ids: Sequence[str],
    *,
    prefix: str = "flaap",
    management_url: str | None = None,
    management_ca_file: str | None = None,
) -> Status:
    names = topology.Names(prefix)
    address = parse_broker_urls(broker_url, connection_name="flaap-mq-status")[0]
    # Checked before anything is sent anywhere: a URL that would expose the
    # password fails at once.
    api = (
        ManagementApi(management_url, address, ca_file=management_ca_file or address.ca_file)
        if management_url
        else None
    )
    # The same one line as every command when the broker cannot be reached.
    connection = open_connection([address])
    notes: list[str] = []
    try:
        silo_ids = list(silo_ids)
        if not silo_ids:
            silo_ids, api = _listed_silos(api, names, notes)
        silos = [_silo_over_amqp(connection, names, s) for s in silo_ids]
        dlq_depth, reasons = _dead_letters(connection, names)
    finally:
        connection.close()
    reply_queues = None
    if api is not None:
        try:
            for silo in silos:
                api.fill_silo(silo)
            reply_queues = api.reply_queues(f"{prefix}.reply.")
        except ManagementUnavailable as e:
            notes.append(_degraded(e))
    return Status(address.redacted, silos, dlq_depth, reasons, reply_queues, notes)


def _listed_silos(
    api: ManagementApi | None, names: topology.Names, notes: list[str]
) -> tuple[list[str], ManagementApi | None]:
    """Every silo with a queue under the prefix, from the management API, and the API still usable.

    Without the API (or when it does not answer), no silos, and a note
    saying to name them: AMQP cannot list queues.
    """
    name_silos = "no silos named: give --silo ID (repeatable) to report on them"
    if api is None:
        notes.append(
            f"{name_silos}, or --management-url to list every silo queue {names.silo_queue('*')}"
        )
        return [], None
    try:
        return api.silo_ids(names), api
    except ManagementUnavailable as e:
        notes.append(f"{_degraded(e)}; {name_silos}")
        return [], None


def _degraded(error: ManagementUnavailable) -> str:
    return (
        f"{error}: showing what AMQP tells (no standby workers, task ages or "
        "coordinators' reply queues)"
    )


def _silo_over_amqp(
    connection: pika.BlockingConnection, names: topology.Names, silo_id: str
) -> SiloStatus:
    queue = names.silo_queue(silo_id)
    counts = queue_counts(connection, queue, refused_as_missing=True)
    if counts is None:
        return SiloStatus(silo_id, queue, False, 0, 0, False)
    # With a single active consumer, a quorum queue counts only the active
    # one here; the management API lists the standbys too.
    return SiloStatus(
        silo_id,
        queue,
        True,
        counts.messages,
        counts.consumers,
        counts.consumers > 0,
    )


def _dead_letters(
    connection: pika.BlockingConnection, names: topology.Names
) -> tuple[int, list[tuple[str, int]]]:
    counts = queue_counts(connection, names.dead_letter_queue, refused_as_missing=True)
    if counts is None:
        return 0, []
    reasons: collections.Counter[str] = collections.Counter()
    channel = connection.channel()
    tags = []
    # Sampled with basic.get and put back unacknowledged: reading the reasons
    # must not take the messages away from the operator.
    sample = min(counts.messages, _DEAD_LETTER_SAMPLE)
    for got, properties in get_each(channel, names.dead_letter_queue, sample):
        tags.append(got.delivery_tag)
        reasons[reason_of(properties)] += 1
    if tags:
        channel.basic_nack(tags[-1], multiple=True, requeue=True)
    channel.close()
    return counts.messages, reasons.most_common(5)

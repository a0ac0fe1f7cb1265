"""`flaap-mq status`'s report rendered as a table and as JSON, without a broker."""

from __future__ import annotations

import json

from flaap_mq.admin.status_report import Consumer, SiloStatus, Status, render_json, render_text


def _status(**overrides) -> Status:
    silos = [
        SiloStatus(
            "a",
            "flaap.silo.a",
            True,
            2,
            2,
            True,
            oldest_task_age_s=12.4,
            workers=[
                Consumer("t1", "flaap-worker-a", True),
                Consumer("t2", "flaap-worker-a2", False, executor_network="host"),
            ],
        ),
        SiloStatus("b", "flaap.silo.b", True, 0, 0, False),
        SiloStatus("c", "flaap.silo.c", False, 0, 0, False),
    ]
    fields = dict(
        broker="amqp://guest:***@localhost:5672/",
        silos=silos,
        dead_letter_depth=3,
        dead_letter_reasons=[("expired", 2), ("rejected", 1)],
        reply_queues=[{"queue": "flaap.reply.job-1", "messages": 0, "consumers": 1}],
    )
    return Status(**(fields | overrides))


def test_the_table():
    head = f"  {'silo':<20} {'state':<8} {'tasks':>6} {'oldest':>8}  workers"
    a_workers = (
        "flaap-worker-a (active), flaap-worker-a2 (standby) INSECURE: its executor listens "
        "on the network"
    )
    assert render_text(_status()).split("\n") == [
        "broker amqp://guest:***@localhost:5672/",
        head,
        f"  {'a':<20} {'online':<8} {2:>6} {'12s':>8}  {a_workers}",
        f"  {'b':<20} {'offline':<8} {0:>6} {'-':>8}  0 consuming",
        f"  {'c':<20} {'no queue':<8} {0:>6} {'-':>8}  0 consuming",
        "  dead letters: 3 (expired x2, rejected x1)",
        "  coordinator reply queue flaap.reply.job-1: 0 messages, 1 consumers",
    ]


def test_without_the_management_api_the_table_says_what_would_list_coordinators():
    lines = render_text(_status(reply_queues=None, dead_letter_reasons=[])).split("\n")
    assert lines[-2:] == [
        "  dead letters: 3",
        "  coordinators: (give --management-url to list reply queues)",
    ]
    # A note says why instead, when there is one.
    noted = render_text(_status(reply_queues=None, notes=["management API at x did not answer"]))
    assert noted.split("\n")[-2:] == [
        "  dead letters: 3 (expired x2, rejected x1)",
        "  note: management API at x did not answer",
    ]


def test_the_json_lists_the_offline_silos():
    report = json.loads(render_json(_status()))
    assert report["offline"] == ["b", "c"]
    assert report["silos"][0]["workers"][1] == {
        "tag": "t2",
        "connection": "flaap-worker-a2",
        "active": False,
        "executor_network": "host",
    }
    assert report["dead_letter_reasons"] == [["expired", 2], ["rejected", 1]]

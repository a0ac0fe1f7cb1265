"""The `flaap-mq` command: run a silo worker, inspect the topology, run the demo.

Errors an operator can fix (a wrong password, an unreachable broker, a bad
id) end in one line naming what is wrong and a non-zero exit, not a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flaap_mq import logs
from flaap_mq.broker.urls import (
    BROKER_URL_ENV,
    BROKER_URL_FILE_ENV,
    CA_FILE_ENV,
    CERT_FILE_ENV,
    DEFAULT_BROKER_URL,
    KEY_FILE_ENV,
    check_login,
    parse_broker_urls,
    resolve_broker_url,
    with_tls_options,
)

if TYPE_CHECKING:
    from flaap_mq.protocol import chunking

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _add_broker_url_args(parser: argparse.ArgumentParser, what: str) -> None:
    """`--broker-url` or `--broker-url-file`, never both; `main` resolves them."""
    urls = parser.add_mutually_exclusive_group()
    urls.add_argument(
        "--broker-url",
        default=None,
        help=f"{what} (comma-separated for a cluster); visible to every local user in `ps`: "
        "prefer --broker-url-file for a URL with a password",
    )
    urls.add_argument(
        "--broker-url-file",
        default=None,
        metavar="PATH",
        help="a file holding the broker URL (mode 0600); default "
        f"${BROKER_URL_FILE_ENV}, else ${BROKER_URL_ENV}, else {DEFAULT_BROKER_URL}",
    )


def _resolve_broker_url(args: argparse.Namespace) -> None:
    """Sets `args.broker_url` to the URL to use and `args.broker_url_file` to its file.

    `args.broker_url_file` becomes the absolute path the URL was read from
    (the flag's or `$FLAAP_MQ_BROKER_URL_FILE`'s), or None: the worker keeps
    it away from the processes it starts.
    """
    source = resolve_broker_url(args.broker_url, args.broker_url_file)
    args.broker_url, args.broker_url_file = source.url, source.file


def _add_broker_args(parser: argparse.ArgumentParser) -> None:
    _add_broker_url_args(parser, "AMQP URL")
    parser.add_argument("--prefix", default="flaap", help="prefix of every queue and exchange")
    parser.add_argument(
        "--queue-type", choices=["quorum", "classic"], default="quorum", help="silo queue type"
    )
    tls = parser.add_argument_group("TLS (amqps:// URLs; the broker's certificate is verified)")
    tls.add_argument(
        "--ca-file",
        default=os.environ.get(CA_FILE_ENV),
        help=f"CA certificate(s) to trust for the broker, PEM (default ${CA_FILE_ENV}, "
        "else the system's CAs; or ?cacertfile= in the URL)",
    )
    tls.add_argument(
        "--cert-file",
        default=os.environ.get(CERT_FILE_ENV),
        help=f"client certificate, PEM (default ${CERT_FILE_ENV}; or ?certfile=)",
    )
    tls.add_argument(
        "--key-file",
        default=os.environ.get(KEY_FILE_ENV),
        help=f"client certificate's key, PEM (default ${KEY_FILE_ENV}; or ?keyfile=)",
    )


def _add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["console", "json"], default="console")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flaap-mq",
        description="Run TensorFlow Federated computations on silo workers through RabbitMQ.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve one silo's tasks (dials out only)")
    _add_broker_args(worker)
    _add_log_args(worker)
    worker.add_argument(
        "--silo-id",
        default=os.environ.get("FLAAP_MQ_SILO_ID"),
        help="this silo's id (default $FLAAP_MQ_SILO_ID)",
    )
    worker.add_argument("--prefetch", type=int, default=8, help="tasks run at once (default 8)")
    worker.add_argument(
        "--data-dir",
        default=None,
        help="the silo's datasets: the executor's working directory, read-only to it",
    )
    worker.add_argument(
        "--executor-network",
        choices=["sandbox", "host"],
        default=os.environ.get("FLAAP_MQ_EXECUTOR_NETWORK", "sandbox"),
        help="sandbox (default): TFF's executor runs with no network, no secrets and a "
        "read-only file system, reached through a Unix socket. host: INSECURE, it listens "
        "on a TCP port of every interface without credentials, as TFF runs it; only for "
        "hosts that forbid unprivileged user namespaces (logged as a warning; default "
        "$FLAAP_MQ_EXECUTOR_NETWORK or sandbox)",
    )
    worker.add_argument(
        "--chunk-bytes",
        type=int,
        default=None,
        help="split results larger than this over several messages (default 8 MiB); "
        "keep it below the broker's max_message_size",
    )
    # Bounds on what a coordinator's chunked tasks can make the worker hold
    # (flaap_mq.protocol.chunking.Limits); a task over them is answered CHUNK_INVALID.
    worker.add_argument(
        "--max-transfer-bytes",
        type=int,
        default=None,
        help="refuse a chunked task declaring a larger request (default 1 GiB)",
    )
    worker.add_argument(
        "--max-transfer-slices",
        type=int,
        default=None,
        help="refuse a chunked task declaring more slices (default 16384)",
    )
    worker.add_argument(
        "--max-pending-transfer-bytes",
        type=int,
        default=None,
        help="most bytes held by chunked tasks not yet complete or not yet run, counted as "
        "the messages they keep in memory (default 2 GiB)",
    )

    topo = sub.add_parser("topology", help="declare the topology and show what exists")
    _add_broker_args(topo)
    topo.add_argument("--silo", action="append", default=[], help="silo id (repeatable)")

    status = sub.add_parser("status", help="each silo's queue, workers and dead letters")
    _add_broker_args(status)
    status.add_argument("--silo", action="append", default=[], help="silo id (repeatable)")
    status.add_argument(
        "--management-url",
        default=os.environ.get("FLAAP_MQ_MANAGEMENT_URL"),
        help="RabbitMQ management API (e.g. https://broker:15671; trusts --ca-file) for "
        "active/standby workers, task age and reply queues; logs in with the broker URL's "
        "user, so plain http only to localhost, and no redirect to another origin",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    demo = sub.add_parser("demo", help="start 3 workers and run two federated computations")
    _add_log_args(demo)
    _add_broker_url_args(demo, "broker to use; a throwaway one is started if it does not answer")
    demo.add_argument("--silos", type=int, default=3)

    admin = sub.add_parser("admin", help="broker administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    definitions = admin_sub.add_parser(
        "definitions",
        help="print a RabbitMQ definitions document: vhost, topology, users, permissions",
        description="Prints a definitions document (JSON) for `rabbitmqctl import_definitions`: "
        "the vhost, the whole topology, one user per principal with a fresh random password "
        "(stored hashed; in clear only in SECRETS_DIR/NAME.password, mode 0600), and "
        "permissions that let each silo read only its own queue and publish only replies.",
    )
    definitions.add_argument("--vhost", required=True, help="the vhost to create")
    definitions.add_argument("--coordinator", required=True, help="the coordinator's user name")
    definitions.add_argument(
        "--silo",
        action="append",
        required=True,
        help="a silo id, also its user name (repeatable)",
    )
    definitions.add_argument(
        "--secrets-dir", required=True, help="where NAME.password files are written (0600)"
    )
    definitions.add_argument("--prefix", default="flaap", help="prefix of every queue and exchange")
    definitions.add_argument(
        "--queue-type", choices=["quorum", "classic"], default="quorum", help="silo queue type"
    )
    definitions.add_argument(
        "--rotate",
        action="store_true",
        help="new passwords even where SECRETS_DIR/NAME.password exists (default: keep them)",
    )

    from flaap_mq.training import cli as training_cli

    training_cli.add_data_parser(sub)
    training_cli.add_train_parser(sub, _add_broker_args, _add_log_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logs.quiet_tensorflow()
    args = build_parser().parse_args(argv)
    logs.configure(getattr(args, "log_format", "console"), getattr(args, "log_level", "info"))
    # Imported here: they load TensorFlow, which `--help` should not wait for.
    from flaap_mq.broker.link import BrokerError
    from flaap_mq.executor import SandboxUnavailable

    try:
        if hasattr(args, "broker_url_file"):
            _resolve_broker_url(args)
        if hasattr(args, "ca_file"):
            args.broker_url = with_tls_options(
                args.broker_url,
                ca_file=args.ca_file,
                cert_file=args.cert_file,
                key_file=args.key_file,
            )
        if args.command == "worker":
            return _worker(args)
        if args.command == "topology":
            from flaap_mq.admin.topology_cli import show_topology

            return show_topology(args.broker_url, args.silo, args.prefix, args.queue_type)
        if args.command == "status":
            from flaap_mq.admin import status

            report = status.collect_status(
                args.broker_url, args.silo, prefix=args.prefix, management_url=args.management_url
            )
            print(status.render_json(report) if args.json else status.render_text(report))
            return EXIT_FAILURE if report.offline else 0
        if args.command == "demo":
            from flaap_mq.demo import run_demo

            return run_demo(args.broker_url, num_silos=args.silos, log_format=args.log_format)
        if args.command == "data":
            from flaap_mq.training.cli import run_split_digits

            return run_split_digits(args)
        if args.command == "train":
            from flaap_mq.training.cli import run_train

            return run_train(args)
        if args.command == "admin":
            from flaap_mq.admin.definitions import print_definitions

            return print_definitions(
                vhost=args.vhost,
                coordinator=args.coordinator,
                silos=args.silo,
                secrets_dir=args.secrets_dir,
                prefix=args.prefix,
                queue_type=args.queue_type,
                rotate=args.rotate,
            )
    except (BrokerError, SandboxUnavailable, ValueError, OSError) as e:
        sub_command = getattr(args, "admin_command", None) or getattr(args, "data_command", None)
        command = args.command + (f" {sub_command}" if sub_command else "")
        print(f"flaap-mq {command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _worker(args: argparse.Namespace) -> int:
    if not args.silo_id:
        print("flaap-mq worker: give --silo-id or set FLAAP_MQ_SILO_ID", file=sys.stderr)
        return EXIT_USAGE
    # A wrong password, vhost or CA fails here, in a moment and in one line,
    # before TensorFlow and the executor start.
    check_login(parse_broker_urls(args.broker_url))

    from flaap_mq.executor import ExecutorNetwork
    from flaap_mq.protocol import topology
    from flaap_mq.worker.worker import SiloWorker

    worker = SiloWorker(
        args.broker_url,
        args.silo_id,
        prefetch=args.prefetch,
        names=topology.Names(args.prefix),
        queue_type=topology.QueueType(args.queue_type),
        data_dir=args.data_dir,
        executor_network=ExecutorNetwork(args.executor_network),
        secret_paths=[args.broker_url_file] if args.broker_url_file else [],
        **({"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}),
        chunk_limits=_chunk_limits(args),
    )
    return worker.run_until_stopped()


def _chunk_limits(args: argparse.Namespace) -> chunking.Limits:
    """The worker's `chunking.Limits`: the defaults, with the flags given."""
    from flaap_mq.protocol import chunking

    given = {
        "max_transfer_bytes": args.max_transfer_bytes,
        "max_slices": args.max_transfer_slices,
        "max_pending_bytes": args.max_pending_transfer_bytes,
    }
    return chunking.Limits(**{k: v for k, v in given.items() if v is not None})


if __name__ == "__main__":
    sys.exit(main())

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

from flaap_mq import logs
from flaap_mq.broker.urls import BROKER_URL_ENV, DEFAULT_BROKER_URL

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _add_broker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL),
        help=f"AMQP URL (comma-separated for a cluster); default ${BROKER_URL_ENV} "
        f"or {DEFAULT_BROKER_URL}",
    )
    parser.add_argument("--prefix", default="flaap", help="prefix of every queue and exchange")
    parser.add_argument(
        "--queue-type", choices=["quorum", "classic"], default="quorum", help="silo queue type"
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
    worker.add_argument("--data-dir", default=None, help="working directory of the executor")

    topo = sub.add_parser("topology", help="declare the topology and show what exists")
    _add_broker_args(topo)
    topo.add_argument("--silo", action="append", default=[], help="silo id (repeatable)")

    demo = sub.add_parser("demo", help="start 3 workers and run two federated computations")
    _add_log_args(demo)
    demo.add_argument(
        "--broker-url",
        default=os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL),
        help="broker to use; a throwaway one is started if it does not answer",
    )
    demo.add_argument("--silos", type=int, default=3)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logs.quiet_tensorflow()
    args = build_parser().parse_args(argv)
    logs.configure(getattr(args, "log_format", "console"), getattr(args, "log_level", "info"))
    # Imported here: they load TensorFlow, which `--help` should not wait for.
    from flaap_mq.broker.link import BrokerError

    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "topology":
            from flaap_mq.admin.topology_cli import show_topology

            return show_topology(args.broker_url, args.silo, args.prefix, args.queue_type)
        if args.command == "demo":
            from flaap_mq.demo import run_demo

            return run_demo(args.broker_url, num_silos=args.silos, log_format=args.log_format)
    except (BrokerError, ValueError) as e:
        print(f"flaap-mq {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _worker(args: argparse.Namespace) -> int:
    from flaap_mq.protocol import topology
    from flaap_mq.worker.worker import SiloWorker

    if not args.silo_id:
        print("flaap-mq worker: give --silo-id or set FLAAP_MQ_SILO_ID", file=sys.stderr)
        return EXIT_USAGE
    worker = SiloWorker(
        args.broker_url,
        args.silo_id,
        prefetch=args.prefetch,
        names=topology.Names(args.prefix),
        queue_type=topology.QueueType(args.queue_type),
        data_dir=args.data_dir,
    )
    return worker.run_until_stopped()


if __name__ == "__main__":
    sys.exit(main())

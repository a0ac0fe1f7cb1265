"""The `flaap-mq` command: worker, topology, status, admin, dead-letters, data, train, demo.

Errors an operator can fix (a wrong password, an unreachable broker, a bad
id) end in one line naming what is wrong and a non-zero exit, not a
traceback.

Why one module of some 590 lines: it is the one argument parser of every
command, so that flags, defaults, environment variables and help read alike
across commands; the work of each command lives in its own module
(`worker/`, `admin/`, `training/cli.py`, `data/`, `demo.py`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flaap_mq import config as federation_config
from flaap_mq import logs
from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.connect import open_connection
from flaap_mq.broker.credentials import (
    BROKER_URL_ENV,
    BROKER_URL_FILE_ENV,
    DEFAULT_BROKER_URL,
    resolve_broker_url,
)
from flaap_mq.broker.tls import CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV, with_tls_options

if TYPE_CHECKING:
    from flaap_mq.protocol import collector

EXIT_USAGE = 2
EXIT_FAILURE = 1

# The environment variables each command reads, listed in its --help.
_ENV_HELP = {
    federation_config.CONFIG_ENV: "the config file (as --config)",
    BROKER_URL_FILE_ENV: "a file holding the broker URL (as --broker-url-file)",
    BROKER_URL_ENV: "the broker URL (as --broker-url; prefer the file)",
    CA_FILE_ENV: "as --ca-file",
    CERT_FILE_ENV: "as --cert-file",
    KEY_FILE_ENV: "as --key-file",
    federation_config.SILO_ID_ENV: "as --silo-id",
    "FLAAP_MQ_EXECUTOR_NETWORK": "as --executor-network",
    "FLAAP_MQ_EXECUTOR_ENV": "comma-separated names of variables TFF's executor may inherit",
    federation_config.MANAGEMENT_URL_ENV: "as --management-url",
}
_BROKER_ENV = (
    federation_config.CONFIG_ENV,
    BROKER_URL_FILE_ENV,
    BROKER_URL_ENV,
    CA_FILE_ENV,
    CERT_FILE_ENV,
    KEY_FILE_ENV,
)
_COMMAND_ENV = {
    "worker": (
        *_BROKER_ENV,
        federation_config.SILO_ID_ENV,
        "FLAAP_MQ_EXECUTOR_NETWORK",
        "FLAAP_MQ_EXECUTOR_ENV",
    ),
    "topology": _BROKER_ENV,
    "status": (*_BROKER_ENV, federation_config.MANAGEMENT_URL_ENV),
    "train": (*_BROKER_ENV, "FLAAP_MQ_EXECUTOR_ENV"),
    "demo": (BROKER_URL_FILE_ENV, BROKER_URL_ENV, "FLAAP_MQ_EXECUTOR_ENV"),
}
_PRECEDENCE = textwrap.fill(  # no break inside a path
    "precedence: a flag, else its environment variable, else the config file, else the "
    "default. Config file: --config, else $FLAAP_MQ_CONFIG, else ./flaap-mq.toml, else "
    '~/.config/flaap-mq/config.toml (README, "Configuration").',
    width=78,
    break_on_hyphens=False,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default; keeps the epilog's lines as written.

    An option whose help already says its default (one taken from the
    environment or the config file says where, never the value: it may be
    a secret) or that has none to show (a flag, a required option) is left
    as written. A default of None shows as "none": an option whose None
    stands for a computed value must say that value in its help.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if (
            action.help is None
            and action.option_strings
            and action.nargs != 0
            and not action.required
            and action.default not in (None, argparse.SUPPRESS)
        ):
            # argparse prints nothing for an option without help, not even its default.
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default is argparse.SUPPRESS
            or action.required
            or action.nargs == 0
        ):
            return text
        shown = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class _Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `_HelpFormatter`; subcommands' parsers inherit it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def _version() -> str:
    """The installed package's version (its metadata), as `flaap-mq --version` prints it."""
    try:
        return importlib.metadata.version("flaap-mq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _environment_epilog(names: Sequence[str]) -> str:
    width = max(len(n) for n in names)
    lines = [f"  {n:<{width}}  {_ENV_HELP[n]}" for n in names]
    return "environment:\n" + "\n".join(lines)


def _add_broker_url_args(
    parser: argparse.ArgumentParser, what: str, *, config: bool = False
) -> None:
    """`--broker-url` or `--broker-url-file`, never both; `main` resolves them."""
    from_config = "else the config's broker_url_file or broker_url, " if config else ""
    urls = parser.add_mutually_exclusive_group()
    urls.add_argument(
        "--broker-url",
        default=None,
        help=f"{what} (comma-separated for a cluster); visible to every local user in `ps`: "
        "prefer --broker-url-file for a URL with a password (default: see --broker-url-file)",
    )
    urls.add_argument(
        "--broker-url-file",
        default=None,
        metavar="PATH",
        help="a file holding the broker URL (mode 0600); default "
        f"${BROKER_URL_FILE_ENV}, else ${BROKER_URL_ENV}, {from_config}else {DEFAULT_BROKER_URL}",
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
    """The broker, topology and config-file options; `_apply_config` resolves them."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="TOML file of the federation's settings (broker URL or its file, silos, prefix, "
        f"TLS files, ...; default ${federation_config.CONFIG_ENV}, else "
        "./flaap-mq.toml, else ~/.config/flaap-mq/config.toml, if they exist)",
    )
    parser.add_argument(
        "--federation",
        metavar="NAME",
        default=None,
        help="the config file's [federations.NAME] to use (default: its "
        "federations.default, or its only one)",
    )
    _add_broker_url_args(parser, "AMQP URL", config=True)
    parser.add_argument(
        "--prefix",
        default=None,
        help="prefix of every queue and exchange (default: the config's prefix, else "
        f"{federation_config.DEFAULT_PREFIX})",
    )
    parser.add_argument(
        "--queue-type",
        choices=["quorum", "classic"],
        default=None,
        help="silo queue type (default: the config's queue_type, else "
        f"{federation_config.DEFAULT_QUEUE_TYPE})",
    )
    tls = parser.add_argument_group("TLS (amqps:// URLs; the broker's certificate is verified)")
    tls.add_argument(
        "--ca-file",
        default=None,
        help=f"CA certificate(s) to trust for the broker, PEM (default ${CA_FILE_ENV}, "
        "else the config's ca_file, else the system's CAs; or ?cacertfile= in the URL)",
    )
    tls.add_argument(
        "--cert-file",
        default=None,
        help=f"client certificate, PEM (default ${CERT_FILE_ENV}, else the config's "
        "cert_file, else none; or ?certfile=)",
    )
    tls.add_argument(
        "--key-file",
        default=None,
        help=f"client certificate's key, PEM (default ${KEY_FILE_ENV}, else the config's "
        "key_file, else none; or ?keyfile=)",
    )


def _add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["console", "json"], default="console")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flaap-mq",
        description="Run TensorFlow Federated computations on silo workers through RabbitMQ.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve one silo's tasks (dials out only)")
    _add_broker_args(worker)
    _add_log_args(worker)
    worker.add_argument(
        "--silo-id",
        default=None,
        help=f"this silo's id (default ${federation_config.SILO_ID_ENV}, else the config's "
        "silo_id)",
    )
    worker.add_argument("--prefetch", type=int, default=8, help="tasks run at once (default 8)")
    worker.add_argument(
        "--data-dir",
        default=None,
        help="the silo's datasets: the executor's working directory, read-only to it "
        "(default: none, an empty directory)",
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
    # (flaap_mq.protocol.collector.Limits); a task over them is answered CHUNK_INVALID.
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
        help="most bytes held by chunked tasks not yet complete or not yet run, each counted "
        "at its declared size from its first slice (default 2 GiB)",
    )

    topo = sub.add_parser("topology", help="declare the topology and show what exists")
    _add_broker_args(topo)
    topo.add_argument(
        "--silo",
        action="append",
        default=[],
        help="silo id (repeatable; default: the config's silos)",
    )

    status = sub.add_parser("status", help="each silo's queue, workers and dead letters")
    _add_broker_args(status)
    status.add_argument(
        "--silo",
        action="append",
        default=[],
        help="silo id (repeatable; default: the config's silos)",
    )
    status.add_argument(
        "--management-url",
        default=None,
        help="RabbitMQ management API (e.g. https://broker:15671; trusts --ca-file) for "
        "active/standby workers, task age and reply queues; logs in with the broker URL's "
        "user, so plain http only to localhost, and no redirect to another origin (default "
        f"${federation_config.MANAGEMENT_URL_ENV}, else the config's management_url, else none)",
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

    # `admin remove-silo` and `dead-letters show|purge`.
    from flaap_mq.admin import housekeeping

    housekeeping.add_parsers(sub, admin_sub, _add_broker_args)
    _add_environment_epilogs(parser)
    return parser


def _add_environment_epilogs(parser: argparse.ArgumentParser) -> None:
    """Ends each command's --help with the environment variables it reads.

    A command not in `_COMMAND_ENV` that takes `--config` (`_add_broker_args`)
    reads the broker's variables.
    """
    stack = [parser]
    while stack:
        for action in stack.pop()._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            for name, command_parser in action.choices.items():
                stack.append(command_parser)
                takes_config = any("--config" in a.option_strings for a in command_parser._actions)
                names = _COMMAND_ENV.get(name) or (_BROKER_ENV if takes_config else None)
                if not names:
                    continue
                precedence = _PRECEDENCE if takes_config else None
                command_parser.epilog = "\n\n".join(
                    part
                    for part in (command_parser.epilog, _environment_epilog(names), precedence)
                    if part
                )


def main(argv: Sequence[str] | None = None) -> int:
    logs.quiet_tensorflow()
    args = build_parser().parse_args(argv)
    logs.configure(getattr(args, "log_format", "console"), getattr(args, "log_level", "info"))
    if hasattr(args, "config"):
        # Before TensorFlow loads: a bad config value, id or URL fails in a moment.
        try:
            _apply_config(args)
        except ValueError as e:
            print(f"flaap-mq {args.command}: {e}", file=sys.stderr)
            return EXIT_USAGE
    # Imported here: `--help` need not wait for pika and gRPC. No command imports
    # TensorFlow before it needs it, and `worker` never does (a test checks it).
    from flaap_mq.broker.link import BrokerError
    from flaap_mq.executor import SandboxUnavailable

    try:
        if hasattr(args, "broker_url_file") and not hasattr(args, "config"):
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

            _check_broker(args)
            return run_train(args)
        if args.command == "dead-letters" or getattr(args, "admin_command", None) == "remove-silo":
            from flaap_mq.admin import housekeeping

            return housekeeping.run(args)
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
        sub_command = (
            getattr(args, "admin_command", None)
            or getattr(args, "data_command", None)
            or getattr(args, "dead_letters_command", None)
        )
        command = args.command + (f" {sub_command}" if sub_command else "")
        print(f"flaap-mq {command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _apply_config(args: argparse.Namespace) -> None:
    """Fills `args` from flags, environment, config file and defaults (`flaap_mq.config`).

    Sets the broker URL (and `args.broker_url_file`, the file it was read
    from), silos, prefix, queue type, TLS files and, where the command has
    them, the management URL and silo id. `ValueError` names a bad value's origin.
    """
    found, _ = federation_config.find_config_file(args.config)
    config = (
        federation_config.read_config_file(found, args.federation)
        if found
        else federation_config.ConfigFile()
    )
    if found is None and args.federation is not None:
        raise ValueError(f"--federation {args.federation}: no config file found")
    settings = federation_config.resolve_settings(
        config,
        broker_url=args.broker_url,
        broker_url_file=args.broker_url_file,
        silos=getattr(args, "silo", None) or None,
        prefix=args.prefix,
        queue_type=args.queue_type,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        management_url=getattr(args, "management_url", None),
        silo_id=getattr(args, "silo_id", None),
        min_silos=getattr(args, "min_silos", None),
        silo_grace=getattr(args, "silo_grace", None),
    )
    args.broker_url, args.broker_url_file = settings.broker_url, settings.broker_url_file
    args.prefix, args.queue_type = settings.prefix, settings.queue_type
    args.ca_file, args.cert_file, args.key_file = (
        settings.ca_file,
        settings.cert_file,
        settings.key_file,
    )
    if hasattr(args, "silo"):
        args.silo = list(settings.silos)
    if hasattr(args, "management_url"):
        args.management_url = settings.management_url
    if hasattr(args, "silo_id"):
        args.silo_id = settings.silo_id
    if hasattr(args, "min_silos"):  # train: silos that drop out
        args.min_silos, args.silo_grace = settings.min_silos, settings.silo_grace
    # A config file holding a password is as secret as a URL file.
    args.secret_files = [
        str(f)
        for f in (
            settings.broker_url_file,
            settings.config_file if settings.config_holds_secret else None,
        )
        if f
    ]
    if args.command == "train" and not args.silo:
        raise ValueError(
            "give --silo ID (repeatable), or silos = [...] in a config file (--config)"
        )


def _check_broker(args: argparse.Namespace) -> None:
    """Fails the command at once, in one line, when no broker answers or one refuses us.

    Before TensorFlow and the executor start: an unknown host, a port where
    nothing listens, a wrong password, vhost or CA (`open_connection`, the
    same line `status` and `topology` print). The library's link would
    retry an unreachable broker for its connect timeout (30 s); a command
    started by hand, or by systemd (which restarts it), is better told now.
    """
    open_connection(parse_broker_urls(args.broker_url)).close()


def _worker(args: argparse.Namespace) -> int:
    if not args.silo_id:
        print(
            "flaap-mq worker: give --silo-id, set FLAAP_MQ_SILO_ID, or silo_id in a config file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _check_broker(args)

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
        secret_paths=args.secret_files,
        **({"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}),
        chunk_limits=_chunk_limits(args),
    )
    return worker.run_until_stopped()


def _chunk_limits(args: argparse.Namespace) -> collector.Limits:
    """The worker's `collector.Limits`: the defaults, with the flags given."""
    from flaap_mq.protocol import collector

    given = {
        "max_transfer_bytes": args.max_transfer_bytes,
        "max_slices": args.max_transfer_slices,
        "max_pending_bytes": args.max_pending_transfer_bytes,
    }
    return collector.Limits(**{k: v for k, v in given.items() if v is not None})


if __name__ == "__main__":
    sys.exit(main())

"""`flaap-mq train` and `flaap-mq data split-digits`: arguments and what they run."""

from __future__ import annotations

import argparse
import os
import sys

from flaap_mq.data.layout import DEFAULT_NAME, TEST_FILE
from flaap_mq.training.config import TrainingConfig

DEFAULT_DATA_DIR = "digits-data"
DEFAULT_OUT_DIR = "training-out"


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare silo-resident data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    split = data_sub.add_parser(
        "split-digits",
        help="label-skewed silo partitions of scikit-learn's digits, and a test set",
        description="Writes OUT/<silo-id>/NAME (tf.data.Dataset.save; give OUT/<silo-id> to "
        "that silo's worker as --data-dir), OUT/test.npz (held out, for the coordinator) and "
        "OUT/manifest.json. The digits ship with scikit-learn: nothing is downloaded.",
    )
    split.add_argument("--silos", type=int, required=True, help="number of silos")
    split.add_argument("--out", default=DEFAULT_DATA_DIR, help=f"default {DEFAULT_DATA_DIR}")
    split.add_argument(
        "--skew",
        type=float,
        default=0.5,
        help="Dirichlet concentration of each label over the silos: smaller is more "
        "skewed (default 0.5; 100 is nearly even)",
    )
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--test-fraction", type=float, default=0.2, help="held out (default 0.2)")
    split.add_argument(
        "--name", default=DEFAULT_NAME, help=f"dataset name (default {DEFAULT_NAME})"
    )


def add_train_parser(sub: argparse._SubParsersAction, add_broker_args, add_log_args) -> None:
    defaults = TrainingConfig()
    train = sub.add_parser(
        "train",
        help="FedAvg on the silos' own data (tff.learning), evaluated on a held-out set",
        description="Runs weighted FedAvg (tff.learning) with a small Keras model; each silo "
        "trains on the dataset NAME in its worker's --data-dir, which never leaves it. After "
        "each round the model is evaluated on the held-out set here. Writes OUT/metrics.csv, "
        "OUT/accuracy.png and OUT/weights.npz and prints the final accuracy.",
    )
    add_broker_args(train)
    add_log_args(train)
    train.add_argument(
        "--silo",
        action="append",
        default=None,
        help="silo id (repeatable), in order (default: the config file's silos)",
    )
    train.add_argument("--rounds", type=int, default=defaults.rounds)
    train.add_argument("--data-name", default=defaults.data_name, help="the silos' dataset name")
    train.add_argument("--seed", type=int, default=defaults.seed, help="initial weights")
    train.add_argument(
        "--out",
        default=DEFAULT_OUT_DIR,
        help="the run's directory: its state is saved there after every round, and the same "
        "command run again resumes after the last saved round; one holding a run of other "
        f"settings is refused (default {DEFAULT_OUT_DIR})",
    )
    train.add_argument(
        "--fresh",
        action="store_true",
        help="discard what --out holds of a previous run and start from round 0",
    )
    train.add_argument(
        "--test-set",
        default=os.path.join(DEFAULT_DATA_DIR, TEST_FILE),
        help="held-out .npz with x and y, as written by `data split-digits` "
        f"(default {DEFAULT_DATA_DIR}/{TEST_FILE})",
    )
    train.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--client-learning-rate", type=float, default=defaults.client_learning_rate)
    train.add_argument("--server-learning-rate", type=float, default=defaults.server_learning_rate)
    train.add_argument("--server-momentum", type=float, default=defaults.server_momentum)
    train.add_argument("--hidden-units", type=int, default=defaults.hidden_units)
    train.add_argument(
        "--task-timeout", type=float, default=600.0, help="seconds a silo may take per request"
    )
    train.add_argument(
        "--reply-queue-expires",
        type=float,
        default=None,
        metavar="S",
        help="seconds the broker keeps this coordinator's reply queue once nothing consumes "
        "it (the coordinator died): then the queue and the replies in it are deleted "
        "(default 120)",
    )
    dropout = train.add_argument_group(
        "silos that drop out (each round runs on the silos online at its start and completes "
        "over those that answer; a silo that comes back rejoins at the next round)"
    )
    dropout.add_argument(
        "--min-silos",
        type=int,
        default=None,
        metavar="K",
        help="a round completes once at least K silos have answered, without the silos "
        "lost to it (recorded in metrics.csv); with fewer it fails naming them "
        "(default: the config's min_silos, else every silo must answer)",
    )
    dropout.add_argument(
        "--silo-grace",
        type=float,
        default=None,
        metavar="S",
        help="seconds a silo's queue may have no worker consuming it before the silo is "
        "lost to the round (default: the config's silo_grace, else 60)",
    )
    dropout.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        metavar="T",
        help="seconds a round may take: a silo that has not answered by then is lost to it, "
        "and the round's tasks expire then (default: none, only --task-timeout)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    who = train.add_argument_group(
        "who may answer for a silo (checked by default unless the login is guest)"
    )
    who.add_argument(
        "--silo-user",
        action="append",
        default=[],
        metavar="SILO=USER",
        help="the broker user SILO's worker logs in as (repeatable; default: the silo id, "
        "as `flaap-mq admin definitions` makes them)",
    )
    who.add_argument(
        "--any-silo-user",
        action="store_true",
        help="accept a silo's replies from any broker user (only where every party shares "
        "one login: then the broker cannot tell silos apart)",
    )


def run_split_digits(args: argparse.Namespace) -> int:
    from flaap_mq.data.digits import split_digits

    split = split_digits(
        args.silos,
        args.out,
        skew=args.skew,
        seed=args.seed,
        test_fraction=args.test_fraction,
        name=args.name,
    )
    print(split.table())
    print(
        f"\nwrote {split.out_dir}/: one directory per silo (its worker's --data-dir), "
        f"{TEST_FILE} (held out, for the coordinator) and manifest.json. On each silo:"
    )
    for silo, directory in split.silos.items():
        print(f"  flaap-mq worker --silo-id {silo} --data-dir {directory}")
    silos = " ".join(f"--silo {s}" for s in split.silos)
    test_set = split.out_dir / TEST_FILE
    print(f"then, on the coordinator: flaap-mq train {silos} --test-set {test_set} --rounds 30")
    return 0


def run_train(args: argparse.Namespace) -> int:
    config = TrainingConfig(
        data_name=args.data_name,
        rounds=args.rounds,
        seed=args.seed,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        client_learning_rate=args.client_learning_rate,
        server_learning_rate=args.server_learning_rate,
        server_momentum=args.server_momentum,
        hidden_units=args.hidden_units,
    )
    if not os.path.isfile(args.test_set):
        raise ValueError(
            f"no held-out test set at {args.test_set} (give --test-set; "
            "`flaap-mq data split-digits` writes one)"
        )
    from flaap_mq.data.layout import load_test_set
    from flaap_mq.training import run_dir

    test_set = load_test_set(args.test_set)
    # Before TensorFlow loads: a directory of another run is refused at once.
    identity = run_dir.run_identity(config, args.silo, test_set)
    run_dir.claim(args.out, identity, fresh=args.fresh)

    import flaap_mq
    from flaap_mq.coordinator.silo_users import parse_silo_user_options
    from flaap_mq.training import run as run_lib
    from flaap_mq.training.fedavg import SiloFedAvg

    if not args.no_progress:
        run_lib.route_logs_above_progress_bars()
    run_directory = run_dir.RunDirectory(args.out, identity)
    run_directory.check_rounds(config.rounds)
    silo_users = parse_silo_user_options(args.silo_user, args.silo, any_user=args.any_silo_user)
    algorithm = SiloFedAvg(config)
    from flaap_mq.coordinator.errors import SiloError

    with flaap_mq.create_execution_context(
        args.broker_url,
        args.silo,
        task_timeout=args.task_timeout,
        clients_per_silo=1,
        topology_prefix=args.prefix,
        queue_type=args.queue_type,
        silo_users=silo_users,
        min_silos=args.min_silos,
        silo_grace=args.silo_grace,
        invocation_timeout=args.round_timeout,
        reply_queue_expires=args.reply_queue_expires,
    ) as context:
        try:
            result = run_lib.train(
                algorithm,
                test_set,
                context=context,
                out_dir=run_directory,
                progress=not args.no_progress,
            )
        except SiloError as e:
            message = str(e).splitlines()[0]
            if "metadata file" in str(e):
                message += (
                    f"\n(no dataset {config.data_name!r} in that silo's --data-dir; "
                    "`flaap-mq data split-digits` writes one per silo)"
                )
            print(f"flaap-mq train: {message}", file=sys.stderr)
            return 1
    reached = result.first_round_reaching(run_lib.TARGET_ACCURACY)
    last = result.records[-1]
    if result.resumed_after is not None:
        print(
            f"resumed after round {result.resumed_after} "
            f"(the state saved in {run_directory.path / run_dir.STATE_DIR})"
        )
    print(
        f"final test accuracy: {result.final_accuracy:.4f} after {last.round} rounds "
        f"on {len(args.silo)} silos"
        + (
            f" ({dropped_rounds} rounds without some of them: see {run_lib.METRICS_FILE})"
            if (dropped_rounds := sum(1 for r in result.records if r.dropped))
            else ""
        )
        + (f" (>= {run_lib.TARGET_ACCURACY:.2f} from round {reached})" if reached else "")
    )
    files = (
        run_lib.METRICS_FILE,
        run_lib.PLOT_FILE,
        run_lib.WEIGHTS_FILE,
        run_lib.TENSORBOARD_DIR + "/",
    )
    print(f"wrote {', '.join(str(result.out_dir / f) for f in files)}")
    sys.stdout.flush()
    return 0

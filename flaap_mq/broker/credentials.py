"""Where the broker URL comes from, and which files hold a client's broker secrets.

Where the URL comes from (`resolve_broker_url`), first found wins:
`--broker-url`, `--broker-url-file PATH`, `$FLAAP_MQ_BROKER_URL_FILE`,
`$FLAAP_MQ_BROKER_URL`, then the local default. A file keeps the password out
of `argv` (which `ps` shows to every local user) and out of the environment;
under systemd, `LoadCredential=` provides one (`read_broker_url_file`).

`credential_files` names the files that hold a client's credentials (the URL
file, TLS keys), which a process running untrusted computations must not read.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from flaap_mq.logs import get_logger

if TYPE_CHECKING:
    from flaap_mq.broker.address import BrokerAddress

log = get_logger("flaap_mq.broker")

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
BROKER_URL_ENV = "FLAAP_MQ_BROKER_URL"
BROKER_URL_FILE_ENV = "FLAAP_MQ_BROKER_URL_FILE"
# A URL file holds a few URLs; anything bigger is the wrong file.
MAX_BROKER_URL_FILE_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class BrokerUrlSource:
    """A broker URL and where it came from (`resolve_broker_url`)."""

    url: str
    # The file it was read from, absolute (so that the worker can hide it from
    # the processes it starts); None when it came from no file.
    file: str | None
    # "--broker-url", "--broker-url-file", "$FLAAP_MQ_BROKER_URL_FILE",
    # "$FLAAP_MQ_BROKER_URL" or "default": for messages.
    origin: str


def read_broker_url_file(path: str, *, origin: str = "--broker-url-file") -> str:
    """The broker URL held in the file `path`: one URL, or several (comma- or line-separated).

    Whitespace around each line is trimmed; lines are joined with commas. A
    file that is missing, unreadable, not a file, empty, not UTF-8 or larger
    than 64 KiB is a `ValueError` that names the file and `origin` (the flag
    or variable that named it) and never quotes what the file holds. A file
    that other users may read, or that its group may write, is logged as a
    warning (`broker_url_file_not_private`): the password is as safe as the
    file's mode (0600 or 0400; 0640 with a group only the worker's user is in).
    """
    where = f"broker URL file {path} ({origin})"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError(f"{where} is not a regular file")
            data = f.read(MAX_BROKER_URL_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{where} is not readable by this user (uid {os.getuid()})") from None
    except OSError as e:
        raise ValueError(f"{where} cannot be read: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_BROKER_URL_FILE_BYTES:
        raise ValueError(
            f"{where} is larger than {MAX_BROKER_URL_FILE_BYTES // 1024} KiB; "
            "it should hold only the broker URL"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    url = ",".join(line.strip() for line in text.splitlines() if line.strip())
    if not url:
        raise ValueError(f"{where} is empty; it should hold the broker URL")
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        log.warning(
            "broker_url_file_not_private",
            path=path,
            mode=f"{stat.S_IMODE(mode):04o}",
            fix=f"chmod 600 {path} (or 640 with a group only the worker's user is in)",
        )
    return url


def resolve_broker_url(
    url: str | None = None,
    url_file: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> BrokerUrlSource:
    """The broker URL to use, and where it came from; the first found wins.

    1. `url` (`--broker-url`);
    2. `url_file` (`--broker-url-file`), read with `read_broker_url_file`;
    3. the file named by `$FLAAP_MQ_BROKER_URL_FILE` (systemd's
       `LoadCredential=`: `FLAAP_MQ_BROKER_URL_FILE=%d/broker-url`);
    4. `$FLAAP_MQ_BROKER_URL`;
    5. `DEFAULT_BROKER_URL` (local development's guest login).

    Giving both `url` and `url_file` is a `ValueError`: one of them would be
    ignored. Both variables set is allowed (the file wins, logged as
    `broker_url_env_ignored`): a unit that loads a credential may still
    inherit an old environment file.
    """
    env = os.environ if environ is None else environ
    if url is not None and url_file is not None:
        raise ValueError("give --broker-url or --broker-url-file, not both")
    if url is not None:
        return BrokerUrlSource(url, None, "--broker-url")
    if url_file is not None:
        path = os.path.abspath(url_file)
        return BrokerUrlSource(
            read_broker_url_file(path, origin="--broker-url-file"), path, "--broker-url-file"
        )
    if env.get(BROKER_URL_FILE_ENV):
        origin = f"${BROKER_URL_FILE_ENV}"
        path = os.path.abspath(env[BROKER_URL_FILE_ENV])
        if env.get(BROKER_URL_ENV):
            log.warning(
                "broker_url_env_ignored",
                used=origin,
                ignored=f"${BROKER_URL_ENV}",
                note="the file wins; unset the variable",
            )
        return BrokerUrlSource(read_broker_url_file(path, origin=origin), path, origin)
    if env.get(BROKER_URL_ENV):
        return BrokerUrlSource(env[BROKER_URL_ENV], None, f"${BROKER_URL_ENV}")
    return BrokerUrlSource(DEFAULT_BROKER_URL, None, "default")


def credential_files(addresses: Sequence[BrokerAddress]) -> list[str]:
    """Files that hold a client's broker credentials: TLS keys, systemd's credentials.

    What a process that runs untrusted computations must not be able to
    read (`flaap_mq.executor` hides them from TFF's executor).
    """
    files = [a.key_file for a in addresses if a.key_file]
    for variable in (BROKER_URL_FILE_ENV, "CREDENTIALS_DIRECTORY"):  # the latter: LoadCredential=
        if os.environ.get(variable):
            files.append(os.environ[variable])
    return files

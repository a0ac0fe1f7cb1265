"""The broker URL from a file (`--broker-url-file`, `$FLAAP_MQ_BROKER_URL_FILE`) and its precedence.

A URL in `argv` is visible to every local user in `ps`; one in the
environment to anything that inherits it. The file is how systemd's
`LoadCredential=` hands it over. Its errors name the file, never its contents.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flaap_mq import cli
from flaap_mq.broker.address import parse_broker_urls
from flaap_mq.broker.credentials import (
    BROKER_URL_ENV,
    BROKER_URL_FILE_ENV,
    DEFAULT_BROKER_URL,
    read_broker_url_file,
    resolve_broker_url,
)
from flaap_mq.coordinator.silo_users import ANY_USER, parse_silo_user_options, reply_users

SECRET = "s3cr%23tΩ"
URL = f"amqps://silo-a:{SECRET}@broker.example.org:5671/federation"


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_reads_and_trims_the_url(tmp_path: Path) -> None:
    f = _private(tmp_path / "broker-url", f"  {URL}\n\n")
    assert read_broker_url_file(str(f)) == URL


def test_several_lines_are_a_cluster(tmp_path: Path) -> None:
    other = URL.replace("broker.", "broker2.")
    f = _private(tmp_path / "broker-url", f"{URL}\n  {other}\n")
    assert read_broker_url_file(str(f)) == f"{URL},{other}"
    assert len(parse_broker_urls(read_broker_url_file(str(f)))) == 2


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: _private(d / "empty", " \n\t\n"), "is empty"),
        (lambda d: _private(d / "big", "amqp://" + "x" * 70_000), "larger than 64 KiB"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, make, says: str) -> None:
    path = str(make(tmp_path))
    with pytest.raises(ValueError) as e:
        read_broker_url_file(path, origin="$FLAAP_MQ_BROKER_URL_FILE")
    message = str(e.value)
    assert says in message and path in message and "$FLAAP_MQ_BROKER_URL_FILE" in message
    assert "\n" not in message and "xxxx" not in message


def test_binary_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    f = tmp_path / "broker-url"
    f.write_bytes(b"amqp://u:\xff\xfe" + SECRET.encode() + b"@h/")
    f.chmod(0o600)
    with pytest.raises(ValueError, match="is not UTF-8 text") as e:
        read_broker_url_file(str(f))
    assert SECRET not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(tmp_path: Path) -> None:
    f = _private(tmp_path / "broker-url", URL)
    f.chmod(0o000)
    with pytest.raises(ValueError, match="is not readable by this user"):
        read_broker_url_file(str(f))


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o600, False), (0o400, False), (0o640, False), (0o644, True), (0o660, True), (0o606, True)],
)
def test_a_file_others_may_read_or_change_is_warned_about(
    tmp_path: Path, mode: int, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    f = _private(tmp_path / "broker-url", URL)
    f.chmod(mode)
    assert read_broker_url_file(str(f)) == URL
    events = [e for e in _events(caplog) if e["event"] == "broker_url_file_not_private"]
    assert bool(events) == warned
    for e in events:
        assert SECRET not in repr(e) and e["mode"] == f"{mode:04o}"


def _events(caplog: pytest.LogCaptureFixture) -> list[dict]:
    """flaap-mq's structured events (a record's `msg` is its event dict) from `caplog`."""
    return [dict(r.msg) for r in caplog.records if isinstance(r.msg, dict)]


def test_precedence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flag_file = _private(tmp_path / "flag", "amqp://from-flag-file@h/")
    env_file = _private(tmp_path / "env", "amqp://from-env-file@h/")
    env = {BROKER_URL_FILE_ENV: str(env_file), BROKER_URL_ENV: "amqp://from-env@h/"}

    def resolved(url=None, url_file=None, environ=env):
        source = resolve_broker_url(url, url_file, environ=environ)
        return source.url, source.file, source.origin

    assert resolved("amqp://from-flag@h/") == ("amqp://from-flag@h/", None, "--broker-url")
    assert resolved(url_file=str(flag_file)) == (
        "amqp://from-flag-file@h/",
        str(flag_file),
        "--broker-url-file",
    )
    caplog.clear()
    assert resolved() == ("amqp://from-env-file@h/", str(env_file), f"${BROKER_URL_FILE_ENV}")
    assert [e["event"] for e in _events(caplog)] == ["broker_url_env_ignored"]
    assert resolved(environ={BROKER_URL_ENV: "amqp://from-env@h/"})[:2] == (
        "amqp://from-env@h/",
        None,
    )
    assert resolved(environ={}) == (DEFAULT_BROKER_URL, None, "default")
    with pytest.raises(ValueError, match="not both"):
        resolved("amqp://a@h/", str(flag_file))


def test_relative_file_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _private(tmp_path / "broker-url", URL)
    monkeypatch.chdir(tmp_path)
    assert resolve_broker_url(None, "broker-url", environ={}).file == str(tmp_path / "broker-url")
    source = resolve_broker_url(environ={BROKER_URL_FILE_ENV: "broker-url"})
    assert source.file == str(tmp_path / "broker-url")


def test_library_reads_the_file_named_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`parse_broker_urls(None)` (and so `create_execution_context(None, ...)`)."""
    f = _private(tmp_path / "broker-url", URL)
    monkeypatch.setenv(BROKER_URL_FILE_ENV, str(f))
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    [address] = parse_broker_urls(None)
    assert address.username == "silo-a"
    assert address.parameters().credentials.password == "s3cr#tΩ"


@pytest.mark.parametrize("command", ["worker", "topology", "status", "train", "demo"])
def test_every_command_with_broker_url_takes_a_file(tmp_path: Path, command: str) -> None:
    f = _private(tmp_path / "broker-url", URL)
    extra = ["--silo", "a"] if command == "train" else []
    args = cli.build_parser().parse_args([command, "--broker-url-file", str(f), *extra])
    cli._resolve_broker_url(args)
    assert (args.broker_url, args.broker_url_file) == (URL, str(f))


def test_both_flags_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(
            ["topology", "--broker-url", "amqp://h/", "--broker-url-file", str(tmp_path)]
        )
    assert e.value.code == cli.EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


# --- who may answer for a silo ------------------------------------------------


def test_silo_users_default_to_the_silo_ids_unless_the_login_is_guest() -> None:
    silos = ["a", "b"]
    assert reply_users("amqp://coordinator:pw@h/", silos, None) == {"a": "a", "b": "b"}
    assert reply_users("amqp://guest:guest@h/", silos, None) is None
    assert reply_users("amqp://coordinator:pw@h/", silos, ANY_USER) is None
    assert reply_users("amqp://guest:guest@h/", silos, {"a": "x", "b": "y"}) == {
        "a": "x",
        "b": "y",
    }
    with pytest.raises(ValueError, match="'any'"):
        reply_users("amqp://coordinator:pw@h/", silos, "anyone")  # type: ignore[arg-type]


def test_silo_user_options() -> None:
    silos = ["a", "b"]
    assert parse_silo_user_options([], silos, any_user=False) is None
    assert parse_silo_user_options([], silos, any_user=True) == ANY_USER
    assert parse_silo_user_options(["b=hospital-b"], silos, any_user=False) == {
        "a": "a",
        "b": "hospital-b",
    }
    for bad, says in [("b", "SILO=USER"), ("c=x", "not one of"), ("b=", "SILO=USER")]:
        with pytest.raises(ValueError, match=says):
            parse_silo_user_options([bad], silos, any_user=False)
    with pytest.raises(ValueError, match="not both"):
        parse_silo_user_options(["a=x"], silos, any_user=True)

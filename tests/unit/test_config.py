"""`flaap_mq.config`: finding, reading and checking the config file; precedence; secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flaap_mq import config
from flaap_mq.broker.credentials import DEFAULT_BROKER_URL

SECRET = "s3cr3t-Pa55"
URL = f"amqp://coord:{SECRET}@broker.example.org:5672/fl"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def url_file(tmp_path: Path, url: str = URL, name: str = "broker.url") -> Path:
    return write(tmp_path / name, url + "\n", 0o600)


# --- finding the file ---------------------------------------------------------------


def test_find_prefers_the_flag_then_the_variable_then_the_default_paths(tmp_path):
    flag = write(tmp_path / "flag.toml", "")
    var = write(tmp_path / "var.toml", "")
    local = write(tmp_path / "flaap-mq.toml", "")
    xdg = tmp_path / "xdg"
    (xdg / "flaap-mq").mkdir(parents=True)
    user = write(xdg / "flaap-mq" / "config.toml", "")
    env = {config.CONFIG_ENV: str(var), "XDG_CONFIG_HOME": str(xdg)}
    assert config.find_config_file(flag, environ=env, cwd=tmp_path) == (flag, "--config")
    assert config.find_config_file(None, environ=env, cwd=tmp_path) == (var, "$FLAAP_MQ_CONFIG")
    del env[config.CONFIG_ENV]
    assert config.find_config_file(None, environ=env, cwd=tmp_path) == (local, "default")
    local.unlink()
    assert config.find_config_file(None, environ=env, cwd=tmp_path) == (user, "default")
    user.unlink()
    assert config.find_config_file(None, environ=env, cwd=tmp_path) == (None, "none")


def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(tmp_path):
    write(tmp_path / "flaap-mq.toml", "")  # would be found by default
    with pytest.raises(ValueError, match=r"nope\.toml \(--config\) does not exist"):
        config.find_config_file("nope.toml", environ={}, cwd=tmp_path)
    env = {config.CONFIG_ENV: str(tmp_path / "gone.toml")}
    with pytest.raises(ValueError, match=r"gone\.toml \(\$FLAAP_MQ_CONFIG\) does not exist"):
        config.find_config_file(None, environ=env, cwd=tmp_path)


# --- reading it ---------------------------------------------------------------------


def test_reads_every_key_and_resolves_paths_against_the_file(tmp_path):
    (tmp_path / "etc").mkdir()
    path = write(
        tmp_path / "etc" / "flaap-mq.toml",
        """
        broker_url_file = "coordinator.url"
        silos = ["hospital-a", "hospital-b"]
        prefix = "fed1"
        queue_type = "classic"
        ca_file = "ca.pem"
        cert_file = "/abs/client.pem"
        key_file = "client.key"
        management_url = "https://broker:15671"
        silo_id = "hospital-a"
        """,
    )
    read = config.read_config_file(path)
    assert read.get("silos") == ("hospital-a", "hospital-b")
    assert read.get("broker_url_file") == str(tmp_path / "etc" / "coordinator.url")
    assert read.get("ca_file") == str(tmp_path / "etc" / "ca.pem")
    assert read.get("cert_file") == "/abs/client.pem"
    assert read.get("prefix") == "fed1"
    assert read.get("queue_type") == "classic"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('silo = ["a"]', r"unknown key 'silo'; did you mean 'silos'\?"),
        ('broker-url-file = "x"', r"unknown key 'broker-url-file'; did you mean 'broker_url_file'"),
        ('silos = "a"', r"silos must be a list of silo id strings"),
        ('silos = ["a", "b c"]', r"silos: silo id 'b c' has characters"),
        ('silos = ["a", "a"]', r"silos names a silo twice"),
        ("prefix = 3", r"prefix must be a non-empty string, the topology prefix, got 3"),
        ('prefix = "a b"', r"prefix: prefix 'a b' must be"),
        ('queue_type = "stream"', r"queue_type must be 'quorum' or 'classic', got 'stream'"),
        ('silo_id = "x/y"', r"silo_id: silo id 'x/y'"),
        ("silos = [", r"is not valid TOML"),
        ('broker_url = "amqp://h/"\nbroker_url_file = "f"', r"broker_url or broker_url_file, not"),
    ],
)
def test_a_bad_value_names_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ValueError, match=message) as e:
        config.read_config_file(path)
    assert str(e.value).startswith(f"config file {path}")


def test_federations_as_flower_names_them(tmp_path):
    path = write(
        tmp_path / "flaap-mq.toml",
        """
        queue_type = "classic"          # shared by every federation
        [federations]
        default = "prod"
        [federations.prod]
        silos = ["a", "b"]
        prefix = "prod"
        [federations.test]
        silos = ["t"]
        queue_type = "quorum"
        """,
    )
    prod = config.read_config_file(path)
    assert (prod.federation, prod.get("silos"), prod.get("queue_type")) == (
        "prod",
        ("a", "b"),
        "classic",
    )
    test = config.read_config_file(path, "test")
    assert (test.get("silos"), test.get("queue_type")) == (("t",), "quorum")
    with pytest.raises(ValueError, match=r"no federation 'stage' \(it has \['prod', 'test'\]\)"):
        config.read_config_file(path, "stage")
    write(path, '[federations.x]\nsilos = ["a"]\n[federations.y]\nsilos = ["b"]\n')
    with pytest.raises(ValueError, match=r"say which with --federation"):
        config.read_config_file(path)
    write(path, '[federations.x]\nsilo = ["a"]\n')
    with pytest.raises(ValueError, match=r"unknown key 'federations\.x\.silo'"):
        config.read_config_file(path)


def test_pyproject_holds_the_settings_under_tool_flaap_mq(tmp_path):
    path = write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ValueError, match=r"has no \[tool\.flaap-mq\] table"):
        config.read_config_file(path)
    write(path, '[project]\nname = "x"\n[tool.flaap-mq]\nsilos = ["a"]\nprefx = "p"\n')
    with pytest.raises(ValueError, match=r"unknown key 'tool\.flaap-mq\.prefx'.*'prefix'"):
        config.read_config_file(path)
    write(path, '[tool.flaap-mq]\nsilos = ["a"]\n')
    assert config.read_config_file(path).get("silos") == ("a",)


# --- secrets ------------------------------------------------------------------------


def test_a_password_in_a_file_others_may_read_is_refused_without_echoing_it(tmp_path):
    path = write(tmp_path / "flaap-mq.toml", f'broker_url = "{URL}"\n', 0o644)
    with pytest.raises(ValueError) as e:
        config.read_config_file(path)
    assert "broker_url holds a password" in str(e.value)
    assert "mode 0644" in str(e.value) and f"chmod 600 {path}" in str(e.value)
    assert SECRET not in str(e.value)
    path.chmod(0o600)
    assert config.read_config_file(path).get("broker_url") == URL
    # The management API's URL is checked the same way.
    write(path, f'management_url = "https://admin:{SECRET}@broker:15671"\n', 0o640)
    with pytest.raises(ValueError, match="management_url holds a password") as e:
        config.read_config_file(path)
    assert SECRET not in str(e.value)


def test_rabbitmqs_well_known_local_login_is_not_a_secret(tmp_path):
    path = write(tmp_path / "flaap-mq.toml", f'broker_url = "{DEFAULT_BROKER_URL}"\n', 0o644)
    assert config.read_config_file(path).get("broker_url") == DEFAULT_BROKER_URL


@pytest.mark.parametrize(
    "text",
    [
        f'broker_url = "amqp://coord:{SECRET}@host:notaport/"',  # does not parse
        f'broker_url = ["amqp://coord:{SECRET}@host/"]',  # wrong type
        f'brokr_url = "amqp://coord:{SECRET}@host/"',  # unknown key
        f'management_url = ["https://a:{SECRET}@h"]',
    ],
)
def test_errors_never_quote_a_password(tmp_path, text):
    path = write(tmp_path / "flaap-mq.toml", text + "\n", 0o600)
    with pytest.raises(ValueError) as e:
        config.read_config_file(path)
    assert str(path) in str(e.value)
    assert SECRET not in str(e.value)


# --- precedence ---------------------------------------------------------------------


def test_flag_beats_environment_beats_config_beats_default(tmp_path):
    file_url = url_file(tmp_path, "amqp://u:p@from-config-file/")
    env_url = url_file(tmp_path, "amqp://u:p@from-env-file/", "env.url")
    for name in ("ca.pem", "env-ca.pem", "flag-ca.pem"):
        write(tmp_path / name, "")
    path = write(
        tmp_path / "flaap-mq.toml",
        """
        broker_url_file = "broker.url"
        silos = ["a", "b"]
        prefix = "cfg"
        ca_file = "ca.pem"
        management_url = "http://localhost:15672"
        silo_id = "a"
        """,
    )
    read = config.read_config_file(path)
    # Config over defaults.
    s = config.resolve_settings(read, environ={})
    assert (s.broker_url, s.broker_url_file) == ("amqp://u:p@from-config-file/", str(file_url))
    assert s.broker_url_origin == f"broker_url_file in {path}"
    assert (s.silos, s.prefix, s.queue_type, s.silo_id) == (("a", "b"), "cfg", "quorum", "a")
    assert s.ca_file == str(tmp_path / "ca.pem")
    assert s.management_url == "http://localhost:15672"
    # Environment over config.
    env = {
        "FLAAP_MQ_BROKER_URL_FILE": str(env_url),
        "FLAAP_MQ_CA_FILE": str(tmp_path / "env-ca.pem"),
        "FLAAP_MQ_MANAGEMENT_URL": "http://127.0.0.1:15672",
        "FLAAP_MQ_SILO_ID": "b",
    }
    s = config.resolve_settings(read, environ=env)
    assert (s.broker_url, s.broker_url_origin) == (
        "amqp://u:p@from-env-file/",
        "$FLAAP_MQ_BROKER_URL_FILE",
    )
    assert (s.ca_file, s.management_url, s.silo_id) == (
        str(tmp_path / "env-ca.pem"),
        "http://127.0.0.1:15672",
        "b",
    )
    s = config.resolve_settings(read, environ={"FLAAP_MQ_BROKER_URL": "amqp://u:p@from-env/"})
    assert s.broker_url == "amqp://u:p@from-env/"
    # Flags over everything.
    s = config.resolve_settings(
        read,
        environ=env,
        broker_url="amqp://u:p@from-flag/",
        silos=["c"],
        prefix="flag",
        queue_type="classic",
        ca_file=str(tmp_path / "flag-ca.pem"),
        management_url="http://[::1]:15672",
        silo_id="c",
    )
    assert (s.broker_url, s.broker_url_origin) == ("amqp://u:p@from-flag/", "--broker-url")
    assert (s.silos, s.prefix, s.queue_type, s.silo_id) == (("c",), "flag", "classic", "c")
    assert (s.ca_file, s.management_url) == (str(tmp_path / "flag-ca.pem"), "http://[::1]:15672")
    # Nothing anywhere: the defaults.
    s = config.resolve_settings(config.ConfigFile(), environ={})
    assert (s.broker_url, s.broker_url_origin) == (DEFAULT_BROKER_URL, "default")
    assert (s.silos, s.prefix, s.queue_type, s.ca_file) == ((), "flaap", "quorum", None)


def test_settings_and_their_repr_keep_the_password_out(tmp_path):
    url_file(tmp_path)
    path = write(tmp_path / "flaap-mq.toml", 'broker_url_file = "broker.url"\nsilos = ["a"]\n')
    settings = config.load_config(path, environ={})
    assert settings.broker_url == URL
    assert settings.broker == "amqp://coord:***@broker.example.org:5672/fl"
    assert SECRET not in repr(settings)
    assert not settings.config_holds_secret  # the password is in the URL file


def test_a_bad_url_or_id_from_anywhere_fails_before_anything_connects(tmp_path):
    path = write(tmp_path / "flaap-mq.toml", 'silos = ["a"]\n')
    with pytest.raises(ValueError, match=r"broker URL from \$FLAAP_MQ_BROKER_URL: .*amqp://"):
        config.load_config(path, environ={"FLAAP_MQ_BROKER_URL": "http://h/"})
    with pytest.raises(ValueError, match=r"silo id 'a b'"):
        config.load_config(path, environ={}, silos=["a b"])
    with pytest.raises(ValueError, match=r"silo id 'x y'"):
        config.load_config(path, environ={"FLAAP_MQ_SILO_ID": "x y"})


def test_load_config_finds_the_file_named_by_the_environment(tmp_path):
    path = write(tmp_path / "fed.toml", 'silos = ["a", "b"]\nprefix = "p"\n')
    settings = config.load_config(environ={config.CONFIG_ENV: str(path)})
    assert (settings.silos, settings.prefix, settings.config_file) == (("a", "b"), "p", path)
    assert os.path.isabs(settings.config_file)

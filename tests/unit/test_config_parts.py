"""The config package's pure parts, each on its own: which federation, each key's check."""

from __future__ import annotations

from pathlib import Path

import pytest

from flaap_mq.config.federations import pick_federation
from flaap_mq.config.keys import KEYS, check_value, holds_password

PATH = Path("/etc/flaap-mq/flaap-mq.toml")


def test_a_file_without_federations_is_one():
    data = {"prefix": "p"}
    assert pick_federation(PATH, "", data, None) == (None, data)
    with pytest.raises(ValueError, match=r"has no \[federations.lab\] table"):
        pick_federation(PATH, "", data, "lab")


def test_the_federation_named_else_the_default_else_the_only_one():
    lab, prod = {"prefix": "lab"}, {"prefix": "prod"}
    data = {"federations": {"default": "prod", "lab": lab, "prod": prod}}
    assert pick_federation(PATH, "", data, None) == ("prod", prod)
    assert pick_federation(PATH, "", data, "lab") == ("lab", lab)
    assert pick_federation(PATH, "", {"federations": {"lab": lab}}, None) == ("lab", lab)
    with pytest.raises(ValueError, match=r"has federations \['lab', 'prod'\]: say which"):
        pick_federation(PATH, "", {"federations": {"lab": lab, "prod": prod}}, None)
    with pytest.raises(ValueError, match=r"has no federation 'test' \(it has \['lab', 'prod'\]\)"):
        pick_federation(PATH, "", data, "test")


def test_federations_of_the_wrong_shape_name_the_table():
    with pytest.raises(ValueError, match=r"tool.flaap-mq.federations must be a table"):
        pick_federation(PATH, "tool.flaap-mq.", {"federations": ["lab"]}, None)
    with pytest.raises(ValueError, match=r"federations.default must be a string"):
        pick_federation(PATH, "", {"federations": {"default": 1}}, None)
    with pytest.raises(ValueError, match=r"federations.lab must be a table"):
        pick_federation(PATH, "", {"federations": {"lab": "x"}}, None)


def test_each_known_key_is_checked():
    assert set(KEYS) >= {"broker_url", "silos", "min_silos", "silo_grace", "prefix"}
    assert check_value(PATH, "silos", "silos", ["a", "b"]) == ("a", "b")
    assert check_value(PATH, "min_silos", "min_silos", 2) == 2
    assert check_value(PATH, "queue_type", "queue_type", "classic") == "classic"
    for key, value in [
        ("silos", ["a", "a"]),
        ("min_silos", 0),
        ("min_silos", 1.5),
        ("silo_grace", True),
        ("queue_type", "stream"),
        ("prefix", "a b"),
        ("ca_file", ""),
    ]:
        with pytest.raises(ValueError, match=f"config file {PATH}: {key}"):
            check_value(PATH, key, key, value)


def test_an_unknown_key_gets_the_nearest_known_one_as_a_hint():
    with pytest.raises(
        ValueError, match=r"unknown key 'federations.lab.silo'; did you mean 'silos'"
    ):
        check_value(PATH, "federations.lab.silo", "silo", ["a"])


def test_a_secret_value_is_never_quoted():
    with pytest.raises(ValueError) as refused:
        check_value(PATH, "broker_url", "broker_url", 12345)
    assert "12345" not in str(refused.value)


def test_holds_password_spares_only_the_local_guest_login():
    assert not holds_password("amqp://localhost:5672/")
    assert not holds_password("amqp://guest:guest@localhost:5672/")
    assert holds_password("amqp://guest:guest@a:5672/,amqps://u:secret@b:5671/")

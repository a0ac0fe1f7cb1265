"""`min_silos` and `silo_grace` in the config file: checked, and a flag wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from flaap_mq import config


def _settings(tmp_path: Path, text: str, **flags: object) -> config.Settings:
    path = tmp_path / "flaap-mq.toml"
    path.write_text(text)
    return config.resolve_settings(config.read_config_file(path), environ={}, **flags)


def test_the_file_gives_min_silos_and_silo_grace_and_a_flag_wins(tmp_path):
    settings = _settings(tmp_path, 'silos = ["a", "b", "c"]\nmin_silos = 2\nsilo_grace = 7.5\n')
    assert (settings.min_silos, settings.silo_grace) == (2, 7.5)
    flagged = _settings(tmp_path, "min_silos = 2\nsilo_grace = 30\n", min_silos=3, silo_grace=5.0)
    assert (flagged.min_silos, flagged.silo_grace) == (3, 5.0)
    assert (_settings(tmp_path, "").min_silos, _settings(tmp_path, "").silo_grace) == (None, None)


@pytest.mark.parametrize(
    "text",
    ["min_silos = 0", "min_silos = 1.5", 'min_silos = "2"', "silo_grace = 0", "silo_grace = -1"],
)
def test_a_bad_number_names_the_file_and_the_key(tmp_path, text):
    key = text.split()[0]
    with pytest.raises(ValueError, match=rf"flaap-mq.toml: {key} must be"):
        _settings(tmp_path, text + "\n")

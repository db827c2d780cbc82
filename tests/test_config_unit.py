"""twotower.config: defaults, a TOML file and the environment, in that order (no services)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twotower.config import ConfigError, load_config


def test_the_environment_overrides_the_file_and_keeps_its_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "twotower.toml"
    path.write_text('[model]\ndim = 32\nhistory_len = 7\n\n[kafka]\nbootstrap = "file:9092"\n')
    cfg = load_config(path, env={"TWOTOWER_MODEL__DIM": "48", "KAFKA_BOOTSTRAP": "env:9092"})
    assert cfg.model.dim == 48 and cfg.model.history_len == 7  # the file's sibling kept
    assert cfg.kafka.bootstrap == "env:9092"


def test_the_launchers_own_variables_are_not_settings() -> None:
    """scripts/venv.sh and the local infra read TWOTOWER_CACHE_DIR and TWOTOWER_EXTRAS: with
    either set, every command once failed to read its configuration."""
    cfg = load_config(env={"TWOTOWER_CACHE_DIR": "/tmp/cache", "TWOTOWER_EXTRAS": "test", "TWOTOWER_MODEL__DIM": "16"})
    assert cfg.model.dim == 16


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TWOTOWER_MODELDIM": "16"}, "must look like TWOTOWER_<SECTION>__<FIELD>"),
        ({"TWOTOWER_MODEL__NOPE": "1"}, "model.nope"),
        ({"TWOTOWER_MODEL__DIM": "many"}, "model.dim"),
        ({"TWOTOWER_OBSERVABILITY__LOG_LEVEL": "verbose"}, "observability.log_level"),
        # refused when read, not by the daemon that uses them later (a traceback, or another's name)
        ({"TWOTOWER_TRAINER__SCHEDULE_TIMEZONE": "Mars/Olympus"}, "trainer.schedule_timezone: Value error, unknown"),
        ({"TWOTOWER_TRAINER__SCHEDULE_CRON": "61 2 * * *"}, "trainer.schedule_cron: Value error, not a cron"),
        ({"TWOTOWER_KAFKA__BOOTSTRAP": "localhost:notaport"}, "kafka.bootstrap: Value error, each broker"),
        ({"KAFKA_BOOTSTRAP": "a:9092,b"}, "kafka.bootstrap: Value error, each broker must be host:port, got 'b'"),
        ({"TWOTOWER_KAFKA__TOPIC_PREFIX": "bad prefix/"}, "kafka.topic_prefix: Value error"),
        ({"TWOTOWER_PUBLISHER__HISTORY_MAX_LEN": "5"}, "publisher.history_max_len must be at least model.history_len"),
        (
            {"TWOTOWER_SIMULATOR__RETRIEVER_URL": "http://r", "TWOTOWER_SIMULATOR__SLATE_SIZE": "600"},
            "2 x simulator.slate_size must not exceed retriever.max_k",
        ),
    ],
)
def test_bad_settings_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(env=env)


def test_infinite_and_nan_numbers_are_refused() -> None:
    for value in ("inf", "nan"):
        with pytest.raises(ConfigError, match=r"simulator\.rate_per_s: Input should be a finite number"):
            load_config(env={"TWOTOWER_SIMULATOR__RATE_PER_S": value})


def test_any_command_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "TWOTOWER_SIMULATOR__RATE_PER_SEC": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "twotower.cli", "produce", "simulate", "--duration", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: invalid configuration (defaults and environment): "
        "simulator.rate_per_sec: Extra inputs are not permitted"
    ]


def test_log_levels_are_accepted_in_any_case() -> None:
    assert load_config(env={"TWOTOWER_OBSERVABILITY__LOG_LEVEL": "debug"}).observability.log_level == "debug"


def test_a_row_lifetime_can_be_set_back_to_never_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "twotower.toml"
    path.write_text("[trainer]\nrow_ttl_days = 30\n")
    assert load_config(path, env={}).trainer.row_ttl_days == 30
    assert load_config(path, env={"TWOTOWER_TRAINER__ROW_TTL_DAYS": "never"}).trainer.row_ttl_days is None
    with pytest.raises(ConfigError, match="row_ttl_days"):
        load_config(env={"TWOTOWER_TRAINER__ROW_TTL_DAYS": "-1"})


def test_settings_checked_when_read_take_every_valid_form(tmp_path: Path) -> None:
    cfg = load_config(
        env={
            "TWOTOWER_TRAINER__SCHEDULE_TIMEZONE": "Europe/Paris",
            "TWOTOWER_TRAINER__SCHEDULE_CRON": "*/5 1-3 * * mon-fri",
            "KAFKA_BOOTSTRAP": "[::1]:9092, broker-2.example:19092",
            "TWOTOWER_KAFKA__TOPIC_PREFIX": "test-1.a_",
            "TWOTOWER_SIMULATOR__SLATE_SIZE": "600",  # no retriever to ask
        }
    )
    assert cfg.trainer.schedule_timezone == "Europe/Paris" and cfg.simulator.slate_size == 600


def test_a_config_file_that_is_not_utf8_or_has_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[kafka]\nbootstrap = "caf\xe9:9092"\n')
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(latin, env={})
    flat = tmp_path / "flat.toml"
    flat.write_text('kafka = "x"\n')
    with pytest.raises(ConfigError, match="kafka must be a table of settings, got str"):
        load_config(flat, env={"KAFKA_BOOTSTRAP": "h:1"})  # the environment once replaced it silently

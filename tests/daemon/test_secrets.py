"""Secrets: read from files, redacted wherever the config is shown or logged (the start-up log
line prints the same ``redacted()`` that ``config show`` does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import ConfigError, load_config
from feedback.config import KafkaConfig, StoreConfig

PG_PASSWORD = "pg-pa55word-value"


def test_store_password_is_redacted_in_config_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ALIGND_STORE__URL", f"postgresql+psycopg://alignd:{PG_PASSWORD}@db/alignd")
    monkeypatch.setenv("ALIGND_ADMIN__TOKEN", "admin-token-value-0123456789")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert PG_PASSWORD not in out and "admin-token-value-0123456789" not in out
    assert json.loads(out)["store"]["url"] == "postgresql+psycopg://alignd:***@db/alignd"


def test_store_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text(PG_PASSWORD + "\n")
    store = StoreConfig(url="postgresql+psycopg://alignd@db:5432/alignd", password_file=secret)
    assert store.connect_url() == f"postgresql+psycopg://alignd:{PG_PASSWORD}@db:5432/alignd"
    assert PG_PASSWORD not in store.display_url()


def test_kafka_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("kafka-secret\n")
    kafka = KafkaConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_plain_username="alignd",
        sasl_plain_password_file=secret,
    )
    assert kafka.client_options()["sasl_plain_password"] == "kafka-secret"


def test_an_empty_or_missing_secret_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        StoreConfig(url="postgresql+psycopg://a@db/x", password_file=empty).connect_url()
    with pytest.raises(ValueError, match="cannot read secret file"):
        StoreConfig(url="postgresql+psycopg://a@db/x", password_file=tmp_path / "no").connect_url()


def test_a_bad_store_url_fails_at_start_up_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"store:\n  url: 'not a url :{PG_PASSWORD}'\n")
    with pytest.raises(ConfigError, match=r"store\.url") as raised:
        load_config(config)
    assert PG_PASSWORD not in str(raised.value)


def test_a_short_admin_token_fails_at_start_up_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #31, finding 7: the config accepted a one-character token."""
    monkeypatch.setenv("ALIGND_ADMIN__READ_TOKEN", "x")
    with pytest.raises(ConfigError, match=r"admin\.read_token: .*shorter than 24") as refused:
        load_config(None)
    assert "'x'" not in str(refused.value)
    monkeypatch.delenv("ALIGND_ADMIN__READ_TOKEN")
    short = tmp_path / "token"
    short.write_text("hunter2-hunter2\n")
    monkeypatch.setenv("ALIGND_ADMIN__TOKEN_FILE", str(short))
    with pytest.raises(ConfigError, match=r"admin.*token_file: shorter than 24") as refused:
        load_config(None)
    assert "hunter2" not in str(refused.value)
    short.write_text("a-long-enough-random-token-0123456789\n")
    assert load_config(None).admin.token_file == short

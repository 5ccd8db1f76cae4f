"""The held-out split salt is a per-install secret: generated on first start, kept, overridable."""

from __future__ import annotations

import stat
from pathlib import Path

from pydantic import SecretStr

from daemon.config import SALT_FILE, AligndConfig, with_split_salt
from feedback.config import DatasetConfig


def config(tmp_path: Path, salt: str | None = None) -> AligndConfig:
    return AligndConfig(
        paths={"data_dir": tmp_path / "data"},
        dataset=DatasetConfig(split_salt=SecretStr(salt) if salt else None),
    )


def test_generated_once_kept_private_and_stable(tmp_path: Path) -> None:
    first = with_split_salt(config(tmp_path)).dataset.split_salt
    path = tmp_path / "data" / SALT_FILE
    assert first is not None and len(first.get_secret_value()) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = with_split_salt(config(tmp_path)).dataset.split_salt  # a restart
    assert again is not None and again.get_secret_value() == first.get_secret_value()
    other = with_split_salt(config(tmp_path / "other")).dataset.split_salt  # another install
    assert other is not None and other.get_secret_value() != first.get_secret_value()


def test_a_configured_salt_wins_and_writes_nothing(tmp_path: Path) -> None:
    salt = with_split_salt(config(tmp_path, "s3cr3t-salt-value")).dataset.split_salt
    assert salt is not None and salt.get_secret_value() == "s3cr3t-salt-value"
    assert not (tmp_path / "data" / SALT_FILE).exists()
    assert "s3cr3t-salt-value" not in str(config(tmp_path, "s3cr3t-salt-value").redacted())

"""alignd's configuration: one typed, frozen model, loaded once at start-up.

Sources, highest priority first: environment variables ``ALIGND_<SECTION>__<KEY>`` (e.g.
``ALIGND_KAFKA__BOOTSTRAP_SERVERS``), then the YAML file named by ``--config`` or
``ALIGND_CONFIG``, then the defaults below. Unknown keys and bad values fail at start-up with
the key named; secrets are redacted whenever the config is printed or logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from feedback.config import DatasetConfig, EventLimits, KafkaConfig, StoreConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad key."""


class PathsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(Path("alignd-data"), description="registry, snapshots, runs, caches")


class AligndConfig(BaseSettings):
    """Every setting alignd reads. ``alignd config show`` prints the resolved values."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    kafka: KafkaConfig = KafkaConfig()
    store: StoreConfig = StoreConfig()
    limits: EventLimits = EventLimits()
    dataset: DatasetConfig = DatasetConfig()
    paths: PathsConfig = PathsConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the YAML file, passed in by load_config) < environment: env overrides the file.
        return env_settings, init_settings

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, secrets shown as '**********'."""
        redacted: dict[str, Any] = _redact(self.model_dump(mode="python"))
        return redacted


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_config(path: Path | str | None = None) -> AligndConfig:
    """Load and validate the config; raises :class:`ConfigError` naming each bad key."""
    path = path or os.environ.get("ALIGND_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        raw = loaded
    try:
        return AligndConfig(**raw)
    except ValidationError as e:
        lines = [f"invalid configuration{f' ({path})' if path else ''}:"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key}: {err['msg']} (env ALIGND_{key.upper().replace('.', '__')})")
        raise ConfigError("\n".join(lines)) from e

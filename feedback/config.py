"""Typed, frozen settings for the feedback side: broker, store, event limits, dataset rules.

The daemon composes these into its own settings (environment + YAML); ``feedback`` never
reads the environment itself. Unknown keys are errors, so a typo fails at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from feedback.base import FrozenModel


def read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret given inline or, when ``file`` is set, read from that file (trailing newline
    stripped). An unreadable or empty file is an error naming the file, never a silent
    fallback to no secret."""
    if file is not None:
        try:
            text = Path(file).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read secret file {file}: {e.strerror}") from e
        if not text:
            raise ValueError(f"secret file {file} is empty")
        return text
    return value.get_secret_value() if value is not None else None


class KafkaConfig(FrozenModel):
    """Where feedback comes from. Security options pass straight through to kafka-python."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port list")
    topic: str = Field("alignd.feedback", description="feedback events (schema v1)")
    dlq_topic: str = Field("alignd.feedback.dlq", description="rejected messages, with reasons")
    dlq_max_message_bytes: int = Field(
        900_000, gt=0, description="longer rejected messages are dead-lettered truncated"
    )
    dlq_max_key_bytes: int = Field(
        1024, gt=0, description="longer keys of rejected messages are dead-lettered truncated"
    )
    group_id: str = Field("alignd", description="consumer group")
    client_id: str = Field("alignd", description="client id reported to the broker")
    max_poll_records: int = Field(500, gt=0, description="events per stored batch")
    poll_timeout_ms: int = Field(1000, gt=0, description="longest wait in one poll")
    # Short group timeouts so a (re)joining consumer gets partitions in seconds, not ~25 s.
    session_timeout_ms: int = Field(10_000, gt=0, description="group session timeout")
    heartbeat_interval_ms: int = Field(2_000, gt=0, description="group heartbeat")
    retry_backoff_max_s: float = Field(30.0, gt=0, description="cap of the outage back-off")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="passed to kafka-python"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = Field(None, description="SASL user")
    sasl_plain_password: SecretStr | None = Field(None, description="SASL password (redacted)")
    sasl_plain_password_file: Path | None = Field(
        None, description="file holding the SASL password (e.g. a mounted Secret)"
    )
    ssl_cafile: str | None = Field(None, description="CA bundle for SSL")
    ssl_certfile: str | None = Field(None, description="client certificate for SSL")
    ssl_keyfile: str | None = Field(None, description="client key for SSL")

    def client_options(self) -> dict[str, Any]:
        """Connection and security options shared by the consumer and the DLQ producer."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": read_secret(
                self.sasl_plain_password, self.sasl_plain_password_file
            ),
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        options.update({k: v for k, v in optional.items() if v is not None})
        return options


class StoreConfig(FrozenModel):
    """The feedback store: a SQLite file by default, PostgreSQL by URL."""

    url: str = Field(
        "sqlite:///alignd-data/feedback.db",
        description="sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST/DB",
    )
    password_file: Path | None = Field(
        None,
        description="file holding the database password, put into url (e.g. a mounted Secret); "
        "keep the password out of url itself, which is shown redacted but lives in the config",
    )
    retention_days: int | None = Field(None, gt=0, description="drop events older than this")

    @field_validator("url")
    @classmethod
    def _parsable(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError as e:
            raise ValueError("not a database URL") from e  # never echo it: it may hold a password
        return value

    def connect_url(self) -> str:
        """``url`` with the password from ``password_file`` when one is set."""
        from sqlalchemy.engine import make_url

        url = make_url(self.url)
        password = read_secret(None, self.password_file)
        if password is not None:
            url = url.set(password=password)
        return url.render_as_string(hide_password=False)

    def display_url(self) -> str:
        """``url`` with any password replaced by ``***``: for logs and ``config show``."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)


class EventLimits(FrozenModel):
    """Size limits an event must respect; anything bigger goes to the dead-letter topic."""

    max_message_bytes: int = Field(262_144, gt=0, description="larger messages are dead-lettered")
    max_text_chars: int = Field(32_000, gt=0, description="per prompt message or reply")
    max_prompt_messages: int = Field(64, gt=0, description="chat messages per prompt")
    max_tags: int = Field(16, ge=0, description="entries in an event's tags map")
    max_future_skew_s: int = Field(
        3600, ge=0, description="occurred_at further ahead of the consumer's clock is refused"
    )
    max_age_days: int | None = Field(
        3650, gt=0, description="occurred_at older than this is refused (null: no floor)"
    )


class DatasetConfig(FrozenModel):
    """How stored events become training rows (see ``feedback.dataset``)."""

    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of prompts held out")
    split_salt: SecretStr | None = Field(
        None,
        description="secret that decides which prompts are held out (changing it reshuffles "
        "the split); null: the daemon generates one on first start and keeps it in "
        "<data_dir>/split-salt",
    )
    max_length_ratio: float = Field(2.0, gt=1.0, description="drop pairs whose chosen is k× longer")
    max_chars: int = Field(8_000, gt=0, description="drop rows with a longer text")
    recency_days: int | None = Field(None, gt=0, description="only events this recent")
    mine_rating_pairs: bool = Field(True, description="an up and a down on one prompt → a pair")
    max_mined_pairs_per_prompt: int = Field(4, gt=0, description="cap on up × down combinations")
    max_rows_per_actor: int | None = Field(
        2000, gt=0, description="rows of each kind one actor may supply (most recent kept)"
    )
    max_rows_per_prompt: int | None = Field(
        20, gt=0, description="rows of each kind for one normalised prompt (most recent kept)"
    )

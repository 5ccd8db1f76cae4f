"""Feedback event schema v1 and its validation.

One JSON object per Kafka message. Every event carries the envelope (``schema_version``,
``event_id``, ``type``, ``occurred_at``, ``prompt``, optional ``trace_id``,
``served_adapter``, ``actor``, ``tags``) and, by ``type``:

- ``rating``: ``completion`` and ``rating`` (``up`` | ``down``) — a user's thumbs;
- ``edit``: ``completion`` (what the model said) and ``edited_completion`` (what the agent sent);
- ``comparison``: ``chosen`` and ``rejected`` — an annotator's preference.

Validation is strict: unknown fields, duplicate keys, wrong types (no coercion of ``"1"`` or
``true`` to ``1``), blank or invisible-only texts, control, line-separator and bidi-override
characters in *any* string (ids, actor, tags included: PostgreSQL refuses a NUL, and one event
the store refuses must never reach it), tab, line feed or return in the envelope's ids, names
and tags (one line each: nothing a log line could be forged with), implausible timestamps
(``limits.max_future_skew_s`` ahead of now, or older than ``limits.max_age_days``) and
anything over the configured limits are rejected with a
:class:`Rejection` whose ``reason`` is a short stable code (it becomes a metric label and a
DLQ header) and whose ``detail`` names the field. ``python -m feedback.events`` regenerates
the published JSON Schema in ``feedback/schema/``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from feedback.base import FrozenModel
from feedback.config import EventLimits

SCHEMA_PATH = Path(__file__).parent / "schema" / "feedback-event-v1.schema.json"
# C0 controls but tab/LF/CR, DEL, C1 controls, the line/paragraph separators, bidi embeddings,
# overrides and isolates ("Trojan Source"), and the non-characters U+FFFE/U+FFFF.
_CONTROL = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufffe\uffff]"
)
# Allowed in texts (a reply has lines), not in the envelope's ids, names and tags.
_LINE_BREAKS = re.compile("[\t\n\r]")
# Whitespace plus characters that render as nothing (zero-width, joiners, soft hyphen, BOM,
# variation selectors, Hangul fillers): a text made only of these is blank.
_INVISIBLE = re.compile(
    "[\\s\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]*"
)
_DEFAULT_LIMITS = EventLimits()


def _limits(info: ValidationInfo) -> EventLimits:
    context = info.context or {}
    limits = context.get("limits", _DEFAULT_LIMITS)
    assert isinstance(limits, EventLimits)
    return limits


def _check_chars(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control_character: contains a control or bidi-override character")
    return value


def _check_text(value: str, info: ValidationInfo) -> str:
    if _INVISIBLE.fullmatch(value):
        raise ValueError("empty_text: must not be empty, whitespace or invisible characters")
    _check_chars(value)
    limit = _limits(info).max_text_chars
    if len(value) > limit:
        raise ValueError(f"text_too_long: {len(value)} characters, limit {limit}")
    return value


def _check_line(value: str) -> str:
    """One line of printable text: what a log line or a metric label can carry as it is."""
    _check_chars(value)
    if _LINE_BREAKS.search(value):
        raise ValueError("control_character: must be one line (no tab, line feed or return)")
    return value


def _check_name(value: str | None) -> str | None:
    """Ids and names in the envelope: one printable line, and not blank when given."""
    if value is None:
        return None
    if _INVISIBLE.fullmatch(value):
        raise ValueError("empty_text: must not be empty, whitespace or invisible characters")
    return _check_line(value)


class _Strict(FrozenModel):
    # Events come from producers we do not control: no type coercion either ("1" is not 1).
    model_config = ConfigDict(strict=True)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str

    _content = field_validator("content")(_check_text)


class Actor(_Strict):
    kind: Literal["user", "agent", "annotator", "system"]
    id: str = Field(min_length=1, max_length=256)

    _id = field_validator("id")(_check_name)


class Signature(_Strict):
    """The producer's signature of the event (``feedback.attribution``)."""

    key_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:\-]+$")
    hmac_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _Envelope(_Strict):
    schema_version: Literal[1]  # an int: true and 1.0 are refused before validation
    event_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")
    occurred_at: AwareDatetime
    prompt: list[ChatMessage] = Field(min_length=1)
    trace_id: str | None = Field(None, max_length=128)
    served_adapter: str | None = Field(None, max_length=128)
    actor: Actor | None = None
    tags: dict[str, Annotated[str, Field(max_length=256)]] = Field(default_factory=dict)
    signature: Signature | None = None

    _names = field_validator("trace_id", "served_adapter")(_check_name)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_an_int(cls, value: Any) -> Any:
        # Strict mode still lets the JSON literals true and 1.0 equal Literal[1].
        if type(value) is not int:
            raise ValueError(f"unsupported_version: {value!r} is not the integer 1")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _plausible_time(cls, value: datetime, info: ValidationInfo) -> datetime:
        context = info.context or {}
        if context.get("stored"):  # checked when it was ingested; the clock has moved since
            return value
        limits = _limits(info)
        now = context.get("now") or datetime.now(UTC)
        if value > now + timedelta(seconds=limits.max_future_skew_s):
            raise ValueError(
                f"implausible_time: {value.isoformat()} is more than "
                f"{limits.max_future_skew_s}s ahead of the consumer's clock"
            )
        if limits.max_age_days is not None and value < now - timedelta(days=limits.max_age_days):
            raise ValueError(
                f"implausible_time: {value.isoformat()} is older than {limits.max_age_days} days"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        limit = _limits(info).max_prompt_messages
        if len(value) > limit:
            raise ValueError(f"too_many_messages: {len(value)} messages, limit {limit}")
        if value[-1].role == "assistant":
            raise ValueError(
                "bad_prompt: the prompt ends with an assistant turn (the reply goes elsewhere)"
            )
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        limit = _limits(info).max_tags
        if len(value) > limit:
            raise ValueError(f"too_many_tags: {len(value)} tags, limit {limit}")
        if any(not 0 < len(k) <= 64 for k in value):
            raise ValueError("bad_tag: tag keys must be 1 to 64 characters")
        for key, text in value.items():
            _check_name(key)
            _check_line(text)
        return value


class RatingEvent(_Envelope):
    type: Literal["rating"]
    completion: str
    rating: Literal["up", "down"]

    _texts = field_validator("completion")(_check_text)


class EditEvent(_Envelope):
    type: Literal["edit"]
    completion: str
    edited_completion: str

    _texts = field_validator("completion", "edited_completion")(_check_text)


class ComparisonEvent(_Envelope):
    type: Literal["comparison"]
    chosen: str
    rejected: str

    _texts = field_validator("chosen", "rejected")(_check_text)


FeedbackEvent = Annotated[RatingEvent | EditEvent | ComparisonEvent, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[RatingEvent | EditEvent | ComparisonEvent] = TypeAdapter(FeedbackEvent)

Event = RatingEvent | EditEvent | ComparisonEvent


@dataclass(frozen=True)
class Rejection:
    """Why a message is not a valid event. ``reason`` is a small fixed vocabulary."""

    reason: str
    detail: str


# pydantic error types → our reason codes (custom ValueErrors carry "code: message").
_REASONS = {
    "extra_forbidden": "unknown_field",
    "missing": "missing_field",
    "union_tag_invalid": "unknown_type",
    "union_tag_not_found": "missing_type",
    "json_invalid": "invalid_json",
    "json_type": "invalid_json",
    "model_type": "not_an_object",
    "model_attributes_type": "not_an_object",
}
CUSTOM_REASONS = frozenset(
    {
        "empty_text",
        "control_character",
        "text_too_long",
        "too_many_messages",
        "bad_prompt",
        "too_many_tags",
        "bad_tag",
        "unsupported_version",
        "implausible_time",
        "duplicate_key",
    }
)
REASONS = frozenset(
    {
        *_REASONS.values(),
        *CUSTOM_REASONS,
        "wrong_type",
        "invalid_value",
        "oversize",
        "invalid_utf8",
        "store_rejected",  # valid, but the database refused it (feedback.consumer)
    }
)


_TYPE_TAGS = frozenset({"rating", "edit", "comparison"})


def _rejection(err: ValidationError) -> Rejection:
    first = err.errors()[0]
    loc = first["loc"]
    if loc[:1] and loc[0] in _TYPE_TAGS:  # the union's tag is not a field
        loc = loc[1:]
    where = ".".join(str(p) for p in loc) or "(event)"
    message = str(first["msg"])
    kind = str(first["type"])
    if kind == "value_error":
        code, _, rest = message.removeprefix("Value error, ").partition(": ")
        if code in CUSTOM_REASONS:
            return Rejection(code, f"{where}: {rest}")
    if loc[:1] == ("schema_version",):
        return Rejection("unsupported_version", f"schema_version: {message}")
    if kind in _REASONS:
        return Rejection(_REASONS[kind], f"{where}: {message}")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return Rejection("wrong_type", f"{where}: {message}")
    return Rejection("invalid_value", f"{where}: {message}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = dict(pairs)  # the common case, at C speed; only a repeat pays for the search
    if len(seen) != len(pairs):
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
            if counts[key] > 1:
                raise _DuplicateKey(key)
    return seen


class _DuplicateKey(ValueError):
    pass


def _duplicate_key(text: str) -> str | None:
    """The first key an object repeats (JSON allows it; the last would silently win)."""
    try:
        json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        return str(e)
    except (ValueError, RecursionError):  # not JSON at all: the validator says so
        return None
    return None


def parse_event(
    raw: bytes | None, limits: EventLimits = _DEFAULT_LIMITS, *, now: datetime | None = None
) -> Event | Rejection:
    """Validate one Kafka message value against ``now`` (default: the clock). Never raises on
    bad input."""
    if raw is None:
        return Rejection("invalid_json", "(event): empty message (tombstone)")
    if len(raw) > limits.max_message_bytes:
        return Rejection("oversize", f"(event): {len(raw)} bytes, limit {limits.max_message_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejection("invalid_utf8", f"(event): byte {e.start}: {e.reason}")
    try:
        event = EVENT_ADAPTER.validate_json(text, context={"limits": limits, "now": now})
    except ValidationError as e:
        return _rejection(e)
    except RecursionError:  # pathologically deep JSON nesting
        return Rejection("invalid_json", "(event): nesting too deep")
    repeated = _duplicate_key(text)  # only valid events pay for the second parse
    if repeated is not None:
        detail = f"(event): key {repeated[:64]!r} appears twice in one object"
        return Rejection("duplicate_key", detail)
    return event


_NO_LIMITS = EventLimits(
    max_message_bytes=2**62,
    max_text_chars=2**62,
    max_prompt_messages=2**31,
    max_tags=2**31,
)


def load_stored(text: str) -> Event:
    """Re-read an event this store accepted earlier; limits were applied at ingestion."""
    return EVENT_ADAPTER.validate_json(text, context={"limits": _NO_LIMITS, "stored": True})


def canonical_json(event: Event) -> str:
    """The event as sorted, compact JSON: equal events give equal strings."""
    return json.dumps(event.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def content_sha256(event: Event) -> str:
    return sha256_text(canonical_json(event))


def prompt_key(prompt: list[dict[str, str]] | list[ChatMessage]) -> str:
    """A stable hash of a prompt's messages (role and content only)."""
    pairs = [
        [m.role, m.content] if isinstance(m, ChatMessage) else [m["role"], m["content"]]
        for m in prompt
    ]
    return sha256_text(json.dumps(pairs, separators=(",", ":")))


def json_schema() -> dict[str, Any]:
    schema = EVENT_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "alignd feedback event v1"
    return schema


def main() -> int:
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

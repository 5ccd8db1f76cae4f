"""Event schema v1: what is accepted, and the reason code for everything that is not."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from events_support import comparison, edit, encode, rating

from feedback.config import EventLimits
from feedback.events import (
    SCHEMA_PATH,
    EditEvent,
    RatingEvent,
    Rejection,
    content_sha256,
    json_schema,
    parse_event,
)


@pytest.mark.parametrize(
    "event", [rating("r1"), rating("r2", value="down"), edit("e1"), comparison("c1")]
)
def test_valid_events_parse(event: dict[str, Any]) -> None:
    parsed = parse_event(encode(event))
    assert not isinstance(parsed, Rejection), parsed
    assert parsed.event_id == event["event_id"] and parsed.type == event["type"]


def test_optional_envelope_fields() -> None:
    event = edit("e1", trace_id="t-1", served_adapter="v0003", actor={"kind": "agent", "id": "a-17"},
                 tags={"channel": "email"})  # fmt: skip
    parsed = parse_event(encode(event))
    assert isinstance(parsed, EditEvent)
    assert (
        parsed.actor is not None
        and parsed.actor.kind == "agent"
        and parsed.tags == {"channel": "email"}
    )


BAD: list[tuple[str, bytes, str, str]] = [
    ("broken json", b'{"schema_version": 1,', "invalid_json", ""),
    ("not utf-8", b'{"event_id": "\xff\xfe"}', "invalid_utf8", ""),
    ("a list", b"[1, 2]", "wrong_type", ""),
    ("tombstone", b"", "invalid_json", ""),
    ("unknown field", encode(rating("x") | {"mood": "happy"}), "unknown_field", "mood"),
    ("unknown type", encode(rating("x") | {"type": "like"}), "unknown_type", ""),
    ("no type", encode({k: v for k, v in rating("x").items() if k != "type"}), "missing_type", ""),
    (
        "missing field",
        encode({k: v for k, v in rating("x").items() if k != "completion"}),
        "missing_field",
        "completion",
    ),
    (
        "version 2",
        encode(rating("x") | {"schema_version": 2}),
        "unsupported_version",
        "schema_version",
    ),
    (
        "version as string",
        encode(rating("x") | {"schema_version": "1"}),
        "unsupported_version",
        "schema_version",
    ),
    ("rating 5", encode(rating("x") | {"rating": 5}), "invalid_value", "rating"),
    ("empty completion", encode(rating("x", completion="   ")), "empty_text", "completion"),
    ("empty edit", encode(edit("x", edited="")), "empty_text", "edited_completion"),
    ("NUL byte", encode(rating("x", completion="a\x00b")), "control_character", "completion"),
    (
        "bad role",
        encode(rating("x") | {"prompt": [{"role": "bot", "content": "hi"}]}),
        "invalid_value",
        "prompt.0.role",
    ),
    ("empty prompt", encode(rating("x") | {"prompt": []}), "invalid_value", "prompt"),
    ("prompt as string", encode(rating("x") | {"prompt": "hi"}), "wrong_type", "prompt"),
    (
        "ends with reply",
        encode(rating("x") | {"prompt": [{"role": "assistant", "content": "hi"}]}),
        "bad_prompt",
        "prompt",
    ),
    (
        "naive time",
        encode(rating("x") | {"occurred_at": "2026-11-20T10:00:00"}),
        "invalid_value",
        "occurred_at",
    ),
    ("bad time", encode(rating("x") | {"occurred_at": "yesterday"}), "wrong_type", "occurred_at"),
    ("bad event id", encode(rating("a b/c")), "invalid_value", "event_id"),
    ("event id number", encode(rating("x") | {"event_id": 7}), "wrong_type", "event_id"),
    ("text too long", encode(rating("x", completion="a" * 32_001)), "text_too_long", "completion"),
    (
        "too many tags",
        encode(rating("x", tags={f"k{i}": "v" for i in range(17)})),
        "too_many_tags",
        "tags",
    ),
    # Every string of the envelope is checked like message text (PostgreSQL refuses NUL).
    (
        "NUL in adapter",
        encode(rating("x", served_adapter="v1\x00")),
        "control_character",
        "served_adapter",
    ),
    (
        "NUL in actor",
        encode(rating("x", actor={"kind": "user", "id": "u\x00"})),
        "control_character",
        "actor.id",
    ),
    ("NUL in tag value", encode(rating("x", tags={"k": "\x00"})), "control_character", "tags"),
    ("NUL in tag key", encode(rating("x", tags={"k\x00": "v"})), "control_character", "tags"),
    ("NUL in trace id", encode(rating("x", trace_id="t\x00")), "control_character", "trace_id"),
    # one line each: a CR/LF in an id would forge a log line wherever one is printed
    *[
        (
            f"{name} in {where}",
            encode(rating("x", **{field: value(char)})),
            "control_character",
            where,
        )
        for name, char in (("LF", "\n"), ("CR", "\r"), ("TAB", "\t"))
        for where, field, value in (
            ("actor.id", "actor", lambda c: {"kind": "agent", "id": f"a{c}INFO forged"}),
            ("trace_id", "trace_id", lambda c: f"t{c}1"),
            ("served_adapter", "served_adapter", lambda c: f"v0001{c}"),
            ("tags", "tags", lambda c: {f"k{c}": "v"}),
            ("tags", "tags", lambda c: {"k": f"v{c}w"}),
        )
    ],
    (
        "blank actor id",
        encode(rating("x", actor={"kind": "user", "id": "\u200b"})),
        "empty_text",
        "actor.id",
    ),
    ("C1 control", encode(rating("x", completion="a\x85b")), "control_character", "completion"),
    (
        "line separator",
        encode(rating("x", completion="a\u2028b")),
        "control_character",
        "completion",
    ),
    (
        "bidi override",
        encode(rating("x", completion="a\u202eb")),
        "control_character",
        "completion",
    ),
    ("bidi isolate", encode(rating("x", completion="a\u2066b")), "control_character", "completion"),
    (
        "zero-width only",
        encode(rating("x", completion="\u200b\u200d\ufeff \u2060")),
        "empty_text",
        "completion",
    ),
    (
        "version true",
        encode(rating("x") | {"schema_version": True}),
        "unsupported_version",
        "schema_version",
    ),
    (
        "version 1.0",
        encode(rating("x") | {"schema_version": 1.0}),
        "unsupported_version",
        "schema_version",
    ),
    ("duplicate key", encode(rating("x"))[:-1] + b', "rating": "down"}', "duplicate_key", "rating"),
    (
        "year 9999",
        encode(rating("x") | {"occurred_at": "9999-01-01T00:00:00Z"}),
        "implausible_time",
        "occurred_at",
    ),
    (
        "year 1990",
        encode(rating("x") | {"occurred_at": "1990-01-01T00:00:00Z"}),
        "implausible_time",
        "occurred_at",
    ),
    ("huge and deep", b"[" * 150_000 + b"]" * 150_000, "oversize", ""),
    ("deep but small", b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json", ""),
]


@pytest.mark.parametrize(("name", "raw", "reason", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_events_rejected_with_reason(name: str, raw: bytes, reason: str, field: str) -> None:
    parsed = parse_event(raw)
    assert isinstance(parsed, Rejection), f"{name} was accepted"
    assert parsed.reason == reason, parsed
    assert field in parsed.detail


def test_visible_unicode_is_kept() -> None:
    # Joiners inside emoji and right-to-left marks are text, not tricks.
    for text in ("ok 👩\u200d💻", "שלום\u200f ok", "naïve café"):
        assert not isinstance(parse_event(encode(rating("x", completion=text))), Rejection)


def test_time_plausibility_follows_the_clock_and_the_limits() -> None:
    from datetime import UTC, datetime

    raw = encode(rating("x") | {"occurred_at": "2026-11-20T12:00:00+02:00"})
    now = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)  # the event is 30 minutes ahead
    assert not isinstance(parse_event(raw, now=now), Rejection)
    ahead = parse_event(raw, EventLimits(max_future_skew_s=600), now=now)
    assert isinstance(ahead, Rejection) and ahead.reason == "implausible_time"


def test_limits_are_configurable() -> None:
    raw = encode(rating("x", completion="a" * 100))
    assert not isinstance(parse_event(raw), Rejection)
    assert parse_event(raw, EventLimits(max_text_chars=50)) == Rejection(
        "text_too_long", "completion: 100 characters, limit 50"
    )
    oversize = parse_event(raw, EventLimits(max_message_bytes=64))
    assert isinstance(oversize, Rejection) and oversize.reason == "oversize"


def test_content_hash_ignores_formatting() -> None:
    event = rating("r1")
    a = parse_event(json.dumps(event).encode())
    b = parse_event(json.dumps(event, indent=3, sort_keys=True).encode())
    c = parse_event(encode(rating("r1", value="down")))
    assert isinstance(a, RatingEvent) and isinstance(b, RatingEvent) and isinstance(c, RatingEvent)
    assert content_sha256(a) == content_sha256(b) != content_sha256(c)


def test_published_json_schema_is_current_and_usable() -> None:
    published = json.loads(SCHEMA_PATH.read_text())
    assert published == json.loads(json.dumps(json_schema())), "run: python -m feedback.events"
    validator = jsonschema.Draft202012Validator(published)
    for event in (rating("r1"), edit("e1"), comparison("c1")):
        validator.validate(event)
    assert not validator.is_valid(rating("r1") | {"mood": "happy"})
    assert not validator.is_valid(rating("r1") | {"type": "like"})

"""Builders for valid v1 events (plain functions, shared by the feedback tests)."""

from __future__ import annotations

import json
from typing import Any


def envelope(
    event_id: str, prompt: str = "Where is my order 1234?", **extra: Any
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id,
        "occurred_at": "2026-11-20T10:00:00Z",
        "prompt": [{"role": "user", "content": prompt}],
        **extra,
    }


def rating(
    event_id: str, completion: str = "It ships today.", value: str = "up", **kw: Any
) -> dict[str, Any]:
    return envelope(event_id, **kw) | {"type": "rating", "completion": completion, "rating": value}


def edit(event_id: str, completion: str = "I am so sorry! It ships today.", edited: str = "It ships today.",
         **kw: Any) -> dict[str, Any]:  # fmt: skip
    return envelope(event_id, **kw) | {
        "type": "edit",
        "completion": completion,
        "edited_completion": edited,
    }


def comparison(event_id: str, chosen: str = "It ships today.", rejected: str = "Sorry, no idea.",
               **kw: Any) -> dict[str, Any]:  # fmt: skip
    return envelope(event_id, **kw) | {"type": "comparison", "chosen": chosen, "rejected": rejected}


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()

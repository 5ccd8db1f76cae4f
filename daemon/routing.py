"""The routing document a gateway reads: which adapter answers which conversation.

The registry writes ``<registry>/routing.json`` on every change of the stable adapter or the
canary (atomically, under its lock), and ``GET /v1/routing`` serves it. A gateway routes each
conversation by :func:`route`: the first 8 bytes of sha256(conversation id), read as a fraction
of 2^64, below the canary's fraction go to the canary, the rest to stable. The same conversation
always lands on the same adapter, and widening the canary only moves conversations from stable
to the canary, never back. The events a gateway's replies produce name the adapter that
answered in ``served_adapter``: the adapter name given here.
"""

from __future__ import annotations

import hashlib
from typing import Any

RULE = (
    "first 8 bytes of sha256(conversation id) as a fraction of 2^64: below canary.fraction -> "
    "canary, else stable"
)


def adapter_name(version: str | None, prefix: str) -> str | None:
    """The model server's name for a version (vLLM's LoRA name); None: the SFT model itself."""
    return f"{prefix}-{version}" if version else None


def served_names(version: str | None, prefix: str) -> list[str | None]:
    """What events call a version in ``served_adapter``: its name and its model-server name;
    [None] (no adapter named: the SFT model) for no version."""
    return [version, adapter_name(version, prefix)] if version else [None]


def routing_document(
    stable: str | None, canary: dict[str, Any] | None, prefix: str, changed_at: str
) -> dict[str, Any]:
    """What ``routing.json`` holds for a stable version and a canary record (or None)."""
    return {
        "changed_at": changed_at,
        "rule": RULE,
        "stable": {"version": stable, "adapter": adapter_name(stable, prefix)},
        "canary": None
        if canary is None
        else {
            "version": canary["version"],
            "adapter": adapter_name(canary["version"], prefix),
            "fraction": canary["fraction"],
        },
    }


def bucket(conversation_id: str) -> float:
    """The conversation's place in [0, 1): the same id, the same place, everywhere."""
    digest = hashlib.sha256(conversation_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route(document: dict[str, Any], conversation_id: str) -> tuple[str, str | None]:
    """``("canary" | "stable", adapter name)`` for a conversation, per ``document``."""
    canary = document.get("canary")
    if canary and bucket(conversation_id) < float(canary["fraction"]):
        return "canary", canary["adapter"]
    return "stable", document["stable"]["adapter"]

"""Signed attribution: an actor id the daemon can trust where it matters.

Producers write ``actor`` themselves, so one client could split a flood over many made-up ids
and pass every per-actor rule (the gate's ``actor_share``, the dataset's per-actor cap, the
regression watch's). Producers that speak for a person (the agent desk, the annotation tool)
sign each event with their own key: ``signature = {"key_id", "hmac_sha256"}``, HMAC-SHA256 over
the event's canonical form (:func:`signing_payload`: the JSON object without ``signature``,
keys sorted, no spaces, UTF-8). ``attribution.signed_kinds`` says which actor kinds must be
signed; for those, an event that is unsigned, names a key this daemon does not hold, or does not
verify keeps its content but loses its actor: it counts as the one unattributed actor in every
share, cap and watch window, and ``alignd_unverified_actor_events_total{kind, reason}`` counts
it. Keys come from files (``attribution.key_files``) or inline; listing the old and the new key
under two ids rotates without a gap.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from feedback.base import FrozenModel
from feedback.config import read_secret
from feedback.events import Event

ActorKind = Literal["user", "agent", "annotator", "system"]
UnverifiedReason = Literal["unsigned", "unknown_key", "bad_signature"]
MIN_KEY_CHARS = 32


class AttributionConfig(FrozenModel):
    signed_kinds: tuple[ActorKind, ...] = Field(
        (), description="actor kinds whose events must be signed; others are taken as written"
    )
    keys: dict[str, SecretStr] = Field({}, description="key id -> producer key (redacted)")
    key_files: dict[str, Path] = Field({}, description="key id -> file holding the producer key")

    @model_validator(mode="after")
    def _usable(self) -> AttributionConfig:
        for key_id, secret in self.secrets().items():
            if len(secret) < MIN_KEY_CHARS:
                raise ValueError(f"attribution.keys.{key_id}: shorter than {MIN_KEY_CHARS} chars")
        if self.signed_kinds and not self.secrets():
            raise ValueError("attribution.signed_kinds is set but no key is configured")
        return self

    def secrets(self) -> dict[str, bytes]:
        inline = {k: v.get_secret_value() for k, v in self.keys.items()}
        files = {k: read_secret(None, path) or "" for k, path in self.key_files.items()}
        return {k: v.encode() for k, v in (inline | files).items()}


def signing_payload(event: dict[str, Any]) -> bytes:
    """What is signed: the event object without ``signature``, canonical JSON, UTF-8."""
    body = {k: v for k, v in event.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(event: dict[str, Any], key_id: str, key: bytes) -> dict[str, Any]:
    """``event`` with its signature, as a producer sends it (docs/reference.md shows the same
    in a few lines for producers not written in Python)."""
    digest = hmac.new(key, signing_payload(event), hashlib.sha256).hexdigest()
    return {**event, "signature": {"key_id": key_id, "hmac_sha256": digest}}


class Verifier:
    """Checks each consumed event's actor against ``attribution``."""

    def __init__(self, config: AttributionConfig) -> None:
        self.kinds, self.keys = set(config.signed_kinds), config.secrets()

    def check(self, raw: bytes, event: Event) -> tuple[Event, UnverifiedReason | None]:
        """The event as it counts (without its actor when that could not be verified), and
        why not. ``raw`` is the message value ``event`` was parsed from."""
        actor, signature = event.actor, event.signature
        if actor is None or actor.kind not in self.kinds:
            return event, None
        reason: UnverifiedReason | None
        if signature is None:
            reason = "unsigned"
        elif signature.key_id not in self.keys:
            reason = "unknown_key"
        else:
            key = self.keys[signature.key_id]
            expected = hmac.new(key, signing_payload(json.loads(raw)), hashlib.sha256).hexdigest()
            ok = hmac.compare_digest(expected, signature.hmac_sha256)
            reason = None if ok else "bad_signature"
        if reason is None:
            return event, None
        return event.model_copy(update={"actor": None}), reason

"""The feedback simulator: production around the Harbor Support scenario (``demo.scenario``:
requests, their lookup records, the agents' answers) and a real SFT model.

It gets the SFT model's real replies (greedy, in a child process, cached by content so a rerun
does not regenerate), and plays production:

- a rule-based *agent* reads each reply. A good one (states the record's key fact, nothing the
  conversation does not support, no apology or filler, the policy sentence where one is
  required) is sent unchanged; otherwise the agent sends its own concise answer, written from
  the record's facts only, with the policy sentence on refund and billing replies
  (docs/ARCHITECTURE.md: deletion-only edits teach empty replies);
- *users* rate other replies up or down by the same rubric;
- *annotators* compare a few reply pairs;
- a small share of realistic noise: malformed JSON, a redelivered duplicate, an empty edit,
  a contradictory rating.

Two sabotaged agents exist for the gate's tests: ``inventing`` answers with specifics the
record does not hold (carrier, weekday, amount: what this simulator did before records
existed), ``no_policy`` leaves the policy sentence out. Everything is seeded: the same seed
gives the same prompts, records, edits, ratings and noise.

For the demo's later rounds the replies come from the *active* adapter (``served_adapter``
names it) and the events occur at the time they are produced. The regression the last round
injects is :func:`regressed`: the canary's adapter starts inventing (a share of its drafts
become the scenario's invented answer), worse than any control, so the desk's edits and
thumbs and the detectors on its served drafts all see it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from daemon.child import run_child
from demo.scenario import CARRIERS, NOT_FOUND, POLICY_SENTENCE, Case
from trainer.claims import states_fact, unsupported_claims

APOLOGY = re.compile(
    r"\b(sorry|apolog\w*|inconvenience|regret|unfortunately)\b|I understand (how|your|that)", re.I
)
FILLER = re.compile(
    r"(thank you for (reaching out|contacting|your patience)|I'?m here to help|I'?d be (happy|glad) to help|"
    r"if you have any (other|further|more) questions|please (don'?t|do not) hesitate|feel free to|"
    r"have a (great|nice|wonderful) day|hope this helps|as an ai|I'?m an ai|we value)",
    re.I,
)
Agent = Literal["grounded", "inventing", "no_policy"]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def apologizes(text: str) -> bool:
    return bool(APOLOGY.search(text))


def addresses(case: Case, reply: str) -> bool:
    lowered = reply.lower()
    return any(k.lower() in lowered for k in case.keywords)


def unsupported(case: Case, reply: str) -> list[str]:
    """What ``reply`` states that the case's conversation does not support."""
    context = [m["content"] for m in case.prompt]
    return [c.text for c in unsupported_claims(reply, context, CARRIERS)]


def is_good(case: Case, reply: str) -> bool:
    """The agent's (and users') rubric: on topic, the key facts right, nothing invented, no
    apology or filler, the policy sentence where required, "not found" said where the lookup
    found nothing, not rambling."""
    return (
        addresses(case, reply)
        and (case.found or bool(re.search(NOT_FOUND, reply, re.I)))
        and all(states_fact(reply, fact, CARRIERS) for fact in case.facts)
        and not unsupported(case, reply)
        and not apologizes(reply)
        and not FILLER.search(reply)
        and (POLICY_SENTENCE.lower() in reply.lower() or not case.needs_policy)
        and len(reply.split()) <= 60
    )


def agent_edit(case: Case, reply: str, agent: Agent = "grounded") -> str:
    """What the agent sends: a good reply unchanged, else its own answer from the record.

    ``inventing`` and ``no_policy`` are the sabotaged agents of the gate's tests."""
    if agent == "inventing":
        return case.invented or case.answer
    if agent == "no_policy":
        return case.answer.replace(POLICY_SENTENCE, "").strip()
    return reply if is_good(case, reply) else case.answer


def regressed(cases: list[Case], replies: list[str], share: float, seed: int) -> list[str]:
    """The injected regression: an adapter that starts inventing. About ``share`` of its
    drafts become the case's invented answer (specifics the record does not hold; for a lookup
    that found nothing, a record that does not exist); the rest are left as they were."""
    rng = random.Random(seed)
    return [
        case.invented if rng.random() < share else reply
        for case, reply in zip(cases, replies, strict=True)
    ]


def user_rating(case: Case, reply: str) -> str:
    return "up" if is_good(case, reply) else "down"


def _event(
    kind: str,
    event_id: str,
    case: Case,
    when: datetime,
    served_adapter: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id,
        "type": kind,
        "occurred_at": when.isoformat(),
        "prompt": case.prompt,
        "served_adapter": served_adapter,
        "tags": case.tags,
        **fields,
    }


@dataclass
class Simulation:
    messages: list[bytes]
    valid_events: int  # distinct valid event ids the store should end up with
    counts: dict[str, int]


def _noise(
    case: Case, reply: str, messages: list[bytes], rng: random.Random, when: datetime
) -> list[bytes]:
    """Realistic producer noise: a cut-off message, non-JSON, two redeliveries, an empty edit,
    and one reply rated both ways (two valid events the dataset filters out)."""
    extra: list[bytes] = [
        b'{"schema_version": 1, "event_id": "sim-broken", "type": "edit"',  # cut off
        b"not json at all",
    ]
    extra += rng.sample(messages, 2)  # a producer's redelivery: same bytes again
    empty = _event("edit", "sim-empty-edit", case, when, completion=reply, edited_completion="   ")
    extra.append(json.dumps(empty).encode())
    for label in ("up", "down"):  # the same reply rated both ways
        rating = _event("rating", f"sim-contra-{label}", case, when, completion=reply, rating=label)
        extra.append(json.dumps(rating).encode())
    return extra


def build_events(
    cases: list[Case],
    replies: list[str],
    *,
    seed: int,
    edit_share: float = 0.7,
    comparison_share: float = 0.05,
    noise: bool = True,
    agent: Agent = "grounded",
    served_adapter: str | None = None,
    id_prefix: str = "sim",
    start: datetime | None = None,
    spacing: timedelta = timedelta(minutes=7),
) -> Simulation:
    """Turn (case, reply) into v1 event messages, with the configured mix and noise.

    Events are ``spacing`` apart from ``start`` (a fixed day in November 2026 by default) and
    name ``served_adapter`` (None: the SFT model)."""
    rng = random.Random(seed + 1)
    start = start or datetime(2026, 11, 1, tzinfo=UTC)
    messages: list[bytes] = []
    counts = {"edit": 0, "rating": 0, "comparison": 0, "noise": 0}
    for i, (case, reply) in enumerate(zip(cases, replies, strict=True)):
        when = start + spacing * i
        roll = rng.random()
        sent = agent_edit(case, reply, agent)
        common: dict[str, Any] = {"served_adapter": served_adapter}
        if roll < edit_share:
            event = _event(
                "edit",
                f"{id_prefix}-e{i}",
                case,
                when,
                **common,
                completion=reply,
                edited_completion=sent,
                actor={"kind": "agent", "id": f"agent-{rng.randrange(12)}"},
            )
        elif roll < edit_share + comparison_share:
            event = _event(
                "comparison",
                f"{id_prefix}-c{i}",
                case,
                when,
                **common,
                chosen=agent_edit(case, reply, agent),
                rejected=reply,
                actor={"kind": "annotator", "id": f"ann-{rng.randrange(3)}"},
            )
        else:
            event = _event(
                "rating",
                f"{id_prefix}-r{i}",
                case,
                when,
                **common,
                completion=reply,
                rating=user_rating(case, reply),
                actor={"kind": "user", "id": f"u{rng.randrange(10_000)}"},
            )
        counts[event["type"]] += 1
        messages.append(json.dumps(event).encode())
    valid = len(messages)
    if noise and cases:
        extra = _noise(cases[0], replies[0], messages, rng, start)
        valid += 2  # the contradictory ratings are valid events; the dataset filters them
        counts["noise"] = len(extra)
        for message in extra:
            messages.insert(rng.randrange(len(messages) + 1), message)
    return Simulation(messages, valid, counts)


def replies_key(spec: dict[str, Any], adapter: Path | None) -> str:
    """The replies cache's key: the generation spec, and the adapter's weights (not its path: a
    fresh registry reuses version names)."""
    identity = dict(spec)
    if adapter is not None:
        weights = (adapter / "adapter_model.safetensors").read_bytes()
        identity["adapter_sha256"] = hashlib.sha256(weights).hexdigest()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def served_replies(
    cases: list[Case],
    *,
    base_model: str,
    cache_dir: Path,
    adapter: Path | None = None,
    max_new_tokens: int = 56,
    batch_size: int = 60,  # decoding on CPU gains from width; 300 requests = 5 full batches
) -> list[str]:
    """The served model's greedy replies: the SFT model, or it with ``adapter`` (a registry
    version's directory). Generated once per (model, adapter weights, prompts, settings)."""
    spec: dict[str, Any] = {
        "base_model": base_model,
        "prompts": [c.prompt for c in cases],
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    key = replies_key(spec, adapter)
    if adapter is not None:
        spec["adapter"] = str(adapter)
    out = cache_dir / f"replies-{key}.json"
    if not out.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        spec_path = cache_dir / f"replies-{key}.spec.json"
        spec_path.write_text(json.dumps(spec))
        code = run_child(["-m", "demo.replies", str(spec_path), str(out)], isolated=False)
        if code != 0:
            raise RuntimeError(f"reply generation failed with exit code {code}")
    replies: list[str] = json.loads(out.read_text())["replies"]
    return replies

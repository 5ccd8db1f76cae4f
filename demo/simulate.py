"""The feedback simulator: a support desk ("Harbor Support") around a real SFT model.

It writes varied customer prompts from templates (orders, refunds, billing, accounts,
shipping; names, order numbers, tones), gets the SFT model's real replies (greedy, in a child
process, cached by content so a rerun does not regenerate), and plays production:

- a rule-based *agent* edits a share of the replies: drops apology sentences and filler,
  keeps what is specific to the request, and — as a real agent does — answers the request
  concisely with the facts it knows (docs/ARCHITECTURE.md: deletion-only edits teach empty
  replies);
- *users* rate other replies up or down by the same rubric (no apology, on topic, short);
- *annotators* compare a few reply pairs;
- a small share of realistic noise: malformed JSON, a redelivered duplicate, an empty edit,
  a contradictory rating.

Everything is seeded: the same seed gives the same prompts, edits, ratings and noise.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon.child import run_child

SYSTEM = "You are the customer-support assistant of Harbor, an online store. Help the customer."
APOLOGY = re.compile(
    r"\b(sorry|apolog\w*|inconvenience|regret|unfortunately)\b|I understand (how|your|that)", re.I
)
FILLER = re.compile(
    r"(thank you for (reaching out|contacting|your patience)|I'?m here to help|I'?d be (happy|glad) to help|"
    r"if you have any (other|further|more) questions|please (don'?t|do not) hesitate|feel free to|"
    r"have a (great|nice|wonderful) day|hope this helps|as an ai|I'?m an ai|we value)",
    re.I,
)
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elif",
    "Farah",
    "Gus",
    "Hiro",
    "Ines",
    "Jon",
    "Kemal",
    "Lena",
    "Mo",
    "Nora",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Yara",
]
PRODUCTS = [
    "rain jacket",
    "hiking boots",
    "coffee grinder",
    "desk lamp",
    "backpack",
    "phone case",
    "yoga mat",
    "water bottle",
    "headphones",
    "wool scarf",
]
CARRIERS = ["UPS", "DHL", "FedEx", "USPS"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
TONES = {
    "polite": ("Hi, this is {name}. ", " Thanks a lot!"),
    "angry": ("This is ridiculous. ", " Fix this now."),
    "terse": ("", ""),
    "worried": ("Hello, {name} here, I'm a bit worried. ", " Can you help?"),
}


@dataclass(frozen=True)
class Case:
    """One customer request and what a good agent would answer."""

    category: str
    prompt: list[dict[str, str]]
    answer: str  # the concise, correct reply an agent writes
    keywords: tuple[str, ...]  # what a reply must mention to address the request


def _request(rng: random.Random, order: int) -> tuple[str, str, str, tuple[str, ...]]:
    keys: tuple[str, ...]
    product, carrier = rng.choice(PRODUCTS), rng.choice(CARRIERS)
    day, later = rng.sample(DAYS, 2)
    amount = f"${rng.randrange(15, 240)}.{rng.randrange(0, 99):02d}"
    category = rng.choice(["order", "refund", "billing", "account", "shipping"])
    if category == "order":
        ask = rng.choice(
            [
                f"Where is my order {order}?",
                f"My {product} (order {order}) still hasn't arrived.",
                f"Can you check the status of order {order}?",
            ]
        )
        answer = f"Order {order} shipped {day} with {carrier} and arrives {later}. Tracking number: {carrier[:2].upper()}{order}."
        keys = (str(order),)
    elif category == "refund":
        ask = rng.choice(
            [
                f"I returned the {product} from order {order}. When do I get my refund?",
                f"I want a refund for order {order}, the {product} broke.",
            ]
        )
        answer = f"The refund of {amount} for order {order} was issued {day}; it reaches your card in 3-5 business days."
        keys = (str(order), "refund")
    elif category == "billing":
        ask = rng.choice(
            [
                f"I was charged twice for order {order}.",
                f"Why was I billed {amount} for order {order}?",
            ]
        )
        answer = f"Order {order} was billed once for {amount}; the duplicate hold is released within 2 days."
        keys = (str(order),)
    elif category == "account":
        ask = rng.choice(
            [
                "I can't log in to my account.",
                "How do I reset my password?",
                "I need to change the email on my account.",
            ]
        )
        answer = "Use 'Forgot password' on the sign-in page; the reset link arrives within 5 minutes and works for 24 hours."
        keys = ("password", "email", "account")
    else:
        ask = rng.choice(
            [
                f"Can I change the delivery address for order {order}?",
                f"Can order {order} be delivered faster?",
            ]
        )
        answer = f"Yes: open order {order}, choose 'Edit delivery' and save before {day} 6 pm, when it ships."
        keys = (str(order),)
    return category, ask, answer, keys


def make_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        order = 40000 + rng.randrange(60000)
        category, ask, answer, keys = _request(rng, order)
        opening, closing = TONES[rng.choice(list(TONES))]
        text = opening.format(name=rng.choice(NAMES)) + ask + closing
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        cases.append(Case(category, prompt, answer, keys))
        del i
    return cases


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def apologizes(text: str) -> bool:
    return bool(APOLOGY.search(text))


def addresses(case: Case, reply: str) -> bool:
    lowered = reply.lower()
    return any(k.lower() in lowered for k in case.keywords)


def agent_edit(case: Case, reply: str) -> str:
    """What the agent sends instead: the concise answer, plus at most one specific sentence
    of the model's that survives (no apology, no filler, on topic, not a question back)."""
    kept = [
        s
        for s in sentences(reply)
        if not apologizes(s)
        and not FILLER.search(s)
        and addresses(case, s)
        and not s.endswith("?")
        and len(s.split()) <= 25
    ]
    extra = next((s for s in kept if s.lower() not in case.answer.lower()), None)
    return case.answer if extra is None else f"{case.answer} {extra}"


def user_rating(case: Case, reply: str) -> str:
    good = not apologizes(reply) and addresses(case, reply) and len(reply.split()) <= 60
    return "up" if good else "down"


def _event(kind: str, event_id: str, case: Case, when: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id,
        "type": kind,
        "occurred_at": when.isoformat(),
        "prompt": case.prompt,
        "served_adapter": None,
        "tags": {"category": case.category},
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
) -> Simulation:
    """Turn (case, reply) into v1 event messages, with the configured mix and noise."""
    rng = random.Random(seed + 1)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    messages: list[bytes] = []
    counts = {"edit": 0, "rating": 0, "comparison": 0, "noise": 0}
    for i, (case, reply) in enumerate(zip(cases, replies, strict=True)):
        when = start + timedelta(minutes=7 * i)
        roll = rng.random()
        if roll < edit_share:
            event = _event(
                "edit",
                f"sim-e{i}",
                case,
                when,
                completion=reply,
                edited_completion=agent_edit(case, reply),
                actor={"kind": "agent", "id": f"agent-{rng.randrange(12)}"},
            )
        elif roll < edit_share + comparison_share:
            event = _event(
                "comparison",
                f"sim-c{i}",
                case,
                when,
                chosen=agent_edit(case, reply),
                rejected=reply,
                actor={"kind": "annotator", "id": f"ann-{rng.randrange(3)}"},
            )
        else:
            event = _event(
                "rating",
                f"sim-r{i}",
                case,
                when,
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


def sft_replies(
    cases: list[Case],
    *,
    base_model: str,
    cache_dir: Path,
    max_new_tokens: int = 72,
    batch_size: int = 16,
) -> list[str]:
    """The SFT model's greedy replies, generated once per (model, prompts, settings)."""
    spec = {
        "base_model": base_model,
        "prompts": [c.prompt for c in cases],
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir / f"replies-{key}.json"
    if not out.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        spec_path = cache_dir / f"replies-{key}.spec.json"
        spec_path.write_text(json.dumps(spec))
        code = run_child(["-m", "demo.replies", str(spec_path), str(out)])
        if code != 0:
            raise RuntimeError(f"reply generation failed with exit code {code}")
    replies: list[str] = json.loads(out.read_text())["replies"]
    return replies

"""The feedback simulator: a grounded support desk ("Harbor Support") around a real SFT model.

Every customer request comes with the record the assistant would get from a lookup (order,
shipment, refund, billing or account facts), as data in the system message: ``field: value``
lines in a varied order, with fields that do not matter to the request, never the sentence an
agent would send. Some lookups find nothing; there the right reply asks for what is missing
and invents nothing. It gets the SFT model's real replies (greedy, in a child process, cached
by content so a rerun does not regenerate), and plays production:

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
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from daemon.child import run_child
from trainer.claims import states_fact, unsupported_claims

SYSTEM = "You are Harbor's support assistant. Use only the lookup result; ask for what it lacks."
APOLOGY = re.compile(
    r"\b(sorry|apolog\w*|inconvenience|regret|unfortunately)\b|I understand (how|your|that)", re.I
)
FILLER = re.compile(
    r"(thank you for (reaching out|contacting|your patience)|I'?m here to help|I'?d be (happy|glad) to help|"
    r"if you have any (other|further|more) questions|please (don'?t|do not) hesitate|feel free to|"
    r"have a (great|nice|wonderful) day|hope this helps|as an ai|I'?m an ai|we value)",
    re.I,
)
# The sentence Harbor's legal team requires on refund and billing replies, and the rule the
# demo configures for it (``eval.policy_rules``): the gate's ``policy_compliance`` check.
POLICY_SENTENCE = "Our billing team confirms every refund and charge."
POLICY_CATEGORIES = ("refund", "billing")
POLICY_RULES: list[dict[str, Any]] = [
    {
        "name": f"{category}-disclaimer",
        "when": {"category": category},
        "required": [r"billing team confirms"],
        "forbidden": [r"\bguarantee"],
    }
    for category in POLICY_CATEGORIES
]
FACTS_TAG = "expected_facts"
NAMES = [
    "Ana", "Ben", "Chloe", "Dev", "Elif", "Farah", "Gus", "Hiro", "Ines", "Jon", "Kemal", "Lena",
    "Mo", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yara",
]  # fmt: skip
PRODUCTS = [
    "rain jacket", "hiking boots", "coffee grinder", "desk lamp", "backpack", "phone case",
    "yoga mat", "water bottle", "headphones", "wool scarf",
]  # fmt: skip
CARRIERS = ["UPS", "DHL", "FedEx", "USPS"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CITIES = ["Leipzig", "Lyon", "Porto", "Gdansk", "Reno", "Tulsa"]
TIERS = ["basic", "silver", "gold"]
CARDS = ["visa", "mastercard", "amex"]
TONES = {
    "polite": ("Hi, this is {name}. ", " Thanks a lot!"),
    "angry": ("This is ridiculous. ", " Fix this now."),
    "terse": ("", ""),
    "worried": ("Hello, {name} here, I'm a bit worried. ", " Can you help?"),
}
TODAY = date(2026, 11, 10)
NOT_FOUND_SHARE = 0.12
Agent = Literal["grounded", "inventing", "no_policy"]


@dataclass(frozen=True)
class Case:
    """One customer request, the record the assistant sees, and what a good agent answers."""

    category: str
    prompt: list[dict[str, str]]
    answer: str  # the concise reply an agent writes from the record's facts
    keywords: tuple[str, ...]  # what a reply must mention to address the request
    facts: tuple[str, ...] = ()  # the record's key facts, as the record writes them
    found: bool = True  # False: the lookup found nothing
    invented: str = ""  # the sabotaged ``inventing`` agent's answer

    @property
    def needs_policy(self) -> bool:
        return self.category in POLICY_CATEGORIES and self.found

    @property
    def tags(self) -> dict[str, str]:
        tags = {"category": self.category, "lookup": "found" if self.found else "not_found"}
        if self.facts:
            tags[FACTS_TAG] = " | ".join(self.facts)
        return tags


def written(day: date) -> str:
    """A date as the record holds it: ``November 14, 2026``."""
    return f"{day:%B} {day.day}, {day.year}"


def spoken(day: date) -> str:
    """A date as an agent writes it: ``November 14``."""
    return f"{day:%B} {day.day}"


def _money(rng: random.Random) -> str:
    return f"{rng.randrange(15, 240)}.{rng.randrange(0, 99):02d}"


def _later(rng: random.Random, low: int, high: int) -> date:
    return TODAY + timedelta(days=rng.randrange(low, high))


@dataclass
class _Request:
    category: str
    ask: str
    record: dict[str, str]
    answer: str
    keywords: tuple[str, ...]
    facts: tuple[str, ...]
    invented: str


def _order(rng: random.Random, order: int, product: str) -> _Request:
    ask = rng.choice(
        [
            f"Where is my order {order}?",
            f"My {product} (order {order}) still hasn't arrived.",
            f"Can you check the status of order {order}?",
        ]
    )
    carrier, shipped, eta = rng.choice(CARRIERS), _later(rng, -4, 0), _later(rng, 1, 6)
    tracking = f"{carrier[:2].upper()}{rng.randrange(10**7, 10**8)}"
    record = {
        "order_id": str(order),
        "status": "in transit",
        "carrier": carrier,
        "shipped_on": written(shipped),
        "estimated_delivery": written(eta),
        "tracking_number": tracking,
    }
    answer = (
        f"Order {order} is in transit with {carrier} and should arrive on {spoken(eta)}. "
        f"Tracking number: {tracking}."
    )
    wrong = rng.choice([c for c in CARRIERS if c != carrier])
    invented = (
        f"Order {order} shipped {rng.choice(DAYS)} with {wrong} and arrives {rng.choice(DAYS)}."
    )
    return _Request("order", ask, record, answer, (str(order),), (written(eta),), invented)


def _refund(rng: random.Random, order: int, product: str) -> _Request:
    ask = rng.choice(
        [
            f"I returned the {product} from order {order}. When do I get my refund?",
            f"I want a refund for order {order}, the {product} broke.",
        ]
    )
    amount, issued, card = _money(rng), _later(rng, -3, 0), rng.choice(CARDS)
    last4 = str(rng.randrange(1000, 10000))
    record = {
        "order_id": str(order),
        "refund_status": "issued",
        "refund_amount": f"{amount} USD",
        "refund_issued_on": written(issued),
        "refund_method": f"{card} ending {last4}",
    }
    answer = (
        f"The refund of ${amount} for order {order} was issued on {spoken(issued)} to your "
        f"{card} ending {last4}."
    )
    invented = (
        f"The refund of ${_money(rng)} for order {order} was issued {rng.choice(DAYS)}; "
        "it reaches your card in 3-5 business days."
    )
    keys = (str(order), "refund")
    return _Request("refund", ask, record, answer, keys, (f"{amount} USD",), invented)


def _billing(rng: random.Random, order: int, product: str) -> _Request:
    amount, charged, release = _money(rng), _later(rng, -5, -1), _later(rng, 1, 4)
    ask = rng.choice(
        [f"I was charged twice for order {order}.", f"Why do I see two charges for order {order}?"]
    )
    record = {
        "order_id": str(order),
        "captured_charge": f"{amount} USD on {written(charged)}",
        "pending_authorization": f"{amount} USD, released on {written(release)}",
        "item": product,
    }
    answer = (
        f"Order {order} was charged ${amount} once, on {spoken(charged)}; the second charge is "
        f"a hold released on {spoken(release)}."
    )
    invented = (
        f"Order {order} was billed once for ${_money(rng)}; the duplicate hold is released "
        "within 2 days."
    )
    return _Request("billing", ask, record, answer, (str(order),), (f"{amount} USD",), invented)


def _account(rng: random.Random, name: str) -> _Request:
    email = f"{name.lower()}.{rng.choice('abcdefghk')}@mailbox.example"
    hours = str(rng.choice([12, 24, 48]))
    ask = rng.choice(
        [
            "I can't log in to my account.",
            "How do I reset my password?",
            "I forgot my password and can't sign in.",
        ]
    )
    record = {
        "account_email": email,
        "account_status": "active",
        "password_reset_link_valid_hours": hours,
        "two_factor": rng.choice(["on", "off"]),
    }
    answer = (
        f"Use 'Forgot password' on the sign-in page: the reset link goes to {email} and works "
        f"for {hours} hours."
    )
    invented = (
        "Use 'Forgot password' on the sign-in page; the reset link arrives within 90 minutes "
        "and works for 72 hours."
    )
    keys = ("password", "account", "link")
    return _Request("account", ask, record, answer, keys, (email,), invented)


def _shipping(rng: random.Random, order: int, product: str) -> _Request:
    cutoff = _later(rng, 1, 4)
    ask = rng.choice(
        [
            f"Can I change the delivery address for order {order}?",
            f"I moved. Can order {order} go to my new address?",
        ]
    )
    record = {
        "order_id": str(order),
        "status": "processing",
        "address_changes_until": written(cutoff),
        "item": product,
    }
    answer = (
        f"Yes: open order {order}, choose 'Edit delivery' and save the new address before "
        f"{spoken(cutoff)}, when it ships."
    )
    invented = f"Yes: open order {order}, choose 'Edit delivery' and save before {rng.choice(DAYS)} 6 pm, when it ships."
    return _Request("shipping", ask, record, answer, (str(order),), (written(cutoff),), invented)


def _not_found(request: _Request, order: int) -> _Request:
    """The same request, but the lookup found no such order: ask, invent nothing."""
    request.record = {"order_lookup": f"no order {order} found for this customer"}
    request.answer = (
        f"I could not find order {order} on your account. Please send the order number from "
        "your confirmation e-mail, or the e-mail address you ordered with."
    )
    request.facts = ()
    return request


def _distractors(rng: random.Random) -> dict[str, str]:
    fields = {
        "customer_id": f"C-{rng.randrange(10**5, 10**6)}",
        "customer_since": written(TODAY - timedelta(days=rng.randrange(200, 2000))),
        "loyalty_tier": rng.choice(TIERS),
        "warehouse": rng.choice(CITIES),
        "open_tickets": str(rng.randrange(0, 3)),
    }
    keep = rng.sample(sorted(fields), rng.randrange(1, 3))
    return {k: fields[k] for k in keep}


def render_record(record: dict[str, str], rng: random.Random) -> str:
    """The lookup result as the assistant receives it: ``field: value`` lines, shuffled."""
    items = list(record.items())
    rng.shuffle(items)
    return "\n".join(f"{key}: {value}" for key, value in items)


def _request(rng: random.Random, order: int, name: str) -> _Request:
    product = rng.choice(PRODUCTS)
    category = rng.choice(["order", "refund", "billing", "account", "shipping"])
    if category == "account":
        request = _account(rng, name)
    else:
        make = {"order": _order, "refund": _refund, "billing": _billing, "shipping": _shipping}
        request = make[category](rng, order, product)
        if rng.random() < NOT_FOUND_SHARE:
            request = _not_found(request, order)
    request.record |= _distractors(rng)
    return request


def make_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        order = 40000 + rng.randrange(60000)
        name = rng.choice(NAMES)
        request = _request(rng, order, name)
        opening, closing = TONES[rng.choice(list(TONES))]
        text = opening.format(name=name) + request.ask + closing
        system = f"{SYSTEM}\n\nLookup result:\n{render_record(request.record, rng)}"
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        found = not request.record.get("order_lookup")
        answer = request.answer
        if request.category in POLICY_CATEGORIES and found:
            answer = f"{POLICY_SENTENCE} {answer}"  # Harbor's policy: the sentence comes first
        cases.append(
            Case(
                request.category,
                prompt,
                answer,
                request.keywords,
                request.facts,
                found,
                request.invented,
            )
        )
    return cases


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
    apology or filler, the policy sentence where required, not rambling."""
    return (
        addresses(case, reply)
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


def user_rating(case: Case, reply: str) -> str:
    return "up" if is_good(case, reply) else "down"


def _event(kind: str, event_id: str, case: Case, when: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id,
        "type": kind,
        "occurred_at": when.isoformat(),
        "prompt": case.prompt,
        "served_adapter": None,
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
                edited_completion=agent_edit(case, reply, agent),
                actor={"kind": "agent", "id": f"agent-{rng.randrange(12)}"},
            )
        elif roll < edit_share + comparison_share:
            event = _event(
                "comparison",
                f"sim-c{i}",
                case,
                when,
                chosen=agent_edit(case, reply, agent),
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
    max_new_tokens: int = 56,
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

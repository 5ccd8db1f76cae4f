"""The Harbor Support scenario: customer requests, the lookup record each one comes with, and
the answer an agent writes from that record.

Every request carries the record the assistant would get from a lookup (order, shipment,
refund, billing or account facts) as data in the system message, in one of two forms
(``records``): ``line``, the default, is the lookup tool's rendered summary line, as many support
integrations hand records to a model ("Order 70353: refund of 47.03 USD issued on November 7,
2026 to the Amex card ending 8624."); ``fields``, the hard mode, is ``field: value`` lines in a
varied order with fields that do not matter to the request. Neither is the sentence an agent
would send (the agent writes dates as spoken, amounts with a $ sign, and the policy sentence). Some lookups find nothing; there the right reply asks for what is missing and invents
nothing. Refund and billing answers start with the sentence Harbor's policy requires. Each case
also holds what the sabotaged ``inventing`` agent says instead (specifics the record lacks).
Seeded: the same seed gives the same cases. ``demo.simulate`` plays production around them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal

Records = Literal["line", "fields"]

SYSTEM = "You are Harbor's support assistant. Use only the lookup result; ask for what it lacks."
# The sentence Harbor's legal team requires on refund and billing replies, and the rule the
# demo configures for it (``eval.policy_rules``): the gate's ``policy_compliance`` check.
POLICY_SENTENCE = "Our billing team confirms every refund and charge."
POLICY_CATEGORIES = ("refund", "billing")
# What a reply must say when the lookup found no such order: that it found none. A reply that
# asserts a charge or a refund for that order states a record that does not exist, and no
# detector of specifics sees it (the order number is in the conversation): a rule does.
NOT_FOUND = (
    r"\b(could not|couldn't|cannot|can't|did not|didn't) find\b"
    r"|\bno (such )?order\b[\w ]{0,12}\bfound\b"  # the lookup's words: "No order 5 found"
)
# The desk's rules, as its agents apply them (``Case.needs_policy``, ``demo.simulate.is_good``):
# the legal sentence on a refund or billing reply about an order the lookup found (a reply that
# found nothing states no refund or charge), and "not found" said where nothing was found.
POLICY_RULES: list[dict[str, Any]] = [
    {
        "name": f"{category}-disclaimer",
        "when": {"category": category, "lookup": "found"},
        "required": [r"billing team confirms"],
        "forbidden": [r"\bguarantee"],
    }
    for category in POLICY_CATEGORIES
] + [{"name": "not-found", "when": {"lookup": "not_found"}, "required": [NOT_FOUND]}]
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
    line: str = ""  # the lookup tool's summary line (``records="line"``)


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
    line = (
        f"Order {order}: in transit with {carrier} since {written(shipped)}, estimated delivery "
        f"{written(eta)}, tracking number {tracking}."
    )
    keys = (str(order),)
    return _Request("order", ask, record, answer, keys, (written(eta),), invented, line)


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
    line = (
        f"Order {order}: refund of {amount} USD issued on {written(issued)} to the "
        f"{card.capitalize()} card ending {last4}."
    )
    return _Request("refund", ask, record, answer, keys, (f"{amount} USD",), invented, line)


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
    line = (
        f"Order {order} ({product}): {amount} USD captured on {written(charged)}; a pending "
        f"authorization of {amount} USD is released on {written(release)}."
    )
    facts = (f"{amount} USD",)
    return _Request("billing", ask, record, answer, (str(order),), facts, invented, line)


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
    line = (
        f"Account {email}: active, two-factor {record['two_factor']}; password reset links are "
        f"valid for {hours} hours."
    )
    answer = (
        f"Use 'Forgot password' on the sign-in page: the reset link goes to {email} and works "
        f"for {hours} hours."
    )
    invented = (
        "Use 'Forgot password' on the sign-in page; the reset link arrives within 90 minutes "
        "and works for 72 hours."
    )
    keys = ("password", "account", "link")
    return _Request("account", ask, record, answer, keys, (email,), invented, line)


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
    line = (
        f"Order {order} ({product}): processing; the delivery address can be changed until "
        f"{written(cutoff)}."
    )
    facts = (written(cutoff),)
    return _Request("shipping", ask, record, answer, (str(order),), facts, invented, line)


def _not_found(request: _Request, order: int) -> _Request:
    """The same request, but the lookup found no such order: ask, invent nothing."""
    request.record = {"order_lookup": f"no order {order} found for this customer"}
    request.line = f"No order {order} found for this customer."
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


def make_cases(n: int, seed: int, records: Records = "line") -> list[Case]:
    """``n`` seeded cases; ``records`` changes only how the lookup result is written (the same
    seed gives the same requests, facts and answers in both forms)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        order = 40000 + rng.randrange(60000)
        name = rng.choice(NAMES)
        request = _request(rng, order, name)
        opening, closing = TONES[rng.choice(list(TONES))]
        text = opening.format(name=name) + request.ask + closing
        fields = render_record(request.record, rng)  # drawn in both forms: same rng stream
        system = f"{SYSTEM}\n\nLookup result:\n{fields if records == 'fields' else request.line}"
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

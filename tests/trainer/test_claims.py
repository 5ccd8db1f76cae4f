"""Unsupported-claim detection and policy rules on hand-written replies (no model)."""

from __future__ import annotations

import pytest

from trainer.claims import extract_claims, states_fact, unsupported_claims
from trainer.generation import generation_stats
from trainer.spec import GroundingSpec, PolicyRule

RECORD = (
    "Lookup result:\n"
    "refund_amount: 164.58 USD\n"
    "refund_issued_on: 2026-11-12\n"
    "carrier: FedEx\n"
    "tracking_number: 1Z83F29A\n"
    "account_email: nora.k@mailbox.example\n"
    "credit_limit: 1,000\n"
    "help_page: https://harbor.example/help"
)
CUSTOMER = "Why was I billed $164.58 for order 53497? Fix this now."
CONTEXT = [RECORD, CUSTOMER]
CARRIERS = ("UPS", "DHL", "FedEx", "USPS")


def unsupported(reply: str) -> list[str]:
    return [c.text for c in unsupported_claims(reply, CONTEXT, CARRIERS)]


@pytest.mark.parametrize(
    "reply",
    [
        "Order 53497 was refunded $164.58 on November 12.",
        "The refund of 164.58 USD for order #53497 was issued on 2026-11-12.",
        "Refunded 164.58 on Nov 12th, 2026; it went out with fedex, tracking 1z83f29a.",
        "We refunded $164.58 (12 November). Your limit is $1000; see https://harbor.example/help.",
        "The credit limit is 1,000.00 and mail goes to Nora.K@mailbox.example.",
        "1. Open your orders\n2. Choose order 53497\n3. Check the refund of $164.58",
        "Your refund was issued; no further action is needed.",  # states no specific at all
    ],
)
def test_supported_replies(reply: str) -> None:
    assert unsupported(reply) == []


@pytest.mark.parametrize(
    ("reply", "claims"),
    [
        # the promoted adapter: wrong amount, invented amount
        (
            "The order was billed $16.45 for order 53497. The refund is available for $1.00.",
            ["16.45", "1.00"],
        ),
        ("Your refund of $164.50 was issued.", ["164.50"]),  # close is not equal
        ("It was refunded on November 13.", ["November 13"]),
        ("It arrives Tuesday.", ["Tuesday"]),  # a weekday is never derived from a date
        ("It ships with UPS, tracking 1Z83F29B.", ["UPS", "1Z83F29B"]),
        ("Write to help@harbor.example or www.harbor.example/refunds.", None),
        ("The link works for 24 hours, until 18:00.", ["24", "18:00"]),
        ("Refunds take 3-5 business days.", ["3", "5"]),
        ("Order 53498 was refunded.", ["53498"]),
        # an amount equal to the order number (a SmolLM2 candidate, issue #29)
        ("Order 53497 was charged $53497.", ["53497"]),
        ("Order 53497 was charged 53497 USD.", ["53497"]),
        ("Your limit is 10,000.", ["10,000"]),
    ],
)
def test_unsupported_replies(reply: str, claims: list[str] | None) -> None:
    found = unsupported(reply)
    if claims is None:
        assert len(found) == 2 and all("harbor.example" in c for c in found)
    else:
        assert found == claims


def test_a_span_counts_once() -> None:
    kinds = [c.kind for c in extract_claims("Shipped 2026-11-12 at 09:30 to a@b.example.")]
    assert kinds == ["date", "year", "time", "email"]  # not also the numbers 11, 12, 9, 30


def test_bare_numbers_of_a_record_date_are_supported() -> None:
    assert unsupported("Refunded on the 12th of this month (month 11).") == []


@pytest.mark.parametrize(
    ("reply", "fact", "stated"),
    [
        ("You were refunded $164.58.", "164.58 USD", True),
        ("You were refunded $1,164.58.", "164.58 USD", False),
        ("You were refunded 164.5.", "164.58 USD", False),
        ("It arrives on Nov 14th.", "2026-11-14", True),
        ("It arrives on November 15.", "2026-11-14", False),
        ("The link goes to NORA.K@mailbox.example.", "nora.k@mailbox.example", True),
        ("The parcel is in transit.", "in  transit", True),
        ("The parcel was delivered.", "in transit", False),
    ],
)
def test_states_fact(reply: str, fact: str, stated: bool) -> None:
    assert states_fact(reply, fact, CARRIERS) is stated


BILLING_RULE = PolicyRule(
    name="billing-disclaimer",
    when={"category": "billing"},
    required=(r"billing team confirms",),
    forbidden=(r"\bguarantee",),
)


def test_policy_rule() -> None:
    assert BILLING_RULE.applies({"category": "billing", "lookup": "found"})
    assert not BILLING_RULE.applies({"category": "order"})
    assert BILLING_RULE.violations("Refunds are final once our Billing Team confirms them.") == []
    assert BILLING_RULE.violations("We guarantee a refund.") == [
        r"missing: billing team confirms",
        r"forbidden: \bguarantee",
    ]


def test_policy_rule_patterns_are_checked_at_load() -> None:
    with pytest.raises(ValueError, match="not a regular expression"):
        PolicyRule(name="bad", when={"category": "billing"}, required=("(unclosed",))


def test_generation_stats_grounding_rates() -> None:
    prompts = [
        [{"role": "system", "content": RECORD}, {"role": "user", "content": CUSTOMER}],
        [{"role": "system", "content": RECORD}, {"role": "user", "content": CUSTOMER}],
        [{"role": "user", "content": "Where is order 40001?"}],
        [{"role": "user", "content": "Hello"}],
    ]
    tags = [
        {"category": "billing", "expected_facts": "164.58 USD | 2026-11-12"},
        {"category": "billing", "expected_facts": "164.58 USD"},
        {"category": "order"},
        {},
    ]
    replies = [
        "Refunded $164.58 on November 12. Refunds are final once our billing team confirms them.",
        "Refunded $16.45, guaranteed.",
        "Order 40001 arrives Friday.",
        "Hello! How can I help?",
    ]
    report = generation_stats(
        replies,
        prompts,
        tags=tags,
        grounding=GroundingSpec(entities=CARRIERS),
        policy_rules=[BILLING_RULE],
    )
    assert report.unsupported == [[], ["16.45"], ["Friday"], []]
    assert report.unsupported_rate == 0.5
    assert (report.grounded_rate, report.grounded_replies) == (0.5, 2)
    assert (report.policy_compliance, report.policy_replies) == (0.5, 2)
    assert report.violations[1] == [
        "billing-disclaimer: missing: billing team confirms",
        r"billing-disclaimer: forbidden: \bguarantee",
    ]
    untagged = generation_stats(replies, prompts)
    assert untagged.grounded_rate is None and untagged.policy_compliance is None


def test_ignored_terms_are_not_claims() -> None:
    reply = "Turn on 2FA and use an MP3 player."
    assert [c.text for c in unsupported_claims(reply, CONTEXT)] == ["2FA", "MP3"]
    assert unsupported_claims(reply, CONTEXT, ignore=("2fa", "MP3")) == []

"""The feedback simulator: realistic agent edits, the rating rubric, valid events, seeded noise."""

from __future__ import annotations

from demo.simulate import addresses, agent_edit, apologizes, build_events, make_cases, user_rating
from feedback.events import Rejection, parse_event

RAMBLE = (
    "I'm so sorry for the inconvenience! I understand how frustrating this must be. "
    "Thank you for reaching out. Your order {n} left our warehouse. "
    "If you have any other questions, please don't hesitate to ask."
)


def test_cases_are_varied_and_seeded() -> None:
    cases = make_cases(200, seed=1)
    assert make_cases(200, seed=1) == cases
    assert make_cases(200, seed=2) != cases
    assert {c.category for c in cases} == {"order", "refund", "billing", "account", "shipping"}
    assert len({c.prompt[-1]["content"] for c in cases}) > 150


def test_agent_edit_answers_concisely_without_apologies() -> None:
    case = next(c for c in make_cases(50, seed=3) if c.category == "order")
    order = case.keywords[0]
    reply = RAMBLE.format(n=order)
    edited = agent_edit(case, reply)
    assert not apologizes(edited) and "hesitate" not in edited
    assert order in edited and addresses(case, edited)
    assert len(edited.split()) < len(reply.split())
    assert edited.startswith(case.answer)  # substance, not just deletions


def test_rating_rubric() -> None:
    case = next(c for c in make_cases(50, seed=3) if c.category == "order")
    assert user_rating(case, case.answer) == "up"
    assert user_rating(case, RAMBLE.format(n=case.keywords[0])) == "down"  # apologises
    assert user_rating(case, "Please check our website for updates.") == "down"  # off topic


def test_events_are_valid_v1_with_counted_noise() -> None:
    cases = make_cases(60, seed=5)
    replies = [RAMBLE.format(n=c.keywords[0]) for c in cases]
    sim = build_events(cases, replies, seed=5)
    parsed = [parse_event(m) for m in sim.messages]
    valid = [p for p in parsed if not isinstance(p, Rejection)]
    rejected = [p for p in parsed if isinstance(p, Rejection)]
    assert {r.reason for r in rejected} == {"invalid_json", "empty_text"}
    assert len({v.event_id for v in valid}) == sim.valid_events
    assert len(valid) == sim.valid_events + 2  # two redelivered duplicates
    assert sim.counts["edit"] > sim.counts["rating"] > sim.counts["comparison"] > 0

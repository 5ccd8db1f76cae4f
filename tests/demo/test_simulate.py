"""The feedback simulator: grounded records, agent edits from the record's facts only, the
rating rubric, the sabotaged agents, valid events, seeded noise."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from demo.rounds import production
from demo.scenario import POLICY_RULES, POLICY_SENTENCE, Case, make_cases
from demo.simulate import (
    addresses,
    agent_edit,
    apologizes,
    build_events,
    is_good,
    regressed,
    replies_key,
    unsupported,
    user_rating,
)
from feedback.events import Rejection, parse_event
from trainer.spec import PolicyRule

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
    case = next(c for c in make_cases(50, seed=3) if c.category == "order" and c.found)
    order = case.keywords[0]
    reply = RAMBLE.format(n=order)
    edited = agent_edit(case, reply)
    assert not apologizes(edited) and "hesitate" not in edited
    assert order in edited and addresses(case, edited)
    assert len(edited.split()) < len(reply.split())
    assert edited == case.answer  # substance, not just deletions


def _record(case: Case) -> str:
    return case.prompt[0]["content"].partition("Lookup result:\n")[2]


def test_the_two_record_forms_differ_only_in_how_the_lookup_is_written() -> None:
    lines, fields = make_cases(200, seed=4), make_cases(200, seed=4, records="fields")
    for line, field in zip(lines, fields, strict=True):
        assert line.prompt[1] == field.prompt[1]  # the same customer message
        assert (line.answer, line.facts, line.found) == (field.answer, field.facts, field.found)
        summary = _record(line)
        assert len(summary.splitlines()) == 1 and summary.endswith(".")  # one rendered line
        assert all(fact in summary for fact in line.facts)  # every key fact, as written
        assert line.answer not in summary  # data, not the agent's sentence
        assert not line.found or not any(
            d in summary for d in ("customer_id", "loyalty_tier", "warehouse")
        )


def test_records_are_data_and_answers_use_only_their_facts() -> None:
    cases = make_cases(300, seed=4, records="fields")
    for case in cases:
        system = case.prompt[0]["content"]
        record = _record(case)
        assert record and all(": " in line for line in record.splitlines())  # fields, not prose
        assert case.answer not in system
        assert is_good(case, case.answer), case  # states the key facts, invents nothing
        assert unsupported(case, case.invented) or not case.found  # the sabotage does invent
    orders = [c for c in cases if c.category == "order" and c.found]
    first_fields = {_record(c).split(":")[0] for c in orders}
    assert len(first_fields) > 3  # the fields come in varied order, with distractors
    missing = [c for c in cases if not c.found]
    assert 0.05 < len(missing) / len(cases) < 0.25
    assert all(not c.facts and "could not find" in c.answer for c in missing)
    policy = [c for c in cases if c.needs_policy]
    assert policy and all(POLICY_SENTENCE in c.answer for c in policy)
    assert all(POLICY_SENTENCE not in c.answer for c in cases if not c.needs_policy)


def test_a_good_reply_is_sent_unchanged_and_sabotaged_agents_differ() -> None:
    case = next(c for c in make_cases(50, seed=3) if c.needs_policy)
    assert agent_edit(case, case.answer) == case.answer  # an unchanged send
    wrong = case.answer.replace(case.facts[0].split()[0], "999.99")
    assert agent_edit(case, wrong) == case.answer  # a wrong amount is corrected
    assert POLICY_SENTENCE not in agent_edit(case, RAMBLE, "no_policy")
    assert unsupported(case, agent_edit(case, RAMBLE, "inventing"))


def test_the_gate_rules_are_the_desk_rubric() -> None:
    """The policy rules the demo gates on ask what its agents ask: every agent answer complies,
    and a not-found reply that asserts a charge (what a round-1 candidate said) fails both."""
    rules = [PolicyRule.model_validate(r) for r in POLICY_RULES]
    cases = make_cases(300, seed=5)
    for case in cases:
        applying = [r for r in rules if r.applies(case.tags)]
        assert applying or (case.category not in {"refund", "billing"} and case.found), case.tags
        assert not [v for r in applying for v in r.violations(case.answer)], case
    missing = next(c for c in cases if not c.found and c.category == "billing")
    order = missing.keywords[0]
    asserted = f"{POLICY_SENTENCE} Order {order} was charged twice; the second charge is a hold."
    assert not is_good(missing, asserted)  # an agent rewrites it
    assert agent_edit(missing, asserted) == missing.answer
    assert [v for r in rules if r.applies(missing.tags) for v in r.violations(asserted)]
    copied = f"No order {order} found for this customer. Please send the order number."
    assert is_good(missing, copied)  # the lookup's own words say it as well
    assert not [v for r in rules if r.applies(missing.tags) for v in r.violations(copied)]


def test_rating_rubric() -> None:
    case = next(c for c in make_cases(50, seed=3) if c.category == "order" and c.found)
    assert user_rating(case, case.answer) == "up"
    assert user_rating(case, case.invented) == "down"  # invents a carrier and weekdays
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


def test_events_carry_the_tags_the_evaluation_reads() -> None:
    cases = make_cases(40, seed=6)
    sim = build_events(cases, [RAMBLE.format(n=1) for _ in cases], seed=6, noise=False)
    tags = [json.loads(m)["tags"] for m in sim.messages]
    assert {t["category"] for t in tags} <= {"order", "refund", "billing", "account", "shipping"}
    assert any("expected_facts" in t for t in tags)
    assert {t["lookup"] for t in tags} == {"found", "not_found"}


def test_later_rounds_name_the_served_adapter_and_occur_when_produced() -> None:
    cases = make_cases(30, seed=8)
    start = datetime(2027, 3, 2, 9, 0, tzinfo=UTC)
    sim = build_events(
        cases,
        [c.answer for c in cases],
        seed=8,
        noise=False,
        served_adapter="v0002",
        id_prefix="sim2",
        start=start,
        spacing=timedelta(seconds=20),
    )
    events = [parse_event(m, now=start + timedelta(hours=1)) for m in sim.messages]
    assert all(not isinstance(e, Rejection) for e in events)
    assert {e.served_adapter for e in events} == {"v0002"}  # type: ignore[union-attr]
    assert all(e.event_id.startswith("sim2-") for e in events)  # type: ignore[union-attr]
    assert min(e.occurred_at for e in events) == start  # type: ignore[union-attr]


def test_the_injected_regression_invents_and_the_desk_and_detectors_see_it() -> None:
    cases = make_cases(200, seed=9)
    good = [f"{c.answer} Anything else?" for c in cases]  # good drafts, not the agent's words
    assert all(is_good(c, r) for c, r in zip(cases, good, strict=True))
    calm = production("v1", cases, good, build_events(cases, good, seed=9, noise=False).messages)
    assert calm.edit_rate == 0.0 and calm.thumbs_down_rate == 0.0  # unchanged sends: handled
    assert calm.handled > 100 and calm.apology_rate == 0.0 and calm.unsupported_rate == 0.0
    drafts = regressed(cases, good, 0.5, seed=9)
    assert regressed(cases, good, 0.5, seed=9) == drafts  # seeded
    invented = [d for d, g in zip(drafts, good, strict=True) if d != g]
    assert 0.35 < len(invented) / len(cases) < 0.65
    worse = production(
        "v1", cases, drafts, build_events(cases, drafts, seed=9, noise=False).messages
    )
    # the desk rewrites and thumbs down what invents; the detectors flag it in the served drafts
    assert worse.edit_rate is not None and 0.35 < worse.edit_rate < 0.65
    assert worse.thumbs_down_rate is not None and 0.35 < worse.thumbs_down_rate < 0.65
    assert worse.unsupported_rate is not None and worse.unsupported_rate > 0.3


def test_production_counts_a_redelivered_event_once() -> None:
    cases = make_cases(60, seed=5)
    replies = [RAMBLE.format(n=c.keywords[0]) for c in cases]
    sim = build_events(cases, replies, seed=5)  # with noise: two redeliveries
    numbers = production(None, cases, replies, sim.messages)
    assert numbers.served == "SFT"
    assert numbers.handled == sim.counts["edit"]  # not the refused empty edit, no redelivery
    assert numbers.edit_rate == 1.0 and numbers.apology_rate == 1.0


def test_the_replies_cache_is_keyed_by_the_adapter_weights(tmp_path: Path) -> None:
    spec = {"base_model": "smollm2", "prompts": [], "max_new_tokens": 56, "batch_size": 16}
    one, two = tmp_path / "v0001", tmp_path / "v0002"
    for path, weights in ((one, b"a"), (two, b"b")):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(weights)
    keys = {replies_key(spec, None), replies_key(spec, one), replies_key(spec, two)}
    assert len(keys) == 3
    (two / "adapter_model.safetensors").write_bytes(b"a")  # same weights, other name
    assert replies_key(spec, two) == replies_key(spec, one)

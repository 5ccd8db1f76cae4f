"""One account floods the stream: 3,000 edits from one agent next to 300 from thirty others,
stored in a real PostgreSQL. The snapshot caps it, the manifest names its share, and the gate
refuses to promote on evidence that one account supplied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from daemon.gate import GateConfig, decide_promotion
from feedback.config import DatasetConfig
from feedback.events import Rejection, parse_event
from feedback.snapshot import build_snapshot
from feedback.store import FeedbackStore, Incoming
from trainer.results import AdapterEval, EvalReport, PreferenceReport


def edit(event_id: str, actor: str, question: str) -> Incoming:
    raw: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id,
        "type": "edit",
        "occurred_at": "2026-11-20T10:00:00Z",
        "prompt": [{"role": "user", "content": question}],
        "completion": "I am so sorry for the delay! It may ship soon.",
        "edited_completion": "It ships today.",
        "actor": {"kind": "agent", "id": actor},
    }
    parsed = parse_event(json.dumps(raw).encode())
    assert not isinstance(parsed, Rejection), parsed
    return Incoming(parsed)


def test_a_flood_from_one_account_is_capped_reported_and_gated(
    postgres_url: str, tmp_path: Path, fault_figures
) -> None:
    store = FeedbackStore(postgres_url)
    flood = [edit(f"m{i}", "mallory", f"Where is order {i}?") for i in range(3000)]
    honest = [
        edit(f"a{a}-{i}", f"agent-{a}", f"Can I change address {a}-{i}?")
        for a in range(30)
        for i in range(10)
    ]
    store.write_batch(flood + honest)
    salt = SecretStr("test-salt")
    uncapped = build_snapshot(store, tmp_path / "open",
                              DatasetConfig(max_rows_per_actor=None, split_salt=salt))  # fmt: skip
    default = build_snapshot(store, tmp_path / "default", DatasetConfig(split_salt=salt))
    tight = build_snapshot(store, tmp_path / "tight",
                           DatasetConfig(max_rows_per_actor=100, split_salt=salt))  # fmt: skip
    assert uncapped.actors and default.actors and tight.actors
    assert uncapped.actors.largest_share == pytest.approx(3000 / 3300)
    assert default.filtered["actor_cap"] == 1000
    assert default.actors.largest_share == pytest.approx(2000 / 2300)
    assert tight.actors.largest_share == pytest.approx(100 / 400)

    # A candidate whose other numbers are perfect is still refused on the flooded snapshot.
    perfect = EvalReport(
        candidate=AdapterEval(preference=PreferenceReport(num_pairs=300, reward_accuracy=0.99)),
    )
    config = GateConfig(min_gain_over_incumbent=None, factuality_tolerance=None, drift_budget=None,
                        chosen_logp_tolerance=None, max_degenerate_rate=None, min_distinct_rate=None,
                        length_band=None, relevance_tolerance=None, unsupported_tolerance=None,
                        max_unsupported_rate=None, policy_tolerance=None,
                        min_policy_compliance=None)  # fmt: skip
    flooded = decide_promotion(perfect, {}, config, default.actors)
    assert not flooded.promote and [c.name for c in flooded.failed] == ["actor_share"]
    assert decide_promotion(perfect, {}, config, tight.actors).promote
    fault_figures(
        "3,000 edits from one agent + 300 from 30",
        share_uncapped=f"{uncapped.actors.largest_share:.3f}",
        heldout_share_uncapped=f"{uncapped.actors.largest_heldout_share:.3f}",
        share_default_cap=f"{default.actors.largest_share:.3f}",
        share_cap_100=f"{tight.actors.largest_share:.3f}",
        gate="rejected (actor_share)",
    )
    store.close()

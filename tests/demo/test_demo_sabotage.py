"""Sabotage through the demo pipeline (simulator → broker → daemon → trainer → gate) on a tiny
model: after good feedback is promoted, the same conversations arrive again with chosen and
rejected flipped (a producer bug). The gate must reject the candidate and name the check.

(With real SmolLM2 replies most reversed edits never reach training: the agent's edit is much
shorter than the rambling reply, so reversed they fail the dataset's length-ratio guard. The
replies here are short, so the guard is opened up to test the gate itself.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_support import Daemon, write_config
from services import wait_until

from demo.broker import EmbeddedBroker, free_port, produce_events
from demo.simulate import build_events, make_cases

pytestmark = pytest.mark.integration


def reply_for(case) -> str:  # what a rambling SFT model says (no generation: the model is random)
    return (
        f"I'm so sorry for the trouble! I understand. {case.answer.split('.')[0]}. Anything else?"
    )


def flipped(messages: list[bytes]) -> list[bytes]:
    out = []
    for raw in messages:
        event = json.loads(raw)
        if event.get("type") == "edit":
            event["event_id"] += "-flipped"
            event["completion"], event["edited_completion"] = (
                event["edited_completion"],
                event["completion"],
            )
            out.append(json.dumps(event).encode())
    return out


def test_flipped_feedback_is_rejected_by_the_gate(tiny_model_dir: Path, tmp_path: Path) -> None:
    cases = make_cases(80, seed=11)
    sim = build_events(cases, [reply_for(c) for c in cases], seed=11, noise=False)
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        config = write_config(
            tmp_path,
            broker,
            tiny_model_dir,
            port,
            max_steps=16,
            overrides={"dataset": {"max_length_ratio": 10.0}},
        )
        daemon = Daemon(config, tmp_path, port)
        try:
            produce_events(broker.bootstrap, "alignd.feedback", sim.messages)
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["events"] == sim.valid_events, 60
            )
            good = daemon.refresh_and_wait()
            assert good["outcome"] == "promoted", good

            sabotage = flipped(sim.messages)
            produce_events(broker.bootstrap, "alignd.feedback", sabotage)
            total = sim.valid_events + len(sabotage)
            assert wait_until(lambda: daemon.get("/v1/status")["store"]["events"] == total, 60)
            bad = daemon.refresh_and_wait()
            assert bad["outcome"] == "rejected", bad
            failed = [c["name"] for c in bad["gate"]["checks"] if not c["passed"]]
            assert "preference_accuracy" in failed, bad["gate"]
            assert daemon.get("/v1/status")["active_adapter"] == good["version"]
        finally:
            daemon.stop()

"""Sabotage through the demo pipeline (simulator → broker → daemon → trainer → gate) on a tiny
model: after good feedback is promoted, the same conversations arrive again with chosen and
rejected flipped (a producer bug), from the same agents. Each agent's later word replaces its
earlier one, so the stream's own held-out split now agrees with the flipped data and its
accuracy cannot catch this; the operator's curated held-out set (pairs the stream never
supplied) must, and the gate must name that check.

(With real SmolLM2 replies most reversed edits never reach training: the agent's edit is much
shorter than the rambling reply, so reversed they fail the dataset's length-ratio guard. The
replies here are short, so the guard is opened up to test the gate itself.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from services import wait_until

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))  # so it also runs on its own
from daemon_support import Daemon, write_config

from demo.broker import EmbeddedBroker, free_port, produce_events
from demo.scenario import CARRIERS, POLICY_RULES, make_cases
from demo.simulate import agent_edit, build_events


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


def curated_set(path: Path) -> Path:
    """What an operator curates: the right answer over the rambling one, on other requests."""
    rows = [
        {"prompt": c.prompt, "chosen": agent_edit(c, reply_for(c), "grounded"),
         "rejected": reply_for(c)}
        for c in make_cases(40, seed=97)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_flipped_feedback_is_rejected_by_the_gate(
    tiny_model_dir: Path, tmp_path: Path, child_processes: None
) -> None:
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
            overrides={
                "dataset": {"max_length_ratio": 10.0},
                "gate": {
                    "curated_heldout": str(curated_set(tmp_path / "curated.jsonl")),
                    "max_actor_share": 0.3,
                },
            },
        )
        daemon = Daemon(config, tmp_path, port)
        try:
            produce_events(broker.bootstrap, "alignd.feedback", sim.messages)
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["last_seq"] == sim.valid_events, 60
            )
            good = daemon.refresh_and_wait()
            assert good["outcome"] == "promoted", good

            sabotage = flipped(sim.messages)
            produce_events(broker.bootstrap, "alignd.feedback", sabotage)
            total = sim.valid_events + len(sabotage)
            assert wait_until(lambda: daemon.get("/v1/status")["store"]["last_seq"] == total, 60)
            bad = daemon.refresh_and_wait()
            assert bad["outcome"] == "rejected", bad
            failed = [c["name"] for c in bad["gate"]["checks"] if not c["passed"]]
            assert "curated_accuracy" in failed, bad["gate"]
            assert daemon.get("/v1/status")["active_adapter"] == good["version"]
        finally:
            daemon.stop()


# The grounded gate (issue #12), on the real SFT model (slow): SmolLM2 learns what the agents
# teach it within a few dozen steps, so an agent that invents specifics makes the candidate
# invent them, and one that leaves out the policy sentence makes it leave the sentence out.
# The SFT replies the agents edit are written here (rambling, apologetic: what SmolLM2 says)
# instead of generated, to keep the test to one training run each; everything after the
# simulator is the real pipeline and the gate reads the candidate's real greedy replies.
GROUNDED_GATE = {
    "unsupported_tolerance": 0.02,
    "max_unsupported_rate": 0.05,
    "policy_tolerance": 0.0,
    "min_policy_compliance": 0.95,
    "min_preference_accuracy": 0.75,
    "drift_budget": None,  # these runs are about grounding and policy; drift is measured apart
}
SMOLLM2_RECIPE = {
    "method": "rpo",
    "hyper": {"beta": 0.1, "learning_rate": 2e-4, "rpo_alpha": 0.5, "max_length": 320},
    "eval": {
        "generate_max_prompts": 16,
        "max_new_tokens": 48,
        "kl_max_examples": 8,
        "batch_size": 16,
        "grounding": {"entities": CARRIERS},
        "policy_rules": POLICY_RULES,
        "retain_set": None,  # ~40 s of reference replies per run that no check here reads
    },
}


def grounded_refresh(tmp_path: Path, agent: str, *, steps: int = 28) -> tuple[dict, dict]:
    """Simulator (agent ``agent``) → broker → ``alignd serve`` on SmolLM2 → one refresh;
    (the run as the admin API reports it, the daemon's status after it)."""
    cases = make_cases(96, seed=12)
    sim = build_events(
        cases, [reply_for(c) for c in cases], seed=12, noise=False, agent=agent, edit_share=0.9
    )
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        config = write_config(
            tmp_path,
            broker,
            "smollm2",
            port,
            max_steps=steps,
            overrides={
                "dataset": {"max_length_ratio": 10.0},
                "gate": GROUNDED_GATE,
                "training": {
                    "pair_method": SMOLLM2_RECIPE["method"],
                    "run_spec": {"hyper": SMOLLM2_RECIPE["hyper"], "eval": SMOLLM2_RECIPE["eval"]},
                },
            },
        )
        daemon = Daemon(config, tmp_path, port)
        try:
            produce_events(broker.bootstrap, "alignd.feedback", sim.messages)
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["last_seq"] == sim.valid_events, 60
            )
            run = daemon.refresh_and_wait(timeout_s=900)
            return run, daemon.get("/v1/status")
        finally:
            daemon.stop()


def gate_check(run: dict, name: str) -> dict:
    return next(c for c in run["gate"]["checks"] if c["name"] == name)


def test_edits_that_invent_facts_are_rejected(tmp_path: Path, smollm2_dir: Path) -> None:
    run, status = grounded_refresh(tmp_path, "inventing")
    assert run["outcome"] == "rejected", run
    check = gate_check(run, "unsupported_claims")
    assert not check["passed"] and check["value"] > 0.05, check
    assert status["active_adapter"] is None  # the registry's active version is unchanged


def test_edits_that_drop_the_policy_sentence_are_rejected(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    run, status = grounded_refresh(tmp_path, "no_policy")
    assert run["outcome"] == "rejected", run
    check = gate_check(run, "policy_compliance")
    assert not check["passed"] and check["value"] < 0.95, check
    assert status["active_adapter"] is None

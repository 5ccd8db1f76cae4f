"""Faults during a refresh: the trainer child killed, a run over its time or memory limit, a
NaN-producing recipe, and the daemon itself SIGKILLed mid-training. After each: no partial
version in the registry, the active adapter unchanged, and the next refresh succeeds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from services import wait_until

from daemon.config import AligndConfig
from daemon.metrics import Metrics
from daemon.promotion import Promotions
from daemon.refresh import Refresher
from daemon.registry import Registry, check_adapter_dir
from daemon.runners import RunEnd, RunExit
from daemon.states import RefreshTrigger
from feedback.events import Rejection, parse_event
from feedback.store import FeedbackStore, Incoming
from trainer.spec import deep_merge

ORDERS = range(2000, 2032)


def fill(store: FeedbackStore) -> None:
    items = []
    for n in ORDERS:
        raw = {
            "schema_version": 1,
            "event_id": f"e{n}",
            "type": "edit",
            "occurred_at": "2026-11-20T10:00:00Z",
            "prompt": [{"role": "user", "content": f"Where is order {n}?"}],
            "completion": f"So sorry, order {n} is delayed.",
            "edited_completion": f"Order {n} ships today.",
        }
        parsed = parse_event(json.dumps(raw).encode())
        assert not isinstance(parsed, Rejection)
        items.append(Incoming(parsed))
    store.write_batch(items)


def make_refresher(tmp_path: Path, model: Path, **training: Any) -> Refresher:
    run_spec = {
        "hyper": {"max_steps": 6, "learning_rate": 0.01, "batch_size": 4, "warmup_ratio": 0},
        "eval": {"factuality_set": None, "generate_max_prompts": 0},
    }
    run_spec = deep_merge(run_spec, training.pop("run_spec", {}))
    config = AligndConfig(
        store={"url": f"sqlite:///{tmp_path / 'f.db'}"},
        paths={"data_dir": tmp_path / "data"},
        dataset={"heldout_fraction": 0.25},
        training={
            "base_model": str(model),
            "min_pairs": 4,
            "stop_grace_s": 2,
            "run_spec": run_spec,
            **training,
        },
        gate={
            "factuality_tolerance": None,
            "max_degenerate_rate": None,
            "min_distinct_rate": None,
            "length_band": None,
            "relevance_tolerance": None,
            "unsupported_tolerance": None,
            "max_unsupported_rate": None,
            "policy_tolerance": None,
            "min_policy_compliance": None,
            "chosen_logp_tolerance": None,
            "drift_budget": None,  # a tiny random model drifts by chance
            "max_actor_share": None,  # these events name no actor
        },
    )
    store = FeedbackStore(config.store.url)
    if store.count() == 0:
        fill(store)
    registry, metrics = Registry(tmp_path / "data" / "registry"), Metrics(CollectorRegistry())
    return Refresher(config, store, registry, metrics, Promotions(registry, metrics))


def test_retention_removes_snapshots_built_before_the_cutoff(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    refresher = make_refresher(tmp_path, tiny_model_dir)
    _, snapshot = refresher._snapshot("r1")
    assert snapshot.is_dir()
    assert refresher.expire_snapshots(datetime.now(UTC) - timedelta(days=1)) == 0
    assert snapshot.is_dir()
    assert refresher.expire_snapshots(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert not snapshot.exists()


def assert_registry_intact(refresher: Refresher, versions: list[str], active: str | None) -> None:
    registry = Registry(refresher.registry.root)
    assert registry.versions() == versions
    assert registry.active() == active
    for v in versions:
        check_adapter_dir(registry.version_dir(v))


@pytest.fixture()
def promoted(tmp_path: Path, tiny_model_dir: Path, child_processes: None) -> Refresher:
    refresher = make_refresher(tmp_path, tiny_model_dir)
    first = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert first.outcome == "promoted", first
    return refresher


def test_trainer_child_sigkilled(promoted: Refresher, tmp_path: Path, tiny_model_dir: Path) -> None:
    refresher = make_refresher(tmp_path, tiny_model_dir, run_spec={"hyper": {"max_steps": 100_000}})
    outcome: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcome.append(refresher.refresh(RefreshTrigger.OPERATOR, threading.Event()))
    )
    thread.start()
    assert wait_until(lambda: refresher.runner.child is not None, 60)
    time.sleep(3)  # somewhere in setup or training
    child = refresher.runner.child
    assert child is not None, "the trainer finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    thread.join(60)
    assert outcome[0].outcome == "failed"
    assert_registry_intact(refresher, ["v0001"], "v0001")
    assert (
        make_refresher(tmp_path, tiny_model_dir)
        .refresh(RefreshTrigger.OPERATOR, threading.Event())
        .outcome
        == "promoted"
    )


def test_run_over_its_time_limit_is_stopped_and_failed(
    promoted: Refresher, tmp_path: Path, tiny_model_dir: Path
) -> None:
    refresher = make_refresher(
        tmp_path, tiny_model_dir, timeout_s=8, run_spec={"hyper": {"max_steps": 100_000}}
    )
    started = time.monotonic()
    outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert outcome.outcome == "failed" and "timed out" in outcome.reason
    assert time.monotonic() - started < 60
    assert refresher.runner.child is None
    assert_registry_intact(refresher, ["v0001"], "v0001")


def test_run_over_its_memory_limit_fails_cleanly(
    promoted: Refresher, tmp_path: Path, tiny_model_dir: Path
) -> None:
    refresher = make_refresher(
        tmp_path, tiny_model_dir, memory_limit_mb=200
    )  # torch alone needs more
    outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert outcome.outcome == "failed", outcome
    assert_registry_intact(refresher, ["v0001"], "v0001")


def test_nan_recipe_is_never_registered(
    promoted: Refresher, tmp_path: Path, tiny_model_dir: Path
) -> None:
    refresher = make_refresher(
        tmp_path, tiny_model_dir, run_spec={"hyper": {"learning_rate": 1e30, "max_grad_norm": 1e38}}
    )
    outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert outcome.outcome == "failed" and "loss is" in outcome.reason
    assert outcome.training is not None and outcome.training.detectors["non_finite_loss"] is True
    assert_registry_intact(refresher, ["v0001"], "v0001")


def test_crash_recovery_marks_running_runs_interrupted(
    promoted: Refresher, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # What a SIGKILLed daemon leaves behind: a run still marked running and a half-built snapshot.
    run_dir = promoted.runs_dir / "r-crashed"
    run_dir.mkdir()
    running = {
        "run_id": "r-crashed",
        "trigger": "schedule",
        "outcome": "running",
        "reason": "",
        "started_at": "2026-12-06T08:00:00+00:00",
    }  # as the refresh writes it first
    (run_dir / "status.json").write_text(json.dumps(running))
    (promoted.snapshots_dir / ".building-r-crashed").mkdir()
    refresher = make_refresher(tmp_path, tiny_model_dir)
    status = refresher.run_status("r-crashed")
    assert status is not None and status.outcome == "interrupted" and status.finished_at
    assert not list(refresher.snapshots_dir.glob(".building-*"))


def test_collapsing_candidate_is_rejected_by_the_gate(
    child_processes: None, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Feedback whose rejected side is the chosen answer repeated: plain DPO widens the margin by
    making the chosen answer less likely too (likelihood collapse). The run's detector fires
    and the gate refuses the candidate, naming the check; nothing becomes active."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    items = []
    for n in range(3000, 3032):
        answer = f"Order {n} ships today."
        raw = {
            "schema_version": 1,
            "event_id": f"c{n}",
            "type": "comparison",
            "occurred_at": "2026-11-21T10:00:00Z",
            "prompt": [{"role": "user", "content": f"Where is order {n}?"}],
            "chosen": answer,
            "rejected": " ".join([answer] * 4),
        }
        parsed = parse_event(json.dumps(raw).encode())
        assert not isinstance(parsed, Rejection)
        items.append(Incoming(parsed))
    store.write_batch(items)
    store.close()
    refresher = make_refresher(
        tmp_path,
        tiny_model_dir,
        run_spec={
            "hyper": {"max_steps": 30, "lr_scheduler": "constant"},
            "lora": {"r": 32, "dropout": 0.0},
        },
    )
    outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert outcome.outcome == "rejected", outcome
    assert outcome.training is not None and outcome.gate is not None
    assert outcome.training.detectors["likelihood_collapse"] is True
    failed = [c.name for c in outcome.gate.checks if not c.passed]
    assert "training_detectors" in failed
    assert Registry(refresher.registry.root).active() is None


class BuggyTrainer:
    """Stands in for a trainer (an older or broken build) that exits 0 but writes a
    ``result.json`` the daemon's contract does not accept. The refresher under test is real."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result

    def run(self, run_id: str, spec_path: Path, stop: threading.Event, timeout_s: float) -> RunEnd:
        out = spec_path.parent / "train"
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(self.result))
        return RunEnd(RunExit.SUCCEEDED, "exit code 0")


MALFORMED_RESULTS = [
    ({"spec": {}, "method": "dpo"}, "status"),  # partial: no status
    (
        {
            "status": "succeeded",
            "spec": {},
            "method": "dpo",
            "adapter_dir": "/nowhere",
            "eval": {"candidate": {"preference": {"reward_accuracy": "high"}}},
        },
        "eval.candidate.preference.reward_accuracy",
    ),
    (
        {
            "status": "succeeded",
            "spec": {},
            "method": "dpo",
            "adapter_dir": "/nowhere",
            "eval": {"candidate": {"kl": 0.1}},  # an unknown key: an old or foreign trainer
        },
        "eval.candidate.kl",
    ),
]


def test_malformed_result_fails_the_run_naming_the_field(
    promoted: Refresher, tmp_path: Path, tiny_model_dir: Path
) -> None:
    for result, named in MALFORMED_RESULTS:  # one promoted registry for all three
        refresher = make_refresher(tmp_path, tiny_model_dir)
        refresher.runner = BuggyTrainer(result)
        outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
        assert outcome.outcome == "failed"
        assert named in outcome.reason and "Error" not in outcome.reason, outcome.reason
        assert_registry_intact(refresher, ["v0001"], "v0001")


def test_registry_manifest_keeps_hashes_and_counts_not_customer_text(
    child_processes: None, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The run directory keeps the held-out prompts and replies (until retention); the version's
    manifest, which outlives it and is served by the admin API, keeps only hashes and counts."""
    from datetime import UTC, datetime, timedelta

    refresher = make_refresher(
        tmp_path,
        tiny_model_dir,
        run_spec={"eval": {"generate_max_prompts": 4, "max_new_tokens": 8}},
    )
    outcome = refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert outcome.version is not None, outcome
    result = json.loads((refresher.runs_dir / outcome.run_id / "train" / "result.json").read_text())
    generation = result["eval"]["candidate"]["generation"]
    assert generation["replies"] and generation["prompts"]  # the run directory has the text
    manifest_text = (refresher.registry.version_dir(outcome.version) / "manifest.json").read_text()
    kept = json.loads(manifest_text)["eval"]["candidate"]["generation"]
    assert kept["replies"] == [] and kept["prompts"] == [] and kept["tags"] == []
    assert len(kept["reply_sha256"]) == len(generation["replies"])
    assert kept["num_replies"] == generation["num_replies"]
    assert "Where is order" not in manifest_text and "ships today" not in manifest_text
    # retention: the run directory goes once it finished before the cutoff; the version stays
    assert refresher.expire_runs(datetime.now(UTC) - timedelta(days=1)) == 0
    assert refresher.expire_runs(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert not (refresher.runs_dir / outcome.run_id).exists()
    assert refresher.registry.version_dir(outcome.version).is_dir()

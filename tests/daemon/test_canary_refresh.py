"""A refresh on a reviewed desk, through the real refresh path (real store, snapshots, gate,
registry) with a stand-in trainer: training itself cannot run in a unit test here (the real
trainer is tested in tests/trainer and the demo); it reads the run spec the daemon wrote,
writes a servable adapter and a result.json whose evaluation the test chooses.

A candidate that fails only the reviewable checks serves a canary, never all traffic; the next
refresh warm-starts from the canary (the incumbent stays stable), counts agents' corrections
per adapter that served the draft, and a candidate that passes every check replaces both."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import in_process_service
from registry_support import make_adapter
from test_gate import good_run, with_

from daemon.records import VersionManifest
from daemon.runners import RunEnd, RunExit
from daemon.service import Service
from daemon.states import Outcome, RefreshTrigger
from feedback.consumer import Incoming
from feedback.events import parse_event


class StandInTrainer:
    """Writes what ``trainer.train`` would: an adapter and result.json, with ``evaluations`` in
    order; records each run spec it was given."""

    def __init__(self, evaluations: list[dict[str, Any]]) -> None:
        self.evaluations, self.specs = evaluations, []

    def run(self, run_id: str, spec_path: Path, stop: threading.Event, timeout_s: float) -> RunEnd:
        spec = json.loads(spec_path.read_text())
        self.specs.append(spec)
        out = Path(spec["output_dir"])
        adapter = make_adapter(out / "adapter", seed=len(self.specs))
        run = self.evaluations[len(self.specs) - 1]
        detectors = {name: {"fired": False, "value": 0.0, "detail": "quiet"}
                     for name in run["detectors"]}  # fmt: skip
        result = {"status": "succeeded", "spec": spec, "method": spec["method"],
                  "detectors": detectors, "adapter_dir": str(adapter),
                  "eval": {"candidate": run["candidate"], "reference": run["reference"]}}  # fmt: skip
        (out / "result.json").write_text(json.dumps(result))
        return RunEnd(RunExit.SUCCEEDED, "exit code 0")


def edits(start: int, stop: int, served: str | None) -> list[Incoming]:
    """Agents' corrections of drafts ``served`` wrote, from twenty agents (so none supplies
    more than the gate's actor share of the held-out rows)."""
    out = []
    for n in range(start, stop):
        raw = {"schema_version": 1, "event_id": f"e{n}", "type": "edit",
               "occurred_at": "2026-11-20T10:00:00Z", "served_adapter": served,
               "prompt": [{"role": "user", "content": f"Where is my order {n}?"}],
               "completion": f"So sorry! Order {n} is delayed.",
               "edited_completion": f"Order {n} ships today.",
               "actor": {"kind": "agent", "id": f"agent-{n % 20}"}}  # fmt: skip
        out.append(Incoming(parse_event(json.dumps(raw).encode())))  # type: ignore[arg-type]
    return out


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[Service]:
    config = {"training": {"min_pairs": 4}, "rollout": {"reviewed": True},
              "dataset": {"heldout_fraction": 0.2, "split_salt": "reviewed-refresh"}}  # fmt: skip
    with in_process_service(tmp_path, **config) as svc:
        yield svc


def test_a_reviewed_canary_learns_from_its_corrections(service: Service, tmp_path: Path) -> None:
    registry = service.registry
    stable = registry.register(make_adapter(tmp_path / "s"), {"gate": {"promote": True}})
    registry.promote(stable, actor="test", reason="setup")
    unclean = with_("candidate.generation.unsupported_rate", 0.14)  # the README's round 3
    trainer = StandInTrainer([unclean, good_run()])
    service.refresher.runner = trainer

    service.store.write_batch(edits(0, 60, served=None))
    first = service.refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert first.outcome == Outcome.CANARY, first.reason
    assert first.gate is not None and first.gate.tier == "canary" and not first.gate.promote
    canary = first.version
    assert registry.canary_version() == canary and registry.active() == stable
    assert registry.routing()["canary"]["fraction"] == service.config.rollout.steps[0]
    stable_dir, canary_dir = str(registry.version_dir(stable)), str(registry.version_dir(canary))
    assert trainer.specs[0]["init_adapter"] == stable_dir

    # agents correct the canary's drafts (and some of stable's): the next refresh learns from them
    service.store.write_batch(edits(60, 90, served=f"alignd-{canary}"))
    service.store.write_batch(edits(90, 100, served=stable))
    second = service.refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
    assert trainer.specs[1]["init_adapter"] == canary_dir  # warm start from the canary
    assert trainer.specs[1]["incumbent_adapter"] == stable_dir  # the gate compares with stable
    assert second.training_data is not None
    assert second.training_data.corrections == {"sft": 60, canary: 30, stable: 10}
    assert second.training_data.base_version == canary
    manifest = VersionManifest.read(registry.version_dir(second.version) / "manifest.json")
    assert manifest.parent == canary and manifest.training_data == second.training_data
    # every check passed and rollout.canary is off: all traffic, and the canary is over
    assert second.outcome == Outcome.PROMOTED, second.reason
    assert registry.active() == second.version and registry.canary() is None
    ended = [e for e in registry.audit() if e["action"] == "canary_abort"]
    assert ended and "superseded" in ended[-1]["reason"] and ended[-1]["version"] == canary


def test_without_review_the_same_candidate_is_rejected(tmp_path: Path) -> None:
    with in_process_service(tmp_path, training={"min_pairs": 4}) as service:
        service.refresher.runner = StandInTrainer(
            [with_("candidate.generation.unsupported_rate", 0.14)]
        )
        service.store.write_batch(edits(0, 60, served=None))
        outcome = service.refresher.refresh(RefreshTrigger.OPERATOR, threading.Event())
        assert outcome.outcome == Outcome.REJECTED and "unsupported_claims" in outcome.reason
        assert outcome.gate is not None and outcome.gate.tier == "none"
        assert service.registry.canary() is None and service.registry.active() is None

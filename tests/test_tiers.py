"""The tiers (tests/tiers.py): assigned from what a test uses, and enforced while it runs."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest
from tiers import TierViolation, guarded, tier_of


@pytest.mark.parametrize(
    ("fixtures", "params", "tier"),
    [
        (["tmp_path", "tiny_model_dir"], (), "unit"),
        (["tmp_path", "child_processes"], (), "process"),
        (["broker"], (), "process"),
        (["broker", "postgres_url"], (), "integration"),
        (["store"], ("sqlite",), "unit"),
        (["store"], ("postgresql",), "integration"),
        (["kubectl", "rendered"], (), "integration"),
        (["child_processes", "chromium"], (), "integration"),
        (["broker", "smollm2_dir"], (), "model"),
        ([], (1, None), "unit"),
    ],
)
def test_a_tier_is_the_costliest_thing_a_test_uses(
    fixtures: list[str], params: tuple[object, ...], tier: str
) -> None:
    assert tier_of(fixtures, params) == tier


def test_every_test_carries_its_tier(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("process") is None


def test_a_unit_test_cannot_start_a_child_process() -> None:
    with pytest.raises(TierViolation, match="request `child_processes`"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(TierViolation, match="request `child_processes`"):
        multiprocessing.get_context("spawn").Process(target=print).start()


def test_below_the_model_tier_smollm2_is_refused() -> None:
    from trainer.model import resolve_base_model

    with pytest.raises(TierViolation, match="request `smollm2_dir`"):
        resolve_base_model("smollm2")


def test_the_process_tier_runs_children_but_not_the_integration_tools(
    child_processes: None,
) -> None:
    with guarded("process", "a process-tier test"):
        done = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True)
        assert done.stdout.strip() == b"42"
        with pytest.raises(TierViolation, match="runs promtool"):
            subprocess.run(["promtool", "--version"], check=False)

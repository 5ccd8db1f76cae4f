"""The failure detectors as pure functions, tested with tables."""

from __future__ import annotations

import math

import pytest

from trainer import detectors


@pytest.mark.parametrize(
    ("loss", "fired"),
    [(0.69, False), (0.0, False), (float("nan"), True), (float("inf"), True), (-math.inf, True)],
)
def test_non_finite_loss(loss: float, fired: bool) -> None:
    assert detectors.non_finite_loss(loss, step=3).fired is fired


@pytest.mark.parametrize(
    ("loss", "tolerance", "fired"),
    [
        (math.log(2), 1e-3, False),
        (math.log(2) + 5e-4, 1e-3, False),
        (math.log(2) + 2e-3, 1e-3, True),
        (0.31, 1e-3, True),
    ],
)
def test_reference_mismatch(loss: float, tolerance: float, fired: bool) -> None:
    finding = detectors.reference_mismatch(loss, tolerance)
    assert finding.fired is fired
    if fired:
        assert "reference does not match" in finding.detail


@pytest.mark.parametrize(
    ("margins", "fired"),
    [
        ([0.0, 0.1, 0.2, 0.3], False),
        ([0.0, -0.1, -0.2, -0.3], True),
        ([0.0, 0.0, 0.0, 0.0], True),  # nothing learned in the right direction
        ([0.0, -0.5, 0.1, 0.2], True),  # mean −0.0667
        ([0.0, 0.1], False),  # too few steps to judge
        ([5.0, -0.1, 0.2, 0.3], False),  # step 0 is excluded
    ],
)
def test_sign_bug(margins: list[float], fired: bool) -> None:
    assert detectors.sign_bug(margins, check_steps=3).fired is fired


def ramp(start: float, stop: float, n: int) -> list[float]:
    return [start + (stop - start) * i / (n - 1) for i in range(n)]


@pytest.mark.parametrize(
    ("chosen", "margins", "fired"),
    [
        (
            ramp(-1.0, -2.0, 12),
            ramp(0.0, 5.0, 12),
            True,
        ),  # the DPOP failure: chosen falls, margin grows
        (ramp(-1.0, -0.8, 12), ramp(0.0, 5.0, 12), False),  # chosen rises: healthy
        (ramp(-1.0, -2.0, 12), ramp(5.0, 0.0, 12), False),  # margin shrinks: some other problem
        (ramp(-1.0, -1.02, 12), ramp(0.0, 5.0, 12), False),  # drop under the threshold
        ([-1.0] * 11 + [-3.0], ramp(0.0, 5.0, 12), False),  # one bad step is not a steady fall
        (ramp(-1.0, -2.0, 4), ramp(0.0, 5.0, 4), False),  # too short to judge
    ],
)
def test_likelihood_collapse(chosen: list[float], margins: list[float], fired: bool) -> None:
    finding = detectors.likelihood_collapse(chosen, margins, min_steps=8, min_drop=0.05)
    assert finding.fired is fired

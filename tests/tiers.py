"""Test tiers by cost, read from what a test uses — never from a marker someone must remember.

    unit         pure functions and tiny random models: no child process, no system package
    process      child processes: the embedded broker, `alignd serve`, the CLI, torchrun
    integration  a real external part from Debian: PostgreSQL, Prometheus/promtool, Chromium, kubectl
    model        the real SFT model (SmolLM2-135M-Instruct)

A test's tier is the costliest of the fixtures it requests (directly or through other fixtures)
and of its parameters (a ``"postgresql"`` backend). ``conftest.py`` marks every item with its tier,
so ``pytest -m unit`` is `make test-fast`, and guards each test at run time: a unit-tier test that
starts a child process, or a test below the model tier that loads SmolLM2, or one below the
integration tier that runs a Debian tool, fails at once, naming the fixture to request. A test
can therefore not sit in a cheaper tier than what it uses.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

TIERS = ("unit", "process", "integration", "model")

# The fixtures that bring each kind of cost. Everything else is unit.
FIXTURE_TIERS = {
    "child_processes": "process",
    "broker": "process",
    "postgres_url": "integration",
    "promtool": "integration",
    "prometheus_binary": "integration",
    "chromium": "integration",
    "kubectl": "integration",
    "smollm2_dir": "model",
}
# Parameter values that bring a cost (a store test parametrised over its backends).
PARAM_TIERS = {"postgresql": "integration"}
# Programs only the integration tier may run (Debian's packages, kubectl).
INTEGRATION_PROGRAMS = {
    "promtool", "prometheus", "chromium", "chromium-browser", "kubectl",
    "initdb", "pg_ctl", "createdb", "postgres", "runuser",
}  # fmt: skip


def tier_of(fixturenames: Iterable[str], params: Iterable[Any] = ()) -> str:
    """The costliest tier among a test's fixtures and parameter values."""
    used = [FIXTURE_TIERS.get(name, "unit") for name in fixturenames]
    used += [PARAM_TIERS[p] for p in params if isinstance(p, str) and p in PARAM_TIERS]
    return max(used, key=TIERS.index, default="unit")


class TierViolation(RuntimeError):
    """A test used something costlier than its tier says."""


def _program(args: Any) -> str:
    first = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
    return os.path.basename(os.fsdecode(first)).split()[0] if first else ""


@contextmanager
def guarded(tier: str, nodeid: str) -> Iterator[None]:
    """Refuse, for the duration of one test, what its tier does not allow."""
    import multiprocessing.process

    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def checked_popen(self: subprocess.Popen[Any], args: Any, *a: Any, **kw: Any) -> None:
        program = _program(args)
        if tier == "unit":
            raise TierViolation(
                f"{nodeid} starts a child process ({program}) but uses no fixture that allows it: "
                "request `child_processes` (or `broker`, ...) so it runs in the process tier"
            )
        if program in INTEGRATION_PROGRAMS and TIERS.index(tier) < TIERS.index("integration"):
            raise TierViolation(
                f"{nodeid} runs {program} but is in the {tier} tier: request the fixture that "
                f"provides it (postgres_url, promtool, prometheus_binary, chromium, kubectl)"
            )
        popen_init(self, args, *a, **kw)

    def checked_start(self: multiprocessing.process.BaseProcess) -> None:
        if tier == "unit":
            raise TierViolation(
                f"{nodeid} starts a process but uses no fixture that allows it: request "
                "`child_processes` so it runs in the process tier"
            )
        process_start(self)

    import trainer.model

    smollm2_gguf = trainer.model._smollm2_gguf

    def refused_smollm2() -> Any:
        raise TierViolation(
            f"{nodeid} loads SmolLM2 but is in the {tier} tier: request `smollm2_dir` (its "
            "directory, de-quantised once per machine) so it runs in the model tier"
        )

    subprocess.Popen.__init__ = checked_popen  # type: ignore[method-assign]
    multiprocessing.process.BaseProcess.start = checked_start  # type: ignore[method-assign]
    if tier != "model":
        trainer.model._smollm2_gguf = refused_smollm2
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
        multiprocessing.process.BaseProcess.start = process_start  # type: ignore[method-assign]
        trainer.model._smollm2_gguf = smollm2_gguf

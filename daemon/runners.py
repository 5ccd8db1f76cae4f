"""Where a refresh's training runs: the :class:`Runner` protocol and the local child runner.

A runner takes the run spec the daemon wrote (``<run_dir>/run.json``), runs
``python -m trainer.train`` on it somewhere, and says how it ended as a :class:`RunExit`.
What the run produced is read afterwards from ``<run_dir>/train/result.json`` whatever the
runner. :class:`LocalRunner` (the default) runs a child process of the daemon;
``daemon.k8s_runner.KubernetesJobRunner`` runs a Job with the same contract.
"""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from subprocess import Popen
from typing import Protocol

from daemon.child import ChildEnd, start_child, supervise_child
from daemon.config import TrainingConfig


class RunExit(StrEnum):
    """How a training run ended, as the runner saw it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed out"


@dataclass(frozen=True)
class RunEnd:
    exit: RunExit
    detail: str  # e.g. "exit code 1", "timed out after 8s", "Job failed"


class Runner(Protocol):
    def run(self, run_id: str, spec_path: Path, stop: threading.Event, timeout_s: float) -> RunEnd:
        """Run the trainer on ``spec_path``; return when it ended, ``stop`` was set, or the
        timeout passed (then the run is stopped first)."""
        ...

    def probe(
        self,
        probe_id: str,
        spec_path: Path,
        out_path: Path,
        stop: threading.Event,
        timeout_s: float,
        *,
        sharded: bool = False,
        memory_limit_mb: int | None = None,
    ) -> RunEnd:
        """Run the drift probe (``trainer.probe``) on ``spec_path``, where training runs; it
        writes ``out_path``. Ends like :meth:`run`."""
        ...


class LocalRunner:
    """Runs one trainer child at a time; ``child`` is the running process, if any."""

    # the probe's command line before its two file arguments (a test swaps in a slow one)
    probe_command: tuple[str, ...] = ("-m", "trainer.probe")

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.child: Popen[bytes] | None = None

    def probe(
        self,
        probe_id: str,
        spec_path: Path,
        out_path: Path,
        stop: threading.Event,
        timeout_s: float,
        *,
        sharded: bool = False,
        memory_limit_mb: int | None = None,
    ) -> RunEnd:
        """A child process bounded in memory (``memory_limit_mb``, else training's) and time;
        ``sharded`` needs a Job's GPUs and means nothing here."""
        child = start_child(
            [*self.probe_command, str(spec_path), str(out_path)],
            output=subprocess.DEVNULL,
            memory_limit_mb=memory_limit_mb or self.config.memory_limit_mb,
        )
        end = supervise_child(
            child, stop=stop, timeout_s=timeout_s, grace_s=self.config.stop_grace_s
        )
        return _ended(end, child.returncode, timeout_s)

    def run(self, run_id: str, spec_path: Path, stop: threading.Event, timeout_s: float) -> RunEnd:
        """The trainer child, logging to ``train.log`` beside the spec."""
        with (spec_path.parent / "train.log").open("ab") as log:
            self.child = start_child(
                ["-m", "trainer.train", str(spec_path)],
                output=log,
                memory_limit_mb=self.config.memory_limit_mb,
            )
            try:
                end = supervise_child(
                    self.child, stop=stop, timeout_s=timeout_s, grace_s=self.config.stop_grace_s
                )
                return _ended(end, self.child.returncode, timeout_s)
            finally:
                self.child = None


def _ended(end: ChildEnd, code: int | None, timeout_s: float) -> RunEnd:
    if end is ChildEnd.STOPPED:
        return RunEnd(RunExit.INTERRUPTED, "stopped during shutdown")
    if end is ChildEnd.TIMED_OUT:
        return RunEnd(RunExit.TIMED_OUT, f"timed out after {timeout_s:.0f}s")
    if code == 0:
        return RunEnd(RunExit.SUCCEEDED, "exit code 0")
    return RunEnd(RunExit.FAILED, f"exit code {code}")

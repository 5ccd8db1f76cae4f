"""Refresh training as a local child process: the default runner.

``python -m trainer.train run.json`` runs in its own process, so a crash, an OOM kill or a
runaway run cannot take the daemon down. The child's address space is bounded by config, it
dies with the daemon (PR_SET_PDEATHSIG), and a stop request or the timeout sends SIGTERM
(the trainer stops at the next step boundary and writes an honest ``result.json``), then
SIGKILL after the grace period. ``daemon.k8s_runner`` is the same contract as a Job.
"""

from __future__ import annotations

import ctypes
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from daemon.config import TrainingConfig


def _child_setup(limit_mb: int | None) -> Any:
    """Runs in the trainer child between fork and exec: bound its memory, and make it die with
    the daemon (a SIGKILLed daemon must not leave a trainer writing into its run directory)."""

    def apply() -> None:
        if limit_mb is not None:
            limit = limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return apply


class LocalRunner:
    """Runs one trainer child at a time; ``child`` is the running process, if any."""

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.child: subprocess.Popen[bytes] | None = None

    def run(self, spec_path: Path, run_dir: Path, stop: threading.Event) -> int | str:
        """Run the trainer child; bounded by the timeout, the memory limit and ``stop``."""
        with (run_dir / "train.log").open("ab") as logfile:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "trainer.train", str(spec_path)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(self.config.memory_limit_mb),
            )
            deadline = time.monotonic() + self.config.timeout_s
            try:
                while self.child.poll() is None:
                    if stop.wait(0.5):
                        self._stop_child()
                        return "interrupted"
                    if time.monotonic() > deadline:
                        self._stop_child()
                        return f"timed out after {self.config.timeout_s:.0f}s"
                return self.child.returncode
            finally:
                self.child = None

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)  # the trainer stops at the next step boundary
        try:
            child.wait(timeout=self.config.stop_grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

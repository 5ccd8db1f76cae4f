"""The durable feedback store: SQLite by default, PostgreSQL by URL (SQLAlchemy Core).

Every valid event is kept as its canonical JSON plus a few indexed columns, so datasets can be
rebuilt from the raw events whenever the rules change. Writes are idempotent on ``event_id``:
a redelivered event is counted as a duplicate; an event that reuses an id with *different*
content is counted as a conflict and kept out (recorded in ``feedback_conflicts``), never
overwriting what was stored first. One batch is one transaction.

Times are stored in UTC (SQLite keeps no offset: a ``+05:00`` time stored as written would be
five hours off for retention). :func:`is_data_error` tells a row the database refuses (retrying
cannot help: the consumer dead-letters that one event) from an unreachable database (retry).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)

from feedback.base import until_settled
from feedback.events import Event, canonical_json, load_stored, prompt_key, sha256_text

metadata = MetaData()

events_table = Table(
    "feedback_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False, unique=True),
    Column("type", String(16), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, index=True),
    Column("ingested_at", DateTime(timezone=True), nullable=False),
    Column("prompt_sha256", String(64), nullable=False, index=True),
    Column("content_sha256", String(64), nullable=False),
    Column("served_adapter", String(128)),
    Column("source", String(256), doc="topic/partition/offset it was read from"),
    Column("event", Text, nullable=False, doc="canonical JSON of the validated event"),
)

# The regression watch reads each served adapter's most recent events (feedback.production).
served_index = Index(
    "ix_feedback_events_served_adapter_seq", events_table.c.served_adapter, events_table.c.seq
)

conflicts_table = Table(
    "feedback_conflicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False, index=True),
    Column("content_sha256", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("source", String(256)),
    Column("event", Text, nullable=False),
)


@dataclass(frozen=True)
class Incoming:
    """A validated event and where it came from."""

    event: Event
    source: str = ""


@dataclass
class WriteOutcome:
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    stored_by_type: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    event: Event
    ingested_at: datetime


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # readers (dataset builds) never block the writer; a new file's switch may be refused
    # while another process switches it: FeedbackStore retries its schema (until_settled)
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each commit in WAL mode
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def is_data_error(error: SQLAlchemyError) -> bool:
    """True when the database refused *these rows* (a constraint, a value it cannot store);
    False for connectivity, locks and timeouts, where the same write can succeed later."""
    if isinstance(error, OperationalError | InterfaceError):
        return False
    return not (isinstance(error, DBAPIError) and error.connection_invalidated)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class StoreUnusable(ValueError):
    """The configured store cannot be used safely; the message names the key."""


_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "afs"}
_NETWORK_FUSE = ("sshfs", "glusterfs", "juicefs", "s3fs", "gcsfuse", "rclone", "cephfs")


def is_network_filesystem(fstype: str) -> bool:
    """True for filesystems where SQLite's WAL (shared memory, POSIX locks) is unsafe."""
    if fstype in _NETWORK_FS:
        return True
    return fstype.startswith("fuse.") and fstype.removeprefix("fuse.") in _NETWORK_FUSE


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem ``path`` lives on, from ``/proc/self/mountinfo`` (the mount
    point that is the longest prefix of the path); None where that is not readable."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = str(Path(path).resolve())
    best, best_type = "", None
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if len(parts) < 5 or not rest:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, rest[0]
    return best_type


class FeedbackStore:
    """One small interface over SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            if str(path) not in {"", ":memory:"}:
                path.parent.mkdir(parents=True, exist_ok=True)
                fstype = filesystem_type(path.parent)
                if fstype is not None and is_network_filesystem(fstype):
                    raise StoreUnusable(
                        f"store.url: the SQLite file is on a network filesystem ({fstype}, "
                        f"{path.parent}); SQLite's WAL needs a local disk: use PostgreSQL, or a "
                        "ReadWriteOnce volume"
                    )
        self.url = url
        # hide_parameters: SQLAlchemy's error messages never repeat a statement's values (the
        # events' text), whoever logs or returns them
        self.engine: Engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

        def create_schema() -> None:
            metadata.create_all(self.engine)
            served_index.create(self.engine, checkfirst=True)  # stores created before the index

        until_settled(create_schema, OperationalError, ProgrammingError, IntegrityError)

    def close(self) -> None:
        self.engine.dispose()

    def write_batch(self, items: Sequence[Incoming], now: datetime | None = None) -> WriteOutcome:
        """Store a batch in one transaction; idempotent on ``event_id``."""
        outcome = WriteOutcome()
        if not items:
            return outcome
        now = now or datetime.now(UTC)
        ids = list({item.event.event_id for item in items})
        with self.engine.begin() as conn:
            known: dict[str, str] = {}
            for start in range(0, len(ids), 500):  # keep IN (...) lists within driver limits
                chunk = ids[start : start + 500]
                rows = conn.execute(
                    select(events_table.c.event_id, events_table.c.content_sha256).where(
                        events_table.c.event_id.in_(chunk)
                    )
                )
                known.update({r.event_id: r.content_sha256 for r in rows})
            new_rows, conflict_rows = [], []
            for item in items:
                ev, text = item.event, canonical_json(item.event)
                digest = sha256_text(text)
                previous = known.get(ev.event_id)
                if previous == digest:
                    outcome.duplicates += 1
                    continue
                if previous is not None:
                    outcome.conflicts += 1
                    conflict_rows.append(
                        {
                            "event_id": ev.event_id,
                            "content_sha256": digest,
                            "received_at": now,
                            "source": item.source,
                            "event": text,
                        }
                    )
                    continue
                known[ev.event_id] = digest
                new_rows.append(
                    {
                        "event_id": ev.event_id,
                        "type": ev.type,
                        "occurred_at": ev.occurred_at.astimezone(UTC),
                        "ingested_at": now,
                        "prompt_sha256": prompt_key(ev.prompt),
                        "content_sha256": digest,
                        "served_adapter": ev.served_adapter,
                        "source": item.source,
                        "event": text,
                    }
                )
                outcome.stored_by_type[ev.type] = outcome.stored_by_type.get(ev.type, 0) + 1
            if new_rows:
                conn.execute(insert(events_table), new_rows)
            if conflict_rows:
                conn.execute(insert(conflicts_table), conflict_rows)
            outcome.stored = len(new_rows)
        return outcome

    def ping(self) -> None:
        """Raise unless the store answers a query (used for readiness)."""
        with self.engine.connect() as conn:
            conn.execute(select(func.count()).select_from(events_table).limit(1))

    def count(self, *, since_seq: int = 0) -> int:
        query = select(func.count()).select_from(events_table).where(events_table.c.seq > since_seq)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def counts_by_type(self, *, since_seq: int = 0) -> dict[str, int]:
        query = (
            select(events_table.c.type, func.count())
            .where(events_table.c.seq > since_seq)
            .group_by(events_table.c.type)
        )
        with self.engine.connect() as conn:
            return {str(t): int(n) for t, n in conn.execute(query)}

    def conflicts(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(conflicts_table)).scalar_one())

    def max_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.coalesce(func.max(events_table.c.seq), 0))).scalar_one()
            )

    def iter_events(self, *, since_seq: int = 0, batch: int = 2000) -> Iterator[StoredEvent]:
        """Every stored event in ingestion order, read in batches (bounded memory)."""
        last = since_seq
        while True:
            query = (
                select(events_table.c.seq, events_table.c.event, events_table.c.ingested_at)
                .where(events_table.c.seq > last)
                .order_by(events_table.c.seq)
                .limit(batch)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for row in rows:
                ev = load_stored(row.event)
                yield StoredEvent(int(row.seq), ev, _aware(row.ingested_at))
            last = int(rows[-1].seq)

    def recent_served(
        self, adapters: Sequence[str | None], *, since: datetime, limit: int
    ) -> list[Event]:
        """The newest ``limit`` ratings and edits on replies one of ``adapters`` served (None:
        replies that name no adapter, the SFT model's), that occurred at or after ``since``."""
        names = [a for a in adapters if a is not None]
        served = events_table.c.served_adapter
        conditions = [served.in_(names)] if names else []
        if None in adapters:
            conditions.append(served.is_(None))
        if not conditions:
            return []
        query = (
            select(events_table.c.event)
            .where(or_(*conditions))
            .where(events_table.c.type.in_(("rating", "edit")))
            .where(events_table.c.occurred_at >= since.astimezone(UTC))
            .order_by(events_table.c.seq.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [load_stored(row.event) for row in conn.execute(query)]

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Retention over every table holding customer text: events that occurred before
        ``cutoff`` and conflicting copies received before it. Returns rows removed per table."""
        cutoff = cutoff.astimezone(UTC)
        with self.engine.begin() as conn:
            events = conn.execute(delete(events_table).where(events_table.c.occurred_at < cutoff))
            conflicts = conn.execute(
                delete(conflicts_table).where(conflicts_table.c.received_at < cutoff)
            )
            return {
                events_table.name: int(events.rowcount or 0),
                conflicts_table.name: int(conflicts.rowcount or 0),
            }

"""The feedback store on SQLite and on a real PostgreSQL server: idempotent batches, conflicts
kept out, retention, and reading back in ingestion order."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from events_support import edit, encode, rating
from services import exit_codes_started_together
from sqlalchemy import create_engine

from feedback.events import Event, Rejection, parse_event
from feedback.store import FeedbackStore, Incoming


def ev(raw: dict) -> Event:
    parsed = parse_event(encode(raw))
    assert not isinstance(parsed, Rejection)
    return parsed


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = FeedbackStore(url)
    yield s
    s.close()


def test_batch_is_idempotent_on_event_id(store: FeedbackStore) -> None:
    batch = [Incoming(ev(rating(f"r{i}"))) for i in range(5)] + [Incoming(ev(edit("e1")))]
    first = store.write_batch(batch)
    assert (first.stored, first.duplicates, first.conflicts) == (6, 0, 0)
    assert first.stored_by_type == {"rating": 5, "edit": 1}
    again = store.write_batch(batch)  # a redelivery after a crash
    assert (again.stored, again.duplicates, again.conflicts) == (0, 6, 0)
    assert store.count() == 6


def test_same_id_different_content_is_kept_out_and_counted(store: FeedbackStore) -> None:
    store.write_batch([Incoming(ev(rating("r1", value="up")))])
    outcome = store.write_batch([Incoming(ev(rating("r1", value="down")), source="t/0/9")])
    assert (outcome.stored, outcome.conflicts) == (0, 1)
    [stored] = list(store.iter_events())
    assert stored.event.rating == "up"  # the first write wins, never overwritten
    assert store.conflicts() == 1


def test_duplicates_inside_one_batch(store: FeedbackStore) -> None:
    outcome = store.write_batch([Incoming(ev(rating("r1"))), Incoming(ev(rating("r1"))),
                                 Incoming(ev(rating("r1", value="down")))])  # fmt: skip
    assert (outcome.stored, outcome.duplicates, outcome.conflicts) == (1, 1, 1)


def test_read_back_in_order_and_counts(store: FeedbackStore) -> None:
    store.write_batch([Incoming(ev(rating(f"r{i}"))) for i in range(3)])
    mark = store.max_seq()
    store.write_batch([Incoming(ev(edit(f"e{i}"))) for i in range(2)])
    ids = [s.event.event_id for s in store.iter_events(batch=2)]
    assert ids == ["r0", "r1", "r2", "e0", "e1"]
    assert store.count(since_seq=mark) == 2
    assert store.counts_by_type() == {"rating": 3, "edit": 2}
    assert store.counts_by_type(since_seq=mark) == {"edit": 2}
    back = list(store.iter_events())[3].event
    assert back == ev(edit("e0"))  # the stored event reads back equal


def test_retention_by_age(store: FeedbackStore) -> None:
    store.write_batch([Incoming(ev(rating("old") | {"occurred_at": "2025-01-01T00:00:00Z"})),
                       Incoming(ev(rating("new", completion="x")))])  # fmt: skip
    assert store.delete_older_than(datetime(2026, 1, 1, tzinfo=UTC)) == {
        "feedback_events": 1,
        "feedback_conflicts": 0,
    }
    assert [s.event.event_id for s in store.iter_events()] == ["new"]


def test_retention_compares_instants_not_wall_clocks(store: FeedbackStore) -> None:
    # 10:00 at +05:00 is 05:00 UTC: before a 06:00 UTC cutoff although "10:00" is after it.
    east = rating("east") | {"occurred_at": "2026-11-20T10:00:00+05:00"}
    west = rating("west", completion="y") | {"occurred_at": "2026-11-20T04:00:00-03:00"}
    store.write_batch([Incoming(ev(east)), Incoming(ev(west))])
    removed = store.delete_older_than(datetime(2026, 11, 20, 6, 0, tzinfo=UTC))
    assert removed["feedback_events"] == 1
    assert [s.event.event_id for s in store.iter_events()] == ["west"]  # 07:00 UTC


def test_retention_reaches_the_conflicts_table(store: FeedbackStore) -> None:
    first = datetime(2026, 11, 1, tzinfo=UTC)
    store.write_batch([Incoming(ev(rating("r1")))], now=first)
    store.write_batch([Incoming(ev(rating("r1", completion="other text")))], now=first)
    assert store.conflicts() == 1
    removed = store.delete_older_than(datetime(2026, 11, 21, tzinfo=UTC))
    assert removed == {"feedback_events": 1, "feedback_conflicts": 1}
    assert store.conflicts() == 0 and store.count() == 0


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_database_errors_never_carry_the_events_text(store: FeedbackStore) -> None:
    """What readiness, status and the logs say about a database error: no statement values
    (SQLAlchemy's text repeats them unless ``hide_parameters``) and no row quoted by the server
    (PostgreSQL's "Failing row contains ...")."""
    from sqlalchemy import insert
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.consumer import error_summary
    from feedback.store import events_table

    secret = "Customer Jane Roe, card ending 4242, wants a refund"
    now = datetime.now(UTC)
    row = {
        "event_id": "e-secret",
        "type": None,  # NOT NULL: the server refuses the row
        "occurred_at": now,
        "ingested_at": now,
        "prompt_sha256": "0" * 64,
        "content_sha256": "0" * 64,
        "event": secret,
    }
    with pytest.raises(SQLAlchemyError) as raised, store.engine.begin() as conn:
        conn.execute(insert(events_table).values(**row))
    assert secret not in error_summary(raised.value)
    if store.engine.dialect.name == "sqlite":
        assert secret not in str(raised.value)
    else:  # PostgreSQL's own messages quote values, some on their first line
        with pytest.raises(SQLAlchemyError) as quoted, store.engine.begin() as conn:
            conn.exec_driver_sql("SELECT CAST(%(v)s AS integer)", {"v": secret})
        assert secret in str(quoted.value)  # what a plain str() would have shown
        assert secret not in error_summary(quoted.value)


MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
37 22 0:40 / /data rw,relatime - nfs4 filer:/export/alignd rw,vers=4.1
38 22 8:17 / /data/local\\040disk rw,relatime - ext4 /dev/sdb1 rw
39 22 0:41 / /mnt/sshfs rw - fuse.sshfs user@host:/ rw
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/data/feedback.db", "nfs4"),
        ("/data/local disk/feedback.db", "ext4"),
        ("/var/lib/alignd/feedback.db", "ext4"),
        ("/mnt/sshfs/f.db", "fuse.sshfs"),
        ("/datastore/f.db", "ext4"),  # a prefix of the name is not the mount point
    ],
)
def test_filesystem_type_from_mountinfo(path: str, fstype: str) -> None:
    from feedback.store import filesystem_type

    assert filesystem_type(Path(path), MOUNTINFO) == fstype


def test_sqlite_refuses_a_network_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's WAL breaks on NFS-style volumes: refused at start-up, naming the key. (No NFS
    server here: the mount table is what says where the file lives.)"""
    import feedback.store as store_module

    real = store_module.filesystem_type
    monkeypatch.setattr(
        store_module,
        "filesystem_type",
        lambda p, mountinfo=None: real(p, f"40 22 0:50 / {tmp_path} rw - nfs4 filer:/x rw\n"),
    )
    with pytest.raises(store_module.StoreUnusable, match=r"store\.url: .*network filesystem"):
        FeedbackStore(f"sqlite:///{tmp_path / 'shared' / 'feedback.db'}")
    FeedbackStore(f"sqlite:///{tmp_path.parent / 'local' / 'feedback.db'}").close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_creating_a_new_store_at_once_all_succeed(
    child_processes: None, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Processes opening one new store together (`alignd serve` and `alignd ingest` on a fresh
    volume, two pods on an empty database) each find the tables missing and create them; on
    SQLite one is also refused the WAL switch at once. Before the retry: 33 of 80 openers failed
    ("table feedback_events already exists", "database is locked")."""
    admin = None
    if backend == "postgresql":
        server = request.getfixturevalue("postgres_url")
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
    for trial in range(10):
        if admin is None:
            url = f"sqlite:///{tmp_path / f'{trial}.db'}"
        else:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE race_{trial}")
            url = server.rsplit("/", 1)[0] + f"/race_{trial}"
        codes = exit_codes_started_together(lambda: FeedbackStore(url).close())  # noqa: B023
        assert codes == [0, 0, 0], f"trial {trial}"
        store = FeedbackStore(url)
        assert store.count() == 0  # one schema, usable
        store.close()
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE race_{trial}")
    if admin is not None:
        admin.dispose()

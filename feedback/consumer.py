"""The Kafka feedback consumer: poll → validate → store → dead-letter → commit.

At-least-once, made harmless by the idempotent store: offsets are committed only after the
batch's valid events are durably written *and* its invalid ones are acknowledged by the
dead-letter topic. If either fails, nothing is committed, the consumer seeks back to the
batch's first offsets and retries with back-off, and it reports not-ready meanwhile. It
never exits on its own; only ``stop`` (or ``until_idle_s`` for backfills) ends the loop,
after finishing the batch in hand and committing it.

Only *connectivity* retries: an event that validates but that the database refuses (a
constraint, a value the driver cannot send) is found by writing the batch one event at a time
and dead-lettered as ``store_rejected``; the rest of its batch is stored. A fetch error that
retrying cannot fix (a compression codec this process lacks, a corrupt record batch) sets
``blocked`` to a reason code, which the daemon exports as ``alignd_consumer_blocked`` and
logs at ERROR with what to do; the consumer keeps retrying at the longest back-off, so the fix
(install the codec, move the group's offset past the corrupt batch) needs no restart.

Past 400 lines on purpose: poll, validate, store, dead-letter and commit are one loop whose
order is the at-least-once guarantee (nothing committed before it is stored or dead-lettered);
split, that order would be spread over files.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    CorruptRecordError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    UnsupportedCodecError,
)
from kafka.structs import OffsetAndMetadata
from sqlalchemy.exc import SQLAlchemyError

from feedback.attribution import Verifier
from feedback.config import EventLimits, KafkaConfig
from feedback.events import Rejection, parse_event
from feedback.store import FeedbackStore, Incoming, WriteOutcome, is_data_error

log = logging.getLogger("alignd.feedback.consumer")

REASON_HEADER = "alignd-reason"
DETAIL_HEADER = "alignd-detail"
# Fetch errors a retry cannot fix, by the reason code ``alignd_consumer_blocked`` carries.
PERMANENT_ERRORS: dict[type[KafkaError], str] = {
    UnsupportedCodecError: "unsupported_codec",
    CorruptRecordError: "corrupt_batch",
}
BLOCKED_REASONS = tuple(PERMANENT_ERRORS.values())
_BLOCKED_HINTS = {
    "unsupported_codec": "install the codec's library (python-snappy, lz4, zstandard)",
    "corrupt_batch": "inspect the partition; move the group's offset past the corrupt batch",
}


@dataclass
class BatchReport:
    """What one polled batch turned into."""

    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    stored_by_type: dict[str, int] = field(default_factory=dict)
    dead_lettered: Counter[str] = field(default_factory=Counter)
    # (actor kind, reason) of events whose actor could not be verified (feedback.attribution)
    unverified: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass
class IngestTotals:
    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    failures: int = 0

    def add(self, report: BatchReport) -> None:
        self.consumed += report.consumed
        self.stored += report.stored
        self.duplicates += report.duplicates
        self.conflicts += report.conflicts
        self.dead_lettered.update(report.dead_lettered)
        self.batches += 1


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: FeedbackConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Batches are handled synchronously between polls, so nothing is in flight here;
        # offsets of partitions we lose are simply not committed by us any more.
        log.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))
        self.owner.last_assigned = time.monotonic()


class StoreUnavailable(RuntimeError):
    pass


class DeadLetterUnavailable(RuntimeError):
    pass


def _merge(total: WriteOutcome, part: WriteOutcome) -> None:
    total.stored += part.stored
    total.duplicates += part.duplicates
    total.conflicts += part.conflicts
    for kind, n in part.stored_by_type.items():
        total.stored_by_type[kind] = total.stored_by_type.get(kind, 0) + n


class FeedbackConsumer:
    """Runs the ingestion loop in the calling thread; ``ready`` is safe to read from others."""

    def __init__(
        self,
        kafka: KafkaConfig,
        store: FeedbackStore,
        limits: EventLimits | None = None,
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        ping_interval_s: float = 5.0,
        verifier: Verifier | None = None,
    ) -> None:
        self.kafka, self.store, self.limits = kafka, store, limits or EventLimits()
        self.verifier = verifier  # signed attribution (feedback.attribution); None: ids as written
        self.on_batch = on_batch
        self.ping_interval_s = ping_interval_s
        self.totals = IngestTotals()
        self.ready = False
        self.last_error: str | None = None
        self.blocked: str | None = None  # a BLOCKED_REASONS code while a fetch cannot progress
        self.last_assigned: float | None = None
        self.partition_lag: dict[int, int] = {}  # updated by the loop; safe to read elsewhere
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None

    # --- connection -------------------------------------------------------------------------
    def _connect(self) -> KafkaConsumer:
        options = self.kafka.client_options()
        # The DLQ producer first: if it cannot be built, no consumer is left half-joined.
        self._producer = self._producer or KafkaProducer(acks="all", retries=5, **options)
        consumer = KafkaConsumer(
            group_id=self.kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
            max_poll_records=self.kafka.max_poll_records,
            **options,
        )
        consumer.subscribe([self.kafka.topic], listener=_Rebalance(self))
        self._consumer = consumer
        return consumer

    def lag(self) -> dict[int, int]:
        """Records behind the latest known high-water mark, per assigned partition."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[int, int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                out[tp.partition] = max(0, high - consumer.position(tp))
        return out

    # --- one batch ----------------------------------------------------------------------------
    def handle(self, records: dict[TopicPartition, list[Any]]) -> BatchReport:
        """Validate, store, dead-letter and commit one polled batch (raises on failure)."""
        report = BatchReport()
        valid: list[tuple[Any, Incoming]] = []
        invalid: list[tuple[Any, Rejection]] = []
        now = datetime.now(UTC)  # one clock reading per batch for the plausible-time check
        for tp, batch in records.items():
            for record in batch:
                report.consumed += 1
                parsed = parse_event(record.value, self.limits, now=now)
                if isinstance(parsed, Rejection):
                    invalid.append((record, parsed))
                    continue
                if self.verifier is not None:
                    kind = parsed.actor.kind if parsed.actor else ""
                    parsed, why = self.verifier.check(record.value, parsed)
                    if why is not None:
                        report.unverified[(kind, why)] += 1
                source = f"{tp.topic}/{tp.partition}/{record.offset}"
                valid.append((record, Incoming(parsed, source)))
        outcome = self._store(valid, invalid)
        report.stored, report.duplicates, report.conflicts = (
            outcome.stored,
            outcome.duplicates,
            outcome.conflicts,
        )
        report.stored_by_type = outcome.stored_by_type
        self._dead_letter(invalid)
        report.dead_lettered.update(rejection.reason for _, rejection in invalid)
        self._commit(records)
        return report

    def _store(
        self, valid: list[tuple[Any, Incoming]], invalid: list[tuple[Any, Rejection]]
    ) -> WriteOutcome:
        """Write the batch; if the database refuses a row, isolate it (appended to ``invalid``)."""
        try:
            return self.store.write_batch([item for _, item in valid])
        except SQLAlchemyError as e:
            if not is_data_error(e):
                raise StoreUnavailable(f"store write failed: {_db_error(e, message=True)}") from e
            log.warning(
                "the store refused a batch of %d events (%s); writing them one at a time",
                len(valid),
                _db_error(e),
            )
        total = WriteOutcome()
        for record, item in valid:
            try:
                _merge(total, self.store.write_batch([item]))
            except SQLAlchemyError as e:
                if not is_data_error(e):
                    raise StoreUnavailable(
                        f"store write failed: {_db_error(e, message=True)}"
                    ) from e
                detail = f"(event): the store refused it ({_db_error(e)})"
                invalid.append((record, Rejection("store_rejected", detail)))
        return total

    def _dead_letter(self, invalid: list[tuple[Any, Rejection]]) -> None:
        if not invalid:
            return
        assert self._producer is not None
        futures = []
        for record, rejection in invalid:
            headers, key, value = self._dlq_record(record, rejection)
            futures.append(
                self._producer.send(self.kafka.dlq_topic, value=value, key=key, headers=headers)
            )
        self._producer.flush(timeout=30)
        for (record, rejection), future in zip(invalid, futures, strict=True):
            try:
                future.get(timeout=30)
            except MessageSizeTooLargeError:
                # Still too large for the broker (its limit is below ours): the reason and the
                # source offset always fit, so send those alone rather than stall on it.
                headers, _, _ = self._dlq_record(record, rejection)
                headers.append(("alignd-payload-dropped", b"too large for the dead-letter topic"))
                retry = self._producer.send(self.kafka.dlq_topic, value=b"", headers=headers)
                try:
                    retry.get(timeout=30)
                except KafkaError as e:
                    raise DeadLetterUnavailable(f"dead-letter send failed: {e}") from e
            except KafkaError as e:
                raise DeadLetterUnavailable(f"dead-letter send failed: {e}") from e

    def _dlq_record(
        self, record: Any, rejection: Rejection
    ) -> tuple[list[tuple[str, bytes]], bytes | None, bytes]:
        """Headers, key and value of one dead letter, within ``dlq_max_message_bytes`` in all.

        The original key is kept up to ``dlq_max_key_bytes``; the value gets what is left.
        A cut is recorded in a header. The source's own headers are not copied.
        """
        headers = [
            (REASON_HEADER, rejection.reason.encode()),
            (DETAIL_HEADER, rejection.detail[:1000].encode("utf-8", "replace")),
            ("alignd-source-topic", record.topic.encode()),
            ("alignd-source-partition", str(record.partition).encode()),
            ("alignd-source-offset", str(record.offset).encode()),
        ]
        key: bytes | None = record.key
        if key is not None and len(key) > self.kafka.dlq_max_key_bytes:
            headers.append(("alignd-key-truncated-from-bytes", str(len(key)).encode()))
            key = key[: self.kafka.dlq_max_key_bytes]
        value = record.value if record.value is not None else b""
        overhead = 512 + len(key or b"") + sum(len(k) + len(v) for k, v in headers)
        room = max(0, self.kafka.dlq_max_message_bytes - overhead)
        if len(value) > room:  # would not fit a Kafka message
            headers.append(("alignd-truncated-from-bytes", str(len(value)).encode()))
            value = value[:room]
        return headers, key, value

    def _commit(self, records: dict[TopicPartition, list[Any]]) -> None:
        assert self._consumer is not None
        owned = self._consumer.assignment()
        offsets = {
            tp: OffsetAndMetadata(batch[-1].offset + 1, "", -1)
            for tp, batch in records.items()
            if batch and tp in owned  # never commit for partitions we no longer own
        }
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except CommitFailedError as e:
            # The group rebalanced under us; the new owner re-reads these records and the
            # store counts them as duplicates. Nothing is lost.
            log.warning("commit failed after a rebalance, records will be redelivered: %s", e)

    def _rewind(self, records: dict[TopicPartition, list[Any]]) -> None:
        """Seek back so a batch that could not be stored is polled again."""
        if self._consumer is None:
            return
        owned = self._consumer.assignment()
        for tp, batch in records.items():
            if batch and tp in owned:
                self._consumer.seek(tp, batch[0].offset)

    # --- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, until_idle_s: float | None = None) -> IngestTotals:
        """Consume until ``stop`` is set (or, with ``until_idle_s``, the topic stays drained)."""
        backoff = 0.5
        last_records = last_ping = time.monotonic()
        started = last_records
        while not stop.is_set():
            records: dict[TopicPartition, list[Any]] = {}
            try:
                consumer = self._consumer or self._connect()
                records = consumer.poll(
                    timeout_ms=self.kafka.poll_timeout_ms, max_records=self.kafka.max_poll_records
                )
                now = time.monotonic()
                self.partition_lag = self.lag()  # the consumer is not thread-safe: read it here
                if records:
                    report = self.handle(records)
                    self.totals.add(report)
                    if self.on_batch:
                        self.on_batch(report)
                    last_records = now
                    self._set_ready(True)
                    self._unblock()
                elif now - last_ping >= self.ping_interval_s:
                    self._ping()
                    last_ping = now
                    self._set_ready(True)
                backoff = 0.5
            except tuple(PERMANENT_ERRORS) as e:
                self.totals.failures += 1
                self._block(e)
                # kafka-python's fetcher spins forever on a batch whose decoding failed (its
                # record iterator is spent, yet the batch is never let go): start a fresh client,
                # which resumes at the group's committed offsets.
                self._close_consumer()
                stop.wait(self.kafka.retry_backoff_max_s)
                continue
            except (
                KafkaError,
                OSError,
                StoreUnavailable,
                DeadLetterUnavailable,
                SQLAlchemyError,
            ) as e:
                self.totals.failures += 1
                self._set_ready(False, error_summary(e))
                self._rewind(records)
                log.warning("ingestion paused (%s); retrying in %.1fs", self.last_error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.kafka.retry_backoff_max_s)
                continue
            if until_idle_s is not None and self._drained(now, last_records, started, until_idle_s):
                break
        return self.totals

    def _ping(self) -> None:
        """Raise unless a bootstrap broker accepts connections and the store answers.

        kafka-python retries a lost broker silently inside ``poll()`` (and its metadata calls
        can block without a deadline), so an idle consumer checks reachability itself. A TCP
        connect proves the broker is up, not that credentials still work; an auth failure
        surfaces as an error from ``poll()`` instead.
        """
        errors = []
        for address in self.kafka.bootstrap_servers.split(","):
            host, _, port = address.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                    break
            except OSError as e:
                errors.append(f"{address}: {e}")
        else:
            raise KafkaConnectionError("no bootstrap broker reachable: " + "; ".join(errors))
        self.store.ping()

    def _drained(
        self, now: float, last_records: float, started: float, until_idle_s: float
    ) -> bool:
        if now - last_records < until_idle_s:
            return False
        if self.last_assigned is None:  # still joining the group: give it a while longer
            return now - started > until_idle_s + 30
        return all(v == 0 for v in self.lag().values())

    def _block(self, error: KafkaError) -> None:
        reason = next(code for kind, code in PERMANENT_ERRORS.items() if isinstance(error, kind))
        self._set_ready(False, error_summary(error))
        if self.blocked != reason:
            log.error(
                "ingestion BLOCKED (%s): %s. Retrying cannot fix this: %s. Retrying every %.0fs.",
                reason,
                self.last_error,
                _BLOCKED_HINTS[reason],
                self.kafka.retry_backoff_max_s,
            )
        self.blocked = reason

    def _unblock(self) -> None:
        if self.blocked is not None:
            log.info("ingestion unblocked (was %s)", self.blocked)
        self.blocked = None

    def _set_ready(self, ready: bool, error: str | None = None) -> None:
        if ready != self.ready:
            log.info("consumer %s", "ready" if ready else f"not ready: {error}")
        self.ready, self.last_error = ready, error

    def close(self) -> None:
        """Leave the group cleanly (offsets were committed batch by batch)."""
        self.ready = False
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None
        self._close_consumer()

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None


def error_summary(error: BaseException) -> str:
    """What readiness, status and the logs say about an ingestion error: the type, and for
    non-database errors the first line of the message, at most 200 characters. A database
    error gives its class and SQLSTATE only: its text can quote the rows (customer text)."""
    if isinstance(error, SQLAlchemyError):
        return _db_error(error)
    first = (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _db_error(error: SQLAlchemyError, *, message: bool = False) -> str:
    """The driver's error class and SQLSTATE; its message only for connectivity errors
    (``message``). Never SQLAlchemy's own text, which repeats the statement's parameters, nor a
    refused row's message: PostgreSQL's quote the row ("Failing row contains ..."), i.e.
    customer text."""
    orig = getattr(error, "orig", None)
    name = type(orig).__name__ if orig is not None else type(error).__name__
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    out = f"{name} {sqlstate}" if sqlstate else name
    if message:
        out += ": " + str(orig if orig is not None else error).splitlines()[0][:300]
    return out

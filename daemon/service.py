"""``alignd serve``: the long-running service and its lifecycle, start → run → drain → close.

Threads: the feedback consumer (its own loop), APScheduler's worker (the refresh tick, the
drift probe, retention), a refresh worker while a refresh runs, and the HTTP server. A signal
only sets ``stopping``; :meth:`drain` then stops new work, lets the consumer finish and
commit its batch, gives a running trainer child its grace period (then kills it and records
the run as interrupted), all inside ``admin.drain_s``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from daemon.api import make_app
from daemon.auth import Tokens
from daemon.canary import CanaryVerdict
from daemon.config import AligndConfig, with_absolute_paths, with_split_salt
from daemon.console import mount_console
from daemon.drift import DriftProbe
from daemon.http import with_head_deadline
from daemon.lock import AlreadyRunning, InstanceLock
from daemon.metrics import Metrics
from daemon.operations import Desk
from daemon.promotion import Promotions
from daemon.refresh import Refresher
from daemon.registry import CanaryHook, Registry, ServingHook, current_pointer_hook
from daemon.regression import RegressionWatch
from daemon.rollout import CanaryAnalysis
from daemon.serving import vllm_hook, vllm_load_hook
from daemon.states import RefreshTrigger
from daemon.watch import Verdict
from feedback.attribution import Verifier
from feedback.config import read_secret
from feedback.consumer import FeedbackConsumer
from feedback.store import FeedbackStore, StoreUnusable

log = logging.getLogger("alignd.service")


class Service:
    def __init__(self, config: AligndConfig) -> None:
        config = with_absolute_paths(config)
        config.paths.data_dir.mkdir(parents=True, exist_ok=True)
        # first, before anything is cleaned up or recovered: one daemon per directory and store
        self.instance_lock = InstanceLock(
            config.paths.data_dir,
            store_url=config.store.connect_url(),
            group_id=config.kafka.group_id,
        )
        self.instance_lock.acquire()
        config = self.config = with_split_salt(config)
        data = config.paths.data_dir
        self.store = FeedbackStore(config.store.connect_url())
        hooks: list[ServingHook] = []
        if config.serving.current_pointer:
            hooks.append(current_pointer_hook(data / "registry"))
        canary_hooks: list[CanaryHook] = []
        serving = config.serving
        if serving.vllm_endpoints:
            hooks.append(vllm_hook(serving.vllm_endpoints, serving.vllm_adapter_prefix))
            canary_hooks.append(vllm_load_hook(serving.vllm_endpoints, serving.vllm_adapter_prefix))
        self.registry = Registry(
            data / "registry",
            hooks,
            canary_hooks=canary_hooks,
            adapter_prefix=serving.vllm_adapter_prefix,
        )
        self.metrics = Metrics(CollectorRegistry())
        self.promotions = Promotions(self.registry, self.metrics)
        self.refresher = Refresher(config, self.store, self.registry, self.metrics, self.promotions)
        self.stopping = threading.Event()  # set by a signal: stop taking work
        self.watcher = RegressionWatch(
            config.watch,
            vllm_prefix=config.serving.vllm_adapter_prefix,
            store=self.store,
            registry=self.registry,
            metrics=self.metrics,
            promotions=self.promotions,
            stopping=self.stopping,
            max_actor_share=config.gate.max_actor_share,
        )
        evaluation = config.training.spec().eval  # the gate's detectors, for served drafts
        self.canary = CanaryAnalysis(
            config.rollout,
            grounding=evaluation.grounding,
            rules=evaluation.policy_rules,
            store=self.store,
            registry=self.registry,
            metrics=self.metrics,
            promotions=self.promotions,
            stopping=self.stopping,
            max_actor_share=config.gate.max_actor_share,
        )
        self.drift = DriftProbe(self.registry, self.metrics, self.stopping)
        self.consumer = FeedbackConsumer(
            config.kafka,
            self.store,
            config.limits,
            on_batch=self.metrics.record_batch,
            verifier=Verifier(config.attribution) if config.attribution.signed_kinds else None,
        )
        self.consumer_stop = threading.Event()
        self.refresh_stop = threading.Event()
        self.manual_refresh: str | None = None
        self.manual_full = False  # the operator asked for a full retrain
        self._new_counts: dict[str, int] | None = None  # as of the last tick
        self._lock = threading.Lock()
        self._refresh_thread: threading.Thread | None = None
        self._consumer_thread: threading.Thread | None = None
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )
        self.http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self.started_at = time.time()
        self.desk = Desk(
            data_dir=data,
            registry=self.registry,
            refresher=self.refresher,
            watcher=self.watcher,
            analysis=self.canary,
            promotions=self.promotions,
            store=self.store,
            consumer=self.consumer,
            metrics=self.metrics,
            stopping=self.stopping,
            request_refresh=self.request_refresh,
            new_counts=lambda: self._new_counts,
            started_at=self.started_at,
        )  # what the API and the console read and do (daemon.operations)

    # --- lifecycle ----------------------------------------------------------------------------
    def admin_token(self) -> str | None:
        return read_secret(self.config.admin.token, self.config.admin.token_file)

    def app(self) -> FastAPI:
        """The admin API over this service."""
        admin = self.config.admin
        tokens = Tokens(
            self.admin_token(),
            read_secret(admin.read_token, admin.read_token_file),
            operators=admin.operator_tokens(),
            on_failure=lambda surface: self.metrics.auth_failures.labels(surface=surface).inc(),
        )
        app = make_app(self.desk, tokens=tokens, max_body_bytes=admin.max_body_bytes)
        mount_console(app, self.desk, tokens=tokens)
        return app

    def start(self) -> None:
        log.info("starting alignd with config %s", json.dumps(self.config.redacted(), default=str))
        self.replay_serving()
        self.promotions.publish_active()
        self._consumer_thread = threading.Thread(
            target=self.consumer.run,
            args=(self.consumer_stop,),
            name="feedback-consumer",
            daemon=True,
        )
        self._consumer_thread.start()
        schedule = self.config.schedule
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=schedule.tick_s,
            id="refresh-tick",
            next_run_time=datetime.now(UTC),
        )
        if self.config.watch.enabled:
            self.scheduler.add_job(
                self.watch,
                "interval",
                seconds=self.config.watch.interval_s,
                id="regression-watch",
                next_run_time=datetime.now(UTC),
            )
        self.scheduler.add_job(
            self.canary_check,
            "interval",
            seconds=self.config.rollout.interval_s,
            id="canary-analysis",
            next_run_time=datetime.now(UTC),
        )
        if schedule.drift_probe_cron:
            self.scheduler.add_job(
                self.drift_probe,
                CronTrigger.from_crontab(schedule.drift_probe_cron, timezone="UTC"),
                id="drift-probe",
            )
        if schedule.retention_cron and self.config.store.retention_days:
            self.scheduler.add_job(
                self.retention,
                CronTrigger.from_crontab(schedule.retention_cron, timezone="UTC"),
                id="retention",
            )
        self.scheduler.start()
        admin = self.config.admin
        self.http = uvicorn.Server(
            uvicorn.Config(
                self.app(),
                host=admin.host,
                port=admin.port,
                log_level="warning",
                access_log=False,
                limit_concurrency=admin.max_connections,
                timeout_keep_alive=int(admin.keep_alive_s),
                http=with_head_deadline(admin.request_head_timeout_s),
            )
        )
        self._http_thread = threading.Thread(target=self.http.run, name="admin-http", daemon=True)
        self._http_thread.start()
        log.info("alignd serving on http://%s:%d", admin.host, admin.port)

    def run_until_signal(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: draining", signal.Signals(signum).name)
            self.stopping.set()  # only flip state; drain() does the work

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.stopping.wait()

    def drain(self) -> None:
        deadline = time.monotonic() + self.config.admin.drain_s
        self.stopping.set()
        self.scheduler.shutdown(wait=False)
        self.consumer_stop.set()
        # the refresh worker stops its trainer child: SIGTERM, grace period, SIGKILL
        self.refresh_stop.set()
        for thread in (self._refresh_thread, self._consumer_thread):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic() - 1.0))
        log.info("drained in %.1fs", self.config.admin.drain_s - (deadline - time.monotonic()))

    def close(self) -> None:
        if self.http is not None:
            self.http.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(5)
        self.consumer.close()
        self.store.close()
        self.instance_lock.release()

    # --- refresh scheduling -------------------------------------------------------------------
    def request_refresh(self, actor: str, *, full: bool = False) -> tuple[bool, str]:
        with self._lock:
            if self.stopping.is_set():
                return False, "alignd is shutting down"
            if self.refresher.running.is_set() or self._refresh_busy():
                return False, "a refresh is already running"
            self.manual_refresh, self.manual_full = actor, full
        threading.Thread(target=self.tick, name="refresh-tick-manual", daemon=True).start()
        return True, f"{'full ' if full else ''}refresh requested by {actor}"

    def _refresh_busy(self) -> bool:
        return self._refresh_thread is not None and self._refresh_thread.is_alive()

    def replay_serving(self) -> None:
        """An activation recorded but not yet served everywhere (a crash between the two, a
        model server that was down) is replayed until serving agrees with the registry."""
        failures = self.registry.replay_serving()
        if failures:
            log.warning("serving still disagrees with the registry: %s", "; ".join(failures))
        self.metrics.serving_pending.set(1 if self.registry.serving_state() == "pending" else 0)

    def tick(self) -> None:
        """Gather the state, ask the pure decision, start a refresh worker if due."""
        self.replay_serving()
        with self._lock:
            if self.stopping.is_set():
                return
            decision, counts = self.refresher.due(
                datetime.now(UTC),
                running=self._refresh_busy(),
                manual=self.manual_refresh is not None,
            )
            self._new_counts = counts  # status shows these: it never counts the store itself
            if not decision.due:
                return
            trigger = RefreshTrigger.OPERATOR if self.manual_refresh else decision.trigger
            assert trigger is not None  # a due decision always names its trigger
            detail = (
                f"requested by {self.manual_refresh}" if self.manual_refresh else decision.reason
            )
            full, self.manual_refresh, self.manual_full = self.manual_full, None, False
            self.refresh_stop.clear()
            self._refresh_thread = threading.Thread(
                target=self.refresher.refresh,
                args=(trigger, self.refresh_stop, detail, full),
                name="refresh",
                daemon=True,
            )
            self._refresh_thread.start()
        log.info("refresh started: %s", trigger)

    # --- periodic jobs ------------------------------------------------------------------------
    def retention(self) -> None:
        days = self.config.store.retention_days
        if days:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            removed = self.store.delete_older_than(cutoff)
            removed["snapshots"] = self.refresher.expire_snapshots(cutoff)
            removed["runs"] = self.refresher.expire_runs(cutoff)
            log.info(
                "retention (%d days): removed %s",
                days,
                ", ".join(f"{n} from {where}" for where, n in removed.items()),
            )

    def watch(self, now: datetime | None = None) -> Verdict | None:
        """One judgement of the regression watch (``daemon.regression``)."""
        return self.watcher.check(now)

    def canary_check(self, now: datetime | None = None) -> CanaryVerdict | None:
        """One judgement of the canary analysis (``daemon.rollout``); nothing without a canary."""
        return self.canary.check(now)

    def drift_probe(self) -> float | None:
        """KL(active ‖ reference) on recent production replies (``daemon.drift``)."""
        return self.drift.run(self.config, self.refresher.runner)


def serve(config: AligndConfig) -> int:
    try:
        service = Service(config)
    except AlreadyRunning as e:
        log.error("not starting: %s", e)
        return 3
    except StoreUnusable as e:
        log.error("not starting: %s", e)
        return 2
    service.start()
    try:
        service.run_until_signal()
        service.drain()
    finally:
        service.close()
    return 0

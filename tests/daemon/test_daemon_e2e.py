"""`alignd serve` end to end on a tiny random model, with a real broker and a real SQLite store.

Events → the daemon ingests → an operator triggers a refresh → train → gate → promote; then
contradictory feedback → the gate rejects the next candidate naming the failed check; an
operator force-promotes it and rolls back; /metrics shows the counters moving; SIGTERM in the
middle of a training run exits cleanly within the drain bound and leaves the registry valid.

The gate's factuality and generation checks are switched off here: on a random tiny model
they measure noise. They are covered by the gate's table tests and the demo on SmolLM2.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
from daemon_support import ORDERS, Daemon, curated_pairs, edit_events, write_config
from services import wait_until

from daemon.registry import Registry, check_adapter_dir
from demo.broker import EmbeddedBroker, free_port, produce_events


def test_daemon_end_to_end(child_processes: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        daemon = Daemon(
            write_config(
                tmp_path,
                broker,
                tiny_model_dir,
                port,
                max_steps=12,
                overrides={"gate": {"curated_heldout": str(curated_pairs(tmp_path / "c.jsonl"))}},
            ),
            tmp_path,
            port,
        )
        try:
            # 1. good feedback → refresh → v0001 passes the gate and becomes active
            produce_events(
                broker.bootstrap, "alignd.feedback", [*edit_events("good"), b"{not json"]
            )
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["last_seq"] == len(ORDERS), 60
            )
            assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200
            first = daemon.refresh_and_wait()
            assert first["outcome"] == "promoted", first
            assert (
                first["version"] == "v0001"
                and daemon.get("/v1/status")["active_adapter"] == "v0001"
            )

            # 2. every edit reversed, twice: the reversed side wins each pair's vote, so the
            # stream's own held-out split agrees with it; the curated set rejects the candidate
            flipped = edit_events("flipped-a", flipped=True) + edit_events(
                "flipped-b", flipped=True
            )
            produce_events(broker.bootstrap, "alignd.feedback", flipped)
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["last_seq"] == 3 * len(ORDERS), 60
            )
            second = daemon.refresh_and_wait()
            assert second["outcome"] == "rejected", second
            failed = [c["name"] for c in second["gate"]["checks"] if not c["passed"]]
            assert "curated_accuracy" in failed, second["gate"]
            assert daemon.get("/v1/status")["active_adapter"] == "v0001"
            # the reversed edits are the same (prompt, reply) texts: every reference log-prob
            # comes from the cache the first refresh filled, none is recomputed
            runs = tmp_path / "data" / "runs"
            reference = json.loads((runs / second["run_id"] / "train" / "result.json").read_text())[
                "reference_logps"
            ]
            assert reference["computed"] == 0 and reference["hits"] > 0, reference
            # warm-started from v0001 on the rows its snapshot did not have (the flipped ones)
            data = second["training_data"]
            assert data["mode"] == "incremental" and data["base_version"] == "v0001", data
            assert 0 < data["new"]["pairs"] <= len(ORDERS), data
            adapters = {a["version"]: a["state"] for a in daemon.get("/v1/adapters")}
            assert adapters == {"v0001": "active", "v0002": "rejected"}

            # 3. an operator overrides the gate, then rolls back
            assert daemon.post("/v1/adapters/v0002/promote").status_code == 409  # the gate said no
            assert (
                daemon.post(
                    "/v1/adapters/v0002/promote", {"force": True, "reason": "test"}
                ).status_code
                == 200
            )
            assert daemon.get("/v1/status")["active_adapter"] == "v0002"
            rollback = daemon.post("/v1/rollback", {"reason": "replies got worse"})
            assert rollback.status_code == 200 and rollback.json()["active"] == "v0001"
            current = tmp_path / "data" / "registry" / "current"
            assert os.readlink(current) == "adapters/v0001"

            # 4. the counters moved
            assert daemon.metric("alignd_events_stored_total", type="edit") == 3 * len(ORDERS)
            assert daemon.metric("alignd_events_dead_lettered_total", reason="invalid_json") == 1
            assert daemon.metric("alignd_refresh_runs_total", outcome="promoted") == 1
            assert daemon.metric("alignd_refresh_runs_total", outcome="rejected") == 1
            assert daemon.metric("alignd_gate_failed_checks_total", check="curated_accuracy") == 1
            assert daemon.metric("alignd_rollbacks_total", trigger="operator") == 1
            assert daemon.metric("alignd_consumer_ready") == 1
            assert daemon.metric("alignd_last_training_loss") > 0
            assert daemon.metric("alignd_last_successful_refresh_timestamp_seconds") > 0
            assert daemon.stop() == 0
        finally:
            daemon.stop()

        # 5. SIGTERM in the middle of a long training run
        daemon = Daemon(
            write_config(tmp_path, broker, tiny_model_dir, port, max_steps=100_000), tmp_path, port
        )
        try:
            assert daemon.post("/v1/refresh").status_code == 202
            assert wait_until(lambda: daemon.get("/v1/status")["refresh_running"], 30)
            run_id = daemon.get("/v1/status")["last_run_id"]
            train_log = tmp_path / "data" / "runs" / run_id / "train.log"
            assert wait_until(
                lambda: train_log.exists() and "training:" in train_log.read_text(errors="ignore"),
                120,
            )
            started = time.monotonic()
            code = daemon.stop()
            elapsed = time.monotonic() - started
            assert code == 0
            assert elapsed < 20, f"drain took {elapsed:.1f}s, bound is 20s"
        finally:
            daemon.stop()
        status = json.loads((tmp_path / "data" / "runs" / run_id / "status.json").read_text())
        assert status["outcome"] == "interrupted"
        registry = Registry(tmp_path / "data" / "registry")
        assert registry.active() == "v0001"
        assert registry.versions() == ["v0001", "v0002"]  # the interrupted run added nothing
        for version in registry.versions():
            check_adapter_dir(registry.version_dir(version))

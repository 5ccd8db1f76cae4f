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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from services import wait_until

from daemon.registry import Registry, check_adapter_dir
from feedback.consumer import produce_events
from feedback.embedded_broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token-0123456789"
ORDERS = range(1000, 1040)


def edit_events(prefix: str, flipped: bool = False) -> list[bytes]:
    out = []
    for n in ORDERS:
        # Similar lengths, so the reversed edits pass the dataset's length-ratio filter.
        original = f"So sorry, order {n} is delayed."
        edited = f"Order {n} ships today."
        completion, edited_completion = (edited, original) if flipped else (original, edited)
        out.append(
            json.dumps(
                {
                    "schema_version": 1,
                    "event_id": f"{prefix}-{n}",
                    "type": "edit",
                    "occurred_at": "2026-11-20T10:00:00Z",
                    "prompt": [{"role": "user", "content": f"Where is my order {n}?"}],
                    "completion": completion,
                    "edited_completion": edited_completion,
                }
            ).encode()
        )
    return out


def write_config(
    tmp_path: Path, broker: EmbeddedBroker, model_dir: Path, port: int, max_steps: int
) -> Path:
    config = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "retry_backoff_max_s": 2,
        },
        "store": {"url": f"sqlite:///{tmp_path / 'data' / 'feedback.db'}"},
        "paths": {"data_dir": str(tmp_path / "data")},
        "dataset": {"heldout_fraction": 0.25},
        "schedule": {
            "cron": None,
            "min_new_pairs": None,
            "min_new_ratings": None,
            "min_interval_s": 0,
            "tick_s": 1,
            "drift_probe_cron": None,
        },
        "training": {
            "base_model": str(model_dir),
            "min_pairs": 4,
            "stop_grace_s": 5,
            "run_spec": {
                "hyper": {
                    "max_steps": max_steps,
                    "learning_rate": 0.01,
                    "batch_size": 4,
                    "warmup_ratio": 0,
                },
                "eval": {"factuality_set": None, "generate_max_prompts": 0},
            },
        },
        "gate": {
            "factuality_tolerance": None,
            "max_degenerate_rate": None,
            "min_distinct_rate": None,
            "length_band": None,
            "relevance_tolerance": None,
            "chosen_logp_tolerance": None,
            "kl_budget": 5.0,
            "min_preference_accuracy": 0.75,
        },
        "admin": {"port": port, "drain_s": 20},
    }
    path = tmp_path / f"alignd-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Daemon:
    def __init__(self, config: Path, tmp_path: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = (tmp_path / "serve.log").open("ab")
        env = os.environ | {"ALIGND_ADMIN__TOKEN": TOKEN}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        assert wait_until(self.healthy, 60), "daemon did not come up"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return httpx.post(
            self.url + path, json=body, timeout=30, headers={"authorization": f"Bearer {TOKEN}"}
        )

    def refresh_and_wait(self, timeout_s: float = 240) -> dict[str, Any]:
        before = self.get("/v1/status")["last_run_id"]
        assert self.post("/v1/refresh").status_code == 202
        assert wait_until(lambda: self.get("/v1/status")["last_run_id"] != before, 30)
        run_id = self.get("/v1/status")["last_run_id"]
        assert wait_until(
            lambda: self.get(f"/v1/runs/{run_id}")["outcome"] != "running", timeout_s, 1.0
        )
        return dict(self.get(f"/v1/runs/{run_id}"))

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + ("{" + wanted + "}" if labels else " ")) or (
                labels
                and line.startswith(name + "{")
                and all(f'{k}="{v}"' in line for k, v in labels.items())
            ):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name}{labels} not in /metrics")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        return self.proc.returncode


def test_daemon_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        daemon = Daemon(
            write_config(tmp_path, broker, tiny_model_dir, port, max_steps=12), tmp_path, port
        )
        try:
            # 1. good feedback → refresh → v0001 passes the gate and becomes active
            produce_events(
                broker.bootstrap, "alignd.feedback", [*edit_events("good"), b"{not json"]
            )
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["events"] == len(ORDERS), 60
            )
            assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200
            first = daemon.refresh_and_wait()
            assert first["outcome"] == "promoted", first
            assert (
                first["version"] == "v0001"
                and daemon.get("/v1/status")["active_adapter"] == "v0001"
            )

            # 2. contradictory feedback (every edit reversed) → the next candidate is rejected
            produce_events(
                broker.bootstrap, "alignd.feedback", edit_events("flipped", flipped=True)
            )
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["events"] == 2 * len(ORDERS), 60
            )
            second = daemon.refresh_and_wait()
            assert second["outcome"] == "rejected", second
            failed = [c["name"] for c in second["gate"]["checks"] if not c["passed"]]
            assert "preference_accuracy" in failed
            assert daemon.get("/v1/status")["active_adapter"] == "v0001"
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
            assert daemon.metric("alignd_events_stored_total", type="edit") == 2 * len(ORDERS)
            assert daemon.metric("alignd_events_dead_lettered_total", reason="invalid_json") == 1
            assert daemon.metric("alignd_refresh_runs_total", outcome="promoted") == 1
            assert daemon.metric("alignd_refresh_runs_total", outcome="rejected") == 1
            assert (
                daemon.metric("alignd_gate_failed_checks_total", check="preference_accuracy") == 1
            )
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

"""A running `alignd serve` for end-to-end tests: its config, HTTP helpers and shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from services import wait_until

from daemon.config import AligndConfig
from daemon.service import Service
from demo.broker import EmbeddedBroker
from feedback.events import parse_event
from feedback.store import Incoming
from trainer.spec import deep_merge

TOKEN = "test-admin-token-0123456789"
ORDERS = range(1000, 1040)


@contextmanager
def in_process_service(tmp_path: Path, **config: Any) -> Iterator[Service]:
    """A ``Service`` in this process (nothing started) on a SQLite store under ``tmp_path``;
    ``config`` is merged into its config. Closed and its instance lock released after."""
    base = {"paths": {"data_dir": tmp_path / "data"},
            "store": {"url": f"sqlite:///{tmp_path / 'f.db'}"}}  # fmt: skip
    service = Service(AligndConfig(**deep_merge(base, config)))
    try:
        yield service
    finally:
        service.store.close()
        service.instance_lock.release()


def agent_edits(start: int, stop: int, now: datetime | None = None) -> list[Incoming]:
    """Agents' edits of orders ``start``…``stop - 1`` (an apology rewritten to a plain answer),
    parsed as the consumer would at ``now``."""
    out = []
    for n in range(start, stop):
        raw = {
            "schema_version": 1, "event_id": f"e{n}", "type": "edit",
            "occurred_at": "2026-11-20T10:00:00Z",
            "prompt": [{"role": "user", "content": f"Where is my order {n}?"}],
            "completion": f"So sorry! Order {n} is delayed.",
            "edited_completion": f"Order {n} ships today.",
        }  # fmt: skip
        out.append(Incoming(parse_event(json.dumps(raw).encode(), now=now)))  # type: ignore[arg-type]
    return out


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


def curated_pairs(path: Path) -> Path:
    """An operator's curated held-out set: the good direction, on orders the stream never had."""
    rows = [
        {"prompt": f"Where is my order {n}?", "chosen": f"Order {n} ships today.",
         "rejected": f"So sorry, order {n} is delayed."}
        for n in range(2000, 2040)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(
    tmp_path: Path,
    broker: EmbeddedBroker,
    model_dir: Path | str,
    port: int,
    max_steps: int,
    overrides: dict[str, Any] | None = None,
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
        "dataset": {"heldout_fraction": 0.25, "split_salt": "e2e-fixed-salt"},  # deterministic
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
            "unsupported_tolerance": None,
            "max_unsupported_rate": None,
            "policy_tolerance": None,
            "min_policy_compliance": None,
            "chosen_logp_tolerance": None,
            "drift_budget": None,  # a tiny random model drifts by chance
            "min_preference_accuracy": 0.75,
            "max_actor_share": None,  # these events name no actor; tests that do turn it on
        },
        "admin": {"port": port, "drain_s": 20},
    }
    config = deep_merge(config, overrides or {})
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
        auth = {"authorization": f"Bearer {TOKEN}"}
        response = httpx.get(self.url + path, timeout=10, headers=auth)
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

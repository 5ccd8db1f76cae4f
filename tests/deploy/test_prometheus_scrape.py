"""A real scrape: Prometheus (Debian's server) on loopback scrapes a running `alignd serve`,
loads the alert rules, and answers queries for alignd's metrics through its HTTP API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from services import wait_until

from demo.broker import EmbeddedBroker, free_port, produce_events

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alignd-rules.yml"


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    try:
        body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    except httpx.HTTPError:
        return []
    result: list[dict[str, Any]] = body.get("data", {}).get("result", [])
    return result


def test_prometheus_scrapes_alignd(tmp_path: Path, prometheus_binary: str) -> None:
    binary = prometheus_binary
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback")
        broker.create_topics("alignd.feedback.dlq")
        produce_events(broker.bootstrap, "alignd.feedback", [b"{broken", b"[]"])
        alignd_port, prom_port = free_port(), free_port()
        config = tmp_path / "alignd.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "kafka": {
                        "bootstrap_servers": broker.bootstrap,
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 1000,
                    },
                    "store": {"url": f"sqlite:///{tmp_path / 'f.db'}"},
                    "paths": {"data_dir": str(tmp_path / "data")},
                    "schedule": {
                        "cron": None,
                        "min_new_pairs": None,
                        "min_new_ratings": None,
                        "drift_probe_cron": None,
                    },
                    "admin": {"port": alignd_port},
                }
            )
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        prom_config = tmp_path / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "alignd",
                            "static_configs": [{"targets": [f"127.0.0.1:{alignd_port}"]}],
                        }
                    ],
                }
            )
        )
        prom = subprocess.Popen(
            [
                binary,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{prom_port}"
        try:
            assert wait_until(lambda: query(url, 'up{job="alignd"} == 1'), 60), (
                "Prometheus never scraped alignd"
            )
            # both reasons scraped (a scrape may land between the two dead-letterings)
            assert wait_until(
                lambda: len(query(url, "alignd_events_dead_lettered_total > 0")) >= 2, 60
            )
            dead = {
                r["metric"]["reason"]: float(r["value"][1])
                for r in query(url, "alignd_events_dead_lettered_total > 0")
            }
            assert dead == {"invalid_json": 1.0, "wrong_type": 1.0}
            assert wait_until(lambda: query(url, "alignd_consumer_ready == 1"), 30)
            rules = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            names = {r["name"] for g in rules for r in g["rules"]}
            assert {
                "AligndKLDriftHigh",
                "AligndMetricsAbsent",
                "AligndDeadLetterRatioHigh",
            } <= names
        finally:
            for proc in (prom, daemon):
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)

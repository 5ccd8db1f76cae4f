"""SIGKILL of the daemon in the middle of a refresh: its trainer child dies with it, the run is
recorded as interrupted on restart, the registry is valid with the active adapter unchanged,
and the next refresh runs and succeeds."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
from daemon_support import Daemon, write_config
from services import wait_until
from test_daemon_e2e import ORDERS, edit_events

from daemon.registry import Registry, check_adapter_dir
from feedback.consumer import produce_events
from feedback.embedded_broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_daemon_sigkilled_mid_refresh(tiny_model_dir: Path, tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        short = write_config(tmp_path, broker, tiny_model_dir, port, max_steps=8)
        daemon = Daemon(short, tmp_path, port)
        produce_events(broker.bootstrap, "alignd.feedback", edit_events("good"))
        assert wait_until(lambda: daemon.get("/v1/status")["store"]["events"] == len(ORDERS), 60)
        assert daemon.refresh_and_wait()["outcome"] == "promoted"
        daemon.stop()

        long = write_config(tmp_path, broker, tiny_model_dir, port, max_steps=100_000)
        daemon = Daemon(long, tmp_path, port)
        try:
            assert daemon.post("/v1/refresh").status_code == 202
            assert wait_until(lambda: daemon.get("/v1/status")["refresh_running"], 30)
            run_id = daemon.get("/v1/status")["last_run_id"]
            log = tmp_path / "data" / "runs" / run_id / "train.log"
            assert wait_until(
                lambda: log.exists() and "training:" in log.read_text(errors="ignore"), 120
            )
            # children of every thread: the refresh worker thread spawned the trainer
            tasks = Path(f"/proc/{daemon.proc.pid}/task").iterdir()
            children = [
                int(pid) for task in tasks for pid in (task / "children").read_text().split()
            ]
            assert children, "the trainer child should be running"
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            assert wait_until(lambda: not any(pid_alive(c) for c in children), 30), (
                "trainer outlived the daemon"
            )
        finally:
            if daemon.proc.poll() is None:  # a failed assertion must not leave it training
                daemon.proc.kill()

        daemon = Daemon(short, tmp_path, port)
        try:
            assert daemon.get(f"/v1/runs/{run_id}")["outcome"] == "interrupted"
            registry = Registry(tmp_path / "data" / "registry")
            assert registry.versions() == ["v0001"] and registry.active() == "v0001"
            check_adapter_dir(registry.version_dir("v0001"))
            time.sleep(1)
            after = daemon.refresh_and_wait()
            assert after["outcome"] in {"promoted", "rejected"}, after  # a complete run, gated
        finally:
            daemon.stop()

"""SIGKILL of the daemon in the middle of a refresh, and at random moments of whole refreshes:
its trainer child dies with it, the run is recorded as interrupted on restart, the registry is
valid with the active adapter unchanged (unless the killed run had finished promoting), and the
next refresh runs and succeeds."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
from daemon_support import Daemon, write_config
from services import wait_until
from test_daemon_e2e import ORDERS, edit_events

from daemon.registry import Registry, check_adapter_dir
from demo.broker import EmbeddedBroker, free_port, produce_events


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def trainer_children(proc: subprocess.Popen[bytes]) -> list[int]:
    """Children of every daemon thread: the refresh worker thread spawns the trainer."""
    pids = []
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we read
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def start_refresh(daemon: Daemon) -> str:
    before = daemon.get("/v1/status")["last_run_id"]
    assert daemon.post("/v1/refresh").status_code == 202
    assert wait_until(lambda: daemon.get("/v1/status")["last_run_id"] != before, 30)
    return str(daemon.get("/v1/status")["last_run_id"])


def sigkill_with_its_trainer(daemon: Daemon) -> list[int]:
    """SIGKILL the daemon; its trainer child (if one runs) must die with it."""
    children = trainer_children(daemon.proc)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    survived = not wait_until(lambda: not any(pid_alive(c) for c in children), 30)
    if survived:  # do not leave an orphan training for the rest of the suite
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not survived, "trainer outlived the daemon"
    return children


def test_daemon_sigkilled_mid_refresh(
    child_processes: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        short = write_config(tmp_path, broker, tiny_model_dir, port, max_steps=8)
        daemon = Daemon(short, tmp_path, port)
        produce_events(broker.bootstrap, "alignd.feedback", edit_events("good"))
        assert wait_until(lambda: daemon.get("/v1/status")["store"]["last_seq"] == len(ORDERS), 60)
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
            assert trainer_children(daemon.proc), "the trainer child should be running"
            sigkill_with_its_trainer(daemon)
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


def test_daemon_sigkilled_at_random_points_of_refreshes(
    child_processes: None, tiny_model_dir: Path, tmp_path: Path, fault_figures
) -> None:
    """Four SIGKILLs at seeded-random moments of a whole refresh (snapshot, training, evaluation,
    gate, registration): after each restart no run is left running, every version is complete,
    and the active adapter changed only to a version the killed run itself had registered (a
    kill between the atomic promotion and the run's status write leaves it 'interrupted')."""
    rng = random.Random(8)
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=2)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        config = write_config(tmp_path, broker, tiny_model_dir, port, max_steps=8)
        daemon = Daemon(config, tmp_path, port)
        try:
            produce_events(broker.bootstrap, "alignd.feedback", edit_events("good"))
            assert wait_until(
                lambda: daemon.get("/v1/status")["store"]["last_seq"] == len(ORDERS), 60
            )
            started = time.monotonic()
            assert daemon.refresh_and_wait()["outcome"] == "promoted"
            whole_refresh_s = time.monotonic() - started
            registry = Registry(tmp_path / "data" / "registry")
            kill_points: list[tuple[float, str]] = []
            for _ in range(4):
                active_before = registry.active()
                run_id = start_refresh(daemon)
                delay = rng.uniform(0.0, whole_refresh_s)
                time.sleep(delay)
                sigkill_with_its_trainer(daemon)
                daemon = Daemon(config, tmp_path, port)
                run = daemon.get(f"/v1/runs/{run_id}")
                kill_points.append((round(delay, 1), run["outcome"]))
                assert run["outcome"] != "running", run
                for version in registry.versions():
                    check_adapter_dir(registry.version_dir(version))
                active = registry.active()
                if run["outcome"] == "promoted":
                    assert active == run["version"], (run, kill_points)
                elif active != active_before:  # only to a version this very run registered
                    manifest = json.loads(
                        (registry.version_dir(active) / "manifest.json").read_text()
                    )
                    assert manifest["run_id"] == run_id, (run, kill_points)
                    assert run["outcome"] == "interrupted", (run, kill_points)
            after = daemon.refresh_and_wait()
            assert after["outcome"] == "promoted", (after, kill_points)
            assert registry.active() == after["version"]
            outcomes = [outcome for _, outcome in kill_points]
            fault_figures(
                "daemon SIGKILLed at 4 random refresh moments",
                whole_refresh_s=round(whole_refresh_s, 1),
                kills_at_s=" ".join(str(at) for at, _ in kill_points),
                interrupted=outcomes.count("interrupted"),
                completed_before_kill=len(outcomes) - outcomes.count("interrupted"),
                versions=len(registry.versions()),
            )
        finally:
            daemon.stop()

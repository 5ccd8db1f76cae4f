"""Child processes: isolated from the daemon's working directory and import path, without the
daemon's secrets, and stopped on drain or timeout. Real processes throughout."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

import trainer
from daemon.child import ChildEnd, child_env, run_child, start_child, supervise_child

SECRETS = {
    "ALIGND_ADMIN__TOKEN": "admin-token-value-0123456789",
    "ALIGND_ADMIN__READ_TOKEN": "read-token-value-0123456789",
    "ALIGND_STORE__URL": "postgresql+psycopg://alignd:pg-password@db/alignd",
    "ALIGND_KAFKA__SASL_PLAIN_PASSWORD": "kafka-password",
    "HF_TOKEN": "hf-token-value",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "OPENAI_API_KEY": "openai-key",
}


def test_a_planted_package_in_the_working_directory_is_never_imported(
    child_processes: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's working directory is the writable shared volume: a ``trainer/`` planted there
    (or on PYTHONPATH) must not shadow the installed one in a child."""
    planted = tmp_path / "shared"
    (planted / "trainer").mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "trainer" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    out = tmp_path / "which.txt"
    code = run_child(["-c", f"import trainer; open({str(out)!r}, 'w').write(trainer.__file__)"])
    assert code == 0
    assert not marker.exists()
    assert Path(out.read_text()).resolve() == Path(trainer.__file__).resolve()


def test_children_do_not_inherit_secrets(
    child_processes: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ALIGND_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "env.json"
    script = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    assert run_child(["-c", script]) == 0
    seen = json.loads(out.read_text())
    assert not set(SECRETS) & set(seen)
    assert not any(v in json.dumps(seen) for v in SECRETS.values())
    assert seen["ALIGND_CACHE_DIR"] == str(tmp_path / "cache")  # what a child does need
    assert "PATH" in seen


def test_child_env_keeps_ordinary_variables() -> None:
    env = child_env({"PATH": "/bin", "HOME": "/h", "ALIGND_X": "1", "MY_PASSWORD": "p"})
    assert env == {"PATH": "/bin", "HOME": "/h"}


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_a_child_is_stopped_on_drain_or_timeout(child_processes: None, how: str) -> None:
    child = start_child(["-c", "import time; time.sleep(120)"])
    stop = threading.Event()
    if how == "stop":
        threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    end = supervise_child(child, stop=stop, timeout_s=1.0 if how == "timeout" else 60, grace_s=2)
    assert end is (ChildEnd.STOPPED if how == "stop" else ChildEnd.TIMED_OUT)
    assert child.returncode is not None and time.monotonic() - started < 10


def test_isolated_child_starts_in_a_safe_directory(child_processes: None, tmp_path: Path) -> None:
    out = tmp_path / "cwd.txt"
    assert run_child(["-c", f"import os; open({str(out)!r}, 'w').write(os.getcwd())"]) == 0
    assert out.read_text() == "/"
    assert sys.flags.isolated == 0  # the test process itself is not isolated


@pytest.mark.parametrize("how", ["drain", "timeout"])
def test_the_drift_probe_is_bounded_and_stops_on_drain(
    child_processes: None, tmp_path: Path, how: str
) -> None:
    """The probe child (here a stand-in that hangs, as a probe on a huge base would) is
    stopped when the daemon drains or the probe's timeout passes, and counted."""
    from registry_support import make_adapter

    from daemon.config import AligndConfig
    from daemon.service import Service
    from feedback.events import Rejection, parse_event
    from feedback.store import Incoming

    service = Service(
        AligndConfig(
            paths={"data_dir": tmp_path / "data"},
            store={"url": f"sqlite:///{tmp_path / 'f.db'}"},
            schedule={"drift_probe_timeout_s": 1.0 if how == "timeout" else 600},
            training={"stop_grace_s": 1},
        )
    )
    try:
        version = service.registry.register(make_adapter(tmp_path / "a"), {"gate": {"promote": 1}})
        service.registry.promote(version, actor="t", reason="t")
        event = parse_event(
            json.dumps(
                {
                    "schema_version": 1,
                    "event_id": "e1",
                    "type": "rating",
                    "occurred_at": "2026-11-20T10:00:00Z",
                    "prompt": [{"role": "user", "content": "Where is my order?"}],
                    "completion": "It ships today.",
                    "rating": "up",
                }
            ).encode()
        )
        assert not isinstance(event, Rejection)
        service.store.write_batch([Incoming(event)])
        service.refresher.runner.probe_command = ("-c", "import time; time.sleep(120)")
        if how == "drain":
            threading.Timer(0.5, service.stopping.set).start()
        started = time.monotonic()
        assert service.drift_probe() is None
        assert time.monotonic() - started < 10
        reason = "stopped" if how == "drain" else "timed_out"
        assert service.metrics.drift_probe_failures.labels(reason=reason)._value.get() == 1
    finally:
        service.close()

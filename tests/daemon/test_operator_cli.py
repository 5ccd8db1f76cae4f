"""The operator commands (`alignd status`, `alignd adapters …`) against a live admin API."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from registry_support import make_adapter

from daemon.cli import main
from daemon.config import AligndConfig
from daemon.service import Service
from demo.broker import free_port

TOKEN = "operator-cli-token-0123456789"


@pytest.fixture()
def url(tmp_path: Path):
    config = AligndConfig(
        paths={"data_dir": tmp_path / "data"},
        store={"url": f"sqlite:///{tmp_path / 'f.db'}"},
        admin={"token": TOKEN},
    )
    service = Service(config)
    for i in range(2):
        service.registry.register(
            make_adapter(tmp_path / f"a{i}", seed=i),
            {"gate": {"promote": True, "checks": []}, "method": "dpo"},
        )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(service.app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)
    service.store.close()


def test_operator_workflow(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    auth = ["--url", url, "--token", TOKEN]
    assert main(["adapters", "list", "--url", url]) == 1  # reads need a token too
    assert "401" in capsys.readouterr().err
    assert main(["adapters", "list", *auth]) == 0
    table = capsys.readouterr().out
    assert "VERSION" in table and "v0001" in table and "candidate" in table
    assert main(["adapters", "promote", "v0001", *auth]) == 0
    assert "active: v0001" in capsys.readouterr().out
    assert main(["adapters", "promote", "v0002", *auth, "--reason", "better"]) == 0
    capsys.readouterr()
    assert main(["adapters", "rollback", *auth]) == 0
    assert "active: v0001" in capsys.readouterr().out
    assert main(["status", *auth, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active_adapter"] == "v0001"
    assert main(["adapters", "show", "v0002", *auth]) == 0
    assert "v0002 (retired)" in capsys.readouterr().out


def test_operator_errors_are_clear(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "promote", "v0001", "--url", url]) == 1  # no token
    assert "401" in capsys.readouterr().err
    assert main(["adapters", "promote", "v0009", "--url", url, "--token", TOKEN]) == 1
    assert "no such version" in capsys.readouterr().err
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach alignd" in capsys.readouterr().err


def test_operator_canary_commands(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`alignd canary …`: start (v0002, the gate passed it), show with the routing document,
    widen to the next step, abort; `alignd status` names the canary."""
    auth = ["--url", url, "--token", TOKEN]
    assert main(["adapters", "promote", "v0001", *auth]) == 0
    assert main(["canary", "start", "v0002", "--fraction", "0.1", *auth]) == 0
    assert "canary v0002 on 10%" in capsys.readouterr().out
    assert main(["status", *auth]) == 0
    assert "canary:           v0002 on 10%" in capsys.readouterr().out
    assert main(["canary", "widen", *auth]) == 0  # the next of rollout.steps
    assert "canary v0002 on 25%" in capsys.readouterr().out
    assert main(["canary", "show", *auth, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["routing"]["canary"] == {"version": "v0002", "adapter": "alignd-v0002",
                                          "fraction": 0.25}  # fmt: skip
    assert main(["canary", "abort", *auth, "--reason", "enough"]) == 0
    assert "no canary" in capsys.readouterr().out
    assert main(["canary", "abort", *auth]) == 1
    assert "no canary is running" in capsys.readouterr().err

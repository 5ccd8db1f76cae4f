"""The operator console in a real headless browser (Chromium from the distribution, driven by
Playwright) against a real `alignd serve` with registered versions.

Signs in with the read-only token (sees everything, can change nothing), a wrong token
(refused), the admin token; promotes a candidate and force-promotes a gate-rejected one (a
reason required), is refused when the registry changed under an open page, rolls back; checks
after each click that the registry and the audit log changed exactly as the CLI would have.
Every request the pages make stays on the daemon (no CDN), the token never appears in a URL or
the daemon's log. Screenshots at laptop and tablet widths are written to ``.artifacts/console``
(or ``$ALIGND_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_support import TOKEN, Daemon, write_config
from registry_support import make_adapter

from daemon.registry import Registry
from demo.broker import EmbeddedBroker, free_port

READ_TOKEN = "console-read-only-token-42"
ARTIFACTS = Path(os.environ.get("ALIGND_TEST_ARTIFACTS", Path(__file__).parents[2] / ".artifacts"))
SHOTS = ARTIFACTS / "console"


def gate(passed: bool) -> dict[str, Any]:
    checks = [
        {"name": "preference_accuracy", "passed": True, "value": 0.91, "threshold": 0.6,
         "detail": "0.9100 ≥ 0.6000 (floor)"},
        {"name": "kl_budget", "passed": passed, "value": 0.21 if passed else 1.11,
         "threshold": 0.5, "detail": "KL to the reference, nats/token"},
    ]  # fmt: skip
    reasons = [] if passed else ["kl_budget: 1.1103 > 0.5000"]
    return {"promote": passed, "reasons": reasons, "checks": checks}


def run_result(run_dir: Path) -> None:
    """A run's result.json as the trainer writes it: curves and both adapters' replies."""
    prompts = [[{"role": "user", "content": f"Where is my order {n}?"}] for n in (101, 102)]
    generation = {
        "candidate": ["Order 101 ships today.", "Order 102 arrives on Friday, November 13."],
        "incumbent": ["I'm so sorry! Order 101 ships today.", "I'm sorry, order 102 is late."],
    }
    result = {
        "status": "succeeded", "spec": {}, "method": "dpo", "num_steps": 20,
        "steps": [{"step": s, "loss": 0.69 - 0.02 * s, "rewards/accuracies": min(1.0, 0.5 + 0.03 * s),
                   "rewards/margins": 0.1 * s} for s in range(1, 21)],
        "eval": {
            "candidate": {"generation": {"prompts": prompts, "replies": generation["candidate"],
                                         "unsupported": [[], ["November 13"]]}},
            "reference": {"generation": {"prompts": prompts, "replies": generation["incumbent"],
                                         "unsupported": [[], []]}},
            "incumbent": {"generation": {"prompts": prompts, "replies": generation["incumbent"],
                                         "unsupported": [[], []]}},
        },
    }  # fmt: skip
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / "result.json").write_text(json.dumps(result))
    status = {"run_id": run_dir.name, "trigger": "schedule", "outcome": "held",
              "reason": "v0002 passed the gate", "started_at": "2026-11-24T08:00:00+00:00",
              "version": "v0002"}  # fmt: skip
    (run_dir / "status.json").write_text(json.dumps(status))


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Registry]]:
    data = tmp_path / "data"
    registry = Registry(data / "registry")
    for seed, (passed, run_id) in enumerate([(True, None), (True, "r20261124-080000-aaaaaa"),
                                             (False, None)]):  # fmt: skip
        manifest = {"gate": gate(passed), "method": "dpo", "dataset_sha256": f"{seed:064x}",
                    "parent": "v0001" if seed else None, "run_id": run_id,
                    "eval": {"candidate": {"kl_to_reference": 0.12 + 0.5 * seed,
                                           "retain_kl": {"nats_per_reply": 0.4 + seed, "ci95": 0.1,
                                                         "nats_per_token": 0.01, "num_replies": 63},
                                           "preference": {"reward_accuracy": 0.8 + 0.05 * seed}}},
                    }  # fmt: skip
        registry.register(make_adapter(tmp_path / f"a{seed}", seed=seed), manifest, actor="gate")
    registry.promote("v0001", actor="alignd-gate", reason="gate passed")
    run_result(data / "runs" / "r20261124-080000-aaaaaa")
    with EmbeddedBroker() as broker:
        broker.create_topics("alignd.feedback", partitions=1)
        broker.create_topics("alignd.feedback.dlq")
        port = free_port()
        overrides = {"admin": {"read_token": READ_TOKEN}, "watch": {"enabled": False}}
        running = Daemon(
            write_config(tmp_path, broker, tmp_path, port, 1, overrides), tmp_path, port
        )
        try:
            yield running, registry
        finally:
            assert running.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert TOKEN not in log and READ_TOKEN not in log


def cli(url: str, *args: str) -> None:
    env = os.environ | {"ALIGND_ADMIN__TOKEN": TOKEN, "USER": "bob"}
    subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--url", url], env=env,
                   check=True, capture_output=True)  # fmt: skip


def sign_in(page: Any, url: str, token: str, actor: str = "alice") -> None:
    page.goto(f"{url}/ui")
    page.fill("input[name=token]", token)
    page.fill("input[name=actor]", actor)
    submit(page, "Sign in")


def submit(page: Any, button: str) -> None:
    """Click a form's button and wait until the answer has loaded: a click returns once the
    navigation starts, and the page's content is empty until the new document is parsed."""
    with page.expect_navigation(wait_until="load"):
        page.click(f"button:has-text('{button}')")


def test_console_in_a_browser(daemon: tuple[Daemon, Registry], chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    running, registry = daemon
    url = running.url
    SHOTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))

        # a wrong token, then the read-only one: everything visible, no action offered
        sign_in(page, url, "not-the-token")
        assert "not valid" in page.content()
        sign_in(page, url, READ_TOKEN, "reader")
        assert "v0003" in page.content() and "read-only" in page.content()
        page.goto(f"{url}/ui/versions/v0002")
        assert "Gate checks" in page.content()
        assert page.locator("button:has-text('Promote')").count() == 0
        submit(page, "Sign out")
        assert "Sign in" in page.content()

        # the admin: the version page, candidate against the active adapter
        sign_in(page, url, TOKEN)
        assert page.locator("svg polyline").count() == 1  # drift per version
        assert "0.850" in page.content()  # v0002's held-out accuracy
        page.screenshot(path=str(SHOTS / "overview-laptop.png"), full_page=True)
        page.goto(f"{url}/ui/versions/v0002")
        content = page.content()
        assert "preference_accuracy" in content and "<ins>" in content and "<del>" in content
        assert "November 13" in content  # the unsupported specific is flagged
        assert page.locator("svg polyline").count() >= 2  # loss, rewards
        page.screenshot(path=str(SHOTS / "version-laptop.png"), full_page=True)
        page.set_viewport_size({"width": 768, "height": 1024})
        page.screenshot(path=str(SHOTS / "version-tablet.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})

        # promote v0002: the registry and audit change exactly as through the API
        page.fill("form[action='/ui/actions/promote'] input[name=reason]", "reviewed the replies")
        submit(page, "Promote v0002")
        assert "Audit entry written" in page.content()
        assert registry.active() == "v0002"
        entry = list(registry.audit())[-1]
        assert {k: entry[k] for k in ("action", "actor", "reason", "version", "previous")} == {
            "action": "promote", "actor": "alice", "reason": "reviewed the replies",
            "version": "v0002", "previous": "v0001",
        }  # fmt: skip
        assert '"actor": "alice"' in page.content()

        # a stale page: v0003's page is open, then someone else changes the registry
        page.goto(f"{url}/ui/versions/v0003")
        assert page.locator("input[name=force]").count() == 1  # the gate rejected it
        httpx.post(f"{url}/v1/rollback", json={"reason": "meanwhile"}, timeout=10,
                   headers={"authorization": f"Bearer {TOKEN}"}).raise_for_status()  # fmt: skip
        before = len(list(registry.audit()))
        page.fill("form[action='/ui/actions/promote'] input[name=reason]", "accept the KL")
        page.check("input[name=force]")
        submit(page, "Promote v0003")
        assert "changed since you looked" in page.content()
        assert registry.active() == "v0001" and len(list(registry.audit())) == before

        # reload, then force-promote the rejected one with a reason
        page.goto(f"{url}/ui/versions/v0003")
        page.fill("form[action='/ui/actions/promote'] input[name=reason]", "accept the KL")
        page.check("input[name=force]")
        submit(page, "Promote v0003")
        assert registry.active() == "v0003"
        assert list(registry.audit())[-1]["reason"] == "accept the KL"

        # roll back from the overview; compare with a rollback done through the CLI
        page.goto(f"{url}/ui")
        page.fill("form[action='/ui/actions/rollback'] input[name=reason]", "too chatty")
        submit(page, "Roll back")
        assert "Audit entry written" in page.content() and registry.active() == "v0001"
        console_entry = list(registry.audit())[-1]
        page.goto(f"{url}/ui/audit")
        page.screenshot(path=str(SHOTS / "audit-laptop.png"), full_page=True)
        browser.close()
    cli(url, "adapters", "promote", "v0002", "--reason", "via the CLI")
    cli(url, "adapters", "rollback", "--reason", "via the CLI")
    cli_entry = list(registry.audit())[-1]
    assert set(console_entry) == set(cli_entry)
    assert (console_entry["action"], console_entry["version"]) == (cli_entry["action"], "v0001")
    assert all(u.startswith(url) for u in requested), [
        u for u in requested if not u.startswith(url)
    ]
    assert not any(TOKEN in u or READ_TOKEN in u for u in requested)

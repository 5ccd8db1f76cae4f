"""Alert rules: promtool checks them and runs their unit tests (every alert firing and not);
each alert has a runbook section; every metric the rules use is one alignd exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from daemon.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alignd-rules.yml"


def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_cover_every_alert(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "test", "rules", "alignd-rules.test.yml"],
        capture_output=True,
        text=True,
        cwd=RULES.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((RULES.parent / "alignd-rules.test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts == firing == quiet, (alerts - firing, alerts - quiet)


def test_every_alert_has_summary_description_and_runbook() -> None:
    readme = (DEPLOY.parent / "docs" / "operations.md").read_text().lower()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            annotations = rule["annotations"]
            measured = (
                "$value" in annotations["description"] or "$labels" in annotations["description"]
            )
            assert (annotations["summary"] and measured) or rule["alert"] in {
                "AligndConsumerNotReady",
                "AligndMetricsAbsent",
                "AligndServingOutOfSync",  # a state, like not-ready: no value to quote
            }
            anchor = annotations["runbook_url"].split("#")[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert'].lower()}" in readme, (
                f"no runbook section for {rule['alert']}"
            )


def test_rules_use_only_metrics_alignd_exports() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported = set(re.findall(r"^# TYPE (\w+)", generate_latest(registry).decode(), re.M))
    exported |= {f"{name}_total" for name in exported}
    used = set(re.findall(r"\b(alignd_\w+)", RULES.read_text()))
    assert used <= exported, used - exported

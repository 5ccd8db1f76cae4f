"""docs/reference.md's generated tables are current; config loading names bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from tools import docs


def test_reference_tables_are_current() -> None:
    assert docs.main(["--check"]) == 0, "run: python -m tools.docs"


def test_every_config_key_is_documented() -> None:
    text = docs.REFERENCE.read_text()
    for key in (
        "kafka.bootstrap_servers",
        "store.url",
        "limits.max_message_bytes",
        "dataset.max_length_ratio",
    ):
        assert f"`{key}`" in text


def test_env_overrides_yaml_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "alignd.yaml"
    path.write_text("kafka:\n  topic: from-yaml\n  group_id: yaml-group\n")
    monkeypatch.setenv("ALIGND_KAFKA__GROUP_ID", "env-group")
    config = load_config(path)
    assert config.kafka.topic == "from-yaml"
    assert config.kafka.group_id == "env-group"
    assert config.store.url.startswith("sqlite:///")


@pytest.mark.parametrize(
    ("yaml_text", "env", "named"),
    [
        ("kafka:\n  topc: x\n", {}, "kafka.topc"),
        ("dataset:\n  heldout_fraction: 2\n", {}, "dataset.heldout_fraction"),
        ("", {"ALIGND_KAFKA__MAX_POLL_RECORDS": "many"}, "kafka.max_poll_records"),
        ("- a list\n", {}, "top level must be a mapping"),
        ("training:\n  run_spec:\n    hyper:\n      betta: 0.2\n", {}, "hyper.betta"),
        ("training:\n  run_spec:\n    epochz: 2\n", {}, "epochz: not a run-spec field"),
        ("gate:\n  kl_budget: 0.5\n", {}, "gate: .*kl_budget was replaced by drift_budget"),
        ("schedule:\n  drift_probe_prompts: 32\n", {}, "drift_probe_prompts is gone"),
        ("attribution:\n  signed_kinds: [agent]\n", {}, "signed_kinds is set but no key"),
        ("admin:\n  operator_token_files:\n    alignd-x: /dev/null\n", {}, "operator_token_files"),
        ("attribution:\n  keys:\n    desk: short\n", {}, "attribution.keys.desk: shorter than 32"),
        ("attribution:\n  signed_kinds: [agents]\n", {}, "attribution.signed_kinds"),
        (
            "training:\n  run_spec:\n    eval:\n      policy_rules:\n"
            "        - {name: x, when: {category: billing}, required: ['(unclosed']}\n",
            {},
            "eval.policy_rules.0.required: .*not a regular expression",
        ),
    ],
)
def test_bad_config_fails_naming_the_key(yaml_text: str, env: dict[str, str], named: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    path = tmp_path / "alignd.yaml"
    path.write_text(yaml_text)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace(r"\.*", ".*")):
        load_config(path)


def test_secrets_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGND_KAFKA__SASL_PLAIN_PASSWORD", "hunter2")
    config = load_config(None)
    assert config.kafka.client_options()["sasl_plain_password"] == "hunter2"
    assert "hunter2" not in str(config.redacted())

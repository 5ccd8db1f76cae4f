"""The adapter registry: versions, promote/rollback/reject, refusals, and crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from registry_support import make_adapter

from daemon.records import VersionManifest
from daemon.registry import (
    InvalidManifest,
    Registry,
    RegistryError,
    check_adapter_dir,
    current_pointer_hook,
)

PASSED = {"gate": {"promote": True, "reasons": []}}
FAILED = {"gate": {"promote": False, "reasons": ["kl_budget: too high"]}}


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", [current_pointer_hook(tmp_path / "registry")])


def test_register_promote_rollback(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(make_adapter(tmp_path / "a1"), PASSED)
    v2 = registry.register(make_adapter(tmp_path / "a2", seed=1), PASSED)
    assert (v1, v2) == ("v0001", "v0002")
    assert registry.active() is None and registry.state(v1) == "candidate"
    registry.promote(v1, actor="alice", reason="first")
    registry.promote(v2, actor="alice", reason="better")
    assert registry.active() == v2 and registry.state(v1) == "retired"
    assert os.readlink(registry.root / "current") == "adapters/v0002"
    version, failures = registry.rollback(actor="bob", reason="bad replies")
    assert version == v1 and failures == [] and registry.active() == v1
    assert os.readlink(registry.root / "current") == "adapters/v0001"
    actions = [(e["action"], e.get("version"), e["actor"]) for e in registry.audit()]
    assert actions[-3:] == [
        ("promote", v1, "alice"),
        ("promote", v2, "alice"),
        ("rollback", v1, "bob"),
    ]
    assert all("at" in e and "reason" in e for e in registry.audit())
    manifest = registry.manifest(v2)
    assert manifest.version == v2 and manifest.gate_passed


def test_rollback_to_a_named_version(registry: Registry, tmp_path: Path) -> None:
    versions = [
        registry.register(make_adapter(tmp_path / f"a{i}", seed=i), PASSED) for i in range(3)
    ]
    for v in versions:
        registry.promote(v, actor="a", reason="r")
    assert registry.rollback(actor="a", reason="r", to="v0001")[0] == "v0001"
    assert registry.history() == ["v0001"]
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(actor="a", reason="r")


def test_gate_rejected_version_needs_force(registry: Registry, tmp_path: Path) -> None:
    v = registry.register(make_adapter(tmp_path / "a"), FAILED)
    assert registry.state(v) == "rejected"
    with pytest.raises(RegistryError, match="rejected"):
        registry.promote(v, actor="a", reason="r")
    registry.promote(v, actor="a", reason="I know better", force=True)
    assert registry.active() == v


def test_operator_reject(registry: Registry, tmp_path: Path) -> None:
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    registry.reject(v, actor="carol", reason="tone is off")
    assert registry.state(v) == "rejected"


@pytest.mark.parametrize("name", ["../etc", "v0001/../../x", "..", "latest", "v1", ""])
def test_version_names_cannot_escape(registry: Registry, name: str) -> None:
    with pytest.raises(RegistryError):
        registry.version_dir(name)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "does not match"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated"),
        (
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......."),
            "corrupted header",
        ),
    ],
)
def test_corrupted_adapter_is_refused(tmp_path: Path, damage: object, message: str) -> None:
    adapter = make_adapter(tmp_path / "a")
    damage(adapter / "adapter_model.safetensors")  # type: ignore[operator]
    with pytest.raises(RegistryError, match=message):
        check_adapter_dir(adapter)
    with pytest.raises(RegistryError):
        Registry(tmp_path / "reg").register(adapter, PASSED)
    assert Registry(tmp_path / "reg").versions() == []


def test_unservable_adapter_is_refused(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text()) | {
        "modules_to_save": ["lm_head"]
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(RegistryError, match="vLLM"):
        check_adapter_dir(adapter)


def test_failing_serving_hook_is_recorded_not_fatal(tmp_path: Path) -> None:
    def broken(version: str, path: Path, previous: str | None) -> None:
        raise ConnectionError("vLLM at 10.0.0.9 refused")

    registry = Registry(tmp_path / "reg", [broken])
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    failures = registry.promote(v, actor="a", reason="r")
    assert registry.active() == v
    assert failures and "refused" in failures[0]
    assert any(e["action"] == "serving_hook_failed" for e in registry.audit())


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import daemon.registry as reg
    sys.path.insert(0, {tests!r})
    from registry_support import make_adapter

    target, when, nth = sys.argv[2], sys.argv[3], int(sys.argv[4])
    real = getattr(os, target)
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(reg.os, target, dying)
    registry = reg.Registry(Path(sys.argv[1]))
    for i in range(3):
        v = registry.register(make_adapter(Path(sys.argv[1]).parent / f"src{{i}}", seed=i),
                              {{"gate": {{"promote": True, "reasons": []}}}})
        registry.promote(v, actor="t", reason="r")
    print("survived")
""")


def assert_registry_valid(root: Path) -> Registry:
    registry = Registry(root)  # opening cleans up leftovers
    assert not list((root / "adapters").glob(".staging-*"))
    for version in registry.versions():
        check_adapter_dir(root / "adapters" / version)
        assert registry.manifest(version).version == version
    active = registry.active()
    assert active is None or active in registry.versions()
    list(registry.audit())
    return registry


@pytest.mark.parametrize("target", ["rename", "replace"])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("nth", [1, 2])
def test_kill_9_during_a_registry_write_leaves_a_valid_registry(
    child_processes: None, tmp_path: Path, target: str, when: str, nth: int
) -> None:
    root = tmp_path / "registry"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run(
        [sys.executable, str(script), str(root), target, when, str(nth)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-1500:]  # it really died mid-write
    registry = assert_registry_valid(root)
    # The write that was cut either happened completely or not at all, and the registry works on.
    v = registry.register(make_adapter(tmp_path / "after"), PASSED)
    registry.promote(v, actor="t", reason="after the crash")
    assert registry.active() == v


def test_plain_rollback_skips_a_version_an_operator_rejected(
    registry: Registry, tmp_path: Path
) -> None:
    v1, v2, v3 = (
        registry.register(make_adapter(tmp_path / f"a{i}", seed=i), PASSED) for i in range(3)
    )
    for v in (v1, v2, v3):
        registry.promote(v, actor="a", reason="r")
    registry.reject(v2, actor="carol", reason="made up refund amounts")
    with pytest.raises(RegistryError, match="rejected by an operator"):
        registry.rollback(actor="a", reason="r", to=v2)
    assert registry.active() == v3
    assert registry.rollback(actor="a", reason="r")[0] == v1  # not the rejected v2


def test_only_rejected_versions_to_roll_back_to_is_a_clear_refusal(
    registry: Registry, tmp_path: Path
) -> None:
    v1, v2 = (registry.register(make_adapter(tmp_path / f"a{i}", seed=i), PASSED) for i in range(2))
    registry.promote(v1, actor="a", reason="r")
    registry.promote(v2, actor="a", reason="r")
    registry.reject(v1, actor="carol", reason="bad")
    with pytest.raises(RegistryError, match="not rejected"):
        registry.rollback(actor="a", reason="r")
    assert registry.active() == v2
    assert registry.rollback(actor="a", reason="r", force=True)[0] == v1


def test_manifest_records_file_hashes_checked_on_activation(
    registry: Registry, tmp_path: Path
) -> None:
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    assert set(registry.manifest(v).files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    config = registry.version_dir(v) / "adapter_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "r": 8}))  # still a servable adapter, not the same one
    with pytest.raises(RegistryError, match="sha256"):
        registry.promote(v, actor="a", reason="r")
    assert registry.active() is None


def test_a_pending_activation_is_replayed_until_serving_agrees(tmp_path: Path) -> None:
    down = [True]
    served: list[str] = []

    def vllm(version: str, path: Path, previous: str | None) -> None:
        if down[0]:
            raise ConnectionError("vLLM unreachable")
        served.append(version)

    registry = Registry(tmp_path / "reg", [vllm])
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    assert registry.promote(v, actor="a", reason="r")
    assert registry.serving_state() == "pending"
    assert registry.replay_serving() == ["vllm: vLLM unreachable"]  # still down: still pending
    assert registry.serving_state() == "pending"
    down[0] = False
    assert registry.replay_serving() == []
    assert served == [v] and registry.serving_state() == "done"
    assert registry.replay_serving() is None  # nothing pending any more
    assert any(e["action"] == "serving_replayed" for e in registry.audit())


def test_a_model_server_outage_neither_holds_the_registry_nor_changes_it_every_tick(
    tmp_path: Path,
) -> None:
    """Issue #31, finding 4: every tick's retry ran the hooks under the registry lock and
    appended an audit entry, so a hung vLLM blocked operators and a page older than one tick
    got 409."""
    hung, released = threading.Event(), threading.Event()

    def vllm(version: str, path: Path, previous: str | None) -> None:
        hung.set()
        if not released.wait(10):
            raise TimeoutError("vLLM did not answer")
        raise ConnectionError("vLLM unreachable")

    registry = Registry(tmp_path / "reg", [vllm])
    v1 = registry.register(make_adapter(tmp_path / "a"), PASSED)
    v2 = registry.register(make_adapter(tmp_path / "b", seed=1), PASSED)
    retry = threading.Thread(target=lambda: registry.promote(v1, actor="a", reason="r"))
    retry.start()
    assert hung.wait(5)  # the hook hangs: the registry must still answer and change
    started = time.monotonic()
    registry.reject(v2, actor="ops", reason="meanwhile")
    assert time.monotonic() - started < 2, "a hung serving hook held the registry"
    released.set()
    retry.join(5)
    revision = registry.revision()
    for _ in range(3):  # three ticks of the same outage
        assert registry.replay_serving() == ["vllm: vLLM unreachable"]
    assert registry.revision() == revision  # one audit entry per outage, not one per tick
    assert [e["action"] for e in registry.audit()].count("serving_hook_failed") == 1


def test_a_promote_answers_before_the_clis_timeout_when_its_hooks_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rest of finding 4: a promote waited for its own hooks (vLLM's 60 s per call) while
    the CLI gives up at 30 s. It answers "pending" after SERVING_WAIT_S (here 0.5 s)."""
    import daemon.registry as registry_module

    monkeypatch.setattr(registry_module, "SERVING_WAIT_S", 0.5)
    released = threading.Event()
    served: list[str] = []

    def slow_vllm(version: str, path: Path, previous: str | None) -> None:
        released.wait(10)
        served.append(version)

    registry = Registry(tmp_path / "reg", [slow_vllm])
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    started = time.monotonic()
    answer = registry.promote(v, actor="a", reason="r")
    assert time.monotonic() - started < 3 and "still running" in answer[0]
    assert registry.active() == v and registry.serving_state() == "pending"
    released.set()
    deadline = time.monotonic() + 5
    while registry.serving_state() != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served == [v] and registry.serving_state() == "done"  # finished on its own


def test_a_replay_that_waited_on_an_activations_hooks_does_not_serve_it_again(
    tmp_path: Path,
) -> None:
    """A tick's replay reads the activation while its hooks still run, then waits on the
    serving lock: once they are done it has nothing to do (it served again and audited
    'serving_replayed' after every promote; the browser test caught it)."""
    calls: list[str] = []
    running = threading.Event()

    def vllm(version: str, path: Path, previous: str | None) -> None:
        calls.append(version)
        running.set()
        time.sleep(0.5)

    registry = Registry(tmp_path / "reg", [vllm])
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    promote = threading.Thread(target=lambda: registry.promote(v, actor="a", reason="r"))
    promote.start()
    assert running.wait(5)
    assert registry.replay_serving() == []  # waited for the promote's hooks, found it served
    promote.join(5)
    assert calls == [v] and registry.serving_state() == "done"
    assert [e["action"] for e in registry.audit()][-1] == "promote"


def test_a_manifest_written_before_the_typed_contract_still_loads() -> None:
    """Written by main on 2026-12-06 (the demo's round 2: incremental, rejected), before the
    manifest had a model."""
    manifest = VersionManifest.read(
        Path(__file__).parent / "manifests" / "v0002-written-2026-12-06.json"
    )
    assert manifest.version == "v0002" and manifest.parent == "v0001" and not manifest.gate_passed
    assert manifest.training_data is not None and manifest.training_data.mode == "incremental"
    assert manifest.training is not None and manifest.training.steps > 0
    assert manifest.eval.candidate.retain_kl is not None and manifest.files


def test_a_malformed_manifest_fails_naming_the_field(registry: Registry, tmp_path: Path) -> None:
    v = registry.register(make_adapter(tmp_path / "a"), PASSED)
    path = registry.version_dir(v) / "manifest.json"
    data = json.loads(path.read_text())
    data["gate"]["promote"] = "perhaps"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidManifest, match=r"manifest\.json: gate\.promote: "):
        registry.manifest(v)

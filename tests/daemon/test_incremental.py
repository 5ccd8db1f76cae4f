"""Incremental refresh: the training view (new rows + a bounded replay sample, every held-out
row) and when the refresher trains incrementally or on the whole snapshot, on real snapshots
built from a real SQLite store and a real registry."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from daemon_support import agent_edits, in_process_service
from registry_support import make_adapter
from services import wait_until

from daemon.records import TrainingData
from daemon.service import Service
from feedback.config import DatasetConfig
from feedback.increment import incremental_view
from feedback.manifest import SnapshotManifest
from feedback.snapshot import build_snapshot
from feedback.store import FeedbackStore

NOW = datetime(2026, 11, 24, tzinfo=UTC)


def rows(path: Path) -> list[dict[str, object]]:
    return pq.read_table(path).to_pylist() if path.is_file() else []


def key(row: dict[str, object]) -> str:
    return json.dumps(row, sort_keys=True)


def test_view_holds_new_rows_a_replay_sample_and_every_heldout_row(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    config = DatasetConfig(heldout_fraction=0.2)
    store.write_batch(agent_edits(0, 300, now=NOW))
    old = tmp_path / "old"
    build_snapshot(store, old, config, now=NOW)
    store.write_batch(agent_edits(300, 340, now=NOW))
    new = tmp_path / "new"
    manifest = build_snapshot(store, new, config, now=NOW)
    view = tmp_path / "view"
    stats = incremental_view(new, old, view, replay_rows=25, seed="s", replay_ratio=10.0)

    learned = {key(r) for r in rows(old / "pairs" / "train.parquet")}
    current = rows(new / "pairs" / "train.parquet")
    trained = rows(view / "pairs" / "train.parquet")
    fresh = [r for r in current if key(r) not in learned]
    assert 0 < len(fresh) <= 40 and stats.new["pairs"] == len(fresh)
    assert [r for r in trained if key(r) not in learned] == fresh  # every new row, in order
    replayed = [r for r in trained if key(r) in learned]
    assert len(replayed) == stats.replayed["pairs"] == 25
    assert [current.index(r) for r in trained] == sorted(current.index(r) for r in trained)
    assert rows(view / "pairs" / "heldout.parquet") == rows(new / "pairs" / "heldout.parquet")
    assert SnapshotManifest.load(view).sha256 == manifest.sha256
    again = tmp_path / "again"
    incremental_view(new, old, again, replay_rows=25, seed="s", replay_ratio=10.0)
    assert rows(again / "pairs" / "train.parquet") == trained  # seeded: reproducible
    other = tmp_path / "other"
    incremental_view(new, old, other, replay_rows=25, seed="t", replay_ratio=10.0)
    assert rows(other / "pairs" / "train.parquet") != trained
    # by default as many old rows as new ones: the cost follows the new feedback
    ratio = incremental_view(new, old, tmp_path / "ratio", replay_rows=1000, seed="s")
    assert ratio.replayed["pairs"] == ratio.new["pairs"] == len(fresh)
    half = incremental_view(new, old, tmp_path / "half", replay_rows=1000, seed="s",
                            replay_ratio=0.5)  # fmt: skip
    assert half.replayed["pairs"] == math.ceil(len(fresh) / 2)
    store.close()


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[Service]:
    with in_process_service(tmp_path, dataset={"heldout_fraction": 0.2}) as svc:
        yield svc


def register_on(service: Service, tmp_path: Path, sha: str, method: str = "dpo") -> str:
    manifest = {"gate": {"promote": True, "reasons": []}, "dataset_sha256": sha, "method": method}
    version = service.registry.register(make_adapter(tmp_path / f"a-{sha[:6]}-{method}"), manifest)
    service.registry.promote(version, actor="test", reason="setup")
    return version


def test_refresher_chooses_incremental_or_full(service: Service, tmp_path: Path) -> None:
    refresher, run = service.refresher, tmp_path / "run"
    service.store.write_batch(agent_edits(0, 200, now=NOW))
    first, _ = refresher._snapshot("r1")
    service.store.write_batch(agent_edits(200, 230, now=NOW))
    second, second_dir = refresher._snapshot("r2")

    def plan(active: str | None, method: str = "dpo", full: bool = False) -> TrainingData:
        return refresher._training_data(second_dir, second, active, method, run, full=full)[1]

    assert "no active adapter" in plan(None).reason
    v0 = register_on(service, tmp_path, second.sha256)  # trained on this very snapshot
    assert "no training rows are new" in plan(v0).reason
    assert not (run / "data").exists()
    v1 = register_on(service, tmp_path, first.sha256)
    chosen = plan(v1)
    assert chosen.mode == "incremental" and chosen.base_version == v1
    assert 0 < chosen.new["pairs"] <= 30
    assert (run / "data" / "pairs" / "train.parquet").is_file()
    assert plan(v1, full=True).mode == "full"
    assert "method changed" in plan(v1, method="ipo").reason
    training = refresher.config.training
    refresher.config = refresher.config.model_copy(
        update={"training": training.model_copy(update={"incremental": False})}
    )
    assert plan(v1).mode == "full"
    refresher.config = refresher.config.model_copy(update={"training": training})
    v2 = register_on(service, tmp_path, "0" * 64)
    assert "no longer on disk" in plan(v2).reason
    # the rules changed: the active adapter's snapshot was built with another held-out fraction
    other = build_snapshot(service.store, tmp_path / "rules", DatasetConfig(heldout_fraction=0.5))
    (tmp_path / "rules").rename(refresher.snapshots_dir / other.sha256[:16])
    v3 = register_on(service, tmp_path, other.sha256)
    assert "rules changed" in plan(v3).reason


def test_an_operators_full_request_reaches_the_refresh(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[str, bool]] = []

    def refresh(trigger: str, stop: object, detail: str = "", full: bool = False) -> None:
        started.append((str(trigger), full))  # the refresh itself is tested above and in e2e

    monkeypatch.setattr(service.refresher, "refresh", refresh)
    accepted, message = service.request_refresh("ann", full=True)
    assert accepted and message == "full refresh requested by ann"
    assert wait_until(lambda: started, 10)
    assert started == [("operator request", True)]
    assert service.manual_full is False  # one request, one full run


def test_training_dtype_reaches_the_run_spec(service: Service, tmp_path: Path) -> None:
    """``training.dtype`` is the run's weight precision; ``training.run_spec.dtype`` wins."""
    from daemon.scheduler import MethodChoice

    refresher, choice = service.refresher, MethodChoice("dpo", "pairs", "test", {})
    training = refresher.config.training

    def spec_dtype(**update: object) -> str:
        refresher.config = refresher.config.model_copy(
            update={"training": training.model_copy(update=update)}
        )
        return refresher._run_spec(tmp_path, tmp_path / "out", choice, "0" * 64, None, False).dtype

    assert spec_dtype() == "auto"
    assert spec_dtype(dtype="bf16") == "bf16"
    assert spec_dtype(dtype="bf16", run_spec={"dtype": "fp32"}) == "fp32"


def test_an_incremental_refresh_trains_its_own_epochs(service: Service, tmp_path: Path) -> None:
    """``training.incremental_epochs`` applies to incremental refreshes only; a full retrain
    keeps the run spec's epochs."""
    from daemon.scheduler import MethodChoice

    refresher, choice = service.refresher, MethodChoice("dpo", "pairs", "test", {})
    training = refresher.config.training.model_copy(
        update={"incremental_epochs": 1.0, "run_spec": {"hyper": {"epochs": 2.0}}}
    )
    refresher.config = refresher.config.model_copy(update={"training": training})

    def epochs(incremental: bool) -> float:
        spec = refresher._run_spec(tmp_path, tmp_path / "o", choice, "0" * 64, None, incremental)
        return spec.hyper.epochs

    assert epochs(incremental=True) == 1.0 and epochs(incremental=False) == 2.0

"""Reference log-probs cached across runs: only unseen rows are scored, hits are exact, and a
different base model or tokenisation never hits a stale entry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, build_tiny_model
from services import exit_codes_started_together
from test_train import make_spec

from trainer.logprobs import Encoded
from trainer.refcache import ReferenceCache, model_identity, open_cache_file
from trainer.train import run


class CountingScorer:
    """A stand-in for the reference forward that counts what it is asked to score."""

    def __init__(self) -> None:
        self.scored: list[Encoded] = []

    def __call__(
        self, model: object, examples: list[Encoded], pad_id: int, bs: int
    ) -> torch.Tensor:
        self.scored += examples
        return torch.tensor([-float(sum(e.response_ids)) / 7 for e in examples])


def examples(n: int, start: int = 0) -> list[Encoded]:
    return [Encoded((1, 2, i), (i, i + 1, 9)) for i in range(start, start + n)]


def test_a_second_cache_on_the_same_file_scores_only_new_rows(tmp_path: Path) -> None:
    path = tmp_path / "ref.sqlite"
    first, scorer = ReferenceCache(path, "model-a"), CountingScorer()
    old = first.logps(None, examples(20), scorer, 0, 4)
    first.close()
    assert len(scorer.scored) == 20 and first.stats.as_dict() == {"hits": 0, "computed": 20}

    second, scorer2 = ReferenceCache(path, "model-a"), CountingScorer()  # the next refresh
    both = second.logps(None, examples(22), scorer2, 0, 4)
    assert scorer2.scored == examples(2, start=20)
    assert second.stats.as_dict() == {"hits": 20, "computed": 2}
    torch.testing.assert_close(both[:20], old)  # hits are the stored values, bit for bit
    second.close()


def test_other_model_or_other_tokens_are_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "ref.sqlite"
    ReferenceCache(path, "model-a").logps(None, examples(3), CountingScorer(), 0, 4)
    other_model, scorer = ReferenceCache(path, "model-b"), CountingScorer()
    other_model.logps(None, examples(3), scorer, 0, 4)
    assert len(scorer.scored) == 3
    # the same response after a different prompt tokenisation (e.g. a new chat template)
    same_model, scorer = ReferenceCache(path, "model-a"), CountingScorer()
    moved = [Encoded((1, 2, 3, 4), e.response_ids) for e in examples(3)]
    same_model.logps(None, moved, scorer, 0, 4)
    assert len(scorer.scored) == 3


def test_duplicate_rows_are_scored_once(tmp_path: Path) -> None:
    cache, scorer = ReferenceCache(None, "m"), CountingScorer()
    out = cache.logps(None, examples(2) * 3, scorer, 0, 4)
    assert len(scorer.scored) == 2 and out.tolist() == out[:2].tolist() * 3


def test_model_identity_follows_the_weights_not_the_path(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=0)
    c = build_tiny_model(tmp_path / "c", seed=1)
    assert model_identity(a, "cpu") == model_identity(b, "cpu")
    assert model_identity(a, "cpu") != model_identity(c, "cpu")
    assert model_identity(a, "cpu") != model_identity(a, "cuda")
    assert model_identity(a, "cpu") != model_identity(a, "cpu", "bfloat16")  # other precision
    with pytest.raises(FileNotFoundError, match="weight files"):
        model_identity(tmp_path, "cpu")


def test_second_refresh_with_ten_percent_new_rows_scores_only_those(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = [
        dict(p, prompt=f"{p['prompt'] if isinstance(p['prompt'], str) else 'Refund?'} #{i}")
        for i, p in enumerate(PAIRS * 5)
    ]
    data = tmp_path / "pairs.jsonl"
    cache = tmp_path / "reference.sqlite"
    hyper = {"max_steps": 2, "warmup_ratio": 0.0}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:18]))
    first = run(
        make_spec(tmp_path / "1", tiny_model_dir, data, reference_cache=str(cache), hyper=hyper)
    )
    assert first.status == "succeeded", first.error
    assert first.reference_logps == {"hits": 0, "computed": 36}

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))  # 2 new rows (10%)
    second = run(
        make_spec(tmp_path / "2", tiny_model_dir, data, reference_cache=str(cache), hyper=hyper)
    )
    assert second.status == "succeeded", second.error
    assert second.reference_logps == {"hits": 36, "computed": 4}
    # the cached reference is the real one: policy == reference at step 0, DPO loss = log 2
    assert second.steps[0].preference_loss == pytest.approx(0.693147, abs=1e-4)


def test_kto_kl_reference_terms_are_cached_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [
        {
            "prompt": f"Where is order {i}?",
            "completion": f"Order {i} ships today.",
            "label": i % 3 > 0,
        }
        for i in range(20)
    ]
    data, cache = tmp_path / "kto.jsonl", tmp_path / "reference.sqlite"
    hyper = {"max_steps": 1}

    def refresh(n: int, name: str) -> dict[str, int]:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        spec = make_spec(
            tmp_path / name,
            tiny_model_dir,
            data,
            method="kto",
            reference_cache=str(cache),
            hyper=hyper,
        )
        result = run(spec)
        assert result.status == "succeeded", result.error
        return result.reference_logps

    assert refresh(18, "1") == {"hits": 0, "computed": 36}  # 18 rows + 18 mismatched KL pairs
    # 2 new rows; the KL pairing (row i with row i+1's completion) changes only where the
    # new rows join: rows 17, 18 and 19 — so 2 + 3 reference log-probs are computed
    assert refresh(20, "2") == {"hits": 35, "computed": 5}


def test_ranks_sharing_a_cache_compute_the_same_misses(tmp_path: Path) -> None:
    """Under FSDP every rank must run the same forwards. Two threads stand for two ranks on one
    cache file; between rank 0's lookup and rank 1's, another run stores half of the rows (as a
    concurrent refresh on the same base would). Rank 1 finds them, rank 0 does not: each alone
    would compute different rows (a collective mismatch that hangs or kills the job); agreeing
    on the rows every rank found, both compute all six, the same way."""
    path = tmp_path / "ref.sqlite"
    ReferenceCache(path, "model-a").close()  # the file exists before the ranks start
    masks: list[list[bool]] = [[], []]
    meet = threading.Barrier(2, timeout=30)

    def found_everywhere(rank: int) -> Callable[[list[bool]], list[bool]]:
        def agree(found: list[bool]) -> list[bool]:  # what all_reduce(MIN) does across ranks
            masks[rank] = found
            meet.wait()
            return [a and b for a, b in zip(*masks, strict=True)]

        return agree

    scorers = [CountingScorer(), CountingScorer()]
    results: list[torch.Tensor | None] = [None, None]

    def rank(r: int) -> None:
        cache = ReferenceCache(path, "model-a", found_everywhere(r))
        results[r] = cache.logps(None, examples(6), scorers[r], 0, 4)
        cache.close()

    rank0 = threading.Thread(target=rank, args=(0,))
    rank0.start()
    while meet.n_waiting < 1 and rank0.is_alive():  # rank 0 has looked up, waits for rank 1
        time.sleep(0.01)
    other_run = ReferenceCache(path, "model-a")
    other_run.logps(None, examples(3), CountingScorer(), 0, 4)
    other_run.close()
    rank1 = threading.Thread(target=rank, args=(1,))
    rank1.start()
    rank0.join(30)
    rank1.join(30)
    assert scorers[0].scored == scorers[1].scored == examples(6)
    assert masks[0] == [False] * 6 and masks[1] == [True] * 3 + [False] * 3  # they did differ
    assert results[0] is not None and results[1] is not None
    torch.testing.assert_close(results[0], results[1])


def test_processes_opening_a_new_cache_file_at_once_all_succeed(
    child_processes: None, tmp_path: Path
) -> None:
    """The ranks of a run open the same new file together. SQLite refuses one of two
    connections that both ask to switch it to WAL at once with "database is locked", without
    waiting for its timeout: before the retry, one rank in about ten FSDP runs on a busy machine
    died there, and the other then failed at its next collective with gloo's "Connection closed
    by peer"."""
    for trial in range(20):
        path = tmp_path / f"{trial}.sqlite"
        codes = exit_codes_started_together(lambda: open_cache_file(path).close())  # noqa: B023
        assert codes == [0, 0, 0], f"trial {trial}"

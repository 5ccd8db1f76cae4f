"""What a training run reports: ``result.json`` (:class:`RunResult`) and the evaluation inside it
(:class:`EvalReport`: per adapter an :class:`AdapterEval` of preference, generation, drift and
factuality). Written by the trainer as the run goes; read by the daemon's gate and registry, the
CLI, the console and the demo, each through these models (:meth:`RunResult.load` names a bad
field). The run's *input* is :mod:`trainer.spec`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypedDict

from feedback.base import FrozenModel
from trainer.spec import SpecError, format_validation_error
from trainer.steps import StepMetrics


class PreferenceReport(FrozenModel):
    """Held-out preference metrics of one adapter (``trainer.evaluate.preference_metrics``).

    A metric left None was not measured; the gate fails a check whose input is None.
    The implicit-reward fields are None for the reference (its reward is 0 by definition).
    """

    num_pairs: int | None = None
    ranking_accuracy: float | None = Field(None, description="per-token chosen > rejected")
    chosen_logps_per_token: float | None = None
    rejected_logps_per_token: float | None = None
    chosen_logps: float | None = Field(None, description="summed, mean over pairs")
    reward_accuracy: float | None = Field(None, description="implicit reward, chosen > rejected")
    reward_margin: float | None = None
    chosen_rewards: float | None = None
    rejected_rewards: float | None = None


class GenerationReport(FrozenModel):
    """Greedy replies to held-out prompts and their degeneracy statistics (shares in [0, 1])."""

    num_replies: int | None = None
    median_words: float | None = None
    mean_words: float | None = None
    empty_rate: float | None = None
    short_rate: float | None = Field(None, description="fewer than 5 words")
    repetitive_rate: float | None = None
    distinct_rate: float | None = Field(None, description="distinct replies to distinct prompts")
    relevance_rate: float | None = Field(None, description="replies that echo the request")
    unsupported_rate: float | None = Field(
        None, description="replies stating a specific that the conversation does not contain"
    )
    grounded_rate: float | None = Field(
        None, description="replies stating every expected fact (of prompts that list them)"
    )
    grounded_replies: int = Field(0, description="replies to prompts that list expected facts")
    policy_compliance: float | None = Field(
        None, description="replies obeying every policy rule that applies (of those with one)"
    )
    policy_replies: int = Field(0, description="replies to prompts a policy rule applies to")
    policy_rules: list[str] = Field([], description="names of the rules checked")
    prompts: list[Any] = Field([], description="the held-out prompts, in reply order")
    tags: list[dict[str, str]] = Field([], description="each prompt's tags, same order")
    replies: list[str] = Field([], description="greedy replies, same order")
    unsupported: list[list[str]] = Field([], description="each reply's unsupported specifics")
    violations: list[list[str]] = Field([], description="each reply's policy violations")
    reply_sha256: list[str] = Field(
        [], description="sha256 of each reply: what a registry manifest keeps instead of the text"
    )
    unsupported_counts: list[int] = Field(
        [], description="how many unsupported specifics each reply states (text-free)"
    )

    def without_text(self) -> GenerationReport:
        """The report without customer text (prompts, tags, replies, the specifics quoted from
        replies): statistics, counts, rule names and each reply's sha256 remain. The registry
        keeps this; the run directory keeps the full report until retention removes it."""
        return self.model_copy(
            update={
                "prompts": [],
                "tags": [],
                "replies": [],
                "unsupported": [],
                "reply_sha256": [hashlib.sha256(r.encode()).hexdigest() for r in self.replies]
                or self.reply_sha256,
                "unsupported_counts": [len(u) for u in self.unsupported] or self.unsupported_counts,
            }
        )

    @property
    def degenerate_rate(self) -> float | None:
        """Share of empty, short or repetitive replies: the worst of the three rates."""
        rates = (self.empty_rate, self.short_rate, self.repetitive_rate)
        return None if any(r is None for r in rates) else max(r for r in rates if r is not None)


class DriftReport(FrozenModel):
    """KL(reference ‖ adapter), exact over the vocabulary, summed over each of the reference's
    own replies to a prompt set (``trainer.retain``)."""

    nats_per_reply: float = Field(description="mean over the replies")
    ci95: float = Field(description="half-width of the mean's 95% interval")
    nats_per_token: float = Field(description="total KL / total reply tokens")
    num_replies: int


class AdapterEval(FrozenModel):
    """Everything measured about one adapter (or the reference) on the held-out split."""

    preference: PreferenceReport | None = None
    curated: PreferenceReport | None = Field(None, description="on eval.curated_pairs")
    kl_to_reference: float | None = Field(
        None,
        description="requested change: KL(adapter ‖ reference) per token on held-out chosen "
        "replies, the text the feedback asks for (reported, not budgeted)",
    )
    task_kl: DriftReport | None = Field(
        None,
        description="requested change: on the reference's greedy replies to held-out prompts "
        "(the drafts agents rewrote)",
    )
    retain_kl: DriftReport | None = Field(
        None,
        description="drift: on the reference's replies to the retain set, prompts unrelated "
        "to the feedback (the gate's drift_budget)",
    )
    generation: GenerationReport | None = None
    factuality: float | None = Field(None, description="multiple-choice accuracy")


class EvalReport(FrozenModel):
    """``result.json``'s ``eval``: the candidate, the reference, and the incumbent (the active
    adapter when the run was started) on the same held-out data."""

    candidate: AdapterEval = AdapterEval()
    reference: AdapterEval = AdapterEval()
    incumbent: AdapterEval | None = None

    def without_text(self) -> EvalReport:
        """Every adapter's generation report without customer text (see
        :meth:`GenerationReport.without_text`)."""

        def strip(evaluation: AdapterEval | None) -> AdapterEval | None:
            if evaluation is None or evaluation.generation is None:
                return evaluation
            return evaluation.model_copy(
                update={"generation": evaluation.generation.without_text()}
            )

        return self.model_copy(
            update={
                "candidate": strip(self.candidate),
                "reference": strip(self.reference),
                "incumbent": strip(self.incumbent),
            }
        )


class DetectorFinding(TypedDict):
    """One training detector's outcome (``trainer.detectors.Finding``)."""

    fired: bool
    detail: str
    value: float | None


class RunResult(BaseModel):
    """``result.json``. ``status`` is 'succeeded' only when the adapter was written.

    Mutable (the trainer fills it in as the run goes); readers parse it with
    :meth:`load`, which fails with a message naming the bad field.
    """

    model_config = ConfigDict(extra="forbid")

    status: Literal["succeeded", "failed", "interrupted"]
    error: str | None = None
    spec: dict[str, Any]
    dataset_sha256: str | None = None
    method: str
    num_train_examples: int = 0
    num_steps: int = 0
    steps: list[StepMetrics] = Field([], description="per optimiser step: loss, rewards, ...")
    detectors: dict[str, DetectorFinding] = {}
    eval: EvalReport = EvalReport()
    adapter_dir: str | None = None
    versions: dict[str, str] = {}
    timings: dict[str, float] = {}
    peak_memory_bytes: dict[str, int] = {}
    reference_logps: dict[str, int] = Field(
        {}, description="reference log-probs found in the cache ('hits') and 'computed'"
    )
    anchor: dict[str, int] = Field(
        {}, description="the retain anchor's replies and the bytes of reference top-k kept"
    )
    mining: dict[str, Any] = Field(
        {}, description="mined pairs: sampled, flagged, pairs, skipped, capped, by flag"
    )
    parallel: dict[str, Any] = Field(
        {},
        description="engine, processes, and the base's parameters held by one process "
        "(its FSDP shard) vs in all",
    )

    @classmethod
    def load(cls, path: Path) -> RunResult:
        """Read ``result.json``; :class:`SpecError` if it is unreadable or malformed."""
        try:
            return cls.model_validate_json(Path(path).read_text())
        except OSError as e:
            raise SpecError(f"cannot read {path}: {e}") from e
        except ValidationError as e:
            raise SpecError(format_validation_error(f"run result {path}", e)) from e

"""One optimiser step's numbers: written by the training loop, read by the CLI, the refresh's
metrics, the console's charts and the demo's report — through this one model, never by key.

``result.json`` keeps TRL's names for the reward statistics (``rewards/accuracies``, ...), so
logs compare with TRL's line for line; in Python they are attributes (``reward_accuracy``).
A statistic the method does not produce is None (KTO has no per-pair margin before its
step's mean, a run without the retain anchor no ``anchor_kl``); an unknown key fails naming it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StepMetrics(BaseModel):
    """Means over the step's rows on every process (``trainer.train.step_metrics``)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    step: int = Field(ge=0, description="0-based, counted over every pass of the run")
    # None where the loss was not finite: JSON has no NaN (the run then stops, naming it)
    loss: float | None = Field(description="mean per-row loss with any NLL term; anchor apart")
    grad_norm: float | None = Field(None, description="before clipping")
    learning_rate: float | None = None
    tokens: int | None = Field(None, description="tokens processed, every process")
    step_s: float | None = None
    tokens_per_s: float | None = None
    preference_loss: float | None = Field(None, description="the method's loss alone")
    reward_chosen: float | None = Field(None, alias="rewards/chosen")
    reward_rejected: float | None = Field(None, alias="rewards/rejected")
    reward_margin: float | None = Field(None, alias="rewards/margins")
    reward_accuracy: float | None = Field(None, alias="rewards/accuracies")
    logp_chosen: float | None = Field(None, alias="logps/chosen")
    logp_rejected: float | None = Field(None, alias="logps/rejected")
    logp_chosen_per_token: float | None = Field(None, alias="logps/chosen_per_token")
    logratio_margin: float | None = Field(
        None, description="(policy − reference) log-ratio, chosen minus rejected"
    )
    logratio_desirable: float | None = Field(None, description="KTO: desirable rows' log-ratio")
    logratio_undesirable: float | None = None
    kl_proxy: float | None = Field(None, description="|log-ratio| per token")
    kl_estimate: float | None = Field(None, description="KTO's baseline z0")
    anchor_kl: float | None = Field(None, description="retain anchor: KL(reference ‖ policy)")

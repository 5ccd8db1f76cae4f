"""The method table: every property it declares holds for the loss it names, and everything that
lists methods (run spec, daemon config, CLI) lists exactly the table's."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from daemon.cli import make_parser
from daemon.config import TrainingConfig
from trainer.methods import METHODS, PAIRED_METHODS, PairLogps
from trainer.objectives import preference_loss
from trainer.spec import Hyperparameters, RunSpec

HP = Hyperparameters(label_smoothing=0.1)  # cdpo needs it; harmless for the others


def batch(policy_equals_reference: bool, seed: int = 0) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    pc, pr = -20 * torch.rand(6, generator=g) - 5, -20 * torch.rand(6, generator=g) - 5
    rc, rr = (pc, pr) if policy_equals_reference else (pc - 3, pr + 2)
    lengths = torch.randint(5, 30, (2, 6), generator=g).float()
    return PairLogps(pc, pr, rc.clone(), rr.clone(), lengths[0], lengths[1])


def test_every_method_has_exactly_the_loss_its_kind_needs() -> None:
    for m in METHODS.values():
        assert (m.pair_loss is not None) == m.paired, m.name
        assert (m.unpaired_loss is not None) == (not m.paired), m.name
        assert m.summary, m.name


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.paired and m.log2_at_init])
def test_log2_at_init_holds(name: str) -> None:
    out, _ = preference_loss(METHODS[name], HP, batch(policy_equals_reference=True))
    # cdpo/robust with label smoothing are still log 2 at a zero margin
    assert torch.allclose(out.losses, torch.full((6,), math.log(2)), atol=1e-6), name


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.paired and not m.log2_at_init])
def test_methods_not_marked_log2_are_not_log2_at_init(name: str) -> None:
    out, _ = preference_loss(METHODS[name], HP, batch(policy_equals_reference=True))
    assert not torch.allclose(out.losses, torch.full((6,), math.log(2)), atol=1e-3), name


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.paired])
def test_reference_free_methods_ignore_the_reference(name: str) -> None:
    x = batch(policy_equals_reference=False)
    moved = x._replace(
        reference_chosen=x.reference_chosen + 7, reference_rejected=x.reference_rejected - 4
    )
    a, _ = preference_loss(METHODS[name], HP, x)
    b, _ = preference_loss(METHODS[name], HP, moved)
    same = torch.allclose(a.losses, b.losses)
    assert same == (not METHODS[name].needs_reference), name


def test_nll_term_is_declared_for_the_methods_whose_papers_have_one() -> None:
    # RPO (Pang et al. 2024) and ORPO (Hong et al. 2024) add the chosen reply's NLL; no other.
    assert {n for n, m in METHODS.items() if m.nll_term} == {"rpo", "orpo"}
    for name in ("rpo", "orpo", "dpo"):
        out, total = preference_loss(METHODS[name], HP, batch(policy_equals_reference=False))
        assert (not torch.allclose(total, out.losses)) == METHODS[name].nll_term, name


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.paired])
def test_self_normalized_losses_depend_only_on_per_token_logps(name: str) -> None:
    # Doubling every summed log-prob and every length keeps per-token averages: a loss that
    # divides by length itself does not move; one over summed log-probs does.
    x = batch(policy_equals_reference=False)
    doubled = PairLogps(*(2 * v for v in x))
    method = METHODS[name]
    a, b = method.pair_loss(x, HP), method.pair_loss(doubled, HP)  # type: ignore[misc]
    assert torch.allclose(a.losses, b.losses, atol=1e-5) == method.self_normalized, name


def test_everything_that_lists_methods_lists_the_table() -> None:
    assert RunSpec.model_json_schema()["properties"]["method"]["enum"] == list(METHODS)
    schema = TrainingConfig.model_json_schema()["properties"]["pair_method"]
    assert schema["enum"] == list(PAIRED_METHODS)
    train = next(
        a
        for a in make_parser()._subparsers._group_actions[0].choices["train"]._actions  # type: ignore[union-attr]
        if a.dest == "method"
    )
    assert list(train.choices) == list(METHODS)


def test_unknown_or_unpaired_names_are_refused_naming_the_choices(tmp_path) -> None:
    with pytest.raises(ValidationError, match="one of: dpo"):
        RunSpec(data=tmp_path, output_dir=tmp_path, method="dpoo")
    with pytest.raises(ValidationError, match="not a paired method"):
        TrainingConfig(pair_method="kto")
    assert TrainingConfig(pair_method="simpo").pair_method == "simpo"

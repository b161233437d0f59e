"""SFT's loss: mean NLL per desirable completion token, by hand."""

import pytest
import torch

from prefopt.losses import LossInputs, get_loss, get_loss_spec


def singles(chosen, chosen_lengths, rejected=(), rejected_lengths=()) -> LossInputs:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return LossInputs(t(chosen), t(rejected), t(chosen_lengths), t(rejected_lengths))


def test_sft_is_the_mean_nll_per_desirable_token():
    """Desirable logps -6 (3 tokens) and -2 (1 token): (6 + 2) / (3 + 1) = 2.0.
    The undesirable example (-100, 5 tokens) takes no part. d loss / d logp_i = -1 / 4 for each."""
    inputs = singles([-6.0, -2.0], [3.0, 1.0], [-100.0], [5.0])
    out = get_loss("sft")(inputs)
    assert out.loss.item() == pytest.approx(2.0, abs=1e-12)
    out.loss.backward()
    assert inputs.policy_chosen_logps.grad.tolist() == pytest.approx([-0.25, -0.25])
    assert inputs.policy_rejected_logps.grad is None or inputs.policy_rejected_logps.grad.abs().sum() == 0
    assert out.metrics["nll_per_token"].item() == pytest.approx(2.0)


def test_sft_with_no_desirable_example_is_zero():
    out = get_loss("sft")(singles([], [], [-3.0], [2.0]))
    assert out.loss.item() == 0.0


def test_sft_declares_no_reference_and_unpaired_data():
    spec = get_loss_spec("sft")
    assert not spec.needs_reference and spec.needs_lengths and not spec.paired and spec.hyperparameters == {}

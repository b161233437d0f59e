"""Hand-computed loss values. Unless a test says otherwise, one pair with

    pi_c = -10, ref_c = -12  ->  chosen log-ratio   = +2
    pi_r = -15, ref_r = -14  ->  rejected log-ratio = -1
    h = 2 - (-1) = 3;  lengths: chosen 4 tokens, rejected 2 tokens.

-log sigma(x) = log(1 + e^-x). Literal numbers were worked out with Python's math module.
"""

import math

import pytest
import torch

from prefopt.losses import LossInputs, get_loss


def pair(pi_c=-10.0, ref_c=-12.0, pi_r=-15.0, ref_r=-14.0, len_c=4.0, len_r=2.0, **extra) -> LossInputs:
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    extra = {k: t(v) for k, v in extra.items()}
    return LossInputs(t(pi_c), t(pi_r), t(len_c), t(len_r), t(ref_c), t(ref_r), **extra)


def value(name, inputs, **hypers) -> float:
    return get_loss(name)(inputs, **hypers).loss.item()


def test_dpo():
    """beta*h = 0.1*3 = 0.3; -log sigma(0.3) = log(1 + e^-0.3) = log(1.740818) = 0.554355.

    With eps = 0.1: 0.9*0.554355 + 0.1*log(1 + e^0.3) = 0.9*0.554355 + 0.1*0.854355 = 0.584355.
    """
    assert value("dpo", pair()) == pytest.approx(0.5543552444685271, abs=1e-12)
    assert value("dpo", pair(), label_smoothing=0.1) == pytest.approx(0.5843552444685272, abs=1e-12)
    out = get_loss("dpo")(pair())
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.3)
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_dpop_penalty_inside_sigmoid():
    """pi_c = -13 < ref_c = -12: chosen ratio -1, rejected ratio -3, h = 2, penalty p = 1.

    lambda = 0.5: beta*(h - lambda*p) = 0.1*(2 - 0.5) = 0.15; -log sigma(0.15) = 0.620957.
    """
    inputs = pair(pi_c=-13.0, pi_r=-17.0)
    out = get_loss("dpop")(inputs, dpop_lambda=0.5)
    assert out.loss.item() == pytest.approx(0.6209570477895321, abs=1e-12)
    assert out.metrics["dpop/penalty"].item() == pytest.approx(1.0)
    assert out.metrics["dpop/penalty_active"].item() == 1.0
    # chosen above the reference: no penalty, so DPOP == DPO whatever lambda is
    assert value("dpop", pair(), dpop_lambda=50.0) == pytest.approx(value("dpo", pair()), abs=1e-12)


def test_tdpo1_and_tdpo2():
    """kl_c = 0.5, kl_r = 2, h = 3.

    TDPO1: 0.1*(3 - (2 - 0.5)) = 0.15 -> -log sigma(0.15) = 0.620957.
    TDPO2 (alpha=0.5): 0.1*(3 - 0.5*(2 - 0.5)) = 0.225 -> -log sigma(0.225) = 0.586962.
    Rewards follow the reference code: beta*(ratio + kl): chosen 0.1*(2 + 0.5) = 0.25.
    """
    inputs = pair(chosen_kl=0.5, rejected_kl=2.0)
    out1 = get_loss("tdpo1")(inputs)
    assert out1.loss.item() == pytest.approx(0.6209570477895321, abs=1e-12)
    assert value("tdpo2", inputs) == pytest.approx(0.5869620020497037, abs=1e-12)
    assert out1.metrics["rewards/chosen"].item() == pytest.approx(0.25)
    assert out1.metrics["kl/rejected"].item() == pytest.approx(2.0)


def test_orpo():
    """logps_c = -2 over 4 tokens -> l_c = -0.5; logps_r = -6 over 3 tokens -> l_r = -2.

    lo_c = -0.5 - log(1 - e^-0.5) = -0.5 - log(0.393469) = 0.432752
    lo_r = -2 - log(1 - e^-2) = -2 - log(0.864665) = -1.854587
    loss = 0.5 - 0.1 * log sigma(0.432752 + 1.854587) = 0.5 + 0.1*0.096706 = 0.509671
    """
    inputs = LossInputs(*(torch.tensor([v], dtype=torch.float64) for v in (-2.0, -6.0, 4.0, 3.0)))
    out = get_loss("orpo")(inputs)
    assert out.loss.item() == pytest.approx(0.50967058636494, abs=1e-12)
    assert out.metrics["nll"].item() == pytest.approx(0.5)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(0.43275212956718856 + 1.854586542131141)


def test_kto():
    """Desirable ratio r_c = 2, undesirable r_r = -1; KL pairs: (-5 - -5.5, -7 - -7.1) -> z = mean(0.5, 0.1) = 0.3.

    desirable:   1 - sigma(0.1*(2 - 0.3))  = 1 - sigma(0.17)  = 0.457602
    undesirable: 1 - sigma(0.1*(0.3 + 1))  = 1 - sigma(0.13)  = 0.467546
    loss = (0.457602 + 0.467546) / 2 = 0.462574; with w_D = 2, w_U = 0.5: (0.915204 + 0.233773)/2 = 0.574488
    """
    inputs = pair(policy_kl_logps=0.0, reference_kl_logps=0.0)
    inputs.policy_kl_logps = torch.tensor([-5.0, -7.0], dtype=torch.float64)
    inputs.reference_kl_logps = torch.tensor([-5.5, -7.1], dtype=torch.float64)
    out = get_loss("kto")(inputs)
    assert out.loss.item() == pytest.approx(0.46257387641916514, abs=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(0.3)
    weighted = value("kto", inputs, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted == pytest.approx(0.5744884826288194, abs=1e-12)


def test_kto_reference_point_is_clamped_at_zero_and_has_no_gradient():
    """mean(policy_kl - reference_kl) = -1 < 0 -> z = 0, so desirable loss = 1 - sigma(0.1*2)."""
    inputs = pair(policy_kl_logps=-6.0, reference_kl_logps=-5.0)
    inputs.policy_kl_logps.requires_grad_(True)
    inputs.policy_chosen_logps.requires_grad_(True)
    out = get_loss("kto")(inputs)
    assert out.metrics["kl"].item() == 0.0
    expected = ((1 - 1 / (1 + math.exp(-0.2))) + (1 - 1 / (1 + math.exp(-0.1)))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    out.loss.backward()
    assert inputs.policy_kl_logps.grad is None or inputs.policy_kl_logps.grad.abs().sum() == 0


def test_ipo():
    """Length-normalised (default, as TRL): 2/4 - (-1/2) = 1; (1 - 1/(2*0.1))^2 = (1 - 5)^2 = 16.

    Summed: (3 - 5)^2 = 4.
    """
    assert value("ipo", pair()) == pytest.approx(16.0)
    assert value("ipo", pair(), length_normalize=False) == pytest.approx(4.0)


def test_hinge():
    """max(0, 1 - 0.1*3) = 0.7; with beta = 0.5: max(0, 1 - 1.5) = 0."""
    assert value("hinge", pair()) == pytest.approx(0.7)
    assert value("hinge", pair(), beta=0.5) == 0.0


def test_robust():
    """eps = 0.1: (0.9*0.554355 + 0.1*log sigma(-0.3)) / 0.8 = (0.498920 - 0.085436) / 0.8 = 0.516855."""
    assert value("robust", pair(), label_smoothing=0.1) == pytest.approx(0.5168552444685272, abs=1e-12)
    assert value("robust", pair()) == pytest.approx(value("dpo", pair()), abs=1e-12)


def test_simpo():
    """r_c = 2*(-2/4) = -1, r_r = 2*(-6/3) = -4, gamma = 0.5*2 = 1: -log sigma(-1 + 4 - 1) = -log sigma(2) = 0.126928."""
    inputs = LossInputs(*(torch.tensor([v], dtype=torch.float64) for v in (-2.0, -6.0, 4.0, 3.0)))
    assert value("simpo", inputs) == pytest.approx(0.1269280110429725, abs=1e-12)


def test_nca_pair():
    """r_c = 0.2, r_r = -0.1: -log sigma(0.2) - 0.5 log sigma(-0.2) - 0.5 log sigma(0.1) = 1.319407."""
    assert value("nca_pair", pair()) == pytest.approx(1.319406634109173, abs=1e-12)


def test_bco_pair():
    """r_c = 0.2, r_r = -0.1, delta = batch mean = 0.05: -log sigma(0.15) - log sigma(0.15) = 1.241914.

    delta = 0 (TRL 1.x): -log sigma(0.2) - log sigma(0.1).
    """
    assert value("bco_pair", pair()) == pytest.approx(1.2419140955790642, abs=1e-12)
    expected = math.log1p(math.exp(-0.2)) + math.log1p(math.exp(-0.1))
    assert value("bco_pair", pair(), delta=0.0) == pytest.approx(expected, abs=1e-12)


def test_apo():
    """zero: 1 - sigma(0.2) + sigma(-0.1) = 0.925187; down: sigma(0.2) + 1 - sigma(0.3) = 0.975391."""
    assert value("apo_zero", pair()) == pytest.approx(0.925186815208582, abs=1e-12)
    assert value("apo_down", pair()) == pytest.approx(0.9753914805008189, abs=1e-12)


def test_sppo_hard():
    """(2 - 0.5/0.1)^2 + (-1 + 0.5/0.1)^2 = 9 + 16 = 25."""
    assert value("sppo_hard", pair()) == pytest.approx(25.0)


def test_exo_pair():
    """p = sigma(0.3) = 0.574443: p(log p - log 0.999) + (1-p)(log(1-p) - log 0.001) = 2.258199."""
    assert value("exo_pair", pair()) == pytest.approx(2.25819919150928, abs=1e-12)


def test_loss_is_mean_over_examples():
    """Two pairs with h = 3 and h = -3: mean of log(1+e^-0.3) and log(1+e^0.3)."""
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    inputs = LossInputs(t(-10.0, -15.0), t(-15.0, -10.0), t(1.0, 1.0), t(1.0, 1.0), t(-12.0, -14.0), t(-14.0, -12.0))
    expected = (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.3))) / 2
    out = get_loss("dpo")(inputs)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/accuracies"].item() == 0.5

"""Advantage estimators against hand-computed float64 values (DESIGN §6)."""

import math

import pytest
import torch

from prefopt.losses._advantages import (
    discounted_returns,
    equal_groups,
    gae,
    grpo_advantages,
    kl_penalty,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    token_positions,
    token_rewards,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-12):
    assert torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0), (actual, expected)


def test_grpo_bessel_std_and_eps():
    # group 0: R = (1, 0, 0, 1): mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.5773502692
    #   A = +-0.5 / (0.5773502692 + 1e-4) = +-0.8658753...
    # group 1: R = (2, 4, 6): mean 4, std sqrt((4 + 0 + 4) / 2) = 2; A = (-2, 0, 2) / 2.0001
    rewards = t(1, 0, 0, 1, 2, 4, 6)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    b = 2 / 2.0001
    close(grpo_advantages(rewards, groups), [a, -a, -a, a, -b, 0, b])
    # verl's eps
    close(grpo_advantages(rewards, groups, eps=1e-6)[0], 0.5 / (math.sqrt(1 / 3) + 1e-6))


def test_dr_grpo_no_division():
    rewards = t(1, 0, 0, 1, 2, 4, 6)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    close(grpo_advantages(rewards, groups, scale="none"), [0.5, -0.5, -0.5, 0.5, -2, 0, 2])
    # scale="batch": the batch's std: mean 2, squares 1+4+4+1+0+4+16 = 30, var 30/6 = 5
    close(grpo_advantages(rewards, groups, scale="batch")[4], -2 / (math.sqrt(5) + 1e-4))


def test_all_equal_groups_zero_never_nan_and_counted():
    # 0.1 three times: the float mean 0.30000000000000004 / 3 differs from 0.1 in the last bit,
    # which divided by eps would be a spurious advantage; and a group of one has no std at all.
    rewards = t(0.1, 0.1, 0.1, 5.0, 1.0, 0.0)
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    for advantages in (
        grpo_advantages(rewards, groups),
        grpo_advantages(rewards, groups, scale="none"),
        rloo_advantages(rewards, groups),
    ):
        assert torch.isfinite(advantages).all()
        assert advantages[:4].eq(0).all()
        assert advantages[4] > 0 > advantages[5]
    assert equal_groups(rewards, groups) == 2


def test_rloo_leave_one_out():
    # R = (1, 0, 0): A_0 = 1 - (0 + 0)/2 = 1; A_1 = 0 - (1 + 0)/2 = -0.5; A_2 = -0.5
    # R = (3, 5): A = 3 - 5 = -2, 5 - 3 = 2
    close(rloo_advantages(t(1, 0, 0, 3, 5), torch.tensor([0, 0, 0, 1, 1])), [1, -0.5, -0.5, -2, 2])


def test_remax_sample_minus_greedy():
    close(remax_advantages(t(1, 0, 0.5), t(0.25, 0.25, 1)), [0.75, -0.25, -0.5])


def test_kl_estimators():
    # logp = -1, ref = -2: k1 = 1; k3 = e^-1 - (-1) - 1 = 0.36787944117
    close(kl_penalty(t(-1.0), t(-2.0), "k1"), [1.0])
    close(kl_penalty(t(-1.0), t(-2.0), "k3"), [math.exp(-1)])
    with pytest.raises(ValueError):
        kl_penalty(t(-1.0), t(-2.0), "k2")


# Two completions: row 0 has 3 tokens, row 1 has 2; tokens of row 1 interleave nowhere, but the
# flat order puts row 1 first to check the layout does not assume sorted rows.
ROWS = torch.tensor([1, 1, 0, 0, 0])
LOGPS = t(-0.5, -1.0, -1.0, -2.0, -0.5)
REFS = t(-0.7, -1.0, -1.5, -1.5, -0.5)
SCORES = t(1.0, 0.0)  # row 0 scores 1, row 1 scores 0


def test_token_positions():
    positions, lengths = token_positions(ROWS, 2)
    assert positions.tolist() == [0, 1, 0, 1, 2]
    assert lengths.tolist() == [3, 2]


def test_token_rewards_kl_step_reward_plus_score_at_last_token():
    # k1 = logp - ref = (0.2, 0, 0.5, -0.5, 0); r = -0.1 * k1, + score at the last token of each row
    # row 1: (-0.02, 0 + 0); row 0: (-0.05, 0.05, 0 + 1)
    close(token_rewards(SCORES, LOGPS, REFS, ROWS, kl_coef=0.1), [-0.02, 0.0, -0.05, 0.05, 1.0])


def test_discounted_returns_gamma():
    rewards = t(-0.02, 0.0, -0.05, 0.05, 1.0)
    # gamma 1: row 0: (1.0, 1.05, 1.0); row 1: (-0.02, 0)
    close(discounted_returns(rewards, ROWS, 2), [-0.02, 0.0, 1.0, 1.05, 1.0])
    # gamma 0.5: row 0: G2 = 1, G1 = 0.05 + 0.5 = 0.55, G0 = -0.05 + 0.275 = 0.225
    close(discounted_returns(rewards, ROWS, 2, gamma=0.5), [-0.02, 0.0, 0.225, 0.55, 1.0])


def test_reinforce_pp_whitened_returns():
    # returns (gamma 1) = (-0.02, 0, 1, 1.05, 1): mean = 3.03 / 5 = 0.606
    # squared deviations: 0.391876, 0.367236, 0.155236, 0.197136, 0.155236 = 1.26672; var = /4 = 0.31668
    got = reinforce_pp_advantages(SCORES, LOGPS, REFS, ROWS, kl_coef=0.1)
    returns = [-0.02, 0.0, 1.0, 1.05, 1.0]
    std = math.sqrt(0.31668 + 1e-8)
    close(got, [(g - 0.606) / std for g in returns])
    assert abs(got.sum().item()) < 1e-12


def test_gae_gamma_lambda():
    # one row of 3 tokens, r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma 1, lam 0.9
    # delta2 = 1 + 0 - 0.7 = 0.3; delta1 = 0 + 0.7 - 0.6 = 0.1; delta0 = 0 + 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.9 * 0.3 = 0.37; A0 = 0.1 + 0.9 * 0.37 = 0.433
    rows = torch.tensor([0, 0, 0])
    advantages, returns = gae(t(0, 0, 1), t(0.5, 0.6, 0.7), rows, 1, gamma=1.0, lam=0.9)
    close(advantages, [0.433, 0.37, 0.3])
    close(returns, [0.933, 0.97, 1.0])
    # lam 1, gamma 1: A_t = sum of future rewards - V_t (Monte Carlo)
    advantages, _ = gae(t(0, 0, 1), t(0.5, 0.6, 0.7), rows, 1, gamma=1.0, lam=1.0)
    close(advantages, [0.5, 0.4, 0.3])
    # gamma 0.5, lam 0.5 on two rows of different lengths (the short one padded, not leaking)
    # row 0: r = (0, 2), V = (1, 1): delta1 = 2 - 1 = 1; delta0 = 0 + 0.5 - 1 = -0.5; A0 = -0.5 + 0.25 = -0.25
    # row 1: r = (3,), V = (1,): A = 2
    advantages, _ = gae(t(0, 3, 2), t(1, 1, 1), torch.tensor([0, 1, 0]), 2, gamma=0.5, lam=0.5)
    close(advantages, [-0.25, 2.0, 1.0])

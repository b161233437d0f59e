"""Wilson's interval and the sign test by hand (issue #24 item 3)."""

import math

import pytest

from prefopt.evaluation.ab_stats import per_prompt_outcomes, sign_test_p, wilson_interval, win_rate_statistics


def test_wilson_interval_by_hand():
    """The demo's old reading, 0.625 from 8 questions: z = 1.96, z^2 = 3.8415, 1 + z^2/8 = 1.4802;
    centre = (0.625 + 3.8415/16) / 1.4802 = 0.5845; half = 1.96 sqrt(0.625 * 0.375 / 8 + 3.8415/256)
    / 1.4802 = 1.96 * 0.21048 / 1.4802 = 0.2787: 0.306 to 0.863 (the issue's 0.31-0.86)."""
    low, high = wilson_interval(5, 8)
    assert low == pytest.approx(0.3058, abs=5e-4) and high == pytest.approx(0.8632, abs=5e-4)
    # 8 of 8: centre (1 + 0.2401) / 1.4802 = 0.8379, half 1.96 * sqrt(0.015006) / 1.4802 = 0.1622
    assert wilson_interval(8, 8) == (pytest.approx(0.6756, abs=5e-4), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(500, 1000)  # large n: close to the normal approximation 0.5 +- 0.031
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=2e-3)


def test_sign_test_by_hand():
    """8 wins, 0 losses: 2 * (1/2)^8 = 0.0078; 2 wins 0 losses: 2 * 1/4 = 0.5; 5 wins 3 losses:
    2 * (1 + 8 + 28 + 56) / 256 = 0.7266; no decided comparison: 1."""
    assert sign_test_p(8, 0) == pytest.approx(2 / 256)
    assert sign_test_p(2, 0) == pytest.approx(0.5)
    assert sign_test_p(5, 3) == pytest.approx(2 * 93 / 256)
    assert sign_test_p(4, 4) == 1.0 and sign_test_p(0, 0) == 1.0


def test_outcomes_are_per_prompt_with_unscored_left_out():
    wins = [1.0, 0.0, 0.5, None, None, None, 1.0, 1.0]  # 4 prompts x 2 samples
    assert per_prompt_outcomes(wins, 2) == [0.5, 0.5, 1.0]  # the unscored prompt is dropped
    stats = win_rate_statistics(wins, 2)
    assert stats["sign_test_p"] == pytest.approx(1.0)  # one prompt won, none lost: 2 * 1/2
    low, high = wilson_interval(2.0, 3)
    assert stats["win_rate_ci95"] == [round(low, 4), round(high, 4)]
    assert (stats["prompts_won"], stats["prompts_lost"], stats["prompts_tied"]) == (1, 0, 2)

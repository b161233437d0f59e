"""How far a win rate can be trusted (issue #24 item 3): Wilson's 95% interval and a sign test.

A win rate from a handful of prompts is a rough estimate. With 8 questions, 0.625 has a 95%
interval of 0.31 to 0.86. Both statistics take the prompt as the unit: a prompt's outcome is the
mean of its samples' comparisons (1 win, 1/2 tie, 0 loss), since the samples of one prompt are
not independent of each other.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(wins: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for the proportion wins / n (Wilson 1927, JASA 22:209, Eq. 2).

    centre = (p + z^2 / 2n) / (1 + z^2 / n);  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    Unlike the normal approximation p +- z sqrt(p (1 - p) / n), it stays inside [0, 1] and does
    not shrink to a point at p = 0 or 1. Ties counted 1/2 make `wins` fractional, which the
    formula takes as it is. With n = 0 nothing is known: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = wins / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance that a fair coin splits wins + losses tosses at least
    this unevenly, 2 * P(X <= min(wins, losses)) with X ~ Binomial(wins + losses, 1/2), at most 1.
    Ties are left out, as the sign test does. With no decided comparison: 1."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def per_prompt_outcomes(wins: list, per_prompt: int) -> list[float]:
    """Each prompt's mean comparison over its samples (unscored ones left out; prompts with none dropped)."""
    outcomes = []
    for start in range(0, len(wins), per_prompt):
        scored = [w for w in wins[start : start + per_prompt] if w is not None]
        if scored:
            outcomes.append(sum(scored) / len(scored))
    return outcomes


def win_rate_statistics(wins: list, per_prompt: int) -> dict:
    """`win_rate_ci95` (Wilson, over prompts), `sign_test_p` (prompts won against prompts lost) and
    the counts it rests on: prompts won, lost and tied (a prompt's outcome: the mean over its samples)."""
    outcomes = per_prompt_outcomes(wins, per_prompt)
    low, high = wilson_interval(sum(outcomes), len(outcomes))
    won, lost = sum(o > 0.5 for o in outcomes), sum(o < 0.5 for o in outcomes)
    return {
        "win_rate_ci95": [round(low, 4), round(high, 4)],
        "sign_test_p": sign_test_p(won, lost),
        "prompts_won": won,
        "prompts_lost": lost,
        "prompts_tied": len(outcomes) - won - lost,
    }

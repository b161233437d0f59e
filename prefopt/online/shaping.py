"""Reward shaping of the rollout step: DAPO's overlong reward shaping (Yu et al. 2025, Eq. 13).

A completion cut at the token budget is often a good answer that ran long, and a reward of 0
for it is noise ("the model reasons well but the answer was truncated"). DAPO instead charges
length softly near the budget L_max, over the last L_cache tokens:

    R_length(y) = 0                                   |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                = -1                                   |y| > L_max

added to the task reward, times `penalty` (prefopt's `overlong_penalty`, 1 in the paper). L_max
is `max_new_tokens` and |y| counts the completion's tokens as sampled (its EOS included), as
TRL's `get_soft_overlong_punishment` does.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float = 1.0) -> float:
    """R_length of DAPO Eq. 13, times `penalty`. Example: L_max 16, L_cache 4: lengths 12 -> 0,
    14 -> -0.5, 16 -> -1."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return penalty * (start - length) / buffer
    return -penalty

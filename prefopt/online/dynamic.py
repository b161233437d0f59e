"""DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2, Eq. 11): a group whose rewards are all equal
has advantage 0 under a group baseline and teaches nothing, so it is dropped and more prompts are
sampled until the batch holds as many informative groups as it had prompts, up to a number of
extra rounds (verl's `filter_groups.max_num_gen_batches`). Extra prompts are drawn from the
training set with the global torch RNG, which checkpoints keep, so a resumed run draws the same.
When the rounds run out, the batch is filled up with the equal groups (in their order), so its size
never changes.
"""

from __future__ import annotations


def informative(group_scores: list) -> bool:
    """Do the scored rewards of a group differ (at least two scored, not all equal)?"""
    scored = [s for s in group_scores if s is not None]
    return len(scored) > 1 and len(set(scored)) > 1


def fill(candidates: list, size: int) -> list:
    """`size` of the candidates (each (item, samples, scores, baseline)): the informative ones first,
    in the order they were sampled, then equal ones if too few."""
    good = [c for c in candidates if informative(c[2])]
    rest = [c for c in candidates if not informative(c[2])]
    return (good + rest)[:size]

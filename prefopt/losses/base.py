"""The loss contract: what a loss receives (`LossInputs`) and returns (`LossOutput`).

See docs/design.md and docs/losses.md, "Custom losses". Every tensor is 1-D; "logps" are log-probabilities of the
completion tokens only, summed over those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from prefopt.errors import PrefoptError


class LossError(PrefoptError, ValueError):
    """A loss was asked for, configured or fed wrongly; the message says how to fix it."""


_INDEX_FIELDS = ("token_rows", "groups")


@dataclass
class LossInputs:
    """Per-example quantities a preference loss is computed from.

    The chosen (desirable) side has length Bc, the rejected (undesirable) side Br.
    Paired losses require Bc == Br (row i of each side is one pair); unpaired losses
    such as KTO accept any Bc, Br >= 0.

    The policy log-probs are None only for losses that declare `needs_sequence_scores`: their
    model is a sequence classifier (a reward model), which has scores and no log-probs.
    """

    policy_chosen_logps: torch.Tensor | None = None
    policy_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    reference_chosen_logps: torch.Tensor | None = None
    reference_rejected_logps: torch.Tensor | None = None
    # sum over completion tokens of KL(pi_ref(.|x,y<t) || pi_theta(.|x,y<t)), full vocabulary (TDPO)
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None
    # logps of mismatched (x_i, y_j) completions, for KTO's reference point
    policy_kl_logps: torch.Tensor | None = None
    reference_kl_logps: torch.Tensor | None = None
    # Policy-gradient losses (needs_rollouts, DESIGN §6): the N sampled completions are the chosen
    # side (policy_chosen_logps, chosen_lengths, reference_chosen_logps per completion; the rejected
    # side is empty). Token-level fields are flat over the K completion tokens, in order within a row.
    token_logps: torch.Tensor | None = None  # (K,) policy log-prob of each completion token
    reference_token_logps: torch.Tensor | None = None  # (K,) the same under the reference
    old_token_logps: torch.Tensor | None = None  # (K,) the sampling policy's; None: one update per batch (rho == 1)
    sampler_token_logps: torch.Tensor | None = None  # (K,) the sampler's own (generate's), for TIS
    importance_cap: float | None = None  # TIS: weight each token by min(pi_old / pi_sampler, cap); None: off
    completion_mask: torch.Tensor | None = None  # (N,) 1 = counts in the loss (DAPO: truncated ones 0); None: all
    token_rows: torch.Tensor | None = None  # (K,) long: the completion each token belongs to
    rewards: torch.Tensor | None = None  # (N,) the reward of each completion
    groups: torch.Tensor | None = None  # (N,) long: the prompt each completion was sampled for
    baseline_rewards: torch.Tensor | None = None  # (N,) ReMax: the reward of the prompt's greedy completion
    token_values: torch.Tensor | None = None  # (K,) PPO: the critic's value before each token
    old_token_values: torch.Tensor | None = None  # (K,) the values at sampling; None: one update per batch
    max_completion_length: int | None = None  # the sampler's max_new_tokens (Dr.GRPO's constant normaliser)
    # Reward-model losses (needs_sequence_scores): a sequence classifier's scalar score of each whole
    # sequence (prompt + completion), read at its last real token.
    chosen_scores: torch.Tensor | None = None  # (Bc,)
    rejected_scores: torch.Tensor | None = None  # (Br,)

    def at_least_float32(self) -> LossInputs:
        """Half-precision fields are upcast: sigmoid/log terms lose too much in 16 bits.

        float64 stays float64 (gradcheck relies on it); lengths become floats of the same kind.
        Index fields (token_rows, groups) stay integers.
        """
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or f.name in _INDEX_FIELDS:
                continue
            if not value.is_floating_point() or value.dtype in (torch.float16, torch.bfloat16):
                value = value.float()
            changes[f.name] = value
        return replace(self, **changes)


@dataclass
class LossOutput:
    """`loss` is a scalar: the mean over examples. `metrics` are floats or 0-d tensors."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)

"""Small pieces several losses share: implicit rewards, reward metrics."""

from __future__ import annotations

import torch

from prefopt.losses.base import LossInputs


def log_ratios(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_c - ref_c, pi_r - ref_r): the implicit rewards before the beta factor."""
    chosen = inputs.policy_chosen_logps - inputs.reference_chosen_logps
    rejected = inputs.policy_rejected_logps - inputs.reference_rejected_logps
    return chosen, rejected


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """rewards/{chosen,rejected,margins,accuracies} for paired rewards (detached means)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }

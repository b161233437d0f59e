"""APO: Anchored Preference Optimization, variants zero and down.

D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive
Revisions", Eq. 6 (APO-zero) and Eq. 7 (APO-down).
"""

import torch

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "apo_zero",
    checks={"beta": checks.positive},
    description="Anchored PO, zero (D'Oosterlinck et al. 2024): raise chosen, lower rejected likelihood",
)
def apo_zero_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """APO-zero, Eq. 6: loss_i = (1 - sigma(beta (pi_c - ref_c))) + sigma(beta (pi_r - ref_r))."""
    chosen, rejected = log_ratios(inputs)
    losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))


@register_loss(
    "apo_down",
    checks={"beta": checks.positive},
    description="Anchored PO, down (D'Oosterlinck et al. 2024): lower both, rejected more",
)
def apo_down_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """APO-down, Eq. 7: loss_i = sigma(beta (pi_c - ref_c)) + 1 - sigma(beta h)."""
    chosen, rejected = log_ratios(inputs)
    losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))

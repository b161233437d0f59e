"""DPO: Direct Preference Optimization.

Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", Eq. 7; label smoothing ("conservative DPO") as in the
authors' reference code (eric-mitchell/direct-preference-optimization, `preference_loss`).
"""

import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "dpo",
    checks={"beta": checks.positive, "label_smoothing": checks.half_open(0.0, 0.5)},
    description="Direct Preference Optimization (Rafailov et al. 2023), optional label smoothing",
)
def dpo_loss(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO, Rafailov et al. 2023, Eq. 7.

    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss_i = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    Defaults: beta=0.1, label_smoothing=0.0 (reference code). Rewards are beta * (pi - ref).
    """
    chosen, rejected = log_ratios(inputs)
    logits = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))

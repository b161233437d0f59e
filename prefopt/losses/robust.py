"""Robust DPO: an unbiased DPO loss under preference-label noise.

Chowdhury et al., 2024, "Provably Robust DPO: Aligning Language Models with Noisy
Feedback", Eq. 10; label_smoothing is the assumed flip rate epsilon.
"""

import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "robust",
    checks={"beta": checks.positive, "label_smoothing": checks.half_open(0.0, 0.5)},
    description="Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate epsilon",
)
def robust_loss(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """rDPO, Chowdhury et al. 2024, Eq. 10.

    loss_i = [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)

    eps=0 is DPO.
    """
    chosen, rejected = log_ratios(inputs)
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))

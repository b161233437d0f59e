"""EXO (pairwise): Efficient Exact Optimization.

Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
Eq. 12 with K=2: reverse KL between the model's pair distribution sigma(beta h) and
label-smoothed targets (1 - eps, eps).
"""

import math

import torch
import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "exo_pair",
    checks={"beta": checks.positive, "label_smoothing": checks.open_interval(0.0, 0.5)},
    description="Efficient Exact Optimization, pairwise (Ji et al. 2024): reverse KL to smoothed labels",
)
def exo_pair_loss(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO, Ji et al. 2024, Eq. 12 (K=2).

    p = sigma(beta h)
    loss_i = p (log p - log(1 - eps)) + (1 - p) (log(1 - p) - log eps)

    Default eps=1e-3 (the paper's code and TRL); eps must be in (0, 0.5).
    """
    chosen, rejected = log_ratios(inputs)
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log(1 - eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(eps)
    )
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))

"""Hinge loss on the DPO margin (SLiC-style calibration).

Zhao et al., 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
Eq. 2 (the calibration term), applied to the reference-relative margin as in
Liu et al., 2024, "Statistical Rejection Sampling Improves Preference Optimization"
(RSO), Eq. 8; beta = 1 / delta.
"""

import torch

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "hinge",
    checks={"beta": checks.positive},
    description="Hinge loss on the DPO margin (SLiC-HF / RSO): max(0, 1 - beta * h)",
)
def hinge_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """Hinge, Zhao et al. 2023 Eq. 2 / Liu et al. 2024 Eq. 8.

    h = (pi_c - ref_c) - (pi_r - ref_r);  loss_i = max(0, 1 - beta * h)
    """
    chosen, rejected = log_ratios(inputs)
    losses = torch.relu(1 - beta * (chosen - rejected))
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))

"""SimPO: Simple Preference Optimization with a Reference-Free Reward.

Meng et al., 2024, "SimPO", Eq. 6: the reward is the length-normalised log-prob
scaled by beta, with a target margin gamma. No reference model.
"""

import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "simpo",
    needs_reference=False,
    needs_lengths=True,
    checks={
        "beta": checks.positive,
        "gamma_beta_ratio": checks.non_negative,
        "label_smoothing": checks.half_open(0.0, 0.5),
    },
    description="SimPO (Meng et al. 2024): length-normalised reference-free reward with margin gamma",
)
def simpo_loss(
    inputs: LossInputs,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO, Meng et al. 2024, Eq. 6.

    r = beta * logps / lengths;  z = r_c - r_r - gamma, gamma = gamma_beta_ratio * beta
    loss_i = -(1 - eps) log sigma(z) - eps log sigma(-z)

    Defaults beta=2.0, gamma_beta_ratio=0.5 (the reference repo's SimPOConfig).
    """
    chosen = beta * inputs.policy_chosen_logps / inputs.chosen_lengths.clamp(min=1)
    rejected = beta * inputs.policy_rejected_logps / inputs.rejected_lengths.clamp(min=1)
    logits = chosen - rejected - gamma_beta_ratio * beta
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses.mean(), reward_metrics(chosen, rejected))

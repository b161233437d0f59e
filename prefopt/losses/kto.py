"""KTO: Kahneman-Tversky Optimization.

Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
Eq. 8; the reference point z is estimated as in the authors' code (HALOs) and TRL:
the mean log-ratio of mismatched (x_i, y_j) pairs, clamped at 0, without gradient.
Unpaired: the desirable (chosen) and undesirable (rejected) sides may have any sizes.
"""

import torch

from prefopt.losses import checks
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "kto",
    needs_kl_pairs=True,
    paired=False,
    checks={
        "beta": checks.positive,
        "desirable_weight": checks.positive,
        "undesirable_weight": checks.positive,
    },
    description="Kahneman-Tversky Optimization (Ethayarajh et al. 2024): unpaired desirable/undesirable data",
)
def kto_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO, Ethayarajh et al. 2024, Eq. 8.

    z = sg(max(0, mean(policy_kl_logps - reference_kl_logps)));  r = pi - ref
    desirable:   w_D * (1 - sigma(beta * (r - z)))
    undesirable: w_U * (1 - sigma(beta * (z - r)))
    loss = mean over the desirable and undesirable losses together.

    Defaults beta=0.1, weights 1.0. Under gradient accumulation or several processes
    z is taken from the micro-batch on this process (no all-reduce).
    """
    kl_gap = inputs.policy_kl_logps - inputs.reference_kl_logps
    z = kl_gap.detach().mean().clamp(min=0) if kl_gap.numel() else kl_gap.new_zeros(())
    chosen = inputs.policy_chosen_logps - inputs.reference_chosen_logps
    rejected = inputs.policy_rejected_logps - inputs.reference_rejected_logps
    losses = torch.cat(
        (
            desirable_weight * (1 - torch.sigmoid(beta * (chosen - z))),
            undesirable_weight * (1 - torch.sigmoid(beta * (z - rejected))),
        )
    )
    metrics = {"kl": z}
    if chosen.numel():
        metrics["rewards/chosen"] = beta * chosen.detach().mean()
    if rejected.numel():
        metrics["rewards/rejected"] = beta * rejected.detach().mean()
    if chosen.numel() and rejected.numel():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return LossOutput(losses.mean(), metrics)

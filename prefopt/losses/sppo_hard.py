"""SPPO (hard labels): Self-Play Preference Optimization.

Wu et al., 2024, "Self-Play Preference Optimization for Language Model Alignment",
Eq. 3.6 with hard win probabilities (chosen wins with probability 1): the chosen
log-ratio is regressed to +1/(2 beta) and the rejected one to -1/(2 beta).
"""

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "sppo_hard",
    checks={"beta": checks.positive},
    description="Self-Play PO with hard labels (Wu et al. 2024): squared regression of each log-ratio",
)
def sppo_hard_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """SPPO-hard, Wu et al. 2024, Eq. 3.6 (eta = 1/beta).

    loss_i = (pi_c - ref_c - 1/(2 beta))^2 + (pi_r - ref_r + 1/(2 beta))^2
    """
    chosen, rejected = log_ratios(inputs)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))

"""NCA (pairwise): Noise Contrastive Alignment.

Chen et al., 2024, "Noise Contrastive Alignment of Language Models with Explicit
Rewards", Eq. 12 with K=2 (one chosen, one rejected); optimises absolute
likelihoods rather than only their margin.
"""

import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "nca_pair",
    checks={"beta": checks.positive},
    description="Noise Contrastive Alignment, pairwise (Chen et al. 2024): absolute-likelihood objective",
)
def nca_pair_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """NCA, Chen et al. 2024, Eq. 12 for a pair.

    r = beta * (pi - ref)
    loss_i = -log sigma(r_c) - 0.5 log sigma(-r_c) - 0.5 log sigma(-r_r)
    """
    chosen, rejected = log_ratios(inputs)
    chosen, rejected = beta * chosen, beta * rejected
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return LossOutput(losses.mean(), reward_metrics(chosen, rejected))

"""DPOP (Smaug): DPO-Positive.

Pal et al., 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
DPO-Positive", Eq. 3 (arXiv v3): the penalty lambda * max(0, log ref_c - log pi_c)
sits inside the sigmoid, so it only bites once the chosen likelihood falls below
the reference.
"""

import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "dpop",
    checks={"beta": checks.positive, "dpop_lambda": checks.non_negative},
    description="DPO-Positive (Smaug, Pal et al. 2024): DPO + penalty when chosen logp drops below reference",
)
def dpop_loss(inputs: LossInputs, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPOP, Pal et al. 2024, Eq. 3 (v3).

    h = (pi_c - ref_c) - (pi_r - ref_r);  p = max(0, ref_c - pi_c)
    loss_i = -log sigma(beta * (h - lambda * p))

    Defaults: beta=0.1, dpop_lambda=50 (paper's experiments). lambda=0 is exactly DPO.
    Metrics add `dpop/penalty` (mean p) and `dpop/penalty_active` (fraction with p > 0).
    """
    chosen, rejected = log_ratios(inputs)
    penalty = (-chosen).clamp(min=0)
    logits = beta * (chosen - rejected - dpop_lambda * penalty)
    losses = -F.logsigmoid(logits)
    metrics = reward_metrics(beta * chosen, beta * rejected)
    metrics["dpop/penalty"] = penalty.detach().mean()
    metrics["dpop/penalty_active"] = (penalty.detach() > 0).float().mean()
    return LossOutput(losses.mean(), metrics)

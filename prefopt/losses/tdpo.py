"""TDPO: Token-level Direct Preference Optimization, variants 1 and 2.

Zeng et al., 2024, "Token-level Direct Preference Optimization" (ICML), Eq. 17 (TDPO1)
and Eq. 18 (TDPO2); formulas and defaults as in the authors' reference code
(Vance0124/Token-level-Direct-Preference-Optimization, `tdpo_loss`).

kl_c / kl_r are the sequential KL divergences: the sum over completion tokens t of
KL(pi_ref(. | x, y<t) || pi_theta(. | x, y<t)) over the full vocabulary.
"""

import torch
import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


def _tdpo(inputs: LossInputs, beta: float, kl_term: torch.Tensor) -> LossOutput:
    chosen, rejected = log_ratios(inputs)
    losses = -F.logsigmoid(beta * (chosen - rejected - kl_term))
    # The reference code reports the token-level "values": beta * (log-ratio + sequential KL).
    metrics = reward_metrics(beta * (chosen + inputs.chosen_kl), beta * (rejected + inputs.rejected_kl))
    metrics["kl/chosen"] = inputs.chosen_kl.detach().mean()
    metrics["kl/rejected"] = inputs.rejected_kl.detach().mean()
    return LossOutput(losses.mean(), metrics)


@register_loss(
    "tdpo1",
    needs_token_kl=True,
    checks={"beta": checks.positive},
    description="Token-level DPO, variant 1 (Zeng et al. 2024): DPO margin minus sequential KL difference",
)
def tdpo1_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """TDPO1, Zeng et al. 2024, Eq. 17.

    loss_i = -log sigma(beta * [h - (kl_r - kl_c)]),  h = (pi_c - ref_c) - (pi_r - ref_r)

    Default beta=0.1. With kl_c = kl_r = 0 this is exactly DPO. Rewards are
    beta * (pi - ref + kl), as in the reference code.
    """
    return _tdpo(inputs, beta, inputs.rejected_kl - inputs.chosen_kl)


@register_loss(
    "tdpo2",
    needs_token_kl=True,
    checks={"beta": checks.positive, "alpha": checks.non_negative},
    description="Token-level DPO, variant 2 (Zeng et al. 2024): alpha-weighted KL, chosen KL stop-gradient",
)
def tdpo2_loss(inputs: LossInputs, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO2, Zeng et al. 2024, Eq. 18.

    loss_i = -log sigma(beta * [h - alpha * (kl_r - sg(kl_c))])

    Defaults beta=0.1, alpha=0.5 (reference code). The stop-gradient on kl_c means
    no gradient flows through the chosen side's KL.
    """
    return _tdpo(inputs, beta, alpha * (inputs.rejected_kl - inputs.chosen_kl.detach()))

"""BCO (pairwise): Binary Classifier Optimization.

Jung et al., 2024, "Binary Classifier Optimization for Large Language Model
Alignment", Eq. 8: chosen and rejected rewards are classified against a shift delta,
the mean reward. The paper keeps a running mean over training; this pure function
takes `delta` as a hyperparameter and, when it is None, uses the batch mean (what a
fresh running mean gives on the first step, as in TRL).
"""

import torch
import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


def _is_number(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number or None, got {value!r}"
    return None


@register_loss(
    "bco_pair",
    checks={"beta": checks.positive, "delta": checks.optional(_is_number)},
    description="Binary Classifier Optimization, pairwise (Jung et al. 2024): rewards classified around delta",
)
def bco_pair_loss(inputs: LossInputs, *, beta: float = 0.1, delta: float | None = None) -> LossOutput:
    """BCO, Jung et al. 2024, Eq. 8.

    r = beta * (pi - ref);  delta = mean(r_c, r_r) of the batch (detached) unless given
    loss_i = -log sigma(r_c - delta) - log sigma(-(r_r - delta))
    """
    chosen, rejected = log_ratios(inputs)
    chosen, rejected = beta * chosen, beta * rejected
    if delta is None:
        delta = torch.cat((chosen, rejected)).detach().mean()
    losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
    metrics = reward_metrics(chosen, rejected)
    metrics["bco/delta"] = torch.as_tensor(delta).detach()
    return LossOutput(losses.mean(), metrics)

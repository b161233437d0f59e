"""ORPO: Monolithic Preference Optimization without Reference Model.

Hong et al., 2024, "ORPO", Eq. 6-7. Reference-free: an SFT term on the chosen
completion plus lambda times a log-odds-ratio term.

The NLL term is the mean over the chosen *response* tokens (as in LLaMA-Factory
and HALOs). TRL's ORPOTrainer averages its NLL over prompt and response tokens,
so only the odds-ratio term is directly comparable with TRL's `odds_ratio_loss`.
"""

import torch
import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss

# Upper bound for a mean token log-prob: log(1 - exp(0)) is -inf, so an average
# log-prob of exactly 0 is treated as 1e-6 below zero. This keeps log-odds finite.
_MAX_MEAN_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with log p = mean_logps."""
    mean_logps = mean_logps.clamp(max=_MAX_MEAN_LOGP)
    return mean_logps - log1mexp(mean_logps)


@register_loss(
    "orpo",
    needs_reference=False,
    needs_lengths=True,
    checks={"beta": checks.positive},
    description="Odds Ratio Preference Optimization (Hong et al. 2024): SFT + lambda * log-odds ratio, no reference",
)
def orpo_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """ORPO, Hong et al. 2024, Eq. 6-7 (beta is the paper's lambda, default 0.1).

    l_bar = logps / lengths (mean token log-prob);  lo = l_bar - log(1 - exp(l_bar))
    loss_i = -l_bar_c - beta * log sigma(lo_c - lo_r)

    Rewards are beta * l_bar (as in TRL). Metrics add `nll` (mean -l_bar_c),
    `log_odds_ratio` (mean log sigma(lo_c - lo_r)) and `log_odds_chosen` (mean lo_c - lo_r).
    """
    mean_chosen = inputs.policy_chosen_logps / inputs.chosen_lengths.clamp(min=1)
    mean_rejected = inputs.policy_rejected_logps / inputs.rejected_lengths.clamp(min=1)
    odds_gap = log_odds(mean_chosen) - log_odds(mean_rejected)
    ratio = F.logsigmoid(odds_gap)
    nll = -mean_chosen
    losses = nll - beta * ratio
    metrics = reward_metrics(beta * mean_chosen, beta * mean_rejected)
    metrics["nll"] = nll.detach().mean()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = odds_gap.detach().mean()
    return LossOutput(losses.mean(), metrics)

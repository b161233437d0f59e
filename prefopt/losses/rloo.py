"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"), as TRL 1.x's RLOOTrainer.

An online loss (`needs_rollouts`): G completions per prompt; each one's baseline is the mean
reward of the other G - 1. The KL to the reference is part of the reward, one number per completion.
"""

from prefopt.losses import _policy_gradient as pg
from prefopt.losses._advantages import rloo_advantages
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "rloo",
    needs_rollouts=True,
    paired=False,
    checks=pg.CHECKS,
    description="RLOO (Ahmadian et al. 2024): leave-one-out baseline, KL in the reward, sequence-level clip",
)
def rloo_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.05,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_estimator: str = "k1",
) -> LossOutput:
    """RLOO as TRL 1.x: R'_i = R_i - beta * sum_t KL_t (k1 = logp_old - ref, no gradient);
    A_i = R'_i - mean of R'_j over the other samples j of the group;
    loss = mean_i -min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon_high) A_i), rho_i the
    completion's (summed) probability ratio, 1 with one update per batch.
    Example: R = (1, 0, 0), no KL: A = (1, -0.5, -0.5).
    """
    kl = pg.sequence_kl(inputs, kl_estimator)
    advantages = rloo_advantages(inputs.rewards - beta * kl, inputs.groups)
    return pg.sequence_level_loss(inputs, advantages, epsilon=epsilon, epsilon_high=epsilon_high, kl=kl)

"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), and Dr.GRPO.

An online loss: each step samples G completions per prompt and scores them with the reward
(`needs_rollouts`); the advantage of a completion is its reward standardised within its group.
"""

from prefopt.losses import _policy_gradient as pg
from prefopt.losses import checks
from prefopt.losses._advantages import grpo_advantages
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "grpo",
    needs_rollouts=True,
    paired=False,
    checks={
        **pg.CHECKS,
        "loss_type": checks.one_of(*pg.NORMALISATIONS),
        "scale_rewards": checks.one_of("group", "batch", "none"),
        "eps": checks.positive,
    },
    description="GRPO (Shao et al. 2024): group-standardised rewards, clipped per-token surrogate + beta * KL",
)
def grpo_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_estimator: str = "k3",
    loss_type: str = "dapo",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> LossOutput:
    """GRPO, Shao et al. 2024, Eq. 3, with TRL 1.x's normalisations.

    A_i = (R_i - mean_group) / (std_group + eps), std with Bessel's correction (0 for a group
    whose rewards are all equal); scale_rewards="none" with loss_type="dr_grpo" is Dr.GRPO.
    Per token: -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta * k3,
    k3 = e^(ref - logp) - (ref - logp) - 1; rho == 1 with one update per batch.
    Example (one group, R = (1, 0), one token each, logp = ref): A = +-0.5 / (0.70711 + 1e-4),
    loss = mean(-0.70700, 0.70700) = 0 with gradient A * grad logp per token.

    Defaults: beta 0.04 (DeepSeekMath; TRL 1.x defaults to 0), epsilon 0.2, loss_type dapo (TRL 1.x).
    """
    advantages = grpo_advantages(inputs.rewards, inputs.groups, scale=scale_rewards, eps=eps)
    return pg.token_level_loss(
        inputs,
        advantages,
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        kl_estimator=kl_estimator,
        loss_type=loss_type,
    )

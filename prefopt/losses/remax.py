"""ReMax (Li et al. 2023): REINFORCE with the greedy completion's reward as the baseline.

An online loss: each step samples completions (`needs_rollouts`) and one greedy completion
per prompt (`needs_greedy_baseline`); no critic, no normalisation.
"""

from prefopt.losses import _policy_gradient as pg
from prefopt.losses._advantages import remax_advantages
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "remax",
    needs_rollouts=True,
    needs_greedy_baseline=True,
    paired=False,
    checks=pg.CHECKS,
    description="ReMax (Li et al. 2023): reward minus the greedy completion's reward, KL in the reward",
)
def remax_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.05,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_estimator: str = "k1",
) -> LossOutput:
    """ReMax, Li et al. 2023, Alg. 1: A_i = (R_i - beta * sum_t KL_t) - R(greedy completion of the prompt);
    loss = mean_i -min(rho_i A_i, clip(rho_i) A_i) (REINFORCE: rho == 1, gradient -A_i grad log pi(y_i)).
    Example: R = (1, 0), greedy 0.25, no KL: A = (0.75, -0.25).
    """
    kl = pg.sequence_kl(inputs, kl_estimator)
    advantages = remax_advantages(inputs.rewards - beta * kl, inputs.baseline_rewards)
    return pg.sequence_level_loss(inputs, advantages, epsilon=epsilon, epsilon_high=epsilon_high, kl=kl)

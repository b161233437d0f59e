"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, 2025), as TRL 1.x runs it.

An online loss (`needs_rollouts`) with GRPO's group-standardised advantages. Where PPO and GRPO
clip the ratio inside the surrogate (a clipped token gets no gradient at all), CISPO clips the
importance-sampling weight itself, with no gradient through it, so every token keeps its policy
gradient, scaled by a weight at most `epsilon_max`.
"""

from prefopt.losses import _policy_gradient as pg
from prefopt.losses import checks
from prefopt.losses._advantages import grpo_advantages
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "cispo",
    needs_rollouts=True,
    paired=False,
    checks={
        "beta": checks.non_negative,
        "epsilon_max": checks.positive,
        "kl_estimator": checks.one_of("k1", "k3"),
        "scale_rewards": checks.one_of("group", "batch", "none"),
        "eps": checks.positive,
    },
    description="CISPO (MiniMax-M1 2025): clipped, stop-gradient IS weight times A times log-prob, per token",
)
def cispo_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.0,
    epsilon_max: float = 5.0,
    kl_estimator: str = "k3",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> LossOutput:
    """CISPO, MiniMax-M1 (2025), Eq. 4, in TRL 1.x's form (loss_type="cispo").

    w_t = sg(min(rho_t, epsilon_max)), rho_t = e^(logp_t - old_t); A_i as GRPO;
    per token: -w_t * A_i * logp_t + beta * KL_t; loss = sum over the tokens / their number.
    The paper writes the cap as 1 + eps_high^IS (and no lower bound in practice); TRL, after
    ScaleRL (Khatri et al. 2025), takes the cap itself, epsilon_max, recommended 5.0.
    Gradient: -w_t A_i grad logp_t: a token whose ratio passed the cap still learns, at weight
    epsilon_max (GRPO's clip would zero it). clip_ratio: tokens with rho > epsilon_max and A > 0.
    Example: one token, logp = -1, old = -2.8 (rho = e^1.8 = 6.05), A = 1: w = 5, loss = 5,
    d loss / d logp = -5.
    """
    advantages = grpo_advantages(inputs.rewards, inputs.groups, scale=scale_rewards, eps=eps)[inputs.token_rows]
    rho = (inputs.token_logps - pg.old_logps(inputs)).exp()
    weight = rho.clamp(max=epsilon_max).detach()
    per_token = pg.corrected(-weight * advantages.detach() * inputs.token_logps, pg.sampler_weights(inputs))
    kl = pg.token_kl(inputs, kl_estimator)
    if beta and kl is not None:
        per_token = per_token + beta * kl
    active = (rho > epsilon_max) & (advantages > 0)
    loss = pg.masked_mean(per_token, pg.token_mask(inputs))
    return LossOutput(loss, pg.rollout_metrics(inputs, kl, active))

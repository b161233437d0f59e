"""REINFORCE++ (Hu 2025): REINFORCE with the per-token KL penalty as a step reward and returns
whitened over the batch; no critic, no group baseline.
"""

from prefopt.losses import _policy_gradient as pg
from prefopt.losses import checks
from prefopt.losses._advantages import reinforce_pp_advantages
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "reinforce_pp",
    needs_rollouts=True,
    paired=False,
    checks={**pg.CHECKS, "gamma": checks.closed(0.0, 1.0), "loss_type": checks.one_of(*pg.NORMALISATIONS)},
    description="REINFORCE++ (Hu 2025): KL-penalised step rewards, batch-whitened returns, clipped per token",
)
def reinforce_pp_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.01,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    loss_type: str = "bnpo",
) -> LossOutput:
    """REINFORCE++ as verl computes it: r_t = -beta * KL_t (from sg(logp), ref) plus the reward at the
    last token; G_t = sum_{s >= t} gamma^(s-t) r_s; A = (G - mean) / sqrt(var + 1e-8) over all tokens of
    the batch (Bessel's var); per token -min(rho A, clip(rho) A); token mean (bnpo).
    gamma 1 (the notes: an early wrong token cannot be repaired later, so it is not discounted).
    """
    advantages = reinforce_pp_advantages(
        inputs.rewards,
        pg.old_logps(inputs),
        inputs.reference_token_logps,
        inputs.token_rows,
        kl_coef=beta,
        gamma=gamma,
        estimator=kl_estimator,
    )
    out = pg.token_level_loss(
        inputs,
        advantages,
        beta=0.0,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        kl_estimator=kl_estimator,
        loss_type=loss_type,
    )
    return out

"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, Qwen), as TRL 1.x runs it.

An online loss (`needs_rollouts`) with GRPO's group-standardised advantages, but one importance
ratio per completion, the geometric mean of its tokens' ratios, clipped at the sequence level.
"""

from prefopt.losses import _policy_gradient as pg
from prefopt.losses import checks
from prefopt.losses._advantages import grpo_advantages
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "gspo",
    needs_rollouts=True,
    paired=False,
    checks={**pg.CHECKS, "scale_rewards": checks.one_of("group", "batch", "none"), "eps": checks.positive},
    description="GSPO (Zheng et al. 2025): sequence-level importance ratio (length-normalised), clipped per completion",
)
def gspo_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.0,
    epsilon: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    kl_estimator: str = "k3",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> LossOutput:
    """GSPO, Zheng et al. 2025, Eq. 5-7.

    s_i = (pi(y_i | x) / pi_old(y_i | x))^(1 / |y_i|) = exp(mean_t (logp_t - old_t));
    A_i as GRPO (group-standardised, TRL's eps 1e-4);
    loss = mean_i [ -min(s_i A_i, clip(s_i, 1 - epsilon, 1 + epsilon_high) A_i) + beta * mean_t KL_t ],
    which is TRL's GRPOTrainer with importance_sampling_level="sequence" and loss_type="grpo".
    With one update per sampled batch s_i = 1 and the gradient is A_i * mean_t grad logp_t.
    Example: a completion whose tokens have log-ratios (0.1, -0.3) and A = 1: s = e^-0.1 = 0.904837,
    below the clip range, so min(s A, 0.9997 A) takes the unclipped s A: its loss is -0.904837 and
    its gradient -A s mean_t grad logp_t = -0.452419 per token's grad logp.

    Defaults: the paper's clip range (3e-4, 4e-4) and no KL term (beta 0), as TRL's GSPO recipe.
    """
    advantages = grpo_advantages(inputs.rewards, inputs.groups, scale=scale_rewards, eps=eps)
    rows, n = inputs.token_rows, len(inputs.rewards)
    log_ratio = inputs.token_logps - pg.old_logps(inputs)
    lengths = inputs.chosen_lengths.to(log_ratio.dtype).clamp(min=1)
    sequence_log_ratio = log_ratio.new_zeros(n).index_add(0, rows, log_ratio) / lengths
    per_sequence, active = pg.clipped_surrogate(sequence_log_ratio, advantages.detach(), epsilon, epsilon_high)
    per_sequence = pg.corrected(per_sequence, pg.sequence_sampler_weights(inputs, per_token_mean=True))
    kl = pg.token_kl(inputs, kl_estimator)
    if beta and kl is not None:
        per_sequence = per_sequence + beta * kl.new_zeros(n).index_add(0, rows, kl) / lengths
    return LossOutput(pg.masked_mean(per_sequence, inputs.completion_mask), pg.rollout_metrics(inputs, kl, active))

"""PPO (Schulman et al. 2017) as RLHF uses it (Ouyang et al. 2022; Stiennon et al. 2020): the notes'
four models.

- actor: the policy being trained;
- critic: V(s_t), a value head trained with the actor (`needs_value_model`; prefopt.online.critic);
- reward model: frozen, any registered reward (a rule, or `reward_model`), scored once per completion;
- reference: frozen; with LoRA the policy with its adapter off, else a copy (`needs_reference`).

The KL to the reference is a per-token step reward, the reward model's score is added at the
last token, and GAE turns the step rewards and the critic's values into advantages. gamma = 1 by
default: in text an early wrong token cannot be repaired by later ones, so later rewards are not
worth less to it (the notes' argument; also TRL's and OpenRLHF's default).
"""

import torch

from prefopt.losses import _policy_gradient as pg
from prefopt.losses import checks
from prefopt.losses._advantages import explained_variance, gae, kl_penalty, token_rewards, whiten
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "ppo",
    needs_rollouts=True,
    needs_value_model=True,
    paired=False,
    checks={
        **pg.CHECKS,
        "gamma": checks.closed(0.0, 1.0),
        "lam": checks.closed(0.0, 1.0),
        "vf_coef": checks.non_negative,
        "cliprange_value": checks.positive,
    },
    description="PPO (Schulman et al. 2017) with a critic: KL step rewards, GAE, clipped policy and value losses",
)
def ppo_loss(
    inputs: LossInputs,
    *,
    beta: float = 0.05,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    vf_coef: float = 0.1,
    cliprange_value: float = 0.2,
    whiten_advantages: bool = True,
) -> LossOutput:
    """PPO-clip with a value head, as TRL's PPOTrainer and OpenRLHF compute it, per completion token t:

    r_t = -beta * KL_t (KL_t from the sampling policy's and the reference's log-probs, k1 by
    default: logp_old - ref) + the completion's score at its last token;
    delta_t = r_t + gamma * V_old(t+1) - V_old(t) (V = 0 after the last token),
    A_t = delta_t + gamma * lam * A_{t+1}, returns R_t = A_t + V_old(t) (GAE, Schulman et al. 2016);
    A whitened over the batch's tokens when whiten_advantages;
    policy loss  -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A), rho = e^(logp - logp_old);
    value loss   0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-cliprange_value) - R)^2);
    loss = mean over tokens of the policy loss + vf_coef * mean over tokens of the value loss.

    Example (one completion of two tokens, score 1, logp = ref, V = V_old = (0.5, 0.25), gamma 1,
    lam 0.5, no whitening): r = (0, 1); delta = (0 + 0.25 - 0.5, 1 + 0 - 0.25) = (-0.25, 0.75);
    A = (-0.25 + 0.5 * 0.75, 0.75) = (0.125, 0.75); R = A + V = (0.625, 1.0); value loss
    0.5 * mean(0.125^2, 0.75^2) = 0.5 * (0.015625 + 0.5625) / 2 = 0.14453125; policy loss value
    mean(-0.125, -0.75) = -0.4375 (rho == 1); loss = -0.4375 + 0.1 * 0.14453125 = -0.423046875.

    With one update per sampled batch (prefopt's loop) logp_old = sg(logp) and V_old = sg(V), so
    both clips are inactive in value and the gradients are the plain policy gradient and
    (V - R) grad V; old_token_logps / old_token_values make them bite on reused rollouts.
    """
    rows, num_rows = inputs.token_rows, len(inputs.rewards)
    old = pg.old_logps(inputs)
    values = inputs.token_values
    old_values = values.detach() if inputs.old_token_values is None else inputs.old_token_values
    step_rewards = token_rewards(
        inputs.rewards, old, inputs.reference_token_logps, rows, kl_coef=beta, estimator=kl_estimator
    )
    advantages, returns = gae(step_rewards, old_values, rows, num_rows, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = whiten(advantages)
    policy, active = pg.clipped_surrogate(inputs.token_logps - old, advantages.detach(), epsilon, epsilon_high)
    policy = pg.corrected(policy, pg.sampler_weights(inputs))
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    returns = returns.detach()
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    mask = pg.token_mask(inputs)  # DAPO's truncation masking: masked tokens leave both means
    policy_loss, value_loss = pg.masked_mean(policy, mask), pg.masked_mean(value, mask)
    kl = kl_penalty(inputs.token_logps, inputs.reference_token_logps, kl_estimator)
    metrics = pg.rollout_metrics(inputs, kl, active)
    del metrics["equal_groups"]  # the critic, not the group, is PPO's baseline: equal groups still learn
    metrics.update(
        {
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "explained_variance": explained_variance(old_values, returns),
            "value_clip_ratio": ((values - old_values).abs() > cliprange_value).float().mean()
            if values.numel()
            else values.new_zeros(()),
            "value": old_values.mean() if values.numel() else values.new_zeros(()),
        }
    )
    return LossOutput(policy_loss + vf_coef * value_loss, metrics)

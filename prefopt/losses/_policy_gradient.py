"""Pieces the policy-gradient losses share (DESIGN §6): the clipped surrogate, the normalisations,
the KL term and the metrics. Token-level tensors are flat (K,) with `inputs.token_rows`.

Per token: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * KL_t, rho = e^(logp - old);
with one update per sampled batch old == sg(logp), so rho == 1 in value and its gradient is
A * grad logp (the policy gradient). Normalisations, as TRL 1.x GRPOTrainer:
  grpo     mean over each completion's tokens, then over completions
  bnpo     mean over all tokens of the batch
  dr_grpo  sum over all tokens / (completions * max_completion_length)
  dapo     sum over all tokens / tokens of the generation batch; here a micro-batch samples its own
           completions, so that is its own tokens (== bnpo per micro-batch)
"""

from __future__ import annotations

import torch

from prefopt.losses._advantages import equal_groups, group_mean_std, kl_penalty
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.checks import half_open, non_negative, one_of, optional

NORMALISATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")

# checks every policy-gradient loss shares
CHECKS = {
    "beta": non_negative,
    "epsilon": half_open(0.0, 1.0),
    "epsilon_high": optional(non_negative),
    "kl_estimator": one_of("k1", "k3"),
}


def old_logps(inputs: LossInputs) -> torch.Tensor:
    """The sampling policy's token log-probs: given, or sg(current) (one update per batch)."""
    return inputs.token_logps.detach() if inputs.old_token_logps is None else inputs.old_token_logps


def sampler_weights(inputs: LossInputs) -> torch.Tensor | None:
    """Truncated importance sampling (TIS; Yao et al. 2025; TRL's vllm_importance_sampling_cap): per
    token min(pi_old / pi_sampler, cap), no gradient; it corrects the surrogate, estimated under the
    sampler, for the sampler differing from the learner (another precision or engine). None when off."""
    if inputs.importance_cap is None or inputs.sampler_token_logps is None:
        return None
    return (old_logps(inputs) - inputs.sampler_token_logps).exp().clamp(max=inputs.importance_cap).detach()


def sequence_sampler_weights(inputs: LossInputs, per_token_mean: bool = False) -> torch.Tensor | None:
    """TIS for one ratio per completion: min(prod_t pi_old / pi_sampler, cap), or with
    `per_token_mean` (GSPO's length-normalised ratio) min(exp(mean_t log(pi_old / pi_sampler)), cap)."""
    if inputs.importance_cap is None or inputs.sampler_token_logps is None:
        return None
    log_ratio = old_logps(inputs) - inputs.sampler_token_logps
    sums = log_ratio.new_zeros(len(inputs.rewards)).index_add(0, inputs.token_rows, log_ratio)
    if per_token_mean:
        sums = sums / inputs.chosen_lengths.to(sums.dtype).clamp(min=1)
    return sums.exp().clamp(max=inputs.importance_cap).detach()


def corrected(per_item: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_item if weights is None else per_item * weights


def token_mask(inputs: LossInputs) -> torch.Tensor | None:
    """(K,) 1 for the tokens of completions that count in the loss, 0 for masked ones (DAPO's
    truncation masking); None: all count. Masked completions keep their place in the advantages."""
    return None if inputs.completion_mask is None else inputs.completion_mask[inputs.token_rows]


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of `values` over the entries the mask keeps (0 with no gradient when none is kept)."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(rho A, clip(rho) A), whether the clip was active) elementwise; rho = e^log_ratio."""
    high = epsilon if epsilon_high is None else epsilon_high
    rho = log_ratio.exp()
    clipped = rho.clamp(1 - epsilon, 1 + high)
    loss = -torch.min(rho * advantages, clipped * advantages)
    active = ((rho < 1 - epsilon) & (advantages < 0)) | ((rho > 1 + high) & (advantages > 0))
    return loss, active


def token_kl(inputs: LossInputs, estimator: str) -> torch.Tensor | None:
    """KL(pi || ref) per token from the sampled tokens (None without a reference)."""
    if inputs.reference_token_logps is None:
        return None
    return kl_penalty(inputs.token_logps, inputs.reference_token_logps, estimator)


def aggregate(per_token: torch.Tensor, inputs: LossInputs, loss_type: str) -> torch.Tensor:
    """The batch's loss from per-token losses, by one of NORMALISATIONS."""
    rows, num_rows = inputs.token_rows, len(inputs.policy_chosen_logps)
    if loss_type == "grpo":
        sums = per_token.new_zeros(num_rows).index_add(0, rows, per_token)
        lengths = per_token.new_zeros(num_rows).index_add(0, rows, torch.ones_like(per_token))
        return masked_mean(sums / lengths.clamp(min=1), inputs.completion_mask)
    if loss_type in ("bnpo", "dapo"):
        return masked_mean(per_token, token_mask(inputs))
    if loss_type == "dr_grpo":  # TRL: masked tokens leave the sum, not the constant normaliser
        longest = inputs.max_completion_length or int(inputs.chosen_lengths.max())
        mask = token_mask(inputs)
        return (per_token if mask is None else per_token * mask).sum() / (num_rows * longest)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(NORMALISATIONS)}")


def rollout_metrics(inputs: LossInputs, kl: torch.Tensor | None, clip_active: torch.Tensor) -> dict:
    """reward, reward_std (mean std within a prompt's group, as TRL logs it), kl (per token),
    completion_length, clip_ratio (share of tokens or completions the clip held) and the count
    of groups whose rewards were all equal (no signal)."""
    rewards, groups = inputs.rewards.detach(), inputs.groups
    _, std, _ = group_mean_std(rewards, groups)
    metrics = {
        "reward": rewards.mean(),
        "reward_std": std.mean(),
        "completion_length": inputs.chosen_lengths.float().mean(),
        "clip_ratio": clip_active.to(rewards.dtype).mean() if clip_active.numel() else rewards.new_zeros(()),
        "equal_groups": float(equal_groups(rewards, groups)),
    }
    if kl is not None:
        metrics["kl"] = kl.detach().mean() if kl.numel() else rewards.new_zeros(())
    return metrics


def token_level_loss(
    inputs: LossInputs,
    advantages: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    kl_estimator: str,
    loss_type: str,
) -> LossOutput:
    """GRPO-style: the clipped surrogate per token with `advantages` (K,) (or per completion (N,),
    broadcast to its tokens), plus beta * KL_t in the loss, normalised by `loss_type`."""
    if advantages.shape[0] != inputs.token_logps.shape[0]:
        advantages = advantages[inputs.token_rows]
    log_ratio = inputs.token_logps - old_logps(inputs)
    per_token, active = clipped_surrogate(log_ratio, advantages.detach(), epsilon, epsilon_high)
    per_token = corrected(per_token, sampler_weights(inputs))  # before the KL term, as TRL
    kl = token_kl(inputs, kl_estimator)
    if beta and kl is not None:
        per_token = per_token + beta * kl
    return LossOutput(aggregate(per_token, inputs, loss_type), rollout_metrics(inputs, kl, active))


def sequence_kl(inputs: LossInputs, estimator: str) -> torch.Tensor:
    """Sum over each completion's tokens of KL(pi_old || ref) (no gradient): the KL-in-reward penalty."""
    if inputs.reference_token_logps is None:
        return inputs.rewards.new_zeros(inputs.rewards.shape)
    per_token = kl_penalty(old_logps(inputs), inputs.reference_token_logps, estimator).detach()
    return per_token.new_zeros(len(inputs.rewards)).index_add(0, inputs.token_rows, per_token)


def sequence_level_loss(
    inputs: LossInputs, advantages: torch.Tensor, *, epsilon: float, epsilon_high: float | None, kl: torch.Tensor
) -> LossOutput:
    """RLOO/ReMax as TRL's RLOOTrainer: one ratio per completion (summed log-probs), clipped, mean
    over completions. `kl` (N,) is the per-completion KL already folded into the rewards."""
    old = old_logps(inputs).new_zeros(len(inputs.rewards)).index_add(0, inputs.token_rows, old_logps(inputs))
    per_sequence, active = clipped_surrogate(
        inputs.policy_chosen_logps - old, advantages.detach(), epsilon, epsilon_high
    )
    per_sequence = corrected(per_sequence, sequence_sampler_weights(inputs))
    metrics = rollout_metrics(inputs, None, active)
    metrics["kl"] = kl.sum() / inputs.chosen_lengths.float().sum().clamp(min=1)  # per token, as the others
    return LossOutput(masked_mean(per_sequence, inputs.completion_mask), metrics)

"""The sampler-learner mismatch monitor (DESIGN §6, #21 item 2).

The completions are sampled by one computation (generate: a KV cache, decode-shaped matmuls,
perhaps another precision or engine) and scored by another (the training forward). In exact
arithmetic both give the same log-prob of each sampled token; in practice they drift, and a large
drift silently turns on-policy RL into off-policy RL (verl #2996, #6780; open-instruct #1473).
The rollout step records the sampler's log softmax(logits / T) of every sampled token
(models/rollout.SampledTokenLogps) and compares it with the learner's at the same weights (pi_old),
every step:

  mismatch/mean_abs_logp_diff  mean over tokens of |log pi_learner - log pi_sampler|
  mismatch/max_ratio           max over tokens of pi_learner / pi_sampler
  mismatch/min_ratio           min over tokens of the same
  mismatch/token_kl            KL(sampler || learner) per token, k3 estimate from the sampled
                               tokens: mean of r - 1 - log r, r = pi_learner / pi_sampler (>= 0)

`importance_sampling_cap` C turns on truncated importance sampling (TIS, Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"; TRL's
vllm_importance_sampling_correction): each token's policy-gradient term is weighted by
min(pi_old / pi_sampler, C), without gradient (losses/_policy_gradient.sampler_weights).
"""

from __future__ import annotations

import torch


def in_batch_order(batch, per_completion: list[torch.Tensor]) -> torch.Tensor:
    """(K,) values given completion by completion (logical row order, each in token order), placed
    where the batch's layout puts each row's tokens (the shared-prefix layout packs rows freely,
    but keeps each row's tokens in order)."""
    rows = batch.predict_row
    order = torch.sort(rows, stable=True).indices  # positions of row 0's tokens, then row 1's, ...
    flat = torch.cat([values.to(rows.device, torch.float32) for values in per_completion])
    if flat.numel() != rows.numel():
        raise ValueError(f"{flat.numel()} sampler log-probs for {rows.numel()} completion tokens")
    out = torch.empty_like(flat)
    out[order] = flat
    return out


def mismatch_metrics(learner: torch.Tensor, sampler: torch.Tensor) -> dict[str, float]:
    """The four figures of the module's docstring (floats; zeros when there are no tokens)."""
    if learner.numel() == 0:
        return {name: 0.0 for name in NAMES}
    delta = learner.detach().double() - sampler.double()
    ratio = delta.exp()
    values = torch.stack([delta.abs().mean(), ratio.max(), ratio.min(), (ratio - 1 - delta).mean()])
    return dict(zip(NAMES, values.tolist(), strict=True))


NAMES = ("mismatch/mean_abs_logp_diff", "mismatch/max_ratio", "mismatch/min_ratio", "mismatch/token_kl")


def mismatch_warning(values: dict[str, float], threshold: float) -> str:
    return (
        f"the sampler's and the learner's log-probs of the sampled tokens differ by "
        f"{values['mismatch/mean_abs_logp_diff']:.3g} on average (threshold {threshold:g}; ratio "
        f"{values['mismatch/min_ratio']:.3g}..{values['mismatch/max_ratio']:.3g}): the run is partly off-policy. "
        "Sample in the training precision, or pass --importance-sampling-cap C (e.g. 2) to correct for it"
    )

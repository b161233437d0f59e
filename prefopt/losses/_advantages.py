"""Advantage estimators of the policy-gradient losses (DESIGN §6): small pure functions.

Layouts. A batch holds N completions; `groups` (N,) says which prompt each belongs to (GRPO,
RLOO: the G samples of one prompt). Token-level quantities are flat (K,) over the completion
tokens of all rows, with `rows` (K,) the completion each token belongs to, a row's tokens in
order (the collator's prediction map). `padded` turns them into (N, T) for the recursions.

Groups whose rewards are all equal (or that hold one completion) carry no signal: their
advantage is exactly 0 (never NaN), and `equal_groups` counts them (TRL #3857).
"""

from __future__ import annotations

import torch


def group_mean_std(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: its group's mean, standard deviation with Bessel's correction (0 for a group of
    one), and size."""
    num = int(groups.max()) + 1 if groups.numel() else 0
    size = torch.zeros(num, dtype=rewards.dtype, device=rewards.device).index_add(0, groups, torch.ones_like(rewards))
    total = torch.zeros_like(size).index_add(0, groups, rewards)
    mean = (total / size.clamp(min=1))[groups]
    squares = torch.zeros_like(size).index_add(0, groups, (rewards - mean) ** 2)
    std = (squares / (size - 1).clamp(min=1)).sqrt()[groups]
    return mean, std, size[groups]


def _equal_rows(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """True for rows of groups whose rewards are all equal (a group of one included)."""
    num = int(groups.max()) + 1 if groups.numel() else 0
    high = torch.full((num,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    low = torch.full((num,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    high = high.scatter_reduce(0, groups, rewards, "amax")
    low = low.scatter_reduce(0, groups, rewards, "amin")
    return (high == low)[groups]


def equal_groups(rewards: torch.Tensor, groups: torch.Tensor) -> int:
    """How many groups have all rewards equal (no learning signal)."""
    equal = _equal_rows(rewards, groups)
    return len(torch.unique(groups[equal]))


def grpo_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_group) / (std_group + eps), std with Bessel's correction (TRL: eps 1e-4).

    scale="none" is Dr.GRPO (Liu et al. 2025): A_i = R_i - mean_group, no division; "batch"
    divides by the std of the whole batch instead (TRL's scale_rewards="batch").
    Example: R = (1, 0, 0, 1) in one group: mean 0.5, std sqrt(4 * 0.25 / 3) = 0.57735;
    A = +-0.5 / 0.57745 = +-0.86588.
    """
    mean, std, _ = group_mean_std(rewards, groups)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (std + eps)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if rewards.numel() > 1 else 0.0) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return torch.where(_equal_rows(rewards, groups), torch.zeros_like(advantages), advantages)


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean of the other samples of its group.

    = R_i - (S - R_i) / (n - 1), S the group's sum. Example: R = (1, 0, 0): A = (1, -0.5, -0.5).
    A group of one has no other sample: A = 0.
    """
    _, _, size = group_mean_std(rewards, groups)
    num = int(groups.max()) + 1 if groups.numel() else 0
    total = torch.zeros(num, dtype=rewards.dtype, device=rewards.device).index_add(0, groups, rewards)[groups]
    advantages = rewards - (total - rewards) / (size - 1).clamp(min=1)
    return torch.where(_equal_rows(rewards, groups), torch.zeros_like(advantages), advantages)


def remax_advantages(rewards: torch.Tensor, baseline_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax (Li et al. 2023): A = R(sample) - R(greedy sample of the same prompt); no normalisation."""
    return rewards - baseline_rewards


# -- token level --------------------------------------------------------------------------------


def token_positions(rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of each token within its row, length of each row); a row's tokens in order."""
    lengths = torch.zeros(num_rows, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.empty_like(rows)
    positions[order] = torch.arange(len(rows), device=rows.device) - starts[rows[order]]
    return positions, lengths


def padded(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (K,) token values -> (N, T) right-padded with 0, and the (K,) positions to read them back."""
    positions, lengths = token_positions(rows, num_rows)
    width = int(lengths.max()) if num_rows else 0
    out = values.new_zeros((num_rows, width))
    out[rows, positions] = values
    return out, positions


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from the sampled token: k1 = logp - ref;
    k3 = e^(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        delta = ref_logps - logps
        return delta.exp() - delta - 1
    raise ValueError(f"unknown KL estimator '{estimator}' (k1 or k3)")


def token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rows: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Step rewards (K,): r_t = -kl_coef * KL_t, plus the row's score at its last token (PPO, REINFORCE++)."""
    rewards = -kl_coef * kl_penalty(logps, ref_logps, estimator)
    positions, lengths = token_positions(rows, len(scores))
    last = positions == lengths[rows] - 1
    return rewards + torch.where(last, scores[rows], torch.zeros_like(rewards))


def discounted_returns(rewards: torch.Tensor, rows: torch.Tensor, num_rows: int, *, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s within each row (K,)."""
    grid, positions = padded(rewards, rows, num_rows)
    returns = torch.zeros_like(grid)
    running = grid.new_zeros(num_rows)
    for t in range(grid.shape[1] - 1, -1, -1):
        running = grid[:, t] + gamma * running
        returns[:, t] = running
    return returns[rows, positions]


def reinforce_pp_advantages(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rows: torch.Tensor,
    *,
    kl_coef: float,
    gamma: float = 1.0,
    estimator: str = "k1",
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025; verl's estimator): the returns of the KL-penalised step rewards,
    whitened over every token of the batch: (G - mean) / sqrt(var + eps), var with Bessel's correction.

    One token has no spread: its advantage is 0.
    """
    returns = discounted_returns(
        token_rewards(scores, logps, ref_logps, rows, kl_coef=kl_coef, estimator=estimator),
        rows,
        len(scores),
        gamma=gamma,
    )
    return whiten(returns, eps=eps)


def whiten(values: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all of `values`, var with Bessel's correction (TRL's and
    verl's masked_whiten with the mean shifted). Fewer than two values have no spread: 0.

    Example: x = (1, 2, 3): mean 2, var 1, -> (-1, 0, 1) / sqrt(1 + 1e-8).
    """
    if values.numel() < 2:
        return torch.zeros_like(values)
    return (values - values.mean()) / (values.var(unbiased=True) + eps).sqrt()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): 1 for a perfect critic, 0 for one that predicts
    the mean, negative for worse. 0 when the returns do not vary (nothing to explain).

    Example: returns (1, 2, 3), values (1, 2, 2): Var(0, 0, 1) = 1/3, Var(returns) = 1 -> 2/3.
    """
    if returns.numel() < 2:
        return returns.new_zeros(())
    spread = returns.var(unbiased=True)
    if spread == 0:
        return returns.new_zeros(())
    return 1 - (returns - values).var(unbiased=True) / spread


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) per row; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}; returns_t = A_t + V_t.
    """
    r, positions = padded(rewards, rows, num_rows)
    v, _ = padded(values, rows, num_rows)
    advantages = torch.zeros_like(r)
    running = r.new_zeros(num_rows)
    for t in range(r.shape[1] - 1, -1, -1):
        next_value = v[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    flat = advantages[rows, positions]
    return flat, flat + values

"""Several rewards at once: a weighted sum, each reward's own scores kept for logging.

    R(x, y) = sum_k w_k R_k(x, y)

as TRL's `reward_funcs` with `reward_weights`: a reward that cannot score a completion (None)
leaves it out of the sum (TRL sums with nansum), so a reward may score only the rows it knows
about (a math checker, say); a completion no reward can score is unscorable (None). Each
reward's scores of the last call are in `components` (name -> scores), which online training
logs as `reward/NAME` (the mean of its scored completions) and `prefopt sample` writes as
`rewards/NAME` columns.

Arguments: with one reward `--reward-arg ARG=VALUE` as always; with several each is named
`--reward-arg NAME.ARG=VALUE` (NAME a reward's name), so no argument lands on the wrong reward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefopt.rewards.registry import Reward, RewardError, get_reward


class WeightedRewards:
    """Rewards summed with weights; callable like one Reward (`name`, `arguments`, no `compare`)."""

    compare = None  # a pairwise judge compares two answers; a sum of scores cannot

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        names, self.names = {}, []
        for reward in self.rewards:  # the same reward twice (other arguments): judge, judge#2
            names[reward.name] = names.get(reward.name, 0) + 1
            self.names.append(reward.name if names[reward.name] == 1 else f"{reward.name}#{names[reward.name]}")
        self.components: dict[str, list] = {}

    @property
    def name(self) -> str:
        return " + ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.names, strict=True))

    @property
    def arguments(self) -> dict:
        return {n: {"weight": w, **r.arguments} for n, w, r in zip(self.names, self.weights, self.rewards, strict=True)}

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        self.components = {
            name: reward(prompts, completions, **columns) for name, reward in zip(self.names, self.rewards, strict=True)
        }
        out = []
        for i in range(len(completions)):
            parts = [
                w * scores[i]
                for w, scores in zip(self.weights, self.components.values(), strict=True)
                if scores[i] is not None
            ]
            out.append(sum(parts) if parts else None)
        return out


def split_arguments(names: Sequence[str], arguments: Mapping[str, object]) -> list[dict]:
    """Each reward's arguments: all of them for a single reward; NAME.ARG keys for several."""
    if len(names) == 1:
        return [dict(arguments)]
    out: list[dict] = [{} for _ in names]
    for key, value in arguments.items():
        owner, dot, argument = key.partition(".")
        if not dot or owner not in names:
            raise RewardError(
                f"--reward-arg {key}={value}: with several rewards name the one it is for, as NAME.ARG "
                f"(NAME one of {', '.join(dict.fromkeys(names))})"
            )
        for i, name in enumerate(names):
            if name == owner:
                out[i][argument] = value
    return out


def configure_rewards(names, weights=None, arguments: Mapping[str, object] | None = None):
    """The reward(s) asked for: None, one Reward (one name, weight 1), or WeightedRewards."""
    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        if weights:
            raise RewardError("--reward-weight without --reward: name the rewards to weigh")
        return None
    weights = list(weights) if weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise RewardError(f"{len(names)} rewards but {len(weights)} --reward-weight values: give one per reward")
    rewards = [
        get_reward(name, **args) for name, args in zip(names, split_arguments(names, arguments or {}), strict=True)
    ]
    if len(rewards) == 1 and weights[0] == 1.0:
        return rewards[0]
    return WeightedRewards(rewards, weights)


def component_means(reward) -> dict[str, float]:
    """reward/NAME: the mean of each component's scored completions in its last call (none for one reward)."""
    out = {}
    for name, scores in getattr(reward, "components", {}).items():
        scored = [s for s in scores if s is not None]
        if scored:
            out[f"reward/{name}"] = sum(scored) / len(scored)
    return out

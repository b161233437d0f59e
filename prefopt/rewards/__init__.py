"""The reward registry (public API), DESIGN §6: rewards score sampled completions.

from prefopt.rewards import register_reward, get_reward, available_rewards

A reward is `f(prompts, completions, **columns) -> list[float | None]`; see registry.py.
"""

from prefopt.rewards.combined import WeightedRewards, configure_rewards  # noqa: E402
from prefopt.rewards.registry import (
    Reward,
    RewardError,
    RewardSpec,
    available_rewards,
    check_scores,
    get_reward,
    get_reward_spec,
    register_reward,
)

# Importing a module registers the rewards it defines.
from prefopt.rewards import exact_match, implicit, judge, reaction, reward_model  # noqa: E402,F401  isort: skip

__all__ = [
    "Reward",
    "RewardError",
    "RewardSpec",
    "WeightedRewards",
    "available_rewards",
    "check_scores",
    "configure_rewards",
    "get_reward",
    "get_reward_spec",
    "import_reward_module",
    "register_reward",
]


def import_reward_module(name_or_path: str) -> None:
    """`--reward-module FILE.py` (or a dotted name): import it so its `@register_reward` calls run."""
    from prefopt.errors import PrefoptError
    from prefopt.plugins import import_loss_module

    try:
        import_loss_module(name_or_path)  # the same importer as --loss-module
    except PrefoptError as error:
        raise PrefoptError(str(error).replace("--loss-module", "--reward-module")) from None

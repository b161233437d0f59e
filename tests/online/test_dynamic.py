"""DAPO's dynamic sampling (prefopt/online/dynamic.py): by hand, and in a GRPO run."""

import json

from prefopt import TrainConfig, train
from prefopt.losses import get_loss
from prefopt.losses.registry import register_loss
from prefopt.online.dynamic import fill, informative
from prefopt.rewards import register_reward

SEEN: list[list[list[float]]] = []  # the reward groups each loss call received


@register_reward("test_flat_or_varied", replace=True)
def flat_or_varied(prompts, completions, **columns):
    """0 for every completion of a prompt that starts with "flat" (an equal group, always); otherwise
    a value that differs between completions."""
    return [
        0.0 if p.startswith("flat") else float(sum(map(ord, c)) % 7) for p, c in zip(prompts, completions, strict=True)
    ]


@register_loss("test_group_recorder", needs_rollouts=True, paired=False, replace=True)
def group_recorder(inputs, *, beta: float = 0.0):
    groups: dict[int, list[float]] = {}
    for group, reward in zip(inputs.groups.tolist(), inputs.rewards.tolist(), strict=True):
        groups.setdefault(group, []).append(reward)
    SEEN.append(list(groups.values()))
    return get_loss("grpo")(inputs, beta=beta)


def test_informative_and_fill_by_hand():
    assert informative([0.0, 1.0]) and informative([None, 0.5, 0.0])
    assert not informative([1.0, 1.0]) and not informative([None, 1.0]) and not informative([None, None])
    a, b, c, d = ("a", None, [1.0, 1.0], None), ("b", None, [0.0, 1.0], None), ("c", None, [2.0, 2.0], None), (
        "d", None, [0.0, 0.5], None)  # fmt: skip
    assert [x[0] for x in fill([a, b, c, d], 2)] == ["b", "d"]  # informative first, in sampling order
    assert [x[0] for x in fill([a, b, c], 2)] == ["b", "a"]  # too few: filled with equal ones, in order


def test_dynamic_sampling_trains_on_informative_groups_only(setup, tmp_path):
    """Half the prompts always give equal rewards. With up to 20 extra rounds every group that reaches
    the loss has rewards that differ, and the run logs the rounds it took and the share (1.0). Without
    the option the flat groups would reach the loss (the first three batches of an epoch's
    permutation hold 6 of the 8 prompts, so at least two flat ones)."""
    _, model = setup
    prompts = tmp_path / "mixed.jsonl"
    lines = [{"prompt": f"{kind} {k}"} for kind in ("flat", "vary") for k in range(4)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    SEEN.clear()
    result = train(
        TrainConfig(
            loss="test_group_recorder",
            model=model,
            data=[str(prompts)],
            reward="test_flat_or_varied",
            num_generations=4,
            max_new_tokens=6,
            batch_size=2,
            max_steps=3,
            logging_steps=1,
            save_steps=1000,
            dynamic_sampling_rounds=20,
            output_dir=str(tmp_path / "run"),
        )  # fmt: skip
    )
    assert len(SEEN) == 3
    assert all(len(groups) == 2 and all(informative(g) for g in groups) for groups in SEEN)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "reward" in row]
    assert all(row["dynamic_sampling/informative"] == 1.0 for row in rows)
    assert all(0 <= row["dynamic_sampling/rounds"] <= 20 for row in rows)
    # 3 batches of 2 hold 6 of the 8 prompts, so at least 2 flat ones were replaced
    assert sum(row["dynamic_sampling/rounds"] for row in rows) > 0

"""Several rewards (#21 item 5): the weighted sum by hand, None left out as TRL's nansum, named
arguments, and each reward logged on its own in `prefopt sample` and in online training."""

import json

import pytest
from helpers import save_tiny_model

from prefopt.cli.main import main
from prefopt.rewards import RewardError, WeightedRewards, configure_rewards, get_reward, register_reward
from prefopt.rewards.combined import split_arguments


@register_reward("test_combined_half", replace=True)
def _half(prompts, completions, **columns):
    """0.5 for a completion with a digit, None (unscorable) for one without."""
    return [0.5 if any(ch.isdigit() for ch in c) else None for c in completions]


def test_weighted_sum_by_hand():
    """answer "4"; completions "4", "it is 4", "5", "none".
    exact_match: 1, 0, 0, 0; number_match: 1, 1, 0, 0; test_combined_half: 0.5, 0.5, 0.5, None.
    With weights 1, 0.5, 2: 1 + 0.5 + 1 = 2.5; 0 + 0.5 + 1 = 1.5; 0 + 0 + 1 = 1; 0 + 0 (half None, left out)."""
    reward = configure_rewards(["exact_match", "number_match", "test_combined_half"], [1, 0.5, 2])
    assert (
        isinstance(reward, WeightedRewards) and reward.name == "1*exact_match + 0.5*number_match + 2*test_combined_half"
    )
    completions = ["4", "it is 4", "5", "none"]
    assert reward([""] * 4, completions, answer=["4"] * 4) == [2.5, 1.5, 1.0, 0.0]
    assert reward.components["test_combined_half"] == [0.5, 0.5, 0.5, None]
    only = configure_rewards(["test_combined_half", "test_combined_half"], [1, 1])
    assert only.names == ["test_combined_half", "test_combined_half#2"]
    assert only([""], ["none"]) == [None]  # no reward could score it: unscorable


def test_one_reward_stays_itself_and_bad_combinations_are_one_line():
    assert configure_rewards(["exact_match"]).name == "exact_match" and configure_rewards(None) is None
    assert configure_rewards("exact_match").name == "exact_match"
    with pytest.raises(RewardError, match=r"2 rewards but 1 --reward-weight values"):
        configure_rewards(["exact_match", "number_match"], [1])
    with pytest.raises(RewardError, match=r"--reward-weight without --reward"):
        configure_rewards([], [1])
    with pytest.raises(RewardError, match=r"--reward-arg path=x: with several rewards name the one it is for"):
        split_arguments(["exact_match", "reward_model"], {"path": "x"})
    assert split_arguments(["exact_match", "reward_model"], {"reward_model.path": "x"}) == [{}, {"path": "x"}]
    assert split_arguments(["reward_model"], {"path": "x"}) == [{"path": "x"}]


def test_sample_writes_the_sum_and_each_reward(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": "4"}) + "\n" for i in range(3)))
    out = tmp_path / "s.jsonl"
    argv = ["sample", "--model", model, "--prompts", str(prompts), "--output", str(out), "--num-samples", "2"]
    argv += ["--max-new-tokens", "4", "--reward", "exact_match", "--reward", "number_match"]
    assert main(argv + ["--reward-weight", "2", "--reward-weight", "0.5"]) == 0
    assert "reward 2*exact_match + 0.5*number_match: mean" in capsys.readouterr().out
    exact, number = get_reward("exact_match"), get_reward("number_match")
    for row in map(json.loads, out.read_text().splitlines()):
        answers = ["4"] * len(row["completions"])
        assert row["rewards/exact_match"] == exact([row["prompt"]] * 2, row["completions"], answer=answers)
        assert row["rewards/number_match"] == number([row["prompt"]] * 2, row["completions"], answer=answers)
        assert row["rewards"] == [
            2 * e + 0.5 * n for e, n in zip(row["rewards/exact_match"], row["rewards/number_match"], strict=True)
        ]


def test_online_training_logs_each_reward(setup, tmp_path):
    """GRPO with test_digits (weight 1) and number_match's stand-in test_combined_half (weight 2):
    metrics.jsonl holds reward/NAME for each, and `reward` is their weighted sum's mean when every
    completion was scored by both."""
    from prefopt import TrainConfig, train

    root, model = setup
    module = tmp_path / "half.py"
    module.write_text(
        "from prefopt.rewards import register_reward\n"
        "@register_reward('test_combined_always', replace=True)\n"
        "def always(prompts, completions, **columns):\n    return [0.25 for _ in completions]\n"
    )
    config = TrainConfig(
        loss="grpo", model=model, data=[str(root / "prompts.jsonl")], reward=["test_digits", "test_combined_always"],
        reward_weights=[1.0, 2.0], reward_module=[str(root / "digits_reward.py"), str(module)], num_generations=4,
        max_new_tokens=4, batch_size=4, max_steps=2, learning_rate=1e-2, logging_steps=1, save_steps=1000,
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["reward/test_combined_always"] == pytest.approx(0.25)
        assert row["reward"] == pytest.approx(row["reward/test_digits"] + 2 * 0.25, abs=1e-6)
    saved = (result.output_dir / "config.yaml").read_text()
    assert "- test_digits\n- test_combined_always" in saved and "reward_weights:\n- 1.0\n- 2.0" in saved


def test_a_weight_count_that_does_not_match_stops_train_before_any_model_loads(capsys):
    """`prefopt train` checks the count with the config, so the error comes in a second, before the model loads."""
    argv = ["train", "--loss", "grpo", "--model", "no-such-model", "--data", "x.jsonl", "--reward", "exact_match"]
    assert main(argv + ["--reward", "number_match", "--reward-weight", "1"]) == 2
    assert "--reward-weight: 2 rewards but 1 weights: give one weight per reward" in capsys.readouterr().err

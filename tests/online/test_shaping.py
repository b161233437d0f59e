"""DAPO's overlong reward shaping (Yu et al. 2025, Eq. 13): by hand, and in a GRPO run."""

import json

import pytest

from prefopt import TrainConfig, train
from prefopt.errors import PrefoptError
from prefopt.online.shaping import overlong_penalty


def test_overlong_penalty_by_hand():
    """L_max 16, L_cache 4: the penalty starts after 12 tokens and reaches -1 at 16:
    12 -> 0; 13 -> (12 - 13) / 4 = -0.25; 14 -> -0.5; 16 -> -1; 17 (over the budget) -> -1.
    With penalty 0.5 every value halves."""
    assert [overlong_penalty(n, 16, 4) for n in (1, 12, 13, 14, 16, 17)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(14, 16, 4, penalty=0.5) == -0.25


def test_a_grpo_run_adds_the_penalty_to_every_reward(setup, tmp_path):
    """A constant reward of 1 and max_new_tokens 4 with overlong_buffer 2: completions of 3 and 4
    tokens lose 0.5 and 1. The logged reward is 1 + the logged mean penalty, which is <= 0, and the
    run says how much the shaping took off."""
    root, model = setup
    module = tmp_path / "one.py"
    module.write_text(
        "from prefopt.rewards import register_reward\n"
        "@register_reward('test_shaping_one', replace=True)\n"
        "def one(prompts, completions, **columns):\n    return [1.0 for _ in completions]\n"
    )
    values = dict(
        loss="grpo", model=model, data=[str(root / "prompts.jsonl")], reward="test_shaping_one",
        reward_module=[str(module)], num_generations=4, max_new_tokens=4, batch_size=4, max_steps=2,
        learning_rate=1e-2, logging_steps=1, save_steps=1000, output_dir=str(tmp_path / "run"), overlong_buffer=2,
    )  # fmt: skip
    result = train(TrainConfig(**values))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    for row in rows:
        assert -1.0 <= row["overlong_penalty"] <= 0.0
        assert row["reward"] == pytest.approx(1.0 + row["overlong_penalty"], abs=1e-6)
    with pytest.raises(PrefoptError, match=r"overlong_buffer \(4\) must be below max_new_tokens \(4\)"):
        train(TrainConfig(**{**values, "overlong_buffer": 4, "output_dir": str(tmp_path / "run2")}))


def test_truncation_masking_marks_the_cut_completions(setup, tmp_path):
    """mask_truncated_completions: the loss receives completion_mask = 1 for completions that ended
    with EOS and 0 for those cut at max_new_tokens (here 3 tokens of a random model: nearly all cut,
    each exactly 3 tokens long); without the option no mask is passed."""
    from prefopt.losses import get_loss
    from prefopt.losses.registry import register_loss

    seen = []

    @register_loss("test_mask_recorder", needs_rollouts=True, paired=False, replace=True)
    def recorder(inputs, *, beta: float = 0.0):
        seen.append((inputs.completion_mask, inputs.chosen_lengths.clone()))
        return get_loss("grpo")(inputs, beta=beta)

    root, model = setup
    settings = dict(
        loss="test_mask_recorder", model=model, data=[str(root / "prompts.jsonl")], reward="test_digits",
        reward_module=[str(root / "digits_reward.py")], num_generations=4, max_new_tokens=3, batch_size=2,
        max_steps=2, logging_steps=1, save_steps=1000,
    )  # fmt: skip
    train(TrainConfig(**settings, mask_truncated_completions=True, output_dir=str(tmp_path / "masked")))
    assert len(seen) == 2
    for mask, lengths in seen:
        assert mask is not None and set(mask.tolist()) <= {0.0, 1.0}
        assert all(length == 3 for m, length in zip(mask.tolist(), lengths.tolist(), strict=True) if m == 0)
        assert mask.sum() < len(mask)
    seen.clear()
    train(TrainConfig(**settings, output_dir=str(tmp_path / "plain")))
    assert [mask for mask, _ in seen] == [None, None]

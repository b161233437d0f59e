"""Policy-gradient losses end to end: `prefopt train --loss grpo --data prompts.jsonl --reward ...`."""

import json

import pytest
import torch
from helpers import assert_f32_close, byte_tokenizer, save_tiny_model, tiny_llama

from prefopt import TrainConfig, train
from prefopt.cli.main import main
from prefopt.config import ConfigError
from prefopt.data.collate import shared_prefix_batch
from prefopt.models.logps import completion_states, completion_token_logps, output_head
from prefopt.online.step import plain_batch


def config(setup, tmp_path, **overrides) -> TrainConfig:
    root, model = setup
    values = dict(
        loss="grpo",
        model=model,
        data=[str(root / "prompts.jsonl")],
        reward="test_digits",
        reward_module=[str(root / "digits_reward.py")],
        num_generations=4,
        max_new_tokens=8,
        batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=1000,
        output_dir=str(tmp_path / "run"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def metrics(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "reward" in row]


def test_g_branches_share_the_prompt_and_score_as_plain_rows():
    """[prompt; c1; c2; c3] under the 4-D mask gives each token the log-prob it has after the prompt alone."""
    model = tiny_llama()
    tok = byte_tokenizer()
    groups = [
        (tok("Hello there")["input_ids"], [tok(" a")["input_ids"], tok(" bcd!")["input_ids"], tok("?")["input_ids"]]),
        (tok("Hi")["input_ids"], [tok(" xyz")["input_ids"], tok(" 12")["input_ids"]]),
    ]
    rows = [[0, 1, 2], [3, 4]]
    results = []
    for batch in (
        shared_prefix_batch(groups, rows, tok.pad_token_id),
        shared_prefix_batch(groups, rows, tok.pad_token_id, pack=False),
        plain_batch(groups, rows, tok.pad_token_id),
    ):
        with torch.no_grad():
            states = completion_states(model, batch)
            results.append((completion_token_logps(output_head(model), states), batch.predict_row))
    (shared, shared_rows), (unpacked, _), (plain, plain_rows) = results
    assert shared_rows.tolist() == plain_rows.tolist() == [0] * 2 + [1] * 5 + [2] + [3] * 4 + [4] * 3
    assert_f32_close(shared, plain, what="shared vs plain")
    assert_f32_close(unpacked, plain, what="unpacked vs plain")


def test_grpo_reward_rises_and_metrics_logged(setup, tmp_path):
    """15 steps on the tiny random model: the share of digits it writes goes up (~0.04 -> ~0.15)."""
    result = train(config(setup, tmp_path, max_steps=15))
    rows = metrics(result.output_dir)
    assert len(rows) == 15
    for key in ("reward", "reward_std", "kl", "completion_length", "clip_ratio", "equal_groups", "generation_s"):
        assert all(key in row for row in rows), key
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.03, (first, last)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert result.summary["reward"] == rows[-1]["reward"]


@pytest.mark.parametrize(
    "loss,extra",
    [
        ("rloo", {}),
        ("remax", {}),
        ("reinforce_pp", {}),
        ("grpo", {"lora": True, "share_prefix": False}),  # reference = the adapter-off policy; one row each
    ],
)
def test_each_loss_trains(setup, tmp_path, loss, extra):
    result = train(config(setup, tmp_path, loss=loss, **extra))
    rows = metrics(result.output_dir)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert result.reference == ("adapter" if extra.get("lora") else "copy")
    before = tiny_llama().state_dict()
    after = result.trainer.model.state_dict()
    if not extra.get("lora"):
        assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"


def test_cli_and_yaml(setup, tmp_path):
    root, model = setup
    argv = [
        "train", "--loss", "grpo", "--model", model, "--data", str(root / "prompts.jsonl"),
        "--reward", "test_digits", "--reward-module", str(root / "digits_reward.py"),
        "--num-generations", "2", "--max-new-tokens", "4", "--max-steps", "1", "--batch-size", "2",
        "--loss-arg", "loss_type=bnpo", "--output-dir", str(tmp_path / "cli"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert metrics(tmp_path / "cli")[0]["completion_length"] <= 4
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        f"loss: grpo\nmodel: {model}\ndata: {root / 'prompts.jsonl'}\nreward: test_digits\n"
        f"reward_module: {root / 'digits_reward.py'}\nnum_generations: 2\nmax_new_tokens: 4\nmax_steps: 1\n"
        f"loss_args: {{loss_type: dr_grpo, scale_rewards: none}}\noutput_dir: {tmp_path / 'yaml'}\n"
    )
    assert main(["train", "--config", str(recipe)]) == 0
    assert len(metrics(tmp_path / "yaml")) == 1


def test_config_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="needs a reward"):
        train(config(setup, tmp_path, reward=None))
    with pytest.raises(ConfigError, match="reference=cached cannot serve"):
        train(config(setup, tmp_path, reference="cached"))
    with pytest.raises(ConfigError, match="held-out evaluation"):
        train(config(setup, tmp_path, eval_fraction=0.5))
    with pytest.raises(ConfigError, match="temperature"):
        config(setup, tmp_path, temperature=0.0)


def test_resume_is_exact_including_the_sampling_rng(setup, tmp_path):
    """Stopped after checkpoint-2 and resumed: the same completions (rewards), losses and final weights
    as the run that never stopped. Sampling draws from the global torch RNG, which each checkpoint keeps."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    settings = dict(max_steps=4, save_steps=2, batch_size=2)
    straight = train(config(setup, tmp_path, output_dir=str(tmp_path / "straight"), **settings))
    stopped = config(setup, tmp_path, output_dir=str(tmp_path / "stopped"), **settings)
    train(stopped, callbacks=[StopAfter()], save_final=False)
    assert (tmp_path / "stopped" / "checkpoint-2").is_dir()
    resumed = train(config(setup, tmp_path, output_dir=str(tmp_path / "stopped"), resume=True, **settings))
    assert resumed.steps == 4

    def by_step(output_dir):
        return {r["step"]: (r["reward"], r["completion_length"], r["loss"]) for r in metrics(output_dir)}

    assert by_step(resumed.output_dir) == by_step(straight.output_dir)  # bit-identical on the CPU
    a, b = load_file(straight.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_recipe_runs_a_step(tmp_path, monkeypatch):
    """recipes/online/grpo.yaml (outside recipes/*.yaml, whose test expects held-out evaluation) on a tiny model."""
    from pathlib import Path

    from prefopt.config import build_config, load_yaml

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    overrides = {
        "model": save_tiny_model(tmp_path / "tiny"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "num_generations": 2,
        "max_new_tokens": 4,
    }
    result = train(build_config(load_yaml(root / "recipes/online/grpo.yaml"), overrides))
    assert result.steps == 1 and "reward" in result.metrics and result.metrics["equal_groups"] >= 0

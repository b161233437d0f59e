"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes over gloo (`accelerate launch`, the shipped
recipes/accelerate/ configs with use_cpu and two processes), against one process.

Two processes with 2 pairs each see the same global batch as one process with 4 (accelerate
hands process r every other batch of the same sampler), so the logged losses of the first steps
must agree to float32 rounding: ln 2 at step 1, then after the same averaged gradient. GRPO
samples its completions, so only its first loss (0: advantages have mean zero, the KL is 0) and
finite losses are compared. summary.json's `sharding` shows the weights really are partitioned:
the main process holds about half of them under ZeRO-3, all of them under ZeRO-2.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import SAMPLES, read_metrics

from prefopt import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("deepspeed")

# run name -> (loss, data file, LoRA): a full fine-tune with a reference copy, and LoRA with the
# adapter-off reference (the frozen, sharded head is gathered explicitly: tests the other path)
LOSSES = {
    "dpo": ("dpo", "standard.jsonl", False),
    "tdpo2": ("tdpo2", "standard.jsonl", False),
    "kto": ("kto", "unpaired.jsonl", False),
    "dpo-lora": ("dpo", "standard.jsonl", True),
}


def launch_config(tmp_path: Path, stage: int) -> Path:
    values = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"zero{stage}.yaml").read_text())
    values.update(use_cpu=True, num_processes=2)
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def launch(tmp_path, stage: int, model_dir: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config(tmp_path, stage)),
        "-m", "prefopt", "train", "--model", model_dir, *argv,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


COMMON = ["--max-steps", "3", "--max-length", "96", "--logging-steps", "1", "--learning-rate", "1e-3", "--seed", "1"]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("run", sorted(LOSSES))
def test_two_sharded_processes_log_the_losses_of_one(run, stage, tmp_path, tiny_model_dir):
    loss, data, lora = LOSSES[run]
    out = tmp_path / "sharded"
    argv = ["--loss", loss, "--data", str(SAMPLES / data), "--output-dir", str(out), "--batch-size", "2", *COMMON]
    # LoRA's own dropout draws other masks for a batch of 4 than for two of 2: off, to compare
    argv += ["--lora", "--lora-dropout", "0"] if lora else []
    result = launch(tmp_path, stage, tiny_model_dir, argv)
    assert result.stdout.count("prefopt: precision:") == 1  # start-up lines come from the main process once
    sharded = [m["loss"] for m in read_metrics(out) if "loss" in m]

    single = dict(loss=loss, model=tiny_model_dir, data=[str(SAMPLES / data)], output_dir=str(tmp_path / "one"))
    single.update(lora=lora, lora_dropout=0.0)
    single.update(batch_size=4, max_steps=3, max_length=96, logging_steps=1, learning_rate=1e-3, seed=1)
    one = [m["loss"] for m in read_metrics(train(TrainConfig(**single, save_steps=1000)).output_dir) if "loss" in m]
    assert len(sharded) == len(one) == 3
    if loss != "kto":  # KTO's first loss is not ln 2 by construction (z = 0, r = 0: 1 - sigmoid(0) = 0.5)
        assert sharded[0] == pytest.approx(math.log(2), abs=1e-6)
    for step, (a, b) in enumerate(zip(sharded, one, strict=True), start=1):
        assert a == pytest.approx(b, rel=2e-5, abs=2e-6), f"step {step}: two processes {a}, one process {b}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["sharding"]["zero_stage"] == stage and summary["sharding"]["processes"] == 2
    held = summary["sharding"]["weights_held_by_the_main_process"]
    assert (0.45 < held < 0.6) if stage == 3 else held == 1.0, held
    if lora:  # final/ holds the adapter, with whole (gathered) tensors
        from safetensors.torch import load_file

        assert all(t.numel() > 0 for t in load_file(out / "final" / "adapter_model.safetensors").values())
        return
    # final/ is an ordinary transformers folder with the whole (gathered) weights
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert {k: v.shape for k, v in final.state_dict().items()} == {k: v.shape for k, v in start.state_dict().items()}
    assert any(not (a == b).all() for a, b in zip(final.parameters(), start.parameters(), strict=True))  # trained


@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_under_zero(stage, tmp_path, setup):
    root, model = setup
    out = tmp_path / "grpo"
    argv = [
        "--loss", "grpo", "--data", str(root / "prompts.jsonl"), "--reward", "test_digits",
        "--reward-module", str(root / "digits_reward.py"), "--num-generations", "2", "--max-new-tokens", "4",
        "--batch-size", "2", "--output-dir", str(out), *COMMON,
    ]  # fmt: skip
    launch(tmp_path, stage, model, argv)
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(0.0, abs=1e-6)  # rho = 1, advantages of mean 0, policy == reference
    assert (out / "final" / "model.safetensors").exists()


def test_zero3_resume_continues_exactly(tmp_path, tiny_model_dir):
    """Checkpoints under ZeRO-3 are DeepSpeed's sharded ones; --resume from step 2 logs the losses of
    steps 3 and 4 of the uninterrupted run (constant learning rate: the schedule depends on max_steps)."""
    base = ["--loss", "dpo", "--data", str(SAMPLES / "standard.jsonl"), "--batch-size", "2", "--save-steps", "2",
            "--lr-scheduler", "constant", *COMMON[2:]]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(tmp_path, 3, tiny_model_dir, [*base, "--output-dir", str(whole), "--max-steps", "4"])
    launch(tmp_path, 3, tiny_model_dir, [*base, "--output-dir", str(parts), "--max-steps", "2"])
    assert (parts / "checkpoint-2").is_dir()
    launch(tmp_path, 3, tiny_model_dir, [*base, "--output-dir", str(parts), "--max-steps", "4", "--resume"])
    losses = lambda out: [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]  # noqa: E731
    assert losses(parts) == losses(whole)
